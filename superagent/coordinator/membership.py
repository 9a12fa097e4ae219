"""Node liveness, kept by the leader in memory.

Heartbeats are not Raft writes: a participant beats every second or so, and replicating
that would make the log grow with nothing of value. The leader remembers when it last
heard from each node and commits only the transitions (``NodeDown``/``NodeUp``).

A new leader knows nothing of the heartbeats its predecessor received, so it counts
every node as heard at the moment it became leader: nobody is marked down for a silence
that happened before the election, and a node that is really gone is marked down one
timeout after it.

``Liveness`` is pure (the caller passes ``now``); the coordinator's loop turns ``due``
into commands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Liveness:
    """Last heartbeat per node, as seen by this coordinator while it leads."""

    timeout: float
    leader_since: float | None = None
    last: dict[str, float] = field(default_factory=dict)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)

    def lead(self, now: float) -> None:
        """This coordinator became leader at ``now``."""
        self.leader_since = now

    def follow(self) -> None:
        """This coordinator lost the leadership: what it knows goes stale."""
        self.leader_since = None
        self.last.clear()
        self.status.clear()

    def beat(self, node: str, now: float, status: Mapping[str, Any] | None = None) -> None:
        self.last[node] = now
        if status is not None:
            self.status[node] = dict(status)

    def forget(self, node: str) -> None:
        self.last.pop(node, None)
        self.status.pop(node, None)

    def alive(self, node: str, now: float) -> bool:
        """Heard from within ``timeout`` (counting the start of the leadership as heard)."""
        if self.leader_since is None:
            return False
        heard = max(self.last.get(node, self.leader_since), self.leader_since)
        return now - heard <= self.timeout

    def due(self, up: Mapping[str, bool], now: float) -> tuple[list[str], list[str]]:
        """``(to mark down, to mark up)`` given each known node's replicated ``up`` flag."""
        if self.leader_since is None:
            return [], []
        down = sorted(n for n, is_up in up.items() if is_up and not self.alive(n, now))
        back = sorted(n for n, is_up in up.items()
                      if not is_up and n in self.last and self.alive(n, now))
        return down, back

    def age(self, node: str, now: float) -> float | None:
        """Seconds since the node's last heartbeat to this leader, or None."""
        seen = self.last.get(node)
        return None if seen is None else max(0.0, now - seen)
