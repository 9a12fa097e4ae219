"""Scale to zero with real processes: an idle app stops, a request starts it again.

An in-process agent with one real proxy worker and real app processes: the app idles
after its ``idle_timeout``; 100 concurrent requests on the idle app are all answered by
the one instance their hold started; a start that fails answers every held request with
the named 503 within its bound; a websocket to an idle app connects; an open tunnel or a
request in flight keeps an app from idling; on a node at its capacity a cold start idles
the app used least recently, or is refused naming the capacity; and an agent that goes
away while a request is held (kill -9 of its process) leaves the client with an answer or
an error, never a hang.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio

from superagent.participant.idle import app_counts
from superagent.participant.isolation import remove_app_user
from superagent.participant.proxydriver import ACCESS_LOG
from superagent.participant.scaletozero import go_idle
from superagent.participant.service import Agent
from tests.participant.children import child_python
from tests.participant.test_agent import (
    AUTH,
    DEADLINE,
    SECRET,
    Rig,
    _kill_leftovers,
    _wait_status,
    node_of,
    running_agent,
    tarball,
)
from tests.support import logs
from tests.support.ports import free_port
from tests.support.wait import wait_until, wait_until_async

APP = r'''
import json, os, socket, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

if os.path.exists(os.environ.get("FAIL_FLAG", "/nonexistent")):
    print("refusing to start: the fail flag is set", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(float(os.environ.get("BOOT_SECONDS", "0")))

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while True:  # echo until the client closes
                data = self.connection.recv(65536)
                if not data:
                    return
                self.connection.sendall(data)
        if self.path.startswith("/slow"):
            time.sleep(float(self.path.split("=")[1]))
        body = json.dumps({"instance": os.environ["SUPERAGENT_INSTANCE"],
                           "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        size = len(self.rfile.read(int(self.headers["Content-Length"])))
        body = json.dumps({"instance": os.environ["SUPERAGENT_INSTANCE"], "size": size}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer.request_queue_size = 256
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''


def cold_app(name: str, *, fail_flag: Path, boot: float = 0.0, idle: str = "1s") -> bytes:
    manifest = (f'[app]\nname = "{name}"\n[run]\ncommand = "{child_python()} app.py"\n'
                f'[health]\nready_path = "/"\nready_deadline = "3s"\n'
                f'[routes]\nprefix = "/{name}"\nstrip_prefix = true\n'
                f'[scale]\nidle_timeout = "{idle}"\n'
                f'[env]\nFAIL_FLAG = "{fail_flag}"\nBOOT_SECONDS = "{boot}"\n')
    return tarball({"superagent.toml": manifest, "app.py": APP})


async def serve(rig: Rig, name: str, data: bytes) -> list[str]:
    assert (await rig.upload(name, "r1", data)).status_code == 200
    started = await rig.signal("start", app=name, release="r1", count=1)
    assert started.status_code == 200, started.text
    ids = [i["id"] for i in started.json()["instances"]]
    assert (await rig.signal("switch", app=name, instances=ids)).status_code == 200
    return ids


BODY = 200_000


def _fresh_app() -> Iterator[str]:
    """A fresh app name; its system user (made when the tests run as root) goes after."""
    name = f"cold-{secrets.token_hex(3)}"
    try:
        yield name
    finally:
        remove_app_user(name)


app = pytest.fixture(_fresh_app, name="app")
app2 = pytest.fixture(_fresh_app, name="app2")  # a second app beside the first


async def _cold_records(path: Path, app: str) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines)
            if r.get("app") == app and "cold_start_ms" in r]


def state_of(agent: Agent, app: str) -> dict[str, Any]:
    return agent.app_states().get(app, {})


async def until_idle(rig: Rig, app: str) -> None:
    await wait_until_async(lambda: _idle_now(rig.agent, app), f"{app} idle", timeout=DEADLINE)


async def _idle_now(agent: Agent, app: str) -> bool:
    return (state_of(agent, app).get("state") == "idle"
            and not any(i.config.app == app for i in agent.instances.values()))


def running(agent: Agent, app: str) -> list[str]:
    return [i for i, inst in agent.instances.items() if inst.config.app == app]


async def test_100_concurrent_requests_on_an_idle_app_start_one_instance(
        data_dir: Path, app: str) -> None:
    """The app idles; 100 requests at once (ten of them uploading 200 KB: more than the
    worker reads ahead) are held, one instance starts, all get 200 from it with
    X-Superagent-Cold-Start and whole bodies, the cold-start histogram counts one start
    and the access log records the wait."""
    async with running_agent(data_dir) as rig:
        (first,) = await serve(rig, app, cold_app(app, fail_flag=data_dir / "fail-flag"))
        assert not rig.agent.instances[first].eager  # a deploy's start: nobody waits
        await until_idle(rig, app)
        status = (await rig.rpc.get("/v1/status")).json()
        assert status["apps"][app]["state"] == "idle"
        assert status["routes"][app] == []

        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        answers: list[httpx.Response] = []
        async with httpx.AsyncClient(base_url=rig.proxy.base_url, timeout=DEADLINE,
                                     limits=limits) as client:
            async def one(n: int) -> None:
                if n % 10:
                    answers.append(await client.get(f"/{app}/n{n}"))
                else:
                    answers.append(await client.post(f"/{app}/n{n}", content=b"x" * BODY))

            async with trio.open_nursery() as nursery:
                for n in range(100):
                    nursery.start_soon(one, n)
        assert sorted(a.status_code for a in answers) == [200] * 100, [
            a.text for a in answers if a.status_code != 200][:3]
        assert len({a.json()["instance"] for a in answers}) == 1
        assert [a.json()["size"] for a in answers if "size" in a.json()] == [BODY] * 10
        assert all(a.headers.get("X-Superagent-Cold-Start", "").isdigit() for a in answers)
        (started,) = running(rig.agent, app)
        assert rig.agent.instances[started].eager  # probed for readiness at the fast pace
        assert state_of(rig.agent, app) == {"state": "serving"}
        stats = await rig.agent.proxy.stats()
        assert stats["cold_starts"][app][-1] == 1  # one cold start observed
        warm = await rig.proxy.get(f"/{app}/warm")
        assert warm.status_code == 200 and "X-Superagent-Cold-Start" not in warm.headers
        access_log = rig.agent.proxy.run_dir / ACCESS_LOG
        records = await wait_until_async(
            lambda: _cold_records(access_log, app), "cold-start access records",
            until=lambda found: len(found) == 100, timeout=DEADLINE)
        assert all(r["cold_start_ms"] >= 0 and r["status"] == 200 for r in records)


async def test_a_failing_cold_start_answers_every_held_request_with_the_named_503(
        data_dir: Path, app: str) -> None:
    """With the app refusing to start, every held request gets 503 start-failed with
    Retry-After within the hold's bound, and the reason is in the app's status."""
    flag = data_dir / "fail-flag"
    async with running_agent(data_dir) as rig:
        await serve(rig, app, cold_app(app, fail_flag=flag))
        await until_idle(rig, app)
        flag.write_text("fail")
        flag.chmod(0o644)
        answers: list[httpx.Response] = []
        began = trio.current_time()
        async with trio.open_nursery() as nursery:
            async def one(n: int) -> None:
                answers.append(await rig.proxy.get(f"/{app}/n{n}"))

            for n in range(20):
                nursery.start_soon(one, n)
        assert trio.current_time() - began < 3.0 + 5.0  # ready_deadline + the hold's margin
        assert {a.status_code for a in answers} == {503}
        assert {a.headers["X-Superagent-Error"] for a in answers} == {"start-failed"}
        assert all(a.headers.get("Retry-After") == "5" for a in answers)
        state = state_of(rig.agent, app)
        assert state["state"] == "idle" and "start" in state["start_error"], state
        again = await rig.proxy.get(f"/{app}/again")  # within the retry delay: refused at once
        assert again.status_code == 503 and again.headers["X-Superagent-Error"] == "start-failed"


async def test_a_cold_start_on_a_full_node_idles_the_least_recently_used_app(
        data_dir: Path, app: str, app2: str) -> None:
    """A node of capacity 1 with two idle apps: waking one idles the other (every request
    answered 200), back and forth; with a request in flight on the running one, the
    other's cold start finds no room: 503 start-failed naming the capacity, the reason in
    its status, and the request in flight answered."""
    flag = data_dir / "fail-flag"
    async with running_agent(data_dir, capacity=1) as rig:
        for name in (app, app2):  # the coordinator's start signals are not checked here
            await serve(rig, name, cold_app(name, fail_flag=flag, idle="60s"))
        for name in (app, app2):
            await go_idle(rig.agent, name)
            await until_idle(rig, name)
        for n, (woken, other) in enumerate([(app, app2), (app2, app), (app, app2)]):
            answer = await rig.proxy.get(f"/{woken}/n{n}")
            assert answer.status_code == 200, answer.text
            assert "X-Superagent-Cold-Start" in answer.headers
            assert len(running(rig.agent, woken)) == 1
            assert running(rig.agent, other) == [] and state_of(rig.agent, other) == {
                "state": "idle", "release": "r1", "instances": 1}

        async def in_flight() -> int:
            return app_counts(await rig.agent.proxy.stats())[1].get(app, 0)

        slow: list[httpx.Response] = []
        async with trio.open_nursery() as nursery:
            async def request() -> None:
                slow.append(await rig.proxy.get(f"/{app}/slow=2"))

            nursery.start_soon(request)
            await wait_until_async(in_flight, f"a request in flight on {app}",
                                   timeout=DEADLINE)
            refused = await rig.proxy.get(f"/{app2}/refused")
        assert [a.status_code for a in slow] == [200]
        assert refused.status_code == 503, refused.text
        assert refused.headers["X-Superagent-Error"] == "start-failed"
        assert refused.headers["Retry-After"] == "5"
        assert "node at capacity: 1/1 running" in refused.text
        assert "node at capacity: 1/1 running" in state_of(rig.agent, app2)["start_error"]
        assert len(running(rig.agent, app)) == 1


def _upgrade(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    # the switch to an idle app was held for its cold start, and says how long
    assert re.search(rb"\r\nX-Superagent-Cold-Start: \d+\r\n", head), head
    return sock


def _echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        assert chunk
        got += chunk
    return got


async def test_a_websocket_to_an_idle_app_connects_and_an_open_one_keeps_it_up(
        data_dir: Path, app: str) -> None:
    """An upgrade to the idle app is held and connects; while that tunnel stays open (and
    while a slow request is in flight) the app is not idled, past several timeouts."""
    async with running_agent(data_dir) as rig:
        await serve(rig, app, cold_app(app, fail_flag=data_dir / "fail-flag"))
        await until_idle(rig, app)
        port = int(rig.proxy.base_url.port or 0)
        sock = await trio.to_thread.run_sync(_upgrade, port, f"/{app}/socket")
        try:
            assert await trio.to_thread.run_sync(_echo, sock, b"hello") == b"hello"
            instance = running(rig.agent, app)
            assert len(instance) == 1
            await trio.sleep(3.0)  # three idle timeouts with the tunnel open and silent
            assert running(rig.agent, app) == instance
            assert await trio.to_thread.run_sync(_echo, sock, b"still") == b"still"
        finally:
            sock.close()
        slow = await rig.proxy.get(f"/{app}/slow=3")  # in flight across three idle timeouts
        assert slow.status_code == 200 and running(rig.agent, app) == instance
        await until_idle(rig, app)  # once nothing is open, it idles


def test_kill_9_of_the_agent_while_a_request_is_held_never_hangs(data_dir: Path, app: str
                                                                 ) -> None:
    """The agent (a real process) is killed with SIGKILL while a request waits for a
    slow-booting app's cold start: the client gets an answer or an error (here 503
    start-timeout: no agent is left to route the instance) within the hold's bound."""
    rpc_port, listen_port = free_port(), free_port()
    argv = [sys.executable, "-m", "superagent", "participant", "--data-dir", str(data_dir),
            "--rpc", f"127.0.0.1:{rpc_port}", "--listen", f"127.0.0.1:{listen_port}",
            "--proxy-workers", "1", "--node", node_of(data_dir)]
    log = open(data_dir / "agent.log", "ab")  # noqa: SIM115 - closed in finally
    logs.watch("agent", data_dir / "agent.log")  # its tail is shown if the test fails
    agent = subprocess.Popen(argv, env={**os.environ, "SUPERAGENT_SECRET": SECRET},
                             stdout=log, stderr=log, start_new_session=True)
    rpc = httpx.Client(base_url=f"http://127.0.0.1:{rpc_port}", headers=AUTH,
                       timeout=DEADLINE)
    result: dict[str, Any] = {}

    def held() -> None:
        began = time.monotonic()
        try:
            answer = httpx.get(f"http://127.0.0.1:{listen_port}/{app}/x", timeout=30.0)
            result.update(status=answer.status_code,
                          error=answer.headers.get("X-Superagent-Error"))
        except httpx.HTTPError as exc:
            result["error"] = repr(exc)
        result["seconds"] = time.monotonic() - began

    def app_state() -> str:
        return str(rpc.get("/v1/status").json()["apps"].get(app, {}).get("state"))

    client = threading.Thread(target=held)
    try:
        _wait_status(rpc, DEADLINE)
        data = cold_app(app, fail_flag=data_dir / "fail-flag", boot=1.5)
        assert rpc.put(f"/v1/releases/{app}/r1", content=data, headers={
            "X-Superagent-Sha256": hashlib.sha256(data).hexdigest(),
            "X-Superagent-Signal": "p1", "X-Superagent-Term": "1"}).status_code == 200
        started = rpc.post("/v1/signals/start", json={
            "id": "s1", "term": 1, "app": app, "release": "r1", "count": 1})
        assert started.status_code == 200, started.text
        ids = [i["id"] for i in started.json()["instances"]]
        assert rpc.post("/v1/signals/switch", json={
            "id": "w1", "term": 1, "app": app, "instances": ids}).status_code == 200
        wait_until(app_state, "the app idle", until=lambda s: s == "idle", timeout=DEADLINE,
                   interval=0.1)
        client.start()
        wait_until(app_state, "its cold start", until=lambda s: s == "starting",
                   timeout=DEADLINE, interval=0.05)
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=DEADLINE)
        client.join(timeout=HOLD_BOUND + 5.0)
        assert not client.is_alive(), "the held request hangs"
        assert result.get("status") in (200, 503) or "error" in result, result
        assert result["seconds"] < HOLD_BOUND + 2.0, result
    finally:
        if client.is_alive():
            client.join(timeout=DEADLINE)
        rpc.close()
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        _kill_leftovers(data_dir)
        _kill_unrecorded(data_dir)
        log.close()


def _kill_unrecorded(data_dir: Path) -> None:
    """An instance the killed agent spawned but had not recorded yet: found by its working
    directory, inside the data directory."""
    for process in psutil.process_iter(["cwd"]):
        if str(process.info.get("cwd") or "").startswith(str(data_dir)):
            with contextlib.suppress(psutil.Error):
                process.kill()


HOLD_BOUND = 3.0 + 5.0  # the app's ready_deadline + the agent's HOLD_MARGIN


def recorded(data_dir: Path) -> list[tuple[str, int | None]]:
    """(instance, pid) of each instance in the agent's state.json."""
    doc = json.loads((data_dir / "state.json").read_text())
    return [(r["config"]["instance"], r["pid"]) for r in doc["instances"]]


def test_kill_9_during_a_cold_start_then_a_restart_serves_the_spawned_instance(
        data_dir: Path, app: str) -> None:
    """The agent (a real process) is killed with SIGKILL during a cold start, once the new
    instance is spawned (its app boots for 1.5 s): state.json already has the instance
    and its pid, though the app is not ready (the record is on disk before the spawn, the
    pid before readiness). An agent started again on the data directory adopts that
    process and routes it (the idle record gives way to it): the held request and a new
    one are answered by it, and no other instance of the app runs."""
    rpc_port, listen_port = free_port(), free_port()
    argv = [sys.executable, "-m", "superagent", "participant", "--data-dir", str(data_dir),
            "--rpc", f"127.0.0.1:{rpc_port}", "--listen", f"127.0.0.1:{listen_port}",
            "--proxy-workers", "1", "--node", node_of(data_dir)]
    env = {**os.environ, "SUPERAGENT_SECRET": SECRET}
    log = open(data_dir / "agent.log", "ab")  # noqa: SIM115 - closed in finally
    logs.watch("agent", data_dir / "agent.log")  # its tail is shown if the test fails
    agents = [subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)]
    rpc = httpx.Client(base_url=f"http://127.0.0.1:{rpc_port}", headers=AUTH,
                       timeout=DEADLINE)
    result: dict[str, Any] = {}

    def held() -> None:
        try:
            answer = httpx.get(f"http://127.0.0.1:{listen_port}/{app}/held", timeout=30.0)
            result.update(status=answer.status_code, body=answer.text)
        except httpx.HTTPError as exc:
            result["error"] = repr(exc)

    def status() -> dict[str, Any]:
        return dict(rpc.get("/v1/status").json())

    def spawned(doc: dict[str, Any]) -> list[dict[str, Any]]:
        return [i for i in doc["instances"] if i["app"] == app and i["pid"]]

    client = threading.Thread(target=held)
    try:
        _wait_status(rpc, DEADLINE)
        # idles after 2 s: the checks after the restart are done well within that
        data = cold_app(app, fail_flag=data_dir / "fail-flag", boot=1.5, idle="2s")
        assert rpc.put(f"/v1/releases/{app}/r1", content=data, headers={
            "X-Superagent-Sha256": hashlib.sha256(data).hexdigest(),
            "X-Superagent-Signal": "p1", "X-Superagent-Term": "1"}).status_code == 200
        started = rpc.post("/v1/signals/start", json={
            "id": "s1", "term": 1, "app": app, "release": "r1", "count": 1})
        assert started.status_code == 200, started.text
        first = [i["id"] for i in started.json()["instances"]]
        assert rpc.post("/v1/signals/switch", json={
            "id": "w1", "term": 1, "app": app, "instances": first}).status_code == 200
        # idle, and its instance's process gone: the app is "idle" as soon as its routes
        # are, while the instance is still stopping under the id the cold start reuses,
        # which the wait for the cold start's spawn below would take for the new one
        wait_until(status, "the app idle, its instance stopped",
                   until=lambda doc: (doc["apps"].get(app, {}).get("state") == "idle"
                                      and not spawned(doc)),
                   timeout=DEADLINE, interval=0.1)
        client.start()
        (instance,) = wait_until(lambda: spawned(status()), "the cold start's spawn",
                                 until=bool, timeout=DEADLINE, interval=0.02)
        # The status shows the pid once the process exists; state.json gets it from the
        # next write, which the agent finishes before the instance can be ready: wait for
        # that write (the app boots for 1.5 s), then kill the agent while it is starting.
        wait_until(lambda: recorded(data_dir), "the spawned pid in state.json",
                   until=lambda r: r == [(instance["instance"], instance["pid"])],
                   timeout=DEADLINE, interval=0.02)
        (instance,) = spawned(status())
        agents[0].send_signal(signal.SIGKILL)
        agents[0].wait(timeout=DEADLINE)
        assert instance["state"] == "starting", instance  # killed before it was ready
        assert recorded(data_dir) == [(instance["instance"], instance["pid"])]

        agents.append(subprocess.Popen(argv, env=env, stdout=log, stderr=log,
                                       start_new_session=True))
        _wait_status(rpc, DEADLINE)
        client.join(timeout=HOLD_BOUND + 5.0)
        assert not client.is_alive(), "the held request hangs"
        # answered by the adopted instance, unless the restart took longer than the hold
        assert result.get("status") in (200, 503), result
        if result["status"] == 200:
            assert json.loads(result["body"])["instance"] == instance["instance"]
        answer = httpx.get(f"http://127.0.0.1:{listen_port}/{app}/after", timeout=DEADLINE)
        assert answer.status_code == 200, answer.text
        assert answer.json()["instance"] == instance["instance"]
        after = status()
        assert [(i["instance"], i["pid"]) for i in after["instances"] if i["app"] == app] == [
            (instance["instance"], instance["pid"])]
        assert after["apps"][app]["state"] == "serving"
    finally:
        if client.is_alive():
            client.join(timeout=DEADLINE)
        rpc.close()
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        _kill_leftovers(data_dir)
        _kill_unrecorded(data_dir)
        log.close()
