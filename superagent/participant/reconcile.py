"""The participant's process reconciler, as a pure planner: desired vs actual -> actions.

Theory of operation
-------------------
The agent knows what should run (``Desired``: from the signals it was sent) and what
does run (``Actual``: from its supervisors). ``plan`` compares the two by instance id
and returns the actions that make actual equal desired; a small async executor carries
them out (STYLE.md point 2). No I/O, no trio, no clock here.

Per instance id:

- desired, not running                       -> ``Start``
- running, not desired                       -> ``Stop`` ("not desired")
- both, app / release / fingerprint differ   -> ``Restart`` (stop it, start it again
  from the desired spec; a changed spec is a fresh attempt, even after a crash loop)
- both, same spec, state ``stopping``        -> ``Restart`` (it is going away although
  it is still wanted)
- both, same spec, state ``crash_loop`` or ``stopped`` (the supervisor gave up: too many
  restarts, or the first start failed) -> ``Report``. It is *not* restarted: restarting
  on every reconcile pass would be the crash loop the supervisor just ended, at the
  reconcile cadence. A new release (new fingerprint) or a stop clears it.
- both, same spec, any other state (starting, ready, unhealthy, backoff) -> nothing:
  those are the supervisor's own business.

Order: every ``Start`` first (new capacity comes up before anything goes down), then
``Restart`` (each takes one instance down for a moment), then ``Stop``, then ``Report``.
Within each kind, by instance id, so the same inputs always give the same plan.

State names are the values of ``supervisor.State`` (a test checks they agree); they are
strings here so this module does not import the trio-based supervisor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

CRASH_LOOP = "crash_loop"
STOPPED = "stopped"
STOPPING = "stopping"
GIVEN_UP = frozenset({CRASH_LOOP, STOPPED})  # the supervisor stopped trying: report them


@dataclass(frozen=True, kw_only=True, slots=True)
class Desired:
    """One instance that should run: ``fingerprint`` identifies its spec's content."""

    instance_id: str
    app: str
    release: str
    fingerprint: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Actual:
    """One instance the agent supervises, in state ``state`` (a ``supervisor.State`` value)."""

    instance_id: str
    app: str
    release: str
    state: str
    fingerprint: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Start:
    """Start a new instance of ``app``@``release`` under ``instance_id``."""

    instance_id: str
    app: str
    release: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Restart:
    """Stop ``instance_id`` and start it again as ``app``@``release`` (the desired spec)."""

    instance_id: str
    app: str
    release: str
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Stop:
    """Stop ``instance_id`` and forget it."""

    instance_id: str
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Report:
    """Tell the coordinator that ``instance_id`` is wanted but the supervisor gave up."""

    instance_id: str
    reason: str


Action = Start | Restart | Stop | Report

_ORDER = {Start: 0, Restart: 1, Stop: 2, Report: 3}


def plan(desired: Mapping[str, Desired], actual: Mapping[str, Actual]) -> list[Action]:
    """The actions that turn ``actual`` into ``desired``; see the module docstring.

    Both maps are keyed by instance id. Raises ``ValueError`` when a key is not its
    value's ``instance_id`` (a caller's bug).
    """
    for table in (desired, actual):
        for key, item in table.items():
            if key != item.instance_id:
                raise ValueError(f"key {key!r} holds instance {item.instance_id!r}")
    actions: list[Action] = []
    for instance_id in sorted(desired.keys() | actual.keys()):
        want = desired.get(instance_id)
        have = actual.get(instance_id)
        if want is None:
            assert have is not None
            actions.append(Stop(instance_id=instance_id, reason="not desired"))
        elif have is None:
            actions.append(Start(instance_id=instance_id, app=want.app, release=want.release))
        else:
            action = _compare(want, have)
            if action is not None:
                actions.append(action)
    # sorted() is stable, so each kind keeps the id order of the loop above.
    return sorted(actions, key=lambda action: _ORDER[type(action)])


def _compare(want: Desired, have: Actual) -> Action | None:
    def restart(reason: str) -> Restart:
        return Restart(instance_id=want.instance_id, app=want.app, release=want.release,
                       reason=reason)

    if (have.app, have.release) != (want.app, want.release):
        return restart(f"runs {have.app}@{have.release}, want {want.app}@{want.release}")
    if have.fingerprint != want.fingerprint:
        return restart(f"spec changed ({have.fingerprint} -> {want.fingerprint})")
    if have.state in GIVEN_UP:
        return Report(instance_id=want.instance_id,
                      reason=f"{have.state}: not restarted until its spec changes")
    if have.state == STOPPING:
        return restart("stopping but still desired")
    return None


__all__ = ["CRASH_LOOP", "GIVEN_UP", "STOPPED", "STOPPING", "Action", "Actual", "Desired",
           "Report", "Restart", "Start", "Stop", "plan"]
