"""The agent's bookkeeping of its instances: adopt, track, supervise, forget.

``adopt`` supervises again an instance a previous agent recorded in state.json (its
process when it still runs, else a fresh one with the same id and port after a SIGKILL
of whatever is left in its cgroup); ``add`` and ``forget`` keep ``Agent.instances``, the
port allocator, the log hub and the routes in step; ``supervise`` runs one
``supervisor.Instance`` so that its failures go to the starter before it is ready and to
the log after (one instance never takes the agent down); ``instance_changed`` persists
each change and wakes the route keeper, and ``keep_record`` holds a spawn until the
instance's record is on disk. ``join_agent_group`` puts a process (the agent,
its proxy workers) in the agent's cpu group.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import structlog
import trio

from superagent.manifest import PermissionsSpec
from superagent.participant.agentview import AgentView
from superagent.participant.cgroups import InstanceCgroup
from superagent.participant.egress import loopback_user, permission_support, readmit
from superagent.participant.errors import AdoptionFailed, ParticipantError, StateWriteError
from superagent.participant.routing import unroute
from superagent.participant.supervisor import GROUP_POLL, REAP_TIMEOUT, Instance, InstanceConfig

log = structlog.get_logger("superagent.participant")


async def adopt(agent: AgentView, record: dict[str, Any]) -> None:
    """Supervise again the instance a previous agent recorded: its process when it
    still runs, else a fresh one with the same id and port (started in the
    background, so one slow app does not hold up the agent's start)."""
    assert agent._nursery is not None
    try:
        config = InstanceConfig.from_record(record["config"], cgroups=agent.cgroups)
        wanted = PermissionsSpec(network=config.network, filesystem=config.filesystem)
        support = await permission_support(agent, wanted)
        user = config.user
        if user is not None and user.loopback_gid is not None:
            # the process runs with its group: back in the egress set, should a firewall
            # reload have dropped it while no agent ran (a failure is logged; the
            # agent's periodic check tries again)
            await readmit(user, network=config.network, support=support)
        else:
            # a record of an earlier agent has no egress group: a fresh start needs one
            user = await loopback_user(user, app=config.app, network=config.network,
                                       support=support)
        config = dataclasses.replace(config, permission_support=support, user=user)
    except (KeyError, ValueError, TypeError) as exc:
        log.error("unreadable instance record; it will not be served", error=str(exc),
                  record=record.get("config", {}).get("instance"))
        return
    agent.ports.adopt(config.port)
    try:
        if record.get("pid") is None:
            raise AdoptionFailed("no process was running", pid=0,
                                 instance=config.instance)
        instance = Instance.adopt(config, pid=int(record["pid"]),
                                  create_time=float(record["create_time"]))
    except (AdoptionFailed, KeyError, ValueError, TypeError) as exc:
        log.warning("instance not adopted; starting it afresh", error=str(exc),
                    instance=config.instance)
        if config.cgroups is not None:  # a process nobody recorded may hold the port
            await _empty_cgroup(InstanceCgroup.existing(config.cgroups, config.app,
                                                        config.instance))
        instance = Instance(config)
        add(agent, instance, from_start=False)  # the old process's output is not replayed
        agent._nursery.start_soon(supervise, agent, instance)
        return
    add(agent, instance, from_start=False)
    try:
        await agent._nursery.start(supervise, agent, instance)
    except ParticipantError as exc:
        forget(agent, instance)
        log.warning("adopted instance did not become ready", error=str(exc),
                    instance=config.instance)
        return
    log.info("instance adopted", instance=config.instance, pid=record["pid"])


def add(agent: AgentView, instance: Instance, *, from_start: bool) -> None:
    """Track ``instance``: its changes are persisted and may change the routes. Its record
    is asked for at once: the write runs while its cgroup is made, before its spawn."""
    config = instance.config
    agent.instances[config.instance] = instance
    instance.on_change = partial(instance_changed, agent)
    instance.keep_record = partial(keep_record, agent)
    agent.log_hub.add(config.app, config.release, config.instance, config.out_log,
                     config.err_log, from_start=from_start)
    agent.persist()


def forget(agent: AgentView, instance: Instance) -> None:
    """Stop tracking ``instance`` (stopped, or failed to start) unless already done."""
    config = instance.config
    if agent.instances.get(config.instance) is instance:
        del agent.instances[config.instance]
        agent.ports.release(config.port)
        agent.log_hub.remove(config.instance)
        unroute(agent, {config.instance})  # no route names what is gone


async def supervise(agent: AgentView, instance: Instance, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                     ) -> None:
    """``instance.run``, whose failures before it is ready go to the starter (through
    ``nursery.start``) and after it to the log: one instance never takes the agent
    down."""
    started = _Started(task_status)
    try:
        await instance.run(task_status=started)
    # ParticipantError, not only SupervisorError: an IsolationError (a cgroup that cannot
    # be made, or already holds another's processes) must not end the agent either
    except ParticipantError as exc:
        if not started.done:
            if task_status is not trio.TASK_STATUS_IGNORED:
                raise  # the starter forgets the instance
            forget(agent, instance)  # a fresh start of a lost instance failed
            agent.persist()
            agent._routes_stale.set()
        log.error("instance supervision ended", instance=instance.config.instance,
                  error=str(exc))


async def keep_record(agent: AgentView, instance: Instance) -> None:
    """``Instance.keep_record``: return once state.json holds the instance as it is (see
    ``agentstate`` for why a spawn waits for it). A write that fails is logged, and the
    start goes on: an instance is not refused for the agent's disk."""
    try:
        await agent.persisted()
    except StateWriteError as exc:
        log.error("instance record not written: an agent killed now would not find it",
                  instance=instance.config.instance, error=str(exc))


def instance_changed(agent: AgentView, instance: Instance) -> None:
    """A state or process change: persist the pid; wake the route keeper when the
    instance is routed."""
    instance_id = instance.config.instance
    if agent.instances.get(instance_id) is not instance:
        return
    agent.persist()
    if any(instance_id in ids for ids in (*agent.routes.values(), *agent.standby.values())):
        agent._routes_stale.set()


def join_agent_group(agent: AgentView, pid: int) -> None:
    if agent.agent_group is not None:
        problem = agent.agent_group.add(pid)
        if problem is not None:
            log.warning("process not in the agent's cpu group", pid=pid, reason=problem)


async def _empty_cgroup(group: InstanceCgroup) -> None:
    """SIGKILL what is in ``group`` until it is empty (bounded by REAP_TIMEOUT)."""
    with trio.move_on_after(REAP_TIMEOUT):
        while await trio.to_thread.run_sync(group.kill_all):
            await trio.sleep(GROUP_POLL)


class _Started:
    """A ``task_status`` that remembers whether ``started`` was called."""

    def __init__(self, inner: trio.TaskStatus[None]) -> None:
        self.inner = inner
        self.done = False

    def started(self, value: None = None) -> None:
        self.done = True
        self.inner.started(value)
