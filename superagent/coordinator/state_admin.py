"""The cluster-administration transitions of ``ClusterState``: the coordinators' registry
and the restore of a backup.

Theory of operation. The Raft members themselves are pysyncobj's (``raft.py``); what the
replicated state keeps is the *name* of each member added at run time (``members``:
coordinator id -> Raft address), so every coordinator can map the leader's Raft address
to an id and then to its API URL (``coordinators``), whichever ``--peers`` it was
started with. ``AddCoordinator`` is committed before the Raft change and
``RemoveCoordinator`` after it (``coordinator.cluster_ops``).

``RestoreState`` replaces the whole state of an *empty* cluster (no apps, no releases, no
nodes: participants are started after the restore) by a backup's, except what belongs to
the restoring cluster itself: its coordinators' registry, and its tokens, kept beside
the backup's (a name in both keeps the backup's record under the name and the
restoring cluster's under ``<name>-restorer``) so the token that ran the restore still
works. The backup's nodes come back *down*: they are other machines, which count as up
again only when they heartbeat. Everything here is pure and deterministic, as ``apply``
must be.
"""

from __future__ import annotations

from typing import Any, Protocol

from superagent.coordinator import commands as cmd
from superagent.coordinator.errors import Conflict, UnknownCoordinator

Result = dict[str, Any]


class ClusterState(Protocol):
    """What these transitions use of ``state.ClusterState`` (a Protocol rather than an
    import: ``state`` imports this module)."""

    apps: dict[str, Any]
    releases: dict[str, Any]
    nodes: dict[str, Any]
    deploys: dict[str, Any]
    tokens: dict[str, dict[str, Any]]
    coordinators: dict[str, str]
    members: dict[str, str]

#: What a restore copies from the backup; the rest is the restoring cluster's own.
RESTORED = ("apps", "releases", "last_release", "nodes", "placement", "placement_reason",
            "deploys", "audit", "audit_seq", "idempotency", "quotas", "trust")
RESTORER_SUFFIX = "-restorer"  # a restoring cluster's token whose name the backup has


def add_coordinator(state: ClusterState, c: cmd.AddCoordinator) -> tuple[Result, str]:
    for other, address in state.members.items():
        if address == c.raft_address and other != c.coordinator:
            raise Conflict(f"Raft address {c.raft_address} is coordinator {other}'s")
    state.members[c.coordinator] = c.raft_address
    return {"ok": True, "coordinator": c.coordinator}, c.raft_address


def remove_coordinator(state: ClusterState, c: cmd.RemoveCoordinator) -> tuple[Result, str]:
    if c.coordinator not in state.members and c.coordinator not in state.coordinators:
        raise UnknownCoordinator(c.coordinator)
    state.members.pop(c.coordinator, None)
    state.coordinators.pop(c.coordinator, None)
    return {"ok": True, "coordinator": c.coordinator}, "removed"


def is_empty(state: ClusterState) -> bool:
    """Whether a backup may be restored onto ``state``."""
    return not (state.apps or state.releases or state.nodes or state.deploys)


def restore(state: ClusterState, c: cmd.RestoreState,
            backup: ClusterState) -> tuple[Result, str]:
    """Replace ``state`` by ``backup`` (``c.state`` decoded, SnapshotError checked by the
    API before) as the module docstring says."""
    if not is_empty(state):
        raise Conflict(f"the cluster is not empty ({len(state.apps)} apps,"
                       f" {len(state.nodes)} nodes): a backup is restored onto a new cluster,"
                       " before its participants start")
    for name in RESTORED:
        setattr(state, name, getattr(backup, name))
    for node in state.nodes.values():
        node.up = False
    tokens = dict(backup.tokens)
    for name, record in state.tokens.items():
        tokens[name + RESTORER_SUFFIX if name in tokens else name] = record
    state.tokens = tokens
    return ({"ok": True, "apps": len(state.apps), "nodes": len(state.nodes),
             "releases": sum(len(r) for r in state.releases.values())},
            f"restored {c.source}".strip())
