"""The merged log stream's pure core: queries, resumption ids, the tracker, limits, secrets;
and the CLI's display helpers (escapes, cuts, server-sent events, the request joiner)."""

from __future__ import annotations

import pytest

from superagent.client import ClientError
from superagent.client_logs import RequestJoiner, SseParser, clean, parse_duration, sse_events
from superagent.coordinator.errors import BadRequest
from superagent.coordinator.logstream import (
    MAX_LINES,
    TAIL_FETCH,
    LogQuery,
    RateLimit,
    Redactor,
    Tracker,
    decode_id,
    encode_id,
    env_of,
    from_participant,
    parse_query,
    parse_since,
)
from superagent.debug import PROXY_SOURCE, LogLine

NOW = 1_800_000_000.0


def line(seq: int, ts: float, *, instance: str = "a@r1.1", node: str = "n1",
         stream: str = "stdout", text: str = "x", request_id: str | None = None) -> LogLine:
    return LogLine(ts=ts, app="a", release="r1", instance=instance, stream=stream,  # type: ignore[arg-type]
                   text=text, seq=seq, node=node, request_id=request_id)


def test_since_durations_and_epochs() -> None:
    assert parse_since("10m", now=NOW) == NOW - 600
    assert parse_since("1.5h", now=NOW) == NOW - 5400
    assert parse_since("2d", now=NOW) == NOW - 172800
    assert parse_since(" 30s ", now=NOW) == NOW - 30
    assert parse_since("1700000000.5", now=NOW) == 1700000000.5
    for bad in ("yesterday", "10x", "-5", "1e20", ""):
        with pytest.raises(BadRequest, match="since"):
            parse_since(bad, now=NOW)


def test_query_parsing_names_the_bad_parameter() -> None:
    q = parse_query({"instance": "a@r1.1", "stream": "stderr", "since": "1m", "grep": "boom",
                     "request_id": "r1", "n": "20", "follow": "true", "node": "n2"},
                    app="a", now=NOW)
    assert q == LogQuery(app="a", instance="a@r1.1", node="n2", stream="stderr",
                         since=NOW - 60, grep="boom", request_id="r1", n=20, follow=True)
    assert parse_query({}, app="a") == LogQuery(app="a")
    for params, named in (({"stream": "stdin"}, "stream"), ({"n": "0"}, "'n'"),
                          ({"n": str(MAX_LINES + 1)}, "'n'"), ({"n": "many"}, "'n'"),
                          ({"follow": "perhaps"}, "follow"), ({"colour": "1"}, "colour"),
                          ({"grep": "x" * 201}, "grep"), ({"since": "soon"}, "since")):
        with pytest.raises(BadRequest, match=named):
            parse_query(params, app="a", now=NOW)


def test_what_participants_filter_and_what_is_filtered_here() -> None:
    plain = LogQuery(app="a", instance="i", request_id="r", n=7)
    asked = plain.participant_query()
    assert (asked.app, asked.instance, asked.request_id, asked.n) == ("a", "i", "r", 7)
    assert LogQuery(app="a", grep="x", n=7).participant_query().n == TAIL_FETCH
    q = LogQuery(node="n1", stream="stderr", since=10.0, grep="bo")
    assert q.matches(line(1, 11.0, stream="stderr", text="boom"))
    assert not q.matches(line(1, 9.0, stream="stderr", text="boom"))
    assert not q.matches(line(1, 11.0, stream="stdout", text="boom"))
    assert not q.matches(line(1, 11.0, stream="stderr", text="bang"))
    assert not q.matches(line(1, 11.0, stream="stderr", text="boom", node="n2"))


def test_ids_round_trip_and_refuse_garbage() -> None:
    tracker = Tracker()
    for item in (line(3, 1.25), line(9, 2.5, instance="b/weird=name,x@y", node="n 2"),
                 line(4, 3.0, stream="proxy")):
        tracker.admit(item)
    cursor = tracker.cursor()
    text = encode_id(cursor)
    assert "," in text and " " not in text
    assert decode_id(text) == cursor
    assert decode_id("") == Tracker().cursor()
    for bad in ("garbage", "n1/a=x@1", "n1/=1@2", "n1/a=1", "n1/a=-1@2", "x" * 70000):
        with pytest.raises(BadRequest, match="Last-Event-ID"):
            decode_id(bad)


def test_tracker_suppresses_repeats_and_reports_gaps() -> None:
    tracker = Tracker()
    assert tracker.admit(line(1, 1.0)) == (True, None)
    assert tracker.admit(line(2, 1.0)) == (True, None)
    assert tracker.admit(line(1, 1.0)) == (False, None)  # the tail repeated on reconnect
    assert tracker.admit(line(2, 1.0)) == (False, None)
    new, gap = tracker.admit(line(6, 2.0))
    assert new and gap is not None and gap.missing == 3 and gap.node == "n1"
    new, gap = tracker.admit(line(1, 3.0))  # numbered afresh: the agent restarted
    assert new and gap is not None and gap.missing is None
    assert tracker.admit(line(2, 3.1)) == (True, None)
    # the proxy's events of one node are numbered across apps: jumps are no gap
    assert tracker.admit(line(1, 1.0, stream="proxy")) == (True, None)
    assert tracker.admit(line(9, 1.5, stream="proxy")) == (True, None)
    assert line(9, 1.5, stream="proxy").source.name == PROXY_SOURCE
    # a participant filtering by request id sends holes by design
    loose = Tracker(contiguous=False)
    loose.admit(line(1, 1.0))
    assert loose.admit(line(5, 1.0)) == (True, None)
    # resumed from a cursor: what the cursor holds is not sent again
    resumed = Tracker(tracker.cursor())
    assert resumed.admit(line(2, 3.1)) == (False, None)
    assert resumed.admit(line(3, 3.2)) == (True, None)
    assert resumed.duplicates == 1


def test_rate_limit_is_a_token_bucket() -> None:
    limit = RateLimit(rate=10, burst=3)
    assert [limit.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.take(0.05) is False  # half a token
    assert limit.take(0.1) is True
    assert [limit.take(10.0) for _ in range(4)] == [True, True, True, False]  # capped
    with pytest.raises(ValueError):
        RateLimit(rate=0)


def test_redactor_hides_env_values() -> None:
    hide = Redactor({"TOKEN": "s3cr3t-value", "MODE": "ok", "QUOTE": 'a"b\\cdef'})
    doc = line(1, 1.0, text="token s3cr3t-value ok").to_json()
    assert hide(doc)["text"] == "token [env TOKEN] ok"
    with_fields = {**doc, "text": '{"k": "s3cr3t-value"}', "fields": {"k": "s3cr3t-value"}}
    assert hide(with_fields)["fields"] == {"k": "[env TOKEN]"}
    assert hide({**doc, "text": 'x a"b\\cdef'})["text"] == "x [env QUOTE]"
    clean_doc = line(1, 1.0, text="nothing here").to_json()
    assert hide(clean_doc) is clean_doc
    numeric = Redactor({"PIN": "123456"})
    hidden = numeric({**doc, "seq": 123456, "text": "pin 123456"})
    assert hidden["text"] == "pin [env PIN]"
    assert env_of({"env": {"A": "x"}}) == {"A": "x"}
    assert env_of({"env": [["A", "x"]]}) == {"A": "x"}
    assert env_of(None) == {}


def test_participant_lines_are_labelled_or_skipped() -> None:
    found = from_participant(line(1, 1.0, node="").to_json() | {"node": None}, "n7")
    assert found is not None and found.node == "n7"
    assert from_participant({"stream": "stdin"}, "n7") is None


def test_clean_neutralises_escapes_and_cuts() -> None:
    assert clean("plain\ttext") == "plain\ttext"
    assert clean("\x1b[31mred\x1b[0m") == "\\x1b\\x5b\\x33\\x31\\x6dred\\x1b\\x5b\\x30\\x6d"
    assert "\x1b" not in clean("\x1b]0;title\x07x") and "\x07" not in clean("a\x07b\rc")
    assert "\r" not in clean("a\rb") and "\n" not in clean("a\nb")
    assert "\x9b" not in clean("a\x9bb")
    cut = clean("y" * 50, limit=10)
    assert cut == "y" * 10 + " [... 40 characters cut]"


def test_sse_parsing_and_durations() -> None:
    events = list(sse_events(["id: n1/a=1@2.0", "event: line", 'data: {"text": "hi"}', "",
                              ": keep-alive", "", "event: gap", "data: {}", "",
                              "data: not json", ""]))
    assert events == [("line", {"text": "hi"}, "n1/a=1@2.0"), ("gap", {}, None),
                      ("message", {"text": "not json"}, None)]
    parser = SseParser()
    assert parser.feed("event: open") is None
    assert parser.feed('data: {"app": "a"}') is None
    assert parser.feed("") == ("open", {"app": "a"}, None)
    assert parse_duration("30m", "--ttl") == 1800 and parse_duration("90", "--ttl") == 90
    with pytest.raises(ClientError, match="--ttl"):
        parse_duration("soon", "--ttl")


def test_request_joiner_is_bounded() -> None:
    joiner = RequestJoiner(requests=2, lines=2)
    app = {"stream": "stdout", "request_id": "r1", "text": "a"}
    assert joiner.add(app) is None and joiner.add(app) is None and joiner.add(app) is None
    assert joiner.add({"stream": "stdout", "text": "no id"}) is None
    assert joiner.add({"stream": "proxy", "request_id": "r1"}) == [app, app]
    assert joiner.add({"stream": "proxy", "request_id": "r1"}) == []
    for rid in ("x", "y", "z"):
        joiner.add({"stream": "stdout", "request_id": rid})
    assert joiner.add({"stream": "proxy", "request_id": "x"}) == []  # evicted, oldest first
