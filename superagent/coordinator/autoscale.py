"""Autoscaling decisions: how many instances an app with ``[scale] min``/``max`` should run.

Pure: samples in, decisions out, the time passed in; the leader's reconciler feeds it and
commits what it decides (``SetScale``), so every decision is in the audit log with the
inputs that made it.

Theory of operation (the rule Kubernetes' horizontal autoscaler made familiar):

1. **Measure.** Each sample is the app's load at one moment: requests in flight summed
   over its ready instances (the proxies' own counters), or the CPU its instances use in
   cores. A sample is kept for ``window`` seconds; the load is the mean over the window,
   so one burst or one lull moves nothing by itself.
2. **Propose.** ``wanted = ceil(load / target)``: the instances that would carry the load
   at ``target`` per instance. Within ``tolerance`` of the current count's load per
   instance (``|load / (current * target) - 1| <= tolerance``) the proposal is the current
   count: a load hovering at the target never moves it (hysteresis).
3. **Limit.** Up: at most ``max_step_up`` times the current count at once, and not within
   ``up_cooldown`` of the last change. Down: the highest proposal of the last
   ``down_window`` seconds (a load that dips for a moment and comes back does not stop
   instances only to start them again), and not within ``down_cooldown`` of the last
   change. Always within ``[min, max]``.
4. **Decide.** A count different from the current one is a ``Decision`` whose ``inputs``
   say what it was made of; the same count is ``None``. Too few samples (less than half a
   window's worth of time) decide nothing, except bringing a count outside ``[min, max]``
   back inside.

The four timings (``window``, ``down_window``, ``up_cooldown``, ``down_cooldown``) are the
cluster's, not the app's: ``AutoTiming``, from ``superagent coordinator
--autoscale-timing window=30,down_window=60,...`` (defaults: the constants below), is laid
over every app's policy by the reconciler. Shorter timings follow a load faster and flap
more easily; they exist so that a test or a small cluster can watch a whole ramp.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

WINDOW = 30.0  # seconds of samples averaged: long enough to smooth a burst, short to follow a ramp
DOWN_WINDOW = 60.0  # seconds of proposals a scale-down looks back over
UP_COOLDOWN = 10.0  # seconds after a change before the next scale-up: new instances get warm
DOWN_COOLDOWN = 60.0  # seconds after a change before a scale-down
TOLERANCE = 0.1  # +-10% of the target per instance moves nothing
MAX_STEP_UP = 2.0  # at most double at once: the next round sees what the new ones carry


class Metric(StrEnum):
    IN_FLIGHT = "in_flight"  # requests (and websockets) in flight per instance
    CPU = "cpu"  # cores used per instance


@dataclass(frozen=True, kw_only=True, slots=True)
class AutoSpec:
    """An app's autoscaling policy (``[scale] min``, ``max``, ``target``, ``metric``)."""

    min: int
    max: int
    target: float  # per instance, in the metric's unit
    metric: Metric = Metric.IN_FLIGHT
    window: float = WINDOW
    down_window: float = DOWN_WINDOW
    up_cooldown: float = UP_COOLDOWN
    down_cooldown: float = DOWN_COOLDOWN
    tolerance: float = TOLERANCE
    max_step_up: float = MAX_STEP_UP

    def __post_init__(self) -> None:
        # min 0 is scale to zero (the app's nodes idle it); the autoscaler's floor stays 1:
        # an app at 0 instances reports no load, so it would never scale up
        if not 0 <= self.min <= self.max or self.max < 1:
            raise ValueError(f"min and max must satisfy 0 <= min <= max, 1 <= max"
                             f" (min {self.min}, max {self.max})")
        if not (math.isfinite(self.target) and self.target > 0):
            raise ValueError(f"target must be a positive number, not {self.target}")
        for name in ("window", "down_window", "up_cooldown", "down_cooldown", "tolerance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, not {value}")
        if self.window <= 0:
            raise ValueError("window must be positive")
        if not (math.isfinite(self.max_step_up) and self.max_step_up >= 1):
            raise ValueError(f"max_step_up must be >= 1, not {self.max_step_up}")


    @property
    def floor(self) -> int:
        """The fewest instances the autoscaler runs: ``min``, and 1 for ``min = 0``."""
        return max(1, self.min)

    def to_doc(self) -> dict[str, Any]:
        """The policy as the replicated state stores it (``[scale]``'s keys)."""
        return {"min": self.min, "max": self.max, "target": self.target,
                "metric": self.metric.value}


@dataclass(frozen=True, kw_only=True, slots=True)
class AutoTiming:
    """The cluster's autoscaling timings, in seconds (see the module docstring)."""

    window: float = WINDOW
    down_window: float = DOWN_WINDOW
    up_cooldown: float = UP_COOLDOWN
    down_cooldown: float = DOWN_COOLDOWN

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"autoscale timing {f.name} must be a number of seconds"
                                 f" >= 0, not {value}")
        if self.window <= 0:
            raise ValueError("autoscale timing window must be above 0 seconds")

    def apply(self, spec: AutoSpec) -> AutoSpec:
        """``spec`` with these timings."""
        return replace(spec, window=self.window, down_window=self.down_window,
                       up_cooldown=self.up_cooldown, down_cooldown=self.down_cooldown)

    def to_text(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name):g}" for f in fields(self))


DEFAULT_TIMING = AutoTiming()


def parse_timing(text: str) -> AutoTiming:
    """``window=30,down_window=60,up_cooldown=10,down_cooldown=60`` (any subset; the
    others keep their defaults) as an ``AutoTiming``; raises ValueError naming the item."""
    names = [f.name for f in fields(AutoTiming)]
    values: dict[str, float] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, raw = item.strip().partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise ValueError(f"{item.strip()!r} is not NAME=SECONDS with NAME one of"
                             f" {', '.join(names)}")
        if key in values:
            raise ValueError(f"{key} is given twice")
        try:
            values[key] = float(raw)
        except ValueError:
            raise ValueError(f"{key}: {raw.strip()!r} is not a number of seconds") from None
    return AutoTiming(**values)


def auto_spec(doc: Mapping[str, Any]) -> AutoSpec:
    """The policy of a ``{"min", "max", "target", "metric"?}`` document; raises
    ValueError (or KeyError for a missing key, TypeError for a wrong type)."""
    for key in ("min", "max"):
        if isinstance(doc[key], bool) or not isinstance(doc[key], int):
            raise TypeError(f"{key} must be an integer, not {doc[key]!r}")
    target = doc["target"]
    if isinstance(target, bool) or not isinstance(target, int | float):
        raise TypeError(f"target must be a number, not {target!r}")
    return AutoSpec(min=doc["min"], max=doc["max"], target=float(target),
                    metric=Metric(doc.get("metric", Metric.IN_FLIGHT.value)))


@dataclass(frozen=True, kw_only=True, slots=True)
class Decision:
    instances: int
    reason: str
    inputs: dict[str, Any]  # for the audit log: what the decision was made of


@dataclass(slots=True)
class Autoscaler:
    """One app's samples and recent proposals; ``decide`` is called once per round."""

    spec: AutoSpec
    samples: deque[tuple[float, float]] = field(default_factory=deque)  # (at, load)
    proposals: deque[tuple[float, int]] = field(default_factory=deque)  # (at, wanted)
    changed_at: float | None = None  # the last decision's time (None: none yet)
    first_at: float | None = None  # the first sample's time

    def __repr__(self) -> str:
        return (f"<Autoscaler {self.spec.metric.value} min={self.spec.min} max={self.spec.max}"
                f" target={self.spec.target} samples={len(self.samples)}>")

    def observe(self, at: float, load: float) -> None:
        """One sample: the app's total load at ``at`` (not per instance)."""
        if not math.isfinite(load) or load < 0:
            raise ValueError(f"load must be a number >= 0, not {load}")
        if self.first_at is None:
            self.first_at = at
        self.samples.append((at, load))
        self._expire(at)

    def load(self, now: float) -> float | None:
        """The mean load over the window, or None without samples."""
        self._expire(now)
        if not self.samples:
            return None
        return sum(load for _, load in self.samples) / len(self.samples)

    def decide(self, now: float, current: int) -> Decision | None:
        """The new instance count, or None to keep ``current``."""
        s = self.spec
        clamped = min(max(current, s.floor), s.max)
        load = self.load(now)
        warm = (self.first_at is not None and now - self.first_at >= s.window / 2)
        if load is None or not warm:
            if clamped != current:
                return self._decision(now, current, clamped, load, clamped,
                                      f"outside min {s.min} / max {s.max}")
            return None
        wanted = self._propose(load, current)
        self.proposals.append((now, wanted))
        while self.proposals and self.proposals[0][0] < now - s.down_window:
            self.proposals.popleft()
        since = math.inf if self.changed_at is None else now - self.changed_at
        if wanted > current:
            if since < s.up_cooldown and clamped == current:
                return None
            new = min(wanted, max(current + 1, math.floor(current * s.max_step_up)))
        elif wanted < current:
            if since < s.down_cooldown and clamped == current:
                return None
            new = min(current, max(p for _, p in self.proposals))  # the highest of the look-back
        else:
            new = current
        new = min(max(new, s.floor), s.max)
        if new == current:
            return None
        per = load / current if current else load
        word = "up" if new > current else "down"
        return self._decision(now, current, new, load, wanted,
                              f"scale {word}: {s.metric.value} {per:.2f} per instance"
                              f" against target {s.target:g}")

    def _propose(self, load: float, current: int) -> int:
        s = self.spec
        if current > 0 and abs(load / (current * s.target) - 1) <= s.tolerance:
            return current
        return math.ceil(load / s.target - 1e-9)

    def _decision(self, now: float, current: int, new: int, load: float | None,
                  wanted: int, reason: str) -> Decision:
        self.changed_at = now
        self.proposals.clear()  # a new count starts a new look-back
        inputs = {"metric": self.spec.metric.value, "load": load, "target": self.spec.target,
                  "current": current, "wanted": wanted, "min": self.spec.min,
                  "max": self.spec.max, "samples": len(self.samples),
                  "window": self.spec.window, "down_window": self.spec.down_window,
                  "up_cooldown": self.spec.up_cooldown,
                  "down_cooldown": self.spec.down_cooldown}
        return Decision(instances=new, reason=f"{reason}: {current} -> {new}", inputs=inputs)

    def _expire(self, now: float) -> None:
        while self.samples and self.samples[0][0] < now - self.spec.window:
            self.samples.popleft()


LIVE_STATES = ("ready", "unhealthy")  # instances whose load counts: they are serving


def app_load(statuses: Mapping[str, Mapping[str, Any]], app: str, release: str,
             metric: Metric) -> float | None:
    """An app's total load from the nodes' heartbeat statuses: ``metric`` summed over its
    serving instances of ``release``; None when no node reports one (nothing to learn)."""
    total, seen = 0.0, False
    for status in statuses.values():
        for entry in status.get("instances") or ():
            if (isinstance(entry, Mapping) and entry.get("app") == app
                    and entry.get("release") == release and entry.get("state") in LIVE_STATES):
                value = entry.get(metric.value)
                # a participant's word: a value that is no load (negative, not finite,
                # not a number) is skipped rather than trusted
                if (isinstance(value, int | float) and not isinstance(value, bool)
                        and 0 <= value < math.inf):
                    total += float(value)
                    seen = True
    return total if seen else None


class Autoscalers:
    """The leader's autoscalers, one per autoscaled app; a changed policy starts afresh."""

    def __init__(self) -> None:
        self._by_app: dict[str, Autoscaler] = {}

    def __repr__(self) -> str:
        return f"<Autoscalers {sorted(self._by_app)}>"

    def decide(self, now: float, app: str, spec: AutoSpec, current: int,
               load: float | None) -> Decision | None:
        """Feed ``load`` (when known) and ask for a decision for ``app`` at ``current``."""
        scaler = self._by_app.get(app)
        if scaler is None or scaler.spec != spec:
            scaler = self._by_app[app] = Autoscaler(spec)
        if load is not None:
            scaler.observe(now, load)
        return scaler.decide(now, current)

    def keep_only(self, apps: set[str]) -> None:
        """Forget the apps no longer autoscaled (deleted, or scaled by hand)."""
        for app in set(self._by_app) - apps:
            del self._by_app[app]
