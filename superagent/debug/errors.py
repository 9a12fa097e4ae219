"""Errors of the debug package, grouped by what the caller does next.

    DebugError            base; never raised itself
    └── BadRecord         a JSON document is not a valid record, filter or cursor: the
                          sender is wrong (a 400 at an API, a skipped line in a merged
                          stream); ``field`` names the offending key. Also a ``ValueError``,
                          so callers that caught the ``ValueError`` of a malformed
                          document before this package existed still do.
"""

from __future__ import annotations

from superagent.errors import SuperagentError


class DebugError(SuperagentError):
    """Base of the errors of ``superagent.debug``."""


class BadRecord(DebugError, ValueError):
    """A JSON document that does not decode to a record, filter or cursor."""

    def __init__(self, message: str, *, kind: str, field: str = "") -> None:
        self.kind = kind
        self.field = field
        where = f"{kind}.{field}" if field else kind
        super().__init__(f"{where}: {message}")
