"""The ``test`` signal end to end: a real agent, its real RPC, real test commands.

Releases are uploaded through the RPC, then ``POST /v1/signals/test`` runs their
``[test] command``: passing, failing (a result, not an HTTP error), timing out (the command's
process group is killed), skipped (no command), with bounded output, and fenced by term
like every other signal.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio

from superagent.participant.releases import TEST_LOG_LIMIT
from superagent.participant.service import Agent, AgentConfig
from tests.participant.test_agent import tarball
from tests.support.ports import free_port

SECRET = "test-signal-secret"
DEADLINE = 30.0  # an agent's start-up with its proxy worker, or one test run, on a busy CI


def release(app: str, test: str | None) -> bytes:
    """A release whose manifest has ``test`` as its ``[test] command`` (None: no section)."""
    manifest = f'[app]\nname = "{app}"\n[run]\ncommand = "true"\n'
    if test is not None:
        manifest += f"[test]\ncommand = '''{test}'''\n"
    return tarball({"superagent.toml": manifest, "check.sh": "echo from-script\n"})


class Rig:
    def __init__(self, agent: Agent, rpc: httpx.AsyncClient) -> None:
        self.agent = agent
        self.rpc = rpc
        self._ids = 0

    async def upload(self, app: str, name: str, data: bytes) -> None:
        self._ids += 1
        answer = await self.rpc.put(f"/v1/releases/{app}/{name}", content=data, headers={
            "X-Superagent-Sha256": hashlib.sha256(data).hexdigest(),
            "X-Superagent-Signal": f"u{self._ids}", "X-Superagent-Term": "1"})
        assert answer.status_code == 200, answer.text

    async def test(self, app: str, name: str, term: int = 1, **extra: Any) -> httpx.Response:
        self._ids += 1
        return await self.rpc.post("/v1/signals/test", json={
            "id": f"t{self._ids}", "term": term, "app": app, "release": name, **extra})


@pytest.fixture
async def rig(data_dir: Path) -> AsyncIterator[Rig]:
    rpc_port = free_port()
    agent = Agent(AgentConfig(data_dir=data_dir, secret=SECRET, rpc=("127.0.0.1", rpc_port),
                              listen=(f"127.0.0.1:{free_port()}",), proxy_workers=1))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(DEADLINE):
            await nursery.start(agent.run)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{rpc_port}",
                                     headers={"Authorization": f"Bearer {SECRET}"},
                                     timeout=DEADLINE) as rpc:
            try:
                yield Rig(agent, rpc)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(DEADLINE):
                    await agent.stop_all()
                nursery.cancel_scope.cancel()


async def test_a_passing_test_runs_in_a_clean_environment(rig: Rig, data_dir: Path) -> None:
    """Exit 0 is ok; the command runs in src/ without PORT, as the app's user when the
    agent is root, and its scratch HOME is gone afterwards."""
    await rig.upload("hello", "r1", release(
        "hello", 'sh check.sh; echo "uid=$(id -u) port=${PORT-unset} app=$SUPERAGENT_APP";'
                 ' test -w "$HOME" && echo home-writable'))
    answer = await rig.test("hello", "r1")
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert {k: result[k] for k in ("app", "release", "ok", "exit_code", "timed_out",
                                   "skipped")} == {
        "app": "hello", "release": "r1", "ok": True, "exit_code": 0, "timed_out": False,
        "skipped": False}
    assert "from-script" in result["log"] and "home-writable" in result["log"]
    assert "port=unset app=hello" in result["log"]
    if os.geteuid() == 0:
        assert "uid=0 " not in result["log"]
    assert not [p for p in (data_dir / "homes").iterdir() if p.name.startswith("test-")]


async def test_a_failing_test_is_a_result_not_an_error(rig: Rig) -> None:
    """Exit 3: 200 with ok false, exit_code 3 and the output in the log."""
    await rig.upload("hello", "r1", release("hello", "echo some-output; echo oops >&2; exit 3"))
    answer = await rig.test("hello", "r1")
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert (result["ok"], result["exit_code"], result["timed_out"]) == (False, 3, False)
    assert "some-output" in result["log"] and "oops" in result["log"]


async def test_a_test_past_its_timeout_is_killed(rig: Rig, data_dir: Path) -> None:
    """The command and what it started are killed at the timeout: timed_out, ok false."""
    await rig.upload("hello", "r1", release(
        "hello", "echo started; sleep 60 & echo $! > sleeper.pid; wait"))
    with trio.fail_after(DEADLINE):
        answer = await rig.test("hello", "r1", timeout=1)
    result = answer.json()
    assert answer.status_code == 200, answer.text
    assert (result["ok"], result["exit_code"], result["timed_out"]) == (False, None, True)
    assert "started" in result["log"] and "timed out after 1s" in result["log"]
    pid = int((data_dir / "releases" / "hello" / "r1" / "src" / "sleeper.pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_without_a_test_command_the_test_is_skipped(rig: Rig) -> None:
    """No [test] section: skipped, and ok."""
    await rig.upload("hello", "r1", release("hello", None))
    result = (await rig.test("hello", "r1")).json()
    assert (result["ok"], result["skipped"], result["exit_code"]) == (True, True, None)


async def test_the_log_keeps_the_end_of_long_output(rig: Rig) -> None:
    """Output beyond the bound is dropped from the front: the end, where errors are, stays."""
    await rig.upload("hello", "r1", release(
        "hello", "i=0; while [ $i -lt 20000 ]; do echo line-$i-xxxxxxxxxx; i=$((i+1)); done;"
                 " echo the-end"))
    result = (await rig.test("hello", "r1")).json()
    assert result["ok"] is True
    assert len(result["log"].encode()) < TEST_LOG_LIMIT + 1024
    assert "bytes of output dropped" in result["log"] and "the-end" in result["log"]
    assert "line-0-" not in result["log"]


async def test_test_signals_are_fenced_and_validated(rig: Rig) -> None:
    """A stale term gets 409 and runs nothing; a repeat returns the first result; an
    unknown release is 404; a bad timeout 400."""
    await rig.upload("hello", "r1", release("hello", "echo ran >> runs.txt"))
    first = await rig.rpc.post("/v1/signals/test", json={
        "id": "same", "term": 5, "app": "hello", "release": "r1"})
    assert first.status_code == 200 and first.json()["ok"] is True
    repeat = await rig.rpc.post("/v1/signals/test", json={
        "id": "same", "term": 5, "app": "hello", "release": "r1"})
    assert repeat.json() == {**first.json(), "repeated": True}
    stale = await rig.test("hello", "r1", term=4)
    assert stale.status_code == 409 and stale.json()["error"] == "stale_term"
    runs = rig.agent.store.get("hello", "r1").src / "runs.txt"
    assert runs.read_text() == "ran\n"
    unknown = await rig.test("hello", "r9", term=5)
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_release"
    for timeout in (0, -1, 10**6, "soon"):
        bad = await rig.test("hello", "r1", term=5, timeout=timeout)
        assert bad.status_code == 400 and "timeout:" in bad.json()["detail"]
