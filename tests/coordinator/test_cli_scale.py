"""``superagent scale`` and ``superagent nodes [label]`` against a real coordinator.

The leader's reconciler is not part of this coordinator's test setup, so the tests play
its part: they report instances in heartbeats, commit placements and end the scaling
with FinishScale, and watch what the command prints meanwhile.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from superagent.cli import main as cli_main
from superagent.coordinator import commands as cmd
from tests.coordinator import test_api
from tests.coordinator.test_api import SECRET, Api
from tests.support.wait import wait_until_async

api = test_api.api  # the fixture: a real single-node coordinator
REPO = Path(__file__).resolve().parents[2]
BEAT = 0.2  # seconds between the test node's heartbeats (the fixture's node timeout is 1 s)
# the in-process coordinator's own log lines, which may land in captured stdout
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d.*$\n?", re.MULTILINE)


def instance(n: int, state: str = "ready", app: str = "hello") -> dict[str, Any]:
    return {"id": f"{app}-{n}", "app": app, "release": "r1", "state": state, "port": 5000 + n}


class Node:
    """Node n1 as the coordinator hears it: a heartbeat every BEAT with ``instances``."""

    def __init__(self, api: Api) -> None:
        self.api, self.instances = api, list[dict[str, Any]]()

    async def report(self, *instances: dict[str, Any]) -> None:
        """Report ``instances`` now (and from now on)."""
        self.instances = list(instances)
        await beat(self.api, *self.instances)

    async def run(self) -> None:
        while True:
            await beat(self.api, *self.instances)
            await trio.sleep(BEAT)  # a heartbeat period, not a synchronisation


async def setup(api: Api, nursery: trio.Nursery) -> Node:
    created = await api.call("POST", "/api/v1/apps", json={"app": {"name": "hello"},
                                                           "run": {"command": "true"}})
    assert created.status_code == 201, created.text
    registered = await api.call("POST", "/api/v1/nodes/register", token=SECRET,
                                json={"node": "n1", "address": "127.0.0.1:9", "capacity": 4})
    assert registered.status_code == 200, registered.text
    node = Node(api)
    nursery.start_soon(node.run)
    return node


async def beat(api: Api, *instances: dict[str, Any]) -> None:
    response = await api.call("POST", "/api/v1/nodes/n1/heartbeat", token=SECRET,
                              json={"status": {"instances": list(instances), "routes": {}}})
    assert response.status_code == 200, response.text


async def commit(api: Api, cls: type[cmd.Command], **fields: Any) -> None:
    c = api.coordinator
    result = await c.submit(c.command(cls, actor="reconciler", **fields))
    assert result["ok"], result


class Running:
    """The command as a user runs it: a real process whose stderr is read as it comes."""

    def __init__(self, process: trio.Process) -> None:
        self.process, self.err, self.out = process, b"", b""

    async def until(self, text: str, timeout: float = 15.0) -> None:
        """Read stderr until ``text`` appears in it."""
        assert self.process.stderr is not None
        with trio.move_on_after(timeout):
            while text.encode() not in self.err:
                chunk = await self.process.stderr.receive_some()
                if not chunk:
                    break
                self.err += chunk
        assert text.encode() in self.err, self.err.decode()

    async def finish(self, timeout: float = 15.0) -> int:
        assert self.process.stdout is not None and self.process.stderr is not None
        with trio.fail_after(timeout):
            async for chunk in self.process.stdout:
                self.out += chunk
            async for chunk in self.process.stderr:
                self.err += chunk
            return await self.process.wait()


async def start(api: Api, *argv: str) -> Running:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "superagent", *argv, "--server", api.url, "--token",
         api.token], cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    return Running(process)


async def scaling_id(api: Api) -> str:
    found = await wait_until_async(
        lambda: api.coordinator.read(lambda s: (s.apps["hello"].scaling or {}).get("id")),
        "the scaling to be committed")
    assert isinstance(found, str)
    return found


async def test_scale_follows_each_nodes_counts_until_converged(api: Api,
                                                               nursery: trio.Nursery) -> None:
    node = await setup(api, nursery)
    await commit(api, cmd.SetPlacement, app="hello", placement={"n1": 2})
    await node.report(instance(1), instance(2, "starting"))
    running = await start(api, "scale", "hello", "--per-node", "2")
    try:
        scale_id = await scaling_id(api)
        await running.until(f"hello: scaling {scale_id} to 2 per node in default")
        await running.until("n1: 1/2 ready")
        await node.report(instance(1), instance(2))
        await running.until("n1: 2/2 ready")
        await commit(api, cmd.FinishScale, app="hello", scale_id=scale_id,
                     outcome="converged")
        assert await running.finish() == 0, running.err.decode()
    finally:
        running.process.kill()
    assert running.out.decode() == "hello: 2 per node in default converged\n"


async def test_scale_that_falls_short_exits_non_zero_with_the_reason(
        api: Api, nursery: trio.Nursery) -> None:
    await setup(api, nursery)
    running = await start(api, "scale", "hello", "--instances", "9", "--json")
    try:
        scale_id = await scaling_id(api)
        await commit(api, cmd.SetPlacement, app="hello", placement={"n1": 4},
                     reason="4 of 9 instances: no room on eligible nodes (n1: 4/4)")
        await running.until("4 of 9 instances: no room")
        await commit(api, cmd.FinishScale, app="hello", scale_id=scale_id, outcome="short",
                     reason="4 of 9 instances: no room on eligible nodes (n1: 4/4)")
        assert await running.finish() == 1
    finally:
        running.process.kill()
    ended = json.loads(running.out)
    assert (ended["id"], ended["outcome"]) == (scale_id, "short")
    assert ended["reason"].startswith("4 of 9 instances")


async def test_scale_replaced_by_a_newer_one_exits_non_zero(api: Api,
                                                             nursery: trio.Nursery) -> None:
    await setup(api, nursery)
    running = await start(api, "scale", "hello", "--per-node", "1")
    try:
        first = await scaling_id(api)
        await running.until(f"scaling {first}")
        await commit(api, cmd.SetScale, app="hello", groups=("default",), per_node=3)
        assert await running.finish() == 1
    finally:
        running.process.kill()
    assert "replaced" in running.out.decode()


async def test_scale_nodes_and_label_commands(api: Api, nursery: trio.Nursery,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    node = await setup(api, nursery)
    await node.report(instance(1), instance(2, "stopped"))
    common = ["--server", api.url, "--token", api.token]
    capsys.readouterr()  # the coordinator's log so far (its lines go to stderr from here on)

    def run(*argv: str) -> tuple[int, str, str]:
        # this process's coordinator logs through the same configuration: errors only
        code = cli_main(["--log-level", "error", *argv, *common])
        out, err = capsys.readouterr()
        return code, LOG_LINE.sub("", out), LOG_LINE.sub("", err)

    code, out, err = await trio.to_thread.run_sync(
        lambda: run("scale", "hello", "--instances", "3", "--groups", "web,api", "--no-follow",
                    "--json"))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["scale"] == {"groups": ["web", "api"], "per_node": 1, "instances": 3}
    assert doc["scaling"]["id"] == doc["scale_id"]
    code, out, err = await trio.to_thread.run_sync(lambda: run("apps"))
    assert code == 0 and "SCALE" in out and "3 in web,api (scaling)" in out, out

    for argv, message in (
            (("scale", "hello"), "exactly one of --per-node K"),
            (("scale", "hello", "--per-node", "1", "--instances", "2"), "exactly one of"),
            (("scale", "hello", "--instances", "0"), "--instances must be 1 or more"),
            (("scale", "hello", "--per-node", "1", "--groups", "Web"), "not a valid group"),
            (("scale", "nope", "--per-node", "1"), "app 'nope' does not exist"),
            (("scale", "hello", "--auto", "2-5", "--target", "3"), "--auto takes MIN:MAX"),
            (("scale", "hello", "--auto", "5:2", "--target", "3"), "MIN must be at least 1"),
            (("scale", "hello", "--auto", "0:2", "--target", "3"), "MIN must be at least 1"),
            (("scale", "hello", "--auto", "2:5"), "--auto needs --target N"),
            (("scale", "hello", "--auto", "2:5", "--target", "0"), "--target must be above"),
            (("scale", "hello", "--instances", "2", "--target", "3"), "go with --auto"),
            (("nodes", "label", "n1", "--groups", ","), "at least one group name"),
            (("nodes", "label", "ghost", "--groups", "web"), "'ghost' is not registered")):
        code, out, err = await trio.to_thread.run_sync(functools.partial(run, *argv))
        assert code == 2 and out == "" and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err

    code, out, err = await trio.to_thread.run_sync(
        lambda: run("scale", "hello", "--auto", "1:4", "--target", "0.5", "--metric", "cpu",
                    "--no-follow"))
    assert code == 0 and "to 1-4 instances in web,api, autoscaled to 0.5 cpu per instance" in (
        out + err), (out, err)
    code, out, err = await trio.to_thread.run_sync(lambda: run("audit", "--limit", "2"))
    assert code == 0 and out.splitlines()[0].split() == ["AT", "ACTOR", "COMMAND", "TARGET",
                                                         "OUTCOME"], (out, err)
    code, out, err = await trio.to_thread.run_sync(
        lambda: run("audit", "--limit", "2", "--json"))
    newest = json.loads(out)["audit"][0]  # (the table's rows start like log lines)
    assert newest["type"] == "set_scale", newest
    assert "autoscaled to 0.5 cpu per instance" in newest["outcome"], newest
    code, out, err = await trio.to_thread.run_sync(lambda: run("audit", "--limit", "0"))
    assert code == 2 and "limit must be 1..1000" in err, err
    code, out, err = await trio.to_thread.run_sync(
        lambda: run("nodes", "label", "n1", "--groups", "web,eu"))
    assert (code, out) == (0, "n1: groups web,eu\n"), err
    code, out, _ = await trio.to_thread.run_sync(lambda: run("nodes"))
    header, row, note = out.strip().splitlines()
    assert header.split() == ["NODE", "ADDRESS", "GROUPS", "LIFECYCLE", "LIVE", "INSTANCES",
                              "HEARTBEAT"]
    assert row.split()[:6] == ["n1", "127.0.0.1:9", "web,eu*", "online", "up", "1/4"]
    assert "nodes label" in note
    code, out, _ = await trio.to_thread.run_sync(lambda: run("nodes", "--json"))
    n1 = json.loads(out)["nodes"][0]
    assert (n1["labeled"], n1["instances_used"], len(n1["instances"])) == (True, 1, 2)
    code, out, _ = await trio.to_thread.run_sync(
        lambda: run("nodes", "label", "n1", "--groups", "web,eu", "--json"))
    assert json.loads(out)["changed"] is False, out
