"""Debug sessions and request traces through the coordinator.

Theory of operation
-------------------
A *debug session* of an app is a window in which every participant running it keeps the
proxy's record of each of its requests as a ``proxy`` line (route, instance, timings,
status, bytes, retries, error: ``debug.events``). The participants own the windows and
close them when their TTL passes; the coordinator only relays:

- ``POST /api/v1/apps/{app}/debug`` (``{"ttl": seconds}``, default ``DEFAULT_TTL``)
  sends the participant ``debug`` signal, enabled, to every node running the app
  (``api_logs.app_nodes``), concurrently, with this coordinator's Raft term as the
  fence and a fresh signal id (a repeat of the request is a new signal: opening again
  extends the window). ``DELETE`` sends it disabled. The answer names each node's
  outcome; the session is open where it says ``ok``. A client keeps a session open by
  posting again before it ends, which also reaches nodes the app was scaled onto.
- ``GET /api/v1/trace/{request_id}`` (``?app=`` to narrow it) asks every node concerned
  for the lines carrying that request id (``/v1/logs?request_id=``): the app's own lines
  and events that name it, and the proxy's record (a session's line, or one of the app's
  recent records every participant keeps whether or not a session is open). They come
  back merged by time, each labelled with its node. Without ``app`` every node that is up
  is asked, and only lines of apps the token may read are shown.

Reading a trace is ``apps:read``; opening or closing a session is ``apps:write`` (both
scoped to the app's team, checked by the route table's policy: a token that may not see
the app's team gets a 404, as for any app of another team).
"""

from __future__ import annotations

import secrets
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from superagent.coordinator.api_common import Context, error, read_json
from superagent.coordinator.api_logs import app_nodes, gather, redactor, up_nodes
from superagent.coordinator.errors import BadRequest
from superagent.coordinator.host import ApiHost
from superagent.coordinator.logstream import TEXT_MAX, line_doc
from superagent.coordinator.policy import APPS_READ
from superagent.rpc import messages as msg
from superagent.rpc.errors import RpcError

DEFAULT_TTL = 1800.0  # seconds a session opened without a ttl stays open
SIGNAL_TIMEOUT = 10.0  # seconds one participant has to answer the debug signal
DEBUG_BODY: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {"ttl": {"type": "number", "minimum": 1, "maximum": msg.MAX_DEBUG_TTL}}}


def _ttl(body: dict[str, Any]) -> float:
    unknown = sorted(set(body) - {"ttl"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}: expected ['ttl']")
    ttl = body.get("ttl", DEFAULT_TTL)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) \
            or not 1 <= ttl <= msg.MAX_DEBUG_TTL:
        raise BadRequest(f"field 'ttl' must be a number of seconds 1-{msg.MAX_DEBUG_TTL:g},"
                         f" got {ttl!r}")
    return float(ttl)


async def signal_debug(c: ApiHost, app: str, *, enabled: bool, ttl: float
                       ) -> dict[str, dict[str, Any]]:
    """Send the debug signal to every node running ``app``; each node's outcome."""
    outcome: dict[str, dict[str, Any]] = {}
    nodes = app_nodes(c, app)
    base = f"debug-{app}-{secrets.token_hex(6)}"

    async def one(node: str, address: str) -> None:
        message = msg.Debug(id=f"{base}-{node}"[:200], term=c.term(), app=app,
                            enabled=enabled, ttl=ttl)
        try:
            with trio.fail_after(SIGNAL_TIMEOUT):
                reply = await c.participants.signal(address, message, timeout=SIGNAL_TIMEOUT)
        except (RpcError, trio.TooSlowError) as exc:
            outcome[node] = {"ok": False, "error": str(exc) or type(exc).__name__}
            return
        outcome[node] = {"ok": True, "debug": reply.debug, "until": reply.until}

    async with trio.open_nursery() as nursery:
        for node, address in nodes.items():
            nursery.start_soon(one, node, address)
    return dict(sorted(outcome.items()))


async def open_debug(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    app = request.path_params["app"]
    if not c.read(lambda s: app in s.apps):
        return error(404, "unknown_app", f"app {app!r} does not exist")
    ttl = _ttl(await read_json(request))
    nodes = await signal_debug(c, app, enabled=True, ttl=ttl)
    until = max((n["until"] for n in nodes.values() if n.get("until")), default=None)
    return JSONResponse({"ok": any(n["ok"] for n in nodes.values()), "app": app, "ttl": ttl,
                         "until": until, "nodes": nodes})


async def close_debug(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    app = request.path_params["app"]
    if not c.read(lambda s: app in s.apps):
        return error(404, "unknown_app", f"app {app!r} does not exist")
    nodes = await signal_debug(c, app, enabled=False, ttl=msg.DEBUG_TTL)
    return JSONResponse({"ok": all(n["ok"] for n in nodes.values()), "app": app,
                         "nodes": nodes})


async def trace(request: Request, ctx: Context) -> Response:
    """Every line carrying one request id, on every machine concerned, by time."""
    c = ctx.coordinator
    request_id = request.path_params["request_id"]
    if not 1 <= len(request_id) <= TEXT_MAX:
        raise BadRequest(f"a request id is 1-{TEXT_MAX} characters")
    unknown = sorted(set(request.query_params) - {"app"})
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r}: expected ['app']")
    app = request.query_params.get("app") or None
    if app is not None:
        team = c.read(lambda s: s.apps[app].team if app in s.apps else None)
        if team is None or not ctx.sees(team):  # another team's app does not exist for it
            return error(404, "unknown_app", f"app {app!r} does not exist")
        ctx.require(APPS_READ, team)
        nodes = app_nodes(c, app)
    else:
        nodes = up_nodes(c)
    lines, outcome = await gather(c, nodes, msg.LogsQuery(app=app, request_id=request_id,
                                                          n=msg.MAX_LOG_LINES))
    teams: dict[str, str | None] = c.read(lambda s: {a: s.apps[a].team for a in s.apps})
    shown = [line for line in lines
             if (team := teams.get(line.app)) is not None and ctx.sees(team)]
    hide = redactor(c, sorted({line.app for line in shown}))
    docs = [hide(line_doc(line)) for line in shown]
    return JSONResponse({"request_id": request_id, "app": app, "lines": docs,
                         "proxy": [doc for doc in docs if doc["stream"] == "proxy"],
                         "nodes": outcome})
