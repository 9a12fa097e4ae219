"""The structured access log: one JSON line per request.

Lines are buffered and written in batches (at ``FLUSH_BYTES`` or by the
worker's periodic flush), so logging a request costs one ``json.dumps`` and no
syscall. The line shape matches the rest of superagent's JSON logs (``event``,
``level``, plus fields), with an epoch ``ts`` because formatting a timestamp per
request is measurable on the hot path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

FLUSH_BYTES = 64 * 1024  # a batch big enough that logging costs no syscall per request

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class AccessLog:
    """Buffers access-log lines for ``write`` (a file's write or a test's sink)."""

    __slots__ = ("_buffer", "_size", "_write")

    def __init__(self, write: Callable[[bytes], Any]) -> None:
        self._write = write
        self._buffer: list[bytes] = []
        self._size = 0

    def __repr__(self) -> str:
        return f"<AccessLog buffered={len(self._buffer)}>"

    def record(self, fields: dict[str, Any]) -> None:
        fields["event"] = "access"
        fields["level"] = "info"
        fields["ts"] = round(time.time(), 6)
        line = _dumps(fields).encode() + b"\n"
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            data = b"".join(self._buffer)
            self._buffer.clear()
            self._size = 0
            self._write(data)
