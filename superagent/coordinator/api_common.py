"""What every module of the coordinator's HTTP API shares: the request context, JSON
error answers, request bodies and idempotency keys.

The routes themselves are declared in one place, ``api.ROUTES``; the handlers live in
``api`` and in modules beside it (``api_fleet``), which import from here rather than
from ``api`` so that ``api`` can import their handlers without a cycle.

Errors are JSON ``{"error": code, "detail": message}`` with the status the error names;
``unrouted`` gives a path no route matches (404 ``not_found``) and a method the path does
not take (405 ``method_not_allowed``, with ``Allow``) that same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from superagent.coordinator import commands as cmd
from superagent.coordinator.errors import BadRequest, CoordinatorError, Forbidden, NoLeader
from superagent.coordinator.host import ApiHost
from superagent.coordinator.policy import Principal, decide, sees
from superagent.httpserver import allowed_methods
from superagent.jsonbody import read_body, read_object

MAX_JSON = 1024 * 1024  # bytes of a JSON request body
CLIENT_KEY_MAX = cmd.KEY_MAX - 16  # room for the suffixes of derived keys (":deploy")


@dataclass(frozen=True)
class Context:
    coordinator: ApiHost
    actor: str
    principal: Principal | None = None  # the API token's; None for a machine

    def sees(self, team: str) -> bool:
        """Whether lists show this caller things of ``team`` (``policy.sees``)."""
        return self.principal is None or sees(self.principal, team)

    def require(self, permission: str, team: str) -> None:
        """Raise Forbidden unless the caller may use ``permission`` on ``team``: for the
        checks a handler makes past the route's own (the team a new app goes to)."""
        if self.principal is None:
            return
        decision = decide(self.principal, permission, team)
        if not decision.allowed:
            raise Forbidden(decision.reason, missing=decision.missing)


def error(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, **extra}, status_code=status)


def from_result(result: dict[str, Any], status: int = 200) -> JSONResponse:
    """A state result as a response: its own status and code when it is an error."""
    if result.get("ok"):
        return JSONResponse(result, status_code=status)
    return error(int(result.get("status", 400)), str(result.get("code", "error")),
                 str(result.get("error", "")))


def bad_request(message: str, status: int) -> CoordinatorError:
    return BadRequest(message, status)


async def read_json(request: Request) -> dict[str, Any]:
    return await read_object(request, limit=MAX_JSON, error=bad_request)


def truthy(value: object) -> bool:
    """A flag from JSON (true) or a query string ("1", "true", "yes")."""
    return value is True or (isinstance(value, str) and value.lower() in ("1", "true", "yes"))


_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def query_flag(request: Request, name: str, *, default: bool) -> bool:
    """A boolean query parameter; anything but 1/0, true/false, yes/no is a 400 naming it."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = _FLAGS.get(raw.strip().lower())
    if value is None:
        raise BadRequest(f"query parameter {name!r} must be true or false, not {raw[:40]!r}")
    return value


async def unrouted(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no route, a method the route does not take) as JSON."""
    assert isinstance(exc, HTTPException)
    method, path = request.method, request.url.path
    if exc.status_code == 404:
        return error(404, "not_found", f"no route for {path}")
    if exc.status_code == 405:
        allowed = allowed_methods(request.app.router.routes, request.scope)
        response = error(405, "method_not_allowed", f"{method} is not allowed on {path};"
                                                    f" allowed: {', '.join(allowed)}")
        response.headers["allow"] = ", ".join(allowed)
        return response
    return error(exc.status_code, "http_error", str(exc.detail))


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= CLIENT_KEY_MAX:
        raise BadRequest(f"Idempotency-Key must be 1-{CLIENT_KEY_MAX} characters")
    return key


async def forward(request: Request, ctx: Context) -> Response:
    """Send this request as it is to the leader and answer with the leader's answer."""
    c = ctx.coordinator
    url = c.leader_url()
    if url is None or c.http is None:
        raise NoLeader(node=c.config.id)
    headers = {k: v for k, v in request.headers.items()
               if k in ("authorization", "content-type", "idempotency-key")}
    # the path as the client sent it (still percent-encoded): a decoded one may hold
    # characters no URL can carry
    path = bytes(request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
    try:
        answer = await c.http.request(request.method, f"{url}{path}",
                                      content=await read_body(request, limit=MAX_JSON,
                                                              error=bad_request),
                                      headers=headers)
    except httpx.InvalidURL as exc:
        return error(400, "bad_path", f"the path cannot be forwarded to the leader: {exc}")
    except httpx.HTTPError as exc:
        return error(503, "no_leader", f"the leader at {url} is unreachable: {exc!r}")
    return Response(answer.content, status_code=answer.status_code,
                    media_type=answer.headers.get("content-type"))
