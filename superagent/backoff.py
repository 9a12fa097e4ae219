"""Delays between attempts that keep failing: one schedule object for every retry loop.

Theory of operation. A retry loop asks ``next()`` for the pause before its next attempt
and calls ``reset()`` once an attempt succeeded. The schedule is pure arithmetic (no
clock, no trio), so a loop's timing is tested synchronously and the loop itself stays
a plain ``await trio.sleep(backoff.next())``.

Two shapes cover every loop in superagent: a doubling (``Backoff(start, limit)``:
``start``, ``2*start``, ... capped at ``limit``) and a fixed ramp whose last step
repeats (``Backoff.ramp(0.5, 1.0, 2.0, 5.0)``), for schedules chosen by hand rather
than by a factor.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence


class Backoff:
    """The pauses of one retry loop; see the module docstring."""

    __slots__ = ("attempts", "limit", "start", "steps")

    def __init__(self, start: float, limit: float) -> None:
        if start <= 0 or limit < start:
            raise ValueError(f"a backoff needs 0 < start <= limit (got {start}, {limit})")
        self.start = start
        self.limit = limit
        self.steps: tuple[float, ...] = ()
        self.attempts = 0  # delays handed out since the last reset

    @classmethod
    def ramp(cls, *steps: float) -> Backoff:
        """The delays ``steps`` in order, then the last one for ever."""
        if not steps or any(b < a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"a backoff ramp needs rising delays (got {steps})")
        backoff = cls(steps[0], steps[-1])
        backoff.steps = tuple(steps)
        return backoff

    def __repr__(self) -> str:
        return f"<Backoff next={self.peek():g}s limit={self.limit:g}s attempts={self.attempts}>"

    def peek(self) -> float:
        """The delay ``next()`` will return, without counting it."""
        return _delay(self.attempts, self.start, self.limit, self.steps)

    def next(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        delay = self.peek()
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """An attempt succeeded: the next failure waits ``start`` again."""
        self.attempts = 0


def _delay(attempts: int, start: float, limit: float, steps: Sequence[float]) -> float:
    if steps:
        return steps[min(attempts, len(steps) - 1)]
    # Doubling by a power of two is exact in binary floating point, so 0.2 doubles to
    # 0.4, 0.8, 1.6, 3.2 with no drift; the exponent is capped so it never overflows.
    return min(limit, start * 2.0 ** min(attempts, 64))


__all__ = ["Backoff"]
