"""Captured output and debug events, independent of who carries them.

The model every role shares (see docs/ARCHITECTURE.md, "Debug"): a participant captures
its instances' output into it, and a coordinator will merge several participants'
streams with it. Nothing here imports a role package (participant, coordinator, proxy)
or does I/O other than trio memory channels:

- ``records``: ``LogLine`` (one line or debug event, JSON codec), ``make_line``,
  per-source sequence numbers, ``merge`` by time and ``Cursor`` for resumption;
- ``filters``: ``LogFilter`` (node, app, instance, level, request id; JSON codec);
- ``rings``: ``LineRing``, the last lines of one source, and ``merged_tail``;
- ``fanout``: ``Fanout`` and ``Subscription``, bounded per subscriber with drop counters;
- ``events``: the proxy's access records as ``proxy`` lines of the app they served;
- ``sessions``: ``DebugSessions``, per-app windows with a TTL;
- ``recent``: ``RecentRecords``, every app's last proxy records, session or not (for
  ``trace``), bounded by count and bytes.
"""

from __future__ import annotations

from superagent.debug.errors import BadRecord, DebugError
from superagent.debug.events import AccessRecord, access_line, access_record
from superagent.debug.fanout import DROPPED_NOTE, SUBSCRIBER_BUFFER, Fanout, Subscription
from superagent.debug.filters import LogFilter
from superagent.debug.recent import (
    PER_RECORD,
    RECENT_APPS,
    RECENT_BYTES,
    RECENT_RECORDS,
    Kept,
    RecentRecords,
)
from superagent.debug.records import (
    PROXY_SOURCE,
    Cursor,
    LogLine,
    Origin,
    Position,
    Source,
    Stream,
    make_line,
    merge,
    merge_key,
)
from superagent.debug.rings import RING_LINES, LineRing, merged_tail
from superagent.debug.sessions import DEFAULT_TTL, DebugSessions, DebugWindow

__all__ = [
    "DEFAULT_TTL", "DROPPED_NOTE", "PER_RECORD", "PROXY_SOURCE", "RECENT_APPS",
    "RECENT_BYTES", "RECENT_RECORDS", "RING_LINES", "SUBSCRIBER_BUFFER",
    "AccessRecord", "BadRecord", "Cursor", "DebugError", "DebugSessions", "DebugWindow",
    "Fanout", "Kept", "LineRing", "LogFilter", "LogLine", "Origin", "Position",
    "RecentRecords", "Source", "Stream", "Subscription",
    "access_line", "access_record", "make_line", "merge", "merge_key", "merged_tail",
]
