"""Tests for superagent.coordinator.policy: every role, permission and scope, as a table."""

from __future__ import annotations

import pytest

from superagent.coordinator import policy as p
from superagent.coordinator.policy import Decision, Principal, creation_team, decide, sees

ADMIN = Principal(name="root", role=p.ADMIN)
SHOP = Principal(name="ci-shop", role=p.DEPLOYER, teams=("shop",))
TWO = Principal(name="ci-two", role=p.DEPLOYER, teams=("shop", "blog"))
WATCH_SHOP = Principal(name="watch-shop", role=p.VIEWER, teams=("shop",))
WATCH_ALL = Principal(name="watch", role=p.VIEWER)
UNSCOPED = Principal(name="odd", role=p.DEPLOYER)  # the state refuses it; deny anyway
NOBODY = Principal(name="old", role="superuser")  # an unknown role holds nothing

Y, N = True, False
CASES = [  # principal, permission, team, allowed, missing
    (ADMIN, perm, team, Y, "") for perm in p.PERMISSIONS for team in (None, "shop", "blog")
] + [
    (SHOP, p.APPS_READ, None, Y, ""),
    (SHOP, p.APPS_READ, "shop", Y, ""),
    (SHOP, p.APPS_READ, "blog", N, "team:blog"),
    (SHOP, p.APPS_WRITE, "shop", Y, ""),
    (SHOP, p.APPS_WRITE, "blog", N, "team:blog"),
    (SHOP, p.APPS_WRITE, None, Y, ""),
    (SHOP, p.NODES_READ, None, Y, ""),
    (SHOP, p.NODES_WRITE, None, N, p.NODES_WRITE),
    (SHOP, p.CLUSTER_READ, None, Y, ""),
    (SHOP, p.AUDIT_READ, None, Y, ""),
    (SHOP, p.ARTIFACTS_READ, None, N, p.ARTIFACTS_READ),
    (SHOP, p.TOKENS_ADMIN, None, N, p.TOKENS_ADMIN),
    (SHOP, p.QUOTAS_WRITE, "shop", N, p.QUOTAS_WRITE),
    (TWO, p.APPS_WRITE, "blog", Y, ""),
    (TWO, p.APPS_WRITE, "default", N, "team:default"),
    (WATCH_SHOP, p.APPS_READ, "shop", Y, ""),
    (WATCH_SHOP, p.APPS_READ, "blog", N, "team:blog"),
    (WATCH_SHOP, p.APPS_WRITE, "shop", N, p.APPS_WRITE),
    (WATCH_SHOP, p.APPS_WRITE, None, N, p.APPS_WRITE),
    (WATCH_SHOP, p.NODES_READ, None, Y, ""),
    (WATCH_SHOP, p.NODES_WRITE, None, N, p.NODES_WRITE),
    (WATCH_SHOP, p.TOKENS_ADMIN, None, N, p.TOKENS_ADMIN),
    (WATCH_ALL, p.APPS_READ, "blog", Y, ""),
    (WATCH_ALL, p.APPS_READ, "shop", Y, ""),
    (WATCH_ALL, p.AUDIT_READ, None, Y, ""),
    (WATCH_ALL, p.APPS_WRITE, "shop", N, p.APPS_WRITE),
    (UNSCOPED, p.APPS_WRITE, "default", N, "team:default"),
    (NOBODY, p.APPS_READ, None, N, p.APPS_READ),
    (ADMIN, "apps:fly", None, N, "apps:fly"),
]


@pytest.mark.parametrize(("principal", "permission", "team", "allowed", "missing"), CASES,
                         ids=lambda v: getattr(v, "name", str(v)))
def test_decide(principal: Principal, permission: str, team: str | None, allowed: bool,
                missing: str) -> None:
    decision = decide(principal, permission, team)
    assert (decision.allowed, decision.missing) == (allowed, missing)
    if not allowed:
        assert principal.name in decision.reason or permission in decision.reason
        assert missing.removeprefix("team:") in decision.reason


@pytest.mark.parametrize(("principal", "team", "seen"), [
    (ADMIN, "shop", Y), (ADMIN, "default", Y), (SHOP, "shop", Y), (SHOP, "blog", N),
    (TWO, "blog", Y), (WATCH_SHOP, "default", N), (WATCH_ALL, "default", Y),
    (UNSCOPED, "default", N), (NOBODY, "shop", N)])
def test_sees(principal: Principal, team: str, seen: bool) -> None:
    assert sees(principal, team) is seen


@pytest.mark.parametrize(("principal", "requested", "expected"), [
    (ADMIN, None, "default"), (ADMIN, "blog", "blog"),
    (SHOP, None, "shop"), (SHOP, "shop", "shop"), (SHOP, "blog", "team:blog"),
    (TWO, None, "team"), (TWO, "blog", "blog"),
    (WATCH_ALL, None, p.APPS_WRITE), (WATCH_SHOP, "shop", p.APPS_WRITE)])
def test_creation_team(principal: Principal, requested: str | None, expected: str) -> None:
    found = creation_team(principal, requested)
    assert (found.missing if isinstance(found, Decision) else found) == expected


def test_expiry_and_old_records() -> None:
    old = Principal.from_record("admin", {"sha256": "ab" * 32, "created_at": 1.0})
    assert (old.role, old.teams, old.expires_at) == (p.ADMIN, (), None)
    assert not p.expired(old, 1e12)
    record = {"sha256": "ab" * 32, "role": "viewer", "teams": ["shop"], "expires_at": 100}
    viewer = Principal.from_record("v", record)
    assert (viewer.role, viewer.teams) == (p.VIEWER, ("shop",))
    assert not p.expired(viewer, 99.9)
    assert p.expired(viewer, 100.0)
