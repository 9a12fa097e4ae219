"""LoadSampler: in-flight from the proxy's table, CPU cores from successive readings."""

from __future__ import annotations

import pytest

from superagent.participant.load import LoadSampler, traffic


def test_in_flight_comes_from_the_proxy_table_and_cpu_needs_two_readings() -> None:
    sampler = LoadSampler()
    first = sampler.sample(10.0, {"web-1": {"in_flight": 3}}, {"web-1": 5.0, "web-2": 1.0})
    assert first == {"web-1": {"in_flight": 3.0}, "web-2": {"in_flight": 0.0}}
    second = sampler.sample(12.0, {"web-1": {"in_flight": 1}}, {"web-1": 6.0, "web-2": 1.0})
    assert second["web-1"] == {"in_flight": 1.0, "cpu": pytest.approx(0.5)}
    assert second["web-2"] == {"in_flight": 0.0, "cpu": 0.0}
    assert sampler.latest == second


def test_a_restarted_process_or_a_gone_instance_starts_over() -> None:
    sampler = LoadSampler()
    sampler.sample(0.0, {}, {"web-1": 50.0, "web-2": 3.0})
    after_restart = sampler.sample(1.0, {}, {"web-1": 0.2, "web-2": None})  # counter went back
    assert "cpu" not in after_restart["web-1"] and "cpu" not in after_restart["web-2"]
    sampler.sample(2.0, {}, {"web-1": 0.7})
    assert sampler.sample(3.0, {}, {"web-1": 1.7})["web-1"]["cpu"] == pytest.approx(1.0)
    assert set(sampler.latest) == {"web-1"}


def test_traffic_is_the_proxy_counters_per_app_with_the_bucket_bounds() -> None:
    stats = {"requests": {("a", 200): 5, ("a", 502): 1, ("b", 200): 2},
             "latency": {"a": [1.0, 5.0, 0.0, 0.3, 6.0]}, "instances": {}}
    assert traffic(stats, (0.1, 1.0)) == {"le": [0.1, 1.0], "apps": {
        "a": {"statuses": {"200": 5, "502": 1}, "latency": [1.0, 5.0, 0.0, 0.3, 6.0]},
        "b": {"statuses": {"200": 2}, "latency": []}}}
    assert traffic({}, (0.1,)) == {"le": [0.1], "apps": {}}
