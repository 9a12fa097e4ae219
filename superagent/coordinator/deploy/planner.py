"""The rolling-deploy saga as a pure planner: records in, actions out.

Theory of operation
-------------------
A deploy is a ``DeployRecord`` stored in the Raft-replicated ``ClusterState``.
The async runner (elsewhere) loops::

    actions = next_actions(record)        # decide, from the record alone
    ... execute them concurrently ...     # act; one outcome Event per action
    record = advance(record, event)       # applied from the Raft log, per outcome

until it has executed ``Finish``. This module does no I/O and reads no clock:
the same record fed the same events gives the same record, and every structure
round-trips through ``to_doc``/``from_doc`` (plain JSON). A new leader resumes
from the stored record by calling ``next_actions`` again; each action carries a
stable ``signal_id`` (``"{deploy_id}/{node}/{kind}"``) so a participant treats a
re-issued action as the one it may already have carried out.

Stages: ``build`` (every node prepares, the test runs once on ``test_node``) ->
``roll`` (batches of ``max_parallel`` nodes: start new, switch routes, drain
old and keep it warm; a batch starts when every earlier one is drained) ->
``commit`` (stop the old instances) -> ``done``. A failure in build ends the
deploy ``failed`` (no traffic moved, nothing to undo); a failure or a cancel
during roll moves to ``compensate``: switched nodes route back to their warm
old instances, then every new instance is stopped, and the deploy ends
``rolled_back``. Commit is the point of no return: the new release already
serves everywhere, so a lost node there is recorded and the deploy still
``succeeded``.

Each node's progress is a ``Step``; ``_RULES`` is the transition table (from
which steps, to which step, in which phases an event is legal). Outcomes of one
round arrive in any order, so an event may land after the stage it belongs to
has been left (a ``Started`` after another node's failure): it is recorded,
because what it says happened did happen, and the next round compensates it.
A ``rolled_back`` deploy whose late event shows new work to undo reopens to
``compensate``. An event that cannot have happened (unknown or lost node, a
step it cannot follow) raises ``IllegalEvent``, a ``ValueError``: the runner
has a bug.

The planner relies on the runner issuing at most one action per node per
round, which ``next_actions`` guarantees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from superagent.coordinator.commands import REASON_MAX
from superagent.coordinator.deploy.model import (
    ERROR_MAX,
    NEEDS_UNDO,
    TEST_LOG,
    Action,
    Cancel,
    DeployRecord,
    Drain,
    Drained,
    Event,
    Finish,
    IllegalEvent,
    NewStopped,
    NodeEvent,
    NodeLost,
    NodeStep,
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
    Test,
    Tested,
    batches,
    clip,
    log_tail,
)

# -- deciding --------------------------------------------------------------------------------

def _start(r: DeployRecord, s: NodeStep) -> Action:
    return Start(deploy_id=r.deploy_id, node=s.node, count=s.count or r.per_node)


def _switch(r: DeployRecord, s: NodeStep) -> Action:
    return Switch(deploy_id=r.deploy_id, node=s.node, instances=s.new)


def _drain(r: DeployRecord, s: NodeStep) -> Action:
    return Drain(deploy_id=r.deploy_id, node=s.node, instances=s.old, grace=r.drain_grace)


def _stop_old(r: DeployRecord, s: NodeStep) -> Action:
    return StopInstances(deploy_id=r.deploy_id, node=s.node, instances=s.old, purpose="commit")


def _switch_back(r: DeployRecord, s: NodeStep) -> Action:
    return SwitchBack(deploy_id=r.deploy_id, node=s.node, instances=s.old)


def _stop_new(r: DeployRecord, s: NodeStep) -> Action:
    return StopInstances(deploy_id=r.deploy_id, node=s.node, instances=s.new,
                         purpose="compensate")


# What a node in a given step needs next, per stage. Roll is limited to the current batch.
_NEXT: dict[tuple[Stage, Step], Callable[[DeployRecord, NodeStep], Action]] = {
    (Stage.BUILD, Step.PENDING): lambda r, s: Prepare(deploy_id=r.deploy_id, node=s.node),
    (Stage.ROLL, Step.PREPARED): _start,
    (Stage.ROLL, Step.STARTED): _switch,
    (Stage.ROLL, Step.SWITCHED): _drain,
    (Stage.COMMIT, Step.DRAINED): _stop_old,
    (Stage.COMPENSATE, Step.SWITCHED): _switch_back,
    (Stage.COMPENSATE, Step.DRAINED): _switch_back,
    (Stage.COMPENSATE, Step.SWITCHED_BACK): _stop_new,
    (Stage.COMPENSATE, Step.STARTED): _stop_new,
    (Stage.COMPENSATE, Step.START_FAILED): _stop_new,
}


def next_actions(record: DeployRecord) -> tuple[Action, ...]:
    """The actions to execute now (concurrently), at most one per node; empty never
    happens before ``done``, after which it is always ``(Finish(...),)``."""
    if record.stage is Stage.DONE:
        return (Finish(deploy_id=record.deploy_id, status=record.status.value,
                       reason=record.reason),)
    nodes = set(record.nodes)
    if record.stage is Stage.ROLL:
        nodes = set(next(b for b in batches(record)
                         if any(record.step_of(n).step is not Step.DRAINED for n in b)))
    actions = [_NEXT[record.stage, s.step](record, s) for s in record.steps
               if s.node in nodes and not s.lost and (record.stage, s.step) in _NEXT]
    if (record.stage is Stage.BUILD and not record.tested
            and record.step_of(record.test_node).step is Step.PREPARED):
        actions.append(Test(deploy_id=record.deploy_id, node=record.test_node))
    return tuple(actions)


# -- applying outcomes -----------------------------------------------------------------------

def _phase(record: DeployRecord) -> str:
    """The stage, or for a finished deploy its status: events are legal per phase."""
    return record.status.value if record.stage is Stage.DONE else record.stage.value


_ROLLING = frozenset({"roll", "compensate", "rolled_back"})  # roll outcomes may land late


@dataclass(frozen=True)
class _Rule:
    before: frozenset[Step]  # empty: any step
    after: Step | None  # None: the step does not change
    phases: frozenset[str]


_RULES: dict[type[NodeEvent], _Rule] = {
    Prepared: _Rule(frozenset({Step.PENDING}), Step.PREPARED, frozenset({"build", "failed"})),
    PrepareFailed: _Rule(frozenset({Step.PENDING}), None, frozenset({"build", "failed"})),
    Started: _Rule(frozenset({Step.PREPARED}), Step.STARTED, _ROLLING),
    StartFailed: _Rule(frozenset({Step.PREPARED}), Step.START_FAILED, _ROLLING),
    Switched: _Rule(frozenset({Step.STARTED}), Step.SWITCHED, _ROLLING),
    Drained: _Rule(frozenset({Step.SWITCHED}), Step.DRAINED, _ROLLING),
    OldStopped: _Rule(frozenset({Step.DRAINED}), Step.COMMITTED, frozenset({"commit"})),
    SwitchedBack: _Rule(frozenset({Step.SWITCHED, Step.DRAINED}), Step.SWITCHED_BACK,
                        frozenset({"compensate"})),
    NewStopped: _Rule(frozenset({Step.SWITCHED_BACK, Step.STARTED, Step.START_FAILED}),
                      Step.ROLLED_BACK, frozenset({"compensate"})),
    NodeLost: _Rule(frozenset(), None, frozenset({
        "build", "roll", "commit", "compensate", "failed", "rolled_back", "succeeded"})),
}


def advance(record: DeployRecord, event: Event) -> DeployRecord:
    """The record after ``event``; deterministic. Raises IllegalEvent (a ValueError) for an
    event that cannot follow the record: an unknown or lost node, or a step it cannot
    follow in this phase. Cancel is ignored from commit on (the point of no return)."""
    if isinstance(event, Cancel):
        return _settle(_fail(record, f"cancelled: {event.reason}"))
    if isinstance(event, Tested):
        return _settle(_tested(record, event))
    if not isinstance(event, NodeEvent) or type(event) not in _RULES:
        raise IllegalEvent(f"unknown event {event!r}", deploy_id=record.deploy_id)
    current = record.step_of(event.node)
    rule = _RULES[type(event)]
    phase = _phase(record)
    if current.lost or phase not in rule.phases or (rule.before and current.step not in
                                                     rule.before):
        state = "lost" if current.lost else current.step.value
        raise IllegalEvent(f"event {event.type} for node {event.node} in step {state} "
                           f"(phase {phase})", deploy_id=record.deploy_id, node=event.node)
    step = replace(current, step=rule.after or current.step)
    failure, log = "", ""
    match event:
        case PrepareFailed():
            step = replace(step, error=clip(event.error, ERROR_MAX))
            failure, log = f"prepare failed on {event.node}: {step.error}", event.log
        case Started():
            _check_instances(record, event.node, event.old, event.new)
            step = replace(step, old=event.old, new=event.new)
        case StartFailed():
            _check_instances(record, event.node, (), event.new, allow_empty=True)
            step = replace(step, new=event.new, error=clip(event.error, ERROR_MAX))
            if not event.new:  # nothing to stop
                step = replace(step, step=Step.ROLLED_BACK)
            failure = f"start failed on {event.node}: {step.error}"
        case Switched() if not current.old:  # nothing to drain
            step = replace(step, step=Step.DRAINED)
        case NodeLost():
            step = replace(step, lost=True, error=clip(event.error, ERROR_MAX))
            if phase != "commit":
                failure = f"node {event.node} lost: {step.error}"
    record = replace(record, steps=tuple(step if s.node == event.node else s
                                         for s in record.steps))
    if log:
        record = replace(record, logs=(*record.logs, (event.node, log_tail(log))))
    if failure:
        record = _fail(record, failure)
    return _settle(record)


def _check_instances(record: DeployRecord, node: str, old: tuple[str, ...],
                     new: tuple[str, ...], *, allow_empty: bool = False) -> None:
    both = old + new
    if ((not new and not allow_empty) or len(set(both)) != len(both)
            or not all(isinstance(i, str) and i for i in both)):
        raise IllegalEvent(f"node {node}: instance ids must be distinct non-empty strings and "
                           f"new non-empty (old={old}, new={new})",
                           deploy_id=record.deploy_id, node=node)


def _tested(record: DeployRecord, event: Tested) -> DeployRecord:
    phase = _phase(record)
    if (phase not in ("build", "failed") or record.tested
            or record.step_of(record.test_node).step is not Step.PREPARED):
        raise IllegalEvent(f"event tested in phase {phase} (tested={record.tested}, test node "
                           f"{record.step_of(record.test_node).step.value})",
                           deploy_id=record.deploy_id)
    record = replace(record, tested=True)
    if event.ok:
        return record
    record = replace(record, logs=(*record.logs, (TEST_LOG, log_tail(event.log))))
    return _fail(record, f"test failed on {record.test_node}")


def _fail(record: DeployRecord, reason: str) -> DeployRecord:
    """Before traffic moved: done/failed. During roll: compensate. The first reason wins;
    from commit on nothing changes."""
    reason = record.reason or clip(reason, REASON_MAX)
    if record.stage is Stage.BUILD:
        return replace(record, stage=Stage.DONE, status=Status.FAILED, reason=reason)
    if record.stage in (Stage.ROLL, Stage.COMPENSATE):
        return replace(record, stage=Stage.COMPENSATE, reason=reason)
    return record


def _settle(record: DeployRecord) -> DeployRecord:
    """Move the stage on as far as the steps allow."""
    while (moved := _settle_once(record)) != record:
        record = moved
    return record


def _settle_once(r: DeployRecord) -> DeployRecord:
    steps = r.steps
    if r.stage is Stage.BUILD and r.tested and all(s.step is Step.PREPARED for s in steps):
        return replace(r, stage=Stage.ROLL)
    if r.stage is Stage.ROLL and all(s.step is Step.DRAINED for s in steps):
        return replace(r, stage=Stage.COMMIT, steps=tuple(  # no old instances: nothing to stop
            s if s.old else replace(s, step=Step.COMMITTED) for s in steps))
    if r.stage is Stage.COMMIT and all(s.step is Step.COMMITTED or s.lost for s in steps):
        errors = [f"old instances on {s.node} not stopped: {s.error}" for s in steps
                  if s.lost and s.step is not Step.COMMITTED]
        reason = "; ".join(["succeeded", *errors]) if errors else ""
        return replace(r, stage=Stage.DONE, status=Status.SUCCEEDED,
                       reason=clip(reason, REASON_MAX))
    undo = any(s.step in NEEDS_UNDO and not s.lost for s in steps)
    if r.stage is Stage.COMPENSATE and not undo:
        return replace(r, stage=Stage.DONE, status=Status.ROLLED_BACK)
    if r.stage is Stage.DONE and r.status is Status.ROLLED_BACK and undo:  # a late outcome
        return replace(r, stage=Stage.COMPENSATE, status=Status.RUNNING)
    return r
