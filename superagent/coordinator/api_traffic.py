"""``GET /api/v1/traffic``: the proxies' request counters per app, summed over machines.

Theory of operation: each participant reads its proxy workers' figures once a second
(for its load sample) and puts the cumulative ones in its heartbeat's ``traffic``: per
app, responses by status and the latency histogram (bucket counts, the slower-than-all
count, total seconds, count) with the bucket bounds in ``le``. The leader holds the last
heartbeat of every node in memory; this view adds them up for the apps the token sees.
The counters only grow (until a proxy restarts), so a client takes two readings and
divides the difference by the time between them: requests per second, the share of
5xx answers, and percentiles from the histogram's difference. A follower has no
heartbeats and forwards the request to the leader, as ``/nodes/{node}/running`` does.

Routes are declared in ``api.ROUTES`` with the rest.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from superagent.coordinator.api_common import Context, forward

# the largest figure taken from a heartbeat: a count or a number of seconds beyond it is
# no real proxy's, and bounding each one keeps the sums over nodes finite (an int too
# large for a float, or an infinite sum, would fail the view or its JSON encoding)
MAX_FIGURE = float(2**53)


def _figure(value: object) -> float | None:
    """``value`` as a float when it is a plausible counter: a number (not a bool) in
    0..MAX_FIGURE; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and not 0 <= value <= MAX_FIGURE:
        return None  # checked before float(), which fails on a huge int
    number = float(value)
    return number if 0.0 <= number <= MAX_FIGURE else None


def _add(into: list[float], values: object) -> list[float]:
    if not isinstance(values, list):
        return into
    figures = [_figure(v) for v in values]
    if any(f is None for f in figures):
        return into
    if len(into) < len(figures):
        into.extend([0.0] * (len(figures) - len(into)))
    for i, f in enumerate(figures):
        into[i] += f or 0.0
    return into


def merge_traffic(statuses: dict[str, Any], shown: set[str]) -> dict[str, Any]:
    """The sum over nodes' heartbeat ``traffic`` of the apps in ``shown``: ``{"le",
    "apps": {app: {"requests", "errors", "statuses", "latency", "nodes"}}}``. A
    heartbeat's document is the participant's word: what is not of the expected shape is
    skipped."""
    le: list[float] = []
    apps: dict[str, dict[str, Any]] = {}
    for node, status in sorted(statuses.items()):
        traffic = status.get("traffic") if isinstance(status, dict) else None
        if not isinstance(traffic, dict) or not isinstance(traffic.get("apps"), dict):
            continue
        if isinstance(traffic.get("le"), list) and not le:
            le = [f for f in map(_figure, traffic["le"]) if f is not None]
        for app, figures in traffic["apps"].items():
            if app not in shown or not isinstance(figures, dict):
                continue
            acc = apps.setdefault(app, {"requests": 0, "errors": 0, "statuses": {},
                                        "latency": [], "nodes": []})
            acc["nodes"].append(node)
            counts = figures.get("statuses")
            for code, n in (counts.items() if isinstance(counts, dict) else ()):
                # isascii: "²".isdigit() holds, but int() refuses it
                if (isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_FIGURE
                        and str(code).isascii() and str(code).isdigit()):
                    acc["statuses"][str(code)] = acc["statuses"].get(str(code), 0) + n
                    acc["requests"] += n
                    acc["errors"] += n if int(code) >= 500 else 0
            _add(acc["latency"], figures.get("latency"))
    return {"le": le, "apps": apps}


async def traffic(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    if not c.is_leader():
        return await forward(request, ctx)
    shown = c.read(lambda s: {name for name, app in s.apps.items() if ctx.sees(app.team)})
    return JSONResponse({"at": time.time(), **merge_traffic(c.liveness.status, shown)})
