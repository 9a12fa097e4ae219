"""The retry schedule every loop shares (``superagent.backoff``)."""

from __future__ import annotations

import pytest

from superagent.backoff import Backoff


def test_doubles_to_its_limit_and_resets() -> None:
    """start, doubling, capped at limit; reset starts over."""
    backoff = Backoff(0.05, 0.5)
    assert [backoff.next() for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    assert backoff.attempts == 6
    backoff.reset()
    assert (backoff.peek(), backoff.next()) == (0.05, 0.05)


def test_ramp_repeats_its_last_step() -> None:
    """A hand-picked ramp gives its steps in order, then the last one for ever."""
    backoff = Backoff.ramp(0.5, 1.0, 2.0, 5.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 5.0, 5.0, 5.0]
    backoff.reset()
    assert backoff.next() == 0.5


def test_many_failures_do_not_overflow() -> None:
    """Thousands of failures in a row still give the limit."""
    backoff = Backoff(0.2, 5.0)
    for _ in range(5000):
        backoff.next()
    assert backoff.next() == 5.0
    assert "attempts=5001" in repr(backoff)


@pytest.mark.parametrize(("start", "limit"), [(0.0, 1.0), (2.0, 1.0)])
def test_refuses_a_schedule_that_cannot_work(start: float, limit: float) -> None:
    """A zero start or a limit below the start is a programming error."""
    with pytest.raises(ValueError, match="start"):
        Backoff(start, limit)
    with pytest.raises(ValueError, match="rising"):
        Backoff.ramp(2.0, 1.0)
