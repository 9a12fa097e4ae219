"""Tests for superagent/proxy/accesslog.py: JSON lines, batched writes."""

from __future__ import annotations

import json
import time

from superagent.proxy.accesslog import FLUSH_BYTES, AccessLog


class Sink:
    """Collects what the access log writes, one entry per write call."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.writes.append(data)

    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in b"".join(self.writes).splitlines()]


def test_lines_are_json_with_the_given_fields() -> None:
    """Each record is one JSON line holding its fields plus event, level and ts."""
    sink = Sink()
    log = AccessLog(sink)
    before = time.time()
    log.record({"app": "web", "status": 200, "method": "GET", "path": "/caf\u00e9",
                "duration": 0.0123, "request_id": "abc"})
    log.record({"app": "api", "status": 502, "path": 'a "quoted"\npath'})
    log.flush()
    after = time.time()
    assert len(sink.writes) == 1
    data = sink.writes[0]
    assert data.endswith(b"\n") and data.count(b"\n") == 2
    assert "/café".encode() in data  # UTF-8, not \u escapes
    first, second = sink.lines()
    assert first["app"] == "web" and first["status"] == 200 and first["method"] == "GET"
    assert first["path"] == "/caf\u00e9" and first["duration"] == 0.0123
    assert first["request_id"] == "abc"
    assert first["event"] == "access" and first["level"] == "info"
    assert isinstance(first["ts"], float)
    assert before - 1 <= first["ts"] <= after + 1
    assert second["path"] == 'a "quoted"\npath' and second["status"] == 502


def test_nothing_is_written_before_a_flush() -> None:
    """Small records stay buffered until flush() or the batch size."""
    sink = Sink()
    log = AccessLog(sink)
    for i in range(10):
        log.record({"n": i})
    assert sink.writes == []
    log.flush()
    assert [line["n"] for line in sink.lines()] == list(range(10))


def test_flush_with_empty_buffer_writes_nothing() -> None:
    """flush() on an empty buffer does not call write."""
    sink = Sink()
    log = AccessLog(sink)
    log.flush()
    log.record({"n": 1})
    log.flush()
    log.flush()
    assert len(sink.writes) == 1


def test_batch_is_written_when_flush_bytes_is_reached() -> None:
    """Reaching FLUSH_BYTES writes the whole batch in one call, in order, and empties it."""
    sink = Sink()
    log = AccessLog(sink)
    payload = "x" * 1000
    n = 0
    while not sink.writes:
        log.record({"n": n, "payload": payload})
        n += 1
        assert n < 1000, "never flushed"
    (batch,) = sink.writes
    assert len(batch) >= FLUSH_BYTES
    # The batch was written as soon as the threshold was crossed, not later.
    assert len(batch) - len(batch.splitlines(keepends=True)[-1]) < FLUSH_BYTES
    assert [line["n"] for line in sink.lines()] == list(range(n))
    log.record({"n": n, "payload": payload})
    assert len(sink.writes) == 1
    log.flush()
    assert len(sink.writes) == 2
    assert [line["n"] for line in sink.lines()] == list(range(n + 1))


def test_repr_shows_buffered_lines() -> None:
    """The repr reports how many lines are waiting."""
    log = AccessLog(Sink())
    log.record({"n": 1})
    log.record({"n": 2})
    assert repr(log) == "<AccessLog buffered=2>"
