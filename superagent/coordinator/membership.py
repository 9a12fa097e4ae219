"""Node liveness, kept by the leader in memory.

Heartbeats are not Raft writes: a participant beats every second or so, and replicating
that would make the log grow with nothing of value. The leader remembers when it last
heard from each node and commits only the transitions (``NodeDown``/``NodeUp``).

A new leader knows nothing of the heartbeats its predecessor received, so it counts
every node as heard at the moment it became leader: nobody is marked down for a silence
that happened before the election, and a node that is really gone is marked down one
timeout after it.

The leader's own stalls are not the nodes' silence. When its process was not scheduled
(a paused VM, a starved CPU, a long step that held the event loop), heartbeats wait unread
in socket buffers, and whatever judges liveness first after it (the watch loop, the
reconciler, an API call) runs before the requests carrying them are read. ``observe`` is
called every ``period`` by the watch loop and first thing by every judge: a gap of more
than ``STALL_GAP`` periods since the last observation is time the leader was blind
(``blind``), and it is not held against a node that beat before it (``silence``): its last
report stays current (``fresh``) and it stays up (``alive``). A node that really stopped is
then marked down the blind time later, never early.

``Liveness`` is pure (the caller passes ``now``); the coordinator's loop turns ``due``
into commands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STALL_GAP = 2.0  # periods between two observations beyond which the leader stalled


@dataclass
class Liveness:
    """Last heartbeat per node, as seen by this coordinator while it leads."""

    timeout: float
    period: float  # how often the watch loop observes (``due``)
    leader_since: float | None = None
    last: dict[str, float] = field(default_factory=dict)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    checked: float | None = None  # when the leader last observed, while leading
    blind: float = 0.0  # seconds of the leader's own stalls since it began leading
    blind_at: dict[str, float] = field(default_factory=dict)  # ``blind`` at each last beat

    def lead(self, now: float) -> None:
        """This coordinator became leader at ``now``."""
        self.leader_since = now
        self.checked = now
        self.blind = 0.0
        self.blind_at = dict.fromkeys(self.last, 0.0)

    def follow(self) -> None:
        """This coordinator lost the leadership: what it knows goes stale."""
        self.leader_since = self.checked = None
        self.last.clear()
        self.status.clear()
        self.blind_at.clear()

    def beat(self, node: str, now: float, status: Mapping[str, Any] | None = None) -> None:
        self.last[node] = now
        self.blind_at[node] = self.blind
        if status is not None:
            self.status[node] = dict(status)

    def forget(self, node: str) -> None:
        self.last.pop(node, None)
        self.status.pop(node, None)
        self.blind_at.pop(node, None)

    def observe(self, now: float) -> None:
        """The leader runs at ``now``: a gap of more than ``STALL_GAP`` periods since it
        last observed was its own stall, from one period after that observation."""
        if self.checked is None:
            return
        if now - self.checked > STALL_GAP * self.period:
            stall_from = self.checked + self.period
            self.blind += now - stall_from
            for node, heard in self.last.items():
                if heard > stall_from:  # read once the stall was over: nothing to forgive
                    self.blind_at[node] = self.blind
        self.checked = max(self.checked, now)

    def silence(self, node: str, now: float) -> float | None:
        """Seconds since the node's last heartbeat, less the time this leader was blind
        since (call ``observe`` first); None when never heard."""
        heard = self.last.get(node)
        if heard is None:
            return None
        return now - heard - (self.blind - self.blind_at.get(node, 0.0))

    def fresh(self, node: str, now: float) -> bool:
        """Heard from within ``timeout`` (its report is current enough to act on)."""
        silence = self.silence(node, now)
        return silence is not None and silence <= self.timeout

    def alive(self, node: str, now: float) -> bool:
        """``fresh``, or not heard since this leadership began and within ``timeout`` of
        its start (less the leader's stalls): an election never marks a node down."""
        if self.leader_since is None:
            return False
        heard = self.last.get(node)
        if heard is None or heard < self.leader_since:
            return now - self.leader_since - self.blind <= self.timeout
        return self.fresh(node, now)

    def due(self, up: Mapping[str, bool], now: float) -> tuple[list[str], list[str]]:
        """``(to mark down, to mark up)`` given each known node's replicated ``up`` flag,
        observing ``now`` first."""
        if self.leader_since is None:
            return [], []
        self.observe(now)
        down = sorted(n for n, is_up in up.items() if is_up and not self.alive(n, now))
        back = sorted(n for n, is_up in up.items()
                      if not is_up and n in self.last and self.alive(n, now))
        return down, back

    def age(self, node: str, now: float) -> float | None:
        """Seconds since the node's last heartbeat to this leader, or None."""
        seen = self.last.get(node)
        return None if seen is None else max(0.0, now - seen)
