"""Debug events: the proxy's access records as proxy lines of the app they served."""

from __future__ import annotations

import json

from superagent.debug import LogFilter, LogLine, access_line, access_record

RECORD = {"event": "access", "ts": 100.5, "request_id": "req-1", "app": "hello",
          "instance": "hello@r1.1", "method": "GET", "path": "/t", "status": 200,
          "duration_ms": 3.2, "first_byte_ms": 2.9, "rule": "prefix", "retries": 0,
          "error": None}


def test_access_record_becomes_a_proxy_line_of_its_app() -> None:
    """The record keeps all its fields; app, instance and request id are the request's."""
    event = access_record(json.dumps(RECORD).encode())
    assert event is not None and (event.app, event.instance, event.logged) == (
        "hello", "hello@r1.1", 100.5)
    line = access_line(event, release="r1", ts=101.0, seq=4)
    assert (line.stream, line.app, line.release, line.instance, line.request_id) == (
        "proxy", "hello", "r1", "hello@r1.1", "req-1")
    assert line.fields == RECORD and line.level == "info" and line.seq == 4
    assert line.text == ("GET /t -> 200 in 3.2 ms (first byte 2.9 ms, rule prefix,"
                         " retries 0)")
    assert LogFilter(app="hello", request_id="req-1").matches(line)
    assert LogLine.from_json(line.to_json()) == line


def test_error_is_shown_and_missing_parts_defaulted() -> None:
    """An error is named in the text; no instance or request id reads as '-' / None."""
    event = access_record(json.dumps({**RECORD, "instance": None, "request_id": "",
                                      "error": "upstream refused"}))
    assert event is not None and event.instance == "-"
    line = access_line(event, release="", ts=1.0, seq=1)
    assert line.text.endswith("retries 0, error upstream refused)") and line.request_id is None


def test_other_lines_are_not_events() -> None:
    """Other events, non-objects, broken JSON and records without app or time are skipped."""
    for raw in (json.dumps({**RECORD, "event": "proxy ready"}), "[1]", "{broken",
                json.dumps({**RECORD, "app": 3}), json.dumps({**RECORD, "ts": True}),
                json.dumps({k: v for k, v in RECORD.items() if k != "ts"})):
        assert access_record(raw) is None, raw
