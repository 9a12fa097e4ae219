"""The proxy's recent records per app, kept whether or not a debug session is open.

Theory of operation
-------------------
A debug session turns every proxy record of its app into a ``proxy`` line of the app's
stream (``events``), but a request made outside any session would have no proxy record
for ``trace`` to show. So the reader of the proxy's access log also keeps, for every app,
its last records in a ``RecentRecords`` ring, bounded three ways so a busy or a
many-app node holds a known amount:

- per app, at most ``records`` records and ``max_bytes`` bytes of their raw lines (the
  oldest go first);
- at most ``apps`` apps: the app written to least recently is forgotten whole.

Worst case the rings hold ``apps * max_bytes`` bytes of raw lines, plus about
``PER_RECORD`` bytes of bookkeeping per record (counted in the byte bound, so it is a
bound on memory, not only on payload).

Keeping a record must stay cheap: the reader already parsed the line to learn its app,
so ``add`` appends the raw bytes it read (no copy, no formatting) with the sequence
number, read time and release they were given. The work is done at query time, which is
rare: ``find`` scans an app's ring (or all of them) for lines containing the request id
and only those are parsed again and turned into ``LogLine``s (``events.access_line``),
numbered as the reader numbered them, so the same record seen through a debug session
and through this ring is one line (same source and ``seq``).

Pure: no I/O, no trio; owned by one thread (the participant's trio thread).
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from typing import NamedTuple

from superagent.debug.events import access_line, access_record
from superagent.debug.filters import LogFilter
from superagent.debug.records import LogLine

RECENT_RECORDS = 1000  # records kept per app: enough to trace what just happened
RECENT_BYTES = 256 * 1024  # bytes per app (a record is about 300 bytes of JSON)
RECENT_APPS = 64  # apps kept; beyond, the least recently written one is forgotten
PER_RECORD = 120  # bytes of bookkeeping per kept record (its tuple and bytes header)


class Kept(NamedTuple):
    """One record as read: its number, read time, its instance's release, its raw line.

    A named tuple, not a frozen dataclass: one is made per request the proxy serves."""

    seq: int
    ts: float
    release: str
    raw: bytes


class _AppRing:
    __slots__ = ("items", "size")

    def __init__(self) -> None:
        self.items: deque[Kept] = deque()
        self.size = 0


class RecentRecords:
    """The last proxy records of each app (see the module docstring)."""

    def __init__(self, *, records: int = RECENT_RECORDS, max_bytes: int = RECENT_BYTES,
                 apps: int = RECENT_APPS) -> None:
        if records < 1 or max_bytes < 1 or apps < 1:
            raise ValueError(f"records, max_bytes and apps must be >= 1"
                             f" (got {records}, {max_bytes}, {apps})")
        self.records = records
        self.max_bytes = max_bytes
        self.apps = apps
        self._rings: OrderedDict[str, _AppRing] = OrderedDict()
        self.added = 0  # records ever kept
        self.evicted = 0  # records pushed out by a bound (apps forgotten included)

    def __repr__(self) -> str:
        return (f"<RecentRecords apps={len(self._rings)}/{self.apps} records={len(self)}"
                f" bytes={self.size} added={self.added} evicted={self.evicted}>")

    def __len__(self) -> int:
        return sum(len(ring.items) for ring in self._rings.values())

    @property
    def size(self) -> int:
        """Bytes accounted for, all apps (raw lines plus ``PER_RECORD`` each)."""
        return sum(ring.size for ring in self._rings.values())

    def add(self, app: str, kept: Kept) -> None:
        ring = self._rings.get(app)
        if ring is None:
            ring = self._rings[app] = _AppRing()
            if len(self._rings) > self.apps:
                _, gone = self._rings.popitem(last=False)
                self.evicted += len(gone.items)
        else:
            self._rings.move_to_end(app)
        ring.items.append(kept)
        ring.size += len(kept.raw) + PER_RECORD
        self.added += 1
        # the newest record stays even when it alone is over the byte bound
        while len(ring.items) > 1 and (len(ring.items) > self.records
                                       or ring.size > self.max_bytes):
            old = ring.items.popleft()
            ring.size -= len(old.raw) + PER_RECORD
            self.evicted += 1

    def find(self, request_id: str, filter: LogFilter | None = None) -> list[LogLine]:
        """The kept records of ``request_id`` (matching ``filter``), oldest first."""
        needle = json.dumps(request_id, ensure_ascii=False)[1:-1].encode()
        app = filter.app if filter is not None else None
        rings = ([self._rings[app]] if app in self._rings else []) if app is not None \
            else list(self._rings.values())
        found: list[LogLine] = []
        for ring in rings:
            for kept in ring.items:
                if needle not in kept.raw:
                    continue
                event = access_record(kept.raw)
                if event is None:
                    continue
                line = access_line(event, release=kept.release, ts=kept.ts, seq=kept.seq)
                if line.request_id == request_id and (filter is None or filter.matches(line)):
                    found.append(line)
        found.sort(key=lambda line: (line.ts, line.seq))
        return found
