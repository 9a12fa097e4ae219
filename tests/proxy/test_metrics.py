"""Tests for superagent/proxy/metrics.py: per-worker counters, merging and Prometheus text."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from superagent.proxy.metrics import BUCKETS, Metrics, merge, render

_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(?:\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*)\})?'
    r' (?P<value>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf|NaN))$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_COMMENT = re.compile(r"^# (?:HELP [a-zA-Z_:][a-zA-Z0-9_:]* .+|TYPE [a-zA-Z_:][a-zA-Z0-9_:]* "
                      r"(?:counter|gauge|histogram|summary|untyped))$")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Parse Prometheus text exposition strictly; every line must be a comment or a sample."""
    assert text.endswith("\n")
    samples: Samples = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert _COMMENT.match(line), f"bad comment line: {line!r}"
            parts = line.split(" ", 3)
            if parts[1] == "TYPE":
                assert parts[2] not in types, f"TYPE twice for {parts[2]}"
                types[parts[2]] = parts[3]
            continue
        m = _SAMPLE.match(line)
        assert m, f"bad sample line: {line!r}"
        name = m.group("name")
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample before its TYPE: {line!r}"
        labels = frozenset(_LABEL.findall(m.group("labels") or ""))
        key = (name, labels)
        assert key not in samples, f"duplicate sample: {line!r}"
        samples[key] = float(m.group("value"))
    return samples


def lbl(**labels: str) -> frozenset[tuple[str, str]]:
    """A label set as parse() returns it."""
    return frozenset(labels.items())


def worker(observations: list[tuple[str, int, float]], *, retries: dict[str, int] | None = None,
           errors: dict[str, int] | None = None, instances: dict[str, dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    """One worker's JSON report, as sent over the control socket."""
    m = Metrics()
    for app, status, seconds in observations:
        m.observe(app, status, seconds)
    for app, n in (retries or {}).items():
        for _ in range(n):
            m.retry(app)
    for inst, n in (errors or {}).items():
        for _ in range(n):
            m.connect_error(inst)
    return json.loads(json.dumps({"metrics": m.to_json(), "instances": instances or {}}))


def test_observe_counts_by_app_and_status() -> None:
    """observe() counts requests per (app, status) and fills one histogram per app."""
    m = Metrics()
    m.observe("web", 200, 0.003)
    m.observe("web", 200, 0.2)
    m.observe("web", 502, 7.0)
    m.observe("api", 200, 0.0001)
    m.observe("api", 200, 60.0)
    figures = m.to_json()
    assert sorted(map(tuple, figures["requests"])) == [("api", 200, 2), ("web", 200, 2),
                                                        ("web", 502, 1)]
    web = figures["latency"]["web"]
    assert len(web) == len(BUCKETS) + 3  # buckets, slower than the last, sum, count
    assert web[-1] == 3
    assert web[-2] == pytest.approx(7.203)
    assert sum(web[: len(BUCKETS)]) == 3
    assert figures["latency"]["api"][len(BUCKETS)] == 1  # 60 s: past the last bucket
    assert repr(m) == "<Metrics requests=5>"


def test_render_parses_as_prometheus_text() -> None:
    """Every rendered line is a valid HELP/TYPE comment or sample, including escaped labels."""
    merged = merge([worker([("web", 200, 0.01), ('we"ird\\app\n', 404, 0.5)],
                           retries={"web": 1}, errors={"web-1": 2},
                           instances={"web-1": {"app": "web", "in_flight": 3, "pool_idle": 1,
                                                "draining": False}})])
    samples = parse(render(merged, workers=2))
    assert samples[("superagent_proxy_workers", lbl())] == 2
    assert samples[("superagent_proxy_requests_total",
                    lbl(app='we\\"ird\\\\app\\n', status="404"))] == 1
    assert samples[("superagent_proxy_retries_total", lbl(app="web"))] == 1
    assert samples[("superagent_proxy_upstream_connect_errors_total",
                    lbl(instance="web-1"))] == 2


def test_empty_render_is_valid() -> None:
    """With no traffic the exposition still parses and reports the worker count."""
    samples = parse(render(merge([]), workers=0))
    assert samples == {("superagent_proxy_workers", lbl()): 0}


def test_counters_add_up_across_workers() -> None:
    """Merged counters are the sums of the workers' counters."""
    parts = [
        worker([("web", 200, 0.01)] * 3 + [("web", 500, 0.01)], retries={"web": 2},
               errors={"web-1": 1}),
        worker([("web", 200, 0.02)] * 2 + [("api", 200, 0.02)], retries={"web": 1, "api": 4},
               errors={"web-1": 2, "api-1": 1}),
        worker([]),
    ]
    samples = parse(render(merge(parts), workers=3))
    req = "superagent_proxy_requests_total"
    assert samples[(req, lbl(app="web", status="200"))] == 5
    assert samples[(req, lbl(app="web", status="500"))] == 1
    assert samples[(req, lbl(app="api", status="200"))] == 1
    assert samples[("superagent_proxy_retries_total", lbl(app="web"))] == 3
    assert samples[("superagent_proxy_retries_total", lbl(app="api"))] == 4
    err = "superagent_proxy_upstream_connect_errors_total"
    assert samples[(err, lbl(instance="web-1"))] == 3
    assert samples[(err, lbl(instance="api-1"))] == 1
    assert samples[("superagent_proxy_request_duration_seconds_count", lbl(app="web"))] == 6
    assert samples[("superagent_proxy_request_duration_seconds_sum", lbl(app="web"))] == (
        pytest.approx(4 * 0.01 + 2 * 0.02, abs=1e-6))


def test_histogram_buckets_are_cumulative() -> None:
    """Bucket counts never decrease, ``le`` is inclusive, and +Inf equals the count."""
    seconds = [0.0001, 0.0005, 0.001, 0.003, 0.003, 0.05, 0.7, 2.5, 9.0, 10.0, 30.0, 120.0]
    half = len(seconds) // 2
    merged = merge([worker([("web", 200, s) for s in seconds[:half]]),
                    worker([("web", 200, s) for s in seconds[half:]])])
    samples = parse(render(merged, workers=2))
    name = "superagent_proxy_request_duration_seconds"
    buckets = [(float(dict(labels)["le"]), v) for (n, labels), v in samples.items()
               if n == f"{name}_bucket"]
    assert len(buckets) == len(BUCKETS) + 1
    buckets.sort()
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    for bound, count in buckets:
        assert count == sum(1 for s in seconds if s <= bound), bound
    assert buckets[-1] == (float("inf"), len(seconds))
    assert samples[(f"{name}_count", lbl(app="web"))] == len(seconds)
    assert samples[(f"{name}_sum", lbl(app="web"))] == pytest.approx(sum(seconds), abs=1e-5)


def test_instance_gauges_are_merged() -> None:
    """In-flight and idle counts add up; an instance is draining if any worker says so."""
    parts = [
        worker([], instances={"web-1": {"app": "web", "in_flight": 2, "pool_idle": 1,
                                        "draining": False}}),
        worker([], instances={"web-1": {"app": "web", "in_flight": 5, "pool_idle": 0,
                                        "draining": True},
                              "web-2": {"app": "web", "in_flight": 0, "pool_idle": 4,
                                        "draining": False}}),
    ]
    samples = parse(render(merge(parts), workers=2))
    assert samples[("superagent_proxy_in_flight", lbl(app="web", instance="web-1"))] == 7
    assert samples[("superagent_proxy_pool_idle_connections",
                    lbl(app="web", instance="web-1"))] == 1
    assert samples[("superagent_proxy_pool_idle_connections",
                    lbl(app="web", instance="web-2"))] == 4
    assert samples[("superagent_proxy_instance_draining", lbl(app="web", instance="web-1"))] == 1
    assert samples[("superagent_proxy_instance_draining", lbl(app="web", instance="web-2"))] == 0
