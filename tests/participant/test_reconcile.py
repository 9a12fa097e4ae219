"""Reconcile planner tests: pure, table-driven, plus a convergence property."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from superagent.participant.reconcile import (
    CRASH_LOOP,
    STOPPED,
    STOPPING,
    Action,
    Actual,
    Desired,
    Report,
    Restart,
    Start,
    Stop,
    plan,
)
from superagent.participant.supervisor import State


def want(instance_id: str, release: str = "r1", fingerprint: str = "f1",
         app: str = "hello") -> Desired:
    return Desired(instance_id=instance_id, app=app, release=release, fingerprint=fingerprint)


def have(instance_id: str, state: str = "ready", release: str = "r1", fingerprint: str = "f1",
         app: str = "hello") -> Actual:
    return Actual(instance_id=instance_id, app=app, release=release, state=state,
                  fingerprint=fingerprint)


def by_id(*items: Desired | Actual) -> dict[str, Desired | Actual]:
    return {item.instance_id: item for item in items}


def test_state_names_are_the_supervisors() -> None:
    """The planner's state strings are supervisor.State values."""
    values = {state.value for state in State}
    assert {CRASH_LOOP, STOPPED, STOPPING} <= values


CASES: list[tuple[str, list[Desired], list[Actual], list[Action]]] = [
    ("nothing to do", [want("a")], [have("a")], []),
    ("start missing", [want("a")], [], [Start(instance_id="a", app="hello", release="r1")]),
    ("stop undesired", [], [have("a")], [Stop(instance_id="a", reason="not desired")]),
    ("spec changed", [want("a", fingerprint="f2")], [have("a")],
     [Restart(instance_id="a", app="hello", release="r1", reason="spec changed (f1 -> f2)")]),
    ("release changed", [want("a", release="r2")], [have("a")],
     [Restart(instance_id="a", app="hello", release="r2",
              reason="runs hello@r1, want hello@r2")]),
    ("crash loop reported", [want("a")], [have("a", CRASH_LOOP)],
     [Report(instance_id="a", reason="crash_loop: not restarted until its spec changes")]),
    ("failed start reported", [want("a")], [have("a", STOPPED)],
     [Report(instance_id="a", reason="stopped: not restarted until its spec changes")]),
    ("crash loop with a new spec restarts", [want("a", fingerprint="f2")],
     [have("a", CRASH_LOOP)],
     [Restart(instance_id="a", app="hello", release="r1", reason="spec changed (f1 -> f2)")]),
    ("stopping but desired", [want("a")], [have("a", STOPPING)],
     [Restart(instance_id="a", app="hello", release="r1", reason="stopping but still desired")]),
    ("backoff is the supervisor's", [want("a")], [have("a", "backoff")], []),
    ("starts before stops, ids sorted",
     [want("c", "r2"), want("b", "r2")], [have("z"), have("a")],
     [Start(instance_id="b", app="hello", release="r2"),
      Start(instance_id="c", app="hello", release="r2"),
      Stop(instance_id="a", reason="not desired"), Stop(instance_id="z", reason="not desired")]),
]


@pytest.mark.parametrize(("name", "desired", "actual", "expected"), CASES,
                         ids=[case[0] for case in CASES])
def test_plan_table(name: str, desired: list[Desired], actual: list[Actual],
                    expected: list[Action]) -> None:
    """Each row: the plan for desired vs actual."""
    assert plan({d.instance_id: d for d in desired}, {a.instance_id: a for a in actual}) \
        == expected


def test_mismatched_key_is_a_bug() -> None:
    """A map key that is not its value's instance id raises ValueError."""
    with pytest.raises(ValueError, match="'x' holds instance 'a'"):
        plan({"x": want("a")}, {})


# --- property: applying the plan converges ------------------------------------------------------


def simulate(actions: list[Action], desired: Mapping[str, Desired],
             actual: Mapping[str, Actual]) -> dict[str, Actual]:
    """A tiny executor: starts and restarts come up from the desired spec."""
    world = dict(actual)
    for action in actions:
        if isinstance(action, Start):
            assert action.instance_id not in world
        else:
            assert action.instance_id in world
        if isinstance(action, (Start, Restart)):
            spec = desired[action.instance_id]
            assert (action.app, action.release) == (spec.app, spec.release)
            world[action.instance_id] = have(action.instance_id, "starting", spec.release,
                                             spec.fingerprint, spec.app)
        elif isinstance(action, Stop):
            del world[action.instance_id]
    return world


IDS = st.sampled_from(["a", "b", "c", "d", "e"])
RELEASES = st.sampled_from(["r1", "r2"])
FINGERPRINTS = st.sampled_from(["f1", "f2"])
STATES = st.sampled_from([state.value for state in State])
DESIRED = st.dictionaries(IDS, st.tuples(RELEASES, FINGERPRINTS)).map(
    lambda d: {i: want(i, r, f) for i, (r, f) in d.items()})
ACTUAL = st.dictionaries(IDS, st.tuples(STATES, RELEASES, FINGERPRINTS)).map(
    lambda d: {i: have(i, s, r, f) for i, (s, r, f) in d.items()})
KIND = {Start: 0, Restart: 1, Stop: 2, Report: 3}


@given(DESIRED, ACTUAL)
def test_applying_the_plan_yields_desired(desired: dict[str, Desired],
                                          actual: dict[str, Actual]) -> None:
    """After the plan runs, the instances are exactly the desired ones; the plan is ordered
    (starts, restarts, stops, reports; ids sorted within each) and a second pass only
    reports."""
    actions = plan(desired, actual)
    assert plan(desired, actual) == actions
    keys = [(KIND[type(a)], a.instance_id) for a in actions]
    assert keys == sorted(keys)
    assert len({a.instance_id for a in actions}) == len(actions)
    world = simulate(actions, desired, actual)
    assert {i: (a.app, a.release, a.fingerprint) for i, a in world.items()} \
        == {i: (d.app, d.release, d.fingerprint) for i, d in desired.items()}
    assert all(isinstance(a, Report) for a in plan(desired, world))
