"""The cold-start hold: requests for an app with no running instance wait for one.

Theory of operation. An app that scales to zero keeps its route with no instance and a
``ColdStart`` block (``snapshot.py``). When ``Upstreams.pick`` finds no instance for such
an app, the connection asks ``Holds.admit`` for a place in the app's queue (bounded per
worker: beyond ``queue`` the request gets 503 ``queue-full`` at once) and waits, at most
``wait`` seconds, on its ``Waiter``. The first waiter of an app asks the driver (the
participant agent) to start an instance: one JSON line on the driver's wake socket,
answered at once; the agent decides locally, with no coordinator round trip, and sends
no answer about the start itself. What ends the wait is the next routing snapshot:

- the app has an instance to pick: every waiter is released, in arrival order, and
  forwarded (each response then carries ``X-Superagent-Cold-Start: <ms>``);
- the app's cold state is ``failed``: every waiter gets 503 ``start-failed`` with the reason;
- the app is no longer routed: 503 ``start-failed`` too.

A waiter whose ``wait`` passes gets 503 ``start-timeout``. Every 503 of the hold has
``Retry-After``. A wake the driver cannot take (its socket is gone: the agent is
restarting or was killed) is retried every ``WAKE_RETRY`` seconds while requests wait, so
a held request always ends within its bound: an answer, or a 503.

The hold costs nothing while instances run: it is entered only when ``pick`` found none.
A held request's body stays where it is: what the parser already has is kept, the rest
waits in the kernel's buffers (back-pressure to the client) until the request goes out.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Final

import structlog
import trio

from superagent.proxy import control
from superagent.proxy.errors import ColdStartError

if TYPE_CHECKING:
    from superagent.proxy.snapshot import AppRoute, ColdStart

QUEUE_FULL: Final = "queue-full"
START_FAILED: Final = "start-failed"
START_TIMEOUT: Final = "start-timeout"
READY: Final = "ready"
WAKE_RETRY: Final = 0.5  # seconds between attempts to reach a driver that is away
WAKE_TIMEOUT: Final = 2.0  # the driver answers a wake at once; longer means it is stuck
COLD_START_HEADER: Final = b"X-Superagent-Cold-Start"

log = structlog.get_logger("superagent.proxy.hold")


class Waiter:
    """One held request: set ``event`` once ``outcome`` is decided."""

    __slots__ = ("app", "detail", "event", "outcome", "since")

    def __init__(self, app: str, since: float) -> None:
        self.app = app
        self.since = since
        self.event = trio.Event()
        self.outcome: str | None = None  # READY, START_FAILED; None while waiting
        self.detail = ""

    def __repr__(self) -> str:
        return f"<Waiter app={self.app} outcome={self.outcome}>"

    def error(self, wait: float) -> ColdStartError | None:
        """The 503 this waiter gets, or None when it may go on."""
        if self.outcome == READY:
            return None
        if self.outcome is None:
            return ColdStartError(START_TIMEOUT, f"app {self.app!r} did not start within"
                                                 f" {wait:g}s")
        return ColdStartError(START_FAILED, self.detail or f"app {self.app!r} failed to start")


class Hold:
    """One app's held requests in one worker, oldest first."""

    __slots__ = ("app", "waiters", "wake", "waking", "woken")

    def __init__(self, app: str) -> None:
        self.app = app
        self.waiters: deque[Waiter] = deque()
        self.wake = ""  # the driver's wake socket, from the snapshot the last waiter saw
        self.waking = False  # a wake is being sent
        self.woken = False  # the driver took a wake for the requests waiting now

    def __repr__(self) -> str:
        return f"<Hold {self.app} waiters={len(self.waiters)} waking={self.waking}>"

    def release(self, outcome: str, detail: str = "") -> int:
        """Decide every waiter, in arrival order; returns how many there were."""
        count = len(self.waiters)
        self.woken = False
        while self.waiters:
            waiter = self.waiters.popleft()
            waiter.outcome = outcome
            waiter.detail = detail
            waiter.event.set()
        return count


class Holds:
    """Every app's hold in one worker, and the wakes still to send."""

    __slots__ = ("_send", "by_app", "receive")

    def __init__(self) -> None:
        self.by_app: dict[str, Hold] = {}
        self._send, self.receive = trio.open_memory_channel[str](math.inf)

    def __repr__(self) -> str:
        return f"<Holds {sorted((a, len(h.waiters)) for a, h in self.by_app.items())}>"

    @property
    def held(self) -> int:
        return sum(len(hold.waiters) for hold in self.by_app.values())

    def admit(self, app: str, cold: ColdStart, now: float) -> Waiter:
        """A place in ``app``'s queue; raises ColdStartError (queue-full) beyond its bound.
        The first waiter (or the first after a wake ended) queues a wake to send."""
        hold = self.by_app.get(app)
        if hold is None:
            hold = self.by_app[app] = Hold(app)
        if len(hold.waiters) >= cold.queue:
            raise ColdStartError(QUEUE_FULL, f"app {app!r} is starting and already holds"
                                             f" {cold.queue} requests")
        waiter = Waiter(app, now)
        hold.waiters.append(waiter)
        hold.wake = cold.wake
        if not hold.waking and not hold.woken and cold.wake:
            hold.waking = True
            self._send.send_nowait(app)
        return waiter

    def leave(self, waiter: Waiter) -> None:
        """``waiter`` stops waiting (timed out, or its connection went)."""
        hold = self.by_app.get(waiter.app)
        if hold is None:
            return
        if waiter.outcome is None:  # undecided: still queued (release empties the queue)
            hold.waiters.remove(waiter)
        if not hold.waiters and not hold.waking:
            del self.by_app[waiter.app]

    def fail(self, app: str, detail: str) -> int:
        """Answer every waiter of ``app`` with 503 start-failed."""
        hold = self.by_app.get(app)
        return hold.release(START_FAILED, detail) if hold is not None else 0

    def settle(self, apps: dict[str, AppRoute], has_instance: dict[str, bool]
               ) -> list[tuple[str, float]]:
        """A new snapshot: release the holds it decides (see the module docstring).

        ``has_instance`` says, per held app, whether an instance can be picked now. Returns
        (app, oldest waiter's ``since``) for each app released to its instances, for the
        cold-start histogram.
        """
        started: list[tuple[str, float]] = []
        for name, hold in self.by_app.items():
            if not hold.waiters:
                continue
            route = apps.get(name)
            if route is None:
                hold.release(START_FAILED, f"app {name!r} is no longer routed here")
            elif has_instance.get(name, False):
                started.append((name, hold.waiters[0].since))
                hold.release(READY)
            elif route.cold is not None and route.cold.state == "failed":
                hold.release(START_FAILED, route.cold.reason
                             or f"app {name!r} failed to start")
        return started

    async def run_wakes(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                        ) -> None:
        """Send the queued wakes, each in its own task, until cancelled."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for app in self.receive:
                nursery.start_soon(self._wake, app)

    async def _wake(self, app: str) -> None:
        """Ask the driver to start ``app`` while requests for it wait; a refusal fails them."""
        hold = self.by_app.get(app)
        if hold is None:
            return
        try:
            while hold.waiters:
                try:
                    reply = await control.call(hold.wake, {"type": "wake", "app": app},
                                               timeout=WAKE_TIMEOUT)
                except control.ControlError as exc:
                    log.warning("cannot reach the driver to start an app", app=app,
                                error=str(exc))
                    await trio.sleep(WAKE_RETRY)
                    continue
                if not reply.get("ok"):
                    hold.release(START_FAILED, str(reply.get("error") or "start refused"))
                elif hold.waiters:
                    hold.woken = True
                return
        finally:
            hold.waking = False
            if not hold.waiters and self.by_app.get(app) is hold:
                del self.by_app[app]


def cold_head(head: bytes, seconds: float) -> bytes:
    """A response head with ``X-Superagent-Cold-Start``: how long the request was held."""
    return with_header(head, COLD_START_HEADER, b"%d" % round(seconds * 1000))


def with_header(head: bytes, name: bytes, value: bytes) -> bytes:
    """``head`` (ending in an empty line) with one more header line."""
    return head[:-2] + name + b": " + value + b"\r\n\r\n"


def with_retry_after(response: bytes, seconds: int) -> bytes:
    """An error answer with ``Retry-After`` after its status line."""
    return response.replace(b"\r\n", b"\r\nRetry-After: %d\r\n" % seconds, 1)
