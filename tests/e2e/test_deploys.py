"""The deploy saga end to end: ``superagent up``'s embedded cluster, real apps, real traffic.

Each test starts an ``Embedded`` (a single-node Raft coordinator plus one participant with
one proxy worker; its watch window is short but for the test about it) on free loopback
ports, uploads apps written by ``tests.e2e.apps`` through the HTTP API exactly as
``superagent deploy`` does, and drives traffic through the proxy while deploys run.
Every wait polls a condition under a deadline; the only sleeps pace the load generators.
On the way out every instance and proxy worker is stopped and the test checks with
psutil that no process is left (``tests.e2e.embedded``).

What the tunnel check asserts (test 1): a websocket-style connection opened to an
instance of the serving release stays usable after the deploy switched the routes away
from that instance, i.e. while the instance drains; it ends (a clean EOF, never a reset
mid-echo) only once the instance is being stopped at commit. A tunnel cannot outlive its
instance, so the deploy that carries it passes ``drain_grace`` to bound the wait for it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from superagent.coordinator.deploy.outcomes import WATCH_WINDOW
from tests.e2e.embedded import DEPLOY_DEADLINE, REQUEST_TIMEOUT, Cluster, running_cluster
from tests.support.wait import wait_until_async

HEARTBEAT_CATCH_UP = 10.0  # a participant's state reaches the coordinator with its next heartbeat
PACE = 0.01  # seconds between one client's requests: keeps 2 cores free for the deploys
LONG_EVERY = 2.5  # seconds between the starts of two long requests (each drain waits
# for the ones in flight: at most SLOW, 3.75 s on average with these two figures)
SLOW = 5.0  # seconds a long request takes (the issue asks 5)
DEPLOYS = 10
TUNNEL_DEPLOY = 1  # which of the consecutive deploys carries an open tunnel
TUNNEL_GRACE = 2.0  # drain_grace of that deploy: how long the old instance waits for it


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with running_cluster() as running:
        yield running


@dataclass
class Load:
    """Keep-alive clients and long requests through the proxy, counted."""

    base: str
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    answers: list[tuple[float, str]] = field(default_factory=list)  # (answered at, release)
    long: list[int | str] = field(default_factory=list)  # a status, or the error
    connections: set[int] = field(default_factory=set)
    stop: trio.Event = field(default_factory=trio.Event)

    def __repr__(self) -> str:
        return (f"<Load {self.base} statuses={dict(self.statuses)} errors={len(self.errors)}"
                f" long={Counter(self.long)}>")

    async def client(self) -> None:
        """One connection, reused for every request (HTTP/1.1 keep-alive)."""
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=self.base, limits=limits,
                                     timeout=REQUEST_TIMEOUT) as http:
            while not self.stop.is_set():
                try:
                    response = await http.get("/")
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                else:
                    self.statuses[response.status_code] += 1
                    stream = response.extensions.get("network_stream")
                    if stream is not None:
                        self.connections.add(id(stream))
                    if response.status_code == 200:
                        self.answers.append((trio.current_time(), response.json()["release"]))
                await trio.sleep(PACE)

    async def one_long(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=SLOW + REQUEST_TIMEOUT) as h:
            try:
                response = await h.get(f"/slow?s={SLOW:g}")
            except httpx.HTTPError as exc:
                self.long.append(repr(exc))
            else:
                self.long.append(response.status_code)

    async def run(self, clients: int, *, long_requests: bool,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(self.client)
            task_status.started()
            while long_requests and not self.stop.is_set():
                nursery.start_soon(self.one_long)
                with trio.move_on_after(LONG_EVERY):
                    await self.stop.wait()

    def since(self, t: float) -> Counter[str]:
        return Counter(release for at, release in self.answers if at >= t)

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors[:5]
        assert set(self.statuses) == {200}, self.statuses
        assert all(s == 200 for s in self.long), Counter(self.long)


class Tunnel:
    """A websocket-style Upgrade connection through the proxy, echoing bytes."""

    def __init__(self, stream: trio.SocketStream, instance: str) -> None:
        self.stream = stream
        self.instance = instance
        self._buf = b""

    def __repr__(self) -> str:
        return f"<Tunnel to {self.instance}>"

    @classmethod
    async def open(cls, proxy_port: int, path: str) -> Tunnel:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n".encode())
        head = b""
        with trio.fail_after(REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(4096)
                assert chunk, f"the proxy closed the upgrade request: {head!r}"
                head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101"), lines
        headers = dict(line.split(": ", 1) for line in lines[1:])
        headers = {k.lower(): v for k, v in headers.items()}
        tunnel = cls(stream, headers["x-instance"])
        tunnel._buf = rest
        return tunnel

    async def echo(self, data: bytes) -> bool:
        """Send ``data`` and read it back; False on a clean EOF before any of it came back."""
        await self.stream.send_all(data)
        with trio.fail_after(REQUEST_TIMEOUT):
            while len(self._buf) < len(data):
                chunk = await self.stream.receive_some(4096)
                if not chunk:
                    assert not self._buf, f"tunnel cut mid-echo: {self._buf!r}"
                    return False
                self._buf += chunk
        got, self._buf = self._buf[:len(data)], self._buf[len(data):]
        assert got == data
        return True


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.slow
async def test_zero_downtime_over_ten_deploys(cluster: Cluster) -> None:
    """10 deploys under keep-alive load, long requests and an open tunnel: nothing fails."""
    first = await cluster.deploy(cluster.write("zdt", "v0"))
    assert (first["status"], first["release"]) == ("succeeded", "r1"), first
    load = Load(f"{cluster.proxy}/zdt")
    tunnel_log: dict[str, Any] = {}
    timings: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: load.run(3, long_requests=True,
                                                          task_status=task_status))
        last = "r1"
        for n in range(1, DEPLOYS + 1):
            query = {}
            if n == TUNNEL_DEPLOY:
                query["drain_grace"] = f"{TUNNEL_GRACE:g}"
                tunnel = await Tunnel.open(_port(cluster.proxy), "/zdt/ws")
                assert await tunnel.echo(b"hello before the deploy\n")
                nursery.start_soon(_keep_echoing, cluster, tunnel, tunnel_log)
            started = trio.current_time()
            view = await cluster.deploy(cluster.write("zdt", f"v{n}"), **query)
            timings.append(trio.current_time() - started)
            assert view["status"] == "succeeded", view
            assert view["release"] == f"r{n + 1}"
            last = view["release"]
        done_at = trio.current_time()
        # every answer after the last deploy ended comes from the last release
        with trio.fail_after(REQUEST_TIMEOUT):
            while sum(load.since(done_at).values()) < 50:
                await trio.sleep(0.05)
        load.stop.set()
    print(f"\nzero-downtime: {DEPLOYS} deploys in {sum(timings):.1f}s "
          f"(each {min(timings):.1f}-{max(timings):.1f}s; the tunnel deploy "
          f"{timings[TUNNEL_DEPLOY - 1]:.1f}s); requests by status {dict(load.statuses)}, "
          f"connection errors {len(load.errors)}, keep-alive connections "
          f"{len(load.connections)}, long /slow?s={SLOW:g} requests {dict(Counter(load.long))},"
          f" tunnel echoes {tunnel_log.get('echoes')} "
          f"({tunnel_log.get('while_draining')} after the switch away from its instance)")
    load.assert_clean()
    assert len(load.long) >= DEPLOYS
    assert load.since(done_at) == Counter({last: sum(load.since(done_at).values())})
    serving = cluster.instances("zdt")
    assert sorted(i["release"] for i in serving) == [last, last]
    assert all(i["state"] == "ready" for i in serving)
    answers = {(await cluster.get("/zdt/")).json()["release"] for _ in range(5)}
    assert answers == {last}
    # the tunnel: usable while its instance drained, closed cleanly once it was stopped
    assert tunnel_log["ended"], tunnel_log
    assert tunnel_log["while_draining"] > 0, tunnel_log
    assert tunnel_log["routed_at_end"] is False, tunnel_log


async def _keep_echoing(cluster: Cluster, tunnel: Tunnel, out: dict[str, Any]) -> None:
    """Echo through ``tunnel`` every 0.1 s until it ends; record what happened when."""
    out.update(echoes=0, while_draining=0, ended=False, routed_at_end=None)
    async with tunnel.stream:
        with trio.fail_after(DEPLOY_DEADLINE):
            for n in range(100_000):
                routed = tunnel.instance in cluster.routes("zdt")
                if not await tunnel.echo(f"echo {n}\n".encode()):
                    out.update(ended=True, routed_at_end=tunnel.instance in
                               cluster.routes("zdt"))
                    return
                out["echoes"] += 1
                out["while_draining"] += not routed
                await trio.sleep(0.1)


async def _serving(cluster: Cluster, app: str) -> tuple[str, list[str]]:
    instances = cluster.instances(app)
    releases = {i["release"] for i in instances}
    assert len(releases) == 1, instances
    return releases.pop(), sorted(i["instance"] for i in instances)


@pytest.mark.slow
async def test_bad_releases_roll_back(cluster: Cluster) -> None:
    """A never-ready and a crash-looping release: rolled back, the old one serves on."""
    assert (await cluster.deploy(cluster.write("bad", "v1")))["status"] == "succeeded"
    before = await _serving(cluster, "bad")
    load = Load(f"{cluster.proxy}/bad")
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: load.run(2, long_requests=False,
                                                          task_status=task_status))
        never = await cluster.deploy(cluster.write("bad", "v2", mode="never_ready",
                                                   ready_deadline=3.0))
        crash = await cluster.deploy(cluster.write("bad", "v3", mode="crash"))
        after = trio.current_time()
        with trio.fail_after(REQUEST_TIMEOUT):
            while sum(load.since(after).values()) < 20:
                await trio.sleep(0.05)
        load.stop.set()
    print(f"\nbad releases: never-ready {never['status']}: {never['reason']!r}; "
          f"crash {crash['status']}: {crash['reason']!r}; requests {dict(load.statuses)}, "
          f"errors {len(load.errors)}")
    for view in (never, crash):
        assert view["status"] in ("rolled_back", "failed"), view
        assert "start failed" in view["reason"], view
    assert "ready" in never["reason"], never
    assert "exit" in crash["reason"], crash
    # the crashing instance's own last lines of stderr, whole, in the deploy's logs
    assert "crashing on purpose" in json.dumps(crash["logs"]), crash["logs"]
    load.assert_clean()
    assert set(load.since(0)) == {"r1"}
    assert await _serving(cluster, "bad") == before
    releases = {i["release"] for i in cluster.instances("bad")}
    assert releases == {"r1"}


async def test_failing_test_command_moves_no_traffic(cluster: Cluster) -> None:
    """A failing [test] command: the deploy fails with the test's log; nothing moved."""
    assert (await cluster.deploy(cluster.write("gate", "v1")))["status"] == "succeeded"
    before = await _serving(cluster, "gate")
    version = cluster.embedded.agent.proxy.snapshot.version
    view = await cluster.deploy(cluster.write("gate", "v2", failing_test=True))
    assert view["status"] == "failed", view
    assert "test failed" in view["reason"], view
    assert "e2e-failing-test" in json.dumps(view["logs"]), view["logs"]
    assert all(s["step"] == "prepared" for s in view["steps"]), view["steps"]
    assert await _serving(cluster, "gate") == before
    assert cluster.embedded.agent.proxy.snapshot.version == version  # no route change
    assert (await cluster.get("/gate/")).json()["release"] == "r1"


async def test_rollback_serves_the_earlier_release_without_rebuilding(cluster: Cluster
                                                                       ) -> None:
    """r1, r2, then rollback to r1: r1 serves again and its prepared tree is reused."""
    assert (await cluster.deploy(cluster.write("back", "v1")))["status"] == "succeeded"
    build_log = Path(cluster.embedded.agent.store.get("back", "r1").build_log)
    built = build_log.stat().st_mtime_ns
    assert (await cluster.deploy(cluster.write("back", "v2")))["status"] == "succeeded"
    assert (await cluster.get("/back/")).json()["release"] == "r2"
    again = await cluster.upload(cluster.write("back", "v2"))  # what r2 already serves
    assert again.status_code == 200 and again.json()["unchanged"] is True, again.text
    assert again.json()["release"] == "r2" and "unchanged: r2" in again.json()["detail"]
    releases = (await cluster.api.get("/api/v1/apps/back/releases")).json()["releases"]
    assert [(r["name"], r["outcome"], r["current"]) for r in releases] == [
        ("r1", "succeeded", False), ("r2", "succeeded", True)]
    started = time.monotonic()
    response = await cluster.api.post("/api/v1/apps/back/rollback", json={"to": "r1"})
    assert response.status_code == 201, response.text
    view = await cluster.wait("back", response.json()["deploy_id"])
    print(f"\nrollback to r1: {view['status']} in {time.monotonic() - started:.2f}s")
    deploy_id = response.json()["deploy_id"]
    parallel = cluster.embedded.coordinator.read(
        lambda s: s.deploys[deploy_id].record["max_parallel"])
    assert parallel >= 2  # a rollback rolls every node at once unless asked otherwise
    assert (view["status"], view["release"]) == ("succeeded", "r1"), view
    assert {(await cluster.get("/back/")).json()["release"] for _ in range(4)} == {"r1"}
    assert {i["release"] for i in cluster.instances("back")} == {"r1"}
    assert build_log.stat().st_mtime_ns == built  # prepared once, not rebuilt


async def test_stale_term_signal_is_refused(cluster: Cluster) -> None:
    """A signal with a term older than the newest seen gets 409 StaleTerm; nothing stops."""
    assert (await cluster.deploy(cluster.write("fence", "v1")))["status"] == "succeeded"
    assert cluster.embedded.coordinator.raft.status()["term"] >= 1
    release, ids = await _serving(cluster, "fence")
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as http:
        response = await http.post(
            f"{cluster.rpc}/v1/signals/stop",
            json={"id": "stale-leader-stop-1", "term": 0, "instances": ids, "grace": 1},
            headers={"authorization": f"Bearer {cluster.rpc_key}"})
    assert response.status_code == 409, response.text
    assert response.json()["error"] == "stale_term", response.text
    assert await _serving(cluster, "fence") == (release, ids)
    assert all(i["state"] == "ready" for i in cluster.instances("fence"))
    assert (await cluster.get("/fence/")).status_code == 200


async def test_one_deploy_at_a_time_and_cancel_compensates(cluster: Cluster) -> None:
    """A second upload during a deploy is recorded, not deployed (409); cancel undoes it."""
    assert (await cluster.deploy(cluster.write("solo", "v1")))["status"] == "succeeded"
    before = await _serving(cluster, "solo")
    response = await cluster.upload(cluster.write("solo", "v2", mode="slow_ready",
                                                  per_node=1, ready_after=3.0))
    assert response.status_code == 201, response.text
    running = response.json()["deploy_id"]
    with trio.fail_after(DEPLOY_DEADLINE):
        while (await cluster.view("solo", running))["stage"] != "roll":
            await trio.sleep(0.05)
    with trio.fail_after(DEPLOY_DEADLINE):  # its first new instance is starting (not ready)
        while not any(i["release"] == "r2" for i in cluster.instances("solo")):
            await trio.sleep(0.05)
    second = await cluster.upload(cluster.write("solo", "v3"))
    assert second.status_code == 409, second.text
    refused = second.json()
    assert refused["release"] == "r3", refused
    assert "recorded, not deployed" in refused["detail"], refused
    assert running in refused["detail"], refused
    cancelled = await cluster.api.post(f"/api/v1/apps/solo/deploys/{running}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    # The cancel lands while the start is in flight: the deploy is finished only once
    # that start's outcome is in and compensated, and then no instance of r2 is left.
    view = await cluster.wait("solo", running)
    assert view["status"] == "rolled_back", view
    assert not any(i["release"] == "r2" for i in cluster.instances("solo"))
    assert "cancelled" in view["reason"], view
    assert await _serving(cluster, "solo") == before
    assert (await cluster.get("/solo/")).json()["release"] == "r1"
    releases = (await cluster.api.get("/api/v1/apps/solo/releases")).json()["releases"]
    assert "r3" in json.dumps(releases)
    deploys = (await cluster.api.get("/api/v1/apps/solo/deploys")).json()["deploys"]
    assert sorted(d["release"] for d in deploys) == ["r1", "r2"]


async def test_the_cli_says_where_an_app_serves_and_what_each_release_did(
        cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    """`deploy` ends with the app's URL, `status` lists its instances (node, port, state,
    release) and URLs, `releases` each release's last deploy and which one serves, and an
    unchanged upload deploys nothing unless --force."""
    from superagent.cli import main as cli_main

    common = ["--server", cluster.embedded.coordinator.config.url, "--token",
              cluster.embedded.token_file.read_text().strip()]
    source = cluster.write("where", "v1")

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli_main([*argv, *common])
        out, err = capsys.readouterr()
        return code, out, err

    url = f"{cluster.proxy}/where/"
    code, out, _ = await trio.to_thread.run_sync(lambda: run("deploy", str(source)))
    assert code == 0 and "where@r1 succeeded" in out and url in out, out
    assert (await cluster.get("/where/")).json()["release"] == "r1"
    code, out, err = await trio.to_thread.run_sync(lambda: run("deploy", str(source)))
    assert code == 0 and "unchanged: r1 already serving" in err, err
    code, out, _ = await trio.to_thread.run_sync(lambda: run("deploy", str(source), "--force"))
    assert code == 0 and "where@r2 succeeded" in out, out
    serving = {(i["instance"], "r2", "ready", str(i["port"])) for i in cluster.instances("where")}

    async def status_shows_them() -> str | None:
        # status reports what the participants' last heartbeats (one a second) said
        code, out, _ = await trio.to_thread.run_sync(lambda: run("status"))
        rows = {tuple(line.split()[2:6]) for line in out.splitlines()
                if line.startswith("where ") and "where@" in line}
        return out if code == 0 and rows == serving else None
    out = await wait_until_async(status_shows_them, "status to list the r2 instances",
                                 timeout=HEARTBEAT_CATCH_UP)
    assert url in out
    code, out, _ = await trio.to_thread.run_sync(lambda: run("releases", "where"))
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "succeeded" in lines["r1"] and "serving" not in lines["r1"]
    assert "succeeded" in lines["r2"] and lines["r2"].rstrip().endswith("serving")


async def test_failed_releases_never_evict_the_good_ones(cluster: Cluster) -> None:
    """After r1 served, five releases fail their test gate: r1 is still prepared (the
    failed ones are gone), and a rollback to it rebuilds nothing; a rollback to one that
    never served asks for force."""
    assert (await cluster.deploy(cluster.write("keep", "v1")))["status"] == "succeeded"
    store = cluster.embedded.agent.store
    built = store.get("keep", "r1").build_log.stat().st_mtime_ns
    for n in range(2, 7):
        view = await cluster.deploy(cluster.write("keep", f"v{n}", failing_test=True))
        assert view["status"] == "failed", view
    prepared = sorted(p.release for p in store.releases("keep"))
    assert "r1" in prepared and len(prepared) <= 2, prepared  # r1 and the newest failed one
    never = await cluster.api.post("/api/v1/apps/keep/rollback", json={"to": "r5"})
    assert never.status_code == 409 and never.json()["error"] == "never_succeeded"
    response = await cluster.api.post("/api/v1/apps/keep/rollback", json={"to": "r1"})
    assert response.status_code == 201, response.text
    view = await cluster.wait("keep", response.json()["deploy_id"])
    assert (view["status"], view["release"]) == ("succeeded", "r1"), view
    assert store.get("keep", "r1").build_log.stat().st_mtime_ns == built  # not rebuilt


async def test_a_release_that_dies_after_ready_costs_no_request() -> None:
    """Under keep-alive load with long requests, a release that passes readiness and dies
    two seconds later is rolled back, and no request fails: the old instances are the
    proxy's standbys from the switch until the deploy commits, and the drain's health
    check waits out the watch window (the product's default, which this test is about)."""
    async with running_cluster(watch_window=WATCH_WINDOW) as cluster:
        await _dies_after_ready(cluster)


async def _dies_after_ready(cluster: Cluster) -> None:
    first = await cluster.deploy(cluster.write("phoenix", "v1"))
    assert first["status"] == "succeeded", first
    load = Load(f"{cluster.proxy}/phoenix")
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: load.run(3, long_requests=True,
                                                          task_status=task_status))
        view = await cluster.deploy(cluster.write("phoenix", "v2", mode="crash_after_ready"))
        done_at = trio.current_time()
        with trio.fail_after(REQUEST_TIMEOUT):
            while sum(load.since(done_at).values()) < 30:
                await trio.sleep(0.05)
        load.stop.set()
    print(f"\nready-then-crash: {view['status']} ({view['reason']}); requests by status"
          f" {dict(load.statuses)}, connection errors {len(load.errors)}, long requests"
          f" {dict(Counter(load.long))}")
    assert view["status"] == "rolled_back", view
    load.assert_clean()
    assert load.since(done_at) == Counter({"r1": sum(load.since(done_at).values())})


async def test_a_refused_token_is_named_by_where_it_came_from(
        cluster: Cluster, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """401s say which token was refused: --token, SUPERAGENT_TOKEN, or a stale
    ./.superagent/admin-token (with what to do instead)."""
    from superagent.cli import main as cli_main

    server = ["--server", cluster.embedded.coordinator.config.url]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SUPERAGENT_TOKEN", raising=False)

    def run(*argv: str) -> tuple[int, str]:
        code = cli_main(["apps", *server, *argv])
        return code, capsys.readouterr().err

    code, err = await trio.to_thread.run_sync(lambda: run("--token", "wrong"))
    assert code != 0 and "the token from --token was refused" in err, err
    monkeypatch.setenv("SUPERAGENT_TOKEN", "wrong")
    code, err = await trio.to_thread.run_sync(run)
    assert code != 0 and "the token from SUPERAGENT_TOKEN was refused" in err, err
    monkeypatch.delenv("SUPERAGENT_TOKEN")
    (tmp_path / ".superagent").mkdir()
    (tmp_path / ".superagent" / "admin-token").write_text("stale\n")
    code, err = await trio.to_thread.run_sync(run)
    assert code != 0 and "the token from ./.superagent/admin-token was refused" in err, err
    assert "pass --token or set SUPERAGENT_TOKEN" in err and "Traceback" not in err
