"""The state machine of one supervised instance, pure.

States are ``State`` (starting, ready, unhealthy, backoff, crash-loop, stopping,
stopped), events ``Event``; ``transition`` looks the pair up in a table and raises
``InvalidTransition`` naming both when the pair is not in it. Every state but stopping
and stopped may be stopped. ``supervisor.Instance`` fires the events and reports each
change; see its module docstring for what each state means for the process.
"""

from __future__ import annotations

import enum

from superagent.participant.errors import InvalidTransition


class State(enum.Enum):
    STARTING = "starting"  # spawned, waiting for readiness
    READY = "ready"  # answered readiness; liveness checks running
    UNHEALTHY = "unhealthy"  # some liveness checks failed, fewer than ``failures``
    BACKOFF = "backoff"  # exited; waiting before the next spawn
    CRASH_LOOP = "crash_loop"  # too many restarts in the window; given up
    STOPPING = "stopping"  # stop() in progress
    STOPPED = "stopped"  # no process, nothing more will happen


class Event(enum.Enum):
    READY = "ready"
    CHECK_OK = "check_ok"
    CHECK_FAILED = "check_failed"
    EXITED = "exited"  # the process ended (by itself, or killed for failing its checks)
    RESTART = "restart"
    CRASH_LOOP = "crash_loop"
    START_FAILED = "start_failed"  # the first start failed: give up, run() raises
    STOP = "stop"
    STOPPED = "stopped"


_TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.STARTING, Event.READY): State.READY,
    (State.STARTING, Event.EXITED): State.BACKOFF,
    (State.STARTING, Event.START_FAILED): State.STOPPED,
    (State.READY, Event.CHECK_OK): State.READY,
    (State.READY, Event.CHECK_FAILED): State.UNHEALTHY,
    (State.READY, Event.EXITED): State.BACKOFF,
    (State.UNHEALTHY, Event.CHECK_OK): State.READY,
    (State.UNHEALTHY, Event.CHECK_FAILED): State.UNHEALTHY,
    (State.UNHEALTHY, Event.EXITED): State.BACKOFF,
    (State.BACKOFF, Event.RESTART): State.STARTING,
    (State.BACKOFF, Event.CRASH_LOOP): State.CRASH_LOOP,
    (State.STOPPING, Event.STOPPED): State.STOPPED,
}
for _state in State:
    if _state not in (State.STOPPING, State.STOPPED):
        _TRANSITIONS[(_state, Event.STOP)] = State.STOPPING


def transition(state: State, event: Event, *, instance: str = "") -> State:
    """The state after ``event``; raises ``InvalidTransition`` naming both when not allowed."""
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(state.name, event.name, instance=instance) from None
