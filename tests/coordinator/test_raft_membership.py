"""RaftNode's membership changes in-process: a node joins from a snapshot, records the
members, and a restart with stale peers keeps the recorded ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from superagent.coordinator.errors import RaftError
from superagent.coordinator.raft import MEMBERS_FILE, RaftNode
from tests.coordinator.raftnode_runner import CounterState
from tests.support.ports import free_ports

SECRET = "test-cluster-secret"
DEADLINE = 15.0  # election, snapshot transfer, a membership round, on a busy machine


def counts(node: RaftNode) -> dict[str, int]:
    found: dict[str, int] = node.read_state(lambda s: dict(s.counts))  # type: ignore[attr-defined]
    return found


async def test_a_new_member_catches_up_from_a_snapshot_and_leaves(tmp_path: Path) -> None:
    """A alone commits and compacts its log; B (started with A as peer) is added and gets
    the state from A's snapshot; both record two members; a second add of B is refused;
    B removed, A records one member again and a restart with stale peers keeps it."""
    port_a, port_b = free_ports(2)
    a_addr, b_addr = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    a = RaftNode(a_addr, [], secret=SECRET, data_dir=tmp_path / "a", state=CounterState())
    b = RaftNode(b_addr, [a_addr], secret=SECRET, data_dir=tmp_path / "b",
                 state=CounterState())
    a.start()
    try:
        with trio.fail_after(DEADLINE):
            while not a.is_leader():
                await trio.sleep(0.02)
        for i in range(5):
            await a.propose(json.dumps({"id": str(i), "key": "k"}), 2.0)
        a._running().forceLogCompaction()  # B can only catch up from the snapshot
        with trio.fail_after(DEADLINE):
            while not (tmp_path / "a" / "raft.dump").exists():
                await trio.sleep(0.02)
        b.start()
        await a.change_membership("add", b_addr, DEADLINE)
        assert a.members() == sorted([a_addr, b_addr])
        with trio.fail_after(DEADLINE):
            while counts(b) != {"k": 5}:
                await trio.sleep(0.02)
            while b.members() != sorted([a_addr, b_addr]):
                await trio.sleep(0.02)
        recorded = json.loads((tmp_path / "a" / MEMBERS_FILE).read_text())["members"]
        assert recorded == sorted([a_addr, b_addr])
        await a.propose(json.dumps({"id": "after", "key": "k"}), 5.0)  # a quorum of two
        with pytest.raises(RaftError) as refused:
            await a.change_membership("add", b_addr, DEADLINE)
        assert refused.value.reason == "request_denied"
        await a.change_membership("remove", b_addr, DEADLINE)
        assert a.members() == [a_addr]
    finally:
        b.close()
        a.close()
    # restarted with peers that still name B: the recorded members win
    again = RaftNode(a_addr, [a_addr, b_addr], secret=SECRET, data_dir=tmp_path / "a",
                     state=CounterState())
    again.start()
    try:
        assert again.peers == []
        with trio.fail_after(DEADLINE):
            while not again.is_leader() or counts(again) != {"k": 6}:
                await trio.sleep(0.02)
        assert again.members() == [a_addr]
    finally:
        again.close()
