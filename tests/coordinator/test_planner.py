"""Tests for superagent.coordinator.deploy.planner: the pure rolling-deploy saga."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from superagent.coordinator.deploy import model
from superagent.coordinator.deploy.model import (
    LOG_EXCERPT_MAX,
    SIGNAL_ID,
    Action,
    Cancel,
    DeployRecord,
    Drain,
    Drained,
    Event,
    Finish,
    IllegalEvent,
    NewStopped,
    NodeAction,
    NodeEvent,
    NodeLost,
    OldStopped,
    Prepare,
    Prepared,
    PrepareFailed,
    Stage,
    Start,
    Started,
    StartFailed,
    Status,
    Step,
    StopInstances,
    Switch,
    SwitchBack,
    Switched,
    SwitchedBack,
    action_from_doc,
    batches,
    event_from_doc,
    log_tail,
    new_record,
)
from superagent.coordinator.deploy.planner import advance, next_actions

SHA = "ab" * 32


def record(nodes: tuple[str, ...] = ("n1", "n2"), *, per_node: int = 1,
           max_parallel: int = 1, deploy_id: str = "d1") -> DeployRecord:
    return new_record(deploy_id=deploy_id, app="hello", release="r3", sha256=SHA, nodes=nodes,
                      per_node=per_node, max_parallel=max_parallel, drain_grace=30)


def feed(rec: DeployRecord, *events: Event) -> DeployRecord:
    for event in events:
        rec = advance(rec, event)
    return rec


def built(rec: DeployRecord) -> DeployRecord:
    """``rec`` after a successful build and test."""
    rec = feed(rec, *(Prepared(node=n) for n in rec.nodes), model.Tested(ok=True, log="ok"))
    assert rec.stage is Stage.ROLL
    return rec


def old_of(node: str) -> tuple[str, ...]:
    return (f"{node}-old",)


def new_of(node: str) -> tuple[str, ...]:
    return (f"{node}-new",)


def rolled(rec: DeployRecord, node: str) -> DeployRecord:
    """``node`` started, switched and drained."""
    return feed(rec, Started(node=node, old=old_of(node), new=new_of(node)),
                Switched(node=node), Drained(node=node))


def kinds(actions: tuple[Action, ...]) -> list[tuple[str, str]]:
    return [(a.kind, getattr(a, "node", "")) for a in actions]


# -- records, validation, codecs ----------------------------------------------------------

@pytest.mark.parametrize(("changes", "message"), [
    ({"nodes": ()}, "nodes"),
    ({"nodes": ("n1", "n1")}, "distinct"),
    ({"nodes": "n1"}, "not a string"),
    ({"nodes": ("bad name",)}, "nodes"),
    ({"per_node": 0}, "per_node"),
    ({"per_node": 65}, "per_node"),
    ({"max_parallel": 0}, "max_parallel"),
    ({"deploy_id": "bad/id"}, "deploy_id"),
    ({"sha256": "xyz"}, "sha256"),
    ({"release": ""}, "release"),
    ({"drain_grace": float("nan")}, "drain_grace"),
])
def test_new_record_rejects(changes: dict[str, object], message: str) -> None:
    """new_record raises ValueError naming the bad argument."""
    args: dict[str, object] = {"deploy_id": "d1", "app": "hello", "release": "r3",
                               "sha256": SHA, "nodes": ("n1", "n2"), "per_node": 2,
                               "max_parallel": 1, "drain_grace": 30.0}
    with pytest.raises(ValueError, match=message):
        new_record(**{**args, **changes})  # type: ignore[arg-type]


def test_new_record_starts_in_build() -> None:
    """A new record: build stage, running, every node pending, test on the first node."""
    rec = record(("a", "b", "c"))
    assert (rec.stage, rec.status, rec.test_node, rec.tested) == (
        Stage.BUILD, Status.RUNNING, "a", False)
    assert [s.step for s in rec.steps] == [Step.PENDING] * 3
    assert repr(rec) == "<DeployRecord d1 hello@r3 stage=build status=running a=pending " \
                        "b=pending c=pending>"


@pytest.mark.parametrize(("max_parallel", "expected"), [
    (1, [("n1",), ("n2",), ("n3",), ("n4",)]),
    (2, [("n1", "n2"), ("n3", "n4")]),
    (3, [("n1", "n2", "n3"), ("n4",)]),
    (9, [("n1", "n2", "n3", "n4")]),
])
def test_batches(max_parallel: int, expected: list[tuple[str, ...]]) -> None:
    """Nodes are rolled in roll order, max_parallel at a time."""
    assert batches(record(("n1", "n2", "n3", "n4"), max_parallel=max_parallel)) == expected


def test_record_round_trips_through_json() -> None:
    """to_doc is plain JSON and from_doc gives back an equal record."""
    rec = feed(built(record()), Started(node="n1", old=old_of("n1"), new=new_of("n1")),
               StartFailed(node="n2", error="boom", new=("x",)))
    doc = json.loads(json.dumps(rec.to_doc()))
    assert doc["stage"] == "compensate" and doc["steps"][0]["step"] == "started"
    assert DeployRecord.from_doc(doc) == rec


@pytest.mark.parametrize("breakage", [
    lambda d: d.pop("nodes"),
    lambda d: d.update(stage="flying"),
    lambda d: d.update(per_node="2"),
    lambda d: d.update(tested=1),
    lambda d: d.update(extra=1),
    lambda d: d.update(status="succeeded"),  # not done
    lambda d: d["steps"].pop(),
    lambda d: d["steps"][0].update(step="nowhere"),
    lambda d: d.update(logs=[["n1"]]),
])
def test_record_from_bad_doc(breakage: Callable[[dict[str, object]], object]) -> None:
    """A malformed record document raises ValueError."""
    doc = record().to_doc()
    breakage(doc)
    with pytest.raises(ValueError):
        DeployRecord.from_doc(doc)
    with pytest.raises(ValueError):
        DeployRecord.from_doc([])


ALL_EVENTS: list[Event] = [
    Prepared(node="n1"), PrepareFailed(node="n1", error="e", log="l"),
    model.Tested(ok=False, log="l"),
    Started(node="n1", old=("a",), new=("b", "c")), StartFailed(node="n1", error="e"),
    Switched(node="n1"), Drained(node="n1"), OldStopped(node="n1"), SwitchedBack(node="n1"),
    NewStopped(node="n1"), NodeLost(node="n1", error="gone"), Cancel(reason="operator")]


@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: e.type)
def test_event_round_trips(event: Event) -> None:
    """Every event round-trips through JSON with its type tag."""
    doc = json.loads(json.dumps(event.to_doc()))
    assert doc["type"] == event.type
    assert event_from_doc(doc) == event


@pytest.mark.parametrize("doc", [{"type": "nope"}, {"node": "n1"}, {"type": "prepared"},
                                 {"type": "started", "node": "n1", "old": "a", "new": []},
                                 {"type": "tested", "ok": "yes", "log": ""}, "prepared"])
def test_event_from_bad_doc(doc: object) -> None:
    """A malformed event document raises ValueError."""
    with pytest.raises(ValueError):
        event_from_doc(doc)


ALL_ACTIONS: list[Action] = [
    Prepare(deploy_id="d1", node="n1"), model.Test(deploy_id="d1", node="n1"),
    Start(deploy_id="d1", node="n1", count=2), Switch(deploy_id="d1", node="n1", instances=("b",)),
    SwitchBack(deploy_id="d1", node="n1", instances=()),
    Drain(deploy_id="d1", node="n1", instances=("a",), grace=30.0),
    StopInstances(deploy_id="d1", node="n1", instances=("a",), purpose="commit"),
    StopInstances(deploy_id="d1", node="n1", instances=("b",), purpose="compensate"),
    Finish(deploy_id="d1", status="succeeded", reason="")]


def test_actions_signal_ids_and_codec() -> None:
    """Signal ids are deploy/node/kind, distinct per kind, valid, and actions round-trip."""
    ids = [a.signal_id for a in ALL_ACTIONS]
    assert ids == ["d1/n1/prepare", "d1/n1/test", "d1/n1/start", "d1/n1/switch",
                   "d1/n1/switch_back", "d1/n1/drain", "d1/n1/stop_old", "d1/n1/stop_new",
                   "d1/finish"]
    assert all(SIGNAL_ID.fullmatch(i) for i in ids)
    for action in ALL_ACTIONS:
        assert action_from_doc(json.loads(json.dumps(action.to_doc()))) == action
    with pytest.raises(ValueError):
        StopInstances(deploy_id="d1", node="n1", instances=(), purpose="tidy")
    with pytest.raises(ValueError):
        action_from_doc({**ALL_ACTIONS[6].to_doc(), "kind": "stop_new"})


def test_longest_signal_id_is_valid() -> None:
    """The longest deploy id and node name still make a valid signal id."""
    rec = record(("n" * 63,), deploy_id="d" * 64)
    assert all(SIGNAL_ID.fullmatch(a.signal_id) for a in next_actions(rec))
    long_ids = [replace(a, deploy_id=rec.deploy_id, node=rec.nodes[0])
                for a in ALL_ACTIONS if isinstance(a, NodeAction)]
    assert all(SIGNAL_ID.fullmatch(a.signal_id) for a in long_ids)


def test_log_tail_keeps_the_end() -> None:
    """Logs are cut to their last 16 KiB without splitting a UTF-8 character."""
    assert log_tail("short") == "short"
    text = "é" * LOG_EXCERPT_MAX + "THE END"
    tail = log_tail(text)
    assert tail.endswith("THE END") and len(tail.encode()) <= LOG_EXCERPT_MAX
    rec = advance(record(), PrepareFailed(node="n2", error="x", log=text))
    assert rec.logs == (("n2", tail),)


# -- rule 1: build ------------------------------------------------------------------------

def test_build_prepares_every_node_then_tests_once() -> None:
    """All pending nodes prepare concurrently; the test runs on test_node once it is ready."""
    rec = record(("n1", "n2", "n3"))
    assert kinds(next_actions(rec)) == [("prepare", "n1"), ("prepare", "n2"), ("prepare", "n3")]
    rec = advance(rec, Prepared(node="n1"))
    assert kinds(next_actions(rec)) == [("prepare", "n2"), ("prepare", "n3"), ("test", "n1")]
    rec = feed(rec, model.Tested(ok=True, log=""), Prepared(node="n2"))
    assert rec.stage is Stage.BUILD and kinds(next_actions(rec)) == [("prepare", "n3")]
    rec = advance(rec, Prepared(node="n3"))
    assert rec.stage is Stage.ROLL


def test_prepare_failure_fails_with_log_and_late_outcomes_recorded() -> None:
    """A prepare failure ends the deploy 'failed'; outcomes still in flight are recorded."""
    rec = feed(record(("n1", "n2", "n3")), Prepared(node="n1"),
               PrepareFailed(node="n2", error="npm exploded", log="...tail"))
    assert (rec.stage, rec.status) == (Stage.DONE, Status.FAILED)
    assert rec.reason == "prepare failed on n2: npm exploded"
    assert rec.logs == (("n2", "...tail"),) and rec.step_of("n2").error == "npm exploded"
    rec = feed(rec, Prepared(node="n3"), model.Tested(ok=True, log=""))
    assert rec.step_of("n3").step is Step.PREPARED and rec.stage is Stage.DONE
    assert next_actions(rec) == (Finish(deploy_id="d1", status="failed", reason=rec.reason),)


def test_test_failure_fails() -> None:
    """A failing test ends the deploy 'failed' with the test log attached."""
    rec = feed(record(), Prepared(node="n1"), model.Tested(ok=False, log="1 failed"))
    assert (rec.status, rec.reason, rec.logs) == (
        Status.FAILED, "test failed on n1", (("test", "1 failed"),))


def test_cancel_and_lost_node_during_build_fail() -> None:
    """Cancel or a lost node during build: 'failed', nothing to compensate."""
    rec = advance(record(), Cancel(reason="operator"))
    assert (rec.status, rec.reason) == (Status.FAILED, "cancelled: operator")
    rec = advance(record(), NodeLost(node="n2", error="timeout"))
    assert (rec.status, rec.reason) == (Status.FAILED, "node n2 lost: timeout")
    assert rec.step_of("n2").lost


# -- rules 2 and 3: roll and commit ----------------------------------------------------------

def run_happy(rec: DeployRecord) -> tuple[DeployRecord, list[list[tuple[str, str]]]]:
    """Drive ``rec`` with every action succeeding; returns the rounds' actions."""
    rounds = []
    while not isinstance((actions := next_actions(rec))[0], Finish):
        rounds.append(kinds(actions))
        for a in actions:
            rec = advance(rec, _success(a))
    return rec, rounds


def _success(a: Action) -> Event:
    assert isinstance(a, Prepare | model.Test | Start | Switch | Drain | StopInstances)
    if isinstance(a, Start):
        return Started(node=a.node, old=old_of(a.node), new=new_of(a.node))
    if isinstance(a, model.Test):
        return model.Tested(ok=True, log="")
    outcome: type[NodeEvent] = {
        "prepare": Prepared, "switch": Switched, "drain": Drained, "stop_old": OldStopped}[a.kind]
    return outcome(node=a.node)


@pytest.mark.parametrize(("max_parallel", "roll"), [
    (1, [[("start", "n1")], [("switch", "n1")], [("drain", "n1")],
         [("start", "n2")], [("switch", "n2")], [("drain", "n2")],
         [("start", "n3")], [("switch", "n3")], [("drain", "n3")],
         [("start", "n4")], [("switch", "n4")], [("drain", "n4")]]),
    (2, [[("start", "n1"), ("start", "n2")], [("switch", "n1"), ("switch", "n2")],
         [("drain", "n1"), ("drain", "n2")],
         [("start", "n3"), ("start", "n4")], [("switch", "n3"), ("switch", "n4")],
         [("drain", "n3"), ("drain", "n4")]]),
    (3, [[("start", "n1"), ("start", "n2"), ("start", "n3")],
         [("switch", "n1"), ("switch", "n2"), ("switch", "n3")],
         [("drain", "n1"), ("drain", "n2"), ("drain", "n3")],
         [("start", "n4")], [("switch", "n4")], [("drain", "n4")]]),
])
def test_roll_in_batches_then_commit(max_parallel: int, roll: list[list[tuple[str, str]]]) -> None:
    """Each batch starts after the previous one drained; commit stops every old instance."""
    nodes = ("n1", "n2", "n3", "n4")
    rec, rounds = run_happy(record(nodes, max_parallel=max_parallel))
    assert rounds[0] == [("prepare", n) for n in nodes]
    assert rounds[1] == [("test", "n1")]
    assert rounds[2:-1] == roll
    assert rounds[-1] == [("stop_old", n) for n in nodes]
    assert (rec.stage, rec.status, rec.reason) == (Stage.DONE, Status.SUCCEEDED, "")
    assert all(s.step is Step.COMMITTED for s in rec.steps)
    assert next_actions(rec) == next_actions(rec) == (
        Finish(deploy_id="d1", status="succeeded", reason=""),)


def test_roll_actions_carry_instances() -> None:
    """Start asks for per_node instances, Switch names the new ones, Drain the old ones."""
    rec = built(record(("n1",), per_node=2))
    assert next_actions(rec) == (Start(deploy_id="d1", node="n1", count=2),)
    rec = advance(rec, Started(node="n1", old=("o1", "o2"), new=("a", "b")))
    assert next_actions(rec) == (Switch(deploy_id="d1", node="n1", instances=("a", "b")),)
    rec = advance(rec, Switched(node="n1"))
    assert next_actions(rec) == (Drain(deploy_id="d1", node="n1", instances=("o1", "o2"),
                                       grace=30.0),)
    rec = advance(rec, Drained(node="n1"))
    assert next_actions(rec) == (StopInstances(deploy_id="d1", node="n1", instances=("o1", "o2"),
                                               purpose="commit"),)


def test_first_deploy_skips_drain_and_stop() -> None:
    """A node with no old instances is drained on switch and committed with nothing to stop."""
    rec = feed(built(record(("n1",))), Started(node="n1", old=(), new=("a",)),
               Switched(node="n1"))
    assert (rec.stage, rec.status) == (Stage.DONE, Status.SUCCEEDED)
    assert rec.step_of("n1").step is Step.COMMITTED


def test_lost_node_during_commit_still_succeeds() -> None:
    """The new release serves everywhere: a node lost while stopping old is only noted."""
    rec = rolled(rolled(built(record(("n1", "n2"), max_parallel=2)), "n1"), "n2")
    assert rec.stage is Stage.COMMIT
    rec = feed(rec, Cancel(reason="too late"), NodeLost(node="n2", error="unreachable"))
    assert rec.stage is Stage.COMMIT and next_actions(rec) == (
        StopInstances(deploy_id="d1", node="n1", instances=old_of("n1"), purpose="commit"),)
    rec = advance(rec, OldStopped(node="n1"))
    assert (rec.status, rec.reason) == (
        Status.SUCCEEDED, "succeeded; old instances on n2 not stopped: unreachable")


# -- rules 4 and 5: failure during roll, compensation ----------------------------------------

def test_start_failure_compensates_switched_nodes() -> None:
    """Rolled nodes switch back then stop new; a failed start stops its partial instances."""
    rec = rolled(built(record(("n1", "n2", "n3"))), "n1")
    rec = advance(rec, StartFailed(node="n2", error="port in use", new=("n2-new",)))
    assert (rec.stage, rec.reason) == (Stage.COMPENSATE, "start failed on n2: port in use")
    assert next_actions(rec) == (
        SwitchBack(deploy_id="d1", node="n1", instances=old_of("n1")),
        StopInstances(deploy_id="d1", node="n2", instances=("n2-new",), purpose="compensate"))
    rec = feed(rec, SwitchedBack(node="n1"), NewStopped(node="n2"))
    assert next_actions(rec) == (
        StopInstances(deploy_id="d1", node="n1", instances=new_of("n1"), purpose="compensate"),)
    rec = advance(rec, NewStopped(node="n1"))
    assert (rec.stage, rec.status) == (Stage.DONE, Status.ROLLED_BACK)
    assert [s.step for s in rec.steps] == [Step.ROLLED_BACK, Step.ROLLED_BACK, Step.PREPARED]
    assert next_actions(rec)[0] == Finish(deploy_id="d1", status="rolled_back",
                                          reason="start failed on n2: port in use")


def test_start_failure_without_instances_is_rolled_back_at_once() -> None:
    """A start that started nothing leaves nothing to stop."""
    rec = advance(built(record(("n1",))), StartFailed(node="n1", error="no ports"))
    assert (rec.status, rec.step_of("n1").step) == (Status.ROLLED_BACK, Step.ROLLED_BACK)


def test_start_failure_keeps_the_failing_instances_last_lines() -> None:
    """The participant's whole answer (the instance's last stdout and stderr lines) is in
    the record's logs; the step's error is only its summary line."""
    tails = "instance a@r2.1 exited with 3\n--- last stdout ---\nhi\n--- last stderr ---\n" \
        + "Traceback: boom " * 100
    rec = advance(built(record(("n1",))), StartFailed(node="n1", error=tails[:50], log=tails))
    assert rec.logs[-1][0] == "n1" and "--- last stderr ---" in rec.logs[-1][1]
    assert rec.logs[-1][1].endswith("boom ")
    older = advance(built(record(("n1",))), StartFailed(node="n1", error="no ports"))
    assert older.logs == ()  # an event of an older leader, without a log


def test_first_deploy_switches_back_to_nothing() -> None:
    """On an app's first deploy the compensating switch routes to no instance."""
    rec = feed(built(record(("n1", "n2"))), Started(node="n1", old=(), new=("a",)),
               Switched(node="n1"), Cancel(reason="operator"))
    assert next_actions(rec) == (SwitchBack(deploy_id="d1", node="n1", instances=()),)


def test_late_outcomes_during_compensate_are_recorded_and_compensated() -> None:
    """Outcomes of the same round landing after a failure are recorded, then undone."""
    rec = built(record(("n1", "n2", "n3"), max_parallel=3))
    rec = feed(rec, *(Started(node=n, old=old_of(n), new=new_of(n)) for n in rec.nodes))
    rec = feed(rec, NodeLost(node="n1", error="gone"), Switched(node="n2"), Switched(node="n3"),
               Drained(node="n3"), Cancel(reason="second reason"))
    assert rec.reason == "node n1 lost: gone"  # the first reason wins
    assert kinds(next_actions(rec)) == [("switch_back", "n2"), ("switch_back", "n3")]
    rec = feed(rec, SwitchedBack(node="n2"), SwitchedBack(node="n3"),
               NewStopped(node="n2"), NewStopped(node="n3"))
    assert (rec.status, rec.step_of("n1").lost, rec.step_of("n1").error) == (
        Status.ROLLED_BACK, True, "gone")


def test_late_start_reopens_a_finished_compensation() -> None:
    """A Started landing after compensation finished reopens it, so no instance leaks."""
    rec = built(record(("n1", "n2"), max_parallel=2))
    rec = advance(rec, NodeLost(node="n1", error="gone"))
    assert (rec.stage, rec.status) == (Stage.DONE, Status.ROLLED_BACK)
    rec = advance(rec, Started(node="n2", old=old_of("n2"), new=new_of("n2")))
    assert (rec.stage, rec.status) == (Stage.COMPENSATE, Status.RUNNING)
    assert kinds(next_actions(rec)) == [("stop_new", "n2")]
    assert advance(rec, NewStopped(node="n2")).status is Status.ROLLED_BACK


def test_cancel_after_done_is_ignored() -> None:
    """Cancel changes nothing once the deploy is done."""
    rec, _ = run_happy(record())
    assert advance(rec, Cancel(reason="late")) == rec


# -- re-issuing and illegal events -----------------------------------------------------------

def test_mid_way_record_reissues_the_same_actions() -> None:
    """A new leader reading the stored record issues the same actions, same signal ids."""
    rec = feed(built(record(("n1", "n2", "n3"), max_parallel=2)),
               Started(node="n1", old=old_of("n1"), new=new_of("n1")))
    first = next_actions(rec)
    again = next_actions(DeployRecord.from_doc(json.loads(json.dumps(rec.to_doc()))))
    assert again == first
    assert [a.signal_id for a in again] == ["d1/n1/switch", "d1/n2/start"]


@pytest.mark.parametrize(("setup", "event"), [
    (lambda r: r, Prepared(node="ghost")),
    (lambda r: r, Started(node="n1", old=(), new=("a",))),  # during build
    (lambda r: built(r), OldStopped(node="n1")),  # never drained
    (lambda r: built(r), Prepared(node="n1")),  # already prepared
    (lambda r: built(r), model.Tested(ok=True, log="")),  # test ran already
    (lambda r: r, model.Tested(ok=True, log="")),  # test node not prepared
    (lambda r: built(r), Started(node="n1", old=("a",), new=("a",))),  # overlapping ids
    (lambda r: built(r), Started(node="n1", old=(), new=())),  # started nothing
    (lambda r: advance(built(r), NodeLost(node="n1", error="x")), NewStopped(node="n1")),
    (lambda r: advance(built(r), Cancel(reason="x")), SwitchedBack(node="n1")),
])
def test_nonsense_events_raise(setup: Callable[[DeployRecord], DeployRecord],
                               event: Event) -> None:
    """An event that cannot follow the record raises IllegalEvent, a ValueError."""
    rec = setup(record())
    with pytest.raises(IllegalEvent) as info:
        advance(rec, event)
    assert isinstance(info.value, ValueError) and "d1" in str(info.value)


# -- the invariant: a fake cluster driven by the planner, with random failures ------------

@dataclass
class FakeNode:
    routes: set[str]
    running: set[str]
    old: frozenset[str]
    lost: bool = False


@dataclass
class FakeCluster:
    nodes: dict[str, FakeNode]
    started: set[str] = field(default_factory=set)  # every instance ever started
    serial: int = 0

    def execute(self, a: Action, outcome: str, partial: int) -> Event:
        """Carry out ``a`` ("ok", "fail" or "lost") and return its outcome event."""
        assert isinstance(a, Prepare | model.Test | Start | Switch | Drain | StopInstances)
        n = self.nodes[a.node]
        assert not n.lost, f"action {a} for lost node"
        if outcome == "lost":
            n.lost = True
            return NodeLost(node=a.node, error="unreachable")
        if isinstance(a, Prepare):
            return Prepared(node=a.node) if outcome == "ok" else PrepareFailed(
                node=a.node, error="build failed", log="log")
        if isinstance(a, model.Test):
            return model.Tested(ok=outcome == "ok", log="test log")
        if isinstance(a, Start):
            count = a.count if outcome == "ok" else partial % a.count
            new = tuple(self._new(a.node) for _ in range(count))
            n.running |= set(new)
            if outcome == "ok":
                return Started(node=a.node, old=tuple(sorted(n.routes)), new=new)
            return StartFailed(node=a.node, error="not ready", new=new)
        if isinstance(a, Switch):
            assert set(a.instances) <= n.running
            n.routes = set(a.instances)
            return SwitchedBack(node=a.node) if a.kind == "switch_back" else Switched(node=a.node)
        if isinstance(a, Drain):
            assert set(a.instances) <= n.running and not set(a.instances) & n.routes
            return Drained(node=a.node)
        assert not set(a.instances) & n.routes, "stopping routed instances"
        n.running -= set(a.instances)
        return OldStopped(node=a.node) if a.purpose == "commit" else NewStopped(node=a.node)

    def _new(self, node: str) -> str:
        self.serial += 1
        name = f"{node}-new{self.serial}"
        self.started.add(name)
        return name


def check_round_trip(rec: DeployRecord) -> None:
    assert DeployRecord.from_doc(json.loads(json.dumps(rec.to_doc()))) == rec


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodes=st.integers(1, 5), max_parallel=st.integers(1, 3), per_node=st.integers(1, 3),
       old_counts=st.lists(st.integers(0, 2), min_size=5, max_size=5), data=st.data())
def test_saga_invariants(nodes: int, max_parallel: int, per_node: int, old_counts: list[int],
                         data: st.DataObject) -> None:
    """Under random failures, losses and cancels the saga terminates, leaves every reachable
    node routing exactly old or exactly new instances, leaks nothing, and is deterministic."""
    names = tuple(f"n{i}" for i in range(1, nodes + 1))
    cluster = FakeCluster({
        name: FakeNode(routes=set(old), running=set(old), old=frozenset(old))
        for name, count in zip(names, old_counts, strict=False)
        for old in [{f"{name}-old{i}" for i in range(count)}]})
    start = record(names, per_node=per_node, max_parallel=max_parallel)
    rec, history = start, list[Event]()
    outcome = st.integers(0, 24).map(lambda i: "lost" if i == 0 else "fail" if i == 1 else "ok")
    bound = 3 * len(batches(start)) + 8
    for _ in range(bound):
        actions = next_actions(rec)
        assert actions, f"stuck: {rec!r}"
        for a in actions:
            assert SIGNAL_ID.fullmatch(a.signal_id)
            assert action_from_doc(json.loads(json.dumps(a.to_doc()))) == a
        if isinstance(actions[0], Finish):
            assert len(actions) == 1 and actions[0].status == rec.status.value
            break
        assert len({getattr(a, "node", "") for a in actions}) == len(actions), "one per node"
        events = [cluster.execute(a, data.draw(outcome), data.draw(st.integers(0, 9)))
                  for a in actions]
        for event in data.draw(st.permutations(events)):
            if data.draw(st.integers(0, 40)) == 0:
                history.append(Cancel(reason="operator"))
                rec = advance(rec, history[-1])
            assert event_from_doc(json.loads(json.dumps(event.to_doc()))) == event
            history.append(event)
            rec = advance(rec, event)
            check_round_trip(rec)
    else:
        pytest.fail(f"no Finish within {bound} rounds: {rec!r}")

    assert feed(start, *history) == rec  # determinism
    hypothesis.event(f"status={rec.status.value}")
    hypothesis.event(f"lost={sum(s.lost for s in rec.steps)}")
    for step in rec.steps:
        node = cluster.nodes[step.node]
        assert node.lost == step.lost
        if node.lost:
            continue
        expected = set(step.new) if rec.status is Status.SUCCEEDED else set(node.old)
        assert node.routes == expected, (rec, step)
        assert node.running == node.routes, (rec, step)  # nothing leaked, nothing unrouted
        if rec.status is Status.FAILED:
            assert not node.running & cluster.started
