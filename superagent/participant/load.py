"""What each instance carries, for the coordinator's autoscaler: in-flight requests and CPU.

The heartbeat reports, per instance, ``in_flight`` (requests and websocket tunnels the
node's proxy workers have open to it now, summed over workers) and ``cpu`` (cores its
processes used since the previous sample: those its cgroup lists, else its process tree).
``LoadSampler`` is the pure part: it turns the proxy's instance table and each
instance's CPU seconds, taken at ``now``, into those figures, keeping the previous CPU
reading per instance. The participant service samples once per heartbeat interval
(``LOAD_PERIOD``), off the trio thread for the process reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LOAD_PERIOD = 1.0  # seconds between samples: one per heartbeat


class LoadSampler:
    """Per-instance load from successive readings (see the module docstring)."""

    def __init__(self) -> None:
        self._cpu: dict[str, tuple[float, float]] = {}  # instance -> (at, cpu seconds)
        self.latest: dict[str, dict[str, float]] = {}

    def __repr__(self) -> str:
        return f"<LoadSampler instances={len(self.latest)}>"

    def sample(self, now: float, proxy_instances: Mapping[str, Mapping[str, Any]],
               cpu_seconds: Mapping[str, float | None]) -> dict[str, dict[str, float]]:
        """Figures for every instance in ``cpu_seconds`` (the node's live instances).

        ``cpu`` is absent until an instance has two readings; an instance whose process
        is gone (None) reports no CPU; readings of instances no longer live are dropped.
        """
        out: dict[str, dict[str, float]] = {}
        for instance, seconds in cpu_seconds.items():
            figures: dict[str, float] = {
                "in_flight": float(proxy_instances.get(instance, {}).get("in_flight", 0))}
            before = self._cpu.get(instance)
            if seconds is None:
                self._cpu.pop(instance, None)
            else:
                if before is not None and now > before[0] and seconds >= before[1]:
                    figures["cpu"] = round((seconds - before[1]) / (now - before[0]), 3)
                self._cpu[instance] = (now, seconds)
            out[instance] = figures
        for gone in set(self._cpu) - set(cpu_seconds):
            del self._cpu[gone]
        self.latest = out
        return out


def traffic(stats: Mapping[str, Any], le: tuple[float, ...]) -> dict[str, Any]:
    """The heartbeat's ``traffic``: the proxy's cumulative figures per app (responses by
    status, the latency histogram over the bounds ``le``) from its merged ``stats``, for
    the coordinator's ``GET /api/v1/traffic`` (clients turn two readings into rates)."""
    apps: dict[str, dict[str, Any]] = {}
    for (app, status), n in (stats.get("requests") or {}).items():
        apps.setdefault(app, {"statuses": {}, "latency": []})["statuses"][str(status)] = n
    for app, histogram in (stats.get("latency") or {}).items():
        apps.setdefault(app, {"statuses": {}, "latency": []})["latency"] = list(histogram)
    return {"le": list(le), "apps": apps}
