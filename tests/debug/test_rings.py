"""Ring buffers: the last lines of a source, and tails merged across sources."""

from __future__ import annotations

import pytest

from superagent.debug import Cursor, LineRing, LogFilter, LogLine, Origin, make_line, merged_tail


def lines(instance: str, count: int, *, start_ts: float = 0.0, step: float = 1.0,
          app: str = "web") -> list[LogLine]:
    origin = Origin(app=app, release="r1", instance=instance)
    return [make_line(b"%s %d" % (instance.encode(), seq), cut=False, origin=origin,
                      stream="stdout", ts=start_ts + step * seq, seq=seq)
            for seq in range(1, count + 1)]


def test_ring_keeps_the_last_maxlen() -> None:
    """Only the last maxlen lines are kept; tail(n) gives the newest n, oldest first."""
    ring = LineRing(5)
    ring.record(lines("a", 12))
    assert [line.seq for line in ring.tail(100)] == [8, 9, 10, 11, 12]
    assert [line.seq for line in ring.tail(2)] == [11, 12] and ring.tail(0) == []
    assert repr(ring) == "<LineRing lines=5/5 recorded=12 last_seq=12>"
    with pytest.raises(ValueError, match="at least 1"):
        LineRing(0)


def test_filtered_tail_counts_matching_lines_only() -> None:
    """tail(n, filter) gives the last n matching lines, however many others came after."""
    ring = LineRing(100)
    ring.record(lines("a", 3, app="web") + lines("b", 10, start_ts=10, app="api"))
    assert [line.instance for line in ring.tail(2, LogFilter(app="web"))] == ["a", "a"]


def test_since_cursor_gives_what_was_missed() -> None:
    """A consumer resuming with its cursor gets the buffered lines it has not seen."""
    ring = LineRing(100)
    first = lines("a", 4)
    ring.record(first)
    cursor = Cursor().advance(first[:3])
    assert ring.since(cursor) == first[3:]
    assert ring.since(Cursor(), LogFilter(instance="b")) == []


def test_merged_tail_interleaves_by_time() -> None:
    """The last n lines across rings come out in time order."""
    a, b = LineRing(), LineRing()
    a.record(lines("a", 3, step=2.0))  # ts 2, 4, 6
    b.record(lines("b", 3, start_ts=1.0, step=2.0))  # ts 3, 5, 7
    merged = merged_tail([a, b], n=4)
    assert [line.text for line in merged] == ["a 2", "b 2", "a 3", "b 3"]
    assert [line.text for line in merged_tail([a, b], LogFilter(instance="a"), n=10)] == [
        "a 1", "a 2", "a 3"]
    assert merged_tail([a, b], n=0) == []
