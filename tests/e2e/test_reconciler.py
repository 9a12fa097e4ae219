"""The leader's reconciler end to end: scaling, joining, draining, dying machines and leaders.

One real cluster for the whole module (starting it is most of the cost): three
coordinators (tests/coordinator/cluster.py, node timeout ``NODE_TIMEOUT``) and three
participants in groups ``default`` and ``web`` (tests/e2e/fleet.py), each with its proxy.
Two demo apps are deployed first: ``web`` (group ``web``, one instance per node) and
``pair`` (group ``default``, ``instances = 2`` in total). The tests then run in order on
that cluster, each leaving it serving:

1. ``web`` scaled out to three per node and back to one under keep-alive load through
   every proxy: no request fails, each scaling ends ``converged``;
2. a fourth participant started with ``--group web`` gets ``web`` and serves it, with no
   command;
3. the node holding a ``pair`` instance is drained under load sent as a front load
   balancer sends it (only to proxies whose ``/-/healthz`` answers 200): no request fails,
   ``pair`` runs twice elsewhere, nothing is left on the node, ``offline`` is refused
   while something runs there and accepted after; ``online`` refills it;
4. the leader is killed with SIGKILL right after it accepted a scaling: the new leader
   completes it (every node runs and routes exactly the new count, the scaling ends
   ``converged``);
5. a machine holding a ``pair`` instance dies (its agent, proxy and instances SIGKILLed):
   ``pair`` serves twice again on the survivors;
6. an autoscaled app (``min = 1``, ``max = 3``, one in-flight request per instance) under
   a ramp of slow requests grows to its max and no further, shrinks back to its min once
   the load stops, without flapping, every decision in the audit log with its inputs (the
   coordinators run with short autoscale windows and cooldowns, ``AUTOSCALE_TIMING``).

Every wait polls a condition under a deadline; the only sleep paces the load clients.
On the way out every process is stopped and psutil confirms nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.coordinator.cluster import Cluster
from tests.coordinator.helpers import TEST_WATCH_WINDOW
from tests.e2e.fleet import (
    REQUEST_TIMEOUT,
    Fleet,
    Load,
    leftovers,
    make_root,
    upload,
    wait_deploy_done,
    write_demo_app,
)
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow

NODE_TIMEOUT = 3.0  # a dead machine is marked down this fast (the default is 10 s)
CONVERGE = 60.0  # a scaling or a move converges within this on a busy 2-core machine
JOIN_SERVES = 30.0  # a joining node serves its groups' apps within this
HEALTH_EVERY = 0.5  # how often the emulated front load balancer checks /-/healthz
WARMUP = 20  # load requests seen before the change under test begins
GROUPS = ("default", "web")
# the autoscalers' timings on this cluster: a whole ramp up and down within seconds
# (the defaults, 30/60/10/60 s, would take minutes)
AUTOSCALE_TIMING = "window=3,down_window=2,up_cooldown=1,down_cooldown=2"
RAMP_CLIENTS = 4  # concurrent slow requests at the top of the ramp: 4 in flight > max 3
RAMP_STEP = 0.5  # seconds between one more client joining the ramp (pacing the load)
SLOW = 0.5  # seconds each request of the ramp takes in the app


@dataclass
class Env:
    root: Path
    cluster: Cluster
    fleet: Fleet

    def leader(self) -> int:
        return self.cluster.leader()

    def app(self, name: str) -> dict[str, Any]:
        """The app as the leader shows it (with the instances each node reports)."""
        r = self.cluster.get(self.leader(), f"/api/v1/apps/{name}", timeout=REQUEST_TIMEOUT)
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    def running(self) -> list[int]:
        return [i for i, p in enumerate(self.fleet.members) if p.alive()]

    def routed(self, app: str) -> dict[str, int]:
        """Node -> ready instances of ``app`` its proxy routes to (running members)."""
        counts = {}
        for i in self.running():
            status = self.fleet.status(i)
            ready = {inst["instance"] for inst in status["instances"]
                     if inst["app"] == app and inst["state"] == "ready"}
            routed = [iid for iid in status["routes"].get(app, []) if iid in ready]
            if routed:
                counts[self.fleet.members[i].node] = len(routed)
        return counts

    def live(self, app: str | None = None) -> dict[str, int]:
        """Node -> instances (of ``app``; of any app when None) not stopped."""
        counts = {}
        for i in self.running():
            found = [inst for inst in self.fleet.status(i)["instances"]
                     if (app is None or inst["app"] == app) and inst["state"] != "stopped"]
            if found:
                counts[self.fleet.members[i].node] = len(found)
        return counts

    def scale(self, app: str, **body: Any) -> str:
        r = self.cluster.post(self.leader(), f"/api/v1/apps/{app}/scale", json=body,
                              timeout=REQUEST_TIMEOUT)
        assert r.status_code == 202, r.text
        scale_id: str = r.json()["scale_id"]
        return scale_id

    def wait_scaled(self, app: str, scale_id: str) -> dict[str, Any]:
        """The scaling's end (``last_scaling``) once it has ended."""
        def ended() -> dict[str, Any] | None:
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                last = self.app(app)["last_scaling"]
                return last if last and last["id"] == scale_id else None
            return None
        found = wait_until(ended, f"scaling {scale_id} of {app} ended", timeout=CONVERGE)
        assert found is not None
        return found

    def index(self, node: str) -> int:
        return next(i for i, p in enumerate(self.fleet.members) if p.node == node)


class BalancedLoad(Load):
    """Load sent as a front load balancer sends it: to a proxy only while its
    ``/-/healthz`` answered 200 at the last check (every ``HEALTH_EVERY`` seconds)."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(urls)
        self._health: dict[str, tuple[float, bool]] = {}

    def sending(self, http: httpx.Client, url: str) -> bool:
        checked, healthy = self._health.get(url, (0.0, True))
        if time.monotonic() - checked >= HEALTH_EVERY:
            base = url.split("/", 3)
            try:
                healthy = http.get(f"{base[0]}//{base[2]}/-/healthz").status_code == 200
            except httpx.HTTPError:
                healthy = False
            self._health[url] = (time.monotonic(), healthy)
        return healthy


def write_app(root: Path, name: str, scale: str) -> Path:
    """The demo app as ``name`` with the ``[scale]`` table ``scale``."""
    src = write_demo_app(root / f"src-{name}", name=name, version="1")
    manifest = src / "superagent.toml"
    text = manifest.read_text()
    manifest.write_text(text.replace(text[text.index("[scale]"):text.index("[env]")],
                                     f"[scale]\n{scale}\n"))
    return src


@pytest.fixture(scope="module")
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    root = make_root("sa-e2e-reconcile-")
    failed_before = request.session.testsfailed
    passed = False
    try:
        with Cluster(root / "coordinators", node_timeout=NODE_TIMEOUT,
                     watch_window=TEST_WATCH_WINDOW,
                     extra_args=("--autoscale-timing", AUTOSCALE_TIMING)) as cluster, \
                Fleet(root, [m.url for m in cluster.members], size=3,
                      groups=GROUPS) as fleet:
            cluster.start_all()
            leader = cluster.wait_ready()
            fleet.start_all()
            fleet.wait_joined(cluster, leader)
            for name, scale in (("web", 'groups = ["web"]\nper_node = 1'),
                                ("pair", "instances = 2")):
                started = upload(cluster, leader, write_app(root, name, scale))
                record = wait_deploy_done(cluster, [leader], name, started["deploy_id"])
                assert record["status"] == "succeeded", record
            e = Env(root, cluster, fleet)
            wait_until(lambda: sum(e.routed("pair").values()) == 2, "pair runs twice",
                       timeout=CONVERGE)
            yield e
        left = leftovers(root)
        assert left == [], "\n".join(left)
        passed = request.session.testsfailed == failed_before
    finally:
        if passed:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"data dirs and logs kept in {root}")


def _no_failures(load: Load) -> None:
    requests, failures = load.snapshot()
    print(f"load: {requests} requests, {failures} failed {dict(load.failed)}")
    assert failures == 0, f"{load!r}: {load.samples}"


def test_scale_out_and_in_under_load_fails_no_request(env: Env) -> None:
    """web: one per node -> three -> one, under keep-alive load through every proxy."""
    nodes = {p.node for p in env.fleet.members}
    assert env.routed("web") == dict.fromkeys(nodes, 1)
    with Load([f"{p.proxy}/web/" for p in env.fleet.members]) as load:
        wait_until(lambda: load.snapshot()[0] >= WARMUP, "load warmed up")
        out = env.scale("web", per_node=3)
        assert env.wait_scaled("web", out)["outcome"] == "converged"
        assert env.routed("web") == dict.fromkeys(nodes, 3)
        inside = env.scale("web", per_node=1)
        assert env.wait_scaled("web", inside)["outcome"] == "converged"
        wait_until(lambda: env.live("web") == dict.fromkeys(nodes, 1), "back to one each",
                   timeout=CONVERGE)
        assert env.routed("web") == dict.fromkeys(nodes, 1)
    _no_failures(load)


def test_a_joining_participant_serves_its_groups_apps_without_a_command(env: Env) -> None:
    """A fourth participant started with --group web gets web's instance and serves it."""
    index = env.fleet.add(groups=("web",))
    env.fleet.start(index)
    joiner = env.fleet.members[index]
    began = time.monotonic()

    def serves() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(f"{joiner.proxy}/web/", timeout=REQUEST_TIMEOUT)
            return r.status_code == 200 and r.json()["app"] == "web"
        return False

    wait_until(serves, f"{joiner.node} serves web", timeout=JOIN_SERVES)
    print(f"{joiner.node} served web {time.monotonic() - began:.1f}s after its start")
    assert env.routed("web")[joiner.node] == 1
    assert joiner.node not in env.live("pair")  # not in pair's group


def test_a_drained_node_hands_its_work_over_without_a_failed_request(env: Env) -> None:
    """Drain (``superagent drain``) the node holding a pair instance under load-balanced
    load: pair moves first, then the node's instances stop, and the command returns once
    nothing runs there; offline is refused until then."""
    node = sorted(env.routed("pair"))[0]
    index = env.index(node)
    leader = env.leader()
    with BalancedLoad([f"{p.proxy}/web/" for p in env.fleet.members]) as load:
        wait_until(lambda: load.snapshot()[0] >= WARMUP, "load warmed up")
        drain = subprocess.Popen(
            [sys.executable, "-m", "superagent", "drain", node,
             "--server", env.cluster.api(leader), "--token", env.cluster.token],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: env.cluster.get(leader, f"/api/v1/nodes/{node}").json()[
                "lifecycle"] == "draining", f"{node} draining")
            refused = env.cluster.post(leader, f"/api/v1/nodes/{node}/offline")
            assert refused.status_code == 409 and node in refused.json()["detail"], (
                refused.text)
            out, _ = drain.communicate(timeout=CONVERGE)
        finally:
            drain.kill()
        assert drain.returncode == 0, out
        assert "still running" in out and f"{node}: drained" in out, out
        assert node not in env.live()
        assert sum(env.routed("pair").values()) == 2 and node not in env.routed("pair")
        assert node not in env.routed("web") and len(env.routed("web")) == 3
    _no_failures(load)
    offline = env.cluster.post(env.leader(), f"/api/v1/nodes/{node}/offline")
    assert offline.status_code == 200, offline.text
    online = env.cluster.post(env.leader(), f"/api/v1/nodes/{node}/online")
    assert online.status_code == 200, online.text
    wait_until(lambda: env.routed("web").get(node) == 1, f"{node} refilled",
               timeout=CONVERGE)
    r = httpx.get(f"{env.fleet.members[index].proxy}/-/healthz", timeout=REQUEST_TIMEOUT)
    assert r.status_code == 200


def test_a_new_leader_completes_a_scaling_its_predecessor_began(env: Env) -> None:
    """SIGKILL of the leader once its scaling of web to two per node has started a first
    instance somewhere (or, if it was quicker than the poll, right after): the next leader
    ends it, with exactly two instances running and routed on every node."""
    nodes = set(env.routed("web"))
    leader = env.leader()
    scale_id = env.scale("web", per_node=2)

    def begun() -> dict[str, int] | None:  # some node runs a second instance already
        live = env.live("web")
        return live if any(n > 1 for n in live.values()) else None

    seen = wait_until(begun, "a first new instance", timeout=CONVERGE, interval=0.02)
    env.cluster.kill9(leader)
    print(f"killed the leader with web running {seen}")
    survivors = [i for i in range(len(env.cluster.members)) if i != leader]
    env.cluster.leader(among=survivors)
    assert env.wait_scaled("web", scale_id)["outcome"] == "converged"
    wait_until(lambda: env.live("web") == dict.fromkeys(nodes, 2), "two each",
               timeout=CONVERGE)
    assert env.routed("web") == dict.fromkeys(nodes, 2)
    env.cluster.start(leader)  # back to three coordinators for what follows
    wait_until(lambda: env.cluster.health(leader) is not None, "the member is back",
               timeout=CONVERGE)


def test_a_dead_machine_s_instances_run_again_on_the_survivors(env: Env) -> None:
    """A machine holding a pair instance dies: pair serves twice again on the others."""
    victim = sorted(env.routed("pair"))[0]
    env.fleet.kill9(env.index(victim))
    began = time.monotonic()
    wait_until(lambda: sum(env.routed("pair").values()) == 2, "pair runs twice again",
               timeout=CONVERGE)
    print(f"pair served twice again {time.monotonic() - began:.1f}s after {victim} died")
    for node in env.routed("pair"):
        r = httpx.get(f"{env.fleet.members[env.index(node)].proxy}/pair/",
                      timeout=REQUEST_TIMEOUT)
        assert r.status_code == 200 and r.json()["app"] == "pair", r.text


class Ramp:
    """Slow requests (``SLOW`` s each) through one proxy from up to ``RAMP_CLIENTS``
    threads, one more every ``RAMP_STEP`` seconds; counts answers and failures."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failed: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Ramp:
        self._threads.append(threading.Thread(target=self._grow, daemon=True))
        self._threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=REQUEST_TIMEOUT + 5)

    def _grow(self) -> None:
        for _ in range(RAMP_CLIENTS):
            client = threading.Thread(target=self._client, daemon=True)
            self._threads.append(client)
            client.start()
            if self._stop.wait(RAMP_STEP):  # pacing the ramp, not synchronising
                return

    def _client(self) -> None:
        with httpx.Client(trust_env=False, timeout=REQUEST_TIMEOUT) as http:
            while not self._stop.is_set():
                try:
                    r = http.get(self.url)
                    failure = None if r.status_code == 200 else f"status {r.status_code}"
                except httpx.HTTPError as exc:
                    failure = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    if failure is None:
                        self.ok += 1
                    else:
                        self.failed.append(failure)


def _autoscale_decisions(env: Env, app: str) -> list[tuple[int, int, dict[str, Any]]]:
    """(before, after, inputs) of every Autoscale of ``app`` in the audit log, oldest first."""
    r = env.cluster.get(env.leader(), "/api/v1/audit", params={"limit": 1000},
                        timeout=REQUEST_TIMEOUT)
    r.raise_for_status()
    found = []
    for entry in reversed(r.json()["audit"]):
        if entry["type"] != "autoscale" or entry["target"] != f"app:{app}":
            continue
        counts = re.match(r"(\d+) -> (\d+) instances: .* \(inputs (\{.*\})\)$",
                          entry["outcome"])
        assert counts is not None, entry
        found.append((int(counts[1]), int(counts[2]), json.loads(counts[3])))
    return found


def test_autoscaling_follows_a_load_ramp_up_and_back_down(env: Env) -> None:
    """auto (min 1, max 3, target 1 in flight): a ramp to 4 concurrent slow requests takes
    it to 3 instances and no further; with the load gone it returns to 1; the decisions go
    up, then down (no flapping), each in the audit log with what it was made of."""
    began = time.monotonic()
    started = upload(env.cluster, env.leader(),
                     write_app(env.root, "auto", "min = 1\nmax = 3\ntarget = 1"))
    record = wait_deploy_done(env.cluster, [env.leader()], "auto", started["deploy_id"])
    assert record["status"] == "succeeded", record
    wait_until(lambda: sum(env.routed("auto").values()) == 1, "auto runs once",
               timeout=CONVERGE)
    node = next(iter(env.routed("auto")))  # sticky: this instance stays while others come
    proxy = env.fleet.members[env.index(node)].proxy
    peak = 0

    def total(want: int) -> bool:
        nonlocal peak
        count = sum(env.live("auto").values())
        peak = max(peak, count)
        return count == want

    with Ramp(f"{proxy}/auto/slow?s={SLOW}") as ramp:
        wait_until(lambda: total(3), "auto grown to its max", timeout=CONVERGE)
        wait_until(lambda: sum(env.routed("auto").values()) == 3, "3 instances routed",
                   timeout=CONVERGE)
        grown = time.monotonic()
        ramp.stop()
    assert ramp.failed == [] and ramp.ok > 0, ramp.failed[:5]
    wait_until(lambda: total(1), "auto back to its min", timeout=CONVERGE)
    print(f"auto: up to 3 in {grown - began:.1f}s (deploy included), down to 1"
          f" {time.monotonic() - grown:.1f}s after the load stopped")
    assert peak == 3  # never above max
    decisions = _autoscale_decisions(env, "auto")
    steps = [after for _, after, _ in decisions]
    assert 3 in steps, decisions
    top = steps.index(3)
    assert steps[:top + 1] == sorted(steps[:top + 1]) and steps[-1] == 1, decisions
    assert steps[top:] == sorted(steps[top:], reverse=True), decisions  # no flapping
    for before, after, inputs in decisions:
        assert 1 <= after <= 3 and before != after
        assert inputs["current"] == before and inputs["min"] == 1 and inputs["max"] == 3
        assert inputs["target"] == 1 and inputs["metric"] == "in_flight"
        assert inputs["load"] is not None and inputs["samples"] >= 1
        assert inputs["window"] == 3 and inputs["up_cooldown"] == 1, inputs
        assert (inputs["wanted"] > before) == (after > before), inputs
