"""Tests for superagent.coordinator.trust: join tokens and node credentials in the state."""

from __future__ import annotations

import json
from typing import Any

from superagent.coordinator import commands as cmd
from superagent.coordinator.state import ClusterState
from superagent.rpc.credentials import (
    credential_hash,
    new_credential,
    new_join_token,
    signal_key,
)
from tests.coordinator.helpers import base, register

JOIN = "a" * 64
CRED = "b" * 64
KEY = "c" * 64


def apply(state: ClusterState, command: cmd.Command) -> dict[str, Any]:
    return state.apply(command.to_json())


def token(state: ClusterState, *, uses: int = 1, node: str = "", at: float = 1000.0,
          expires_at: float = 2000.0, sha256: str = JOIN) -> dict[str, Any]:
    return apply(state, cmd.AddJoinToken(**base(at=at), sha256=sha256, expires_at=expires_at,
                                         uses=uses, node=node))


def enrol(state: ClusterState, node: str = "n1", *, cred: str = CRED, at: float = 1001.0,
          join: str = JOIN, key: str | None = None) -> dict[str, Any]:
    return apply(state, cmd.EnrolNode(**base(key=key, at=at), node=node, join_sha256=join,
                                      credential_sha256=cred, signal_key=KEY))


def test_a_one_use_token_enrols_one_machine() -> None:
    """The token is spent by the first enrolment; a second machine is refused (401)."""
    state = ClusterState()
    assert token(state)["ok"]
    assert enrol(state)["ok"]
    assert state.trust.node_of(CRED) == ("n1", False)
    assert state.trust.signal_key("n1") == KEY
    refused = enrol(state, "n2", cred="d" * 64)
    assert (refused["status"], refused["code"]) == (401, "join_refused")
    assert "unknown or already used" in refused["error"]


def test_an_enrolment_repeated_with_the_same_credential_is_answered_again() -> None:
    """A retry after a lost answer (same credential) succeeds without a token."""
    state = ClusterState()
    token(state)
    assert enrol(state)["ok"]
    again = enrol(state)
    assert again["ok"] and again.get("repeated"), again


def test_an_expired_token_is_refused_and_says_so() -> None:
    state = ClusterState()
    token(state, expires_at=1500.0)
    refused = enrol(state, at=1500.0)
    assert refused["code"] == "join_refused" and "expired" in refused["error"]
    assert state.trust.node_of(CRED) == (None, False)


def test_a_token_for_one_node_enrols_only_it_and_may_replace_its_credential() -> None:
    state = ClusterState()
    token(state, uses=0)
    assert enrol(state)["ok"]
    taken = enrol(state, cred="d" * 64, key="other")
    assert taken["code"] == "join_refused" and "already enrolled" in taken["error"]
    token(state, node="n1", sha256="e" * 64)
    wrong = enrol(state, "n2", join="e" * 64, cred="f" * 64)
    assert wrong["code"] == "join_refused" and "issued for node 'n1'" in wrong["error"]
    assert enrol(state, join="e" * 64, cred="f" * 64)["ok"]
    assert state.trust.node_of("f" * 64) == ("n1", False)
    assert state.trust.node_of(CRED) == (None, False)


def test_a_token_with_uses_counts_them_down() -> None:
    state = ClusterState()
    token(state, uses=2)
    assert enrol(state, "n1", cred="1" * 64)["ok"]
    assert enrol(state, "n2", cred="2" * 64)["ok"]
    assert enrol(state, "n3", cred="3" * 64)["code"] == "join_refused"


def test_a_revoked_node_is_down_cannot_come_up_or_register_until_enrolled_again() -> None:
    state = ClusterState()
    token(state)
    enrol(state)
    assert apply(state, register("n1"))["ok"]
    assert apply(state, cmd.RevokeNode(**base(), node="n1"))["ok"]
    assert state.trust.node_of(CRED) == ("n1", True)
    assert state.trust.signal_key("n1") is None
    assert state.nodes["n1"].up is False
    assert apply(state, cmd.NodeUp(**base(), node="n1"))["code"] == "node_revoked"
    assert apply(state, register("n1"))["code"] == "node_revoked"
    token(state, node="n1", sha256="e" * 64, at=1002.0)
    assert enrol(state, join="e" * 64, cred="f" * 64, at=1003.0)["ok"]
    assert apply(state, register("n1"))["ok"]
    assert state.nodes["n1"].up is True


def test_revoking_an_unknown_node_is_a_404() -> None:
    assert apply(ClusterState(), cmd.RevokeNode(**base(), node="ghost"))["status"] == 404


def test_trust_survives_a_snapshot_and_an_older_snapshot_has_none() -> None:
    state = ClusterState()
    token(state, uses=0)
    enrol(state)
    restored = ClusterState.from_json(state.to_json())
    assert restored.digest() == state.digest()
    assert restored.trust.node_of(CRED) == ("n1", False)
    assert enrol(restored, "n2", cred="2" * 64)["ok"]  # handlers use the restored trust
    doc = state.to_doc()
    del doc["join_tokens"], doc["credentials"]
    older = ClusterState.from_json(json.dumps(doc))
    assert older.trust.credentials == {} and older.trust.join_tokens == {}


def test_the_state_keeps_only_hashes_of_credentials() -> None:
    """What a participant holds never enters the replicated state."""
    state = ClusterState()
    join, credential = new_join_token(), new_credential()
    token(state, sha256=credential_hash(join))
    assert apply(state, cmd.EnrolNode(**base(at=1001.0), node="n1",
                                      join_sha256=credential_hash(join),
                                      credential_sha256=credential_hash(credential),
                                      signal_key=signal_key(credential)))["ok"]
    text = state.to_json()
    assert join not in text and credential not in text
