"""The leader's reconcile loop: placement from the state, actions from the reports, executed.

Theory of operation. Every coordinator runs ``Reconciler.run``; it acts only while this
coordinator leads, and every ``RECONCILE_PERIOD`` it does one round, decide then act:

1. **Place.** ``scheduler.place`` turns the effective scales of the apps that have a
   serving release (one never deployed runs nothing, so it is not placed) and the nodes
   (``reconcile_view.view_of``: eligible = up and online, or draining but still within
   ``drain_wait`` of the node's ``changed_at``; ``with_idle``: the apps each node's last
   heartbeat reports idle, which take no room there but a reserve) into the desired
   placement, sticky to the previous one. A new leader does no round until it has heard
   every eligible node once (at most the liveness timeout: a silent node then goes
   down), since without a node's heartbeat the apps idle there would count as running.
   Where an app's placement or its reason changed, ``SetPlacement`` commits it. The
   reason is the scheduler's ``short`` explanation, plus the trouble of an app whose
   actions keep failing, so ``superagent apps`` says why an app runs short.
2. **Plan.** ``reconcile.plan`` compares the placement (``AppTarget``: the serving release,
   busy while a deploy of the app runs) with what each node reported in its last
   heartbeat (``reports``: nodes heard within the liveness timeout) and returns ``Grow``
   and ``Shrink`` actions.
3. **Act.** Each action runs as its own task, at most one per (node, app) and
   ``MAX_ACTIONS`` at once: a Grow prepares the release on the node (the participant
   fetches the artifact from the coordinators by sha256), starts ``count`` instances
   (Start answers once they are ready) and switches the node's routes to its ready
   instances of the release plus the new ones; a Shrink switches the routes to ``keep``,
   drains the instances to stop (in-flight requests finish within ``drain_grace``) and
   stops them. Every signal carries the leader's term and an id made of the term, the
   (node, app) and a sequence number, so a participant fences a deposed leader and a
   retried id is not acted on twice, while the next action is never mistaken for an
   earlier one. A ready instance of the serving release that no route reaches (a switch
   that failed after its start) is routed again by a plain Switch.
4. **Autoscale.** An autoscaled app's load (the in-flight requests or CPU its serving
   instances report in their heartbeats) feeds its ``autoscale.Autoscaler``; a decision is
   committed as ``Autoscale`` and moves the placement from the next round on. A new
   leader starts the autoscalers afresh (they learn the load again within a window).
   Their windows and cooldowns are the coordinator's ``--autoscale-timing``.
5. **Finish.** An app's ``scaling`` ends with ``FinishScale``: ``converged`` once every
   node of its placement reports that many ready instances and nothing else is to do,
   ``short`` (with the reason) once what can run runs but the placement falls short, or
   its actions keep failing.

Reports lag: a heartbeat arrives every second, so right after an action the node's last
report may not show it yet. A (node, app) whose action ended is left alone until a
heartbeat received ``SETTLE`` seconds after the end, and so is every node of an app whose
deploy ran in the last round or was recorded since it (the deploy started and stopped
instances too, and a short one starts and ends between two rounds); a Shrink
waits while any action of its app is in flight (its decision counted the other nodes'
instances).

Failures never stop the loop: a (node, app) whose action failed backs off exponentially
(``superagent.backoff``), its error is logged when it changes, and after
``FAILING_AFTER`` failures in a row the app's placement reason names it. Losing the
leadership (or a new term) cancels every action in flight and forgets the backoffs; the
next leader plans afresh from the reports it receives.

The reconciler depends on ``host.ReconcilerHost``, not on the ``Coordinator`` class, and
is tested with a fake host and fake participants under trio's ``MockClock``; the wall
clock (for the drain wait, measured against committed times) is injected too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from superagent.backoff import Backoff
from superagent.coordinator import commands as cmd
from superagent.coordinator import reconcile as rc
from superagent.coordinator import scheduler as sch
from superagent.coordinator.autoscale import (
    DEFAULT_TIMING,
    Autoscalers,
    AutoTiming,
    app_load,
    auto_spec,
)
from superagent.coordinator.commands import REASON_MAX
from superagent.coordinator.deploy.outcomes import BUILD_TIMEOUT, SIGNAL_TIMEOUT, START_MARGIN
from superagent.coordinator.errors import CoordinatorError
from superagent.coordinator.host import ReconcilerHost
from superagent.coordinator.reconcile_view import (
    ClusterView,
    converged,
    reports_from,
    unrouted,
    view_of,
    with_idle,
)
from superagent.coordinator.state import ClusterState
from superagent.errors import ConfigError
from superagent.manifest import spec_from_json
from superagent.rpc import messages as msg
from superagent.rpc.errors import Refused, RpcError

log = structlog.get_logger(__name__)

RECONCILE_PERIOD = 1.0  # one round per second: a joining node gets its apps within seconds
DRAIN_WAIT = 5.0  # a draining node keeps its work this long: the front LB takes it out first
DRAIN_GRACE = 30.0  # in-flight requests of an instance being stopped finish within this
MAX_ACTIONS = 8  # actions at once over the whole cluster: a 2-core leader stays responsive
SETTLE = 1.5  # after an action, wait for a heartbeat this much newer (heartbeats: 1 s)
FAILING_AFTER = 3  # failures in a row before an app's placement reason names them
BACKOFF, BACKOFF_MAX = 1.0, 60.0  # between the attempts of a failing (node, app)
READY_DEADLINE = 60.0  # a release whose spec cannot be read: the manifest's default

Key = tuple[str, str]  # (node, app)


def deployed_since(deploys: frozenset[tuple[str, str]],
                   seen: frozenset[tuple[str, str]] | None) -> set[str]:
    """The apps of the deploys (``(id, app)``) on record now that the last round did not
    see; in a leader's first round (``seen`` None) every app with a deploy on record: one
    may have run just before, or since the election, and the nodes' reports predate it."""
    return {app for _, app in deploys - (seen or frozenset())}


class ActionFailed(Exception):
    """A signal of an action was refused or not answered; the (node, app) backs off."""


@dataclass
class _Failing:
    backoff: Backoff = field(default_factory=lambda: Backoff(BACKOFF, BACKOFF_MAX))
    retry_at: float = 0.0
    count: int = 0
    error: str = ""


@dataclass
class _Flight:
    action: rc.Action | _Reroute
    scope: trio.CancelScope


@dataclass(frozen=True, kw_only=True)
class _Reroute:
    node: str
    app: str
    instances: tuple[str, ...]


class Reconciler:
    """The leader's reconcile loop (see the module docstring)."""

    def __init__(self, host: ReconcilerHost, *, drain_wait: float = DRAIN_WAIT,
                 drain_grace: float = DRAIN_GRACE, period: float = RECONCILE_PERIOD,
                 wall: Callable[[], float] = time.time,
                 autoscale: AutoTiming = DEFAULT_TIMING) -> None:
        self.host = host
        self.autoscale_timing = autoscale  # laid over every app's policy
        self.drain_wait = drain_wait
        self.drain_grace = drain_grace
        self.period = period
        self.wall = wall
        self._term: int | None = None
        self._seq = 0
        self._flight: dict[Key, _Flight] = {}
        self._ended: dict[Key, float] = {}  # when the last action of (node, app) ended
        self._failing: dict[Key, _Failing] = {}
        self._was_busy: frozenset[str] = frozenset()  # apps a deploy ran for last round
        self._deploys_seen: frozenset[tuple[str, str]] | None = None  # by the last round
        self._limiter = trio.CapacityLimiter(MAX_ACTIONS)
        self._autoscalers = Autoscalers()
        self._logged: dict[str, str] = {}  # what was last logged per topic (log on change)
        self.rounds = 0

    def __repr__(self) -> str:
        flight = sorted(f"{n}/{a}" for n, a in self._flight)
        failing = sorted(f"{n}/{a}" for (n, a), f in self._failing.items() if f.count)
        return (f"<Reconciler term={self._term} rounds={self.rounds} in_flight={flight}"
                f" failing={failing}>")

    # ------------------------------------------------------------------ the loop
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await trio.sleep(self.period)
                if not self.host.is_leader():
                    self._stand_down()
                    continue
                term = self.host.term()
                if term != self._term:
                    self._stand_down()
                    self._term = term
                try:
                    await self.round(nursery)
                except Exception as exc:  # one bad round never stops the loop
                    if self._changed("round", repr(exc)):
                        log.exception("reconcile round failed")
                else:
                    self._changed("round", "")

    def _stand_down(self) -> None:
        """Not (or no longer) leading in this term: cancel everything, forget everything."""
        if self._term is not None or self._flight:
            log.info("reconciler stands down", term=self._term, cancelled=len(self._flight))
        for flight in self._flight.values():
            flight.scope.cancel()
        self._flight.clear()
        self._ended.clear()
        self._failing.clear()
        self._logged.clear()
        self._was_busy, self._deploys_seen = frozenset(), None
        self._autoscalers = Autoscalers()  # a new leader learns the load afresh
        self._term = None

    async def round(self, nursery: trio.Nursery) -> None:
        """One round: place, commit what changed, plan, start the actions, finish scales."""
        self.rounds += 1
        view: ClusterView = self.host.read(
            lambda s: view_of(s, wall=self.wall(), drain_wait=self.drain_wait))
        now = trio.current_time()
        liveness = self.host.liveness
        if liveness.leader_since is None:
            return  # the watch loop has not taken up the leadership yet: nothing is heard
        # heard: reports within the timeout, not counting the leader's own stalls (after
        # one, the heartbeats sent meanwhile are not read yet, and the last ones stand)
        liveness.observe(now)
        heard = {node: liveness.status[node] for node in view.addresses
                 if node in liveness.status and liveness.fresh(node, now)}
        if self._unheard(view, now):
            return
        reports = reports_from(heard)
        # apps idle on a node take no room there (the scheduler keeps a reserve instead)
        placement = sch.place(view.scales, with_idle(view.nodes, reports), view.placement)
        await self._commit_placement(view, placement)
        now = trio.current_time()  # the commit took time
        # a deploy changes what runs behind the reconciler's back: until a fresh heartbeat,
        # the reports of an app that is or just was deployed do not count
        for app in view.busy | self._was_busy | deployed_since(view.deploys, self._deploys_seen):
            for node in view.addresses:
                self._ended[node, app] = now
        self._was_busy, self._deploys_seen = view.busy, view.deploys
        for key, ended in list(self._ended.items()):  # reports that show the last action
            last = liveness.last.get(key[0])
            if key[0] not in heard or (last is not None and last >= ended + SETTLE):
                del self._ended[key]  # (a node not heard is not planned for anyway)
        await self._autoscale(view, heard, now)
        targets = {app: rc.AppTarget(app=app, release=view.releases[app],
                                     placement=placement.nodes.get(app, {}),
                                     busy=app in view.busy)
                   for app in view.apps}
        # an app the placement cannot fully hold (no room: another app took it first)
        # keeps what it runs: shrinking it would stop serving instances for nothing
        actions: list[rc.Action | _Reroute] = [
            a for a in rc.plan(targets, reports)
            if not (isinstance(a, rc.Shrink) and a.app in placement.short)]
        planned = {(a.node, a.app) for a in actions}
        actions += [_Reroute(node=node, app=app, instances=ids)
                    for node, app, ids in unrouted(targets, reports) if (node, app) not in planned]
        wanted = {(a.node, a.app) for a in actions} | set(self._flight)
        for key in [k for k in self._failing if k not in wanted]:
            del self._failing[key]  # nothing left to do there: its failures are moot
        for action in actions:
            if self._may_start(action, now):
                self._start(nursery, action)
        await self._finish_scales(view, placement, targets, reports, actions)

    def _unheard(self, view: ClusterView, now: float) -> bool:
        """Whether this leader, new, has not heard an eligible node yet (for at most the
        liveness timeout and the leader's own stalls, after which a silent node goes
        down): placing without its heartbeat would count the apps idle there as running
        and, placement being sticky, could move another app off that node for good."""
        liveness = self.host.liveness
        return (liveness.leader_since is not None
                and now - liveness.leader_since - liveness.blind <= liveness.timeout
                and any(node.eligible and node.name not in liveness.status
                        for node in view.nodes))

    # ------------------------------------------------------------------ autoscaling
    async def _autoscale(self, view: ClusterView, heard: Mapping[str, Mapping[str, Any]],
                         now: float) -> None:
        """Feed each autoscaled app's load (from the heartbeats) to its autoscaler and
        commit a decision as ``Autoscale``; an app a deploy runs for waits."""
        def autoscaled(s: ClusterState) -> dict[str, tuple[dict[str, Any], int, str]]:
            found = {}
            for name, app in s.apps.items():
                scale = s.effective_scale(name)
                if scale.get("auto") is not None and app.current_release is not None:
                    found[name] = (scale["auto"], scale["instances"], app.current_release)
            return found

        apps = self.host.read(autoscaled)
        self._autoscalers.keep_only(set(apps))
        for app, (auto, current, release) in sorted(apps.items()):
            if app in view.busy:
                continue
            try:  # one app's trouble never stops the others' (or the round's) work
                spec = self.autoscale_timing.apply(auto_spec(auto))
                load = app_load(heard, app, release, spec.metric)
                decision = self._autoscalers.decide(now, app, spec, current, load)
            except (ValueError, TypeError, KeyError) as exc:
                if self._changed(f"autoscale/{app}", repr(exc)):
                    log.warning("autoscaler failed", app=app, error=repr(exc))
                continue
            if decision is None:
                continue
            try:
                result = await self.host.submit(self.host.command(
                    cmd.Autoscale, actor=self._actor, app=app, instances=decision.instances,
                    reason=decision.reason[:REASON_MAX], inputs=decision.inputs))
            except CoordinatorError as exc:
                result = {"ok": False, "error": str(exc)}
            if result.get("ok"):
                log.info("autoscale", app=app, instances=decision.instances,
                         reason=decision.reason)
            elif self._changed(f"autoscale/{app}", str(result.get("error"))):
                log.warning("autoscale not committed", app=app, error=result.get("error"))

    # ------------------------------------------------------------------ placement
    async def _commit_placement(self, view: ClusterView, placement: sch.Placement) -> None:
        for app in (scale.app for scale in view.scales):
            nodes = dict(sorted(placement.nodes.get(app, {}).items()))
            reason = self._reason(app, placement)
            if nodes == view.placement.get(app, {}) and reason == view.reasons.get(app, ""):
                continue
            try:
                result = await self.host.submit(self.host.command(
                    cmd.SetPlacement, actor=self._actor, app=app, placement=nodes,
                    reason=reason))
            except CoordinatorError as exc:
                result = {"ok": False, "error": str(exc)}
            if result.get("ok"):
                log.info("placement", app=app, placement=nodes, reason=reason or None)
            elif self._changed(f"placement/{app}", str(result.get("error"))):
                log.warning("placement not committed", app=app, error=result.get("error"))

    def _reason(self, app: str, placement: sch.Placement) -> str:
        parts = [placement.short.get(app, "")]
        parts += [f"actions on {node} keep failing: {f.error}"
                  for (node, name), f in sorted(self._failing.items())
                  if name == app and f.count >= FAILING_AFTER]
        text = "; ".join(p for p in parts if p)
        return text if len(text) <= REASON_MAX else text[:REASON_MAX - 3] + "..."

    # ------------------------------------------------------------------ scheduling actions
    def _may_start(self, action: rc.Action | _Reroute, now: float) -> bool:
        key = (action.node, action.app)
        if key in self._flight:
            return False
        failing = self._failing.get(key)
        if failing is not None and failing.retry_at > now:
            return False
        if key in self._ended:
            return False  # the node's report may not show the last action yet
        # a shrink counted the other nodes' instances: none of them may be changing
        return not (isinstance(action, rc.Shrink)
                    and any(app == action.app for _, app in self._flight))

    def _start(self, nursery: trio.Nursery, action: rc.Action | _Reroute) -> None:
        key = (action.node, action.app)
        self._seq += 1
        flight = _Flight(action=action, scope=trio.CancelScope())
        self._flight[key] = flight
        nursery.start_soon(self._run_action, flight, self._term, self._seq)

    async def _run_action(self, flight: _Flight, term: int | None, seq: int) -> None:
        action = flight.action
        key = (action.node, action.app)
        bound = log.bind(node=action.node, app=action.app, action=type(action).__name__.strip("_"))
        error = ""
        try:
            with flight.scope:
                async with self._limiter:
                    assert term is not None
                    sid = f"rc/{term}/{action.node}/{action.app}/{seq}"
                    try:
                        if isinstance(action, rc.Grow):
                            await self._grow(action, sid, term)
                        elif isinstance(action, rc.Shrink):
                            await self._shrink(action, sid, term)
                        else:
                            await self._reroute(action, sid, term)
                    except ActionFailed as exc:
                        error = str(exc)
                    except Exception as exc:  # a bug must not stop the other actions
                        bound.exception("reconcile action crashed")
                        error = f"{type(exc).__name__}: {exc}"
                    else:
                        bound.info("reconciled", detail=_describe(action))
        finally:
            if self._flight.get(key) is flight:
                del self._flight[key]
                if not flight.scope.cancelled_caught:
                    self._ended[key] = trio.current_time()
                    self._record(key, error, bound)

    def _record(self, key: Key, error: str, bound: Any) -> None:
        """Note an action's outcome: back off a failing (node, app), log changes only."""
        failing = self._failing.get(key)
        if not error:
            if failing is not None and failing.count:
                bound.info("reconcile action works again", after_failures=failing.count)
            self._failing.pop(key, None)
            return
        if failing is None:
            failing = self._failing[key] = _Failing()
        failing.count += 1
        delay = failing.backoff.next()
        failing.retry_at = trio.current_time() + delay
        if error != failing.error:
            bound.warning("reconcile action failed", error=error, retry_in=delay,
                          failures=failing.count)
        failing.error = error

    # ------------------------------------------------------------------ the actions
    async def _grow(self, action: rc.Grow, sid: str, term: int) -> None:
        address = self._address(action.node)
        sha256, keep, deadline = self.host.read(
            lambda s: _release_facts(s, action.app, action.release))
        if sha256 is None:
            raise ActionFailed(f"release {action.app}@{action.release} is not known")
        await self._send(address, msg.Prepare(
            id=f"{sid}/prepare", term=term, app=action.app, release=action.release,
            sha256=sha256, keep=keep), BUILD_TIMEOUT, app=action.app)
        started = await self._send(address, msg.Start(
            id=f"{sid}/start", term=term, app=action.app, release=action.release,
            count=action.count), deadline + START_MARGIN, app=action.app)
        assert isinstance(started, msg.StartReply)
        new = tuple(i.id for i in started.instances)
        status = await self._status(address)
        serving = tuple(i.instance for i in status.instances
                        if i.app == action.app and i.release == action.release
                        and i.state == "ready" and i.instance not in new)
        await self._send(address, msg.Switch(
            id=f"{sid}/switch", term=term, app=action.app, instances=serving + new),
            SIGNAL_TIMEOUT, app=action.app)

    async def _shrink(self, action: rc.Shrink, sid: str, term: int) -> None:
        address = self._address(action.node)
        await self._send(address, msg.Switch(
            id=f"{sid}/switch", term=term, app=action.app, instances=action.keep),
            SIGNAL_TIMEOUT, app=action.app)
        if not action.stop:
            return
        await self._send(address, msg.Drain(
            id=f"{sid}/drain", term=term, instances=action.stop, grace=self.drain_grace),
            self.drain_grace + SIGNAL_TIMEOUT, app=action.app, gone_ok=True)
        await self._send(address, msg.Stop(
            id=f"{sid}/stop", term=term, instances=action.stop, grace=self.drain_grace),
            self.drain_grace + SIGNAL_TIMEOUT, app=action.app, gone_ok=True)

    async def _reroute(self, action: _Reroute, sid: str, term: int) -> None:
        await self._send(self._address(action.node), msg.Switch(
            id=f"{sid}/switch", term=term, app=action.app, instances=action.instances),
            SIGNAL_TIMEOUT, app=action.app)

    # ------------------------------------------------------------------ RPC
    def _address(self, node: str) -> str:
        address: str | None = self.host.read(
            lambda s: s.nodes[node].address if node in s.nodes else None)
        if address is None:
            raise ActionFailed(f"node {node} is no longer registered")
        return address

    def _still_ours(self, app: str) -> None:
        """Between two signals: a deploy that began meanwhile takes the app over."""
        if not self.host.is_leader():
            raise ActionFailed("no longer leading")
        if self.host.read(lambda s: any(d.app == app and d.running
                                        for d in s.deploys.values())):
            raise ActionFailed(f"a deploy of {app} began: left to it")

    async def _send(self, address: str, message: msg.Signal[Any], wait: float, *,
                    app: str, gone_ok: bool = False) -> msg.Reply | None:
        """The participant's reply; ActionFailed for a refusal or no answer.
        ``gone_ok``: instances already gone count as done (None)."""
        self._still_ours(app)
        try:
            reply: msg.Reply = await self.host.participants.signal(address, message,
                                                                   timeout=wait)
            return reply
        except Refused as exc:
            if gone_ok and exc.reply.error is msg.ErrorCode.UNKNOWN_INSTANCE:
                return None
            raise ActionFailed(f"{message.type} refused:"
                               f" {exc.reply.detail or exc.reply.error.value}") from None
        except RpcError as exc:  # unreachable, another protocol version, a garbled answer
            raise ActionFailed(f"{message.type} not answered: {exc}") from None

    async def _status(self, address: str) -> msg.StatusReply:
        try:
            return await self.host.participants.status(address, timeout=SIGNAL_TIMEOUT)
        except RpcError as exc:
            raise ActionFailed(f"status unreadable: {exc}") from None

    # ------------------------------------------------------------------ scaling
    async def _finish_scales(self, view: ClusterView, placement: sch.Placement,
                             targets: Mapping[str, rc.AppTarget],
                             reports: Mapping[str, rc.NodeReport],
                             actions: list[rc.Action | _Reroute]) -> None:
        for app, scale_id in sorted(view.scaling.items()):
            target = targets.get(app)
            if target is None or target.busy:
                continue
            failing = [f for (_, name), f in self._failing.items()
                       if name == app and f.count >= FAILING_AFTER]
            busy = (any(a.app == app for a in actions)
                    or any(name == app for _, name in [*self._flight, *self._ended]))
            if failing:
                outcome, reason = "short", self._reason(app, placement)
            elif busy or not converged(target, reports):
                continue
            else:
                reason = placement.short.get(app, "")
                outcome = "short" if reason else "converged"
            try:
                result = await self.host.submit(self.host.command(
                    cmd.FinishScale, actor=self._actor, key=f"{scale_id}:finish", app=app,
                    scale_id=scale_id, outcome=outcome, reason=reason[:REASON_MAX]))
            except CoordinatorError as exc:
                result = {"ok": False, "error": str(exc)}
            if result.get("ok"):
                log.info("scaling finished", app=app, scale_id=scale_id, outcome=outcome,
                         reason=reason or None)
            elif self._changed(f"finish/{app}", str(result.get("error"))):
                log.warning("scaling not finished", app=app, scale_id=scale_id,
                            error=result.get("error"))

    # ------------------------------------------------------------------ helpers
    @property
    def _actor(self) -> str:
        return f"coordinator:{self.host.config.id}"

    def _changed(self, topic: str, text: str) -> bool:
        """Whether ``text`` differs from what was last noted for ``topic`` (log once)."""
        if self._logged.get(topic, "") == text:
            return False
        self._logged[topic] = text
        return True


def _release_facts(state: ClusterState, app: str, release: str
                   ) -> tuple[str | None, tuple[str, ...], float]:
    """(sha256, the releases a prepare keeps, the ready deadline) of ``app@release``."""
    for rel in state.releases.get(app, []):
        if f"r{rel.number}" == release:
            try:
                deadline = spec_from_json(rel.spec).health.ready_deadline
            except ConfigError:
                deadline = READY_DEADLINE
            return rel.sha256, tuple(state.retained(app, release)), deadline
    return None, (), READY_DEADLINE


def _describe(action: rc.Action | _Reroute) -> str:
    if isinstance(action, rc.Grow):
        return f"started {action.count} of {action.app}@{action.release}"
    if isinstance(action, rc.Shrink):
        return f"stopped {list(action.stop)}, routes {list(action.keep)}"
    return f"routes {list(action.instances)}"
