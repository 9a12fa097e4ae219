"""The deploy runner's decisions, pure: which signal an action sends, which event an answer is.

Theory of operation. The runner (``runner.py``) carries out one planner action on one node
in three steps, and only the middle one does I/O:

1. ``signal_for(record, action, ...)``: the typed RPC message and how long to wait for it;
2. send it (retrying an unreachable node, insisting where ``must_happen``), and read the
   node's status when ``needs_status`` says the outcome depends on it;
3. ``outcome(record, action, answer, ...)``: the saga event to commit.

An ``answer`` is what the participant said: the signal's typed reply, or an ``ErrorReply``
(a refusal, with its ``ErrorCode``). Refusals map to the saga's failures: a refused prepare
or start is ``PrepareFailed``/``StartFailed``, a refused switch or drain cancels the deploy
(the planner compensates), a test that fails is ``Tested(ok=False)``. A drain's outcome also
depends on the new instances still serving afterwards; a failed start's on which new
instances did come up (they must be stopped). An action that must happen (undoing,
stopping) has only one outcome: the runner insists until it happened or the node is lost.
"""

from __future__ import annotations

from typing import Any

from superagent.coordinator.deploy import model as m
from superagent.manifest import TEST_TIMEOUT
from superagent.rpc import messages as msg

SIGNAL_TIMEOUT = 60.0  # switch, drain, stop: the participant answers within this
BUILD_TIMEOUT = 1800.0  # a prepare (download + build) answers within this
START_MARGIN = 30.0  # on top of the app's ready deadline, for the agent's own work
TEST_MARGIN = 30.0  # on top of the test's own timeout
HEALTHY = ("ready", "unhealthy")  # instance states that still serve
# A new release that passes readiness and dies soon after must be caught before the old
# instances stop: the last batch's drain judges every rolled node's new instances no sooner
# than this long after its switch (earlier batches have been serving longer by then).
# ``--watch-window`` sets another for a coordinator (the deploy runner passes it in).
WATCH_WINDOW = 3.0
MAX_WATCH_WINDOW = 3600.0  # a watch window beyond an hour is a typo

Answer = msg.Reply | msg.ErrorReply


def signal_for(record: m.DeployRecord, action: m.NodeAction, *, term: int,
               ready_deadline: float = 60.0, keep: tuple[str, ...] = ()
               ) -> tuple[msg.Signal[Any], float]:
    """The message ``action`` sends (its id is the action's stable signal id) and the
    seconds to wait for the answer. ``ready_deadline``: the release's, for a start;
    ``keep``: the releases a prepare leaves prepared (``ClusterState.retained``)."""
    sid = action.signal_id
    message: msg.Signal[Any]
    if isinstance(action, m.Prepare):
        message = msg.Prepare(id=sid, term=term, app=record.app, release=record.release,
                              sha256=record.sha256, keep=keep)
        return message, BUILD_TIMEOUT
    if isinstance(action, m.Test):
        message = msg.Test(id=sid, term=term, app=record.app, release=record.release,
                           timeout=TEST_TIMEOUT)
        return message, TEST_TIMEOUT + TEST_MARGIN
    if isinstance(action, m.Start):
        message = msg.Start(id=sid, term=term, app=record.app, release=record.release,
                            count=action.count)
        return message, ready_deadline + START_MARGIN
    if isinstance(action, m.Switch):  # SwitchBack too
        message = msg.Switch(id=sid, term=term, app=record.app, instances=action.instances)
        return message, SIGNAL_TIMEOUT
    if isinstance(action, m.Drain):
        message = msg.Drain(id=sid, term=term, instances=action.instances, grace=action.grace)
        return message, action.grace + SIGNAL_TIMEOUT
    if isinstance(action, m.StopInstances):
        message = msg.Stop(id=sid, term=term, instances=action.instances, grace=record.drain_grace)
        return message, record.drain_grace + SIGNAL_TIMEOUT
    raise AssertionError(f"no signal for {action!r}")


def must_happen(action: m.NodeAction) -> bool:
    """Undoing and stopping are insisted on (same signal id) rather than failed."""
    return isinstance(action, m.SwitchBack | m.StopInstances)


def done(action: m.NodeAction, answer: Answer) -> bool:
    """Whether an insisted action has happened: a reply, or a stop of instances that are
    already gone."""
    if isinstance(answer, msg.Reply):
        return True
    return (isinstance(action, m.StopInstances)
            and answer.error is msg.ErrorCode.UNKNOWN_INSTANCE)


def unhealthy(record: m.DeployRecord, node: str, status: msg.StatusReply | None
              ) -> m.Cancel | None:
    """The Cancel a node's new instances call for (gone, not serving, or exited once
    since their start: one that restarted may look ready again), or None when healthy."""
    seen = {i.instance: i for i in (status.instances if status else ())}
    sick = {i: _sickness(seen.get(i)) for i in record.step_of(node).new
            if _sickness(seen.get(i))}
    if not sick:
        return None
    return m.Cancel(reason=f"new instances on {node} are not healthy: "
                    + ", ".join(f"{i} {st}" for i, st in sorted(sick.items())))


def in_last_batch(record: m.DeployRecord, node: str) -> bool:
    """Whether ``node`` rolls in the roll's last batch (whose drains wait out the watch
    window; the nodes of one batch drain at the same time)."""
    batches = m.batches(record)
    return bool(batches) and node in batches[-1]


def _sickness(instance: msg.InstanceStatus | None) -> str:
    """Why a new instance cannot take over ("" when it can): gone, not serving, or it
    exited since it started."""
    if instance is None:
        return "gone"
    if instance.state not in HEALTHY:
        return instance.state
    if instance.restarts:
        return f"restarted {instance.restarts}x (last exit {instance.last_exit_code})"
    return ""


def watch_left(history: list[list[Any]], node: str, now: float,
               window: float = WATCH_WINDOW) -> float:
    """Seconds still to watch after ``node``'s switch before the last drain's health check
    (0 when the window has passed or there was no switch)."""
    switched = [at for at, kind, where in history if kind == "switched" and where == node]
    # bounded by the window: the switch's time is another leader's clock, maybe skewed
    return min(window, max(0.0, switched[-1] + window - now)) if switched else 0.0


def needs_status(action: m.NodeAction, answer: Answer) -> bool:
    """Whether the outcome depends on the node's status read after the answer."""
    if isinstance(action, m.Start):
        return isinstance(answer, msg.ErrorReply)  # which new instances did come up
    if isinstance(action, m.Drain):
        return isinstance(answer, msg.Reply)  # are the new instances still serving
    return False


def detail(answer: msg.ErrorReply) -> str:
    """A refusal as one line for the record."""
    return m.clip(answer.detail or answer.error.value, m.ERROR_MAX)


def outcome(record: m.DeployRecord, action: m.NodeAction, answer: Answer, *,
            old: tuple[str, ...] = (), status: msg.StatusReply | None = None) -> m.Event:
    """The event to commit for ``answer`` to ``action``.

    ``old``: the app's routed instances on the node before a start; ``status``: the node's
    status after the answer where ``needs_status`` (None: it could not be read).
    """
    node = action.node
    refused = answer if isinstance(answer, msg.ErrorReply) else None
    if isinstance(action, m.Prepare):
        if refused is None:
            return m.Prepared(node=node)
        return m.PrepareFailed(node=node, error=detail(refused), log=m.log_tail(refused.log))
    if isinstance(action, m.Test):
        if refused is not None or not isinstance(answer, msg.TestReply):
            return m.Tested(ok=False, log=m.log_tail(detail(refused) if refused else ""))
        return m.Tested(ok=answer.ok, log=m.log_tail(answer.log))
    if isinstance(action, m.Start):
        if isinstance(answer, msg.StartReply):
            return m.Started(node=node, old=old, new=tuple(i.id for i in answer.instances))
        came_up = tuple(i.instance for i in (status.instances if status else ())
                        if i.app == record.app and i.release == record.release
                        and i.instance not in old)
        return m.StartFailed(node=node, error=detail(refused) if refused else "no reply",
                             new=came_up,
                             log=m.log_tail(refused.detail) if refused is not None else "")
    if isinstance(action, m.SwitchBack):
        return m.SwitchedBack(node=node)
    if isinstance(action, m.Switch):
        if refused is None:
            return m.Switched(node=node)
        return m.Cancel(reason=f"switching {node} to the new instances failed:"
                               f" {detail(refused)}")
    if isinstance(action, m.Drain):
        if refused is not None:
            return m.Cancel(reason=f"draining the old instances on {node} failed:"
                                   f" {detail(refused)}")
        # the new instances served through the drain (and, for the last batch, the watch
        # window) without a single exit: healthy, or compensate
        sick = unhealthy(record, node, status)
        return sick if sick is not None else m.Drained(node=node)
    if isinstance(action, m.StopInstances):
        return (m.OldStopped if action.purpose == "commit" else m.NewStopped)(node=node)
    raise AssertionError(f"no outcome for {action!r}")
