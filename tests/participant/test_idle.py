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
    Phase,
    app_counts,
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
