"""End-to-end tests of ``superagent coordinator``: 3 real processes on loopback
(tests/coordinator/cluster.py), driven through the HTTP API only.

The tests that do not disturb the cluster share one (module scope); each that kills, stops or
restarts members gets its own. Waits poll a condition with a deadline; the only sleeps are the
pacing of a participant's heartbeats, which is what the test is about.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.coordinator.cluster import SECRET, Cluster
from tests.participant.tarballs import file, make_tar
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow

NODE_TIMEOUT = 1.5  # --node-timeout of the shared cluster: the membership test waits on it
FAILOVER_BOUND = 2.0  # kill -9 of the leader -> a survivor names a new leader
STEP_DOWN_BOUND = 3.0  # leader cut off from both followers -> it stops calling itself leader
FOLLOWER_CATCH_UP = 5.0  # a follower applies what the leader committed within a few heartbeats
WRITE_DEADLINE = 20.0  # a client keeps retrying one write (same key, other nodes) this long
CLIENT_TIMEOUT = 3.0  # one attempt of that client


def manifest(name: str) -> dict[str, Any]:
    return {"app": {"name": name}, "run": {"command": "python3 app.py"}}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-member cluster shared by the tests that leave it as they found it."""
    with Cluster(tmp_path_factory.mktemp("shared"), node_timeout=NODE_TIMEOUT) as c:
        c.start_all()
        c.wait_ready()
        yield c  # a failing test's report shows the members' log tails (tests/support/logs.py)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A fresh 3-member cluster for a test that kills, stops or restarts members."""
    with Cluster(tmp_path) as c:
        c.start_all()
        c.wait_ready()
        yield c


class RetryingClient:
    """Creates apps like a careful client: one Idempotency-Key per app, and on an error or
    a timeout the same key again on the next member, until a 201 or ``WRITE_DEADLINE``."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.acked: list[str] = []
        self.repeated: list[str] = []
        self.attempts = 0
        self.failures: list[str] = []

    def create(self, name: str, first: int) -> bool:
        c = self.cluster
        deadline = time.monotonic() + WRITE_DEADLINE
        i = first
        while time.monotonic() < deadline:
            self.attempts += 1
            try:
                r = c.post(i, "/api/v1/apps", json=manifest(name), timeout=CLIENT_TIMEOUT,
                           headers={"idempotency-key": f"key-{name}"})
            except httpx.HTTPError as exc:
                self.failures.append(f"{name}@c{i + 1}: {exc!r}")
            else:
                if r.status_code == 201:
                    self.acked.append(name)
                    if r.json().get("repeated"):
                        self.repeated.append(name)
                    return True
                # a 409 here would mean a retried key applied twice: never retried past
                assert r.status_code != 409, f"{name} on c{i + 1}: {r.status_code} {r.text}"
                self.failures.append(f"{name}@c{i + 1}: {r.status_code} {r.text[:120]}")
            i = (i + 1) % len(c.members)
        return False


def app_names(cluster: Cluster, i: int) -> list[str]:
    r = cluster.get(i, "/api/v1/apps")
    r.raise_for_status()
    return [a["name"] for a in r.json()["apps"]]


def create_audit_counts(cluster: Cluster, i: int) -> dict[str, int]:
    r = cluster.get(i, "/api/v1/audit", params={"limit": 1000})
    r.raise_for_status()
    counts: dict[str, int] = {}
    for entry in r.json()["audit"]:
        if entry["type"] == "create_app":
            name = entry["target"].removeprefix("app:")
            counts[name] = counts.get(name, 0) + 1
    return counts


def assert_exactly_once(cluster: Cluster, members: list[int], acked: list[str]) -> None:
    for i in members:
        names = app_names(cluster, i)
        assert len(names) == len(set(names)), f"duplicate apps on c{i + 1}: {names}"
        missing = sorted(set(acked) - set(names))
        assert not missing, f"acknowledged apps missing on c{i + 1}: {missing}"
        audit = create_audit_counts(cluster, i)
        twice = {n: audit.get(n, 0) for n in acked if audit.get(n, 0) != 1}
        assert not twice, f"apps not created exactly once per the audit of c{i + 1}: {twice}"


# ---------------------------------------------------------------------- shared cluster
def test_writes_on_every_member_converge(shared: Cluster) -> None:
    """Writes through the leader and both followers succeed, are read back on the member
    that took them, and all three members end with the same state digest."""
    leader = shared.leader()
    order = [leader] + [i for i in range(3) if i != leader]
    for round_ in range(4):
        for i in order:
            name = f"every-{round_}-c{i + 1}"
            r = shared.post(i, "/api/v1/apps", json=manifest(name))
            assert r.status_code == 201, (i, r.status_code, r.text)
            assert name in app_names(shared, i)  # read-your-writes on a follower too
    again = shared.post(order[1], "/api/v1/apps", json=manifest("every-0-c1"))
    assert again.status_code == 409, again.text
    keyed = [shared.post(i, "/api/v1/apps", json=manifest("every-keyed"),
                         headers={"idempotency-key": "every-keyed-1"}) for i in order]
    assert [r.status_code for r in keyed] == [201, 201, 201], [r.text for r in keyed]
    assert create_audit_counts(shared, order[2])["every-keyed"] == 1
    digest = shared.wait_converged()
    views = [shared.cluster_view(i) for i in range(3)]
    assert {v["state_digest"] for v in views} == {digest}
    assert all(v["leader"] == shared.members[leader].id for v in views)
    for i in range(3):
        assert sum(n.startswith("every-") for n in app_names(shared, i)) == 13


def test_api_auth(shared: Cluster) -> None:
    """Admin endpoints: 401 without a token, with a wrong one, and with the cluster
    secret; participant endpoints: 401 without the secret or with the admin token."""
    shared.leader()
    secret = {"authorization": f"Bearer {SECRET}"}
    wrong = {"authorization": "Bearer sa_not-a-token"}
    none = {"authorization": ""}
    admin_calls = [("GET", "/api/v1/apps", None), ("GET", "/api/v1/cluster", None),
                   ("GET", "/api/v1/nodes", None), ("GET", "/api/v1/audit", None),
                   ("POST", "/api/v1/apps", manifest("auth-should-not-exist"))]
    for i in range(3):
        assert shared.http.get(shared.api(i) + "/healthz").status_code == 200
        for method, path, body in admin_calls:
            for headers in (none, wrong, secret):
                r = shared.request(method, i, path, json=body, headers=headers)
                assert r.status_code == 401, (i, method, path, headers, r.text)
                assert r.json()["error"] == "unauthorized"
            if method == "POST":
                body = manifest(f"auth-ok-c{i + 1}")
            r = shared.request(method, i, path, json=body)
            assert r.status_code in (200, 201), (i, method, path, r.text)
        for headers in (none, wrong, shared.admin()):
            r = shared.post(i, "/api/v1/nodes/register", headers=headers,
                            json={"node": "auth-node", "address": "127.0.0.1:9"})
            assert r.status_code == 401, (i, headers, r.text)
    for i in range(3):
        nodes = shared.get(i, "/api/v1/nodes").json()["nodes"]
        assert "auth-node" not in [n["name"] for n in nodes]
        assert "auth-should-not-exist" not in app_names(shared, i)


def test_membership_up_down_up_through_a_follower(shared: Cluster) -> None:
    """A participant registered and heartbeating through a follower is up; silent, it is
    marked down after node-timeout, never before; heartbeating again, it is up again."""
    leader = shared.leader()
    follower = next(i for i in range(3) if i != leader)
    secret = {"authorization": f"Bearer {SECRET}"}

    def up(i: int) -> bool | None:
        nodes = {n["name"]: n for n in shared.get(i, "/api/v1/nodes").json()["nodes"]}
        return nodes["p1"]["up"] if "p1" in nodes else None

    def beat() -> None:
        r = shared.post(follower, "/api/v1/nodes/p1/heartbeat", headers=secret,
                        json={"status": {"instances": 0}})
        assert r.status_code == 200, r.text

    r = shared.post(follower, "/api/v1/nodes/register", headers=secret, json={
        "node": "p1", "address": "127.0.0.1:9", "groups": ["default"], "capacity": 4})
    assert r.status_code == 200, r.text
    # every member applies the registration (p1 beats meanwhile: it is silent for no longer)
    wait_until(lambda: (beat(), all(up(i) is True for i in range(3)))[1],
               "p1 registered and up on every member")
    # twice the node timeout of heartbeats every 0.3 s: the node must stay up throughout
    end = time.monotonic() + 2 * NODE_TIMEOUT
    while time.monotonic() < end:
        beat()
        assert all(up(i) is True for i in range(3)), [up(i) for i in range(3)]
        time.sleep(0.3)  # heartbeat pacing, not synchronisation
    silent_since = time.monotonic()  # before the last beat: its record is later still
    beat()
    # marked down after the timeout, never before it; later by as long as the leader itself
    # stalled on this loaded machine (its own stalls are not p1's silence), hence the wait
    wait_until(lambda: up(follower) is False, "p1 marked down", timeout=NODE_TIMEOUT + 10.0)
    down_after = time.monotonic() - silent_since
    print(f"\n[cluster] silent participant marked down after {down_after:.2f} s"
          f" (node-timeout {NODE_TIMEOUT} s)")
    assert down_after > NODE_TIMEOUT
    shared.wait_converged()
    assert all(up(i) is False for i in range(3))
    beat()
    wait_until(lambda: all(up(i) is True for i in range(3)), "p1 up again", timeout=3.0)
    audit = shared.get(leader, "/api/v1/audit").json()["audit"]
    types = [e["type"] for e in audit if e["target"] == "node:p1"]
    assert types[:3] == ["node_up", "node_down", "register_node"], types


# ---------------------------------------------------------------------- own clusters
def test_kill9_leader_during_writes(cluster: Cluster) -> None:
    """kill -9 of the leader during a round-robin stream of keyed, retried writes: a new
    leader within 2 s, every acknowledged app exactly once, equal digests on the survivors;
    the restarted member catches up to the same digest."""
    old = cluster.leader()
    old_id = cluster.members[old].id
    survivors = [i for i in range(3) if i != old]
    client = RetryingClient(cluster)
    kill_now = threading.Event()
    failover: dict[str, Any] = {}

    def killer() -> None:
        kill_now.wait(timeout=30)
        killed_at = time.monotonic()
        cluster.kill9(old)

        def new_leader() -> str | None:
            for i in survivors:
                h = cluster.health(i)
                if h is not None and h["leader"] not in (None, old_id):
                    return str(h["leader"])
            return None

        try:
            failover["leader"] = wait_until(new_leader, "a new leader", timeout=10.0)
            failover["seconds"] = time.monotonic() - killed_at
        except AssertionError as exc:
            failover["error"] = str(exc)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        n = 0
        while n < 60 or (thread.is_alive() and n < 200):
            if n == 20:
                kill_now.set()
            assert client.create(f"s{n}", n % 3), client.failures[-5:]
            n += 1
    finally:
        kill_now.set()
        thread.join(timeout=15)
    assert "error" not in failover, failover
    print(f"\n[cluster] kill -9 of leader {old_id}: new leader {failover['leader']} named"
          f" {failover['seconds']:.2f} s later; {len(client.acked)} writes acknowledged in"
          f" {client.attempts} attempts, {len(client.repeated)} answered as repeats")
    assert failover["seconds"] < FAILOVER_BOUND
    assert cluster.members[cluster.index_of(failover["leader"])].alive()
    cluster.wait_converged(survivors)
    assert_exactly_once(cluster, survivors, client.acked)
    cluster.start(old)
    cluster.wait_converged(range(3))
    assert_exactly_once(cluster, list(range(3)), client.acked)
    cluster.leader()  # all three agree on a leader again


def test_full_restart_keeps_acknowledged_writes(cluster: Cluster) -> None:
    """SIGTERM all three, start all three: every acknowledged write is there, same digest."""
    client = RetryingClient(cluster)
    for n in range(15):
        assert client.create(f"r{n}", n % 3), client.failures[-5:]
    before = cluster.wait_converged()
    last_seq = cluster.get(0, "/api/v1/audit", params={"limit": 1}).json()["audit"][0]["seq"]
    codes = [cluster.stop(i) for i in range(3)]
    assert codes == [0, 0, 0], codes
    cluster.start_all()
    cluster.wait_ready()
    after = cluster.wait_converged()
    assert_exactly_once(cluster, list(range(3)), client.acked)
    if after != before:
        audit = cluster.get(0, "/api/v1/audit", params={"limit": 1000}).json()["audit"]
        raise AssertionError(f"state changed across a restart: "
                             f"{[e for e in audit if e['seq'] > last_seq]}")
    assert client.create("after-restart", 1)


def test_artifact_survives_leader_kill(cluster: Cluster) -> None:
    """A release uploaded to the leader, which is then killed -9, is still served (bytes and
    sha256 checked) by the new leader and by every survivor."""
    leader = cluster.leader()
    payload = os.urandom(256 * 1024)  # incompressible: the blob is not trivially small
    blob = make_tar([file("superagent.toml", '[app]\nname = "art"\n[run]\ncommand = "x"\n'),
                     file("data.bin", payload)])
    sha = hashlib.sha256(blob).hexdigest()
    r = cluster.post(leader, "/api/v1/apps/art/releases", content=blob,
                     params={"deploy": "false"},  # no participants here to deploy to
                     headers={"content-type": "application/gzip"}, timeout=30)
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == sha and r.json()["release"] == "r1"
    holders = [m.id for m in cluster.members
               if (m.data_dir / "artifacts" / "sha256" / sha[:2] / sha).exists()]
    assert len(holders) >= 2, f"blob on {holders} only: not a majority"
    cluster.kill9(leader)
    survivors = [i for i in range(3) if i != leader]
    new = cluster.leader(survivors)
    for i in [new] + [i for i in survivors if i != new]:
        got = cluster.get(i, f"/api/v1/artifacts/{sha}", timeout=30)
        assert got.status_code == 200, (i, got.status_code, got.text[:200])
        assert got.headers["x-superagent-sha256"] == sha
        assert hashlib.sha256(got.content).hexdigest() == sha and got.content == blob

        def recorded(member: int = i) -> bool:
            doc = cluster.get(member, "/api/v1/apps/art/releases").json()
            return [r["sha256"] for r in doc.get("releases", [])] == [sha]
        # A follower reads its own applied state: it learns that the new leader committed
        # the old term's entries with the leader's next append (a heartbeat, ~0.1 s here).
        wait_until(recorded, f"coordinator {i} to list release r1", timeout=FOLLOWER_CATCH_UP)
    for i in survivors:
        m = cluster.members[i]
        assert (m.data_dir / "artifacts" / "sha256" / sha[:2] / sha).read_bytes() == blob


def test_partitioned_leader_stops_leading(cluster: Cluster) -> None:
    """SIGSTOP of both followers: the leader stops calling itself leader within ~3 s;
    SIGCONT makes the cluster healthy again and writable on every member."""
    leader = cluster.leader()
    followers = [i for i in range(3) if i != leader]
    try:
        for i in followers:
            cluster.sigstop(i)
        stopped_at = time.monotonic()

        def demoted() -> bool:
            h = cluster.health(leader)
            return h is not None and h["role"] != "leader"

        wait_until(demoted, "the cut-off leader to step down",
                   timeout=STEP_DOWN_BOUND + 2.0)
        took = time.monotonic() - stopped_at
        print(f"\n[cluster] leader cut off from both followers stepped down after {took:.2f} s")
        assert took < STEP_DOWN_BOUND
        # has_quorum counts TCP connections, which a SIGSTOPped peer's kernel keeps open
        health = cluster.health(leader)
        assert health is not None and not health["ok"] and health["leader"] is None
    finally:
        for i in followers:
            cluster.sigcont(i)
    cluster.wait_ready()
    for i in range(3):
        r = cluster.post(i, "/api/v1/apps", json=manifest(f"healed-{i}"))
        assert r.status_code == 201, (i, r.text)
    cluster.wait_converged()
