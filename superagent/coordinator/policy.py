"""Who may do what: the one access policy of the coordinator's API.

Theory of operation: every API token has a *role* and, except an admin's, a set of
*teams*; every app belongs to one team. Every route of ``api.ROUTES`` names the one
*permission* it needs (``apps:read``, ``apps:write``, ``nodes:read``, ...), and the API
asks ``decide(principal, permission, team)`` before running the handler, where ``team``
is the team of the app the route is about (None for a route about no single app: a
list, a node, the cluster). Lists are filtered with ``sees(principal, team)``, so a
token of team A neither reaches nor sees team B's apps.

The roles:

- ``admin``: everything, every team (the token made at cluster init is one).
- ``deployer``: reads the fleet (cluster, nodes, audit), and reads and changes the apps
  of its teams: create, upload/deploy, rollback, cancel, scale, delete. No node writes,
  no tokens, no quotas, no artifacts by hash, no cluster administration (coordinators,
  backups).
- ``viewer``: reads the fleet and the apps of its teams (of every team when it has none).

A token past its ``expires_at`` is no principal at all (``expired``): the API answers 401,
as for a revoked (deleted) one. Everything here is pure: no state, no clock (the caller
passes ``now``), no I/O, so a table of cases tests all of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ADMIN, DEPLOYER, VIEWER = "admin", "deployer", "viewer"
ROLES = (ADMIN, DEPLOYER, VIEWER)
DEFAULT_TEAM = "default"  # the team of apps made before teams, or by an admin naming none

APPS_READ, APPS_WRITE = "apps:read", "apps:write"
NODES_READ, NODES_WRITE = "nodes:read", "nodes:write"
CLUSTER_READ, AUDIT_READ = "cluster:read", "audit:read"
ARTIFACTS_READ, TOKENS_ADMIN, QUOTAS_WRITE = "artifacts:read", "tokens:admin", "quotas:write"
CLUSTER_ADMIN = "cluster:admin"  # change the coordinators, take and restore backups
PERMISSIONS = (APPS_READ, APPS_WRITE, NODES_READ, NODES_WRITE, CLUSTER_READ, AUDIT_READ,
               ARTIFACTS_READ, TOKENS_ADMIN, QUOTAS_WRITE, CLUSTER_ADMIN)

# what each role holds; a scoped permission is further limited to the token's teams
GRANTS: Mapping[str, frozenset[str]] = {
    ADMIN: frozenset(PERMISSIONS),
    DEPLOYER: frozenset({APPS_READ, APPS_WRITE, NODES_READ, CLUSTER_READ, AUDIT_READ}),
    VIEWER: frozenset({APPS_READ, NODES_READ, CLUSTER_READ, AUDIT_READ}),
}
SCOPED = frozenset({APPS_READ, APPS_WRITE})  # about one app: its team must be the token's


@dataclass(frozen=True, kw_only=True)
class Principal:
    """An authenticated API token: its name (the audit log's actor), role and teams
    (empty: every team, for an admin or an unscoped viewer)."""

    name: str
    role: str
    teams: tuple[str, ...] = ()
    expires_at: float | None = None

    @classmethod
    def from_record(cls, name: str, record: Mapping[str, Any]) -> Principal:
        """From a token record of ``ClusterState.tokens``; a record written before roles
        is the admin token's."""
        expires = record.get("expires_at")
        return cls(name=name, role=str(record.get("role", ADMIN)),
                   teams=tuple(record.get("teams", ())),
                   expires_at=None if expires is None else float(expires))


@dataclass(frozen=True, kw_only=True)
class Decision:
    allowed: bool
    reason: str = ""  # why not, for the 403's detail
    missing: str = ""  # the permission (or "team:X") the token lacks


ALLOW = Decision(allowed=True)


def expired(principal: Principal, now: float) -> bool:
    return principal.expires_at is not None and now >= principal.expires_at


def sees(principal: Principal, team: str) -> bool:
    """Whether the token may see (read) things of ``team``."""
    if principal.role == ADMIN or not principal.teams:
        return principal.role in (ADMIN, VIEWER)  # an unscoped deployer sees no team
    return team in principal.teams


def decide(principal: Principal, permission: str, team: str | None = None) -> Decision:
    """May ``principal`` use ``permission`` on something of ``team`` (None: on no single
    app, e.g. a list, which the caller then filters with ``sees``)?"""
    if permission not in PERMISSIONS:
        return Decision(allowed=False, reason=f"unknown permission {permission!r}",
                        missing=permission)
    granted = GRANTS.get(principal.role, frozenset())
    if permission not in granted:
        return Decision(allowed=False, missing=permission,
                        reason=f"token {principal.name!r} (role {principal.role}) lacks"
                               f" {permission}")
    if team is None or permission not in SCOPED or principal.role == ADMIN:
        return ALLOW
    if not sees(principal, team):
        teams = ", ".join(principal.teams) or "none"
        return Decision(allowed=False, missing=f"team:{team}",
                        reason=f"token {principal.name!r} may use {permission} on apps of"
                               f" team(s) {teams}, not of team {team!r}")
    return ALLOW


def creation_team(principal: Principal, requested: str | None) -> str | Decision:
    """The team a new app of ``principal`` belongs to: the one it names, else an admin's
    ``default`` or the token's only team; a Decision when that cannot be chosen."""
    team = requested
    if team is None:
        if principal.role == ADMIN or not principal.teams:
            team = DEFAULT_TEAM
        elif len(principal.teams) == 1:
            team = principal.teams[0]
        else:
            return Decision(allowed=False, missing="team",
                            reason=f"token {principal.name!r} has teams"
                                   f" {', '.join(principal.teams)}: name the app's team")
    decision = decide(principal, APPS_WRITE, team)
    return team if decision.allowed else decision
