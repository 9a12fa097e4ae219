"""The participants' side of the API and the node lifecycle: register, heartbeat, drain /
offline / online, and what still runs on a node.

Register and heartbeat change the leader's memory (its liveness of the nodes), so a
follower forwards them as they are (``api_common.forward``); so are the reads of what
runs on a node, which only the leader's heartbeats know. Routes are declared in
``api.ROUTES`` with the rest.
"""

from __future__ import annotations

from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from superagent.coordinator import commands as cmd
from superagent.coordinator.api_common import (
    Context,
    bad_request,
    error,
    forward,
    from_result,
    idempotency_key,
    read_json,
)
from superagent.coordinator.api_fleet import now
from superagent.coordinator.errors import Conflict, UnknownNode
from superagent.coordinator.host import ApiHost
from superagent.coordinator.reconcile_view import still_on
from superagent.errors import CodecError
from superagent.jsonbody import field
from superagent.rpc.errors import RpcError
from superagent.rpc.messages import Offline

log = structlog.get_logger(__name__)

OFFLINE_SIGNAL_TIMEOUT = 5.0  # best effort: a node that does not answer soon is told later


async def register_node(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    if not c.is_leader():
        return await forward(request, ctx)
    body = await read_json(request)
    node = field(body, "node", str, error=bad_request)
    if ctx.actor.startswith("node:") and ctx.actor != f"node:{node}":
        return error(403, "forbidden", f"this credential is {ctx.actor}'s: it cannot"
                                       f" register node {node!r}")
    if ctx.actor == "participants" and c.read(lambda s: s.trust.enrolled(node)):
        return error(403, "forbidden", f"node {node!r} is enrolled: it registers with its"
                                       " own credential, not the shared participant secret")
    command = c.command(cmd.RegisterNode, actor=f"node:{node}", node=node,
                        address=field(body, "address", str, error=bad_request),
                        groups=tuple(field(body, "groups", list, error=bad_request,
                                           default=["default"])),
                        capacity=field(body, "capacity", int, error=bad_request, default=100))
    result = await c.submit(command)
    if result.get("ok"):
        await c.heartbeat(node, None)
    return from_result(result)


async def heartbeat(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    if not c.is_leader():
        return await forward(request, ctx)
    body = await read_json(request)
    status = body.get("status")
    node = request.path_params["node"]
    if not await c.heartbeat(node, status if isinstance(status, dict) else None):
        raise UnknownNode(node)
    return JSONResponse({"ok": True})


def _still_on(c: ApiHost, node: str) -> dict[str, Any]:
    """What still runs on (or is placed on) ``node``, as this leader knows it."""
    found: dict[str, Any] | None = c.read(lambda s: still_on(s, node, c.liveness, now()))
    if found is None:
        raise UnknownNode(node)
    return found


async def node_running(request: Request, ctx: Context) -> Response:
    """What still runs on a node: a drain is over when both lists are empty."""
    c = ctx.coordinator
    if not c.is_leader():  # the heartbeats are in the leader's memory
        return await forward(request, ctx)
    return JSONResponse(_still_on(c, request.path_params["node"]))


async def node_lifecycle(request: Request, ctx: Context) -> Response:
    """drain / offline / online: commit the lifecycle, then tell the participant. A node
    goes offline only once nothing runs or is placed on it (409 naming what does)."""
    c = ctx.coordinator
    node, action = request.path_params["node"], request.path_params["action"]
    target = {"drain": "draining", "offline": "offline", "online": "online"}.get(action)
    if target is None:
        return error(404, "unknown_action", f"no node action {action!r}:"
                                            " use drain, offline or online")
    if target == "offline":
        if not c.is_leader():  # the heartbeats are in the leader's memory
            return await forward(request, ctx)
        left = _still_on(c, node)
        if left["lifecycle"] == "draining" and (left["instances"] or left["placed"]):
            what = left["instances"] or [f"{app} ({n} placed)"
                                         for app, n in left["placed"].items()]
            raise Conflict(f"node {node} still runs {', '.join(what)}: wait until its drain"
                           f" is over (superagent drain {node} follows it)")
    command = c.command(cmd.SetNodeLifecycle, actor=ctx.actor, key=idempotency_key(request),
                        node=node, lifecycle=target)
    result = await c.submit(command)
    if not result.get("ok"):
        return from_result(result)
    signalled = await _signal_offline(c, node, offline=target != "online", signal_id=command.key)
    return JSONResponse({**result, "signalled": signalled})


async def _signal_offline(c: ApiHost, node: str, *, offline: bool, signal_id: str) -> bool:
    """Best effort: the participant's proxy answers 503 on /-/healthz while not online."""
    address = c.read(lambda s: s.nodes[node].address if node in s.nodes else None)
    if address is None or c.http is None:
        return False
    try:
        message = Offline(id=f"lifecycle-{signal_id}", term=c.term(), offline=offline)
        await c.participants.signal(address, message, timeout=OFFLINE_SIGNAL_TIMEOUT)
    except (RpcError, CodecError) as exc:  # a key unfit for a signal id, or no answer
        log.warning("participant not signalled", node=node, error=str(exc))
        return False
    return True
