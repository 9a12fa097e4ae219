"""The API's access control, and the routes about access: API tokens, team quotas and
the audit log (filtered by what the caller may see).

Theory of operation: ``api._endpoint`` calls ``token_access`` for every route a token may
use. It finds the token by its hash (``auth.token_name``), refuses an expired one (401,
as an unknown or revoked one), and asks ``policy.decide`` whether the token's role and
teams allow the route's permission on the app the route names (its ``{app}`` path
parameter: the app's team, or none while the app does not exist). A refusal is a 403
whose JSON names what is missing (``"missing": "apps:write"`` or ``"team:shop"``). Lists
are filtered by ``Context.sees`` in their handlers, here for the audit log.

Token routes: ``POST /api/v1/tokens`` records a token's hash with its role, teams and
expiry. The client may send the token itself (``superagent tokens create`` does: a
retry with the same Idempotency-Key then applies once, as the hash is the same) or let
the coordinator make one; either way the answer shows it once and only its sha256 is
replicated. ``GET /api/v1/tokens`` lists them without hashes; ``last_used`` is when this
coordinator last authenticated the token (kept in memory: replicating every use would
cost a Raft write per request). ``DELETE /api/v1/tokens/{name}`` revokes one.

Routes are declared in ``api.ROUTES`` with the rest.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from superagent.coordinator import commands as cmd
from superagent.coordinator.api_common import (
    Context,
    bad_request,
    error,
    from_result,
    idempotency_key,
    read_json,
)
from superagent.coordinator.auth import TOKEN_PREFIX, new_token, token_hash, token_name
from superagent.coordinator.errors import BadRequest, Conflict, Forbidden
from superagent.coordinator.host import ApiHost
from superagent.coordinator.policy import (
    ADMIN,
    APPS_WRITE,
    GRANTS,
    ROLES,
    Decision,
    Principal,
    creation_team,
    decide,
    expired,
    sees,
)
from superagent.coordinator.state import ClusterState
from superagent.coordinator.tenancy import QUOTA_KEYS, usage
from superagent.jsonbody import field
from superagent.names import GROUP_NAME

AUDIT_DEFAULT, AUDIT_MAX = 100, 1000
TOKEN_MIN = len(TOKEN_PREFIX) + 32  # characters of a token a client brings: high entropy
TOKEN_MAX = 200
TOKEN_BODY: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["name", "role"],
    "properties": {"name": {"type": "string", "pattern": f"^{GROUP_NAME.pattern}$"},
                   "role": {"enum": list(ROLES)},
                   "teams": {"type": "array", "items": {"type": "string"}},
                   "expires_at": {"type": ["number", "null"]},
                   "token": {"type": "string", "minLength": TOKEN_MIN}}}
QUOTA_BODY: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {key: {"type": ["integer", "null"], "minimum": 0} for key in QUOTA_KEYS}}

_last_used: weakref.WeakKeyDictionary[ApiHost, dict[str, float]] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------- access
def token_access(coordinator: ApiHost, credential: str | None, permission: str,
                 path_params: Mapping[str, Any]) -> Principal | Response | None:
    """The principal of a valid token allowed to use ``permission`` here; a 401 or 403
    response when it is expired or not allowed; None when ``credential`` is no token."""
    app = path_params.get("app")

    def find(s: ClusterState) -> tuple[Principal, str | None] | None:
        name = token_name(credential, s.tokens)
        if name is None:
            return None
        found = s.apps.get(app) if isinstance(app, str) else None
        return Principal.from_record(name, s.tokens[name]), found.team if found else None

    found: tuple[Principal, str | None] | None = coordinator.read(find)
    if found is None:
        return None
    principal, team = found
    now = time.time()
    if expired(principal, now):
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(principal.expires_at))
        return error(401, "unauthorized", f"token {principal.name!r} expired at {when}")
    _last_used.setdefault(coordinator, {})[principal.name] = now
    decision = decide(principal, permission, team)
    if not decision.allowed and team is not None and not sees(principal, team):
        # what the token may not see does not exist for it: a 403 naming the team would
        # tell which apps other teams have
        return error(404, "unknown_app", f"app {app!r} does not exist")
    if not decision.allowed:
        return error(403, "forbidden", decision.reason, missing=decision.missing)
    return principal


def new_app_team(ctx: Context, requested: object) -> str:
    """The team a new app goes to (the one asked for, else the token's own); raises
    Forbidden when the token may not create apps there."""
    if requested is not None and not isinstance(requested, str):
        raise BadRequest(f"field 'team' must be a team name, got {requested!r}")
    if ctx.principal is None:
        return requested or "default"
    found = creation_team(ctx.principal, requested)
    if isinstance(found, Decision):
        raise Forbidden(found.reason, missing=found.missing)
    return found


def upload_team(ctx: Context, app: str, requested: str | None) -> str:
    """The team of an uploaded app: its own when it exists (``?team=`` must agree; raises
    Forbidden unless the token may write it), else the one a new app goes to
    (``new_app_team``)."""
    current = ctx.coordinator.read(lambda s: s.apps[app].team if app in s.apps else None)
    if current is None:
        return new_app_team(ctx, requested)
    if requested is not None and requested != current:
        raise Conflict(f"app {app!r} belongs to team {current!r}, not {requested!r}",
                       app=app)
    ctx.require(APPS_WRITE, current)  # the route checked it, unless it was made since
    return str(current)


# ---------------------------------------------------------------------- audit
def audit_visible(ctx: Context, entry: Mapping[str, Any]) -> bool:
    """An admin sees every entry; another token the entries of its teams' apps and quotas,
    and those about nodes and coordinators, but none about tokens."""
    if ctx.principal is None or ctx.principal.role == ADMIN:
        return True
    team = entry.get("team")
    target = str(entry.get("target", ""))
    if target.startswith(("app:", "team:")):
        app = target.removeprefix("app:")
        if team is None:  # an entry written before audit entries named their team
            team = ctx.coordinator.read(
                lambda s: s.apps[app].team if app in s.apps else "default")
        return ctx.sees(str(team))
    return not target.startswith("token:")


def whoami_doc(principal: Principal) -> dict[str, Any]:
    """A token's name, role, teams, expiry and the permissions its role holds (scoped
    ones only for its teams): what a client such as the dashboard shows and offers."""
    return {"name": principal.name, "role": principal.role, "teams": list(principal.teams),
            "expires_at": principal.expires_at,
            "permissions": sorted(GRANTS.get(principal.role, frozenset()))}


async def whoami(request: Request, ctx: Context) -> Response:
    if ctx.principal is None:  # a token route always has one
        return error(401, "unauthorized", "an API token is needed")
    return JSONResponse(whoami_doc(ctx.principal))


async def audit(request: Request, ctx: Context) -> Response:
    try:
        limit = int(request.query_params.get("limit", AUDIT_DEFAULT))
    except ValueError:
        return error(400, "bad_limit", "limit must be an integer")
    if not 1 <= limit <= AUDIT_MAX:
        return error(400, "bad_limit", f"limit must be 1..{AUDIT_MAX}")
    entries = ctx.coordinator.read(lambda s: [dict(e) for e in s.audit])
    visible = [e for e in reversed(entries) if audit_visible(ctx, e)]
    return JSONResponse({"audit": visible[:limit]})


# ---------------------------------------------------------------------- tokens
def token_view(name: str, record: Mapping[str, Any], last_used: float | None
               ) -> dict[str, Any]:
    principal = Principal.from_record(name, record)
    return {"name": name, "role": principal.role, "teams": list(principal.teams),
            "expires_at": principal.expires_at, "created_at": record.get("created_at"),
            "created_by": record.get("actor"), "last_used": last_used}


async def list_tokens(request: Request, ctx: Context) -> Response:
    used = _last_used.get(ctx.coordinator, {})
    tokens = ctx.coordinator.read(lambda s: [token_view(n, r, used.get(n))
                                             for n, r in sorted(s.tokens.items())])
    return JSONResponse({"tokens": tokens})


async def create_token(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    body = await read_json(request)
    unknown = sorted(set(body) - set(TOKEN_BODY["properties"]))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}: expected"
                         f" {sorted(TOKEN_BODY['properties'])}")
    name = field(body, "name", str, error=bad_request)
    role = field(body, "role", str, error=bad_request)
    teams = field(body, "teams", list, error=bad_request, default=[])
    if not all(isinstance(t, str) for t in teams):
        raise BadRequest("field 'teams' must be a list of team names")
    expires_at = body.get("expires_at")
    if expires_at is not None and (isinstance(expires_at, bool)
                                   or not isinstance(expires_at, int | float)):
        raise BadRequest("field 'expires_at' must be an epoch time (a number) or null")
    if expires_at is not None and expires_at <= time.time():
        raise BadRequest("field 'expires_at' is in the past")
    token = body.get("token")
    if token is None:
        token = new_token()
    elif not isinstance(token, str) or not TOKEN_MIN <= len(token) <= TOKEN_MAX \
            or not token.startswith(TOKEN_PREFIX) or any(ch.isspace() for ch in token):
        raise BadRequest(f"field 'token' must be {TOKEN_MIN}-{TOKEN_MAX} characters starting"
                         f" {TOKEN_PREFIX!r} (superagent makes one when it is left out)")
    digest = token_hash(token)
    if c.read(lambda s: any(r["sha256"] == digest for r in s.tokens.values())) \
            and c.read(lambda s: s.tokens.get(name, {}).get("sha256")) != digest:
        raise BadRequest("that token is already another token's: make a new one")
    command = c.command(cmd.AddToken, actor=ctx.actor, key=idempotency_key(request),
                        name=name, sha256=digest, role=role, teams=tuple(teams),
                        expires_at=None if expires_at is None else float(expires_at))
    result = await c.submit(command)
    if not result.get("ok"):
        return from_result(result)
    view = c.read(lambda s: token_view(name, s.tokens[name], None) if name in s.tokens
                  else None)
    return JSONResponse({**(view or {"name": name}), "token": token,
                         "repeated": bool(result.get("repeated"))}, status_code=201)


async def revoke_token(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    name = request.path_params["name"]
    command = c.command(cmd.RevokeToken, actor=ctx.actor, key=idempotency_key(request),
                        name=name)
    return from_result(await c.submit(command))


# ---------------------------------------------------------------------- teams and quotas
async def list_teams(request: Request, ctx: Context) -> Response:
    """The teams the caller sees (of apps, quotas and its token), with quota and usage."""
    def view(s: ClusterState) -> list[dict[str, Any]]:
        teams = {a.team for a in s.apps.values()} | set(s.quotas)
        if ctx.principal is not None:
            teams |= set(ctx.principal.teams)
        return [{"team": t, "quota": s.quotas.get(t), "usage": usage(s, t),
                 "apps": sorted(a.name for a in s.apps.values() if a.team == t)}
                for t in sorted(teams) if ctx.sees(t)]
    return JSONResponse({"teams": ctx.coordinator.read(view)})


async def set_quota(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    team = request.path_params["team"]
    body = await read_json(request)
    unknown = sorted(set(body) - set(QUOTA_KEYS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}: expected {list(QUOTA_KEYS)}")
    limits: dict[str, int | None] = {}
    for key in QUOTA_KEYS:
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise BadRequest(f"field {key!r} must be a count of 0 or more, or null")
        limits[key] = value
    command = c.command(cmd.SetQuota, actor=ctx.actor, key=idempotency_key(request),
                        team=team, **limits)
    return from_result(await c.submit(command))
