"""The agent's side of the manifest's ``[permissions]``: detection and the egress table.

What the machine can enforce is detected when the first instance asks for a permission
(``permission_support``), so an agent whose apps ask for none never touches nftables or
groups. Before an instance of a loopback-only app starts, ``loopback_user`` gives its
user the app's egress group, created and added to the table's set first (so the first
packet is already matched). A firewall reload drops the host-wide nftables egress table;
``keep_egress_table`` (a task of the agent's nursery) puts it back every
EGRESS_CHECK_PERIOD, with the egress groups of this agent's instances: each agent
restores its own entries and never removes another's (see ``nftegress``). An instance
adopted after an agent restart has its group put back in the set at once (``readmit``):
the table may have been deleted while no agent ran.
"""

from __future__ import annotations

import dataclasses
import functools

import structlog
import trio

from superagent.manifest import PermissionsSpec
from superagent.participant.agentview import AgentView
from superagent.participant.errors import IsolationError
from superagent.participant.isolation import AppUser, ensure_loopback_group
from superagent.participant.nftegress import admit_gids
from superagent.participant.permissions import (
    EGRESS_CHECK_PERIOD,
    PermissionSupport,
    detect_permissions,
    restore_egress_table,
)

log = structlog.get_logger("superagent.participant")


async def permission_support(agent: AgentView, wanted: PermissionsSpec
                             ) -> PermissionSupport | None:
    if agent.permissions is None and wanted != PermissionsSpec():
        agent.permissions = await trio.to_thread.run_sync(functools.partial(
            detect_permissions, group=agent.config.loopback_group,
            table=agent.config.egress_table))
    return agent.permissions


def admit_app(app: str, table: str, legacy_gid: int | None = None) -> int:
    """The gid of ``app``'s egress group, created when missing and added to ``table``'s
    set (the table is loaded again if a firewall reload deleted it; ``legacy_gid``: see
    ``PermissionSupport``). Raises ``IsolationError``. Blocking."""
    gid = ensure_loopback_group(app)
    problem = admit_gids(table, (gid,), legacy_gid=legacy_gid)
    if problem is not None:
        raise IsolationError(problem, app=app)
    return gid


async def loopback_user(user: AppUser | None, *, app: str, network: str,
                        support: PermissionSupport | None) -> AppUser | None:
    """``user`` with its app's egress group, in the egress set, when the app is
    loopback-only and the agent can enforce it; unchanged otherwise, or when the group
    cannot be set up (logged; the instance then starts with the permission reported as
    not enforced).

    A user that has the group already (a cold start reuses the last start's) has it put
    back in the set: a firewall reload while the app was idle deleted it, and the agent's
    check only restores the groups of running instances. When that fails the instance
    starts without the group, reported as not enforced."""
    if (user is None or not user.switched or network == "any" or support is None
            or support.network_problem is not None):
        return user
    if user.loopback_gid is not None:
        problem = await trio.to_thread.run_sync(functools.partial(
            admit_gids, support.table, (user.loopback_gid,), legacy_gid=support.legacy_gid))
        if problem is None:
            return user
        log.warning("app egress group not put back in the set: network permission not "
                    "enforced", app=app, error=problem)
        return dataclasses.replace(user, loopback_gid=None)
    try:
        gid = await trio.to_thread.run_sync(admit_app, app, support.table,
                                            support.legacy_gid)
    except IsolationError as exc:
        log.warning("app egress group not set up: network permission not enforced",
                    app=app, error=str(exc))
        return user
    return dataclasses.replace(user, loopback_gid=gid)


async def readmit(user: AppUser | None, *, network: str,
                  support: PermissionSupport | None) -> None:
    """Put the egress group an adopted instance runs with back in the table's set.

    The instance kept running while no agent watched: a firewall reload in that time
    deleted the table, and the instance must not wait for the next periodic check to be
    restricted again. A failure is logged (the check retries)."""
    if (user is None or user.loopback_gid is None or network == "any" or support is None
            or support.network_problem is not None):
        return
    problem = await trio.to_thread.run_sync(functools.partial(
        admit_gids, support.table, (user.loopback_gid,), legacy_gid=support.legacy_gid))
    if problem is not None:
        log.warning("adopted instance's egress group not put back in the set",
                    gid=user.loopback_gid, error=problem)


def egress_gids(agent: AgentView) -> set[int]:
    """The egress groups of this agent's loopback-only instances."""
    return {config.user.loopback_gid for config in
            (instance.config for instance in agent.instances.values())
            if config.network != "any" and config.user is not None
            and config.user.loopback_gid is not None}


async def keep_egress_table(agent: AgentView) -> None:
    """A firewall reload drops the nftables egress table: put it back (permissions)."""
    while True:
        await trio.sleep(EGRESS_CHECK_PERIOD)
        support = agent.permissions
        if support is not None and support.network_problem is None:
            await trio.to_thread.run_sync(restore_egress_table, support, egress_gids(agent))
