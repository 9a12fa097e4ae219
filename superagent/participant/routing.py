"""The agent's routes, pushed to its proxy workers as snapshots.

``Agent.routes`` (app -> the instances ``switch`` routed), ``Agent.standby`` (the serving
instances the last switch replaced) and ``Agent.cold`` (apps scaled to zero) make one
snapshot: only serving instances are in it (ready, or failing fewer checks than the
restart threshold), and an app scaled to zero gets a ``ColdStart`` entry so the workers
hold its requests. ``apply_routes`` computes and applies under one lock and skips a
snapshot equal to the last; ``keep_routes`` re-applies whenever a routed instance starts
or stops serving (``Agent._routes_stale``).
"""

from __future__ import annotations

import structlog
import trio

from superagent.participant.agentview import AgentView
from superagent.participant.errors import ParticipantError
from superagent.participant.idle import Phase
from superagent.proxy.snapshot import AppRoute, ColdStart, Timeouts
from superagent.proxy.snapshot import Instance as RouteInstance

HOLD_QUEUE = 256  # requests each proxy worker holds per app during its cold start
HOLD_MARGIN = 5.0  # seconds a held request waits beyond the app's ready deadline
log = structlog.get_logger("superagent.participant")
_COLD_STATES = {Phase.STARTING: "starting", Phase.FAILED: "failed"}  # else: idle


async def apply_routes(agent: AgentView) -> int:
    """Push the routes (their serving instances) to the proxy unless unchanged;
    returns the snapshot version in force."""
    async with agent._routes_lock:  # computed and applied in one go: the newest wins
        apps = []
        for app, ids in sorted({**agent.routes, **{a: [] for a in agent.cold}}.items()):
            cold = agent.cold.get(app)
            if not ids and cold is None:
                continue
            release = agent.instances[ids[0]].config.release if ids else (
                cold.release if cold is not None else "")
            spec = agent.store.get(app, release).spec
            r, limits = spec.routes, spec.limits
            timeout = limits.timeout or Timeouts().first_byte
            standby = [i for i in agent.standby.get(app, ()) if i in agent.instances]
            apps.append(AppRoute(
                name=app,
                instances=tuple(RouteInstance(id=i, host="127.0.0.1",
                                              port=agent.instances[i].config.port,
                                              standby=i in standby)
                                for i in (*ids, *standby) if agent.instances[i].serving),
                prefix=r.prefix if (r.prefix or r.hosts or r.port) else f"/{app}",
                strip_prefix=r.strip_prefix if r.prefix else not (r.hosts or r.port),
                rewrite_paths=r.rewrite_paths,
                hosts=r.hosts, port=r.port, max_body=limits.max_body,
                min_body_rate=limits.min_body_rate, upgrades=r.upgrades,
                timeouts=Timeouts(first_byte=timeout, idle=timeout),
                cold=None if spec.scale.idle_timeout <= 0 and cold is None else ColdStart(
                    state=_COLD_STATES.get(cold.phase, "idle") if cold else "serving",
                    reason=cold.reason if cold else "", queue=HOLD_QUEUE,
                    wait=spec.health.ready_deadline + HOLD_MARGIN,
                    wake=str(agent.wake_path))))
        if apps == agent._applied:
            return agent.proxy.snapshot.version
        version = await agent.proxy.apply(apps)
        agent._applied = apps
        return version


async def keep_routes(agent: AgentView) -> None:
    """Re-apply the routes whenever a routed instance starts or stops serving."""
    while True:
        await agent._routes_stale.wait()
        agent._routes_stale = trio.Event()
        try:
            await apply_routes(agent)
        except ParticipantError as exc:
            log.error("routes not applied after an instance changed", error=str(exc))


def unroute(agent: AgentView, gone: set[str]) -> bool:
    """Take ``gone`` out of every app's routes and standbys; True if any was there."""
    changed = False
    for table in (agent.routes, agent.standby):
        for app, ids in table.items():
            kept = [i for i in ids if i not in gone]
            if kept != ids:
                table[app] = kept
                changed = True
    return changed
