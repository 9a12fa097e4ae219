"""The autoscaler's decisions: hysteresis, cooldowns, look-back, bounds (pure, no clock)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from superagent.coordinator.autoscale import (
    DEFAULT_TIMING,
    Autoscaler,
    Autoscalers,
    AutoSpec,
    AutoTiming,
    Metric,
    app_load,
    parse_timing,
)

SPEC = AutoSpec(min=1, max=10, target=5.0)


def run(scaler: Autoscaler, loads: list[float], *, start: int, period: float = 1.0,
        t0: float = 0.0) -> tuple[int, list[tuple[float, int]]]:
    """Feed one sample per period; returns the final count and every change (time, count)."""
    current, changes = start, []
    for i, load in enumerate(loads):
        now = t0 + i * period
        scaler.observe(now, load)
        decision = scaler.decide(now, current)
        if decision is not None:
            assert decision.instances != current
            current = decision.instances
            changes.append((now, current))
    return current, changes


def test_a_load_at_the_target_moves_nothing() -> None:
    final, changes = run(Autoscaler(SPEC), [15.0] * 300, start=3)
    assert final == 3 and changes == []


def test_within_tolerance_is_not_a_change() -> None:
    final, changes = run(Autoscaler(SPEC), [16.0] * 300, start=3)  # 5.33 per instance: +7%
    assert final == 3 and changes == []


def test_scale_up_follows_load_and_waits_for_the_cooldown_between_steps() -> None:
    final, changes = run(Autoscaler(SPEC), [40.0] * 120, start=1)
    assert final == 8
    assert [c for _, c in changes] == sorted(c for _, c in changes)  # only up
    times = [t for t, _ in changes]
    assert all(b - a >= SPEC.up_cooldown for a, b in itertools.pairwise(times))
    assert all(b <= 2 * a for (_, a), (_, b) in zip([(0, 1), *changes], changes, strict=False))


def test_nothing_is_decided_before_half_a_window_of_samples() -> None:
    scaler = Autoscaler(SPEC)
    for i in range(int(SPEC.window / 2)):
        scaler.observe(float(i), 100.0)
        assert scaler.decide(float(i), 1) is None
    scaler.observe(SPEC.window / 2, 100.0)
    decision = scaler.decide(SPEC.window / 2, 1)
    assert decision is not None and decision.instances == 2


def test_out_of_bounds_counts_are_brought_back_at_once() -> None:
    scaler = Autoscaler(AutoSpec(min=2, max=4, target=5.0))
    decision = scaler.decide(0.0, 0)
    assert decision is not None and decision.instances == 2 and "min 2" in decision.reason
    decision = Autoscaler(AutoSpec(min=2, max=4, target=5.0)).decide(0.0, 9)
    assert decision is not None and decision.instances == 4


def test_scale_down_waits_out_the_look_back_and_the_cooldown() -> None:
    scaler = Autoscaler(SPEC)
    final, changes = run(scaler, [40.0] * 100 + [5.0] * 400, start=8)
    assert final == 1
    down = [(t, c) for t, c in changes if t >= 100]
    assert down and down[0][0] >= 100 + SPEC.window / 2  # the mean had to fall first
    times = [t for t, _ in down]
    assert all(b - a >= SPEC.down_cooldown for a, b in itertools.pairwise(times))


def test_a_short_dip_does_not_stop_instances() -> None:
    loads = [40.0] * 100 + [0.0] * 5 + [40.0] * 100
    final, changes = run(Autoscaler(SPEC), loads, start=8)
    assert final == 8 and changes == []


def test_every_decision_carries_its_inputs() -> None:
    scaler = Autoscaler(AutoSpec(min=1, max=10, target=0.5, metric=Metric.CPU))
    _, changes = run(scaler, [2.0] * 40, start=1)
    assert changes
    scaler2 = Autoscaler(AutoSpec(min=1, max=10, target=0.5, metric=Metric.CPU))
    for i in range(40):
        scaler2.observe(float(i), 2.0)
        decision = scaler2.decide(float(i), 1)
        if decision is not None:
            break
    assert decision is not None
    assert decision.inputs["metric"] == "cpu" and decision.inputs["current"] == 1
    assert decision.inputs["load"] == pytest.approx(2.0) and "cpu" in decision.reason


@pytest.mark.parametrize("kwargs", [
    {"min": 3, "max": 2, "target": 1.0}, {"min": 0, "max": 0, "target": 1.0},
    {"min": 1, "max": 2, "target": 0.0}, {"min": 1, "max": 2, "target": math.nan},
    {"min": 1, "max": 2, "target": 1.0, "window": 0.0},
    {"min": 1, "max": 2, "target": 1.0, "max_step_up": 0.5},
])
def test_bad_policies_are_refused_with_the_field_named(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AutoSpec(**kwargs)  # type: ignore[arg-type]


def test_a_bad_sample_is_refused() -> None:
    with pytest.raises(ValueError, match="load"):
        Autoscaler(SPEC).observe(0.0, -1.0)


@settings(max_examples=150, deadline=None)
@given(peak=st.floats(min_value=0.0, max_value=200.0),
       up=st.integers(min_value=10, max_value=200),
       hold=st.integers(min_value=0, max_value=200),
       down=st.integers(min_value=10, max_value=200))
def test_a_ramp_up_and_down_never_flaps(peak: float, up: int, hold: int, down: int) -> None:
    """A load that rises then falls: counts rise then fall, within bounds, each once."""
    loads = ([peak * i / up for i in range(up)] + [peak] * hold
             + [peak * (1 - i / down) for i in range(down)] + [0.0] * 200)
    final, changes = run(Autoscaler(SPEC), loads, start=1)
    counts = [1] + [c for _, c in changes]
    assert all(SPEC.min <= c <= SPEC.max for c in counts)
    peak_at = counts.index(max(counts))
    assert counts[:peak_at + 1] == sorted(counts[:peak_at + 1])  # no down while rising
    assert counts[peak_at:] == sorted(counts[peak_at:], reverse=True)  # no up while falling
    assert final == SPEC.min


def test_app_load_sums_the_serving_instances_of_the_release() -> None:
    statuses: dict[str, dict[str, Any]] = {
        "n1": {"instances": [
            {"app": "web", "release": "r2", "state": "ready", "in_flight": 3, "cpu": 0.5},
            {"app": "web", "release": "r1", "state": "ready", "in_flight": 9},  # old release
            {"app": "web", "release": "r2", "state": "starting", "in_flight": 4}]},
        "n2": {"instances": [
            {"app": "web", "release": "r2", "state": "unhealthy", "in_flight": 2},
            {"app": "api", "release": "r2", "state": "ready", "in_flight": 7},
            "not an entry"]},
        "n3": {}}
    assert app_load(statuses, "web", "r2", Metric.IN_FLIGHT) == 5.0
    assert app_load(statuses, "web", "r2", Metric.CPU) == 0.5
    assert app_load(statuses, "web", "r3", Metric.IN_FLIGHT) is None
    assert app_load({}, "web", "r2", Metric.IN_FLIGHT) is None


def test_autoscalers_start_afresh_when_the_policy_changes() -> None:
    book = Autoscalers()
    spec = AutoSpec(min=1, max=10, target=5.0)
    decision = None
    for i in range(20):
        decision = book.decide(float(i), "web", spec, 1, 40.0) or decision
    assert decision is not None and decision.instances == 2
    wider = AutoSpec(min=3, max=10, target=5.0)
    first = book.decide(20.0, "web", wider, 2, 40.0)  # new policy: no samples, but below min
    assert first is not None and first.instances == 3 and first.inputs["samples"] == 1
    book.keep_only(set())
    assert "web" not in repr(book)


def test_app_load_skips_values_that_are_no_load() -> None:
    statuses: dict[str, dict[str, Any]] = {"n1": {"instances": [
        {"app": "web", "release": "r1", "state": "ready", "in_flight": math.inf},
        {"app": "web", "release": "r1", "state": "ready", "in_flight": -3},
        {"app": "web", "release": "r1", "state": "ready", "in_flight": True},
        {"app": "web", "release": "r1", "state": "ready", "in_flight": 2}]}}
    assert app_load(statuses, "web", "r1", Metric.IN_FLIGHT) == 2.0


def test_min_0_keeps_a_floor_of_one_instance() -> None:
    """min 0 is scale to zero, which the nodes do by idling: the autoscaler runs >= 1."""
    spec = AutoSpec(min=0, max=4, target=5.0)
    assert spec.floor == 1
    decision = Autoscaler(spec).decide(0.0, 0)
    assert decision is not None and decision.instances == 1


def test_timing_parses_any_subset_and_applies_over_a_policy() -> None:
    """--autoscale-timing: the named timings replace the defaults; bad input names itself."""
    assert parse_timing("") == DEFAULT_TIMING == AutoTiming()
    timing = parse_timing(" window=4, up_cooldown=0.5 ,down_cooldown=2")
    assert timing == AutoTiming(window=4, up_cooldown=0.5, down_cooldown=2,
                                down_window=DEFAULT_TIMING.down_window)
    assert parse_timing(timing.to_text()) == timing
    spec = timing.apply(SPEC)
    assert (spec.window, spec.up_cooldown, spec.down_cooldown, spec.min, spec.target) == (
        4.0, 0.5, 2.0, SPEC.min, SPEC.target)
    assert DEFAULT_TIMING.apply(SPEC) == SPEC  # the defaults change nothing
    for bad, named in (("window", "NAME=SECONDS"), ("speed=3", "speed"),
                       ("window=soon", "window"), ("window=1,window=2", "twice"),
                       ("window=0", "window"), ("up_cooldown=-1", "up_cooldown"),
                       ("down_window=inf", "down_window")):
        with pytest.raises(ValueError, match=named):
            parse_timing(bad)


def test_shorter_timings_follow_a_ramp_sooner_and_say_so() -> None:
    """With a 4 s window and 1-2 s cooldowns a ramp up and back down takes seconds, and
    each decision's inputs name the timings it was made with."""
    fast = AutoTiming(window=4, down_window=2, up_cooldown=1, down_cooldown=2)
    scaler = Autoscaler(fast.apply(AutoSpec(min=1, max=3, target=1.0)))
    current, changes = run(scaler, [4.0] * 8 + [0.0] * 24, start=1, period=0.5)
    assert current == 1
    counts = [count for _, count in changes]
    top = counts.index(max(counts))
    assert max(counts) == 3 and counts[:top + 1] == sorted(counts[:top + 1])
    assert counts[top:] == sorted(counts[top:], reverse=True)  # no flapping
    assert changes[-1][0] < 12.0
    scaler = Autoscaler(fast.apply(AutoSpec(min=1, max=3, target=1.0)))
    scaler.observe(0.0, 4.0)
    scaler.observe(2.0, 4.0)
    decision = scaler.decide(2.0, 1)
    assert decision is not None and decision.inputs["up_cooldown"] == 1.0
    assert decision.inputs["window"] == 4.0 and decision.inputs["down_cooldown"] == 2.0
