"""Reading the JSON object of a request body and its fields, for the internal HTTP APIs.

Both the coordinator's API and the participant's RPC refuse bad input with their own error
class; ``error(message, status)`` builds it, so each answers in its own vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

ErrorFactory = Callable[[str, int], Exception]
_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
          list: "a list", dict: "an object"}


async def read_object(request: Request, *, limit: int, error: ErrorFactory) -> dict[str, Any]:
    """The body as a JSON object; over ``limit`` bytes is a 413, anything else bad a 400."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise error(f"request body is over {limit} bytes", 413)
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise error("request body is not valid JSON", 400) from None
    if not isinstance(body, dict):
        raise error("request body must be a JSON object", 400)
    return body


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], *,
          error: ErrorFactory, default: Any = ...) -> Any:
    """``body[name]`` checked against ``kind`` (a bool is not an int); ``default`` when
    absent, which without a default is an error naming the field."""
    if name not in body:
        if default is ...:
            raise error(f"missing field {name!r}", 400)
        return default
    value = body[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(_NAMES.get(k, k.__name__) for k in kinds)
        raise error(f"field {name!r} must be {expected}", 400)
    return value
