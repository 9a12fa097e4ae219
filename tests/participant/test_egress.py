"""Tests of ``superagent.participant.egress``: when an instance's user gets its app's
egress group. Setting the group up for real (root, groupadd, nft) is tested in
``test_permissions`` and ``test_agent_permissions``."""

from __future__ import annotations

import dataclasses

import pytest

from superagent.participant import egress
from superagent.participant.errors import IsolationError
from superagent.participant.isolation import AppUser
from superagent.participant.permissions import PermissionSupport

USER = AppUser(name="sa-shop", uid=990, gid=990, switched=True)
ENFORCEABLE = PermissionSupport(network_problem=None, filesystem_problem=None, table="t")


@pytest.fixture
def admitted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Records admissions instead of creating groups; gid 4242 for every app."""
    calls: list[tuple[str, str]] = []

    def admit(app: str, table: str, legacy_gid: int | None = None) -> int:
        calls.append((app, table))
        return 4242

    monkeypatch.setattr(egress, "admit_app", admit)
    monkeypatch.setattr(egress, "admit_gids", lambda *args, **kwargs: None)
    return calls


async def test_a_loopback_only_app_gets_its_egress_group(
        admitted: list[tuple[str, str]]) -> None:
    """Only a loopback-only app's own user, on an agent that can enforce it, is given
    the group, once: a user that has it already keeps it (its gid is put back in the
    set: see below)."""
    user = await egress.loopback_user(USER, app="shop", network="loopback",
                                      support=ENFORCEABLE)
    assert user is not None and user.loopback_gid == 4242 and admitted == [("shop", "t")]
    assert await egress.loopback_user(user, app="shop", network="loopback",
                                      support=ENFORCEABLE) is user
    unsupported = PermissionSupport(network_problem="no nft", filesystem_problem=None)
    for plain, network, support in ((USER, "any", ENFORCEABLE), (USER, "loopback", None),
                                    (USER, "loopback", unsupported),
                                    (AppUser(name="root", uid=0, gid=0, switched=False),
                                     "loopback", ENFORCEABLE)):
        assert await egress.loopback_user(plain, app="shop", network=network,
                                          support=support) is plain
    assert await egress.loopback_user(None, app="shop", network="loopback",
                                      support=ENFORCEABLE) is None
    assert len(admitted) == 1


async def test_a_group_that_cannot_be_set_up_leaves_the_user_unchanged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing groupadd or nft leaves the user as it was: the instance starts and its
    sandbox reports the network permission as not enforced."""
    def fail(app: str, table: str, legacy_gid: int | None = None) -> int:
        raise IsolationError("groupadd failed", app=app)

    monkeypatch.setattr(egress, "admit_app", fail)
    assert await egress.loopback_user(USER, app="shop", network="loopback",
                                      support=ENFORCEABLE) is USER


async def test_a_user_with_its_group_is_put_back_in_the_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cold start reuses the user of the app's last start, egress group included. A
    firewall reload while the app was idle deleted the set its gid was in (and the
    agent's check only puts back the groups of running instances): the gid goes into the
    set again before the instance starts, or, when it cannot, the instance starts with
    its app's group and its permission reported as not enforced, never unrestricted
    while reported enforced."""
    loaded: list[tuple[str, tuple[int, ...], int | None]] = []
    problem: list[str | None] = [None]

    def admit_gids(table: str, gids: tuple[int, ...], *,
                   legacy_gid: int | None = None) -> str | None:
        loaded.append((table, tuple(gids), legacy_gid))
        return problem[0]

    monkeypatch.setattr(egress, "admit_gids", admit_gids)
    user = dataclasses.replace(USER, loopback_gid=4243)
    support = dataclasses.replace(ENFORCEABLE, legacy_gid=77)
    assert await egress.loopback_user(user, app="shop", network="loopback",
                                      support=support) is user
    assert loaded == [("t", (4243,), 77)]
    problem[0] = "nft refused"
    unenforced = await egress.loopback_user(user, app="shop", network="loopback",
                                            support=support)
    assert unenforced is not None and unenforced.loopback_gid is None
    assert await egress.loopback_user(user, app="shop", network="any",
                                      support=support) is user
    assert len(loaded) == 2
