"""Log records: parsing a line, the JSON shape, merge order and cursors."""

from __future__ import annotations

import json

import pytest

from superagent.debug import BadRecord, Cursor, LogLine, Origin, Source, make_line, merge
from superagent.debug.records import PROXY_SOURCE

ORIGIN = Origin(app="web", release="r1", instance="web-1")


def line(seq: int, ts: float, *, instance: str = "web-1", node: str | None = None,
         stream: str = "stdout") -> LogLine:
    return LogLine.from_json({"ts": ts, "app": "web", "release": "r1", "instance": instance,
                              "stream": stream, "text": f"{instance} {seq}", "seq": seq,
                              "node": node})


def test_json_line_fields_level_and_request_id() -> None:
    """A JSON object line keeps its fields and surfaces level and request_id; others do not."""
    raws = [b'{"level": "error", "request_id": "req-9", "msg": "boom", "n": 3}', b"[1, 2]",
            b"{not json", b"plain \xff bytes\r", b'{"request_id": 42}']
    first, array, broken, plain, numeric = (
        make_line(raw, cut=False, origin=ORIGIN, stream="stdout", ts=1.0, seq=i)
        for i, raw in enumerate(raws, 1))
    assert first.fields == {"level": "error", "request_id": "req-9", "msg": "boom", "n": 3}
    assert (first.level, first.request_id) == ("error", "req-9")
    assert array.fields is None and broken.fields is None and broken.level is None
    assert plain.text == "plain \ufffd bytes"
    assert numeric.request_id == "42" and numeric.level is None
    assert LogLine.from_json(first.to_json()) == first
    assert first.to_json()["type"] == "log_line"


def test_cut_line_is_never_parsed() -> None:
    """Half a JSON object is text: a cut line keeps no fields, and says it was cut."""
    cut = make_line(b'{"level": "info"}', cut=True, origin=ORIGIN, stream="stderr", ts=1.0,
                    seq=1)
    assert cut.fields is None and cut.to_json()["cut"] is True


def test_json_shape_is_stable_and_round_trips() -> None:
    """Optional keys appear only when set; every stream and a node label round-trip."""
    plain = make_line(b"hello", cut=False, origin=ORIGIN, stream="stdout", ts=2.5, seq=7)
    assert plain.to_json() == {"type": "log_line", "ts": 2.5, "app": "web", "release": "r1",
                               "instance": "web-1", "stream": "stdout", "seq": 7,
                               "text": "hello"}
    proxy = line(3, 4.0, stream="proxy").on_node("n2")
    doc = json.loads(json.dumps(proxy.to_json()))
    assert doc["node"] == "n2" and LogLine.from_json(doc) == proxy


@pytest.mark.parametrize(("change", "field"), [
    ({"stream": "nope"}, "stream"), ({"ts": "soon"}, "ts"), ({"seq": 1.5}, "seq"),
    ({"app": None}, "app"), ({"fields": [1]}, "fields"), ({"seq": True}, "seq"),
])
def test_malformed_record_names_its_field(change: dict[str, object], field: str) -> None:
    """A malformed document raises BadRecord (a ValueError) naming the field."""
    doc = {**line(1, 1.0).to_json(), **change}
    with pytest.raises(BadRecord, match=f"log_line.{field}") as info:
        LogLine.from_json(doc)
    assert info.value.field == field and isinstance(info.value, ValueError)
    with pytest.raises(BadRecord):
        LogLine.from_json([doc])


def test_source_of_app_lines_and_proxy_events() -> None:
    """An app line's source is its instance; all proxy events of a node share one source."""
    assert line(1, 1.0).source == Source(node="", name="web-1")
    assert line(1, 1.0, stream="proxy", node="n1").source == Source(node="n1", name=PROXY_SOURCE)
    assert str(Source(node="n1", name="web-1")) == "n1/web-1"


def test_merge_interleaves_sources_by_time_keeping_each_in_order() -> None:
    """Streams of several machines merge by time; ties keep a stable, total order."""
    n1 = [line(1, 1.0, node="n1"), line(2, 3.0, node="n1"), line(3, 3.0, node="n1")]
    n2 = [line(1, 2.0, node="n2"), line(2, 3.0, node="n2")]
    merged = list(merge(n1, n2))
    assert [(x.node, x.seq) for x in merged] == [
        ("n1", 1), ("n2", 1), ("n1", 2), ("n1", 3), ("n2", 2)]
    assert list(merge(n2, n1)) == merged


def test_cursor_resumes_after_what_was_seen() -> None:
    """A cursor keeps per-source positions; unseen() gives exactly the lines after them."""
    a = [line(i, float(i), instance="a") for i in range(1, 5)]
    b = [line(i, float(i), instance="b", node="n2") for i in range(1, 4)]
    cursor = Cursor().advance(a[:2]).advance(b[:1])
    assert cursor.unseen(a + b) == a[2:] + b[1:]
    assert cursor.advance(a + b).unseen(a + b) == []
    assert Cursor.from_json(json.loads(json.dumps(cursor.to_json()))) == cursor
    assert cursor.to_json()["positions"][0] == {"node": "", "source": "a", "seq": 2, "ts": 2.0}
    assert "a@2" in repr(cursor) and "n2/b@1" in repr(cursor)
    assert Cursor().advance(b[:1]).advance(a[:2]) == cursor  # order-independent


def test_cursor_sees_a_restarted_source_as_new() -> None:
    """After a reader restarts its numbering, its new lines (later ts, lower seq) are unseen."""
    before = [line(i, float(i)) for i in range(1, 6)]
    cursor = Cursor().advance(before)
    restarted = [line(1, 10.0), line(2, 10.0)]
    assert cursor.unseen(before + restarted) == restarted
    assert cursor.advance(restarted).position(before[0].source) is not None
    assert cursor.advance(restarted).unseen(restarted) == []


@pytest.mark.parametrize("doc", [
    [], {"positions": "x"}, {"positions": [{"node": 1, "source": "a", "seq": 1, "ts": 1}]},
    {"positions": [{"node": "", "source": "a", "seq": "1", "ts": 1}]},
])
def test_malformed_cursor_is_refused(doc: object) -> None:
    """A cursor document of the wrong shape raises BadRecord."""
    with pytest.raises(BadRecord, match="log_cursor"):
        Cursor.from_json(doc)
