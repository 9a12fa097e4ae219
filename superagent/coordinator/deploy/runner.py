"""The deploy saga's async runner: executes the planner's actions through participants' RPC.

Theory of operation. Every coordinator runs ``DeployRunner.run``; it acts only while this
coordinator leads. For each deploy whose record is not done it starts one driver task,
which loops: read the record from the replicated state, ask ``planner.next_actions``,
execute that round's actions concurrently (at most one per node), and commit each outcome
as a ``DeployEvent`` whose idempotency key is the action's signal id. The next round starts
only once the whole round is committed, so the record is the only memory: when the leader
dies, the next leader's runner finds the same record, re-issues the same actions with the
same signal ids, and participants answer repeats from their signal ledger instead of
acting twice. Losing the leadership cancels every driver at once.

Every signal carries the leader's Raft term: a participant refuses a term older than the
newest it has seen, so a deposed leader's late signals change nothing.

Each action is decide, act, decide: ``outcomes.signal_for`` builds the typed RPC message,
the runner sends it through the host's ``Participants`` client, and ``outcomes.outcome``
turns the typed answer into the saga event (refusals map to the saga's failures; see
``outcomes``). A participant that cannot be reached is retried (same signal id) until the
membership loop marks its node down, or ``NODE_LOST_AFTER`` passes; then the action's
outcome is ``NodeLost``. Undoing is insisted on: a refused switch back or stop is repeated
(same signal id) for ``INSIST_FOR`` seconds before the node counts as lost; a stop of
instances already gone (``UNKNOWN_INSTANCE``) counts as done.

The runner depends on ``host.RunnerHost`` (what it uses of the coordinator), not on the
``Coordinator`` class, so it is tested with a fake host and participants under trio's
``MockClock``.

A round whose outcomes the state refuses, or that fails unexpectedly, is logged and tried
again with backoff: one deploy's trouble never stops the coordinator or the other deploys.
The deploy ends with ``FinishDeploy`` once the planner says ``Finish`` and no signal is in
flight; only then may the app's next deploy start.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
import trio

from superagent.backoff import Backoff
from superagent.coordinator import commands as cmd
from superagent.coordinator import scheduler as sch
from superagent.coordinator.deploy import model as m
from superagent.coordinator.deploy import outcomes
from superagent.coordinator.deploy import planner as p
from superagent.coordinator.deploy.outcomes import SIGNAL_TIMEOUT
from superagent.coordinator.errors import CommandError, NoTargets, UnknownApp, UnknownRelease
from superagent.coordinator.host import RunnerHost
from superagent.coordinator.reconcile_view import view_of
from superagent.coordinator.state import ClusterState
from superagent.manifest import AppSpec, spec_from_json
from superagent.rpc import messages as msg
from superagent.rpc.errors import BadReply, Refused, Unreachable, VersionMismatch

log = structlog.get_logger(__name__)
T = TypeVar("T")

POLL = 0.2  # how often the runner looks for deploys to drive (``wake`` says so at once)
NODE_LOST_AFTER = 30.0  # unreachable this long (and not yet marked down): lost
DRAIN_GRACE = 30.0
ROUND_BACKOFF, ROUND_BACKOFF_MAX = 1.0, 30.0  # after a round whose outcomes were refused
INSIST_FOR = 120.0  # a switch back or a stop refused this long: the node counts as lost
INSIST_BACKOFF, INSIST_BACKOFF_MAX = 0.5, 5.0  # between the attempts of an insisted signal
RETRY_BACKOFF, RETRY_BACKOFF_MAX = 0.2, 2.0  # between the attempts to reach a participant


class _Unreachable(Exception):
    pass


class DeployRunner:
    def __init__(self, host: RunnerHost, *, watch_window: float = outcomes.WATCH_WINDOW
                 ) -> None:
        self.host = host
        self.watch_window = watch_window  # --watch-window (``outcomes.watch_left``)
        self._driving: dict[str, trio.CancelScope] = {}
        self._woken = trio.Event()

    def __repr__(self) -> str:
        return f"<DeployRunner driving={sorted(self._driving)}>"

    def wake(self) -> None:
        """A deploy was just committed here: look for it now, not at the next ``POLL``
        (which would add up to 0.2 s to every deploy, a rollback's included)."""
        self._woken.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                with trio.move_on_after(POLL):
                    await self._woken.wait()
                self._woken = trio.Event()
                if not self.host.is_leader():
                    for scope in self._driving.values():
                        scope.cancel()
                    continue
                running = self.host.read(lambda s: [d.deploy_id for d in s.deploys.values()
                                                 if d.running])
                for deploy_id in running:
                    if deploy_id not in self._driving:
                        self._driving[deploy_id] = trio.CancelScope()
                        nursery.start_soon(self._drive, deploy_id)

    async def _drive(self, deploy_id: str) -> None:
        scope = self._driving[deploy_id]
        bound = log.bind(deploy=deploy_id)
        backoff = Backoff(ROUND_BACKOFF, ROUND_BACKOFF_MAX)
        try:
            with scope:
                bound.info("deploy driven", leader=self.host.config.id)
                while True:
                    try:
                        record = self._record(deploy_id)
                        if record is None:
                            return
                        actions = p.next_actions(record)
                        if any(isinstance(a, m.Finish) for a in actions):
                            await self._finish(record)
                            bound.info("deploy finished", status=record.status.value,
                                       reason=record.reason)
                            return
                        refused: list[str] = []
                        async with trio.open_nursery() as nursery:
                            for action in actions:
                                nursery.start_soon(self._act, record, action, refused)
                        if not refused:
                            backoff.reset()
                            continue
                        bound.error("deploy events refused; retrying the round",
                                    errors=refused, retry_in=backoff.peek())
                    except Exception:  # one deploy's trouble never takes the coordinator down
                        bound.exception("deploy round failed", retry_in=backoff.peek())
                    await trio.sleep(backoff.next())
        finally:
            del self._driving[deploy_id]

    async def _finish(self, record: m.DeployRecord) -> None:
        """No action is in flight any more: the deploy is over."""
        result = await self.host.submit(self.host.command(
            cmd.FinishDeploy, actor=f"coordinator:{self.host.config.id}",
            key=f"{record.deploy_id}:finish", app=record.app, deploy_id=record.deploy_id))
        if not result.get("ok"):
            log.error("deploy not finished", deploy=record.deploy_id, error=result.get("error"))

    def _record(self, deploy_id: str) -> m.DeployRecord | None:
        doc = self.host.read(lambda s: s.deploys[deploy_id].record
                          if deploy_id in s.deploys and s.deploys[deploy_id].running else None)
        return None if doc is None else m.DeployRecord.from_doc(doc)

    async def _act(self, record: m.DeployRecord, action: m.Action, refused: list[str]
                   ) -> None:
        try:
            event = await self._execute(record, action)
        except _Unreachable as exc:
            assert isinstance(action, m.NodeAction)
            event = m.NodeLost(node=action.node, error=str(exc))
        command = self.host.command(cmd.DeployEvent, actor=f"coordinator:{self.host.config.id}",
                                 key=f"{record.deploy_id}:{action.signal_id}", app=record.app,
                                 deploy_id=record.deploy_id, event=event.to_doc())
        result = await self.host.submit(command)
        if not result.get("ok"):
            refused.append(f"{event.to_doc()}: {result.get('error')}")

    # ------------------------------------------------------------------ actions
    async def _execute(self, record: m.DeployRecord, action: m.Action) -> m.Event:
        """Decide the signal, send it, decide the event (``outcomes`` holds the decisions)."""
        assert isinstance(action, m.NodeAction), action
        node = action.node
        old: tuple[str, ...] = ()
        deadline = 60.0
        if isinstance(action, m.Start):
            before = await self._status(node)
            old = before.routed(record.app) if before is not None else ()
            deadline = self._ready_deadline(record.app, record.release)
        keep: tuple[str, ...] = ()
        if isinstance(action, m.Prepare):
            keep = self.host.read(lambda s: s.retained(record.app, record.release))
        message, wait = outcomes.signal_for(record, action, term=self.host.term(),
                                            ready_deadline=deadline, keep=keep)
        if outcomes.must_happen(action):
            answer = await self._insist(node, action, message, wait)
        else:
            answer = await self._signal(node, message, wait)
        if (isinstance(action, m.Drain) and isinstance(answer, msg.Reply)
                and outcomes.in_last_batch(record, node)
                # a release that served before (a rollback) has shown it stays up
                and not self.host.read(lambda s: s.served(record.app, record.release))):
            sick = await self._watch(record, node)
            if sick is not None:
                return sick
        status = (await self._status(node) if outcomes.needs_status(action, answer)
                  else None)
        return outcomes.outcome(record, action, answer, old=old, status=status)

    async def _watch(self, record: m.DeployRecord, node: str) -> m.Event | None:
        """Before the roll's last drain counts as done: wait out the watch window after
        ``node``'s switch, then check the new instances of every other rolled node (the
        caller checks ``node``'s own); the Cancel for the first that is not healthy."""
        history = self.host.read(lambda s: list(s.deploys[record.deploy_id].history)
                                 if record.deploy_id in s.deploys else [])
        await trio.sleep(outcomes.watch_left(history, node, time.time(),
                                             window=self.watch_window))
        for step in record.steps:
            if step.node != node and step.step is m.Step.DRAINED and not step.lost:
                try:
                    status = await self._status(step.node)
                except _Unreachable as exc:  # that node is lost, not the one draining
                    return m.NodeLost(node=step.node, error=str(exc))
                sick = outcomes.unhealthy(record, step.node, status)
                if sick is not None:
                    return sick
        return None

    async def _insist(self, node: str, action: m.NodeAction, message: msg.Signal[Any],
                      wait: float) -> outcomes.Answer:
        """A signal that must happen (undoing, stopping): repeated with the same id until
        it is done; _Unreachable when it keeps being refused for INSIST_FOR seconds."""
        backoff, since = Backoff(INSIST_BACKOFF, INSIST_BACKOFF_MAX), trio.current_time()
        while True:
            answer = await self._signal(node, message, wait)
            if outcomes.done(action, answer):
                return answer
            assert isinstance(answer, msg.ErrorReply)
            if trio.current_time() - since > INSIST_FOR:
                raise _Unreachable(f"{message.type} on {node} refused:"
                                   f" {outcomes.detail(answer)}")
            log.warning("signal refused; retrying", node=node, kind=message.type,
                        id=message.id, error=outcomes.detail(answer))
            await trio.sleep(backoff.next())

    def _ready_deadline(self, app: str, release: str) -> float:
        def deadline(s: ClusterState) -> float:
            for rel in s.releases.get(app, []):
                if f"r{rel.number}" == release:
                    return spec_from_json(rel.spec).health.ready_deadline
            return 60.0
        value: float = self.host.read(deadline)
        return value

    # ------------------------------------------------------------------ RPC
    def _address(self, node: str) -> str:
        """The node's RPC address; _Unreachable once it is unregistered or marked down."""
        found = self.host.read(lambda s: (s.nodes[node].address, s.nodes[node].up)
                               if node in s.nodes else None)
        if found is None:
            raise _Unreachable(f"node {node} is no longer registered")
        address, up = found
        if not up:
            raise _Unreachable(f"node {node} is down")
        return str(address)

    async def _call(self, node: str, send: Callable[[str], Awaitable[T]]) -> T:
        """``send(address)`` until the participant answers; _Unreachable once the node is
        lost (down, unregistered, or silent for NODE_LOST_AFTER seconds)."""
        backoff, since = Backoff(RETRY_BACKOFF, RETRY_BACKOFF_MAX), trio.current_time()
        while True:
            try:
                return await send(self._address(node))
            except Unreachable as exc:
                if trio.current_time() - since > NODE_LOST_AFTER:
                    raise _Unreachable(f"node {node} unreachable: {exc}") from None
                log.info("participant unreachable, retrying", node=node, error=str(exc))
            await trio.sleep(backoff.next())

    async def _signal(self, node: str, message: msg.Signal[Any], wait: float
                      ) -> outcomes.Answer:
        """The participant's answer to ``message``: its reply or its refusal."""
        async def send(address: str) -> outcomes.Answer:
            try:
                reply: msg.Reply = await self.host.participants.signal(address, message,
                                                                      timeout=wait)
                return reply
            except Refused as exc:
                return exc.reply
            except (VersionMismatch, BadReply) as exc:  # not transient: a refusal
                return msg.ErrorReply(error=msg.ErrorCode.VERSION_MISMATCH
                                      if isinstance(exc, VersionMismatch)
                                      else msg.ErrorCode.INTERNAL, status=0, detail=str(exc))

        answer = await self._call(node, send)
        log.info("signal", node=node, kind=message.type, id=message.id,
                 error=answer.error.value if isinstance(answer, msg.ErrorReply) else None)
        return answer

    async def _status(self, node: str) -> msg.StatusReply | None:
        """The node's status; None when it answers but refuses or garbles it."""
        async def send(address: str) -> msg.StatusReply | None:
            try:
                return await self.host.participants.status(address, timeout=SIGNAL_TIMEOUT)
            except (Refused, VersionMismatch, BadReply) as exc:
                log.warning("participant status unreadable", node=node, error=str(exc))
                return None

        return await self._call(node, send)


def targets(state: ClusterState, spec: AppSpec, app: str | None = None) -> dict[str, int]:
    """The nodes a deploy of a release with ``spec`` rolls over, each with the instances to
    start there (0: the record's ``per_node``), in roll order.

    The scale is the app's run-time override (``superagent scale``) if it has one, else
    the release's ``[scale]``. A ``per_node`` app rolls over every node that is online, up
    and in one of its groups. An ``instances`` app rolls over the nodes of its placement
    (those still up), each with its own count; before its first placement, over the
    scheduler's placement of it among the cluster's current one. An autoscaled app is an
    ``instances`` app at the count its autoscaler decided (``min`` before any decision).
    """
    found = state.apps.get(app) if app is not None else None
    override = found.scale if found is not None else None
    groups = set(override["groups"] if override else spec.scale.groups)
    instances = override.get("instances") if override else spec.scale.instances
    auto = override.get("auto") if override else spec.scale.auto
    if auto is not None:  # autoscaled: as many as the autoscaler decided, within bounds
        decided = found.auto_instances if found and found.auto_instances is not None else 0
        instances = min(max(decided, auto["min"]), auto["max"])
    eligible = {n.name for n in state.nodes.values()
                if n.up and n.lifecycle == "online" and groups & set(n.groups)}
    if instances is None or app is None:
        return dict.fromkeys(sorted(eligible), 0)
    placed = {node: count for node, count in sorted(state.placement.get(app, {}).items())
              if count > 0 and node in state.nodes and state.nodes[node].up}
    if placed:
        return placed
    scale = sch.AppScale(app=app, groups=tuple(sorted(groups)), per_node=1,
                         instances=int(instances))
    view = view_of(state, wall=0.0, drain_wait=0.0)
    others = [other for other in view.scales if other.app != app]
    nodes = [sch.NodeInfo(name=n.name, groups=n.groups, capacity=n.capacity,
                          eligible=n.name in eligible) for n in view.nodes]
    placement = sch.place([*others, scale], nodes, state.placement)
    return dict(sorted(placement.nodes.get(app, {}).items()))


async def begin_deploy(c: RunnerHost, *, app: str, release: str, actor: str,
                       max_parallel: int = 1, drain_grace: float = DRAIN_GRACE,
                       key: str | None = None) -> dict[str, Any]:
    """Start a deploy of ``app@release``; returns the StartDeploy result (with deploy_id).

    Raises UnknownApp, NoTargets (409) when no participant can take it, CommandError for
    bad parameters; a running deploy of the same app is a 409 result.
    """
    def plan(s: ClusterState) -> tuple[dict[str, int], list[str], str, int]:
        if app not in s.apps:
            raise UnknownApp(app)
        rel = next((x for x in s.releases[app] if f"r{x.number}" == release), None)
        if rel is None:
            raise UnknownRelease(app, int(release.lstrip("r") or 0))
        spec = spec_from_json(rel.spec)
        override = s.apps[app].scale
        per_node = int(override["per_node"]) if override else spec.scale.per_node
        groups = list(override["groups"]) if override else list(spec.scale.groups)
        return targets(s, spec, app), groups, rel.sha256, max(1, per_node)

    nodes, groups, sha256, per_node = c.read(plan)
    if not nodes:
        raise NoTargets(f"{app}@{release}: no participant is online and up in groups"
                        f" {groups}", app=app)
    # a client's retry (same key) names the same deploy, so it applies once
    suffix = hashlib.sha256(key.encode()).hexdigest()[:6] if key else secrets.token_hex(3)
    deploy_id = f"{app}-{release}-{suffix}"
    try:
        record = m.new_record(deploy_id=deploy_id, app=app, release=release, sha256=sha256,
                              nodes=list(nodes), counts=nodes, per_node=per_node,
                              max_parallel=max_parallel, drain_grace=drain_grace)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    result = await c.submit(c.command(cmd.StartDeploy, actor=actor, key=key, app=app,
                                      deploy_id=deploy_id, record=record.to_doc()))
    return result
