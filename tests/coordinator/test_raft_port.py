"""The Raft port: bound to the configured address only, and closed to anyone without the
coordinators' secret before anything they send is unpickled (real processes)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from superagent.coordinator.raft import derive_password
from superagent.rpc.credentials import (
    credential_hash,
    new_credential,
    new_join_token,
    signal_key,
)
from tests.coordinator.test_raft import Node
from tests.support.ports import free_port
from tests.support.raftport import HANG_UP_WAIT, probe

SECRET = "raft-port-coordinators-secret"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    address = f"127.0.0.1:{free_port()}"
    running = Node(address, [], tmp_path / "node", SECRET)
    try:
        yield running
    finally:
        running.shutdown()


def participant_keys() -> list[str]:
    """Everything a participant holds, and the Raft passwords one would derive from it."""
    credential, token = new_credential(), new_join_token()
    raw = [credential, signal_key(credential), credential_hash(credential), token]
    return raw + [derive_password(k) for k in raw]


def test_the_raft_port_binds_only_the_configured_address(node: Node) -> None:
    """--raft 127.0.0.1:P listens on 127.0.0.1 only: another loopback address of the
    machine is refused (pysyncobj alone would listen on 0.0.0.0)."""
    port = int(node.address.rsplit(":", 1)[1])
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


def test_a_participant_credential_never_reaches_the_unpickler(node: Node,
                                                              tmp_path: Path) -> None:
    """A frame encrypted with anything a participant has is dropped (connection closed)
    before unpickling: the pickle's side effect never happens."""
    for index, key in enumerate(participant_keys()):
        marker = tmp_path / f"ran-{index}"
        assert probe(node.address, key, marker, kept_open=HANG_UP_WAIT) == "closed"
        assert not marker.exists(), f"key {index} got a pickle unpickled"


def test_the_coordinators_secret_does_reach_it(node: Node, tmp_path: Path) -> None:
    """Control: the same frame encrypted with the coordinators' password is unpickled (so
    the test above would see a participant that could get through)."""
    marker = tmp_path / "ran"
    assert probe(node.address, derive_password(SECRET), marker) == "open"
    assert marker.is_dir()
