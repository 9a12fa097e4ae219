"""Reading the JSON object of a request body and its fields, for the internal HTTP APIs.

Both the coordinator's API and the participant's RPC refuse bad input with their own error
class; ``error(message, status)`` builds it, so each answers in its own vocabulary.

A body is hostile until parsed and bounded, so ``parse_json`` refuses, each with a 400
naming the problem, what would otherwise surface later as a 500: bytes that are not UTF-8
(``json.loads`` would guess UTF-16 or UTF-32 for bytes), nesting deeper than ``MAX_DEPTH``
(checked by a linear scan before the parser, whose recursion would end in a
RecursionError), ``NaN`` and ``Infinity`` (JSON has no such numbers, and a response holding
one cannot be written), and lone UTF-16 surrogate escapes (a string holding one cannot be
encoded as UTF-8 when it is echoed or stored). ``read_body`` stops reading at ``limit``
bytes with a 413.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

ErrorFactory = Callable[[str, int], Exception]
MAX_DEPTH = 32  # arrays and objects inside each other; real request bodies nest 3-4 deep
_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
          list: "a list", dict: "an object"}
# A string (escapes included; an unterminated one runs to the end, so a scan never
# backtracks) or a bracket: strings are matched only to skip the brackets inside them.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*+"?|[\[\]{}]', re.DOTALL)
_OPENING = frozenset(b"[{")


async def read_body(request: Request, *, limit: int, error: ErrorFactory) -> bytes:
    """The whole body; over ``limit`` bytes is a 413 raised as soon as it is passed."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise error(f"request body is over {limit} bytes", 413)
    return bytes(raw)


async def read_object(request: Request, *, limit: int, error: ErrorFactory) -> dict[str, Any]:
    """The body as a JSON object; over ``limit`` bytes is a 413, anything else bad a 400."""
    raw = await read_body(request, limit=limit, error=error)
    body = parse_json(raw or b"{}", error=error)
    if not isinstance(body, dict):
        raise error("request body must be a JSON object", 400)
    return body


def parse_json(raw: bytes, *, error: ErrorFactory, max_depth: int = MAX_DEPTH) -> Any:
    """A request body's JSON value, refused (400) as the module docstring says."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"request body is not UTF-8 (byte {exc.start})", 400) from None
    if nesting_depth(raw, stop_above=max_depth) > max_depth:
        raise error(f"request body nests arrays and objects more than {max_depth} deep", 400)
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except _Constant as exc:
        raise error(f"request body holds {exc}, which is not a JSON number", 400) from None
    except (ValueError, RecursionError):
        raise error("request body is not valid JSON", 400) from None
    if "\\u" in text:  # only an escape can make a lone surrogate
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise error("request body holds a lone UTF-16 surrogate escape", 400) from None
    return value


def nesting_depth(raw: bytes, *, stop_above: int | None = None) -> int:
    """The deepest nesting of arrays and objects in ``raw`` (brackets inside strings are
    skipped), or the first depth over ``stop_above``. Linear in ``len(raw)``; meaningful
    for valid JSON, harmless for the rest."""
    depth = deepest = 0
    for match in _TOKENS.finditer(raw):
        token = match.group()
        if len(token) != 1 or token[0] == 0x22:  # a string (or a lone quote)
            continue
        if token[0] in _OPENING:
            depth += 1
            deepest = max(deepest, depth)
            if stop_above is not None and deepest > stop_above:
                break
        else:
            depth -= 1
    return deepest


class _Constant(ValueError):
    """NaN, Infinity or -Infinity in a body."""


def _no_constant(name: str) -> Any:
    raise _Constant(name)


def _finite_float(text: str) -> float:
    """A JSON number as a float; one too large for a float (``1e999``) is refused rather
    than read as infinity."""
    value = float(text)
    if math.isinf(value):
        raise _Constant(text)
    return value


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
