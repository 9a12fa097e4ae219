"""Tests for superagent.coordinator.deploy.outcomes: typed answers to saga events, pure."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from superagent.coordinator.deploy import model as m
from superagent.coordinator.deploy import outcomes
from superagent.rpc import messages as msg

SHA = "ab" * 32
NODE = "n1"


def record() -> m.DeployRecord:
    rec = m.new_record(deploy_id="d1", app="hello", release="r2", sha256=SHA, nodes=(NODE,),
                       per_node=1, max_parallel=1, drain_grace=5.0)
    steps = (replace(rec.steps[0], step=m.Step.SWITCHED, old=("hello@r1.1",),
                     new=("hello@r2.2",)),)
    return replace(rec, steps=steps)


def refusal(code: msg.ErrorCode = msg.ErrorCode.BUILD_FAILED, detail: str = "boom",
            log: str = "") -> msg.ErrorReply:
    return msg.ErrorReply(error=code, status=422, detail=detail, log=log)


def instance(name: str, state: str = "ready", release: str = "r2") -> msg.InstanceStatus:
    return msg.InstanceStatus(app="hello", release=release, instance=name, state=state,
                              pid=1, port=1, restarts=0, last_exit_code=None, isolation=None,
                              started_at=None, ready_at=None, create_time=None, figures={})


def status(*instances: msg.InstanceStatus) -> msg.StatusReply:
    return msg.StatusReply(node=NODE, groups=("default",), offline=False, isolation={},
                           proxy={}, routes={"hello": ("hello@r1.1",)}, debug_sessions={},
                           instances=instances, releases={}, figures={})


PREPARE = m.Prepare(deploy_id="d1", node=NODE)
TEST = m.Test(deploy_id="d1", node=NODE)
START = m.Start(deploy_id="d1", node=NODE, count=1)
SWITCH = m.Switch(deploy_id="d1", node=NODE, instances=("hello@r2.2",))
SWITCH_BACK = m.SwitchBack(deploy_id="d1", node=NODE, instances=("hello@r1.1",))
DRAIN = m.Drain(deploy_id="d1", node=NODE, instances=("hello@r1.1",), grace=5.0)
STOP_OLD = m.StopInstances(deploy_id="d1", node=NODE, instances=("hello@r1.1",),
                           purpose="commit")
STOP_NEW = m.StopInstances(deploy_id="d1", node=NODE, instances=("hello@r2.2",),
                           purpose="compensate")
PREPARED = msg.PrepareReply(app="hello", release="r2", sha256=SHA, build_log="b")
STARTED = msg.StartReply(app="hello", release="r2", instances=(
    msg.StartedInstance(id="hello@r2.2", port=1, state="ready"),))


@pytest.mark.parametrize(("action", "answer", "kw", "event"), [
    (PREPARE, PREPARED, {}, m.Prepared(node=NODE)),
    (PREPARE, refusal(log="tail"), {}, m.PrepareFailed(node=NODE, error="boom", log="tail")),
    (TEST, msg.TestReply(app="hello", release="r2", ok=False, exit_code=1, timed_out=False,
                         log="1 failed", skipped=False, seconds=1.0), {},
     m.Tested(ok=False, log="1 failed")),
    (TEST, refusal(msg.ErrorCode.UNKNOWN_RELEASE, "no r2"), {}, m.Tested(ok=False, log="no r2")),
    (START, STARTED, {"old": ("hello@r1.1",)},
     m.Started(node=NODE, old=("hello@r1.1",), new=("hello@r2.2",))),
    (START, refusal(msg.ErrorCode.START_FAILED, "not ready"),
     {"old": ("hello@r1.1",), "status": status(instance("hello@r1.1", release="r1"),
                                               instance("hello@r2.2", "starting"),
                                               instance("hello@r2.3"))},
     m.StartFailed(node=NODE, error="not ready", new=("hello@r2.2", "hello@r2.3"),
                   log="not ready")),
    (START, refusal(msg.ErrorCode.START_FAILED, "not ready"), {"status": None},
     m.StartFailed(node=NODE, error="not ready", new=(), log="not ready")),
    (SWITCH, msg.SwitchReply(app="hello", instances=("hello@r2.2",), version=3), {},
     m.Switched(node=NODE)),
    (SWITCH, refusal(msg.ErrorCode.INSTANCE_NOT_READY, "hello@r2.2 is starting"), {},
     m.Cancel(reason="switching n1 to the new instances failed: hello@r2.2 is starting")),
    (SWITCH_BACK, msg.SwitchReply(app="hello", instances=(), version=4), {},
     m.SwitchedBack(node=NODE)),
    (DRAIN, msg.DrainReply(remaining={}), {"status": status(instance("hello@r2.2"))},
     m.Drained(node=NODE)),
    (DRAIN, msg.DrainReply(remaining={}), {"status": status(instance("hello@r2.2", "backoff"))},
     m.Cancel(reason="new instances on n1 are not healthy: hello@r2.2 backoff")),
    (DRAIN, msg.DrainReply(remaining={}), {"status": None},
     m.Cancel(reason="new instances on n1 are not healthy: hello@r2.2 gone")),
    (DRAIN, msg.DrainReply(remaining={}),  # ready again, but it died once since its start
     {"status": status(replace(instance("hello@r2.2"), restarts=1, last_exit_code=3))},
     m.Cancel(reason="new instances on n1 are not healthy: hello@r2.2 restarted 1x"
                     " (last exit 3)")),
    (DRAIN, refusal(msg.ErrorCode.PROXY_FAILED, "worker 0 silent"), {},
     m.Cancel(reason="draining the old instances on n1 failed: worker 0 silent")),
    (STOP_OLD, msg.StopReply(stopped=("hello@r1.1",), in_flight_cut={}), {},
     m.OldStopped(node=NODE)),
    (STOP_NEW, refusal(msg.ErrorCode.UNKNOWN_INSTANCE), {}, m.NewStopped(node=NODE)),
])
def test_outcome(action: m.NodeAction, answer: outcomes.Answer, kw: dict[str, Any],
                 event: m.Event) -> None:
    """Each typed answer (reply or refusal) becomes the saga's event."""
    assert outcomes.outcome(record(), action, answer, **kw) == event


def test_signal_for_builds_the_typed_message_with_the_stable_id() -> None:
    """The message carries the action's signal id, the term and the record's data."""
    message, wait = outcomes.signal_for(record(), START, term=7, ready_deadline=20.0)
    assert message == msg.Start(id="d1/n1/start", term=7, app="hello", release="r2", count=1)
    assert wait == 20.0 + outcomes.START_MARGIN
    stop, wait = outcomes.signal_for(record(), STOP_OLD, term=7)
    assert stop == msg.Stop(id="d1/n1/stop_old", term=7, instances=("hello@r1.1",),
                            grace=5.0)
    prepare, _ = outcomes.signal_for(record(), PREPARE, term=7)
    assert isinstance(prepare, msg.Prepare) and prepare.sha256 == SHA
    back, _ = outcomes.signal_for(record(), SWITCH_BACK, term=7)
    assert back == msg.Switch(id="d1/n1/switch_back", term=7, app="hello",
                              instances=("hello@r1.1",))


def test_what_must_happen_and_what_needs_status() -> None:
    """Undoing and stopping are insisted on; a gone instance's stop is done; a failed start
    and a clean drain read the status."""
    assert outcomes.must_happen(SWITCH_BACK) and outcomes.must_happen(STOP_OLD)
    assert not outcomes.must_happen(SWITCH)
    assert outcomes.done(STOP_OLD, refusal(msg.ErrorCode.UNKNOWN_INSTANCE))
    assert not outcomes.done(SWITCH_BACK, refusal(msg.ErrorCode.UNKNOWN_INSTANCE))
    assert outcomes.needs_status(START, refusal())
    assert not outcomes.needs_status(START, STARTED)
    assert outcomes.needs_status(DRAIN, msg.DrainReply(remaining={}))
    assert not outcomes.needs_status(DRAIN, refusal())


def test_the_drain_waits_out_the_watch_window_after_the_switch() -> None:
    """The new instances' health is judged no sooner than WATCH_WINDOW after the node's
    last switch (a release that dies two seconds after its switch is caught)."""
    history = [[100.0, "started", "n1"], [101.0, "switched", "n1"], [101.5, "switched", "n2"]]
    window = outcomes.WATCH_WINDOW
    assert outcomes.watch_left(history, "n1", 101.0) == window
    assert outcomes.watch_left(history, "n1", 102.0) == window - 1.0
    assert outcomes.watch_left(history, "n1", 101.0 + window + 5) == 0.0
    assert outcomes.watch_left(history, "n3", 101.0) == 0.0


def test_only_the_rolls_last_batch_waits_and_the_health_rule() -> None:
    """The nodes of the roll's last batch wait out the watch window (all of them, however
    many roll at once); the health rule names each sick instance of a node."""
    rec = record()
    assert outcomes.in_last_batch(rec, NODE)  # the only node
    one_by_one = m.new_record(deploy_id="d1", app="hello", release="r2", sha256=SHA,
                              nodes=(NODE, "n2"), per_node=1, max_parallel=1, drain_grace=5.0)
    assert not outcomes.in_last_batch(one_by_one, NODE)
    assert outcomes.in_last_batch(one_by_one, "n2")
    together = replace(one_by_one, max_parallel=2)
    assert outcomes.in_last_batch(together, NODE) and outcomes.in_last_batch(together, "n2")
    assert outcomes.unhealthy(rec, NODE, status(instance("hello@r2.2"))) is None
    assert outcomes.unhealthy(rec, NODE, None) == m.Cancel(
        reason="new instances on n1 are not healthy: hello@r2.2 gone")
