"""The agent's side of the manifest's ``[permissions]``: detection and the egress table.

What the machine can enforce is detected when the first instance asks for a permission
(``permission_support``), so an agent whose apps ask for none never touches nftables or
groups. A firewall reload drops the host-wide nftables egress table; ``keep_egress_table``
(a task of the agent's nursery) puts it back every EGRESS_CHECK_PERIOD.
"""

from __future__ import annotations

import functools

import trio

from superagent.manifest import PermissionsSpec
from superagent.participant.agentview import AgentView
from superagent.participant.permissions import (
    EGRESS_CHECK_PERIOD,
    PermissionSupport,
    detect_permissions,
    restore_egress_table,
)


async def permission_support(agent: AgentView, wanted: PermissionsSpec
                             ) -> PermissionSupport | None:
    if agent.permissions is None and wanted != PermissionsSpec():
        agent.permissions = await trio.to_thread.run_sync(functools.partial(
            detect_permissions, group=agent.config.loopback_group,
            table=agent.config.egress_table))
    return agent.permissions


async def keep_egress_table(agent: AgentView) -> None:
    """A firewall reload drops the nftables egress table: put it back (permissions)."""
    while True:
        await trio.sleep(EGRESS_CHECK_PERIOD)
        if agent.permissions is not None and agent.permissions.loopback_gid is not None:
            await trio.to_thread.run_sync(restore_egress_table, agent.permissions)
