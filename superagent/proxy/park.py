"""Parking a task for ``netio``'s poller, for less than ``wait_task_rescheduled`` costs.

``trio.lowlevel.wait_task_rescheduled(abort)`` is a coroutine that builds a
``WaitTaskRescheduled`` message on every call and yields it through a generator
to trio's run loop. The data plane parks a task twice per proxied request, so
``message`` builds the message once per socket and direction and ``park`` yields
it directly: one frame and one object fewer per wait (about 1 µs each), with the
same message, the same abort protocol and the same outcome as the public call.

The message class is internal to trio. Should a trio release move it,
``message`` returns None and the caller uses the public call; ``FAST`` says
which is in use, and a test fails if it is not this one, so an upgrade that
loses it is noticed. Kept out of the compiled group: ``types.coroutine`` needs
an interpreted generator.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Generator

import outcome
from trio.lowlevel import Abort, RaiseCancelT

try:
    from trio._core._traps import WaitTaskRescheduled
except ImportError:  # a trio release moved it: callers fall back to the public call
    WaitTaskRescheduled = None  # type: ignore[assignment,misc]

FAST = WaitTaskRescheduled is not None


def message(abort: Callable[[RaiseCancelT], Abort]) -> object | None:
    """What ``park`` yields to wait with ``abort`` as the abort function; None when the
    public ``wait_task_rescheduled(abort)`` must be used instead."""
    return WaitTaskRescheduled(abort) if WaitTaskRescheduled is not None else None


@types.coroutine
def park(msg: object) -> Generator[object, outcome.Outcome[None], outcome.Outcome[None]]:
    """Suspend the task until ``reschedule``; returns the outcome (unwrap it)."""
    return (yield msg)
