"""The node lifecycle state machine: an operator's intent for a machine.

``online`` nodes receive placements; ``draining`` nodes keep serving while the
scheduler moves their instances away and their proxy answers 503 on
``/-/healthz``; ``offline`` nodes run nothing. Liveness (up/down, from
heartbeats) is a separate flag: a node can be online and down.

An event is the lifecycle an operator asks for. The table is the whole policy:
an online node must drain before it goes offline (so its traffic moves first),
and asking for the state a node is already in is an error, not a silent no-op,
so a confused operator sees it. Retries are covered by idempotency keys.
"""

from __future__ import annotations

from enum import Enum

from superagent.coordinator.errors import IllegalTransition


class Lifecycle(Enum):
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"


TRANSITIONS: dict[tuple[Lifecycle, Lifecycle], Lifecycle] = {
    (Lifecycle.ONLINE, Lifecycle.DRAINING): Lifecycle.DRAINING,
    (Lifecycle.DRAINING, Lifecycle.ONLINE): Lifecycle.ONLINE,  # drain cancelled
    (Lifecycle.DRAINING, Lifecycle.OFFLINE): Lifecycle.OFFLINE,
    (Lifecycle.OFFLINE, Lifecycle.ONLINE): Lifecycle.ONLINE,
}


def next_lifecycle(state: Lifecycle, event: Lifecycle, *, node: str = "") -> Lifecycle:
    """The lifecycle after ``event``; raises IllegalTransition naming state and event."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition(state=state.value, event=event.value, node=node) from None
