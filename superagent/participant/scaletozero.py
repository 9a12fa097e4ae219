"""The agent's scale to zero, its I/O shell: idling apps, waking them, cold starts.

The decisions are ``idle.py``'s (``ActivityWatch``, ``ColdApp`` and its transition
table); these functions act on an ``Agent``'s tables. Every IDLE_TICK ``watch_idle``
reads the proxy's figures for the routed apps whose release sets an idle timeout; an
app due is drained with no grace (``go_idle``): with nothing in flight after the mark
it is routed with no instance (a ``ColdStart`` entry, so the proxy workers hold its
requests) and its instances are stopped, else it is routed again. A worker holding a
request asks through the wake socket (``on_wake``); ``cold_start`` then starts as many
instances as the app had and routes them, or records the failure (503 start-failed).
A cold start that would take the node past its ``--capacity`` first idles other apps
(``make_room_for``: ``idle.make_room`` decides which), or fails with the reason. An agent
killed during a cold start leaves the new instances' records: its successor routes them
(``resume_cold_starts``).
See docs/participant.md#scale-to-zero.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import structlog
import trio

from superagent.participant.agentview import AgentView
from superagent.participant.errors import NoRoom, ParticipantError
from superagent.participant.idle import (
    ColdApp,
    Event,
    Evictable,
    Phase,
    app_counts,
    make_room,
)
from superagent.participant.instancestate import State
from superagent.participant.routing import apply_routes
from superagent.participant.supervisor import Instance
from superagent.participant.tracking import forget

IDLE_TICK = 1.0  # seconds between looks at the proxy's figures for apps that scale to zero
log = structlog.get_logger("superagent.participant")


def forget_idle(agent: AgentView, instances: list[str]) -> bool:
    """Take stopped idle instances out of their apps' idle records (a record left with
    none is dropped: the app is no longer here); True when a record changed."""
    gone = set(instances) & agent.idle_ids
    changed = False
    for app, cold in list(agent.cold.items()):
        kept = tuple(i for i in cold.ids if i not in gone)
        if kept != cold.ids:
            changed = True
            if kept or cold.phase is Phase.STARTING:
                cold.ids = kept
            else:
                del agent.cold[app]
    return changed


def idle_timeouts(agent: AgentView) -> dict[str, float]:
    """The routed, serving apps that scale to zero, and their idle timeouts."""
    timeouts = {}
    for app, ids in agent.routes.items():
        if ids and app not in agent.cold and ids[0] in agent.instances:
            release = agent.instances[ids[0]].config.release
            with contextlib.suppress(ParticipantError):
                timeout = agent.store.get(app, release).spec.scale.idle_timeout
                if timeout > 0:
                    timeouts[app] = timeout
    return timeouts


async def watch_idle(agent: AgentView) -> None:
    """Every IDLE_TICK: note each watched app's traffic; idle the ones due."""
    while True:
        await trio.sleep(IDLE_TICK)
        timeouts = idle_timeouts(agent)
        for app in [a for a in agent.activity.seen if a not in timeouts]:
            agent.activity.forget(app)
        if not timeouts or agent.closing:
            continue
        requests, in_flight = app_counts(await agent.proxy.stats())
        now = trio.current_time()
        for app in timeouts:
            agent.activity.observe(app, now, requests=requests.get(app, 0),
                                  in_flight=in_flight.get(app, 0))
        for app in agent.activity.due(now, timeouts):
            try:
                await go_idle(agent, app)
            except ParticipantError as exc:
                log.error("app not idled", app=app, error=str(exc))
                agent.activity.touch(app, trio.current_time())


async def go_idle(agent: AgentView, app: str) -> None:
    """Drain ``app``'s instances; with nothing in flight after the mark, route it with
    none and stop them (see ``idle.py``); else route them again."""
    ids = list(agent.routes.get(app, []))
    standby = [i for i in agent.standby.get(app, []) if i in agent.instances]
    if not ids or app in agent.cold or any(i not in agent.instances for i in ids):
        return
    cold = ColdApp(app=app, release=agent.instances[ids[0]].config.release,
                   ids=tuple(ids))
    agent.cold[app] = cold
    try:
        remaining = await agent.proxy.drain([*ids, *standby], grace=0)
    except ParticipantError:
        if agent.cold.get(app) is cold:  # nothing changed: the app keeps serving
            del agent.cold[app]
        raise
    if any(remaining.values()) or agent.cold.get(app) is not cold \
            or agent.routes.get(app) != ids:
        if agent.cold.get(app) is cold:
            cold.on(Event.BUSY)
            del agent.cold[app]
        await agent.proxy.undrain([*ids, *standby])
        agent.activity.touch(app, trio.current_time())
        return
    agent.routes[app] = []
    agent.standby[app] = []
    agent.idle_ids.update(ids)
    await apply_routes(agent)
    targets = [agent.instances[i] for i in (*ids, *standby) if i in agent.instances]
    async with trio.open_nursery() as stopping:
        for instance in targets:
            stopping.start_soon(stop_quietly, agent, instance)
    agent.activity.forget(app)
    if agent.cold.get(app) is cold:
        cold.on(Event.STOPPED)
        log.info("app idle: its instances stopped", app=app, release=cold.release,
                 instances=ids)
        if cold.wanted:
            cold.wanted = False
            cold.on(Event.WAKE)
            assert agent._nursery is not None
            agent._nursery.start_soon(cold_start, agent, app)
    agent.persist()


async def stop_quietly(agent: AgentView, instance: Instance) -> None:
    try:
        await instance.stop()
    except ParticipantError as exc:
        log.error("idle instance did not stop", instance=instance.config.instance,
                  error=str(exc))
        return
    forget(agent, instance)


# instances that hold (or are about to hold) a process: stopping ones are on their way out
_RUNNING = frozenset({State.STARTING, State.READY, State.UNHEALTHY, State.BACKOFF})


def running_instances(agent: AgentView, but: str) -> int:
    """The node's running instances, counting the cold starts under way of apps other
    than ``but`` at the size they will have: those that passed their capacity check
    (``fitted``; two apps woken at once must not each count the other and both fail)."""
    by_app: dict[str, int] = {}
    for instance in agent.instances.values():
        if instance.state in _RUNNING:
            by_app[instance.config.app] = by_app.get(instance.config.app, 0) + 1
    pending = sum(max(0, max(1, len(cold.ids)) - by_app.get(name, 0))
                  for name, cold in agent.cold.items()
                  if name != but and cold.phase is Phase.STARTING and cold.fitted)
    return sum(by_app.values()) + pending


def freed_by_idling(agent: AgentView, app: str) -> int:
    """The running instances ``go_idle`` would stop: the app's routed and standby ones (an
    instance it runs unrouted, e.g. started and not switched to yet, keeps running)."""
    ids = {*agent.routes.get(app, ()), *agent.standby.get(app, ())}
    return sum(1 for i in ids if i in agent.instances and agent.instances[i].state in _RUNNING)


async def make_room_for(agent: AgentView, app: str, wanted: int) -> None:
    """Fit a cold start of ``wanted`` instances of ``app`` in the node's capacity: idle the
    other serving scale-to-zero apps with nothing in flight that ``make_room`` picks
    (least recently used first), one at a time, deciding again after each (one that a
    request reached meanwhile stays up: the next in line goes instead); raises NoRoom
    when the apps not tried yet would not make room."""
    capacity = agent.config.capacity
    if running_instances(agent, app) + wanted <= capacity:
        _fitted(agent, app)  # no await since the count: no other start came in between
        return  # the common case: nothing to read, nothing on the cold start's path
    tried: set[str] = set()
    while True:
        _, in_flight = app_counts(await agent.proxy.stats())
        now = trio.current_time()
        candidates = [
            Evictable(app=other, active_at=seen.active_at if seen is not None else now,
                      instances=freed_by_idling(agent, other),
                      in_flight=in_flight.get(other, 0))
            for other in idle_timeouts(agent) if other != app and other not in tried
            for seen in [agent.activity.seen.get(other)]]
        room = make_room(capacity=capacity, running=running_instances(agent, app),
                         wanted=wanted, candidates=candidates)
        if not room.fits:
            cold = agent.cold.get(app)
            raise NoRoom(room.reason, app=app,
                         release=cold.release if cold is not None else "")
        if not room.evict:
            _fitted(agent, app)  # no await since the count
            return
        other = room.evict[0]
        tried.add(other)
        log.info("idling an app to make room for a cold start", app=other, cold_app=app)
        try:
            await go_idle(agent, other)
        except ParticipantError as exc:
            log.error("app not idled", app=other, error=str(exc))


def _fitted(agent: AgentView, app: str) -> None:
    """``app``'s cold start fits: the room it will take counts for the other ones."""
    cold = agent.cold.get(app)
    if cold is not None and cold.phase is Phase.STARTING:
        cold.fitted = True


async def on_wake(agent: AgentView, message: dict[str, Any]) -> dict[str, Any]:
    """A proxy worker holds a request for ``app``: start it unless starting (or
    refused after a recent failure). Answered at once."""
    if message.get("type") != "wake" or not isinstance(message.get("app"), str):
        raise ValueError("expected {'type': 'wake', 'app': NAME}")
    app = message["app"]
    cold = agent.cold.get(app)
    if cold is None:  # serving (the next snapshot routes it) or not here at all
        if agent.routes.get(app) or app in applied_names(agent):
            return {"ok": True}
        return {"ok": False, "error": f"app {app!r} is not routed on this node"}
    before = cold.phase
    ok, reason = cold.wake(trio.current_time())
    if not ok:
        return {"ok": False, "error": f"app {app!r} failed to start: {reason}"}
    if before is not Phase.STARTING and cold.phase is Phase.STARTING:
        assert agent._nursery is not None
        agent._nursery.start_soon(cold_start, agent, app)
    return {"ok": True}


def resume_cold_starts(agent: AgentView) -> list[str]:
    """At the agent's start: an idle app whose instances of its idle release run (a cold
    start the previous agent was killed in, after their spawn but before the state named
    them the app's routes) is serving again with them; returns those apps.

    Their records (and pids) were on disk before they could be ready (``agentstate``), so
    they are adopted, or started afresh; routed, they serve once ready. Left as they were,
    they would run unrouted while a request started the app once more."""
    routed = {i for ids in (*agent.routes.values(), *agent.standby.values()) for i in ids}
    resumed = []
    for app, cold in list(agent.cold.items()):
        ids = [i for i, inst in agent.instances.items() if inst.config.app == app
               and inst.config.release == cold.release and i not in routed]
        if ids:
            del agent.cold[app]
            agent.routes[app] = ids
            agent.standby[app] = []
            resumed.append(app)
            log.info("cold start resumed: its instances are routed", app=app,
                     release=cold.release, instances=ids)
    return resumed


def applied_names(agent: AgentView) -> set[str]:
    return {route.name for route in agent._applied or ()}


async def cold_start(agent: AgentView, app: str) -> None:
    """Start an idle app's instances (as many as it had) and route them; a failure
    goes to the app's status, the log and the held requests (503 start-failed)."""
    cold = agent.cold[app]
    began, wall = trio.current_time(), time.time()
    log.info("cold start", app=app, release=cold.release, instances=len(cold.ids))
    try:
        await make_room_for(agent, app, max(1, len(cold.ids)))
        if agent.cold.get(app) is not cold:
            return  # taken over (a deploy or a scaling switched it) while room was made
        reply = await agent.start(app, cold.release, max(1, len(cold.ids)))
        started = trio.current_time()
        if agent.cold.get(app) is not cold:
            return  # a deploy or a stop took the app over meanwhile
        cold.on(Event.READY)
        # what ``switch`` does, minus its undrain of instances no worker knows yet: the
        # held requests wait for this snapshot, so nothing else goes first. The state
        # write is asked after it (and runs off the loop): the instances' records and pids
        # are on disk already, and an agent killed before this write routes them again
        # at its start (``resume_cold_starts``)
        del agent.cold[app]
        agent.routes[app] = [i.id for i in reply.instances]
        agent.standby[app] = []
        agent.activity.touch(app, trio.current_time())
        await apply_routes(agent)
        routed = trio.current_time()
        agent.persist()
        first = agent.instances.get(reply.instances[0].id)
        forked = first.fork_at if first is not None else None
        spawned = first.started_at if first is not None else None
        ready = first.ready_at if first is not None else None
        # where the time went: before the spawn (set-up: user, cgroup, files, the record
        # on disk; then the fork and exec), the app's own boot (to its first ready probe),
        # the rest of the start, the routing snapshot
        log.info("cold start done", app=app, release=cold.release,
                 ms=round((routed - began) * 1000, 1),
                 setup_ms=None if forked is None else round((forked - wall) * 1000, 1),
                 fork_ms=(None if forked is None or spawned is None
                          else round((spawned - forked) * 1000, 1)),
                 spawn_ms=None if spawned is None else round((spawned - wall) * 1000, 1),
                 boot_ms=(None if spawned is None or ready is None
                          else round((ready - spawned) * 1000, 1)),
                 start_ms=round((started - began) * 1000, 1),
                 route_ms=round((routed - started) * 1000, 1))
    except ParticipantError as exc:
        if agent.cold.get(app) is cold and cold.phase is Phase.STARTING:
            cold.on(Event.FAILED, now=trio.current_time(), reason=str(exc))
            log.error("cold start failed", app=app, release=cold.release, error=str(exc))
            with contextlib.suppress(ParticipantError):
                await apply_routes(agent)
        agent.persist()
