"""The participant agent end to end: real apps, real proxy workers, its real RPC.

An app goes prepare -> start -> ready -> switch -> traffic through the proxy ->
drain -> stop; a request in flight while its instance stops completes; a Node app
shows the build detection; and the agent is killed with SIGKILL under load and
restarted, with every request answered throughout.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio

from superagent.participant.isolation import remove_app_user
from superagent.participant.service import Agent, AgentConfig
from tests.participant.children import child_python
from tests.support import logs
from tests.support.cgroups import node_groups, remove_trees
from tests.support.ports import free_port
from tests.support.wait import wait_until, wait_until_async

SECRET = "agent-test-secret"
AUTH = {"Authorization": f"Bearer {SECRET}"}
DEADLINE = 30.0  # starting a fresh agent and its workers, or an npm build, on a busy 2-core CI

APP = '''
import json, os, sys, time
from urllib.parse import unquote
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOME = os.environ["HOME"]
# With WARM_UNTIL_GO set, every start after the first warms up until $HOME/go exists:
# it listens at once but answers 503 to /healthz and 500 to everything else.
WARMING = bool(os.environ.get("WARM_UNTIL_GO")) and os.path.exists(f"{HOME}/started")
# With ONLY_ONCE set, every start after the first exits before it listens.
if os.environ.get("ONLY_ONCE") and os.path.exists(f"{HOME}/started"):
    sys.exit(3)
open(f"{HOME}/started", "w").close()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if WARMING and not os.path.exists(f"{HOME}/go"):
            self.send_response(503 if self.path == "/healthz" else 500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/read?path="):  # what may this tenant read?
            try:
                with open(unquote(self.path.split("=", 1)[1]), "rb") as f:
                    f.read(1)
                code = 200
            except PermissionError:
                code = 403
            except FileNotFoundError:
                code = 404
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/slow"):
            print("begin", self.path, flush=True)
            time.sleep(float(self.path.split("=")[1]))
        print(json.dumps({"msg": f"request {self.path}",
                          "request_id": self.headers.get("X-Request-Id")}), flush=True)
        body = json.dumps({"instance": os.environ["SUPERAGENT_INSTANCE"], "path": self.path,
                           "uid": os.getuid()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''


def tarball(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def python_app(name: str = "hello", *, extra: str = "") -> bytes:
    """The test app; ``extra`` is appended to its manifest (e.g. an ``[env]`` table)."""
    manifest = (f'[app]\nname = "{name}"\n[run]\ncommand = "{child_python()} app.py"\n'
                f'[health]\npath = "/healthz"\n[routes]\nprefix = "/{name}"\n'
                'strip_prefix = true\n' + extra)
    return tarball({"superagent.toml": manifest, "app.py": APP})


class Rig:
    """An in-process agent plus an RPC client and a proxy client."""

    def __init__(self, agent: Agent, rpc: httpx.AsyncClient, proxy: httpx.AsyncClient) -> None:
        self.agent = agent
        self.rpc = rpc
        self.proxy = proxy
        self._ids = 0

    async def signal(self, kind: str, term: int = 1, **body: Any) -> httpx.Response:
        self._ids += 1
        return await self.rpc.post(f"/v1/signals/{kind}",
                                   json={"id": f"t{self._ids}", "term": term, **body})

    async def upload(self, app: str, release: str, data: bytes) -> httpx.Response:
        self._ids += 1
        return await self.rpc.put(f"/v1/releases/{app}/{release}", content=data, headers={
            "X-Superagent-Sha256": hashlib.sha256(data).hexdigest(),
            "X-Superagent-Signal": f"t{self._ids}", "X-Superagent-Term": "1"})


def agent_logs(data_dir: Path, workers: int) -> list[tuple[str, Path]]:
    """The logs of an agent on ``data_dir`` (as a process) and of its proxy workers."""
    return [("agent", data_dir / "agent.log"),
            *((f"proxy worker {i}", data_dir / "proxy" / f"proxy-{i}.log")
              for i in range(workers)),
            ("proxy access log", data_dir / "proxy" / "proxy-access.log")]


@contextlib.contextmanager
def watched(paths: list[tuple[str, Path]]) -> Iterator[None]:
    """A failing test shows the tails of ``paths`` (a file not written yet says so)."""
    for label, path in paths:
        logs.watch(label, path)
    try:
        yield
    finally:
        for _, path in paths:
            logs.unwatch(path)


def node_of(data_dir: Path) -> str:
    """A node name unique to ``data_dir`` (pytest's directories are unique per run)."""
    return "t-" + hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]


@contextlib.asynccontextmanager
async def running_agent(data_dir: Path, rpc_port: int | None = None,
                        listen_port: int | None = None, *, stop_all: bool = True,
                        **config: Any) -> AsyncIterator[Rig]:
    """An in-process agent on ``data_dir`` with one proxy worker, and its clients.

    Leaving stops every instance (``stop_all``) or, with ``stop_all=False``, only
    cancels the agent, which leaves apps and proxy workers running as a killed agent
    does. ``config`` adds AgentConfig fields. The node name (and so the cgroup parent
    group) is the data directory's own, so agents of other test runs on the machine
    never share a cgroup with this one, and an agent started again on the same
    directory is the same node.
    """
    rpc_port, listen_port = rpc_port or free_port(), listen_port or free_port()
    defaults = {"proxy_workers": 1, "drain_grace": 10.0, "node": node_of(data_dir)}
    agent = Agent(AgentConfig(data_dir=data_dir, secret=SECRET, rpc=("127.0.0.1", rpc_port),
                              listen=(f"127.0.0.1:{listen_port}",), **{**defaults, **config}))
    workers = int(config.get("proxy_workers", 1))
    # in process, the agent's own log is the test's captured output
    with watched(agent_logs(data_dir, workers)[1:]):
        async with trio.open_nursery() as nursery:
            with trio.fail_after(DEADLINE):
                await nursery.start(agent.run)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{rpc_port}", headers=AUTH,
                                         timeout=DEADLINE) as rpc, \
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{listen_port}",
                                      timeout=DEADLINE) as proxy:
                try:
                    yield Rig(agent, rpc, proxy)
                finally:
                    if stop_all:
                        with trio.CancelScope(shield=True), trio.move_on_after(DEADLINE):
                            await agent.stop_all()
                    nursery.cancel_scope.cancel()


@pytest.fixture
async def rig(data_dir: Path) -> AsyncIterator[Rig]:
    async with running_agent(data_dir) as rig:
        yield rig


async def test_python_app_lifecycle_through_the_proxy(rig: Rig) -> None:
    """prepare -> start x2 -> switch -> traffic to both -> a stop waits for its long request."""
    assert (await rig.upload("hello", "r1", python_app())).status_code == 200
    started = await rig.signal("start", app="hello", release="r1", count=2)
    assert started.status_code == 200, started.text
    ids = [i["id"] for i in started.json()["instances"]]
    assert all(i["state"] == "ready" for i in started.json()["instances"])
    switched = await rig.signal("switch", app="hello", instances=ids)
    assert switched.status_code == 200, switched.text

    seen = set()
    for n in range(6):
        response = await rig.proxy.get(f"/hello/x{n}", headers={"Connection": "close"})
        assert response.status_code == 200
        assert response.json()["path"] == f"/x{n}"
        seen.add(response.json()["instance"])
    assert seen == set(ids)
    if os.geteuid() == 0:  # as root each app runs as its own system user
        assert response.json()["uid"] != 0

    # A long request in flight on one instance; stopping that instance waits for it.
    slow: dict[str, Any] = {}

    async def long_request() -> None:
        answer = await rig.proxy.get("/hello/slow?s=1.5", headers={"Connection": "close"})
        slow["status"], slow["instance"] = answer.status_code, answer.json()["instance"]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_request)
        with trio.fail_after(DEADLINE):  # the app logs when it begins the slow request
            while True:
                begun = [line for line in rig.agent.log_hub.tail(app="hello", n=100)
                         if line.text.startswith("begin /slow")]
                if begun:
                    break
                await trio.sleep(0.02)  # the log hub polls files; bounded above
        victim = begun[0].instance
        pid = next(inst.pid for inst in rig.agent.instances.values()
                   if inst.config.instance == victim)
        stopped = await rig.signal("stop", instances=[victim], grace=10)
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["in_flight_cut"] == {victim: 0}
    assert slow == {"status": 200, "instance": victim}
    assert pid is not None and not psutil.pid_exists(pid)
    survivor = next(i for i in ids if i != victim)
    for _ in range(3):
        response = await rig.proxy.get("/hello/after", headers={"Connection": "close"})
        assert response.json()["instance"] == survivor

    status = (await rig.rpc.get("/v1/status")).json()
    assert [i["instance"] for i in status["instances"]] == [survivor]
    assert status["instances"][0]["figures"]["rss_bytes"] > 0
    assert status["releases"] == {"hello": ["r1"]}

    async def logged_after() -> bool:
        # the log hub polls the app's output files (every 0.1 s): wait for its next round
        answer = await rig.rpc.get("/v1/logs", params={"app": "hello", "n": 50})
        return any("request /after" in line["text"] for line in answer.json()["lines"])
    await wait_until_async(logged_after, "the app's '/after' lines in the agent's logs",
                           timeout=DEADLINE)

    same = await rig.signal("offline", term=1, offline=True)
    assert same.status_code == 200  # the term used so far
    assert (await rig.proxy.get("/-/healthz")).status_code == 503
    stale = await rig.signal("offline", term=0, offline=False)
    assert stale.status_code == 409  # older than the term already seen
    later = await rig.signal("offline", term=5, offline=False)
    assert later.status_code == 200
    fenced = await rig.signal("offline", term=4, offline=True)
    assert fenced.status_code == 409


@pytest.mark.skipif(os.geteuid() != 0, reason="per-app users need root")
async def test_a_tenant_cannot_read_another_tenants_files(rig: Rig, data_dir: Path) -> None:
    """alpha's code can read its own source but not beta's source, build log or output,
    nor the agent's state."""
    for name in ("alpha", "beta"):
        assert (await rig.upload(name, "r1", python_app(name))).status_code == 200
        started = await rig.signal("start", app=name, release="r1")
        ids = [i["id"] for i in started.json()["instances"]]
        assert (await rig.signal("switch", app=name, instances=ids)).status_code == 200
    beta_out = next(inst.config.out_log for inst in rig.agent.instances.values()
                    if inst.config.app == "beta")
    releases = data_dir / "releases"
    expected = {
        releases / "alpha" / "r1" / "src" / "app.py": 200,
        releases / "beta" / "r1" / "src" / "app.py": 403,
        releases / "beta" / "r1" / "build.log": 403,
        beta_out: 403,
        data_dir / "state.json": 403,
    }
    for path, status in expected.items():
        response = await rig.proxy.get("/alpha/read", params={"path": str(path)})
        assert response.status_code == status, path


async def test_old_releases_are_collected_but_never_one_in_use(rig: Rig) -> None:
    """Beyond the newest five (no coordinator names what to keep), releases go, except
    one whose instance still runs."""
    assert (await rig.upload("hello", "r1", python_app())).status_code == 200
    started = await rig.signal("start", app="hello", release="r1")
    assert started.status_code == 200
    removed = []
    for n in range(2, 8):  # distinct archives: a manifest comment tells them apart
        data = tarball({"superagent.toml": f'# r{n}\n[app]\nname = "hello"\n[run]\n'
                                           'command = "true"\n', "app.py": APP})
        answer = await rig.upload("hello", f"r{n}", data)
        assert answer.status_code == 200, answer.text
        removed += answer.json()["removed_releases"]
    kept = (await rig.rpc.get("/v1/status")).json()["releases"]["hello"]
    assert "r1" in kept  # its instance runs
    assert set(kept) == {"r1", "r3", "r4", "r5", "r6", "r7"} and removed == ["r2"]


async def test_debug_session_shows_proxy_and_app_for_one_request(rig: Rig) -> None:
    """While a debug session is open, one request id shows the proxy's record (rule,
    instance, status, timings) beside the app's own line, and the record is a line of the
    app's stream; outside it the record is found by its request id only (the agent keeps
    every app's recent records), never a line of the stream."""
    assert (await rig.upload("hello", "r1", python_app())).status_code == 200
    ids = [i["id"] for i in (await rig.signal("start", app="hello", release="r1")
                             ).json()["instances"]]
    assert (await rig.signal("switch", app="hello", instances=ids)).status_code == 200

    async def traced(request_id: str, *, want_proxy: bool) -> list[dict[str, Any]]:
        assert (await rig.proxy.get("/hello/t", headers={"X-Request-Id": request_id})
                ).status_code == 200
        with trio.fail_after(DEADLINE):
            while True:
                lines = (await rig.rpc.get("/v1/logs", params={
                    "app": "hello", "request_id": request_id})).json()["lines"]
                if {line["stream"] for line in lines} >= (
                        {"stdout", "proxy"} if want_proxy else {"stdout"}):
                    return list(lines)
                await trio.sleep(0.05)  # the proxy writes its records in batches; bounded

    before = await traced("dbg-before", want_proxy=False)
    opened = await rig.signal("debug", app="hello", enabled=True, ttl=60)
    assert opened.status_code == 200
    assert "hello" in (await rig.rpc.get("/v1/status")).json()["debug_sessions"]
    during = await traced("dbg-during", want_proxy=True)
    proxy = next(line for line in during if line["stream"] == "proxy")
    assert proxy["instance"] == ids[0] and proxy["release"] == "r1"
    assert proxy["fields"]["status"] == 200 and proxy["fields"]["rule"] == "prefix"
    assert proxy["fields"]["first_byte_ms"] is not None
    app_line = next(line for line in during if line["stream"] == "stdout")
    assert app_line["fields"]["request_id"] == "dbg-during"
    assert (await rig.signal("debug", app="hello", enabled=False)).status_code == 200
    after = await traced("dbg-after", want_proxy=False)
    # The records of one worker are read in order: once a later traced request shows up,
    # the earlier ones were read too, and the ones outside the session were left out.
    assert (await rig.signal("debug", app="hello", enabled=True)).status_code == 200
    await traced("dbg-barrier", want_proxy=True)
    for request_id, lines in (("dbg-before", before), ("dbg-after", after)):
        again = (await rig.rpc.get("/v1/logs", params={
            "app": "hello", "request_id": request_id})).json()["lines"]
        assert sorted(line["stream"] for line in again) == ["proxy", "stdout"], request_id
        kept = next(line for line in again if line["stream"] == "proxy")
        assert kept["instance"] == ids[0] and kept["fields"]["status"] == 200, kept
        assert "stdout" in {line["stream"] for line in lines}, request_id
    stream = (await rig.rpc.get("/v1/logs", params={"app": "hello", "n": 1000})
              ).json()["lines"]
    in_stream = {line["request_id"] for line in stream if line["stream"] == "proxy"}
    assert {"dbg-during", "dbg-barrier"} <= in_stream
    assert not in_stream & {"dbg-before", "dbg-after"}, in_stream


async def test_unknown_things_get_clear_errors(rig: Rig) -> None:
    """Starting an unprepared release, switching to an unknown instance: 4xx naming it."""
    missing = await rig.signal("start", app="nope", release="r9")
    assert missing.status_code == 404 and "nope" in missing.text
    unknown = await rig.signal("switch", app="nope", instances=["nope@r9.1"])
    assert unknown.status_code == 404 and "nope@r9.1" in unknown.text
    bad = await rig.upload("hello", "r1", b"not a tarball at all")
    assert bad.status_code == 400, bad.text


async def test_node_app_is_built_with_npm_and_served(rig: Rig) -> None:
    """A package.json app is built by the detected npm step and served through the proxy."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the Node app; they are not installed")
    server = ("require('http').createServer((q, s) => { s.end(JSON.stringify("
              "{node: process.version, instance: process.env.SUPERAGENT_INSTANCE})) })"
              ".listen(process.env.PORT, '127.0.0.1')\n")
    package = json.dumps({"name": "hellonode", "version": "1.0.0", "private": True})
    manifest = f'[app]\nname = "hellonode"\n[run]\ncommand = "{node} server.js"\n'
    archive = tarball({"superagent.toml": manifest, "package.json": package,
                       "server.js": server})
    prepared = await rig.upload("hellonode", "r1", archive)
    assert prepared.status_code == 200, prepared.text
    assert "npm" in Path(prepared.json()["build_log"]).read_text()
    started = await rig.signal("start", app="hellonode", release="r1")
    ids = [i["id"] for i in started.json()["instances"]]
    assert (await rig.signal("switch", app="hellonode", instances=ids)).status_code == 200
    response = await rig.proxy.get("/hellonode/")
    assert response.status_code == 200
    assert response.json()["node"].startswith("v")


def _wait_status(client: httpx.Client, deadline: float) -> dict[str, Any]:
    """The agent's status once its RPC answers 200."""
    response = wait_until(lambda: client.get("/v1/status"), "the agent's RPC to come up",
                          until=lambda r: r.status_code == 200, timeout=deadline,
                          interval=0.1)
    return dict(response.json())


@pytest.mark.slow
def test_agent_sigkill_under_load_loses_no_request(data_dir: Path) -> None:
    """kill -9 of the agent under load, then a restart: it re-adopts, 0 requests fail."""
    rpc_port, listen_port = free_port(), free_port()
    # The node's own name, not the host name (the default): instances' cgroups are named
    # <node>/<app>/<instance>, and this test run beside itself (another checkout's suite
    # on the same machine) would otherwise find its hello@r1.1 group holding the other's
    # processes and fail the start.
    argv = [sys.executable, "-m", "superagent", "participant", "--data-dir", str(data_dir),
            "--rpc", f"127.0.0.1:{rpc_port}", "--listen", f"127.0.0.1:{listen_port}",
            "--proxy-workers", "2", "--node", node_of(data_dir)]
    env = {**os.environ, "SUPERAGENT_SECRET": SECRET}
    log = open(data_dir / "agent.log", "ab")  # noqa: SIM115 - closed in finally
    watching = watched(agent_logs(data_dir, 2))
    watching.__enter__()  # left in finally
    first = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
    second: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    failures: list[str] = []
    rpc = httpx.Client(base_url=f"http://127.0.0.1:{rpc_port}", headers=AUTH, timeout=DEADLINE)

    def load() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{listen_port}", timeout=10) as client:
            for _ in range(20_000):  # bounded: the test stops it long before
                if stop.is_set():
                    return
                try:
                    response = client.get("/hello/load")
                    if response.status_code == 200:
                        counts["ok"] += 1
                        continue
                    failures.append(f"status {response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                counts["failed"] += 1

    def wait_for_more(n: int) -> None:
        target = counts["ok"] + n
        wait_until(lambda: dict(counts), f"{target} answers under load (load stalled?)",
                   until=lambda seen: seen["ok"] >= target, timeout=DEADLINE)

    loader = threading.Thread(target=load)
    try:
        _wait_status(rpc, DEADLINE)
        data = python_app()
        assert rpc.put("/v1/releases/hello/r1", content=data, headers={
            "X-Superagent-Sha256": hashlib.sha256(data).hexdigest(),
            "X-Superagent-Signal": "p1", "X-Superagent-Term": "1"}).status_code == 200
        started = rpc.post("/v1/signals/start", json={"id": "s1", "term": 1, "app": "hello",
                                                      "release": "r1", "count": 2})
        assert started.status_code == 200, started.text
        ids = [i["id"] for i in started.json()["instances"]]
        assert rpc.post("/v1/signals/switch", json={"id": "w1", "term": 1, "app": "hello",
                                                    "instances": ids}).status_code == 200
        before = {i["instance"]: i["pid"] for i in _wait_status(rpc, DEADLINE)["instances"]}
        loader.start()
        wait_for_more(100)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=DEADLINE)
        wait_for_more(200)  # served with no agent at all
        second = subprocess.Popen([*argv, "--stop-on-exit"], env=env, stdout=log, stderr=log,
                                  start_new_session=True)
        after = {i["instance"]: i["pid"] for i in _wait_status(rpc, DEADLINE)["instances"]}
        assert after == before  # re-adopted, not restarted
        wait_for_more(200)
        stop.set()
        loader.join(timeout=DEADLINE)
        assert counts["failed"] == 0, failures[:5]
        assert counts["ok"] >= 500
        second.send_signal(signal.SIGTERM)  # --stop-on-exit: the node goes away cleanly
        assert second.wait(timeout=DEADLINE) == 0
        assert not any(_running(pid) for pid in before.values())
    finally:
        stop.set()
        if loader.is_alive():
            loader.join(timeout=DEADLINE)
        rpc.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        _kill_leftovers(data_dir)
        log.close()
        watching.__exit__(None, None, None)


def _running(pid: int) -> bool:
    """True while ``pid`` runs. The adopted apps' parent died with the first agent, so
    whoever reaps orphans collects them; until then an exited one is a zombie, not running."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_leftovers(data_dir: Path) -> None:
    """Whatever a failed run (or a killed agent) left: instances and proxy workers
    recorded in the data dir, and the cgroups of node ``node_of(data_dir)``."""
    pids: list[int] = []
    for path, key in ((data_dir / "state.json", "instances"),
                      (data_dir / "proxy" / "proxy.json", "workers")):
        try:
            pids += [r.get("pid") for r in json.loads(path.read_text()).get(key, [])]
        except (OSError, ValueError):
            continue
    for pid in pids:
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):  # what is still in them is killed first
        remove_trees(node_groups(node_of(data_dir)))


async def test_a_new_release_dying_after_its_switch_costs_no_request(rig: Rig) -> None:
    """The instances a switch replaced stay standbys while warm: when the new one dies
    right after its switch, every request (even those racing the death) is answered by
    the old one, draining or not, with no signal from the coordinator."""
    assert (await rig.upload("hello", "r1", python_app())).status_code == 200
    # The supervisor restarts the killed instance after 0.5 s, and once ready it is routed
    # again; on a loaded machine the 40 requests below outlast that. Its restarts exit
    # before they listen (ONLY_ONCE): every request below is the old instance's to
    # answer, however slowly they run.
    second = python_app(extra='# r2\n[env]\nONLY_ONCE = "1"\n')
    assert (await rig.upload("hello", "r2", second)).status_code == 200
    started = await rig.signal("start", app="hello", release="r1")
    assert started.status_code == 200, started.text
    old = started.json()["instances"][0]["id"]
    assert (await rig.signal("switch", app="hello", instances=[old])).status_code == 200
    started = await rig.signal("start", app="hello", release="r2")
    assert started.status_code == 200, started.text
    new = started.json()["instances"][0]["id"]
    assert (await rig.signal("switch", app="hello", instances=[new])).status_code == 200
    assert (await rig.proxy.get("/hello/x")).json()["instance"] == new
    drained = await rig.signal("drain", instances=[old], grace=0.5)
    assert drained.status_code == 200, drained.text

    victim = rig.agent.instances[new].pid
    assert victim is not None
    os.killpg(victim, signal.SIGKILL)
    served = []
    for n in range(40):  # from the moment of the kill: no wait for anyone to notice
        response = await rig.proxy.get(f"/hello/after-{n}")
        assert response.status_code == 200, (n, response.text)
        served.append(response.json()["instance"])
    assert set(served) <= {old, new} and served[-1] == old
    assert rig.agent.standby == {"hello": [old]}


@pytest.mark.skipif(os.geteuid() != 0, reason="per-app users need root")
async def test_two_agents_on_one_host_deploying_new_apps_at_once_stay_apart(
        data_dir: Path) -> None:
    """Two agents on one host start the same two new apps at the same moment: each app
    gets one uid on both, reads its own source and not the other's."""
    suffix = secrets.token_hex(3)  # new apps: their users are created by this test
    apps = (f"tx{suffix}", f"ty{suffix}")
    (data_dir / "a").mkdir(mode=0o755)
    (data_dir / "b").mkdir(mode=0o755)
    try:
        async with running_agent(data_dir / "a") as one, running_agent(data_dir / "b") as two:
            async def deploy_all(rig: Rig) -> None:
                for name in apps:
                    assert (await rig.upload(name, "r1", python_app(name))).status_code == 200
                async with trio.open_nursery() as nursery:
                    for name in apps:
                        nursery.start_soon(start_and_switch, rig, name)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(deploy_all, one)
                nursery.start_soon(deploy_all, two)
            for rig, root in ((one, data_dir / "a"), (two, data_dir / "b")):
                reader, other = apps
                own = root / "releases" / reader / "r1" / "src" / "app.py"
                theirs = root / "releases" / other / "r1" / "src" / "app.py"
                for path, status in ((own, 200), (theirs, 403)):
                    response = await rig.proxy.get(f"/{reader}/read", params={"path": str(path)})
                    assert response.status_code == status, (rig, path)
            uids = {(name, inst.config.user.uid) for rig in (one, two)
                    for inst in rig.agent.instances.values()
                    for name in [inst.config.app] if inst.config.user is not None}
            assert len(uids) == 2 and {name for name, _ in uids} == set(apps), uids
    finally:
        for name in apps:
            remove_app_user(name)


async def start_and_switch(rig: Rig, name: str) -> None:
    started = await rig.signal("start", app=name, release="r1")
    assert started.status_code == 200, started.text
    ids = [i["id"] for i in started.json()["instances"]]
    assert (await rig.signal("switch", app=name, instances=ids)).status_code == 200


BARRIER_APP = '''
import http.server, os, pathlib
barrier = pathlib.Path(os.environ["BARRIER_DIR"])
(barrier / os.environ["SUPERAGENT_INSTANCE"]).write_text("up")

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # ready only once both instances run: a barrier between them
        self.send_response(200 if len(list(barrier.iterdir())) >= 2 else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''


async def test_the_instances_of_one_start_come_up_together(rig: Rig, world_dir: Path) -> None:
    """start count=2 runs both instances at once: each becomes ready only when the other
    runs too, which a one-after-the-other start could never satisfy."""
    barrier = world_dir / "barrier"
    barrier.mkdir(mode=0o777)
    barrier.chmod(0o777)
    manifest = (f'[app]\nname = "pair"\n[run]\ncommand = "{child_python()} app.py"\n'
                '[health]\npath = "/healthz"\nready_deadline = "20s"\n'
                f'[env]\nBARRIER_DIR = "{barrier}"\n')
    upload = await rig.upload("pair", "r1", tarball({"superagent.toml": manifest,
                                                     "app.py": BARRIER_APP}))
    assert upload.status_code == 200, upload.text
    started = await rig.signal("start", app="pair", release="r1", count=2)
    assert started.status_code == 200, started.text
    assert [i["state"] for i in started.json()["instances"]] == ["ready", "ready"]


async def test_the_heartbeat_reports_each_instances_load(rig: Rig) -> None:
    """Idle: in_flight 0 and, once sampled twice, CPU; a request held open shows as
    in_flight 1 on its instance (sampled once a second: the request lasts several)."""
    assert (await rig.upload("hello", "r1", python_app())).status_code == 200
    started = await rig.signal("start", app="hello", release="r1", count=1)
    assert started.status_code == 200, started.text
    (instance,) = [i["id"] for i in started.json()["instances"]]
    assert (await rig.signal("switch", app="hello", instances=[instance])).status_code == 200

    def reported() -> dict[str, Any]:
        (entry,) = rig.agent.coordinator_status()["instances"]
        assert entry["id"] == instance
        return entry

    idle = await wait_until_async(lambda: (e := reported()).get("in_flight") == 0
                                  and "cpu" in e and e, "CPU in the heartbeat",
                                  timeout=DEADLINE)
    assert idle["cpu"] >= 0
    answers: list[int] = []

    async def held() -> None:
        answer = await rig.proxy.get("/hello/slow?s=6", headers={"Connection": "close"})
        answers.append(answer.status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(held)
        await wait_until_async(lambda: reported().get("in_flight") == 1,
                               "the held request in the heartbeat's in_flight",
                               timeout=DEADLINE)
    assert answers == [200]
    await wait_until_async(lambda: reported().get("in_flight") == 0,
                           "in_flight back to 0", timeout=DEADLINE)


@pytest.mark.skipif(os.geteuid() != 0, reason="app users are created only when running as root")
async def test_a_refused_archive_creates_no_app_user(rig: Rig) -> None:
    """The archive of a new app is checked before its system user is made: a refused one
    leaves no user behind (nor an id that could be handed to another app later)."""
    import pwd

    from superagent.participant.isolation import app_user_name
    from tests.participant.tarballs import file, make_tar

    app = f"refused-{secrets.token_hex(3)}"
    answer = await rig.upload(app, "r1", make_tar([file("/etc/evil", b"x")]))
    assert answer.status_code == 400, answer.text
    assert "/etc/evil" in answer.text
    with pytest.raises(KeyError):
        pwd.getpwnam(app_user_name(app))


STOP_BARRIER_APP = '''
import http.server, os, pathlib, signal, time
barrier = pathlib.Path(os.environ["BARRIER_DIR"])
me = os.environ["SUPERAGENT_INSTANCE"]

def on_term(*_):  # exit cleanly only once the other instance got its SIGTERM too
    (barrier / f"term-{me}").write_text("")
    deadline = time.monotonic() + 20
    while len(list(barrier.glob("term-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    if len(list(barrier.glob("term-*"))) >= 2:
        (barrier / f"clean-{me}").write_text("")
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''


async def test_the_instances_of_one_stop_are_stopped_together(rig: Rig, world_dir: Path
                                                              ) -> None:
    """stop of two instances signals both at once: each exits cleanly only after the other
    got its SIGTERM, which one-after-the-other stops (the first killed at its grace) never
    satisfy."""
    barrier = world_dir / "stop-barrier"
    barrier.mkdir(mode=0o777)
    barrier.chmod(0o777)
    manifest = (f'[app]\nname = "pair"\n[run]\ncommand = "{child_python()} app.py"\n'
                '[health]\npath = "/healthz"\n'
                f'[env]\nBARRIER_DIR = "{barrier}"\n')
    upload = await rig.upload("pair", "r1", tarball({"superagent.toml": manifest,
                                                     "app.py": STOP_BARRIER_APP}))
    assert upload.status_code == 200, upload.text
    started = await rig.signal("start", app="pair", release="r1", count=2)
    assert started.status_code == 200, started.text
    ids = [i["id"] for i in started.json()["instances"]]
    stopped = await rig.signal("stop", instances=ids, grace=3)
    assert stopped.status_code == 200, stopped.text
    assert sorted(stopped.json()["stopped"]) == sorted(ids)
    assert sorted(p.name for p in barrier.glob("clean-*")) == sorted(f"clean-{i}" for i in ids)
    assert not [i for i in rig.agent.instances if i in ids]
