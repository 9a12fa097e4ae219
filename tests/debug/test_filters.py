"""LogFilter: matching and its JSON shape."""

from __future__ import annotations

import json

import pytest

from superagent.debug import BadRecord, LogFilter, LogLine, Origin, make_line


def sample() -> list[LogLine]:
    lines = []
    for seq, (node, app, instance, raw) in enumerate([
            ("n1", "web", "web-1", b'{"level": "INFO", "request_id": "r-1"}'),
            ("n1", "web", "web-2", b'{"level": "error"}'),
            ("n2", "api", "api-1", b"not json"),
            ("n2", "web", "web-3", b'{"level": "info", "request_id": "r-3"}')], 1):
        origin = Origin(app=app, release="r1", instance=instance)
        lines.append(make_line(raw, cut=False, origin=origin, stream="stdout", ts=1.0,
                               seq=seq).on_node(node))
    return lines


@pytest.mark.parametrize(("wanted", "instances"), [
    (LogFilter(), ["web-1", "web-2", "api-1", "web-3"]),
    (LogFilter(node="n2"), ["api-1", "web-3"]),
    (LogFilter(app="web"), ["web-1", "web-2", "web-3"]),
    (LogFilter(instance="web-2"), ["web-2"]),
    (LogFilter(level="info"), ["web-1", "web-3"]),  # level ignores case
    (LogFilter(level="ERROR"), ["web-2"]),
    (LogFilter(request_id="r-3"), ["web-3"]),
    (LogFilter(node="n1", app="web", level="info"), ["web-1"]),
])
def test_each_field_narrows(wanted: LogFilter, instances: list[str]) -> None:
    """Every field is an equality; the fields combine with 'and'."""
    assert [line.instance for line in sample() if wanted.matches(line)] == instances


def test_json_shape_has_every_key_and_round_trips() -> None:
    """Every key is present (null for any), so the shape is stable; missing keys mean any."""
    wanted = LogFilter(app="web", level="info")
    doc = json.loads(json.dumps(wanted.to_json()))
    assert doc == {"type": "log_filter", "node": None, "app": "web", "instance": None,
                   "level": "info", "request_id": None}
    assert LogFilter.from_json(doc) == wanted
    assert LogFilter.from_json({"app": "web"}) == LogFilter(app="web")


@pytest.mark.parametrize("doc", [[], {"app": 3}, {"apps": "web"}])
def test_malformed_filter_is_refused(doc: object) -> None:
    """A filter document of the wrong shape raises BadRecord."""
    with pytest.raises(BadRecord, match="log_filter"):
        LogFilter.from_json(doc)
