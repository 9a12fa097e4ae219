"""Tests for superagent.rpc.messages and version: every message round-trips, bad ones are named."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from superagent import codec
from superagent.errors import CodecError
from superagent.rpc import messages as msg
from superagent.rpc import version
from superagent.rpc.errors import VersionMismatch

SHA = "ab" * 32
SIG = {"id": "d1/n1/start", "term": 4}

EXAMPLES: list[Any] = [
    msg.Upload(**SIG, app="hello", release="r1", sha256=SHA),
    msg.Prepare(**SIG, app="hello", release="r1", sha256=SHA),
    msg.Prepare(**SIG, app="hello", release="r3", sha256=SHA, keep=("r3", "r2", "r1")),
    msg.Test(**SIG, app="hello", release="r1", timeout=30.0),
    msg.Start(**SIG, app="hello", release="r1", count=2),
    msg.Stop(**SIG, instances=("hello@r1.1",), grace=5.0),
    msg.Stop(**SIG, instances=("hello@r1.1",)),
    msg.Switch(**SIG, app="hello", instances=()),
    msg.Drain(**SIG, instances=("hello@r1.1", "hello@r1.2"), grace=30.0),
    msg.Offline(**SIG, offline=True),
    msg.Debug(**SIG, app="hello", enabled=True, ttl=60.0),
    msg.LogsQuery(app="hello", request_id="r-1", n=5, follow=True),
    msg.PrepareReply(app="hello", release="r1", sha256=SHA, build_log="/x/build.log",
                     removed_releases=("r0",)),
    msg.TestReply(app="hello", release="r1", ok=False, exit_code=None, timed_out=True,
                  log="boom", skipped=False, seconds=1.5, repeated=True),
    msg.StartReply(app="hello", release="r1",
                   instances=(msg.StartedInstance(id="hello@r1.1", port=41000, state="ready"),)),
    msg.StopReply(stopped=("hello@r1.1",), in_flight_cut={"hello@r1.1": 0}),
    msg.SwitchReply(app="hello", instances=("hello@r1.1",), version=7),
    msg.DrainReply(remaining={"hello@r1.1": 1}),
    msg.OfflineReply(offline=False),
    msg.DebugReply(app="hello", debug=True, until=1234.5),
    msg.StatusReply(
        node="n1", groups=("default",), offline=False, isolation={"root": False},
        proxy={"version": 3, "workers": [1, 2]}, routes={"hello": ("hello@r1.1",)},
        debug_sessions={"hello": 99.0}, releases={"hello": ("r1",)}, figures={"load": [0.1]},
        instances=(msg.InstanceStatus(
            app="hello", release="r1", instance="hello@r1.1", state="ready", pid=12,
            port=41000, restarts=0, last_exit_code=None, isolation=None, started_at=1.0,
            ready_at=2.0, create_time=None, figures={"rss_bytes": 1}),)),
    msg.LogsReply(lines=({"text": "hi", "app": "hello"},)),
    msg.ErrorReply(error=msg.ErrorCode.UNKNOWN_INSTANCE, status=404, detail="no instance"),
    msg.StartedInstance(id="hello@r1.1", port=41000, state="ready"),
    msg.InstanceStatus(app="hello", release="r1", instance="hello@r1.1", state="ready",
                       pid=None, port=41000, restarts=2, last_exit_code=1,
                       isolation={"user": "sa-hello"}, started_at=None, ready_at=None,
                       create_time=3.0, figures=None),
]


def test_every_message_class_has_an_example() -> None:
    """The list above covers every signal, query and reply of the protocol."""
    covered = {type(e) for e in EXAMPLES}
    declared = {v for v in vars(msg).values() if isinstance(v, type)
                and dataclasses.is_dataclass(v) and not v.__name__.startswith("_")
                and v not in (msg.Signal, msg.Reply)}
    assert declared - covered == set()


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Any) -> None:
    """encode -> JSON-able document -> decode gives an equal message."""
    doc = codec.encode(message)
    assert codec.decode(type(message), json.loads(codec.canonical_json(doc))) == message
    if getattr(type(message), "type", ""):
        assert doc["type"] == type(message).type


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_unknown_field_is_refused_unless_lenient(message: Any) -> None:
    """A field the class does not have is named; a newer minor's fields may be ignored."""
    doc = {**codec.encode(message), "from_the_future": 1}
    with pytest.raises(CodecError, match="from_the_future: unknown field"):
        codec.decode(type(message), doc)
    assert codec.decode(type(message), doc, ignore_unknown=True) == message


@pytest.mark.parametrize(("cls", "change", "message"), [
    (msg.Start, {"term": "4"}, "term: expected int, got str"),
    (msg.Start, {"count": 1.5}, "count: expected int, got float"),
    (msg.Start, {"count": 0}, "count: must be between 1 and 64"),
    (msg.Start, {"id": "has space"}, "id: must be 1-200"),
    (msg.Stop, {"instances": "hello@r1.1"}, "instances: expected list, got str"),
    (msg.Stop, {"instances": []}, "instances: must name at least one instance"),
    (msg.Drain, {"grace": -1}, "grace: must be >= 0"),
    (msg.Offline, {"offline": "yes"}, "offline: expected bool, got str"),
    (msg.Debug, {"ttl": 0}, "ttl: must be 1..86400"),
    (msg.Test, {"timeout": 0}, "timeout: must be 0..86400"),
    (msg.Prepare, {"sha256": "XYZ"}, "sha256: must be a lower-case"),
    (msg.Prepare, {"keep": ["r1", "../x"]}, "keep: must be release names"),
    (msg.StartReply, {"instances": [{"id": "i", "port": "1", "state": "ready"}]},
     r"instances\[0\].port: expected int, got str"),
    (msg.ErrorReply, {"error": "exploded"}, "error: expected one of"),
])
def test_wrong_values_are_refused_naming_the_field(cls: type, change: dict[str, Any],
                                                   message: str) -> None:
    """Wrong types and out-of-range values raise CodecError naming the field."""
    example = next(e for e in EXAMPLES if type(e) is cls)
    with pytest.raises(CodecError, match=message):
        codec.decode(cls, {**codec.encode(example), **change})


def test_signals_are_registered_by_their_wire_name() -> None:
    """Every JSON signal is reachable at /v1/signals/<type>; the upload has its own path."""
    assert set(msg.SIGNALS) == {"prepare", "test", "start", "stop", "switch", "drain",
                                "offline", "debug"}
    for name, cls in msg.SIGNALS.items():
        assert cls.type == name and issubclass(cls.REPLY, msg.Reply)


def test_logs_query_from_params() -> None:
    """A query string becomes a LogsQuery; bad parameters are named."""
    query = msg.LogsQuery.from_params({"app": "hello", "n": "5", "follow": "1"})
    assert query == msg.LogsQuery(app="hello", n=5, follow=True)
    assert msg.LogsQuery.from_params(query.params()) == query
    with pytest.raises(CodecError, match="n: must be an integer"):
        msg.LogsQuery.from_params({"n": "many"})
    with pytest.raises(CodecError, match="colour: unknown parameter"):
        msg.LogsQuery.from_params({"colour": "red"})


def test_version_rule() -> None:
    """Same major interoperates, a different one is refused naming both versions; unknown
    fields are ignored only from a newer minor; no header means 1.0."""
    ours = version.Version(1, 2)
    version.check(version.Version(1, 0), ours=ours)
    version.check(version.Version(1, 9), ours=ours)
    with pytest.raises(VersionMismatch, match=r"speaks protocol 2\.0.*speaks 1\.2"):
        version.check(version.Version(2, 0), ours=ours)
    assert version.lenient(version.Version(1, 3), ours=ours)
    assert not version.lenient(version.Version(1, 2), ours=ours)
    assert not version.lenient(version.Version(2, 5), ours=ours)
    assert version.Version.parse(None) == version.LEGACY == version.Version(1, 0)
    assert version.Version.parse(" 1.7") == version.Version(1, 7)
    with pytest.raises(VersionMismatch, match=r"not <major>\.<minor>"):
        version.Version.parse("one")
