"""``logging`` records as the toolkit's JSON lines, with the current request id.

Theory of operation
-------------------
An app that already logs with the standard ``logging`` module joins in by installing
``JsonHandler`` (or putting ``JsonFormatter`` on a handler of its own): every record
becomes one line of the shape ``lines.encode`` makes, ``event`` being the formatted
message (structlog's convention, which superagent's own logs follow), ``level`` the
level name in lower case, and the fields ``logger``, the ``extra=`` values the caller
gave, and ``exc`` (the formatted traceback) when the record has one.

The request id is read when the record is made, not when it is written:
``RequestIdFilter`` stamps ``record.request_id`` from the context variable, and the
formatter uses that stamp (the current id when there is none). ``JsonHandler`` carries the
filter itself; a setup whose handler formats in another thread (a ``QueueHandler``'s
listener) puts ``RequestIdFilter`` on the queue handler, which runs in the request's
thread. A record whose ``extra`` sets ``request_id`` keeps it.

Standard library only, Python 3.8 syntax: this package runs inside apps.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

from .context import current_request_id
from .lines import encode, write_line

# What every LogRecord has: anything else in its __dict__ came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)))
_RECORD_ATTRS |= {"message", "asctime", "request_id", "taskName"}


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line (no newline) of the toolkit's shape."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"logger": record.name}
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                fields[key] = value
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exc"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        request_id = getattr(record, "request_id", None)
        if request_id is None:
            request_id = current_request_id()
        return encode(record.getMessage(), fields, level=record.levelname,
                      request_id=request_id, ts=record.created)


class JsonHandler(logging.Handler):
    """Writes records as JSON lines to ``stream`` (default: the current ``sys.stdout``),
    one whole line per write, like ``emit``."""

    def __init__(self, stream: IO[str] | None = None, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.stream = stream
        self.setFormatter(JsonFormatter())
        self.addFilter(RequestIdFilter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging's convention: report, never raise into the caller
            self.handleError(record)
            return
        write_line(line, self.stream if self.stream is not None else sys.stdout)
