"""Debug sessions: windows per app, extended, closed, expired on time (MockClock)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from superagent.debug import BadRecord, DebugSessions

EPOCH = 1_800_000_000.0  # the sessions' clock: epoch seconds, moved by trio's MockClock


def clock() -> float:
    return EPOCH + trio.current_time()


def test_open_extend_close_and_covers() -> None:
    """A window covers requests made inside it; reopening extends it from its first opening."""
    sessions = DebugSessions(clock=lambda: 1000.0)
    window = sessions.open("web", 60)
    assert (window.opened, window.until) == (1000.0, 1060.0)
    assert sessions.covers("web", 1000.0) and sessions.covers("web", 1060.0)
    assert not sessions.covers("web", 999.0) and not sessions.covers("api", 1000.0)
    again = sessions.open("web", 60, now=1030.0)
    assert (again.opened, again.until) == (1000.0, 1090.0)
    assert sessions.active() == {"web": 1090.0} and "web" in sessions
    sessions.close("web")
    sessions.close("web")  # idempotent
    assert not sessions.covers("web", 1030.0) and sessions.active() == {}
    with pytest.raises(ValueError, match="ttl"):
        sessions.open("web", 0)


def test_ended_session_is_kept_for_late_records_then_expired() -> None:
    """Past its TTL a session is not active but still covers its window until RETAIN later."""
    sessions = DebugSessions(clock=lambda: 0.0, retain=30.0)
    sessions.open("web", 10, now=100.0)
    assert sessions.active(now=111.0) == {} and sessions.covers("web", 105.0)
    assert sessions.next_due() == 140.0
    assert sessions.expire(now=139.0) == [] and sessions.expire(now=140.0) == ["web"]
    assert not sessions.covers("web", 105.0) and sessions.next_due() is None


def test_json_shape_is_the_state_file_one() -> None:
    """to_json is {app: [opened, until]}; load takes it back and refuses other shapes."""
    sessions = DebugSessions(clock=lambda: 50.0)
    sessions.open("web", 10)
    doc = sessions.to_json()
    assert doc == {"web": [50.0, 60.0]}
    restored = DebugSessions(clock=lambda: 55.0)
    restored.load(doc)
    assert restored.window("web") == sessions.window("web")
    assert "web:open@60" in repr(restored)
    bad: object
    for bad in ([], {"web": [1]}, {"web": "ab"}, {"web": None}):
        with pytest.raises(BadRecord, match="debug_sessions"):
            restored.load(bad)


def test_run_expires_sessions_when_they_are_due() -> None:
    """run() forgets each session RETAIN after its TTL, wakes for new ones, reports them."""

    async def scenario() -> None:
        sessions = DebugSessions(clock=clock, retain=5.0)
        expired: list[tuple[float, list[str]]] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(sessions.run, lambda apps: expired.append(
                (trio.current_time(), apps)))
            sessions.open("web", 60)
            await trio.sleep(10)
            sessions.open("api", 20)  # due before web: run() must wake and re-plan
            sessions.open("web", 60)  # extended: due at 75 now, not 65
            await trio.sleep(100)
            nursery.cancel_scope.cancel()
        assert expired == [(35.0, ["api"]), (75.0, ["web"])]
        assert sessions.to_json() == {}

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
