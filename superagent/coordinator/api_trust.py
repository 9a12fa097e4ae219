"""The API of machine trust: join tokens, enrolment, revocation.

``POST /api/v1/nodes/join-tokens`` (admin) makes a join token and answers it once; only
its sha256 is committed (``AddJoinToken``). ``POST /api/v1/nodes/enrol`` (bearer: the join
token) commits ``EnrolNode``: the state spends the token and records the hash of the
machine's credential and its signal key (the participant made both, see
``superagent.rpc.credentials``); a bad, spent or expired token is a 401 ``join_refused``
naming which. An unknown token is refused before anything is proposed, so requests with
made-up tokens never reach the Raft log. ``POST /api/v1/nodes/{node}/revoke`` (admin)
commits ``RevokeNode``: the node's credential is refused from then on (401) and the node is
marked down, so it gets no work; enrolling it again needs a join token issued for it.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from superagent.config import parse_duration
from superagent.coordinator import commands as cmd
from superagent.coordinator.api_common import (
    Context,
    bad_request,
    error,
    from_result,
    idempotency_key,
    read_json,
)
from superagent.coordinator.auth import bearer
from superagent.jsonbody import field
from superagent.rpc.credentials import credential_hash, new_join_token

JOIN_TOKEN_DEFAULT_TTL = 3600.0  # a join token is for enrolling a machine now, not later
JOIN_TOKEN_MAX_TTL = 30 * 24 * 3600.0  # a longer-lived one is a shared secret in disguise

JOIN_TOKEN_BODY = {"type": "object", "properties": {
    "expires": {"type": ["string", "number"], "description": "lifetime, e.g. \"1h\""},
    "uses": {"type": "integer", "minimum": 0, "description": "machines (0: until expiry)"},
    "node": {"type": "string", "description": "only this node (may replace its credential)"},
}}
ENROL_BODY = {"type": "object", "required": ["node", "credential_sha256", "signal_key"],
              "properties": {"node": {"type": "string"},
                             "credential_sha256": {"type": "string"},
                             "signal_key": {"type": "string"}}}


async def create_join_token(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    body = await read_json(request)
    raw = body.get("expires", JOIN_TOKEN_DEFAULT_TTL)
    try:
        ttl = parse_duration(raw)
    except ValueError as exc:
        return error(400, "bad_expires", f"expires: {exc}")
    if not 0 < ttl <= JOIN_TOKEN_MAX_TTL:
        return error(400, "bad_expires", f"expires must be more than 0 and at most"
                                         f" {JOIN_TOKEN_MAX_TTL / 86400:g} days")
    uses = field(body, "uses", int, error=bad_request, default=1)
    node = field(body, "node", str, error=bad_request, default="")
    token = new_join_token()
    now = time.time()
    command = c.command(cmd.AddJoinToken, actor=ctx.actor, key=idempotency_key(request),
                        sha256=credential_hash(token), expires_at=now + ttl, uses=uses,
                        node=node)
    result = await c.submit(command)
    if not result.get("ok"):
        return from_result(result)
    if result.get("repeated"):  # the token of the first request is gone with its answer
        return error(409, "conflict", "this idempotency key already made a join token;"
                                      " its token was shown once: make a new one")
    return JSONResponse({"ok": True, "token": token, "expires_at": now + ttl, "uses": uses,
                         "node": node or None}, status_code=201)


async def enrol_node(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    join = bearer(request.headers.get("authorization", "")) or ""
    body = await read_json(request)
    node = field(body, "node", str, error=bad_request)
    credential_sha256 = field(body, "credential_sha256", str, error=bad_request)
    if not c.read(lambda s: s.trust.known_join(credential_hash(join), node,
                                               credential_sha256)):
        return error(401, "join_refused", "the join token is unknown or already used: ask"
                                          " an admin for a new one (superagent nodes"
                                          " join-token)")
    command = c.command(cmd.EnrolNode, actor=f"node:{node}",
                        key=f"enrol:{node}:{credential_sha256[:32]}", node=node,
                        join_sha256=credential_hash(join), credential_sha256=credential_sha256,
                        signal_key=field(body, "signal_key", str, error=bad_request))
    return from_result(await c.submit(command))


async def revoke_node(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    node = request.path_params["node"]
    command = c.command(cmd.RevokeNode, actor=ctx.actor, key=idempotency_key(request),
                        node=node)
    result = await c.submit(command)
    if result.get("ok"):
        c.liveness.forget(node)  # on the leader: no stale heartbeat brings it back up
    return from_result(result)
