"""Ordinary third-party apps deploy right the first time, with manifests as authors write them.

Each test starts ``superagent up``'s embedded cluster (``tests.e2e.embedded``) and deploys
a small app built on popular packages from the public indexes, with nothing in its
manifest but a ``[run] command`` and a route — no ``[build]`` step, no absolute paths:

- httpbin (Flask) on gunicorn: ``gunicorn -b 127.0.0.1:$PORT httpbin:app`` and a
  ``requirements.txt``, routed by host;
- an express + ws app: ``node server.js`` and a ``package.json`` (``npm install``); its
  second release carries the ``package-lock.json`` the first build made (``npm ci``);
- a Starlette app on uvicorn, once as ``uvicorn app:app --host 127.0.0.1 --port $PORT``
  and once as ``python app.py`` (``uvicorn.run`` under ``__main__``).

The agent runs as this test process does: from a virtual environment whose interpreter
may live under /root (mode 0700), which the apps' own users cannot execute; the build must
pick an interpreter they can run (the build log's first line names it). Everything is
checked through the proxy: answers, the ``X-Forwarded-*`` headers the app sees, and a
websocket message echoed by the express app (handshake and frames written by hand, so no
client library is needed). A redeploy with unchanged requirements installs from the app's
package cache: it must succeed; its build time is printed, not asserted.

Skips: the express test without ``node``/``npm`` on the PATH; any test whose first build
failed with a network error in its log (the package index is unreachable). Every other
failure fails.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from superagent.participant.toolchain import SYSTEM_PATH, runnable_by_all
from tests.e2e.embedded import REQUEST_TIMEOUT, Cluster, running_cluster
from tests.support.wait import wait_until_async

BUILD_DEADLINE = 180.0  # one deploy whose build downloads packages, on a busy 2-core box
# What a build log says when the package index cannot be reached (uv, pip, npm).
NETWORK_ERRORS = ("Failed to fetch", "error sending request", "dns error", "Could not connect",
                  "Temporary failure in name resolution", "Network is unreachable",
                  "Failed to establish a new connection",
                  "ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET",
                  "ENETUNREACH")
STATUS_DEADLINE = 10.0  # heartbeats (1 s apart) until `status` shows a new instance
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's accept-key suffix


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with running_cluster() as running:
        yield running


def write_tree(dest: Path, files: dict[str, str]) -> Path:
    """``files`` (relative path -> text) under ``dest``, readable by the app's user."""
    for name, text in files.items():
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for path in (dest, *dest.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


async def deploy_built(cluster: Cluster, app_dir: Path) -> tuple[dict[str, Any], float]:
    """Deploy ``app_dir``, whose build downloads packages: the final view and its seconds.
    Skips the test when the build failed because the package index was unreachable."""
    started = time.monotonic()
    view = await cluster.deploy(app_dir, deadline=BUILD_DEADLINE)
    seconds = time.monotonic() - started
    if view["status"] != "succeeded":
        text = json.dumps(view)
        found = [marker for marker in NETWORK_ERRORS if marker in text]
        if "build" in view["reason"] and found:
            pytest.skip(f"package index unreachable: the build of {app_dir.name} failed "
                        f"with {found[0]!r} ({view['reason']})")
    assert (view["status"], view["finished"]) == ("succeeded", True), view
    return view, seconds


def build_of(cluster: Cluster, app: str, release: str) -> tuple[list[str], dict[str, Any]]:
    """The release's build log lines and release.json's ``build`` (command, seconds)."""
    prepared = cluster.embedded.agent.store.get(app, release)
    log = prepared.build_log.read_text().splitlines()
    doc = json.loads((prepared.path / "release.json").read_text())
    build: dict[str, Any] = doc["build"]
    return log, build


def assert_python_tools(log: list[str]) -> None:
    """The build log's first line names an interpreter every user can run, and uv."""
    assert log[0].startswith("# tools: python 3."), log[:5]
    interpreter = Path(log[0].split(" at ", 1)[1].split(",", 1)[0])
    assert runnable_by_all(interpreter), log[0]
    if not runnable_by_all(Path(sys.executable)):  # the agent's own: under /root, say
        assert interpreter.resolve() != Path(sys.executable).resolve(), log[0]
    assert ", uv /" in log[0], log[0]


def assert_serving(cluster: Cluster, app: str, release: str) -> None:
    instances = cluster.instances(app)
    assert instances, f"no instance of {app}"
    assert {(i["release"], i["state"]) for i in instances} == {(release, "ready")}, instances


async def status_rows(cluster: Cluster, capsys: pytest.CaptureFixture[str], app: str
                      ) -> tuple[set[tuple[str, ...]], str]:
    """``superagent status``'s ready instances of ``app`` (instance, release, state, port)
    and its whole output."""
    from superagent.cli import main as cli_main

    argv = ["status", "--server", cluster.embedded.coordinator.config.url, "--token",
            cluster.embedded.token_file.read_text().strip()]
    capsys.readouterr()
    code = await trio.to_thread.run_sync(cli_main, argv)
    out, _ = capsys.readouterr()
    assert code == 0, out
    return {tuple(line.split()[2:6]) for line in out.splitlines()
            if line.startswith(f"{app} ") and "ready" in line}, out


async def proxied(cluster: Cluster, path: str, *, host: str | None = None) -> httpx.Response:
    headers = {"host": host} if host else {}
    response = await cluster.get(path, headers=headers)
    assert response.status_code == 200, (path, response.status_code, response.text[:500])
    return response


@pytest.mark.slow
async def test_httpbin_on_gunicorn(cluster: Cluster,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """httpbin's requirements.txt builds a venv with uv; gunicorn serves it through the
    proxy with X-Forwarded-*; a second release with the same requirements builds from the
    cache; ``superagent status`` lists the instance."""
    def source(version: str) -> Path:
        return write_tree(cluster.src / f"httpbin-{version}", {
            "requirements.txt": "httpbin\ngunicorn\n",
            "superagent.toml": ('[app]\nname = "httpbin"\n'
                                '[run]\ncommand = "gunicorn -b 127.0.0.1:$PORT httpbin:app"\n'
                                '[routes]\nhosts = ["httpbin.localhost"]\n'
                                f'[env]\nVERSION = "{version}"\n')})

    first, first_seconds = await deploy_built(cluster, source("1"))
    assert first["release"] == "r1", first
    log, build = build_of(cluster, "httpbin", "r1")
    assert_python_tools(log)
    assert build["command"].startswith("uv venv"), build
    assert_serving(cluster, "httpbin", "r1")

    got = (await proxied(cluster, "/get?x=1", host="httpbin.localhost")).json()
    assert got["args"] == {"x": "1"}, got
    assert got["url"] == "http://httpbin.localhost/get?x=1", got
    assert got["origin"] == "127.0.0.1", got  # from X-Forwarded-For
    # httpbin hides the X-Forwarded-* headers (as a front proxy's) unless asked to show them
    headers = (await proxied(cluster, "/headers?show_env=1",
                             host="httpbin.localhost")).json()["headers"]
    assert headers["X-Forwarded-For"] == "127.0.0.1", headers
    assert headers["X-Forwarded-Proto"] == "http", headers
    assert headers["X-Forwarded-Host"] == "httpbin.localhost", headers
    assert headers.get("X-Request-Id"), headers

    second, second_seconds = await deploy_built(cluster, source("2"))
    assert second["release"] == "r2", second
    log2, build2 = build_of(cluster, "httpbin", "r2")
    assert_python_tools(log2)
    # everything comes from the app's uv cache: nothing large is downloaded again
    assert not [line for line in log2 if line.lstrip().startswith("Download")], log2
    assert_serving(cluster, "httpbin", "r2")
    assert (await proxied(cluster, "/get", host="httpbin.localhost")).json()["url"] == (
        "http://httpbin.localhost/get")

    # `superagent status` shows the nodes' heartbeats (one a second): the new instance
    # appears there within a few of them
    expected = {(i["instance"], "r2", "ready", str(i["port"]))
                for i in cluster.instances("httpbin")}
    _, out = await wait_until_async(lambda: status_rows(cluster, capsys, "httpbin"),
                                    "status to list the r2 instance",
                                    timeout=STATUS_DEADLINE,
                                    until=lambda seen_out: seen_out[0] == expected)
    assert "http://httpbin.localhost:" in out, out
    print(f"\nhttpbin: first deploy {first_seconds:.1f}s (build {build['seconds']:.1f}s),"
          f" redeploy with unchanged requirements {second_seconds:.1f}s "
          f"(build {build2['seconds']:.2f}s); {log[0]}")


STARLETTE_APP = '''\
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def home(request):
    return JSONResponse({"app": os.environ["SUPERAGENT_APP"],
                         "release": os.environ["SUPERAGENT_RELEASE"],
                         "prefix": request.headers.get("x-forwarded-prefix")})


async def hello(request):
    return JSONResponse({"hello": request.path_params["name"]})


app = Starlette(routes=[Route("/", home), Route("/hello/{name}", hello)])

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]))
'''


@pytest.mark.slow
async def test_starlette_on_uvicorn(cluster: Cluster) -> None:
    """One Starlette app, deployed as ``uvicorn app:app`` and as ``python app.py``."""
    commands = {"starlette": "uvicorn app:app --host 127.0.0.1 --port $PORT",
                "starlette-py": "python app.py"}
    views: dict[str, tuple[dict[str, Any], float]] = {}

    async def deploy(name: str) -> None:
        app_dir = write_tree(cluster.src / name, {
            "app.py": STARLETTE_APP, "requirements.txt": "starlette\nuvicorn\n",
            "superagent.toml": (f'[app]\nname = "{name}"\n[run]\ncommand = "{commands[name]}"\n'
                                f'[routes]\nprefix = "/{name}"\nstrip_prefix = true\n')})
        views[name] = await deploy_built(cluster, app_dir)

    async with trio.open_nursery() as nursery:  # two apps: two deploys at once
        for name in commands:
            nursery.start_soon(deploy, name)
    for name in commands:
        view, seconds = views[name]
        assert view["release"] == "r1", view
        log, build = build_of(cluster, name, "r1")
        assert_python_tools(log)
        assert_serving(cluster, name, "r1")
        home = (await proxied(cluster, f"/{name}/")).json()
        assert home == {"app": name, "release": "r1", "prefix": f"/{name}"}, home
        hello = (await proxied(cluster, f"/{name}/hello/world")).json()
        assert hello == {"hello": "world"}, hello
        print(f"\n{name} ({commands[name]}): deployed in {seconds:.1f}s "
              f"(build {build['seconds']:.1f}s)")


EXPRESS_SERVER = '''\
const http = require("http");
const express = require("express");
const { WebSocketServer } = require("ws");

const app = express();
app.get("/", (req, res) => {
  res.json({ app: "chat", release: process.env.SUPERAGENT_RELEASE,
             forwardedFor: req.get("x-forwarded-for") || null });
});
app.get("/hello/:name", (req, res) => res.json({ hello: req.params.name }));

const server = http.createServer(app);
const wss = new WebSocketServer({ server, path: "/ws" });
wss.on("connection", (ws) => {
  ws.on("message", (data) => ws.send("echo: " + data.toString()));
});
server.listen(Number(process.env.PORT), "127.0.0.1", () => {
  console.log("chat listening on " + process.env.PORT);
});
process.on("SIGTERM", () => {
  for (const client of wss.clients) client.terminate();
  server.close(() => process.exit(0));
});
'''

EXPRESS_PACKAGE = {"name": "chat", "version": "1.0.0", "private": True,
                   "main": "server.js", "scripts": {"start": "node server.js"},
                   "dependencies": {"express": "^4.21.0", "ws": "^8.18.0"}}


async def websocket_echo(proxy: str, path: str, message: str) -> str:
    """Open a websocket through the proxy by hand (RFC 6455: the Upgrade handshake, one
    masked text frame out, one text frame back); the text that came back."""
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    key = base64.b64encode(os.urandom(16)).decode()
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        buf = b""
        with trio.fail_after(REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some(4096)
                assert chunk, f"closed during the handshake: {buf!r}"
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            assert lines[0].startswith("HTTP/1.1 101"), lines
            headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
            accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            assert headers.get("sec-websocket-accept") == accept, headers
            payload = message.encode()
            assert len(payload) < 126  # a one-byte length keeps the framing short
            mask = os.urandom(4)
            await stream.send_all(bytes([0x81, 0x80 | len(payload)]) + mask
                                  + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
            while len(buf) < 2 or len(buf) < 2 + (buf[1] & 0x7F):
                chunk = await stream.receive_some(4096)
                assert chunk, f"closed before the echo: {buf!r}"
                buf += chunk
        assert buf[0] == 0x81, f"not one final text frame: {buf!r}"  # FIN, opcode text
        assert buf[1] < 126, f"an unmasked short frame expected: {buf!r}"
        return buf[2:2 + buf[1]].decode()


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("node", path=os.environ.get("PATH") or SYSTEM_PATH)
                         and shutil.which("npm", path=os.environ.get("PATH") or SYSTEM_PATH)),
                    reason="node and npm are not installed: the express + ws app needs them")
async def test_express_and_ws(cluster: Cluster) -> None:
    """express + ws from package.json (``npm install``): routes and a websocket echo
    through the proxy; a second release with the lock file the build made (``npm ci``)."""
    def source(version: str, lock: str | None = None) -> Path:
        files = {"server.js": EXPRESS_SERVER,
                 "package.json": json.dumps(EXPRESS_PACKAGE, indent=2) + "\n",
                 "superagent.toml": ('[app]\nname = "chat"\n[run]\ncommand = "node server.js"\n'
                                     '[routes]\nprefix = "/chat"\nstrip_prefix = true\n'
                                     f'[env]\nVERSION = "{version}"\n')}
        if lock is not None:
            files["package-lock.json"] = lock
        return write_tree(cluster.src / f"chat-{version}", files)

    first, first_seconds = await deploy_built(cluster, source("1"))
    assert first["release"] == "r1", first
    _, build = build_of(cluster, "chat", "r1")
    assert build["command"] == "npm install --prefer-offline --no-audit --no-fund", build
    assert_serving(cluster, "chat", "r1")
    home = (await proxied(cluster, "/chat/")).json()
    assert home == {"app": "chat", "release": "r1", "forwardedFor": "127.0.0.1"}, home
    assert (await proxied(cluster, "/chat/hello/ws")).json() == {"hello": "ws"}
    assert await websocket_echo(cluster.proxy, "/chat/ws", "hello, ws") == "echo: hello, ws"

    # the author commits the lock file npm made: the next build is `npm ci`, from the cache
    lock = (cluster.embedded.agent.store.get("chat", "r1").src / "package-lock.json")
    second, second_seconds = await deploy_built(cluster, source("2", lock.read_text()))
    assert second["release"] == "r2", second
    _, build2 = build_of(cluster, "chat", "r2")
    assert build2["command"] == "npm ci --prefer-offline --no-audit --no-fund", build2
    assert_serving(cluster, "chat", "r2")
    assert (await proxied(cluster, "/chat/")).json()["release"] == "r2"
    assert await websocket_echo(cluster.proxy, "/chat/ws", "again") == "echo: again"
    print(f"\nexpress + ws: first deploy {first_seconds:.1f}s (npm install "
          f"{build['seconds']:.1f}s), redeploy with its lock file {second_seconds:.1f}s "
          f"(npm ci {build2['seconds']:.1f}s)")
