"""Which log lines a consumer wants: ``LogFilter``, and its JSON shape.

Theory of operation
-------------------
A filter is a conjunction of optional equalities on a ``LogLine``: the machine, the app,
the instance, the level (ignoring case) and the request id. ``None`` matches anything.
The same value filters a participant's ring buffers and live subscriptions and, sent as
JSON (``"type": "log_filter"``, every key present, ``null`` for "any"), a coordinator's
merged stream, so a filter asked of the coordinator can be passed on to each participant
as it is. Pure: no I/O, no trio.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from superagent.debug.errors import BadRecord
from superagent.debug.records import LogLine

FILTER_TYPE = "log_filter"


@dataclass(frozen=True, kw_only=True, slots=True)
class LogFilter:
    """Which lines a subscriber wants; ``None`` matches anything. ``level`` ignores case."""

    node: str | None = None
    app: str | None = None
    instance: str | None = None
    level: str | None = None
    request_id: str | None = None

    def matches(self, line: LogLine) -> bool:
        return ((self.node is None or line.node == self.node)
                and (self.app is None or line.app == self.app)
                and (self.instance is None or line.instance == self.instance)
                and (self.level is None
                     or (line.level is not None and line.level.lower() == self.level.lower()))
                and (self.request_id is None or line.request_id == self.request_id))

    def to_json(self) -> dict[str, Any]:
        return {"type": FILTER_TYPE, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_json(cls, doc: object) -> LogFilter:
        """The inverse of ``to_json`` (missing keys mean "any"); raises ``BadRecord``."""
        if not isinstance(doc, dict):
            raise BadRecord("not a JSON object", kind=FILTER_TYPE)
        values: dict[str, str | None] = {}
        for f in fields(cls):
            value = doc.get(f.name)
            if value is not None and not isinstance(value, str):
                raise BadRecord(f"must be a string or null, not {value!r}", kind=FILTER_TYPE,
                                field=f.name)
            values[f.name] = value
        unknown = set(doc) - set(values) - {"type"}
        if unknown:
            raise BadRecord(f"unknown keys {sorted(unknown)}", kind=FILTER_TYPE)
        return cls(**values)
