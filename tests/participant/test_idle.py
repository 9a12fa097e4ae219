"""The scale-to-zero record and the activity watch (``participant/idle.py``)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from superagent.participant.errors import IllegalTransition
from superagent.participant.idle import (
    FAILED_RETRY,
    ActivityWatch,
    ColdApp,
    Event,
    Evictable,
    Phase,
    Room,
    app_counts,
    make_room,
)


def record(phase: Phase = Phase.IDLE) -> ColdApp:
    return ColdApp(app="web", release="r1", ids=("web@r1.1",), phase=phase)


def test_the_table_allows_the_cycle_and_names_an_illegal_move() -> None:
    """stopping -> idle -> starting -> serving; a wake while serving names phase and event."""
    cold = record(Phase.STOPPING)
    assert cold.on(Event.STOPPED) is Phase.IDLE
    assert cold.on(Event.WAKE) is Phase.STARTING
    assert cold.on(Event.READY) is Phase.SERVING
    with pytest.raises(IllegalTransition, match="from serving on wake"):
        cold.on(Event.WAKE)


def test_a_wake_while_stopping_is_kept_for_after_the_stop() -> None:
    """A request during the stop does not start a second time: it marks the record."""
    cold = record(Phase.STOPPING)
    assert cold.wake(0.0) == (True, "")
    assert cold.phase is Phase.STOPPING and cold.wanted


def test_a_failed_start_refuses_wakes_for_a_while_then_starts_again() -> None:
    """Within FAILED_RETRY of a failure a wake is refused with the reason; after, it starts."""
    cold = record()
    cold.wake(10.0)
    cold.on(Event.FAILED, now=10.0, reason="exit 3")
    assert cold.state == "idle"
    assert cold.wake(10.0 + FAILED_RETRY - 0.1) == (False, "exit 3")
    assert cold.wake(10.0 + FAILED_RETRY) == (True, "")
    assert cold.phase is Phase.STARTING and cold.state == "starting"


def test_a_persisted_record_comes_back_idle() -> None:
    """A start under way died with the agent: the record is idle again, reason kept."""
    cold = record(Phase.STARTING)
    cold.reason = "boom"
    again = ColdApp.from_json(cold.to_json())
    assert (again.phase, again.ids, again.reason) == (Phase.IDLE, cold.ids, "boom")


async def test_an_app_is_due_only_after_its_timeout_without_traffic(
        autojump_clock: trio.testing.MockClock) -> None:
    """Requests answered or in flight push the idle time; silence for the timeout is due."""
    watch = ActivityWatch()
    timeouts = {"web": 5.0, "api": 0.0}
    watch.observe("web", trio.current_time(), requests=0, in_flight=0)
    watch.observe("api", trio.current_time(), requests=0, in_flight=0)
    await trio.sleep(4.0)
    watch.observe("web", trio.current_time(), requests=3, in_flight=0)  # traffic at 4 s
    await trio.sleep(4.0)
    watch.observe("web", trio.current_time(), requests=3, in_flight=1)  # a tunnel open
    await trio.sleep(4.5)
    watch.observe("web", trio.current_time(), requests=3, in_flight=0)
    assert watch.due(trio.current_time(), timeouts) == []
    await trio.sleep(5.0)
    assert watch.due(trio.current_time(), timeouts) == ["web"]  # never the one at 0
    watch.touch("web", trio.current_time())
    assert watch.due(trio.current_time(), timeouts) == []


def test_app_counts_adds_statuses_and_instances() -> None:
    """Merged proxy figures -> requests answered and in flight, per app."""
    stats = {"requests": {("web", 200): 3, ("web", 503): 1, ("api", 200): 2},
             "instances": {"web@r1.1": {"app": "web", "in_flight": 1},
                           "web@r1.2": {"app": "web", "in_flight": 2}}}
    assert app_counts(stats) == ({"web": 4, "api": 2}, {"web": 3})


def app(name: str, active_at: float, instances: int = 1, in_flight: int = 0) -> Evictable:
    return Evictable(app=name, instances=instances, active_at=active_at, in_flight=in_flight)


def test_a_cold_start_that_fits_idles_nothing() -> None:
    """Room for the start: nothing to idle, whatever the candidates."""
    room = make_room(capacity=3, running=1, wanted=2, candidates=[app("a", 0.0)])
    assert room == Room() and room.fits


def test_the_least_recently_used_apps_go_first_and_just_enough_of_them() -> None:
    """Two instances to free: the oldest apps first (ties by name), stopping once enough
    room is made; an app with a request or a tunnel in flight is never picked."""
    candidates = [app("new", 50.0), app("busy", 1.0, in_flight=1), app("old", 10.0),
                  app("tie-b", 20.0), app("tie-a", 20.0)]
    room = make_room(capacity=4, running=4, wanted=2, candidates=candidates)
    assert room == Room(evict=("old", "tie-a"))
    big = make_room(capacity=4, running=4, wanted=2,
                    candidates=[app("two", 30.0, instances=2), app("one", 40.0)])
    assert big.evict == ("two",)


def test_no_room_idles_nothing_and_names_the_capacity() -> None:
    """When even every idle-able app would not make room, none is idled: the start fails
    with the node's figures."""
    room = make_room(capacity=1, running=1, wanted=1,
                     candidates=[app("busy", 0.0, in_flight=2), app("none", 0.0, 0)])
    assert not room.fits and room.evict == ()
    assert room.reason == "node at capacity: 1/1 running"
    short = make_room(capacity=3, running=1, wanted=4, candidates=[app("a", 0.0)])
    assert short.reason == "node at capacity: 1/3 running (4 to start)"
