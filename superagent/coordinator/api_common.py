"""What every module of the coordinator's HTTP API shares: the request context, JSON
error answers, request bodies and idempotency keys.

The routes themselves are declared in one place, ``api.ROUTES``; the handlers live in
``api`` and in modules beside it (``api_fleet``), which import from here rather than
from ``api`` so that ``api`` can import their handlers without a cycle.

Errors are JSON ``{"error": code, "detail": message}`` with the status the error names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from superagent.coordinator import commands as cmd
from superagent.coordinator.errors import BadRequest, CoordinatorError
from superagent.coordinator.host import ApiHost
from superagent.jsonbody import read_object

MAX_JSON = 1024 * 1024  # bytes of a JSON request body
CLIENT_KEY_MAX = cmd.KEY_MAX - 16  # room for the suffixes of derived keys (":deploy")


@dataclass(frozen=True)
class Context:
    coordinator: ApiHost
    actor: str


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


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= CLIENT_KEY_MAX:
        raise BadRequest(f"Idempotency-Key must be 1-{CLIENT_KEY_MAX} characters")
    return key
