"""An instance that cannot be isolated (``IsolationError``, e.g. its cgroup already holds
another agent's processes) fails its own start and nothing else.

The start signal answers with the error naming the problem (not an internal error) and
the agent tracks no instance that never ran; when it happens to a restart, supervision of
that instance ends and the agent keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import NoReturn

import pytest
import trio

from superagent.participant.agentstate import write_atomically
from superagent.participant.errors import IsolationError
from superagent.participant.supervisor import Instance
from tests.participant.test_agent import DEADLINE, python_app, running_agent
from tests.support.wait import wait_until_async

TAKEN = "cgroup /sys/fs/cgroup/memory/n/hello/hello@r1.1 already holds processes"


async def _taken(self: Instance) -> NoReturn:
    raise IsolationError(TAKEN, app=self.config.app)


async def _taken_after_record(self: Instance) -> NoReturn:
    """A spawn that fails once the instance's record is on disk (as a failed fork does)."""
    assert self.keep_record is not None
    await self.keep_record(self)
    await _taken(self)


async def test_a_start_that_cannot_be_isolated_answers_why_and_keeps_nothing(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_agent(data_dir) as rig:
        assert (await rig.upload("hello", "r1", python_app())).status_code == 200
        monkeypatch.setattr(Instance, "_spawn", _taken)
        started = await rig.signal("start", app="hello", release="r1", count=2)
        assert started.status_code == 500, started.text
        assert "already holds processes" in started.json()["detail"], started.text
        assert rig.agent.instances == {}
        assert json.loads((data_dir / "state.json").read_text())["instances"] == []
        monkeypatch.undo()  # the group is free again: the next start succeeds
        started = await rig.signal("start", app="hello", release="r1")
        assert started.status_code == 200, started.text


async def test_a_failed_start_answers_once_its_instances_are_off_the_disk(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a slow disk (each write takes 1 s) the failed start's answer, and the answer to
    a repeat of the same signal waiting for it, come after the write that forgets its
    instances, written after the one holding their records: an agent killed right after
    either answer must not find and start them again."""
    async with running_agent(data_dir) as rig:
        assert (await rig.upload("hello", "r1", python_app())).status_code == 200

        def slow_disk(path: Path, text: str) -> None:
            # the disk's slowness (in the writer's thread), not a wait: the repeat below
            # must arrive while the original runs, 2 s of writes, even on a loaded machine
            time.sleep(1.0)
            write_atomically(path, text)

        monkeypatch.setattr(rig.agent.state_writer, "_write", slow_disk)
        monkeypatch.setattr(Instance, "_spawn", _taken_after_record)
        signal = {"id": "start-1", "term": 1, "app": "hello", "release": "r1", "count": 2}
        answers: dict[str, tuple[int, list[object]]] = {}

        async def send(name: str) -> None:
            answer = await rig.rpc.post("/v1/signals/start", json=signal)
            on_disk = json.loads((data_dir / "state.json").read_text())["instances"]
            answers[name] = (answer.status_code, on_disk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, "original")
            await wait_until_async(lambda: "start-1" in repr(rig.agent.ledger),
                                   "the original start to run", timeout=DEADLINE)
            nursery.start_soon(send, "repeat")
        assert answers == {"original": (500, []), "repeat": (409, [])}, answers


async def test_a_restart_that_cannot_be_isolated_leaves_the_agent_running(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_agent(data_dir) as rig:
        assert (await rig.upload("hello", "r1", python_app())).status_code == 200
        started = await rig.signal("start", app="hello", release="r1")
        assert started.status_code == 200, started.text
        instance = rig.agent.instances[started.json()["instances"][0]["id"]]
        assert instance.pid is not None
        monkeypatch.setattr(Instance, "_spawn", _taken)
        os.killpg(instance.pid, signal.SIGKILL)  # restarted after its backoff: refused
        await wait_until_async(lambda: instance._run_done.is_set(),
                               "the instance's supervision to end", timeout=DEADLINE)
        with trio.fail_after(DEADLINE):
            assert (await rig.rpc.get("/v1/status")).status_code == 200
