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

A participant that cannot be reached is retried (same signal id) until the membership loop
marks its node down, or ``NODE_LOST_AFTER`` passes; then the action's outcome is
``NodeLost``. Refusals map to the saga's failures: a prepare or start that fails is
``PrepareFailed``/``StartFailed``; a switch or drain that fails, or new instances no longer
healthy after the drain, cancel the deploy (the planner compensates). Undoing is insisted
on: a refused switch back or stop is repeated (same signal id) for ``INSIST_FOR`` seconds
before the node counts as lost; a stop of instances already gone counts as done.

A round whose outcomes the state refuses, or that fails unexpectedly, is logged and tried
again with backoff: one deploy's trouble never stops the coordinator or the other deploys.
The deploy ends with ``FinishDeploy`` once the planner says ``Finish`` and no signal is in
flight; only then may the app's next deploy start.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import structlog
import trio

from superagent.coordinator import commands as cmd
from superagent.coordinator.deploy import model as m
from superagent.coordinator.deploy import planner as p
from superagent.coordinator.errors import CommandError, NoTargets, UnknownApp, UnknownRelease
from superagent.coordinator.state import ClusterState
from superagent.manifest import TEST_TIMEOUT, AppSpec, spec_from_json

if TYPE_CHECKING:
    from superagent.coordinator.service import Coordinator

log = structlog.get_logger(__name__)

POLL = 0.2  # how often the runner looks for deploys to drive
NODE_LOST_AFTER = 30.0  # unreachable this long (and not yet marked down): lost
BUILD_TIMEOUT = 1800.0  # a prepare (download + build) answers within this
SIGNAL_TIMEOUT = 60.0  # switch, drain, stop
DRAIN_GRACE = 30.0
HEALTHY = ("ready", "unhealthy")  # instance states that still serve
ROUND_BACKOFF, ROUND_BACKOFF_MAX = 1.0, 30.0  # after a round whose outcomes were refused
INSIST_FOR = 120.0  # a switch back or a stop refused this long: the node counts as lost


class _Unreachable(Exception):
    pass


class DeployRunner:
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self._driving: dict[str, trio.CancelScope] = {}

    def __repr__(self) -> str:
        return f"<DeployRunner driving={sorted(self._driving)}>"

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(POLL)
                if not self.c.is_leader():
                    for scope in self._driving.values():
                        scope.cancel()
                    continue
                running = self.c.read(lambda s: [d.deploy_id for d in s.deploys.values()
                                                 if d.running])
                for deploy_id in running:
                    if deploy_id not in self._driving:
                        self._driving[deploy_id] = trio.CancelScope()
                        nursery.start_soon(self._drive, deploy_id)

    async def _drive(self, deploy_id: str) -> None:
        scope = self._driving[deploy_id]
        bound = log.bind(deploy=deploy_id)
        backoff = ROUND_BACKOFF
        try:
            with scope:
                bound.info("deploy driven", leader=self.c.config.id)
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
                            backoff = ROUND_BACKOFF
                            continue
                        bound.error("deploy events refused; retrying the round",
                                    errors=refused, retry_in=backoff)
                    except Exception:  # one deploy's trouble never takes the coordinator down
                        bound.exception("deploy round failed", retry_in=backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, ROUND_BACKOFF_MAX)
        finally:
            del self._driving[deploy_id]

    async def _finish(self, record: m.DeployRecord) -> None:
        """No action is in flight any more: the deploy is over."""
        result = await self.c.submit(self.c.command(
            cmd.FinishDeploy, actor=f"coordinator:{self.c.config.id}",
            key=f"{record.deploy_id}:finish", app=record.app, deploy_id=record.deploy_id))
        if not result.get("ok"):
            log.error("deploy not finished", deploy=record.deploy_id, error=result.get("error"))

    def _record(self, deploy_id: str) -> m.DeployRecord | None:
        doc = self.c.read(lambda s: s.deploys[deploy_id].record
                          if deploy_id in s.deploys and s.deploys[deploy_id].running else None)
        return None if doc is None else m.DeployRecord.from_doc(doc)

    async def _act(self, record: m.DeployRecord, action: m.Action, refused: list[str]
                   ) -> None:
        try:
            event = await self._execute(record, action)
        except _Unreachable as exc:
            assert isinstance(action, m.NodeAction)
            event = m.NodeLost(node=action.node, error=str(exc))
        command = self.c.command(cmd.DeployEvent, actor=f"coordinator:{self.c.config.id}",
                                 key=f"{record.deploy_id}:{action.signal_id}", app=record.app,
                                 deploy_id=record.deploy_id, event=event.to_doc())
        result = await self.c.submit(command)
        if not result.get("ok"):
            refused.append(f"{event.to_doc()}: {result.get('error')}")

    # ------------------------------------------------------------------ actions
    async def _execute(self, r: m.DeployRecord, a: m.Action) -> m.Event:
        assert isinstance(a, m.NodeAction), a
        node = a.node
        if isinstance(a, m.Prepare):
            ok, body = await self._signal(node, "prepare", a.signal_id, BUILD_TIMEOUT,
                                          app=r.app, release=r.release, sha256=r.sha256)
            if ok:
                return m.Prepared(node=node)
            return m.PrepareFailed(node=node, error=_detail(body), log=str(body.get("log", "")))
        if isinstance(a, m.Test):
            ok, body = await self._signal(node, "test", a.signal_id, TEST_TIMEOUT + 30,
                                          app=r.app, release=r.release, timeout=TEST_TIMEOUT)
            if not ok:
                return m.Tested(ok=False, log=_detail(body))
            return m.Tested(ok=bool(body.get("ok")), log=str(body.get("log", "")))
        if isinstance(a, m.Start):
            old = tuple((await self._status(node)).get("routes", {}).get(r.app, []))
            deadline = self._ready_deadline(r.app, r.release) + 30
            ok, body = await self._signal(node, "start", a.signal_id, deadline, app=r.app,
                                          release=r.release, count=a.count)
            if ok:
                return m.Started(node=node, old=old,
                                 new=tuple(i["id"] for i in body["instances"]))
            status = await self._status(node)
            partial = tuple(i["instance"] for i in status.get("instances", [])
                            if i.get("app") == r.app and i.get("release") == r.release
                            and i["instance"] not in old)
            return m.StartFailed(node=node, error=_detail(body), new=partial)
        if isinstance(a, m.Switch):  # SwitchBack too
            ok, body = await self._signal(node, "switch", a.signal_id, SIGNAL_TIMEOUT,
                                          app=r.app, instances=list(a.instances))
            if isinstance(a, m.SwitchBack):
                if not ok:  # routing back must happen: insist (same signal id)
                    await self._insist(node, "switch", a.signal_id, SIGNAL_TIMEOUT,
                                       app=r.app, instances=list(a.instances))
                return m.SwitchedBack(node=node)
            return m.Switched(node=node) if ok else m.Cancel(
                reason=f"switching {node} to the new instances failed: {_detail(body)}")
        if isinstance(a, m.Drain):
            ok, body = await self._signal(node, "drain", a.signal_id,
                                          a.grace + SIGNAL_TIMEOUT,
                                          instances=list(a.instances), grace=a.grace)
            if not ok:
                return m.Cancel(reason=f"draining the old instances on {node} failed:"
                                       f" {_detail(body)}")
            # the new instances served through the drain: still healthy, or compensate
            states = {i["instance"]: i["state"]
                      for i in (await self._status(node)).get("instances", [])}
            sick = {i: states.get(i, "gone") for i in r.step_of(node).new
                    if states.get(i) not in HEALTHY}
            if sick:
                return m.Cancel(reason=f"new instances on {node} are not healthy: "
                                + ", ".join(f"{i} {st}" for i, st in sorted(sick.items())))
            return m.Drained(node=node)
        if isinstance(a, m.StopInstances):
            await self._insist(node, "stop", a.signal_id, r.drain_grace + SIGNAL_TIMEOUT,
                               instances=list(a.instances), grace=r.drain_grace)
            return (m.OldStopped if a.purpose == "commit" else m.NewStopped)(node=node)
        raise AssertionError(f"no executor for {a!r}")

    async def _insist(self, node: str, kind: str, signal_id: str, wait: float,
                      **body: Any) -> None:
        """A signal that must happen (undoing, stopping): repeated with the same id until the
        participant takes it; _Unreachable when it keeps refusing for INSIST_FOR seconds.
        Stopping instances that are already gone counts as done."""
        delay, since = 0.5, trio.current_time()
        while True:
            ok, answer = await self._signal(node, kind, signal_id, wait, **body)
            if ok or (kind == "stop" and answer.get("error") == "UnknownInstance"):
                return
            if trio.current_time() - since > INSIST_FOR:
                raise _Unreachable(f"{kind} on {node} refused: {_detail(answer)}")
            log.warning("signal refused; retrying", node=node, kind=kind, id=signal_id,
                        error=_detail(answer))
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _ready_deadline(self, app: str, release: str) -> float:
        def deadline(s: ClusterState) -> float:
            for rel in s.releases.get(app, []):
                if f"r{rel.number}" == release:
                    return spec_from_json(rel.spec).health.ready_deadline
            return 60.0
        value: float = self.c.read(deadline)
        return value

    # ------------------------------------------------------------------ RPC
    def _node(self, node: str) -> tuple[str, bool]:
        found = self.c.read(lambda s: (s.nodes[node].address, s.nodes[node].up)
                            if node in s.nodes else None)
        if found is None:
            raise _Unreachable(f"node {node} is no longer registered")
        return found  # type: ignore[no-any-return]

    async def _call(self, node: str, send: Callable[[str], Any]) -> httpx.Response:
        """``send(address)`` until it gets an answer; _Unreachable once the node is lost."""
        delay, since = 0.2, trio.current_time()
        while True:
            address, up = self._node(node)
            if not up:
                raise _Unreachable(f"node {node} is down")
            try:
                response: httpx.Response = await send(address)
                return response
            except httpx.HTTPError as exc:
                if trio.current_time() - since > NODE_LOST_AFTER:
                    raise _Unreachable(f"node {node} unreachable: {exc!r}") from None
                log.info("participant unreachable, retrying", node=node, error=repr(exc))
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _signal(self, node: str, kind: str, signal_id: str, wait: float,
                      **body: Any) -> tuple[bool, dict[str, Any]]:
        http = self.c.http
        assert http is not None
        payload = {"id": signal_id, "term": self.c.raft.status()["term"], **body}

        async def send(address: str) -> httpx.Response:
            return await http.post(f"http://{address}/v1/signals/{kind}", json=payload,
                                   timeout=wait)

        response = await self._call(node, send)
        try:
            answer = response.json()
        except ValueError:
            answer = {"detail": response.text[:500]}
        if not isinstance(answer, dict):
            answer = {"detail": str(answer)[:500]}
        log.info("signal", node=node, kind=kind, id=signal_id, status=response.status_code)
        return response.status_code == 200, answer

    async def _status(self, node: str) -> dict[str, Any]:
        http = self.c.http
        assert http is not None

        async def send(address: str) -> httpx.Response:
            return await http.get(f"http://{address}/v1/status", timeout=SIGNAL_TIMEOUT)

        response = await self._call(node, send)
        doc: dict[str, Any] = response.json() if response.status_code == 200 else {}
        return doc


def _detail(body: dict[str, Any]) -> str:
    return str(body.get("detail") or body.get("error") or body)[:m.ERROR_MAX]


def targets(state: ClusterState, spec: AppSpec) -> list[str]:
    """The nodes a deploy of a release with ``spec`` rolls over: online, up, in one of the
    release's groups."""
    groups = set(spec.scale.groups)
    return sorted(n.name for n in state.nodes.values()
                  if n.up and n.lifecycle == "online" and groups & set(n.groups))


async def begin_deploy(c: Coordinator, *, app: str, release: str, actor: str,
                       max_parallel: int = 1, drain_grace: float = DRAIN_GRACE,
                       key: str | None = None) -> dict[str, Any]:
    """Start a deploy of ``app@release``; returns the StartDeploy result (with deploy_id).

    Raises UnknownApp, NoTargets (409) when no participant can take it, CommandError for
    bad parameters; a running deploy of the same app is a 409 result.
    """
    def plan(s: ClusterState) -> tuple[list[str], AppSpec, str]:
        if app not in s.apps:
            raise UnknownApp(app)
        rel = next((x for x in s.releases[app] if f"r{x.number}" == release), None)
        if rel is None:
            raise UnknownRelease(app, int(release.lstrip("r") or 0))
        spec = spec_from_json(rel.spec)
        return targets(s, spec), spec, rel.sha256

    nodes, spec, sha256 = c.read(plan)
    if not nodes:
        raise NoTargets(f"{app}@{release}: no participant is online and up in groups"
                        f" {list(spec.scale.groups)}", app=app)
    # a client's retry (same key) names the same deploy, so it applies once
    suffix = hashlib.sha256(key.encode()).hexdigest()[:6] if key else secrets.token_hex(3)
    deploy_id = f"{app}-{release}-{suffix}"
    try:
        record = m.new_record(deploy_id=deploy_id, app=app, release=release, sha256=sha256,
                              nodes=nodes, per_node=spec.scale.per_node,
                              max_parallel=max_parallel, drain_grace=drain_grace)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    result = await c.submit(c.command(cmd.StartDeploy, actor=actor, key=key, app=app,
                                      deploy_id=deploy_id, record=record.to_doc()))
    return result
