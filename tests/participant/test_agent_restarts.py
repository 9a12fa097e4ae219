"""Instances the supervisor restarts, and agents restarted around them.

A restarted instance is out of the proxy's routes until it is ready again; its new pid
is persisted at once, so an agent killed afterwards re-adopts the new process; and an
instance whose process died while no agent ran is started afresh on the same port.
"""

from __future__ import annotations

import json
import os
import signal
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import psutil
import trio

from superagent.participant.supervisor import Instance, State
from tests.participant.test_agent import (
    DEADLINE,
    Rig,
    _kill_leftovers,
    python_app,
    running_agent,
)
from tests.support.ports import free_port
from tests.support.wait import wait_until_async

WARM_APP = '[env]\nWARM_UNTIL_GO = "1"\n'


def recorded_pids(data_dir: Path) -> dict[str, int | None]:
    doc = json.loads((data_dir / "state.json").read_text())
    return {r["config"]["instance"]: r["pid"] for r in doc["instances"]}


def agent_on(data_dir: Path, rpc_port: int, listen_port: int, *,
             stop_all: bool = False) -> AbstractAsyncContextManager[Rig]:
    """An agent of the data directory's node, on ports a later agent takes over; leaving
    only cancels it (apps keep running) unless ``stop_all``."""
    return running_agent(data_dir, rpc_port, listen_port, stop_all=stop_all, drain_grace=5.0)


async def serve(rig: Rig, count: int, extra: str = "") -> list[Instance]:
    assert (await rig.upload("hello", "r1", python_app(extra=extra))).status_code == 200
    started = await rig.signal("start", app="hello", release="r1", count=count)
    assert started.status_code == 200, started.text
    ids = [i["id"] for i in started.json()["instances"]]
    switched = await rig.signal("switch", app="hello", instances=ids)
    assert switched.status_code == 200, switched.text
    return [rig.agent.instances[i] for i in ids]


async def test_a_restarted_instance_gets_no_traffic_until_ready(data_dir: Path) -> None:
    """After a crash the new process listens but is not ready: no request reaches it, and
    its pid is in state.json before it is ready."""
    async with agent_on(data_dir, free_port(), free_port(), stop_all=True) as rig:
        victim, survivor = await serve(rig, 2, WARM_APP)
        old_pid = victim.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        # the new process is up and answering (503: warming) but must not be routed
        await wait_until_async(lambda: victim.pid not in (None, old_pid), "restarted",
                               timeout=DEADLINE)
        async with httpx.AsyncClient(timeout=DEADLINE) as direct:
            answer = await wait_until_async(
                lambda: direct.get(f"http://127.0.0.1:{victim.config.port}/healthz"),
                "the restarted process to listen", until=lambda _answer: True,
                timeout=DEADLINE)
        assert answer.status_code == 503 and victim.state is State.STARTING
        # the new pid reaches state.json a write after the process exists (and before it
        # can be ready: it stays warming, so the wait is bounded by the deadline only)
        await wait_until_async(lambda: recorded_pids(data_dir)[victim.config.instance],
                               "the new pid in state.json", until=lambda pid: pid == victim.pid,
                               timeout=DEADLINE)
        assert victim.state is State.STARTING
        for n in range(30):
            response = await rig.proxy.get(f"/hello/warm{n}")
            assert response.status_code == 200, response.text
            assert response.json()["instance"] == survivor.config.instance

        (victim.config.home / "go").touch()  # warmed up: ready, and routed again
        await wait_until_async(lambda: victim.state is State.READY, "ready again", timeout=DEADLINE)
        seen: set[str] = set()
        with trio.fail_after(DEADLINE):
            while victim.config.instance not in seen:
                response = await rig.proxy.get("/hello/back")
                assert response.status_code == 200, response.text
                seen.add(response.json()["instance"])
        assert victim.restarts == 1


async def test_agent_restarts_keep_restarted_and_lost_instances(data_dir: Path) -> None:
    """A pid the supervisor changed is re-adopted by the next agent; an instance whose
    process died while no agent ran is started afresh, with the same id and port."""
    try:
        await _restart_agents(data_dir)
    finally:
        _kill_leftovers(data_dir)


async def _restart_agents(data_dir: Path) -> None:
    rpc_port, listen_port = free_port(), free_port()
    async with agent_on(data_dir, rpc_port, listen_port) as rig:
        (instance,) = await serve(rig, 1)
        instance_id, port, first_pid = instance.config.instance, instance.config.port, \
            instance.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        await wait_until_async(lambda: instance.state is State.READY
                               and instance.pid not in (None, first_pid), "restarted",
                               timeout=DEADLINE)
        restarted_pid = instance.pid
    # the first agent is gone; its restarted app still runs
    assert restarted_pid is not None and psutil.pid_exists(restarted_pid)

    async with agent_on(data_dir, rpc_port, listen_port) as rig:
        adopted = rig.agent.instances[instance_id]
        assert adopted.pid == restarted_pid  # re-adopted, not started again
        assert (await rig.proxy.get("/hello/adopted")).json()["instance"] == instance_id

    os.kill(restarted_pid, signal.SIGKILL)  # dies while no agent runs
    await wait_until_async(lambda: not _running(restarted_pid), "killed", timeout=DEADLINE)
    async with agent_on(data_dir, rpc_port, listen_port, stop_all=True) as rig:
        fresh = rig.agent.instances[instance_id]
        await wait_until_async(lambda: fresh.state is State.READY, "started afresh",
                               timeout=DEADLINE)
        assert fresh.pid not in (None, restarted_pid) and fresh.config.port == port
        assert recorded_pids(data_dir)[instance_id] == fresh.pid
        with trio.fail_after(DEADLINE):  # routed again once ready
            while (response := await rig.proxy.get("/hello/fresh")).status_code != 200:
                assert response.status_code == 503, response.text  # no instance ready yet
                await trio.sleep(0.02)
        assert response.json()["instance"] == instance_id


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
