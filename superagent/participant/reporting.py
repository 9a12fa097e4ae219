"""What the agent reports: ``GET /v1/status``, the heartbeat's compact status, its load.

``status`` answers the RPC's status query with every instance's figures (of the processes
its cgroup lists, else of its process tree: ``figures``); ``coordinator_status`` is the
smaller document ``joiner.CoordinatorLink`` sends in each heartbeat, with each instance's
load that ``sample_load`` (a task of the agent's nursery) reads once every LOAD_PERIOD
from the proxy's in-flight table and the instances' CPU seconds. ``app_states`` is the
scale-to-zero state of each app, in both.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import trio

from superagent import codec
from superagent.participant.agentview import AgentView
from superagent.participant.cgroups import InstanceCgroup
from superagent.participant.figures import Members, cpu_seconds, node_figures, process_figures
from superagent.participant.load import LOAD_PERIOD, traffic
from superagent.participant.permissions import unenforced
from superagent.participant.supervisor import Instance
from superagent.proxy.metrics import BUCKETS
from superagent.rpc import messages as msg


def status(agent: AgentView) -> msg.StatusReply:
    """What ``GET /v1/status`` answers (decoded here, so a field the reply does not
    declare fails the agent's own tests rather than a coordinator)."""
    instances = list(agent.instances.values())
    pids = [inst.pid for inst in instances]
    figures = process_figures(pids, members(cgroups_by_pid(instances)))
    return codec.decode(msg.StatusReply, {
        "node": agent.config.node, "groups": list(agent.config.groups),
        "offline": agent.is_offline,
        "isolation": {"root": os.geteuid() == 0,
                      "cgroups": agent.cgroups.mode if agent.cgroups else "none",
                      "reason": agent.cgroups.reason if agent.cgroups else "not root",
                      "agent_cgroup": (agent.agent_group.to_json()
                                       if agent.agent_group is not None else None),
                      "permissions": (agent.permissions.to_json()
                                      if agent.permissions is not None else None)},
        "proxy": {"version": agent.proxy.snapshot.version,
                  "workers": [s.pid for s in agent.proxy.slots]},
        "routes": agent.routes,
        "apps": app_states(agent),
        "debug_sessions": agent.debug_sessions.active(),
        "instances": [{**inst.status(), "figures": None if pid is None else figures.get(pid)}
                      for inst, pid in zip(instances, pids, strict=True)],
        "releases": {app: [r.release for r in agent.store.releases(app)]
                     for app in apps_on_disk(agent)},
        "figures": node_figures(),
    })


def coordinator_status(agent: AgentView) -> dict[str, Any]:
    """The compact status a heartbeat carries: what runs where (with each instance's
    load: ``in_flight``, and ``cpu`` in cores once sampled twice, and ``unenforced``: the
    permissions its manifest asks for that this machine cannot enforce), routes,
    offline, figures."""
    return {
        "instances": [{"id": inst.config.instance, "app": inst.config.app,
                       "release": inst.config.release, "state": inst.state.value,
                       "port": inst.config.port,
                       "unenforced": unenforced(inst.isolation.permissions
                                                if inst.isolation is not None else None),
                       **agent.load.latest.get(instance_id, {})}
                      for instance_id, inst in agent.instances.items()]
        # an idle app's stopped instances: the coordinator counts them as running
        + [{"id": i, "app": cold.app, "release": cold.release, "state": "idle",
            "port": None} for cold in agent.cold.values() for i in cold.ids],
        "routes": agent.routes, "offline": agent.is_offline, "figures": node_figures(),
        "listen": list(agent.config.listen), "traffic": agent.traffic,
        "proxy_hot_path": agent.hot_path, "apps": app_states(agent),
    }


async def sample_load(agent: AgentView) -> None:
    """Every LOAD_PERIOD: the proxy's in-flight counts and the instances' CPU seconds."""
    while True:
        await trio.sleep(LOAD_PERIOD)
        stats = await agent.proxy.stats()  # from the workers that answer
        table = stats["instances"]
        agent.traffic = traffic(stats, BUCKETS)
        pids = {i: inst.pid for i, inst in agent.instances.items()}
        groups = cgroups_by_pid(agent.instances.values())
        by_pid = await trio.to_thread.run_sync(instances_cpu, list(pids.values()), groups)
        cpu = {i: None if pid is None else by_pid.get(pid) for i, pid in pids.items()}
        agent.load.sample(trio.current_time(), table, cpu)


def instances_cpu(pids: list[int | None],
                  groups: Mapping[int, InstanceCgroup]) -> dict[int, float | None]:
    """CPU seconds of each pid's processes (blocking): see ``members``."""
    return cpu_seconds(pids, members(groups))


def cgroups_by_pid(instances: Iterable[Instance]) -> dict[int, InstanceCgroup]:
    """Each running instance's cgroup, by its pid, where it has one."""
    return {inst.pid: inst.cgroup for inst in instances
            if inst.pid is not None and inst.cgroup is not None}


def members(groups: Mapping[int, InstanceCgroup]) -> Members:
    """The processes each group lists, by its instance's pid (blocking: a small file per
    hierarchy): ``figures`` counts them rather than walking /proc for a process tree."""
    return {pid: group.procs() for pid, group in groups.items()}


def app_states(agent: AgentView) -> dict[str, dict[str, Any]]:
    """Each app with routes here: ``state`` idle, starting or serving; an idle app's
    ``release`` and ``instances`` (the count a cold start starts); ``start_error``
    when its last cold start failed."""
    states: dict[str, dict[str, Any]] = {
        app: {"state": "serving"} for app, ids in agent.routes.items() if ids}
    for app, cold in agent.cold.items():
        states[app] = {"state": cold.state, "release": cold.release,
                       "instances": len(cold.ids),
                       **({"start_error": cold.reason} if cold.reason else {})}
    return states


def apps_on_disk(agent: AgentView) -> list[str]:
    root = agent.store.root
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
