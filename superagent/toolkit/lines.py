"""One debug event as one JSON line: its shape, its bounds, and writing it whole.

Theory of operation
-------------------
An event is a JSON object on one line of the app's stdout (or stderr), which the
participant already captures: ``{"ts": 1733480000.123456, "level": "info", "event":
"cache.miss", "request_id": "9f3c...", ...fields}``. The participant parses every line
that is a JSON object and files it under its ``request_id``, which is how ``superagent
trace ID`` and ``superagent debug APP`` put the app's events beside the proxy's record
of the same request (docs/toolkit.md has the wire for other languages).

- **Shape.** ``ts`` (seconds since the epoch, a number), ``level`` (lower-case text),
  ``event`` (text), ``request_id`` (text, or null outside a request), then the caller's
  fields in their order. A field named like one of those four is kept as ``<name>_``
  rather than silently overriding the envelope.
- **Values.** Anything JSON cannot say becomes text: ``str(value)`` (or the type's name
  when even that fails), a non-finite float its text (``"nan"``), a mapping's keys text.
  ``encode`` never raises on a value.
- **Bounds.** A string keeps ``MAX_STRING`` characters, a container ``MAX_ITEMS`` items,
  nesting ``MAX_DEPTH`` levels (so a cycle ends); what is cut says so (``"…"`` or a
  ``"+N more"`` item). A whole line keeps ``MAX_LINE`` bytes of UTF-8, well under the
  participant's 64 KiB line limit (a longer line would be cut there, and a cut line is
  never parsed): when the fields do not fit, the ones that fit are kept in order and
  ``"truncated": true`` is added.
- **Writing.** ``write_line`` writes the encoded line, newline included, in one write
  to the stream's binary buffer (after flushing what text was pending), under one
  process-wide lock, then flushes: lines from many threads never interleave, and lines
  from several processes sharing the file (gunicorn workers) do not either, as each is
  one ``write`` to an ``O_APPEND`` file.

Standard library only, Python 3.8 syntax: this package runs inside apps.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Mapping
from typing import IO, Any

from .context import current_request_id

MAX_LINE = 16 * 1024  # bytes of one encoded line, newline excluded
MAX_STRING = 4096  # characters of one string value
MAX_ITEMS = 100  # items of one list or object
MAX_DEPTH = 8  # levels of nesting below a field
ENVELOPE = ("ts", "level", "event", "request_id")
ELLIPSIS = "…"

_write_lock = threading.Lock()


def encode(event: str, fields: Mapping[str, Any], *, level: str = "info",
           request_id: str | None = None, ts: float | None = None) -> str:
    """The JSON line (no newline) of one event; never raises on a field's value."""
    head: dict[str, Any] = {
        "ts": round(time.time() if ts is None else ts, 6),
        "level": _text(level).lower(),
        "event": _text(event),
        "request_id": None if request_id is None else _text(request_id),
    }
    body = [(_field_name(key), _clean(value, 0)) for key, value in fields.items()]
    line = _dumps({**head, **dict(body)})
    if len(line.encode("utf-8")) <= MAX_LINE:
        return line
    # Too long: keep the envelope and the fields that fit, in order, and say so.
    head["truncated"] = True
    size = len(_dumps(head).encode("utf-8"))
    kept: dict[str, Any] = {}
    for key, value in body:
        piece = len(_dumps({key: value}).encode("utf-8")) - 1  # less "{}", plus ","
        if size + piece <= MAX_LINE:
            kept[key] = value
            size += piece
    return _dumps({**head, **kept})


def write_line(line: str, stream: IO[str] | None = None) -> None:
    """Write ``line`` and a newline to ``stream`` (default: the current ``sys.stdout``)
    as one write, under the process-wide lock, and flush. Output errors are ignored:
    a debug line must never fail the request that wrote it."""
    out = sys.stdout if stream is None else stream
    if out is None:  # pythonw, a closed stdout
        return
    data = (line + "\n").encode("utf-8")
    with _write_lock:
        try:
            binary = getattr(out, "buffer", None)
            if binary is not None:
                out.flush()  # text written before ours goes first
                binary.write(data)
                binary.flush()
            else:
                out.write(line + "\n")
                out.flush()
        except (OSError, ValueError):  # a closed or broken stream
            pass


def emit(event: str, *, level: str = "info", request_id: str | None = None,
         **fields: Any) -> None:
    """Write one debug event to stdout, bound to the current request id (or to
    ``request_id`` when given)."""
    rid = current_request_id() if request_id is None else request_id
    write_line(encode(event, fields, level=level, request_id=rid))


def _dumps(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _field_name(key: object) -> str:
    name = _text(key)
    return name + "_" if name in ENVELOPE or name == "truncated" else name


def _text(value: object) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = str(value)
        except Exception:  # a broken __str__ must not break the caller
            text = f"<{type(value).__name__}>"
    return text if len(text) <= MAX_STRING else text[:MAX_STRING] + ELLIPSIS


def _clean(value: Any, depth: int) -> Any:
    """``value`` as plain JSON data within the bounds of the module doc."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _text(value)
    if depth >= MAX_DEPTH:
        return ELLIPSIS
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for i, (key, item) in enumerate(value.items()):
            if i == MAX_ITEMS:
                out[ELLIPSIS] = f"+{len(value) - MAX_ITEMS} more"
                break
            out[_text(key)] = _clean(item, depth + 1)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        cleaned = [_clean(item, depth + 1) for item in items[:MAX_ITEMS]]
        if len(items) > MAX_ITEMS:
            cleaned.append(f"+{len(items) - MAX_ITEMS} more")
        return cleaned
    return _text(value)
