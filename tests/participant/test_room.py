"""Tests for superagent.participant.scaletozero.make_room_for: fitting a cold start in the
node's capacity, against a stand-in for the agent's tables (no processes; ``go_idle`` is
replaced by one that stops the app's routed instances, or finds it busy). The real-process
behaviour is in test_coldstart.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from superagent.participant import scaletozero
from superagent.participant.errors import NoRoom
from superagent.participant.idle import ActivityWatch, ColdApp, Phase
from superagent.participant.instancestate import State


@dataclass
class _Config:
    app: str
    release: str = "r1"
    capacity: int = 0


@dataclass
class _Instance:
    config: _Config
    state: State = State.READY


@dataclass
class _Prepared:
    spec: Any


class _Store:
    def get(self, app: str, release: str) -> _Prepared:
        scale = type("Scale", (), {"idle_timeout": 60.0})()
        return _Prepared(spec=type("Spec", (), {"scale": scale})())


@dataclass
class _Proxy:
    in_flight: dict[str, int] = field(default_factory=dict)

    async def stats(self) -> dict[str, Any]:
        return {"requests": {}, "instances": {
            f"{app}-probe": {"app": app, "in_flight": n} for app, n in self.in_flight.items()}}


@dataclass
class _Agent:
    config: _Config
    instances: dict[str, _Instance] = field(default_factory=dict)
    routes: dict[str, list[str]] = field(default_factory=dict)
    standby: dict[str, list[str]] = field(default_factory=dict)
    cold: dict[str, ColdApp] = field(default_factory=dict)
    activity: ActivityWatch = field(default_factory=ActivityWatch)
    store: _Store = field(default_factory=_Store)
    proxy: _Proxy = field(default_factory=_Proxy)
    idled: list[str] = field(default_factory=list)
    busy: set[str] = field(default_factory=set)

    def serve(self, app: str, *states: State, routed: int | None = None,
              active_at: float = 0.0) -> None:
        """``app`` runs instances in these states, the first ``routed`` of them routed."""
        ids = [f"{app}@r1.{n}" for n in range(len(states))]
        for instance_id, state in zip(ids, states, strict=True):
            self.instances[instance_id] = _Instance(config=_Config(app=app), state=state)
        self.routes[app] = ids[:len(ids) if routed is None else routed]
        self.activity.observe(app, active_at, requests=0, in_flight=0)

    def waking(self, app: str, count: int = 1) -> None:
        self.cold[app] = ColdApp(app=app, release="r1",
                                 ids=tuple(f"{app}@r1.{n}" for n in range(count)),
                                 phase=Phase.STARTING)


@pytest.fixture
def idling(monkeypatch: pytest.MonkeyPatch) -> None:
    """go_idle as the real one ends: a busy app keeps running, else its routed and standby
    instances stop and it is idle."""
    async def go_idle(agent: _Agent, app: str) -> None:
        agent.idled.append(app)
        if app in agent.busy:
            return
        for instance_id in [*agent.routes.pop(app, []), *agent.standby.pop(app, [])]:
            agent.instances[instance_id].state = State.STOPPED
        agent.cold[app] = ColdApp(app=app, release="r1", ids=(), phase=Phase.IDLE)

    monkeypatch.setattr(scaletozero, "go_idle", go_idle)


async def test_two_cold_starts_at_once_one_fits_and_the_other_is_refused(
        idling: None) -> None:
    """Room for one: two apps woken together (both starting before either is checked)
    do not both give way to the other. The first checked starts; the second counts it."""
    agent = _Agent(config=_Config(app="", capacity=1))
    agent.waking("a")
    agent.waking("b")
    await scaletozero.make_room_for(agent, "a", 1)  # type: ignore[arg-type]
    with pytest.raises(NoRoom, match=r"node at capacity: 1/1 running"):
        await scaletozero.make_room_for(agent, "b", 1)  # type: ignore[arg-type]
    assert agent.idled == []

async def test_an_app_frees_only_the_instances_idling_stops(idling: None) -> None:
    """Idling stops an app's routed (and standby) instances; one it runs unrouted (a start
    not switched to yet) keeps running, so it is no room made: with only that app to
    idle, the start is refused at once and nothing is idled for nothing."""
    agent = _Agent(config=_Config(app="", capacity=2))
    agent.serve("web", State.READY, State.STARTING, routed=1)
    agent.waking("cold", 2)
    with pytest.raises(NoRoom, match=r"node at capacity: 2/2 running"):
        await scaletozero.make_room_for(agent, "cold", 2)  # type: ignore[arg-type]
    assert agent.idled == []
    agent.standby["web"] = ["web@r1.1"]  # a standby is stopped too: that makes room
    await scaletozero.make_room_for(agent, "cold", 2)  # type: ignore[arg-type]
    assert agent.idled == ["web"]

async def test_an_app_found_busy_while_idling_gives_way_to_the_next_one(
        idling: None) -> None:
    """The proxy's figures said the least recently used app had nothing in flight, but a
    request reached it while it was being idled (it stays up): the next app in line is
    idled instead, and the start fits."""
    agent = _Agent(config=_Config(app="", capacity=2))
    agent.serve("old", State.READY, active_at=0.0)
    agent.serve("new", State.READY, active_at=10.0)
    agent.busy.add("old")
    agent.waking("cold")
    await scaletozero.make_room_for(agent, "cold", 1)  # type: ignore[arg-type]
    assert agent.idled == ["old", "new"]
    assert agent.instances["old@r1.0"].state is State.READY



async def test_a_cold_start_taken_over_while_room_is_made_starts_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Making room can take a while (another app's instances stop); a deploy or a scaling
    that switches the app meanwhile takes it over (its idle record goes): the cold start
    then starts nothing rather than instances nobody routes."""
    agent = _Agent(config=_Config(app="", capacity=1))
    agent.serve("other", State.READY)
    agent.waking("cold")
    started: list[str] = []

    async def go_idle(agent: _Agent, app: str) -> None:
        agent.instances["other@r1.0"].state = State.STOPPED
        del agent.cold["cold"]  # what a switch of "cold" does

    async def start(app: str, release: str, count: int) -> None:
        started.append(app)
        raise AssertionError("started an app taken over")

    monkeypatch.setattr(scaletozero, "go_idle", go_idle)
    monkeypatch.setattr(agent, "start", start, raising=False)
    monkeypatch.setattr(agent, "persist", lambda: None, raising=False)
    await scaletozero.cold_start(agent, "cold")  # type: ignore[arg-type]
    assert started == []
