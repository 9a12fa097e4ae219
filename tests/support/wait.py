"""Waiting for a condition with a deadline: the one way tests synchronise with what they
do not drive step by step (another process, a server task, a background thread).

``wait_until(probe, what, timeout=...)`` calls ``probe`` every ``interval`` until it
returns something truthy and returns that value; after ``timeout`` it raises
AssertionError naming ``what`` and the last value and the last exception seen, so a
failure says what was awaited and how far it got. ``probe`` raising one of ``ignore``
(by default the errors of something not up yet: OSError, httpx.HTTPError, psutil.Error)
counts as "not yet"; any other exception, an AssertionError included, propagates at once.
A probe whose answer may be falsy (index 0, an empty list) returns it boxed, ``(value,)``.
With ``until=check`` the wait ends on the first value for which ``check(value)`` holds
instead, and the timeout message shows the last value in full (a status document, say)
rather than a bare ``False``.

``await wait_until_async(...)`` is the same inside trio: it sleeps with ``trio.sleep`` and
measures the deadline on trio's clock (so it works under ``MockClock``); its probe may be a
plain function or return an awaitable.

The sleep between probes is a poll interval, not a stand-in for synchronisation: the
condition itself ends the wait.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import psutil
import trio

T = TypeVar("T")
STEP_TIMEOUT = 15.0  # default deadline of one awaited condition on a busy 2-core machine
POLL = 0.02  # between probes: short against every deadline, long against a probe's cost
NOT_YET: tuple[type[BaseException], ...] = (OSError, httpx.HTTPError, psutil.Error)
REPR_LIMIT = 500  # characters of the last value shown in a timeout message


def wait_until(probe: Callable[[], T], what: str, *, timeout: float = STEP_TIMEOUT,
               interval: float = POLL, until: Callable[[T], object] = bool,
               ignore: tuple[type[BaseException], ...] = NOT_YET) -> T:
    """The first ``probe()`` value that is truthy (or satisfies ``until``); AssertionError
    naming ``what`` and the last value and error after ``timeout``."""
    deadline = time.monotonic() + timeout
    tracker = _Last()
    while True:
        try:
            value = probe()
            if until(value):
                return value
        except ignore as exc:
            tracker.error = exc
        else:
            tracker.value, tracker.seen = value, True
        if time.monotonic() >= deadline:
            raise AssertionError(tracker.message(what, timeout))
        time.sleep(interval)


async def wait_until_async(probe: Callable[[], T | Awaitable[T]], what: str, *,
                           timeout: float = STEP_TIMEOUT, interval: float = POLL,
                           until: Callable[[T], object] = bool,
                           ignore: tuple[type[BaseException], ...] = NOT_YET) -> T:
    """``wait_until`` inside trio, on trio's clock; ``probe`` may return an awaitable."""
    deadline = trio.current_time() + timeout
    tracker = _Last()
    while True:
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
            if until(value):
                return value
        except ignore as exc:
            tracker.error = exc
        else:
            tracker.value, tracker.seen = value, True
        if trio.current_time() >= deadline:
            raise AssertionError(tracker.message(what, timeout))
        await trio.sleep(interval)


class _Last:
    """The last value and the last exception a probe gave, for the timeout message."""

    def __init__(self) -> None:
        self.value: object = None
        self.seen = False
        self.error: BaseException | None = None

    def message(self, what: str, timeout: float) -> str:
        text = f"timed out after {timeout}s waiting for {what}"
        if self.seen:
            shown = repr(self.value)
            if len(shown) > REPR_LIMIT:
                shown = shown[:REPR_LIMIT] + "..."
            text += f"; last value: {shown}"
        if self.error is not None:
            text += f"; last error: {self.error!r}"
        return text
