"""Debug events: the proxy's record of one request, as a ``LogLine`` of the app it served.

Theory of operation
-------------------
Every proxy worker writes one JSON line per request to its access log (``event:
"access"``: request id, app, instance, rule, status, bytes, first-byte and total times,
retries, error; see ``superagent.proxy.accesslog``). ``access_record`` parses one such
line and says which app it belongs to and when the request was logged, so that whoever
reads the log can keep only the requests of apps with an open debug session
(``DebugSessions.covers``). ``access_line`` turns a kept record into a ``LogLine`` of
stream ``"proxy"`` attributed to that app, its release and instance, with the record as
``fields`` and its request id surfaced: the lines of one request id then show the
proxy's view beside the app's own output. Pure: no I/O, no trio.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from superagent.debug.records import LogLine

ACCESS_EVENT = "access"  # the ``event`` of the proxy's per-request access-log line


@dataclass(frozen=True, kw_only=True, slots=True)
class AccessRecord:
    """One parsed access-log line: which app and instance served it, when it was logged."""

    app: str
    instance: str
    logged: float  # epoch seconds, the proxy's own timestamp of the request
    record: dict[str, Any]


def access_record(raw: bytes | str) -> AccessRecord | None:
    """Parse one access-log line; ``None`` for anything that is not a request's record."""
    record: Any = None
    with contextlib.suppress(ValueError, RecursionError):  # UnicodeDecodeError included
        # decoding first spares json.loads its encoding detection: one per request served
        record = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    if not isinstance(record, dict) or record.get("event") != ACCESS_EVENT:
        return None
    app, when = record.get("app"), record.get("ts")
    if not isinstance(app, str) or isinstance(when, bool) or not isinstance(when, int | float):
        return None
    return AccessRecord(app=app, instance=str(record.get("instance") or "-"),
                        logged=float(when), record=record)


def access_line(event: AccessRecord, *, release: str, ts: float, seq: int) -> LogLine:
    """The ``LogLine`` that shows ``event`` among its app's output (read at ``ts``)."""
    record = event.record
    error = f", error {record['error']}" if record.get("error") else ""
    return LogLine(
        ts=ts, app=event.app, release=release, instance=event.instance, stream="proxy",
        seq=seq, fields=record, level="info",
        request_id=str(record.get("request_id") or "") or None, cut=False,
        text=(f"{record.get('method')} {record.get('path')} -> {record.get('status')}"
              f" in {record.get('duration_ms')} ms (first byte {record.get('first_byte_ms')}"
              f" ms, rule {record.get('rule')}, retries {record.get('retries')}{error})"))
