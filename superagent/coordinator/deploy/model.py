"""The deploy saga's data: the record, the events the runner commits, the actions it runs.

Frozen dataclasses that round-trip through plain JSON (``to_doc``/``from_doc``, both the
shared ``superagent.codec``), because the record lives in the Raft-replicated
``ClusterState``. What to do with them is ``planner``'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from superagent import codec
from superagent.coordinator.commands import DEPLOY_ID, NODE_NAME
from superagent.manifest import MAX_PER_NODE
from superagent.names import APP_NAME, SHA256

LOG_EXCERPT_MAX = 16 * 1024  # bytes of log tail kept in the replicated record; the rest is on disk
ERROR_MAX = 500  # characters of one node's error: a summary line, not a log
RELEASE_MAX = 64  # characters of a release name ("r3")
TEST_LOG = "test"  # the ``logs`` key of the test command's output
SIGNAL_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,200}")  # what a participant accepts as a signal id


class Stage(StrEnum):
    BUILD = "build"
    ROLL = "roll"
    COMMIT = "commit"
    COMPENSATE = "compensate"
    DONE = "done"


class Status(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"  # compensated after traffic began to move
    FAILED = "failed"  # ended before any traffic moved


class Step(StrEnum):
    PENDING = "pending"
    PREPARED = "prepared"
    STARTED = "started"
    SWITCHED = "switched"
    DRAINED = "drained"  # rolled; old instances kept warm
    COMMITTED = "committed"  # old instances stopped
    START_FAILED = "start_failed"
    SWITCHED_BACK = "switched_back"
    ROLLED_BACK = "rolled_back"  # new instances stopped


# Steps whose node has new instances or routes to undo when compensating.
NEEDS_UNDO = frozenset({Step.STARTED, Step.START_FAILED, Step.SWITCHED, Step.DRAINED,
                        Step.SWITCHED_BACK})


class IllegalEvent(ValueError):
    """An event that cannot follow the record's state: the runner has a bug."""

    def __init__(self, message: str, *, deploy_id: str = "", node: str = "") -> None:
        self.deploy_id = deploy_id
        self.node = node
        super().__init__(f"deploy {deploy_id}: {message}" if deploy_id else message)


# -- JSON ------------------------------------------------------------------------------------
# Every dataclass here goes through ``superagent.codec``; ``_decode`` keeps this module's
# error form (a ValueError naming the class and the field).

def _want(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{name}: must be {what}")


_T = TypeVar("_T")


def _decode(cls: type[_T], doc: Any) -> _T:
    """``cls`` built from ``doc``; ValueError names the class and the bad field."""
    try:
        return codec.decode(cls, doc)
    except (TypeError, ValueError) as exc:  # CodecError is a ValueError
        raise ValueError(f"{cls.__name__}: {exc}") from None


def log_tail(text: str) -> str:
    """The last ``LOG_EXCERPT_MAX`` bytes of ``text`` (UTF-8), never splitting a character."""
    data = text.encode("utf-8", "replace")
    if len(data) <= LOG_EXCERPT_MAX:
        return text
    return data[-LOG_EXCERPT_MAX:].decode("utf-8", "ignore")


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the record ------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class NodeStep:
    """One target node's progress. ``old``: instances that served before (read when the
    node starts rolling); ``new``: instances this deploy started; ``lost``: unreachable,
    excluded from further actions; ``count``: the instances to start there (0: the
    record's ``per_node``; an ``instances`` app's placement gives each node its own)."""

    node: str
    step: Step
    old: tuple[str, ...]
    new: tuple[str, ...]
    error: str = ""
    lost: bool = False
    count: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "step", Step(self.step))  # accept the plain string too
        object.__setattr__(self, "old", tuple(self.old))
        object.__setattr__(self, "new", tuple(self.new))
        _want(isinstance(self.count, int) and 0 <= self.count <= MAX_PER_NODE, "count",
              f"0-{MAX_PER_NODE}")

    def to_doc(self) -> dict[str, Any]:
        return codec.encode(self)

    @staticmethod
    def from_doc(doc: Any) -> NodeStep:
        return _decode(NodeStep, doc)


@dataclass(frozen=True, kw_only=True, repr=False)
class DeployRecord:
    """The saga's whole state; stored in ClusterState, changed only by ``advance``."""

    deploy_id: str
    app: str
    release: str
    sha256: str
    nodes: tuple[str, ...]  # targets, in roll order
    per_node: int
    max_parallel: int
    drain_grace: float
    stage: Stage
    status: Status
    reason: str
    tested: bool  # the test command has reported (its outcome decides the status)
    test_node: str
    steps: tuple[NodeStep, ...]  # one per node, same order
    logs: tuple[tuple[str, str], ...]  # (node or "test", log tail)

    def __post_init__(self) -> None:
        for name, enum in (("stage", Stage), ("status", Status)):
            object.__setattr__(self, name, enum(getattr(self, name)))
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "drain_grace", float(self.drain_grace))
        _want(DEPLOY_ID.fullmatch(self.deploy_id) is not None, "deploy_id",
              f"like {DEPLOY_ID.pattern}")
        _want(APP_NAME.fullmatch(self.app) is not None, "app", f"like {APP_NAME.pattern}")
        _want(1 <= len(self.release) <= RELEASE_MAX, "release", f"1-{RELEASE_MAX} characters")
        _want(SHA256.fullmatch(self.sha256) is not None, "sha256", "64 lowercase hex digits")
        _want(len(self.nodes) > 0, "nodes", "a non-empty list")
        _want(len(set(self.nodes)) == len(self.nodes), "nodes", "distinct")
        for node in self.nodes:
            _want(NODE_NAME.fullmatch(node) is not None, "nodes", f"like {NODE_NAME.pattern}")
        _want(1 <= self.per_node <= MAX_PER_NODE, "per_node", f"1-{MAX_PER_NODE}")
        _want(self.max_parallel >= 1, "max_parallel", ">= 1")
        _want(math.isfinite(self.drain_grace) and self.drain_grace >= 0, "drain_grace",
              "a finite number >= 0")
        _want((self.stage is Stage.DONE) == (self.status is not Status.RUNNING), "status",
              "'running' exactly while the stage is not 'done'")
        _want(self.test_node == self.nodes[0], "test_node", "the first node")
        _want(tuple(s.node for s in self.steps) == self.nodes, "steps", "one per node, in order")
        for key, text in self.logs:
            _want(len(text.encode("utf-8", "replace")) <= LOG_EXCERPT_MAX, f"logs[{key}]",
                  f"at most {LOG_EXCERPT_MAX} bytes")

    def __repr__(self) -> str:
        steps = " ".join(f"{s.node}={s.step.value}{'!lost' if s.lost else ''}" for s in self.steps)
        reason = f" reason={self.reason!r}" if self.reason else ""
        return (f"<DeployRecord {self.deploy_id} {self.app}@{self.release} "
                f"stage={self.stage.value} status={self.status.value}{reason} {steps}>")

    def step_of(self, node: str) -> NodeStep:
        """The node's step; raises IllegalEvent (a ValueError) if it is not a target."""
        for s in self.steps:
            if s.node == node:
                return s
        raise IllegalEvent(f"node {node!r} is not a target", deploy_id=self.deploy_id, node=node)

    def to_doc(self) -> dict[str, Any]:
        return codec.encode(self)

    @staticmethod
    def from_doc(doc: Any) -> DeployRecord:
        """The record ``to_doc`` produced; raises ValueError on a malformed document."""
        return _decode(DeployRecord, doc)


def new_record(*, deploy_id: str, app: str, release: str, sha256: str, nodes: Iterable[str],
               per_node: int, max_parallel: int, drain_grace: float,
               counts: Mapping[str, int] | None = None) -> DeployRecord:
    """A deploy at its first step; raises ValueError naming the bad argument. ``counts``:
    the instances to start per node where it is not ``per_node``."""
    if isinstance(nodes, str):
        raise ValueError("nodes: must be a list of node names, not a string")
    nodes = tuple(nodes)
    if not nodes:
        raise ValueError("nodes: must be a non-empty list")
    counts = counts or {}
    return DeployRecord(
        deploy_id=deploy_id, app=app, release=release, sha256=sha256, nodes=nodes,
        per_node=per_node, max_parallel=max_parallel, drain_grace=drain_grace,
        stage=Stage.BUILD, status=Status.RUNNING, reason="", tested=False,
        test_node=nodes[0], logs=(),
        steps=tuple(NodeStep(node=n, step=Step.PENDING, old=(), new=(),
                             count=counts.get(n, 0)) for n in nodes))


def batches(record: DeployRecord) -> list[tuple[str, ...]]:
    """The roll order: ``nodes`` in chunks of ``max_parallel``."""
    n, size = record.nodes, record.max_parallel
    return [n[i:i + size] for i in range(0, len(n), size)]


# -- events: outcomes the runner commits to Raft --------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Event:
    type: ClassVar[str] = ""

    def to_doc(self) -> dict[str, Any]:
        return codec.encode(self)


@dataclass(frozen=True, kw_only=True)
class NodeEvent(Event):
    node: str


@dataclass(frozen=True, kw_only=True)
class Prepared(NodeEvent):
    type: ClassVar[str] = "prepared"


@dataclass(frozen=True, kw_only=True)
class PrepareFailed(NodeEvent):
    type: ClassVar[str] = "prepare_failed"
    error: str
    log: str


@dataclass(frozen=True, kw_only=True)
class Tested(Event):
    type: ClassVar[str] = "tested"
    ok: bool
    log: str


@dataclass(frozen=True, kw_only=True)
class Started(NodeEvent):
    type: ClassVar[str] = "started"
    old: tuple[str, ...]
    new: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class StartFailed(NodeEvent):
    type: ClassVar[str] = "start_failed"
    error: str
    new: tuple[str, ...] = ()  # instances that did start and must be stopped


@dataclass(frozen=True, kw_only=True)
class Switched(NodeEvent):
    type: ClassVar[str] = "switched"


@dataclass(frozen=True, kw_only=True)
class Drained(NodeEvent):
    type: ClassVar[str] = "drained"


@dataclass(frozen=True, kw_only=True)
class OldStopped(NodeEvent):
    type: ClassVar[str] = "old_stopped"


@dataclass(frozen=True, kw_only=True)
class SwitchedBack(NodeEvent):
    type: ClassVar[str] = "switched_back"


@dataclass(frozen=True, kw_only=True)
class NewStopped(NodeEvent):
    type: ClassVar[str] = "new_stopped"


@dataclass(frozen=True, kw_only=True)
class NodeLost(NodeEvent):
    type: ClassVar[str] = "node_lost"
    error: str


@dataclass(frozen=True, kw_only=True)
class Cancel(Event):
    type: ClassVar[str] = "cancel"
    reason: str


EVENT_TYPES: dict[str, type[Event]] = {cls.type: cls for cls in (
    Prepared, PrepareFailed, Tested, Started, StartFailed, Switched, Drained, OldStopped,
    SwitchedBack, NewStopped, NodeLost, Cancel)}


def event_from_doc(doc: Any) -> Event:
    """The event ``Event.to_doc`` produced; raises ValueError on a malformed document."""
    tag = doc.get("type") if isinstance(doc, Mapping) else None
    if not isinstance(tag, str) or tag not in EVENT_TYPES:
        raise ValueError(f"unknown deploy event type {tag!r}")
    return _decode(EVENT_TYPES[tag], doc)


# -- actions: what the runner asks participants to do ---------------------------------------

@dataclass(frozen=True, kw_only=True)
class Action:
    KIND: ClassVar[str] = ""
    deploy_id: str

    @property
    def kind(self) -> str:
        return self.KIND

    @property
    def signal_id(self) -> str:
        """Stable across re-issues: a participant treats a repeat as the same signal."""
        return f"{self.deploy_id}/{self.kind}"

    def to_doc(self) -> dict[str, Any]:
        return {"kind": self.kind, **codec.encode(self, tagged=False)}


@dataclass(frozen=True, kw_only=True)
class NodeAction(Action):
    node: str

    @property
    def signal_id(self) -> str:
        return f"{self.deploy_id}/{self.node}/{self.kind}"


@dataclass(frozen=True, kw_only=True)
class Prepare(NodeAction):
    """Fetch and build the release. Outcome: Prepared | PrepareFailed | NodeLost."""

    KIND: ClassVar[str] = "prepare"


@dataclass(frozen=True, kw_only=True)
class Test(NodeAction):
    """Run the app's test command once. Outcome: Tested | NodeLost."""

    KIND: ClassVar[str] = "test"


@dataclass(frozen=True, kw_only=True)
class Start(NodeAction):
    """Read the node's routes (``old``), start ``count`` new instances and wait until ready.
    Outcome: Started | StartFailed | NodeLost."""

    KIND: ClassVar[str] = "start"
    count: int


@dataclass(frozen=True, kw_only=True)
class Switch(NodeAction):
    """Route the app on ``node`` to exactly ``instances``, acked by every proxy worker.
    Outcome: Switched | NodeLost."""

    KIND: ClassVar[str] = "switch"
    instances: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class SwitchBack(Switch):
    """The compensating switch, to the old instances (``()`` on an app's first deploy).
    Outcome: SwitchedBack | NodeLost."""

    KIND: ClassVar[str] = "switch_back"


@dataclass(frozen=True, kw_only=True)
class Drain(NodeAction):
    """No new requests to ``instances``; in-flight ones finish or hit ``grace`` seconds; the
    instances stay running (warm). Outcome: Drained | NodeLost."""

    KIND: ClassVar[str] = "drain"
    instances: tuple[str, ...]
    grace: float


PURPOSES = {"commit": "stop_old", "compensate": "stop_new"}  # purpose -> kind


@dataclass(frozen=True, kw_only=True)
class StopInstances(NodeAction):
    """Stop ``instances``: the old ones at commit (outcome OldStopped | NodeLost), the new
    ones when compensating (outcome NewStopped | NodeLost)."""

    instances: tuple[str, ...]
    purpose: str

    def __post_init__(self) -> None:
        _want(self.purpose in PURPOSES, "purpose", f"one of {sorted(PURPOSES)}")

    @property
    def kind(self) -> str:
        return PURPOSES[self.purpose]


@dataclass(frozen=True, kw_only=True)
class Finish(Action):
    """Record the final outcome and the audit entry; the runner's loop ends after it."""

    KIND: ClassVar[str] = "finish"
    status: str
    reason: str


ACTION_KINDS: dict[str, type[Action]] = {
    "prepare": Prepare, "test": Test, "start": Start, "switch": Switch,
    "switch_back": SwitchBack, "drain": Drain, "stop_old": StopInstances,
    "stop_new": StopInstances, "finish": Finish}


def action_from_doc(doc: Any) -> Action:
    """The action ``Action.to_doc`` produced; raises ValueError on a malformed document."""
    kind = doc.get("kind") if isinstance(doc, Mapping) else None
    if not isinstance(kind, str) or kind not in ACTION_KINDS:
        raise ValueError(f"unknown deploy action kind {kind!r}")
    action = _decode(ACTION_KINDS[kind], {k: v for k, v in doc.items() if k != "kind"})
    if action.kind != kind:
        raise ValueError(f"action kind {kind!r} does not match its purpose")
    return action
