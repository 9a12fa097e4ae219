"""The proxy's recent records per app: bounds by count, bytes and apps; lookup by request id."""

from __future__ import annotations

import json

import pytest

from superagent.debug import PER_RECORD, Kept, LogFilter, RecentRecords


def kept(seq: int, *, app: str = "web", rid: str | None = None, pad: int = 0,
         instance: str = "web-1") -> Kept:
    record = {"event": "access", "ts": 100.0 + seq, "app": app, "instance": instance,
              "request_id": rid or f"r{seq}", "method": "GET", "path": "/x", "status": 200,
              "pad": "x" * pad}
    return Kept(seq, 200.0 + seq, "r7", json.dumps(record).encode())


def test_count_bound_keeps_the_newest_per_app() -> None:
    ring = RecentRecords(records=3, max_bytes=10**6)
    for seq in range(1, 6):
        ring.add("web", kept(seq))
    ring.add("api", kept(6, app="api"))
    assert len(ring) == 4 and ring.evicted == 2 and ring.added == 6
    assert ring.find("r1") == [] and ring.find("r2") == []
    found = ring.find("r3")
    assert [(line.seq, line.ts, line.stream, line.release, line.instance) for line in found] \
        == [(3, 203.0, "proxy", "r7", "web-1")]
    assert found[0].fields is not None and found[0].fields["status"] == 200
    assert "GET /x -> 200" in found[0].text
    assert [line.app for line in ring.find("r6")] == ["api"]


def test_byte_bound_counts_the_raw_line_and_bookkeeping() -> None:
    one = len(kept(1, pad=1000).raw) + PER_RECORD
    ring = RecentRecords(records=1000, max_bytes=3 * one + 10)  # r10 is 1 byte longer
    for seq in range(1, 11):
        ring.add("web", kept(seq, pad=1000))
    assert len(ring) == 3 and ring.size <= 3 * one + 10
    assert [line.seq for rid in ("r8", "r9", "r10") for line in ring.find(rid)] == [8, 9, 10]
    # a single record over the bound is still kept (the newest always is)
    tiny = RecentRecords(max_bytes=10)
    tiny.add("web", kept(1))
    tiny.add("web", kept(2))
    assert len(tiny) == 1 and tiny.find("r2")


def test_the_least_recently_written_app_is_forgotten() -> None:
    ring = RecentRecords(apps=2)
    ring.add("a", kept(1, app="a"))
    ring.add("b", kept(2, app="b"))
    ring.add("a", kept(3, app="a"))  # a is now the most recent
    ring.add("c", kept(4, app="c"))  # b goes
    assert ring.find("r2") == [] and ring.find("r1") and ring.find("r4")
    assert "apps=2/2" in repr(ring)


def test_find_is_exact_and_honours_the_filter() -> None:
    ring = RecentRecords()
    ring.add("web", kept(1, rid="abc"))
    ring.add("web", kept(2, rid="abcd"))  # contains the needle, is not the id
    ring.add("api", kept(3, app="api", rid="abc"))
    ring.add("web", kept(4, rid='q"u\\o', instance="web-2"))
    ring.add("web", Kept(5, 1.0, "", b'{"event": "other", "request_id": "abc"}'))
    assert [line.seq for line in ring.find("abc")] == [1, 3]
    assert [line.seq for line in ring.find("abc", LogFilter(app="api"))] == [3]
    assert ring.find("abc", LogFilter(app="nope")) == []
    assert ring.find("abc", LogFilter(instance="web-2")) == []
    assert [line.seq for line in ring.find('q"u\\o')] == [4]


def test_bounds_must_be_positive() -> None:
    for bad in ({"records": 0}, {"max_bytes": 0}, {"apps": 0}):
        with pytest.raises(ValueError, match=">= 1"):
            RecentRecords(**bad)
