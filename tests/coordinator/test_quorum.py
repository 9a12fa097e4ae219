"""Tests for superagent.coordinator.quorum (the safety checks of a membership change) and
the members a Raft node records (raft.read_members / write_members)."""

from __future__ import annotations

from pathlib import Path

import pytest

from superagent.coordinator.errors import (
    BadRequest,
    MembershipRefused,
    RaftError,
    UnknownCoordinator,
)
from superagent.coordinator.quorum import ADD, REMOVE, plan_change
from superagent.coordinator.raft import MEMBERS_FILE, read_members, write_members

THREE = {"c1": "10.0.0.1:7110", "c2": "10.0.0.2:7110", "c3": "10.0.0.3:7110"}


def test_adding_to_a_healthy_cluster_is_planned() -> None:
    """Three live of three: a fourth member is allowed (3 > 4/2)."""
    change = plan_change(kind=ADD, coordinator="c4", address="10.0.0.4:7110",
                         members=THREE, live=set(THREE))
    assert change.members_after == ("c1", "c2", "c3", "c4") and not change.noop


def test_a_lone_coordinator_grows_only_to_a_member_that_answers() -> None:
    """1 -> 2: the new member must count, so its Raft port must answer already."""
    one = {"c1": "10.0.0.1:7110"}
    with pytest.raises(MembershipRefused, match=r"nothing answers at 10\.0\.0\.2:7110 yet"):
        plan_change(kind=ADD, coordinator="c2", address="10.0.0.2:7110", members=one,
                    live={"c1"})
    change = plan_change(kind=ADD, coordinator="c2", address="10.0.0.2:7110", members=one,
                         live={"c1"}, joining_answers=True)
    assert change.members_after == ("c1", "c2")


def test_adding_what_is_there_is_a_noop() -> None:
    """The same id at the same address: a retry after a timeout."""
    change = plan_change(kind=ADD, coordinator="c3", address=THREE["c3"], members=THREE,
                         live=set(THREE))
    assert change.noop


@pytest.mark.parametrize(("coordinator", "address", "live", "expected", "words"), [
    ("c4", "10.0.0.4:7110", {"c1", "c2"}, MembershipRefused, "2 live of 4 members, not a"),
    ("c3", "10.0.0.9:7110", set(THREE), MembershipRefused, "remove it first"),
    ("c4", THREE["c2"], set(THREE), MembershipRefused, "coordinator c2's"),
    ("c4", "no-port", set(THREE), BadRequest, "host:port"),
    ("c4", "10.0.0.4:99999", set(THREE), BadRequest, "port 99999 is not 1..65535"),
    ("c4", "10.0.0.4:0", set(THREE), BadRequest, "port 0 is not 1..65535"),
    ("c4", "a" * 64 + ".example:7110", set(THREE), BadRequest, "not an IP address or"),
    ("c4", "host..example:7110", set(THREE), BadRequest, "not an IP address or"),
    ("c4", "[10.0.0.4]:7110", set(THREE), BadRequest, "not an IP address or"),
    ("bad id!", "10.0.0.4:7110", set(THREE), BadRequest, "does not match"),
])
def test_unsafe_or_malformed_additions_are_refused(
        coordinator: str, address: str, live: set[str], expected: type[Exception],
        words: str) -> None:
    """Each refusal names what is wrong."""
    with pytest.raises(expected, match=words):
        plan_change(kind=ADD, coordinator=coordinator, address=address, members=THREE,
                    live=live)


def test_removing_keeps_a_majority_of_live_members() -> None:
    """Removing the dead member of three is fine; removing a live one while another is
    dead would leave 1 live of 2."""
    after = plan_change(kind=REMOVE, coordinator="c3", address="", members=THREE,
                        live={"c1", "c2"})
    assert after.members_after == ("c1", "c2") and after.address == THREE["c3"]
    with pytest.raises(MembershipRefused, match="1 live of 2"):
        plan_change(kind=REMOVE, coordinator="c2", address="", members=THREE,
                    live={"c1", "c2"})


def test_removing_an_unknown_or_the_last_member_is_refused() -> None:
    """404 for a stranger, 409 for the only member, 400 for an unknown kind."""
    with pytest.raises(UnknownCoordinator):
        plan_change(kind=REMOVE, coordinator="c9", address="", members=THREE, live=set(THREE))
    with pytest.raises(MembershipRefused, match="only member"):
        plan_change(kind=REMOVE, coordinator="c1", address="", members={"c1": "a:1"},
                    live={"c1"})
    with pytest.raises(BadRequest, match="add or remove"):
        plan_change(kind="swap", coordinator="c1", address="", members=THREE, live=set(THREE))


def test_recorded_members_round_trip_and_a_bad_file_is_named(tmp_path: Path) -> None:
    """members.json: absent -> None; written -> read back; garbage -> RaftError naming it."""
    assert read_members(tmp_path) is None
    write_members(tmp_path, ["10.0.0.1:7110", "10.0.0.4:7110"])
    assert read_members(tmp_path) == ["10.0.0.1:7110", "10.0.0.4:7110"]
    (tmp_path / MEMBERS_FILE).write_text('{"members": "c1"}')
    with pytest.raises(RaftError, match=r"members\.json: no list"):
        read_members(tmp_path)
