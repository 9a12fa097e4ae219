"""Tests for superagent.coordinator.backup and the restore transition (state_admin)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from superagent.coordinator import commands as cmd
from superagent.coordinator.backup import read_backup, write_backup
from superagent.coordinator.errors import BadBackup
from superagent.coordinator.state import ClusterState
from tests.coordinator.helpers import add_release, base, create_app, register

BLOB = b"release tarball bytes"
SHA = hashlib.sha256(BLOB).hexdigest()


def served_state() -> ClusterState:
    """An app with one release (whose blob is BLOB), a node and a token."""
    state = ClusterState()
    for command in (create_app(), add_release(sha256=SHA), register(),
                    cmd.AddToken(**base(), name="admin", sha256="a" * 64)):
        assert state.apply(command.to_json())["ok"]
    return state


def write(tmp_path: Path, state: ClusterState, blobs: dict[str, bytes]) -> Path:
    paths = {}
    for sha, data in blobs.items():
        paths[sha] = tmp_path / sha
        paths[sha].write_bytes(data)
    out = tmp_path / "backup.tar"
    write_backup(out, meta={"taken_at": 1.0}, state_json=state.to_json(), blobs=paths)
    return out


def test_a_backup_round_trips(tmp_path: Path) -> None:
    """What is written is read back: meta, the state's JSON, each blob by its hash."""
    state = served_state()
    found = read_backup(write(tmp_path, state, {SHA: BLOB}), tmp_path / "out", max_blob=1024)
    assert found.meta["format"] == 1 and found.meta["artifacts"] == 1
    assert found.state_json == state.to_json()
    assert found.artifacts[SHA].read_bytes() == BLOB


def tar_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


META = json.dumps({"format": 1}).encode()


@pytest.mark.parametrize(("members", "words"), [
    ({"backup.json": META}, "state.json are required"),
    ({"backup.json": b'{"format": 9}', "state.json": b"{}"}, "unknown backup format"),
    ({"backup.json": META, "state.json": b"{}", "../evil": b""}, "unexpected member"),
    ({"backup.json": META, "state.json": b"not json"}, "state.json"),
    ({"backup.json": META, "state.json": served_state().to_json().encode()},
     "which the backup lacks"),
    ({"backup.json": META, f"artifacts/{SHA}": b"other bytes"}, "does not hash"),
    ({"backup.json": b"[]"}, "not a JSON object"),
    # nested past the parser's recursion limit: bad input, not an internal error
    ({"backup.json": b"[" * 60_000}, "backup.json is not JSON"),
    ({"backup.json": META, "state.json": b"[" * 200_000}, "state.json"),
])
def test_a_bad_backup_is_refused_naming_what_is_wrong(
        tmp_path: Path, members: dict[str, bytes], words: str) -> None:
    """Every refusal is a BadBackup (400) whose message names the member or release."""
    path = tmp_path / "bad.tar"
    path.write_bytes(tar_of(members))
    with pytest.raises(BadBackup, match=words):
        read_backup(path, tmp_path / "out", max_blob=1024)


def test_not_a_tar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.tar"
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(BadBackup, match="not a readable backup"):
        read_backup(path, tmp_path / "out", max_blob=1024)


def test_restore_replaces_an_empty_state_and_keeps_the_restorers_own() -> None:
    """The backup's apps, nodes (down) and tokens; the restoring cluster's coordinators
    and its admin token, renamed beside the backup's."""
    backup = served_state()
    fresh = ClusterState()
    for command in (cmd.AddToken(**base(), name="admin", sha256="b" * 64),
                    cmd.RegisterCoordinator(**base(), coordinator="c9",
                                            api_url="http://10.0.0.9:7100")):
        assert fresh.apply(command.to_json())["ok"]
    result = fresh.apply(cmd.RestoreState(**base(), state=backup.to_json()).to_json())
    assert result["ok"] and result["apps"] == 1 and result["nodes"] == 1, result
    assert set(fresh.apps) == {"hello"} and fresh.releases["hello"][0].sha256 == SHA
    assert all(not node.up for node in fresh.nodes.values())
    assert fresh.tokens["admin"]["sha256"] == "a" * 64
    assert fresh.tokens["admin-restorer"]["sha256"] == "b" * 64
    assert fresh.coordinators == {"c9": "http://10.0.0.9:7100"}
    assert fresh.audit[-1]["type"] == "restore_state"
    again = fresh.apply(cmd.RestoreState(**base(), state=backup.to_json()).to_json())
    assert again["ok"] is False and again["status"] == 409 and "not empty" in again["error"]


def test_coordinator_registry_commands() -> None:
    """AddCoordinator names a Raft address; another id cannot take it; RemoveCoordinator
    forgets both addresses; removing a stranger is a 404."""
    state = ClusterState()
    add = cmd.AddCoordinator(**base(), coordinator="c4", raft_address="10.0.0.4:7110")
    assert state.apply(add.to_json())["ok"] and state.members == {"c4": "10.0.0.4:7110"}
    taken = cmd.AddCoordinator(**base(), coordinator="c5", raft_address="10.0.0.4:7110")
    assert state.apply(taken.to_json())["status"] == 409
    assert "members" in json.loads(state.to_json())
    assert state.apply(cmd.RemoveCoordinator(**base(), coordinator="c4").to_json())["ok"]
    assert state.members == {}
    assert "members" not in json.loads(state.to_json())  # older states keep their digest
    gone = state.apply(cmd.RemoveCoordinator(**base(), coordinator="c4").to_json())
    assert gone["status"] == 404
