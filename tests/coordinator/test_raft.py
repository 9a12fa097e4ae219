"""Integration tests of superagent/coordinator/raft.py: a real 3-node pysyncobj cluster on
loopback, one process per node (tests/coordinator/raftnode_runner.py), driven over stdin/stdout."""

from __future__ import annotations

import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from superagent.coordinator.errors import NotLeader
from superagent.coordinator.raft import (
    APPEND_ENTRIES_PERIOD,
    CONNECTION_TIMEOUT,
    ELECTION_TIMEOUT,
    RaftNode,
    derive_password,
)
from superagent.coordinator.service import CoordinatorConfig
from tests.coordinator.helpers import FAST_ELECTION
from tests.coordinator.raftnode_runner import CounterState
from tests.support.ports import free_port, free_ports
from tests.support.procs import LoggedProcess
from tests.support.wait import wait_until

SECRET = "test-cluster-secret"
REPLY_TIMEOUT = 10.0
ELECTION_DEADLINE = 10.0

pytestmark = pytest.mark.slow


class Node(LoggedProcess):
    """One runner process; ``request`` sends a JSON line and waits for its reply. Its
    stderr (the node's log) goes to ``data_dir/stderr.log``, shown when a test fails."""

    def __init__(self, address: str, peers: list[str], data_dir: Path, secret: str) -> None:
        super().__init__(f"Node {address}", data_dir / "stderr.log")
        self.address = address
        data_dir.mkdir(parents=True, exist_ok=True)
        self.start(
            [sys.executable, "-m", "tests.coordinator.raftnode_runner", "--self", address,
             "--peers", ",".join(peers), "--secret", secret, "--data", str(data_dir)],
            pipes=True)
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.lines.get(timeout=REPLY_TIMEOUT)
        assert json.loads(ready) == {"ready": True}, ready

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(b"")

    def request(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        line = self.lines.get(timeout=REPLY_TIMEOUT)
        if not line:
            raise ConnectionError(f"{self} exited")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def propose(self, cid: str, key: str, timeout: float = 2.0) -> dict[str, Any]:
        return self.request("propose", cmd={"id": cid, "key": key}, timeout=timeout)

    def shutdown(self) -> None:
        """SIGCONT (in case it was stopped), close stdin (the runner's signal to close the
        node and exit), then SIGKILL after a grace period."""
        assert self.proc is not None
        if self.alive():
            self.sigcont()
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.close()


class Cluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.addresses = [f"127.0.0.1:{port}" for port in free_ports(size)]
        self.nodes: dict[str, Node] = {}

    def start(self, address: str, secret: str = SECRET) -> Node:
        peers = [a for a in self.addresses if a != address]
        index = self.addresses.index(address)
        node = Node(address, peers, self.root / f"n{index}", secret)
        self.nodes[address] = node
        return node

    def start_all(self) -> None:
        for address in self.addresses:
            self.start(address)

    def live(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.alive()]

    def leader(self, among: list[Node] | None = None, deadline: float = ELECTION_DEADLINE) -> Node:
        """Wait until exactly one of ``among`` is leader and the others agree on it."""
        nodes = among if among is not None else self.live()

        def probe() -> Node | None:
            statuses = [n.request("status") for n in nodes]
            leaders = [n for n, s in zip(nodes, statuses, strict=True) if s["is_leader"]]
            if len(leaders) != 1:
                return None
            if all(s["leader"] == leaders[0].address for s in statuses):
                return leaders[0]
            return None

        return wait_until(probe, "a leader", timeout=deadline)

    def stop_all(self) -> None:
        for node in self.nodes.values():
            node.shutdown()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        c.start_all()
        yield c
    finally:
        c.stop_all()


def wait_converged(nodes: list[Node], deadline: float = 5.0) -> str:
    """Wait until every node has the same state digest; return it."""

    def probe() -> str | None:
        digests = {n.request("digest")["digest"] for n in nodes}
        return digests.pop() if len(digests) == 1 else None

    return wait_until(probe, "equal digests", timeout=deadline)


def test_elect_commit_not_leader_and_latency(cluster: Cluster) -> None:
    """3 nodes elect a leader; its proposals commit everywhere; followers raise NotLeader."""
    leader = cluster.leader()
    for i in range(20):
        reply = leader.propose(f"c{i}", f"k{i % 5}")
        assert "result" in reply, reply
    again = leader.propose("c0", "k0")  # same idempotency id: applied once
    assert again["result"]["duplicate"] is True
    digest = wait_converged(cluster.live())
    counts = leader.request("counts")["counts"]
    assert counts == {f"k{j}": 4 for j in range(5)}, digest
    for follower in cluster.live():
        if follower is not leader:
            assert follower.propose("f1", "kf") == {
                "error": "not_leader", "leader": leader.address}
    bench = leader.request("bench", n=200)["latencies"]
    ms = sorted(x * 1000 for x in bench)
    p50, p99 = statistics.median(ms), ms[int(len(ms) * 0.99) - 1]
    print(f"\n[raft] commit latency on leader over {len(ms)} proposals: "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {ms[-1]:.2f} ms")


def test_kill_leader_during_proposals(cluster: Cluster) -> None:
    """kill -9 of the leader mid-stream: new leader fast, every acked command exactly once."""
    leader = cluster.leader()
    acked: list[str] = []
    for i in range(200):
        if i == 100:
            leader.kill9()
            killed_at = time.monotonic()
        try:
            reply = leader.propose(f"c{i}", f"k{i}")
        except ConnectionError:
            break
        if "result" in reply:
            acked.append(f"k{i}")
    assert len(acked) >= 100
    survivors = cluster.live()
    new_leader = cluster.leader(survivors, deadline=5.0)
    failover = time.monotonic() - killed_at
    print(f"\n[raft] new leader {new_leader.address} observed {failover:.2f} s after kill -9")
    assert failover < 4.0
    assert "result" in new_leader.propose("after", "after")
    wait_converged(survivors)
    for node in survivors:
        counts = node.request("counts")["counts"]
        assert all(counts.get(k) == 1 for k in acked), [k for k in acked if counts.get(k) != 1]


def test_leader_without_quorum_steps_down(cluster: Cluster) -> None:
    """SIGSTOP both followers: the old leader stops calling itself leader within ~3 s."""
    leader = cluster.leader()
    followers = [n for n in cluster.live() if n is not leader]
    try:
        for f in followers:
            f.sigstop()
        stopped_at = time.monotonic()
        wait_until(lambda: not leader.request("status")["is_leader"],
                   "the leader to step down", timeout=3.5)
        print(f"\n[raft] isolated leader stepped down after {time.monotonic() - stopped_at:.2f} s")
        assert leader.propose("x", "x")["error"] == "not_leader"
    finally:
        for f in followers:
            f.sigcont()
    cluster.leader()


def test_restart_keeps_acknowledged_state(cluster: Cluster) -> None:
    """Restarting all three nodes on the same data dirs keeps the acknowledged state."""
    leader = cluster.leader()
    for i in range(30):
        assert "result" in leader.propose(f"c{i}", f"k{i % 3}")
    before = wait_converged(cluster.live())
    cluster.stop_all()
    cluster.start_all()
    leader = cluster.leader()
    assert wait_converged(cluster.live()) == before
    assert leader.request("counts")["counts"] == {"k0": 10, "k1": 10, "k2": 10}


def test_wrong_password_cannot_join(cluster: Cluster) -> None:
    """A member restarted with a wrong secret never joins; the other two keep working."""
    cluster.leader()
    outsider_address = cluster.addresses[2]
    cluster.nodes[outsider_address].shutdown()
    outsider = cluster.start(outsider_address, secret="wrong-secret")
    good = [cluster.nodes[a] for a in cluster.addresses[:2]]
    leader = cluster.leader(good)
    for i in range(10):
        assert "result" in leader.propose(f"c{i}", f"k{i}")
        reply = outsider.propose(f"bad{i}", "bad")
        assert reply["error"] == "not_leader", reply
    assert outsider.request("status")["leader"] is None
    assert outsider.request("counts")["counts"] == {}
    wait_converged(good)
    assert "bad" not in leader.request("counts")["counts"]


def test_password_derivation_is_stable_and_secret_dependent() -> None:
    """The Raft password is a hex HMAC of the secret, stable across calls."""
    assert derive_password("a") == derive_password("a")
    assert derive_password("a") != derive_password("b")
    assert len(derive_password("a")) == 64


async def test_single_node_propose_in_process(tmp_path: Path) -> None:
    """A one-node cluster in-process: propose bridges into trio; snapshot hooks round-trip."""
    node = RaftNode(f"127.0.0.1:{free_port()}", [], secret=SECRET, data_dir=tmp_path,
                    state=CounterState(), election_timeout=FAST_ELECTION)
    node.start()
    try:
        with trio.fail_after(ELECTION_DEADLINE):
            while not node.is_leader():
                await trio.sleep(0.05)
        result = await node.propose(json.dumps({"id": "1", "key": "a"}), 2.0)
        assert result == {"key": "a", "value": 1}
        status = node.status()
        assert status["is_leader"] and status["has_quorum"] and status["last_applied"] >= 1
        dump = str(tmp_path / "test.dump")
        node._write_dump(dump, ((b"\x00cmd", 5, 1), (b"\x01", 4, 1), set()))
        last, prev, cluster_nodes = node._read_dump(dump)
        assert (last, prev, cluster_nodes) == ((b"\x00cmd", 5, 1), (b"\x01", 4, 1), set())
        assert node.read_state(lambda s: s.digest()) == CounterState(  # type: ignore[attr-defined]
            {"a": 1}, {"1": {"key": "a", "value": 1}}).digest()
        assert os.path.exists(dump)
        for i in range(2, 5):
            await node.propose(json.dumps({"id": str(i), "key": "b"}), 2.0)
        node._running().forceLogCompaction()  # the real pysyncobj path through our hooks
        with trio.fail_after(5):
            while not (tmp_path / "raft.dump").exists():
                await trio.sleep(0.05)
        assert json.loads((tmp_path / "raft.dump").read_text())["format"] == 1
    finally:
        node.close()
    again = RaftNode(node.self_address, [], secret=SECRET, data_dir=tmp_path,
                     state=CounterState(), election_timeout=FAST_ELECTION)
    again.start()
    try:
        with trio.fail_after(ELECTION_DEADLINE):
            while again.read_state(lambda s: s.counts) != {"a": 1, "b": 3}:  # type: ignore[attr-defined]
                await trio.sleep(0.05)
    finally:
        again.close()


async def test_single_node_commits_without_waiting_for_a_tick(tmp_path: Path) -> None:
    """Alone, a leader commits a proposal at once, not one tick period (50 ms) later."""
    node = RaftNode(f"127.0.0.1:{free_port()}", [], secret=SECRET, data_dir=tmp_path,
                    state=CounterState(), election_timeout=FAST_ELECTION)
    node.start()
    try:
        with trio.fail_after(ELECTION_DEADLINE):
            while not node.is_leader():
                await trio.sleep(0.05)
        proposals = 20
        started = time.perf_counter()
        for i in range(proposals):
            await node.propose(json.dumps({"id": str(i), "key": "a"}), 2.0)
        took = time.perf_counter() - started
        # Each proposal follows the previous commit, so waiting for the tick would cost a
        # whole tick each (20 x 50 ms = 1 s); at once they take a few ms, more when the disk
        # is busy (a journal write each), which the bound leaves room for.
        assert took < proposals * 0.05 * 0.8, f"{proposals} commits took {took:.3f} s"
        assert node.read_state(lambda s: s.counts) == {"a": proposals}  # type: ignore[attr-defined]
    finally:
        node.close()


async def test_follower_raises_not_leader_in_process(tmp_path: Path) -> None:
    """A node that cannot reach its peers has no leader: propose raises NotLeader(None)."""
    peers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    node = RaftNode(f"127.0.0.1:{free_port()}", peers, secret=SECRET, data_dir=tmp_path,
                    state=CounterState())
    node.start()
    try:
        with pytest.raises(NotLeader) as info:
            await node.propose("{}", 1.0)
        assert info.value.leader is None
    finally:
        node.close()


async def test_the_election_timeout_is_pysyncobjs_unless_set(tmp_path: Path) -> None:
    """By default a coordinator's election timeout is pysyncobj's own (so is what it is
    checked against); a node given shorter bounds leads alone within them; bounds that
    pysyncobj would refuse are refused with what is wrong."""
    from pysyncobj import SyncObjConf

    conf = SyncObjConf()
    assert (conf.raftMinTimeout, conf.raftMaxTimeout) == ELECTION_TIMEOUT
    assert conf.appendEntriesPeriod == APPEND_ENTRIES_PERIOD
    assert conf.connectionTimeout == CONNECTION_TIMEOUT
    default = CoordinatorConfig(id="c1", peers={"c1": "127.0.0.1:1"}, api=("127.0.0.1", 1),
                                data_dir=tmp_path, secret=SECRET)
    assert default.election_timeout == ELECTION_TIMEOUT
    for bad in ((0.3, 1.0), (0.5, 0.5), (1.0, 0.5), (0.4, 3.6), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="election timeout"):
            RaftNode("127.0.0.1:1", [], secret=SECRET, data_dir=tmp_path / "bad",
                     state=CounterState(), election_timeout=bad)
    node = RaftNode(f"127.0.0.1:{free_port()}", [], secret=SECRET, data_dir=tmp_path / "n",
                    state=CounterState(), election_timeout=FAST_ELECTION)
    started = time.monotonic()
    node.start()
    try:
        with trio.fail_after(ELECTION_DEADLINE):
            while not node.is_leader():
                await trio.sleep(0.01)
        elected = time.monotonic() - started
        assert elected >= FAST_ELECTION[0], elected  # not sooner than the bound
    finally:
        node.close()


def test_importing_raft_leaves_the_socket_module_alone() -> None:
    """pysyncobj's import replaces socket.inet_ntop; raft.py must put it back."""
    import superagent.coordinator.raft  # noqa: F401

    packed = socket.inet_pton(socket.AF_INET6, "::1")
    assert socket.inet_ntop(socket.AF_INET6, packed) == "::1"
    assert socket.inet_ntop(socket.AF_INET, socket.inet_aton("127.0.0.1")) == "127.0.0.1"



async def test_cluster_state_is_replicated_through_a_raft_node(tmp_path: Path) -> None:
    """The real ClusterState behind a RaftNode: commands commit, repeats apply once, and the
    state survives a restart from the journal."""
    from superagent.coordinator.state import ClusterState
    from tests.coordinator.helpers import create_app, register

    node = RaftNode(f"127.0.0.1:{free_port()}", [], secret=SECRET, data_dir=tmp_path,
                    state=ClusterState(), election_timeout=FAST_ELECTION)
    node.start()
    try:
        with trio.fail_after(ELECTION_DEADLINE):
            while not node.is_leader():
                await trio.sleep(0.05)
        command = create_app("hello").to_json()
        created = await node.propose(command, 2.0)
        assert created["ok"] is True, created
        again = await node.propose(command, 2.0)  # a client retrying after a timeout
        assert again["repeated"] is True
        other = await node.propose(create_app("hello").to_json(), 2.0)  # a new key
        assert other["ok"] is False and other["status"] == 409
        assert (await node.propose(register("n1").to_json(), 2.0))["ok"] is True
        digest = node.read_state(lambda s: s.digest())  # type: ignore[attr-defined]
    finally:
        node.close()
    restarted = RaftNode(node.self_address, [], secret=SECRET, data_dir=tmp_path,
                         state=ClusterState(), election_timeout=FAST_ELECTION)
    restarted.start()
    try:
        with trio.fail_after(ELECTION_DEADLINE):
            while restarted.read_state(lambda s: s.digest()) != digest:  # type: ignore[attr-defined]
                await trio.sleep(0.05)
        assert restarted.read_state(lambda s: sorted(s.apps)) == ["hello"]  # type: ignore[attr-defined]
    finally:
        restarted.close()
