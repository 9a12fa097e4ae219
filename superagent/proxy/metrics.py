"""Per-worker counters, merged by the admin server into Prometheus text.

Workers count in plain dicts on the hot path (a few increments per request) and
hand a JSON snapshot over the control socket; ``merge`` adds the workers'
figures and ``render`` writes the exposition format.
"""

from __future__ import annotations

import bisect
from typing import Any, Final

# Latency buckets in seconds: a loopback hop is sub-millisecond, slow apps take seconds.
BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                  10.0)
# Cold-start buckets in seconds: from a small binary's boot to a large app's import time.
COLD_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_bisect: Final = bisect.bisect_left


class _AppFigures:
    """One app's counts in one worker: requests by status and the latency histogram."""

    __slots__ = ("buckets", "count", "statuses", "total")

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last: slower than the last bucket
        self.total = 0.0
        self.count = 0

    def __repr__(self) -> str:
        return f"<_AppFigures count={self.count}>"


class Metrics:
    """Counters of one worker."""

    __slots__ = ("apps", "cold_starts", "connect_errors", "retries")

    def __init__(self) -> None:
        self.apps: dict[str, _AppFigures] = {}
        # app -> cold-start bucket counts (the last: slower), the sum of seconds, the count
        self.cold_starts: dict[str, list[float]] = {}
        self.retries: dict[str, int] = {}
        self.connect_errors: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<Metrics requests={sum(f.count for f in self.apps.values())}>"

    def observe(self, app: str, status: int, seconds: float) -> None:
        figures = self.apps.get(app)
        if figures is None:
            figures = self.apps[app] = _AppFigures()
        statuses = figures.statuses
        statuses[status] = statuses.get(status, 0) + 1
        figures.buckets[_bisect(BUCKETS, seconds)] += 1
        figures.total += seconds
        figures.count += 1

    def cold_start(self, app: str, seconds: float) -> None:
        """One cold start of ``app``: how long its first held request waited."""
        hist = self.cold_starts.get(app)
        if hist is None:
            hist = self.cold_starts[app] = [0.0] * (len(COLD_BUCKETS) + 3)
        hist[_bisect(COLD_BUCKETS, seconds)] += 1
        hist[-2] += seconds
        hist[-1] += 1

    def retry(self, app: str) -> None:
        self.retries[app] = self.retries.get(app, 0) + 1

    def connect_error(self, instance: str) -> None:
        self.connect_errors[instance] = self.connect_errors.get(instance, 0) + 1

    def to_json(self) -> dict[str, Any]:
        """``requests``: [app, status, n] rows; ``latency``: per app, the bucket counts,
        the count slower than the last bucket, the sum of seconds and the count."""
        return {
            "requests": [[app, status, n] for app, f in self.apps.items()
                         for status, n in f.statuses.items()],
            "latency": {app: [*map(float, f.buckets), f.total, float(f.count)]
                        for app, f in self.apps.items()},
            "retries": self.retries,
            "connect_errors": self.connect_errors,
            "cold_starts": {app: list(hist) for app, hist in self.cold_starts.items()},
        }


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up the ``to_json`` figures and instance tables of several workers."""
    requests: dict[tuple[str, int], int] = {}
    latency: dict[str, list[float]] = {}
    retries: dict[str, int] = {}
    errors: dict[str, int] = {}
    cold: dict[str, list[float]] = {}
    instances: dict[str, dict[str, Any]] = {}
    for part in parts:
        m = part["metrics"]
        for app, status, n in m["requests"]:
            requests[(app, status)] = requests.get((app, status), 0) + n
        for app, hist in m["latency"].items():
            acc = latency.setdefault(app, [0.0] * len(hist))
            for i, v in enumerate(hist):
                acc[i] += v
        for app, hist in m.get("cold_starts", {}).items():  # older workers have none
            acc = cold.setdefault(app, [0.0] * len(hist))
            for i, v in enumerate(hist):
                acc[i] += v
        for source, dest in ((m["retries"], retries), (m["connect_errors"], errors)):
            for key, n in source.items():
                dest[key] = dest.get(key, 0) + n
        for inst_id, info in part["instances"].items():
            acc_inst = instances.setdefault(inst_id, {"app": info["app"], "in_flight": 0,
                                                      "pool_idle": 0, "draining": False})
            acc_inst["in_flight"] += info["in_flight"]
            acc_inst["pool_idle"] += info["pool_idle"]
            acc_inst["draining"] = acc_inst["draining"] or info["draining"]
    # Why a TLS certificate pair does not load, once per distinct reason (worker.py).
    tls_errors = sorted({why for part in parts for why in part.get("tls_errors", ())})
    return {"requests": requests, "latency": latency, "retries": retries,
            "connect_errors": errors, "instances": instances, "cold_starts": cold,
            "tls_errors": tls_errors}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(merged: dict[str, Any], *, workers: int) -> str:
    """Prometheus text exposition of merged figures."""
    out = [
        "# HELP superagent_proxy_workers Proxy worker processes answering.",
        "# TYPE superagent_proxy_workers gauge",
        f"superagent_proxy_workers {workers}",
        "# HELP superagent_proxy_requests_total Requests answered, by app and status.",
        "# TYPE superagent_proxy_requests_total counter",
    ]
    for (app, status), n in sorted(merged["requests"].items()):
        out.append(f'superagent_proxy_requests_total{{app="{_label(app)}",status="{status}"}} {n}')
    out += ["# HELP superagent_proxy_request_duration_seconds Time from request head to the"
            " end of the response.",
            "# TYPE superagent_proxy_request_duration_seconds histogram"]
    for app, hist in sorted(merged["latency"].items()):
        cumulative = 0.0
        name = "superagent_proxy_request_duration_seconds"
        for bound, count in zip(BUCKETS, hist, strict=False):
            cumulative += count
            out.append(f'{name}_bucket{{app="{_label(app)}",le="{bound}"}} {int(cumulative)}')
        out.append(f'{name}_bucket{{app="{_label(app)}",le="+Inf"}} {int(hist[-1])}')
        out.append(f'{name}_sum{{app="{_label(app)}"}} {hist[-2]:.6f}')
        out.append(f'{name}_count{{app="{_label(app)}"}} {int(hist[-1])}')
    out += ["# HELP superagent_proxy_cold_start_seconds Wait of the first request held for an"
            " app's cold start, from its arrival to its instance being routed.",
            "# TYPE superagent_proxy_cold_start_seconds histogram"]
    for app, hist in sorted(merged.get("cold_starts", {}).items()):
        cumulative = 0.0
        name = "superagent_proxy_cold_start_seconds"
        for bound, count in zip(COLD_BUCKETS, hist, strict=False):
            cumulative += count
            out.append(f'{name}_bucket{{app="{_label(app)}",le="{bound}"}} {int(cumulative)}')
        out.append(f'{name}_bucket{{app="{_label(app)}",le="+Inf"}} {int(hist[-1])}')
        out.append(f'{name}_sum{{app="{_label(app)}"}} {hist[-2]:.6f}')
        out.append(f'{name}_count{{app="{_label(app)}"}} {int(hist[-1])}')
    out += ["# HELP superagent_proxy_retries_total Requests retried on a fresh connection or"
            " another instance.", "# TYPE superagent_proxy_retries_total counter"]
    for app, n in sorted(merged["retries"].items()):
        out.append(f'superagent_proxy_retries_total{{app="{_label(app)}"}} {n}')
    out += ["# HELP superagent_proxy_upstream_connect_errors_total Failed connects, by instance.",
            "# TYPE superagent_proxy_upstream_connect_errors_total counter"]
    for inst, n in sorted(merged["connect_errors"].items()):
        out.append(f'superagent_proxy_upstream_connect_errors_total{{instance="{_label(inst)}"}}'
                   f' {n}')
    gauges = (("in_flight", "superagent_proxy_in_flight", "Requests and tunnels in flight."),
              ("pool_idle", "superagent_proxy_pool_idle_connections",
               "Idle keep-alive connections pooled."),
              ("draining", "superagent_proxy_instance_draining", "1 while marked draining."))
    for key, metric, help_text in gauges:
        out += [f"# HELP {metric} {help_text} By instance.", f"# TYPE {metric} gauge"]
        for inst, info in sorted(merged["instances"].items()):
            out.append(f'{metric}{{app="{_label(info["app"])}",instance="{_label(inst)}"}}'
                       f' {int(info[key])}')
    return "\n".join(out) + "\n"
