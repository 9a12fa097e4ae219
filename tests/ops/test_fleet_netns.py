"""A fleet on one machine, for real: ``ops/fleet-netns`` and the HAProxy example in front.

One fleet for the module (bringing it up is most of the cost): three network namespaces on
a bridge, each machine with its own 10.x address, loopback and state directory, three
coordinators and three participants started with the documented fleet flags, the demo
app deployed by the CLI. The tests then

- send traffic to every participant's own address, scale the app through a coordinator
  that is reached by its address, and check that each machine enrolled and fetched the
  release on its own (nothing assumed loopback or a shared filesystem);
- run ``ops/haproxy/haproxy.cfg`` (only its addresses and the example app's name
  changed) in front of the three machines and drain one under a bounded load: HAProxy's
  checks see its ``/-/healthz`` 503 and take it out of both backends before its
  instances go, so no request fails.

Needs root, ``ip`` and ``nsenter`` (skipped, naming what is missing, otherwise); the
HAProxy test needs haproxy (``scripts/test`` installs it). Names carry a random suffix and
everything is torn down by the script, and again by ``fleet-netns down SUFFIX``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from superagent.client import Client
from tests.e2e.fleet import kept_on_failure, write_demo_app
from tests.support.procs import LoggedProcess
from tests.support.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "ops" / "fleet-netns"
HAPROXY_CFG = REPO / "ops" / "haproxy" / "haproxy.cfg"
UP_TIMEOUT = 120.0  # three coordinators, three agents and a deploy on a loaded 2-core box
DOWN_TIMEOUT = 60.0
DRAIN_WAIT = 3.0  # the coordinators' --drain-wait: HAProxy's checks (2 x 0.5 s) fit well
LB_PORT = 8000  # on the fleet's own bridge address: no other test can hold it
LOAD_CLIENTS = 3
LOAD_PACE = 0.01


def missing_capability() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


class Fleet:
    """What ``fleet-netns up --json`` reported, and an API client on it."""

    def __init__(self, doc: dict[str, Any], app: str) -> None:
        self.doc = doc
        self.app = app
        self.machines: list[dict[str, Any]] = doc["machines"]
        self.client = Client(doc["servers"].split(","), doc["admin_token"], timeout=30.0)

    def cli(self, *argv: str, server: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SUPERAGENT_SERVER": server or self.doc["servers"],
               "SUPERAGENT_TOKEN": self.doc["admin_token"]}
        return subprocess.run([sys.executable, "-m", "superagent", *argv], env=env,
                              capture_output=True, text=True, timeout=UP_TIMEOUT)

    def running(self, node: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.client.get(f"/api/v1/nodes/{node}/running")
        return doc


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    reason = missing_capability()
    if reason is not None:
        pytest.skip(reason)
    suffix = secrets.token_hex(3)
    app = f"h{suffix}"
    with kept_on_failure("sa-netns-") as root:
        write_demo_app(root / "app", name=app, version="1", per_node=1)
        script = LoggedProcess(f"fleet-netns {suffix}", root / "fleet-netns.log")
        try:
            script.start([sys.executable, str(SCRIPT), "up", "--json", "--suffix", suffix,
                          "--dir", str(root / "fleet"), "--app", str(root / "app"),
                          "--drain-wait", str(DRAIN_WAIT)])
            doc_file = root / "fleet" / "fleet.json"

            def up() -> dict[str, Any]:  # written whole (renamed into place) once up
                assert script.alive(), f"fleet-netns exited:\n{script.tail(80)}"
                found: dict[str, Any] = (json.loads(doc_file.read_text())
                                         if doc_file.exists() else {})
                return found

            doc = wait_until(up, "the namespace fleet up", timeout=UP_TIMEOUT, interval=0.2)
            print(f"fleet-netns timings: {doc['timings']}")
            yield Fleet(doc, app)
        finally:
            if script.proc is not None:
                script.stop(grace=DOWN_TIMEOUT)  # SIGTERM: the script tears down
                script.close()
            left = subprocess.run([sys.executable, str(SCRIPT), "down", suffix],
                                  capture_output=True, text=True, timeout=DOWN_TIMEOUT)
            subprocess.run(["userdel", f"sa-{app}"], capture_output=True)
            namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True,
                                        text=True).stdout
        assert left.stdout.strip() == "removed: nothing", left.stdout + left.stderr
        assert suffix not in namespaces


def test_every_machine_serves_on_its_own_address(fleet: Fleet) -> None:
    http = httpx.Client(trust_env=False, timeout=10.0)
    addresses = [m["address"] for m in fleet.machines]
    assert len(set(addresses)) == 3 and all(a.startswith("10.") for a in addresses)
    # The CLI printed where the app answers: each node's own address, from its heartbeat.
    assert fleet.doc["app_urls"] == [f"http://{a}:8080/{fleet.app}/" for a in addresses]
    for url in fleet.doc["app_urls"]:
        r = http.get(url)
        assert r.status_code == 200 and r.json()["app"] == fleet.app, (url, r.text)

    # Scale through the last coordinator alone (reached by its address; a follower
    # forwards to the leader's address): 3 instances -> 5 over the three machines.
    scaled = fleet.cli("scale", fleet.app, "--instances", "5",
                       server=fleet.machines[-1]["api"])
    assert scaled.returncode == 0, scaled.stdout + scaled.stderr
    nodes = [m["node"] for m in fleet.machines]
    wait_until(lambda: sum(len(fleet.running(n)["instances"]) for n in nodes) == 5,
               "5 instances running over the machines", timeout=60.0)
    for m in fleet.machines:
        answers = Counter(http.get(f"{m['proxy']}/{fleet.app}/").status_code
                          for _ in range(10))
        assert answers == Counter({200: 10}), (m["name"], answers)
        # Its own enrolment and its own copy of the release, fetched from the coordinators.
        data = Path(m["dir"]) / "participant"
        proxy = json.loads((data / "proxy" / "proxy.json").read_text())
        assert proxy["snapshot"]["proxy"]["trusted_proxies"] == [
            f"{fleet.doc['host_address']}/32"]
        assert (data / "credential").exists()
        assert any((data / "releases" / fleet.app).iterdir())
    http.close()


class BalancedLoad:
    """Keep-alive GETs through the load balancer from a few threads; every answer counted
    by the machine HAProxy names (``X-Superagent-Machine``) with its time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[float, str]] = []  # (monotonic time, machine)
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True)
                         for _ in range(LOAD_CLIENTS)]

    def __enter__(self) -> BalancedLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def _client(self) -> None:
        with httpx.Client(trust_env=False, timeout=10.0) as http:
            while not self._stop.is_set():
                try:
                    r = http.get(self.url)
                    ok = r.status_code == 200
                    what = r.headers.get("x-superagent-machine", "?") if ok else (
                        f"status {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    ok, what = False, f"{type(exc).__name__}: {exc}"
                with self._lock:
                    if ok:
                        self.answers.append((time.monotonic(), what))
                    else:
                        self.failures.append(what)
                self._stop.wait(LOAD_PACE)


def haproxy_config(fleet: Fleet, sock: Path) -> str:
    """ops/haproxy/haproxy.cfg with the fleet's machines, a bind on the fleet's bridge
    address and an admin socket to read the servers' state: nothing else changed."""
    text = HAPROXY_CFG.read_text()
    servers = "".join(f"    server {m['name']} {m['address']}:8080\n" for m in fleet.machines)
    text = re.sub(r"(?m)(^    server .*\n)+", servers, text)  # each backend's servers
    text = text.replace("/hello/", f"/{fleet.app}/")  # the per-app backend's example app
    text = text.replace("    bind :80", f"    bind {fleet.doc['host_address']}:{LB_PORT}")
    return text.replace("global\n", f"global\n    stats socket {sock} mode 600 level admin\n")


def server_states(sock: Path, backend: str = "superagent") -> dict[str, str]:
    """HAProxy's view of each server of ``backend``: UP, DOWN, ..."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    states = {}
    for line in data.decode().splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[0] == backend and fields[1] not in (
                "BACKEND", "FRONTEND"):
            states[fields[1]] = fields[17].split(" ")[0]
    return states


def test_haproxy_takes_a_draining_machine_out_with_no_failed_request(
        fleet: Fleet, tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(haproxy, os.X_OK):
        pytest.skip("haproxy is not installed (scripts/test installs it)")
    cfg, sock = tmp_path / "haproxy.cfg", tmp_path / "haproxy.sock"
    cfg.write_text(haproxy_config(fleet, sock))
    lb = LoggedProcess("haproxy", tmp_path / "haproxy.log")
    lb.start([haproxy, "-db", "-f", str(cfg)])
    try:
        wait_until(lambda: all(set(server_states(sock, b).values()) == {"UP"}
                               for b in ("superagent", "app_hello")),
                   "HAProxy sees every machine UP, with the app", timeout=30.0)
        drained = fleet.machines[0]
        with BalancedLoad(f"http://{fleet.doc['host_address']}:{LB_PORT}/{fleet.app}/") as load:
            wait_until(lambda: {m for _, m in load.answers} >= {"m1", "m2", "m3"},
                       "load answered by every machine")
            t_drain = time.monotonic()
            fleet.client.post(f"/api/v1/nodes/{drained['node']}/drain")
            wait_until(lambda: all(server_states(sock, b).get(drained["name"]) == "DOWN"
                                   for b in ("superagent", "app_hello")),
                       f"HAProxy takes {drained['name']} out", timeout=30.0)
            t_out = time.monotonic()

            def emptied() -> bool:
                left = fleet.running(drained["node"])
                return not (left["instances"] or left["placed"])

            wait_until(emptied, f"nothing runs on {drained['name']}", timeout=60.0)
            t_empty = time.monotonic()
            after = len(load.answers)
            wait_until(lambda: len(load.answers) >= after + 50, "50 more answers")
        print(f"drain: out of HAProxy {t_out - t_drain:.2f}s, empty {t_empty - t_drain:.2f}s,"
              f" {len(load.answers)} answers, {len(load.failures)} failed")
        assert load.failures == [], load.failures[:5]
        assert len(load.answers) >= 200
        # Out within HAProxy's checks, well before the coordinators moved the work away.
        assert t_out - t_drain < DRAIN_WAIT
        late = [m for t, m in load.answers if t > t_out + 1.0 and m == drained["name"]]
        assert late == [], f"{len(late)} answers from the drained machine after it was out"
    finally:
        lb.stop()
        lb.close()
