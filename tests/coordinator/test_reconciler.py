"""Tests for superagent.coordinator.reconciler: the leader's loop against fake participants.

The host is a fake holding a real ``ClusterState`` (commands apply at once) and a real
``Liveness``; each fake participant keeps instances with states and routes, answers the
signals like an agent (a switch refuses instances that are not ready, a stop of unknown
instances is refused) and heartbeats its compact status every second. Time is trio's
``MockClock`` with autojump, and the reconciler's wall clock follows it, so drain waits,
backoffs and heartbeats pass instantly and exactly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pytest
import trio
import trio.testing

from superagent.coordinator import commands as cmd
from superagent.coordinator.membership import Liveness
from superagent.coordinator.reconcile import NodeReport, Reported
from superagent.coordinator.reconcile_view import (
    eligible,
    idle_apps,
    reports_from,
    view_of,
    with_idle,
)
from superagent.coordinator.reconciler import (
    FAILING_AFTER,
    MAX_ACTIONS,
    RECONCILE_PERIOD,
    Reconciler,
    deployed_since,
)
from superagent.coordinator.scheduler import NodeInfo
from superagent.coordinator.state import ClusterState, Result
from superagent.rpc import messages as msg
from superagent.rpc.client import Participants
from superagent.rpc.errors import Refused, Unreachable
from tests.coordinator.helpers import (
    add_release,
    base,
    create_app,
    lifecycle,
    register,
    start_deploy,
)

R = TypeVar("R", bound=msg.Reply)
EPOCH = 1000.0  # the wall clock at virtual time 0
BEAT = 1.0  # heartbeat interval
DRAIN_WAIT = 5.0
TIMEOUT = 120.0  # virtual seconds for any condition


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def wall() -> float:
    return EPOCH + trio.current_time()


@dataclass
class Inst:
    app: str
    release: str
    state: str = "ready"


@dataclass
class FakeAgent:
    """One participant: instances, routes, prepared releases; answers like an agent."""

    node: str
    instances: dict[str, Inst] = field(default_factory=dict)
    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    prepared: set[tuple[str, str]] = field(default_factory=set)
    seq: int = 0
    start_delay: float = 0.5  # a start answers once the instances are ready
    start_state: str = "ready"  # what a started instance becomes

    def answer(self, message: msg.Signal[Any]) -> msg.Reply:
        match message:
            case msg.Prepare():
                self.prepared.add((message.app, message.release))
                return msg.PrepareReply(app=message.app, release=message.release,
                                        sha256=message.sha256, build_log="")
            case msg.Start():
                assert (message.app, message.release) in self.prepared, message
                started = []
                for _ in range(message.count):
                    self.seq += 1
                    name = f"{message.app}@{message.release}.{self.seq}"
                    self.instances[name] = Inst(message.app, message.release, self.start_state)
                    started.append(msg.StartedInstance(id=name, port=self.seq,
                                                       state=self.start_state))
                return msg.StartReply(app=message.app, release=message.release,
                                      instances=tuple(started))
            case msg.Switch():
                for name in message.instances:
                    inst = self.instances.get(name)
                    if inst is None or inst.state != "ready":
                        raise Refused(msg.ErrorReply(error=msg.ErrorCode.INSTANCE_NOT_READY,
                                                     status=409, detail=f"{name} not ready"))
                self.routes[message.app] = message.instances
                return msg.SwitchReply(app=message.app, instances=message.instances,
                                       version=self.seq)
            case msg.Drain():
                self._known(message.instances)
                return msg.DrainReply(remaining={i: 0 for i in message.instances})
            case msg.Stop():
                self._known(message.instances)
                for name in message.instances:
                    app = self.instances.pop(name).app
                    self.routes[app] = tuple(i for i in self.routes.get(app, ()) if i != name)
                return msg.StopReply(stopped=message.instances, in_flight_cut={})
        raise AssertionError(message)

    def _known(self, names: tuple[str, ...]) -> None:
        gone = [i for i in names if i not in self.instances]
        if gone:
            raise Refused(msg.ErrorReply(error=msg.ErrorCode.UNKNOWN_INSTANCE, status=404,
                                         detail=f"no instance {gone[0]}"))

    def heartbeat(self) -> dict[str, Any]:
        return {"instances": [{"id": name, "app": i.app, "release": i.release,
                               "state": i.state, "port": 1}
                              for name, i in self.instances.items()],
                "routes": {app: list(ids) for app, ids in self.routes.items()}}

    def status(self) -> msg.StatusReply:
        return msg.StatusReply(
            node=self.node, groups=("default",), offline=False, isolation={}, proxy={},
            routes=self.routes, debug_sessions={}, releases={}, figures={},
            instances=tuple(msg.InstanceStatus(
                app=i.app, release=i.release, instance=name, state=i.state, pid=1, port=1,
                restarts=0, last_exit_code=None, isolation=None, started_at=None,
                ready_at=None, create_time=None, figures={})
                for name, i in self.instances.items()))

    def running(self, app: str) -> list[str]:
        return sorted(n for n, i in self.instances.items() if i.app == app)


class FakeParticipants:
    """The fake agents behind ``Participants``; ``down`` ones answer nothing, ``refuse``
    makes a node refuse one signal type, ``hold`` makes a signal type block."""

    def __init__(self) -> None:
        self.agents: dict[str, FakeAgent] = {}
        self.sent: list[tuple[str, msg.Signal[Any]]] = []
        self.down: set[str] = set()
        self.refusing: dict[tuple[str, str], msg.ErrorReply] = {}
        self.hold: set[str] = set()

    def add(self, node: str) -> FakeAgent:
        agent = self.agents[address(node)] = FakeAgent(node)
        return agent

    def of(self, node: str, kind: str | None = None) -> list[msg.Signal[Any]]:
        return [m for a, m in self.sent if a == address(node) and kind in (None, m.type)]

    async def signal(self, address: str, message: msg.Signal[R], *, timeout: float) -> R:
        await trio.sleep(0.01)
        if address in self.down:
            raise Unreachable(f"participant {address}: connection refused", address=address)
        self.sent.append((address, message))
        if message.type in self.hold:
            await trio.sleep_forever()
        refusal = self.refusing.get((address, message.type))
        if refusal is not None:
            raise Refused(refusal)
        agent = self.agents[address]
        if isinstance(message, msg.Start):
            await trio.sleep(agent.start_delay)
        return cast(R, agent.answer(message))

    async def status(self, address: str, *, timeout: float = 60.0) -> msg.StatusReply:
        await trio.sleep(0.01)
        if address in self.down:
            raise Unreachable(f"participant {address}: connection refused", address=address)
        return self.agents[address].status()


def address(node: str) -> str:
    return f"10.0.0.{node.lstrip('n')}:7000"


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
        self.liveness = Liveness(10.0, RECONCILE_PERIOD)  # observed by the rounds alone
        self.leading = True
        self.current_term = 3
        self.keys = iter(range(1, 10**9))

    @property
    def participants(self) -> Participants:
        return self.fake

    def is_leader(self) -> bool:
        return self.leading

    def term(self) -> int:
        return self.current_term

    def read(self, reader: Callable[[ClusterState], Any]) -> Any:
        return reader(self.state)

    async def submit(self, command: cmd.Command) -> Result:
        await trio.sleep(0.001)
        return self.state.apply(command.to_json())

    def command(self, cls: type[cmd.Command], *, actor: str, key: str | None = None,
                **fields: Any) -> cmd.Command:
        return cls(key=key or f"host-{next(self.keys)}", at=wall(), actor=actor, **fields)

    def apply(self, command: cmd.Command) -> Result:
        result = self.state.apply(command.to_json())
        assert result["ok"], result
        return result


class Scenario:
    """A host, its participants, the reconciler and heartbeats, run in a nursery."""

    def __init__(self) -> None:
        self.fake = FakeParticipants()
        self.host = FakeHost(self.fake)
        self.reconciler = Reconciler(self.host, drain_wait=DRAIN_WAIT, drain_grace=1.0,
                                     wall=wall)
        self.silent: set[str] = set()  # nodes whose heartbeats stop
        self.load: dict[str, float] = {}  # app -> in-flight requests, spread over its ready

    def node(self, name: str, groups: tuple[str, ...] = ("default",), capacity: int = 8
             ) -> FakeAgent:
        agent = self.fake.add(name)
        self.host.apply(register(name, address=address(name), groups=groups,
                                 capacity=capacity, at=wall()))
        self.host.liveness.beat(name, trio.current_time(), agent.heartbeat())
        return agent

    def app(self, name: str = "hello", *, instances: int | None = None, per_node: int = 1,
            groups: tuple[str, ...] = ("default",), scaled: bool = True) -> None:
        """A deployed app (its release r1 serving) at the given scale (``scaled`` false:
        its manifest's, with no scaling in progress)."""
        self.host.apply(create_app(name))
        self.host.apply(add_release(name))
        self.host.state.apps[name].current_release = "r1"
        if scaled:
            self.scale(name, instances=instances, per_node=per_node, groups=groups)

    def scale(self, app: str = "hello", *, instances: int | None = None, per_node: int = 1,
              groups: tuple[str, ...] = ("default",)) -> str:
        result = self.host.apply(cmd.SetScale(**base(at=wall()), app=app, groups=groups,
                                              per_node=per_node, instances=instances))
        return str(result["scale_id"])

    async def heartbeats(self) -> None:
        while True:
            for agent in self.fake.agents.values():
                if agent.node not in self.silent and address(agent.node) not in self.fake.down:
                    self.host.liveness.beat(agent.node, trio.current_time(),
                                            self._with_load(agent.heartbeat()))
            await trio.sleep(BEAT)

    def _with_load(self, status: dict[str, Any]) -> dict[str, Any]:
        for entry in status["instances"]:
            ready = sum(len([n for n in a.running(entry["app"])
                             if a.instances[n].state == "ready"])
                        for a in self.fake.agents.values())
            entry["in_flight"] = self.load.get(entry["app"], 0.0) / max(ready, 1)
        return status

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Scenario]:
        self.host.liveness.lead(trio.current_time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.heartbeats)
            await nursery.start(self.reconciler.run)
            yield self
            nursery.cancel_scope.cancel()

    async def until(self, condition: Callable[[], bool], what: str,
                    timeout: float = TIMEOUT) -> None:
        with trio.fail_after(timeout):
            while not condition():
                await trio.sleep(0.1)

    def agent(self, node: str) -> FakeAgent:
        return self.fake.agents[address(node)]

    def counts(self, app: str = "hello") -> dict[str, int]:
        return {a.node: len(a.running(app)) for a in self.fake.agents.values()
                if a.running(app)}

    def routed(self, app: str = "hello") -> dict[str, int]:
        return {a.node: len(a.routes.get(app, ())) for a in self.fake.agents.values()
                if a.routes.get(app)}

    def last_scaling(self, app: str = "hello") -> dict[str, Any] | None:
        return self.host.state.apps[app].last_scaling


# ---------------------------------------------------------------------- the loop


async def test_per_node_app_is_started_and_routed_on_every_eligible_node(
        clock: trio.testing.MockClock) -> None:
    """per_node = 2 on two nodes: each gets two ready instances and routes to them."""
    s = Scenario()
    s.node("n1"), s.node("n2")
    s.app(per_node=2)
    async with s.running():
        await s.until(lambda: s.routed() == {"n1": 2, "n2": 2}, "routed")
        assert s.host.state.placement["hello"] == {"n1": 2, "n2": 2}
        await s.until(lambda: s.last_scaling() is not None, "scaling finished")
    assert s.last_scaling()["outcome"] == "converged"  # type: ignore[index]
    for node in ("n1", "n2"):
        kinds = [m.type for m in s.fake.of(node)]
        assert kinds == ["prepare", "start", "switch"], kinds
        start = s.fake.of(node, "start")[0]
        assert isinstance(start, msg.Start) and start.count == 2
        assert all(m.term == 3 and m.id.startswith(f"rc/3/{node}/hello/")
                   for m in s.fake.of(node))
        prepare = s.fake.of(node, "prepare")[0]
        assert isinstance(prepare, msg.Prepare) and prepare.keep == ("r1",)


async def test_instances_scale_out_and_in(clock: trio.testing.MockClock) -> None:
    """instances = 3 over two nodes, then 1: grown, then shrunk by switch, drain, stop;
    each scaling ends converged."""
    s = Scenario()
    s.node("n1"), s.node("n2")
    s.app(instances=1)
    async with s.running():
        await s.until(lambda: sum(s.routed().values()) == 1, "one instance")
        first = s.counts()
        scale_id = s.scale(instances=3)
        await s.until(lambda: sum(s.routed().values()) == 3, "three")
        assert sorted(s.counts().values()) == [1, 2]
        await s.until(lambda: (s.last_scaling() or {}).get("id") == scale_id, "finished")
        assert s.last_scaling()["outcome"] == "converged"  # type: ignore[index]
        scale_id = s.scale(instances=1)
        await s.until(lambda: sum(s.counts().values()) == 1, "back to one")
        await s.until(lambda: (s.last_scaling() or {}).get("id") == scale_id, "finished")
        assert s.routed() == s.counts() == first  # sticky: the original node keeps it
    shrunk = next(n for n in ("n1", "n2") if s.fake.of(n, "stop"))
    kinds = [m.type for m in s.fake.of(shrunk)][-3:]
    assert kinds == ["switch", "drain", "stop"], kinds


async def test_a_joining_node_gets_its_groups_apps(clock: trio.testing.MockClock) -> None:
    """A node registering in the app's group gets its per_node instances; one in another
    group gets none."""
    s = Scenario()
    s.node("n1", groups=("web",))
    s.app(groups=("web",))
    async with s.running():
        await s.until(lambda: s.routed() == {"n1": 1}, "n1 serves")
        s.node("n2", groups=("web",))
        s.node("n3", groups=("batch",))
        await s.until(lambda: s.routed() == {"n1": 1, "n2": 1}, "n2 serves")
        await trio.sleep(10)
        assert not s.fake.of("n3")


async def test_a_dead_node_s_instances_move_to_the_survivors(
        clock: trio.testing.MockClock) -> None:
    """instances = 2 on three nodes; the node of one dies (marked down): a survivor
    starts its replacement, and the app runs twice again."""
    s = Scenario()
    for n in ("n1", "n2", "n3"):
        s.node(n)
    s.app(instances=2)
    async with s.running():
        await s.until(lambda: sum(s.routed().values()) == 2, "two")
        victim = sorted(s.counts())[0]
        s.fake.down.add(address(victim))
        s.host.apply(cmd.NodeDown(**base(at=wall()), node=victim))
        await s.until(lambda: sum(v for n, v in s.routed().items() if n != victim) == 2,
                      "two on the survivors")
        assert victim not in s.host.state.placement["hello"]


async def test_a_draining_node_keeps_its_work_for_the_drain_wait_then_hands_it_over(
        clock: trio.testing.MockClock) -> None:
    """Draining n1: nothing moves for drain_wait seconds; then the instances app starts
    elsewhere before n1's instance stops, and n1 ends with nothing running."""
    s = Scenario()
    s.node("n1"), s.node("n2"), s.node("n3")
    s.app("solo", instances=1)
    s.app("every", per_node=1)
    async with s.running():
        await s.until(lambda: s.counts("every") == {"n1": 1, "n2": 1, "n3": 1}, "every")
        await s.until(lambda: sum(s.routed("solo").values()) == 1, "solo")
        holder = next(iter(s.counts("solo")))
        drained_at = trio.current_time()
        s.host.apply(lifecycle(holder, "draining", at=wall()))
        sent = len(s.fake.sent)
        await trio.sleep(DRAIN_WAIT - 1.5)
        assert len(s.fake.sent) == sent, s.fake.sent[sent:]
        await s.until(lambda: not s.agent(holder).instances, "drained")
        assert trio.current_time() - drained_at >= DRAIN_WAIT
        assert sum(s.routed("solo").values()) == 1 and holder not in s.routed("solo")
        # the replacement was started before the drained node's instance was stopped
        order = [(a, m.type, getattr(m, "app", "")) for a, m in s.fake.sent[sent:]]
        first_start = next(i for i, (a, t, app) in enumerate(order)
                           if t == "start" and app == "solo")
        solo_stop = next(i for i, (a, t, app) in enumerate(order)
                         if t == "stop" and a == address(holder)
                         and any(x.startswith("solo@") for x in
                                 cast(msg.Stop, s.fake.sent[sent + i][1]).instances))
        assert first_start < solo_stop, order
        # online again: refilled
        s.host.apply(lifecycle(holder, "online", at=wall()))
        await s.until(lambda: s.counts("every").get(holder) == 1, "refilled")


async def test_a_failing_node_backs_off_and_the_scaling_ends_short(
        clock: trio.testing.MockClock) -> None:
    """A node that refuses every start is retried with growing pauses, the app's placement
    reason says so, and the scaling ends ``short`` with that reason."""
    s = Scenario()
    s.node("n1")
    s.fake.refusing[(address("n1"), "start")] = msg.ErrorReply(
        error=msg.ErrorCode.START_FAILED, status=500, detail="exit 1 before ready")
    s.app(per_node=1)
    async with s.running():
        await s.until(lambda: s.last_scaling() is not None, "scaling ended", timeout=600)
        assert s.last_scaling()["outcome"] == "short"  # type: ignore[index]
        assert "exit 1 before ready" in s.last_scaling()["reason"]  # type: ignore[index]
        assert "keep failing" in s.host.state.placement_reason["hello"]
        await trio.sleep(120)
    starts = s.fake.of("n1", "start")
    # 1 + 2 + 4 + ... up to 60 s between attempts: a handful in ~3 minutes, not 180
    assert FAILING_AFTER <= len(starts) <= 10, len(starts)


async def test_failures_of_a_node_that_no_longer_has_work_are_forgotten(
        clock: trio.testing.MockClock) -> None:
    """A node keeps refusing starts; once the app's instance is placed elsewhere (the node
    drained), its failures no longer show in the placement reason."""
    s = Scenario()
    s.node("n1"), s.node("n2")
    s.fake.refusing[(address("n1"), "start")] = msg.ErrorReply(
        error=msg.ErrorCode.START_FAILED, status=500, detail="exit 1 before ready")
    s.app(per_node=1)
    async with s.running():
        await s.until(lambda: "keep failing" in s.host.state.placement_reason.get("hello", ""),
                      "failing", timeout=600)
        s.host.apply(lifecycle("n1", "draining", at=wall()))
        await s.until(lambda: not s.host.state.placement_reason.get("hello"), "forgotten")
        assert s.host.state.placement["hello"] == {"n2": 1}


async def test_losing_the_leadership_cancels_what_is_in_flight(
        clock: trio.testing.MockClock) -> None:
    """A start hangs; the leadership goes: it is cancelled and nothing more is sent; a new
    term's leader signals with its own term."""
    s = Scenario()
    s.node("n1")
    s.fake.hold.add("start")
    s.app()
    async with s.running():
        await s.until(lambda: bool(s.fake.of("n1", "start")), "start sent")
        s.host.leading = False
        await s.until(lambda: not s.reconciler._flight, "cancelled")
        sent = len(s.fake.sent)
        await trio.sleep(10)
        assert len(s.fake.sent) == sent
        s.fake.hold.clear()
        s.host.current_term = 4
        s.host.leading = True
        await s.until(lambda: s.routed() == {"n1": 1}, "routed by the new term")
    assert {m.term for _, m in s.fake.sent[sent:]} == {4}


async def test_actions_run_at_most_max_actions_at_once(
        clock: trio.testing.MockClock) -> None:
    """Ten nodes to grow with starts that hang: MAX_ACTIONS act, the others wait."""
    s = Scenario()
    nodes = [f"n{i}" for i in range(1, 11)]
    for node in nodes:
        s.node(node)
    s.fake.hold.add("start")
    s.app()
    async with s.running():
        await trio.sleep(30)
        started = [n for n in nodes if s.fake.of(n, "start")]
        assert len(started) == MAX_ACTIONS
        assert sum(len(s.fake.of(n, "prepare")) for n in nodes) == MAX_ACTIONS
        assert all(len(s.fake.of(n)) <= 2 for n in nodes)  # one action per node at a time


async def test_an_app_under_deploy_is_left_alone(clock: trio.testing.MockClock) -> None:
    """While a deploy of the app runs, the reconciler sends it nothing."""
    s = Scenario()
    s.node("n1")
    s.app(scaled=False)
    s.host.apply(cmd.StartDeploy(**base(at=wall()), app="hello", deploy_id="d1",
                                 record=_record()))
    async with s.running():
        await trio.sleep(10)
    assert s.fake.sent == []
    assert s.host.state.placement["hello"] == {"n1": 1}


async def test_reports_older_than_a_finished_deploy_are_not_acted_on(
        clock: trio.testing.MockClock) -> None:
    """A deploy starts an instance; the node's last report, older, shows none. Once the
    deploy is over the reconciler waits for a fresh heartbeat instead of starting another."""
    s = Scenario()
    agent = s.node("n1")
    s.app(scaled=False)
    s.host.apply(cmd.StartDeploy(**base(at=wall()), app="hello", deploy_id="d1",
                                 record=_record()))
    async with s.running():
        await trio.sleep(3)
        s.silent.add("n1")  # its next heartbeat is late
        agent.instances["hello@r1.1"] = Inst("hello", "r1")  # what the deploy started
        agent.routes["hello"] = ("hello@r1.1",)
        del s.host.state.deploys["d1"]  # the deploy is over
        await trio.sleep(4)
        assert s.fake.sent == []
        s.silent.clear()
        await trio.sleep(10)
    assert s.fake.sent == []


async def test_a_deploy_that_begins_and_ends_between_two_rounds_is_waited_for_too(
        clock: trio.testing.MockClock) -> None:
    """A deploy short enough that no round saw it running still makes the reconciler
    wait for a fresh heartbeat: the node's last report, older than the deploy, shows none
    of what the deploy started, and acting on it would start a second instance."""
    s = Scenario()
    agent = s.node("n1")
    s.host.apply(create_app("hello"))
    s.host.apply(add_release("hello"))  # never deployed: nothing to place yet
    async with s.running():
        await trio.sleep(3)
        assert s.fake.sent == []
        s.silent.add("n1")  # its next heartbeat is late
        _a_whole_deploy(s, agent)  # between two rounds
        await trio.sleep(4)
        assert s.fake.sent == []
        s.silent.clear()
        await trio.sleep(10)
    assert s.fake.sent == []
    assert s.host.state.placement["hello"] == {"n1": 1}


async def test_a_deploy_before_a_new_leader_s_first_round_is_waited_for_too(
        clock: trio.testing.MockClock) -> None:
    """A deploy that begins and ends right after an election, before the new leader's
    first round: that round has no earlier one to compare with, and waits for a fresh
    heartbeat for every app with a deploy on record rather than start a second instance."""
    s = Scenario()
    agent = s.node("n1")
    s.host.apply(create_app("hello"))
    s.host.apply(add_release("hello"))
    async with s.running():
        s.silent.add("n1")  # the report it has is from before the deploy
        _a_whole_deploy(s, agent)  # before the leader's first round
        await trio.sleep(4)
        assert s.fake.sent == []
        s.silent.clear()
        await trio.sleep(10)
    assert s.fake.sent == []


def _a_whole_deploy(s: Scenario, agent: FakeAgent) -> None:
    """The first deploy of hello, all at once: started, its instance up on n1 and routed,
    the release serving, the deploy over."""
    s.host.apply(cmd.StartDeploy(**base(at=wall()), app="hello", deploy_id="d1",
                                 record=_record()))
    agent.instances["hello@r1.1"] = Inst("hello", "r1")
    agent.routes["hello"] = ("hello@r1.1",)
    s.host.state.apps["hello"].current_release = "r1"
    s.host.state.deploys["d1"].finished = True


def test_deployed_since_names_the_apps_of_deploys_the_last_round_did_not_see() -> None:
    before = frozenset({("d1", "hello")})
    assert deployed_since(before | {("d2", "web"), ("d3", "hello")}, before) == {"web", "hello"}
    assert deployed_since(before, before) == set()
    assert deployed_since(before, None) == {"hello"}  # a leader's first round: all of them


async def test_a_ready_instance_no_route_reaches_is_routed(
        clock: trio.testing.MockClock) -> None:
    """A ready instance of the serving release left unrouted is switched in."""
    s = Scenario()
    agent = s.node("n1")
    agent.instances["hello@r1.7"] = Inst("hello", "r1")
    s.host.liveness.beat("n1", 0.0, agent.heartbeat())
    s.app()
    async with s.running():
        await s.until(lambda: agent.routes.get("hello") == ("hello@r1.7",), "routed")
    assert [m.type for _, m in s.fake.sent] == ["switch"]


async def test_a_started_instance_that_is_not_ready_is_not_switched_in_twice(
        clock: trio.testing.MockClock) -> None:
    """A start whose instance is unhealthy at the switch fails; the node is not started
    again while its report shows the instance live."""
    s = Scenario()
    agent = s.node("n1")
    agent.start_state = "unhealthy"
    s.app()
    async with s.running():
        await trio.sleep(30)
    assert len(s.fake.of("n1", "start")) == 1
    assert agent.running("hello") == ["hello@r1.1"]


async def test_instances_of_a_deleted_app_are_stopped(clock: trio.testing.MockClock) -> None:
    """An instance of an app the state no longer has is drained and stopped."""
    s = Scenario()
    agent = s.node("n1")
    agent.instances["gone@r1.1"] = Inst("gone", "r1")
    agent.routes["gone"] = ("gone@r1.1",)
    async with s.running():
        await s.until(lambda: not agent.instances, "stopped")
    assert [m.type for _, m in s.fake.sent] == ["switch", "drain", "stop"]


# ---------------------------------------------------------------------- the pure view


def test_a_draining_node_is_eligible_only_within_the_drain_wait() -> None:
    """up + online: eligible; draining: until drain_wait after changed_at; down: never."""
    state = ClusterState()
    assert state.apply(register("n1", at=100.0).to_json())["ok"]
    node = state.nodes["n1"]
    assert eligible(node, wall=1e9, drain_wait=5.0)
    assert state.apply(lifecycle("n1", "draining", at=200.0).to_json())["ok"]
    assert eligible(node, wall=204.9, drain_wait=5.0)
    assert not eligible(node, wall=205.0, drain_wait=5.0)
    node.lifecycle, node.up = "online", False
    assert not eligible(node, wall=300.0, drain_wait=5.0)


def test_the_view_carries_effective_scales_busy_apps_and_scalings() -> None:
    """The view names each app's serving release and scaling, and the effective scale of
    the apps that serve (one never deployed is not placed)."""
    state = ClusterState()
    for command in (create_app(), add_release(), create_app("idle"), register("n1"),
                    cmd.SetScale(**base(), app="hello", groups=("default",), instances=3)):
        assert state.apply(command.to_json())["ok"]
    state.apps["hello"].current_release = "r1"
    view = view_of(state, wall=2000.0, drain_wait=5.0)
    assert view.apps == ("hello", "idle")
    assert [(s.app, s.instances, s.groups) for s in view.scales] == [
        ("hello", 3, ("default",))]
    assert view.nodes[0].eligible and view.addresses == {"n1": "10.0.0.1:7000"}
    assert view.releases == {"hello": "r1", "idle": None} and view.busy == frozenset()
    assert set(view.scaling) == {"hello"}
    assert view.deploys == frozenset()
    for command in (add_release("idle"), start_deploy("idle")):
        assert state.apply(command.to_json())["ok"]
    assert view_of(state, wall=2000.0, drain_wait=5.0).deploys == {("d1", "idle")}


def test_a_draining_node_that_holds_nothing_gets_nothing() -> None:
    """Within its drain wait a draining node keeps what it holds; one whose placement is
    already empty (its wait begun again by a re-registration) is not eligible."""
    state = ClusterState()
    for command in (create_app(), register("n1", at=100.0), register("n2", at=100.0),
                    lifecycle("n1", "draining", at=200.0), lifecycle("n2", "draining", at=200.0),
                    cmd.SetPlacement(**base(), app="hello", placement={"n1": 1})):
        assert state.apply(command.to_json())["ok"]
    view = view_of(state, wall=201.0, drain_wait=5.0)
    assert [(n.name, n.eligible) for n in view.nodes] == [("n1", True), ("n2", False)]


def test_reports_skip_what_a_heartbeat_garbles() -> None:
    """Malformed instance entries and routes are dropped, the rest kept."""
    reports = reports_from({"n1": {
        "instances": [{"id": "a@r1.1", "app": "a", "release": "r1", "state": "ready"},
                      {"id": "", "app": "a", "release": "r1", "state": "ready"},
                      "junk", {"id": "a@r1.2", "app": "a"}],
        "routes": {"a": ["a@r1.1", 7], "b": "nope"}}, "n2": {}})
    assert reports["n1"] == NodeReport(
        node="n1", instances=(Reported(id="a@r1.1", app="a", release="r1", state="ready"),),
        routes={"a": ("a@r1.1",)})
    assert reports["n2"].instances == ()


def test_the_apps_a_node_runs_idle_come_from_its_report() -> None:
    """An app is idle on a node when every instance reported there, stopping or stopped
    ones aside, is idle; the scheduler's nodes get them, a node not heard from none."""
    def entry(instance: str, state: str) -> dict[str, str]:
        return {"id": instance, "app": instance.split("@")[0],
                "release": instance.split("@")[1].split(".")[0], "state": state}

    reports = reports_from({"n1": {"instances": [
        entry("a@r1.1", "idle"), entry("a@r1.2", "idle"),
        entry("b@r1.1", "idle"), entry("b@r2.3", "starting"),  # waking: it runs
        entry("c@r1.1", "idle"), entry("c@r1.2", "stopped"), entry("c@r1.3", "stopping"),
        entry("d@r1.1", "ready"), entry("e@r1.1", "stopped")]}})
    assert idle_apps(reports["n1"]) == {"a", "c"}
    nodes = [NodeInfo(name=n, groups=frozenset({"default"}), capacity=2, eligible=True)
             for n in ("n1", "n2")]
    assert [n.idle for n in with_idle(nodes, reports)] == [frozenset({"a", "c"}), frozenset()]


async def test_idle_apps_leave_room_to_the_others_but_keep_their_place(
        clock: trio.testing.MockClock) -> None:
    """On a node of capacity 2 running a1 and a2, an app after them gets no room; once
    both report idle, it gets the one place their reserve leaves and starts there, while
    a1 and a2 stay placed (and stopped: nothing wakes them)."""
    s = Scenario()
    n1 = s.node("n1", capacity=2)
    s.app("a1", instances=1)
    s.app("a2", instances=1)
    async with s.running():
        await s.until(lambda: s.counts("a1") == s.counts("a2") == {"n1": 1}, "both running")
        s.app("web", instances=1)
        await s.until(lambda: "no room" in s.host.state.placement_reason.get("web", ""),
                      "web short")
        for inst in n1.instances.values():
            inst.state = "idle"
        await s.until(lambda: s.counts("web") == {"n1": 1}, "web running")
        assert s.host.state.placement["a1"] == s.host.state.placement["a2"] == {"n1": 1}
        assert s.host.state.placement_reason.get("web", "") == ""
        starts = [m.app for m in s.fake.of("n1", "start") if isinstance(m, msg.Start)]
        assert sorted(starts) == ["a1", "a2", "web"]  # a1 and a2 started once, at first


async def _web_beside_idle_apps(s: Scenario) -> None:
    """n1 (capacity 2) runs a1 and a2, both idle, and web; n2 (capacity 1) joined and had
    its rounds: web stays on n1 only while the idle facts are known."""
    n1 = s.node("n1", capacity=2)
    s.app("a1", instances=1)
    s.app("a2", instances=1)
    await s.until(lambda: s.counts("a1") == s.counts("a2") == {"n1": 1}, "both running")
    for inst in n1.instances.values():
        inst.state = "idle"
    s.app("web", instances=1)
    await s.until(lambda: s.counts("web") == {"n1": 1}, "web running")
    s.node("n2", capacity=1)
    rounds = s.reconciler.rounds
    await s.until(lambda: s.reconciler.rounds >= rounds + 2, "n2 placed for")


@pytest.mark.parametrize("rounds_before_lead", [0, 3])
async def test_a_new_leader_places_with_the_idle_facts_once_it_heard_the_nodes(
        clock: trio.testing.MockClock, rounds_before_lead: int) -> None:
    """A new leader has no heartbeat yet: placing at once, it would count the idle apps
    as running and move an app off their node for good (placement is sticky). It waits
    for each eligible node's first heartbeat (at most the liveness timeout), so web stays
    where it runs; and before the watch loop took up the leadership (Liveness.lead), when
    that wait has not begun, its rounds do nothing."""
    s = Scenario()
    async with s.running():
        await _web_beside_idle_apps(s)
        assert s.host.state.placement["web"] == {"n1": 1}
        s.silent.update({"n1", "n2"})  # the new leader hears nobody at first
        s.host.liveness.follow()
        rounds = s.reconciler.rounds
        await s.until(lambda: s.reconciler.rounds >= rounds + rounds_before_lead,
                      "rounds before lead()")
        s.host.liveness.lead(trio.current_time())
        rounds = s.reconciler.rounds
        await s.until(lambda: s.reconciler.rounds >= rounds + 2, "rounds without heartbeats")
        s.silent.clear()
        rounds = s.reconciler.rounds
        await s.until(lambda: s.reconciler.rounds >= rounds + 3, "rounds with heartbeats")
        assert s.host.state.placement["web"] == {"n1": 1}
        assert not [m for m in s.fake.of("n2", "start") if isinstance(m, msg.Start)]


async def test_after_a_stall_of_the_leader_the_reconciler_still_hears_its_nodes(
        clock: trio.testing.MockClock) -> None:
    """The leader does not run for 20 s (twice the liveness timeout), and its first round
    after that comes before the heartbeats sent meanwhile are read. Counting the stall as
    the nodes' silence, it would find no node heard and count the idle apps as running,
    moving web off n1 for good."""
    s = Scenario()
    async with s.running():
        await _web_beside_idle_apps(s)
        s.silent.update({"n1", "n2"})  # their beats wait unread until after the stall
        rounds = s.reconciler.rounds
        clock.jump(20.0)
        await s.until(lambda: s.reconciler.rounds >= rounds + 1, "a round after the stall")
        s.silent.clear()
        for node in ("n1", "n2"):  # the queued beats, read right after the stall
            s.host.liveness.beat(node, trio.current_time(), s.agent(node).heartbeat())
        rounds = s.reconciler.rounds
        await s.until(lambda: s.reconciler.rounds >= rounds + 3, "rounds with heartbeats")
        assert s.host.state.placement["web"] == {"n1": 1}
        assert not [m for m in s.fake.of("n2", "start") if isinstance(m, msg.Start)]


def _record() -> dict[str, Any]:
    from tests.coordinator.helpers import deploy_record
    return deploy_record(nodes=("n1",))


# ---------------------------------------------------------------------- autoscaling


async def test_an_autoscaled_app_follows_its_load_up_and_down_without_flapping(
        clock: trio.testing.MockClock) -> None:
    """min 1, max 6, target 5 in-flight per instance: a load of 20 brings 4 instances
    (one step at a time within the cooldowns, never down on the way up), its end brings
    them back to 1; every decision is an Autoscale in the audit log with its inputs."""
    s = Scenario()
    s.node("n1"), s.node("n2")
    s.app(scaled=False)
    s.host.apply(cmd.SetScale(**base(at=wall()), app="hello", groups=("default",),
                              auto={"min": 1, "max": 6, "target": 5}))
    seen: list[int] = []

    async def watch() -> None:
        while True:
            total = sum(s.counts().values())
            if not seen or seen[-1] != total:
                seen.append(total)
            await trio.sleep(0.5)

    async with s.running(), trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await s.until(lambda: sum(s.counts().values()) == 1, "the min instance")
        s.load["hello"] = 20.0
        await s.until(lambda: sum(s.counts().values()) == 4 and not s.fake.hold,
                      "4 instances for a load of 20")
        await trio.sleep(120)  # the load holds: nothing more moves
        assert sum(s.counts().values()) == 4
        peak = len(seen)
        s.load["hello"] = 0.0
        await s.until(lambda: sum(s.counts().values()) == 1, "back to min",
                      timeout=600)
        nursery.cancel_scope.cancel()
    up, down = seen[:peak], seen[peak - 1:]
    assert up == sorted(up) and down == sorted(down, reverse=True), seen
    decisions = [e["outcome"] for e in s.host.state.audit if e["type"] == "autoscale"]
    assert decisions[0].startswith("1 -> 2 instances: scale up: in_flight 20.00 per instance")
    assert all('"load":' in d and '"samples":' in d for d in decisions), decisions
    assert len(decisions) <= 5, decisions  # 1->2->4 (at most doubling), then down


async def test_an_app_the_placement_cannot_hold_keeps_what_it_runs(
        clock: trio.testing.MockClock) -> None:
    """Apps take room in name order: a later app that takes a full node's room first
    leaves the earlier one short, and that one keeps its serving instance (a shrink would
    stop it for nothing); its reason says why."""
    s = Scenario()
    s.node("n1", capacity=1)
    s.app("zshop", instances=1)
    async with s.running():
        await s.until(lambda: s.counts("zshop") == {"n1": 1}, "zshop running")
        s.app("aaa", instances=1)
        await s.until(lambda: s.host.state.placement_reason.get("zshop", ""),
                      "zshop's placement to fall short")
        await trio.sleep(30)  # rounds go by: nothing stops zshop
        assert s.counts("zshop") == {"n1": 1}
        assert not [m for m in s.fake.of("n1", "stop")
                    if any(i.startswith("zshop@") for i in m.instances)]
    assert "no room" in s.host.state.placement_reason["zshop"]
