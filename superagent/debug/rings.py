"""Ring buffers: the last lines of each source, and a merged tail across them.

Theory of operation
-------------------
Each source (an instance's output, the proxy's debug events) keeps its last ``maxlen``
lines in a ``LineRing``, so ``logs APP`` answers at once without reading files, and a
consumer that resumes with a ``Cursor`` gets what it missed while it was away (as long
as the ring still holds it). ``merged_tail`` gathers the last ``n`` matching lines of
many rings in ``merge_key`` order: each ring's own lines are already in that order, so
this is a lazy merge of the rings' matching suffixes.

Memory is bounded by ``maxlen`` lines per ring; a line's size is bounded by whoever
reads it (``participant.logfiles.MAX_LINE``). Pure: no I/O, no trio.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from superagent.debug.filters import LogFilter
from superagent.debug.records import Cursor, LogLine, merge

RING_LINES = 1000  # lines kept in memory per source for `tail`


class LineRing:
    """The last ``maxlen`` lines of one source, oldest first."""

    def __init__(self, maxlen: int = RING_LINES) -> None:
        if maxlen < 1:
            raise ValueError(f"a ring holds at least 1 line, not {maxlen}")
        self._lines: deque[LogLine] = deque(maxlen=maxlen)
        self.recorded = 0  # lines ever recorded (the ring holds the last maxlen of them)

    def __repr__(self) -> str:
        last = self._lines[-1].seq if self._lines else None
        return (f"<LineRing lines={len(self._lines)}/{self.maxlen} recorded={self.recorded}"
                f" last_seq={last}>")

    def __len__(self) -> int:
        return len(self._lines)

    @property
    def maxlen(self) -> int:
        maxlen = self._lines.maxlen
        assert maxlen is not None
        return maxlen

    def record(self, lines: Iterable[LogLine]) -> None:
        for line in lines:
            self._lines.append(line)
            self.recorded += 1

    def tail(self, n: int = 100, filter: LogFilter | None = None) -> list[LogLine]:
        """The last ``n`` lines (matching ``filter``), oldest first."""
        if n <= 0:
            return []
        if filter is None:
            return list(self._lines)[-n:]
        out: list[LogLine] = []
        for line in reversed(self._lines):
            if filter.matches(line):
                out.append(line)
                if len(out) == n:
                    break
        out.reverse()
        return out

    def since(self, cursor: Cursor, filter: LogFilter | None = None) -> list[LogLine]:
        """The buffered lines ``cursor`` has not seen (matching ``filter``), oldest first."""
        return [line for line in cursor.unseen(self._lines)
                if filter is None or filter.matches(line)]


def merged_tail(rings: Iterable[LineRing], filter: LogFilter | None = None,
                n: int = 100) -> list[LogLine]:
    """The last ``n`` lines matching ``filter`` across ``rings``, in ``merge_key`` order."""
    if n <= 0:
        return []
    return list(merge(*(ring.tail(n, filter) for ring in rings)))[-n:]
