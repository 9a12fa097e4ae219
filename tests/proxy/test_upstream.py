"""Tests of ``superagent.proxy.upstream``'s choice of an instance (no sockets)."""

from __future__ import annotations

import json

from superagent.proxy.config import snapshot_from_wire, snapshot_to_wire
from superagent.proxy.snapshot import AppRoute, Instance, RoutingSnapshot
from superagent.proxy.upstream import Upstreams


def upstreams(*instances: Instance) -> tuple[Upstreams, AppRoute]:
    app = AppRoute(name="web", instances=instances, prefix="/")
    ups = Upstreams()
    ups.update(RoutingSnapshot(version=1, listeners=(), apps=(app,)))
    return ups, app


def test_routed_instances_are_preferred_to_standbys() -> None:
    """A standby is never picked while a routed instance can be."""
    ups, app = upstreams(Instance(id="new", host="127.0.0.1", port=1),
                         Instance(id="old", host="127.0.0.1", port=2, standby=True))
    assert {ups.pick(app).id for _ in range(10)} == {"new"}  # type: ignore[union-attr]
    picked = ups.pick(app, exclude=["new"])  # the new one refused the connection
    assert picked is not None and picked.id == "old"
    assert ups.pick(app, exclude=["new", "old"]) is None


def test_draining_instances_get_no_new_request_unless_they_are_standbys() -> None:
    """A draining instance gets no new request (its drain must be able to end); a standby
    serves when no routed instance can, draining or not, the least busy first."""
    ups, app = upstreams(Instance(id="a", host="127.0.0.1", port=1),
                         Instance(id="b", host="127.0.0.1", port=2),
                         Instance(id="c", host="127.0.0.1", port=3, standby=True),
                         Instance(id="d", host="127.0.0.1", port=4, standby=True))
    ups.set_draining("a", True)
    assert {ups.pick(app).id for _ in range(10)} == {"b"}  # type: ignore[union-attr]
    ups.set_draining("c", True)
    ups.by_id["d"].outstanding = 3
    picked = ups.pick(app, exclude=["b"])
    assert picked is not None and picked.id == "c"
    assert ups.pick(app, exclude=["b", "c", "d"]) is None  # never "a"


def test_a_standby_mark_follows_the_snapshot_and_the_wire() -> None:
    """A routed instance that becomes a standby (and back) keeps its pool; the mark
    survives the wire form."""
    ups, _ = upstreams(Instance(id="x", host="127.0.0.1", port=1))
    before = ups.by_id["x"]
    standby = AppRoute(name="web", prefix="/",
                       instances=(Instance(id="x", host="127.0.0.1", port=1, standby=True),))
    snapshot = RoutingSnapshot(version=2, listeners=(), apps=(standby,))
    ups.update(snapshot)
    assert ups.by_id["x"] is before and before.standby
    assert snapshot_from_wire(json.loads(json.dumps(snapshot_to_wire(snapshot)))) == snapshot
