"""One request's bookkeeping as it crosses a client connection, and its access-log record.

Theory of operation. ``ClientConnection`` makes an ``Exchange`` when a request's first
byte arrives (so its time and a 408 count from there) and fills it in as the request is
routed and relayed: the app and rule it matched, the instance and retries, bytes each
way, the status, when the response head arrived, how long a cold start held it, and
the error code when the proxy answered itself. The connection's expiry reads
``total_deadline`` and ``response_started`` (whether a timeout can still be answered);
when the exchange ends, the metrics count it and ``access_record`` gives the line the
access log writes. A plain class with slots rather than a dataclass: it is made per
request and written field by field on the hot path (compiled with it, see
``superagent/compiled.py``).
"""

from __future__ import annotations

import math
import time
from typing import Any, Final

_monotonic: Final = time.monotonic


class Exchange:
    """One request's bookkeeping: what the access log, the metrics and expiry need."""

    __slots__ = ("app", "body_consumed", "bytes_in", "bytes_out", "cold", "error", "first_byte",
                 "instance", "method", "request_id", "response_started", "retries",
                 "rewrite", "rule", "started", "status", "target", "total_deadline")

    def __init__(self) -> None:
        self.started = _monotonic()
        self.total_deadline = math.inf
        self.app = "-"
        self.method: str | None = None
        self.target: str | None = None
        self.request_id = b"-"
        self.instance: str | None = None
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.retries = 0
        self.error: str | None = None
        self.response_started = False
        self.body_consumed = False
        self.rule: str | None = None
        self.first_byte: float | None = None  # when the upstream's response head arrived
        self.rewrite = b""  # the stripped prefix the response's paths get back (rewrite_paths)
        self.cold: float | None = None  # seconds held for the app's cold start

    def __repr__(self) -> str:
        return f"<Exchange app={self.app} status={self.status} target={self.target!r}>"

    def access_record(self, elapsed: float, peer: str) -> dict[str, Any]:
        """The access log's fields for this exchange, ``elapsed`` seconds after it began."""
        record: dict[str, Any] = {
            "request_id": self.request_id.decode("ascii", "replace"), "app": self.app,
            "instance": self.instance, "method": self.method, "path": self.target,
            "status": self.status, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "duration_ms": round(elapsed * 1000, 3), "retries": self.retries,
            "error": self.error, "peer": peer, "rule": self.rule,
            "first_byte_ms": (round((self.first_byte - self.started) * 1000, 3)
                              if self.first_byte is not None else None),
        }
        if self.cold is not None:
            record["cold_start_ms"] = round(self.cold * 1000, 3)
        return record
