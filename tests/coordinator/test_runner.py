"""Tests for superagent.coordinator.deploy.runner: the saga driven against fake participants.

The host is a fake holding a real ``ClusterState`` (commands apply at once); the
participants are in-memory fakes answering typed replies. Time is trio's ``MockClock``
with autojump: backoffs and the node-lost deadline pass instantly and exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pytest
import trio
import trio.testing

from superagent.coordinator import commands as cmd
from superagent.coordinator.deploy import model as m
from superagent.coordinator.deploy.outcomes import WATCH_WINDOW
from superagent.coordinator.deploy.runner import (
    NODE_LOST_AFTER,
    POLL,
    DeployRunner,
    begin_deploy,
    targets,
)
from superagent.coordinator.state import ClusterState, Result
from superagent.manifest import parse_manifest, spec_from_json, spec_to_json
from superagent.rpc import messages as msg
from superagent.rpc.client import Participants
from superagent.rpc.errors import Refused, Unreachable
from tests.coordinator.helpers import add_release, create_app, register

R = TypeVar("R", bound=msg.Reply)
TERM = 3
NODES = {"n1": "10.0.0.1:7000", "n2": "10.0.0.2:7000"}
DEADLINE = 3600.0  # virtual seconds: a deploy that has not finished by then is stuck


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@dataclass
class FakeAgent:
    """One participant's instances and routes, enough to answer every signal."""

    instances: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> app, release
    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    seq: int = 0

    def answer(self, message: msg.Signal[Any]) -> msg.Reply:
        match message:
            case msg.Prepare():
                return msg.PrepareReply(app=message.app, release=message.release,
                                        sha256=message.sha256, build_log="b.log")
            case msg.Test():
                return msg.TestReply(app=message.app, release=message.release, ok=True,
                                     exit_code=0, timed_out=False, log="ok", skipped=False,
                                     seconds=1.0)
            case msg.Start():
                started = []
                for _ in range(message.count):
                    self.seq += 1
                    name = f"{message.app}@{message.release}.{self.seq}"
                    self.instances[name] = (message.app, message.release)
                    started.append(msg.StartedInstance(id=name, port=self.seq, state="ready"))
                return msg.StartReply(app=message.app, release=message.release,
                                      instances=tuple(started))
            case msg.Switch():
                self.routes[message.app] = message.instances
                return msg.SwitchReply(app=message.app, instances=message.instances,
                                       version=self.seq)
            case msg.Drain():
                return msg.DrainReply(remaining={i: 0 for i in message.instances})
            case msg.Stop():
                gone = [i for i in message.instances if i not in self.instances]
                if gone:
                    raise Refused(msg.ErrorReply(error=msg.ErrorCode.UNKNOWN_INSTANCE,
                                                 status=404, detail=f"no instance {gone[0]}"))
                for name in message.instances:
                    del self.instances[name]
                return msg.StopReply(stopped=message.instances, in_flight_cut={})
        raise AssertionError(message)

    def status(self, node: str) -> msg.StatusReply:
        return msg.StatusReply(
            node=node, groups=("default",), offline=False, isolation={}, proxy={},
            routes=self.routes, debug_sessions={}, releases={}, figures={},
            instances=tuple(msg.InstanceStatus(
                app=app, release=release, instance=name, state="ready", pid=1, port=1,
                restarts=0, last_exit_code=None, isolation=None, started_at=None,
                ready_at=None, create_time=None, figures={})
                for name, (app, release) in self.instances.items()))


class FakeParticipants:
    """Every node's fake agent behind the ``Participants`` interface.

    ``refuse(node, type)`` answers a refusal instead (``times`` times, or always);
    ``down`` lists nodes that do not answer at all."""

    def __init__(self) -> None:
        self.agents = {address: FakeAgent() for address in NODES.values()}
        self.sent: list[tuple[str, msg.Signal[Any]]] = []
        self.sent_at: list[float] = []  # trio's clock when each of ``sent`` arrived
        self.refusals: dict[tuple[str, str], tuple[msg.ErrorReply, int]] = {}
        self.down: set[str] = set()

    def refuse(self, node: str, kind: str, code: msg.ErrorCode, *, times: int = -1) -> None:
        reply = msg.ErrorReply(error=code, status=409, detail=f"{kind} refused on {node}")
        self.refusals[(NODES[node], kind)] = (reply, times)

    def of(self, node: str) -> list[str]:
        return [message.type for address, message in self.sent if address == NODES[node]]

    async def signal(self, address: str, message: msg.Signal[R], *, timeout: float) -> R:
        await trio.sleep(0.01)  # a round trip
        if address in self.down:
            raise Unreachable(f"participant {address}: connection refused", address=address)
        self.sent.append((address, message))
        self.sent_at.append(trio.current_time())
        refusal, times = self.refusals.get((address, message.type), (None, 0))
        if refusal is not None and times != 0:
            self.refusals[(address, message.type)] = (refusal, times - 1)
            raise Refused(refusal)
        return cast(R, self.agents[address].answer(message))

    async def status(self, address: str, *, timeout: float = 60.0) -> msg.StatusReply:
        await trio.sleep(0.01)
        if address in self.down:
            raise Unreachable(f"participant {address}: connection refused", address=address)
        node = next(n for n, a in NODES.items() if a == address)
        return self.agents[address].status(node)


@dataclass(frozen=True)
class Identity:
    id: str = "c1"
    peers: dict[str, str] = field(default_factory=lambda: {"c1": "127.0.0.1:1"})


class FakeHost:
    """A leader whose commands apply at once to a real ``ClusterState``."""

    def __init__(self, participants: FakeParticipants) -> None:
        self.state = ClusterState()
        self.config = Identity()
        self.fake = participants
        self.leading = True
        self.keys = iter(range(1, 10**9))
        self.at = 1000.0  # the wall time commands carry (long past: no watch window left)
        for command in (create_app(), add_release(),
                        *(register(node, address=address) for node, address in NODES.items())):
            assert self.state.apply(command.to_json())["ok"]

    @property
    def participants(self) -> Participants:
        return self.fake

    def is_leader(self) -> bool:
        return self.leading

    def term(self) -> int:
        return TERM

    def read(self, reader: Callable[[ClusterState], Any]) -> Any:
        return reader(self.state)

    async def submit(self, command: cmd.Command) -> Result:
        await trio.sleep(0.001)  # a Raft round
        return self.state.apply(command.to_json())

    def command(self, cls: type[cmd.Command], *, actor: str, key: str | None = None,
                **fields: Any) -> cmd.Command:
        return cls(key=key or f"host-{next(self.keys)}", at=self.at, actor=actor, **fields)

    def record(self, deploy_id: str) -> m.DeployRecord:
        return m.DeployRecord.from_doc(self.state.deploys[deploy_id].record)


@pytest.fixture
def participants() -> FakeParticipants:
    return FakeParticipants()


@pytest.fixture
def host(participants: FakeParticipants) -> Iterator[FakeHost]:
    yield FakeHost(participants)


async def deploy(host: FakeHost, **runner: Any) -> m.DeployRecord:
    """Begin a deploy of hello@r1 and run the runner (made with ``runner``) until it is
    finished."""
    result = await begin_deploy(host, app="hello", release="r1", actor="tester")
    assert result["ok"], result
    deploy_id = result["deploy_id"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(DeployRunner(host, **runner).run)
        with trio.fail_after(DEADLINE):
            while host.state.deploys[deploy_id].running:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    return host.record(deploy_id)


async def test_a_deploy_rolls_over_every_node(
        host: FakeHost, participants: FakeParticipants, clock: trio.testing.MockClock
) -> None:
    """Prepare everywhere, test once, then start/switch/drain node by node, then stop the
    old: every signal typed, carrying the leader's term."""
    for agent in participants.agents.values():  # an old release serving before the deploy
        agent.instances["hello@r0.9"] = ("hello", "r0")
        agent.routes["hello"] = ("hello@r0.9",)
    record = await deploy(host)
    assert record.status is m.Status.SUCCEEDED, record
    assert participants.of("n1") == ["prepare", "test", "start", "switch", "drain", "stop"]
    assert participants.of("n2") == ["prepare", "start", "switch", "drain", "stop"]
    assert {message.term for _, message in participants.sent} == {TERM}
    for address in NODES.values():
        agent = participants.agents[address]
        assert agent.routes["hello"] == tuple(agent.instances)


@pytest.mark.parametrize("window", [0.5, WATCH_WINDOW])
async def test_the_last_drain_waits_out_the_runners_watch_window(
        host: FakeHost, participants: FakeParticipants, clock: trio.testing.MockClock,
        window: float) -> None:
    """The last node's old instances are stopped no sooner than the runner's watch window
    (``--watch-window``; the default when not given) after its switch, and not much later."""
    for agent in participants.agents.values():  # an old release, stopped at the commit
        agent.instances["hello@r0.9"] = ("hello", "r0")
        agent.routes["hello"] = ("hello@r0.9",)
    host.at = time.time()  # events stamped now: the window is still to run at the drain
    record = await deploy(host, **({} if window == WATCH_WINDOW else {"watch_window": window}))
    assert record.status is m.Status.SUCCEEDED, record
    last = [(at, message.type) for (address, message), at
            in zip(participants.sent, participants.sent_at, strict=True)
            if address == NODES["n2"]]
    switched = next(at for at, kind in last if kind == "switch")
    stopped = next(at for at, kind in last if kind == "stop")
    # less the wall time the test took so far (milliseconds), plus a few fake round trips
    assert window - 0.2 < stopped - switched < window + 0.5, last


async def test_a_woken_runner_drives_a_new_deploy_at_once(
        host: FakeHost, participants: FakeParticipants, clock: trio.testing.MockClock
) -> None:
    """``wake`` after a deploy is committed: its first signal goes out within a round trip,
    not at the runner's next look (up to ``POLL`` later)."""
    runner = DeployRunner(host)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.sleep(POLL * 1.1)  # the runner has looked once and sleeps again
        result = await begin_deploy(host, app="hello", release="r1", actor="tester")
        assert result["ok"], result
        committed = trio.current_time()
        runner.wake()
        with trio.fail_after(POLL):
            while not participants.sent:
                await trio.sleep(0.001)
        assert trio.current_time() - committed < POLL / 4  # one 10 ms round trip
        nursery.cancel_scope.cancel()


async def test_a_node_that_never_answers_is_lost_after_the_deadline(
        host: FakeHost, participants: FakeParticipants, clock: trio.testing.MockClock
) -> None:
    """An unreachable node is retried until NODE_LOST_AFTER (virtual) seconds, then lost;
    the deploy then fails without any traffic moved."""
    participants.down.add(NODES["n2"])
    began = trio.current_time()
    record = await deploy(host)
    assert trio.current_time() - began >= NODE_LOST_AFTER
    assert record.status is m.Status.FAILED, record
    assert record.step_of("n2").lost
    assert "start" not in participants.of("n1")


async def test_a_refused_start_rolls_the_deploy_back(
        host: FakeHost, participants: FakeParticipants, clock: trio.testing.MockClock
) -> None:
    """A start refused on the first node rolls the deploy back before traffic moves."""
    participants.refuse("n1", "start", msg.ErrorCode.START_FAILED)
    record = await deploy(host)
    assert record.status is m.Status.ROLLED_BACK, record
    assert record.reason == "start failed on n1: start refused on n1"
    assert "switch" not in participants.of("n1")
    assert "start" not in participants.of("n2")


async def test_a_refused_drain_rolls_back_and_switching_back_is_insisted_on(
        host: FakeHost, participants: FakeParticipants, clock: trio.testing.MockClock
) -> None:
    """A refused drain cancels the deploy; the switch back, refused twice, is repeated
    with the same signal id until the participant takes it."""
    for agent in participants.agents.values():
        agent.instances["hello@r0.9"] = ("hello", "r0")
        agent.routes["hello"] = ("hello@r0.9",)
    participants.refuse("n1", "drain", msg.ErrorCode.PROXY_FAILED)
    participants.refuse("n1", "switch", msg.ErrorCode.PROXY_FAILED, times=0)
    record_before: list[str] = []

    async def arm_switch_back() -> None:
        while "drain" not in participants.of("n1"):
            await trio.sleep(0.01)
        record_before.extend(participants.of("n1"))
        participants.refuse("n1", "switch", msg.ErrorCode.PROXY_FAILED, times=2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(arm_switch_back)
        record = await deploy(host)
    assert record.status is m.Status.ROLLED_BACK, record
    switch_backs = [message for address, message in participants.sent
                    if address == NODES["n1"] and message.id.endswith("/switch_back")]
    assert len(switch_backs) == 3 and len({message.id for message in switch_backs}) == 1


async def test_stopping_instances_already_gone_counts_as_done(
        host: FakeHost, participants: FakeParticipants, clock: trio.testing.MockClock
) -> None:
    """At commit, a stop answered UNKNOWN_INSTANCE is done: the deploy succeeds."""
    participants.refuse("n1", "stop", msg.ErrorCode.UNKNOWN_INSTANCE)
    for agent in participants.agents.values():  # an old release serving before the deploy
        agent.instances["hello@r0.9"] = ("hello", "r0")
        agent.routes["hello"] = ("hello@r0.9",)
    record = await deploy(host)
    assert record.status is m.Status.SUCCEEDED, record
    assert participants.of("n1").count("stop") == 1


def _instances_release(host: FakeHost, instances: int) -> None:
    """Release r2 of hello, whose manifest asks for ``instances`` in total."""
    doc = spec_to_json(parse_manifest({"app": {"name": "hello"}, "run": {"command": "x"},
                                       "scale": {"instances": instances}}, source="test"))
    assert host.state.apply(add_release(spec=doc).to_json())["ok"]


async def _deploy_r2(host: FakeHost) -> m.DeployRecord:
    result = await begin_deploy(host, app="hello", release="r2", actor="tester")
    assert result["ok"], result
    async with trio.open_nursery() as nursery:
        nursery.start_soon(DeployRunner(host).run)
        with trio.fail_after(DEADLINE):
            while host.state.deploys[result["deploy_id"]].running:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    return host.record(result["deploy_id"])


async def test_an_instances_app_rolls_over_its_placement_with_its_counts(
        host: FakeHost, participants: FakeParticipants, clock: trio.testing.MockClock
) -> None:
    """An ``instances`` app placed 2 on n2 and none on n1 starts 2 on n2 only."""
    _instances_release(host, 2)
    assert host.state.apply(cmd.SetPlacement(key="p", at=1.0, actor="t", app="hello",
                                             placement={"n2": 2}).to_json())["ok"]
    record = await _deploy_r2(host)
    assert record.status is m.Status.SUCCEEDED, record
    assert record.nodes == ("n2",) and record.step_of("n2").count == 2
    starts = [message for address, message in participants.sent
              if isinstance(message, msg.Start)]
    assert [(s.count, s.release) for s in starts] == [(2, "r2")]


async def test_a_first_deploy_of_an_instances_app_uses_the_scheduler(
        host: FakeHost, participants: FakeParticipants, clock: trio.testing.MockClock
) -> None:
    """Without a placement yet, 3 instances are spread 2 + 1 over the two nodes."""
    _instances_release(host, 3)
    record = await _deploy_r2(host)
    assert record.status is m.Status.SUCCEEDED, record
    assert sorted(s.count for s in record.steps) == [1, 2]
    starts = sorted(message.count for _, message in participants.sent
                    if isinstance(message, msg.Start))
    assert starts == [1, 2]


def test_a_per_node_app_targets_every_eligible_node(host: FakeHost) -> None:
    """per_node apps: every up, online node of the groups, count 0 (the record's)."""
    spec = spec_from_json(host.state.releases["hello"][0].spec)
    assert targets(host.state, spec, "hello") == {"n1": 0, "n2": 0}


def test_an_autoscaled_app_targets_its_decided_count(host: FakeHost) -> None:
    """An autoscaled app deploys as an instances app at what its autoscaler decided (min
    before any decision), never per_node 1 on every node."""
    assert host.state.apply(cmd.SetScale(key="s", at=1.0, actor="t", app="hello",
                                         groups=("default",),
                                         auto={"min": 3, "max": 8, "target": 5}).to_json())["ok"]
    spec = spec_from_json(host.state.releases["hello"][0].spec)
    assert sum(targets(host.state, spec, "hello").values()) == 3
    host.state.apps["hello"].auto_instances = 5
    assert sum(targets(host.state, spec, "hello").values()) == 5
