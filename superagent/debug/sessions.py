"""Debug sessions: per app, a window of time in which requests are traced.

Theory of operation
-------------------
``debug APP`` opens a session for ``ttl`` seconds; opening it again extends it (the
window keeps its first opening), closing it ends it at once. A request is traced when
*its own* timestamp falls in the window (``covers``), however late its record is read:
the proxy writes its records in batches, so the record of a request made just before
the session ended may be read after. For the same reason a session whose TTL has passed
is not forgotten at once: ``expire`` drops it ``RETAIN`` seconds later.

Times are epoch seconds (they are compared with the proxy's timestamps and persisted),
read from ``clock`` (``time.time`` unless a test gives another). The core (``open``,
``close``, ``covers``, ``expire``) is synchronous and takes ``now`` from the caller or the
clock; ``run`` is the thin trio loop that calls ``expire`` when the next session is due
and reports what ended to ``on_expire``.

The JSON shape (``to_json``) is ``{app: [opened, until]}``, as the participant has always
kept it in its ``state.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from superagent.debug.errors import BadRecord

DEFAULT_TTL = 3600.0  # a session left open ends by itself after an hour
RETAIN = 60.0  # seconds an ended session is kept, so late-read records of it still match
SESSIONS_TYPE = "debug_sessions"


@dataclass(frozen=True, kw_only=True, slots=True)
class DebugWindow:
    """When one app's session opened and when it ends (epoch seconds)."""

    opened: float
    until: float

    def covers(self, ts: float) -> bool:
        return self.opened <= ts <= self.until


class DebugSessions:
    """The open (and recently ended) debug sessions, by app."""

    def __init__(self, *, clock: Callable[[], float] = time.time, retain: float = RETAIN
                 ) -> None:
        self.clock = clock
        self.retain = retain
        self._windows: dict[str, DebugWindow] = {}
        self._changed = trio.Event()  # wakes ``run`` when a window moves

    def __repr__(self) -> str:
        now = self.clock()
        return ("<DebugSessions " + " ".join(
            f"{app}:{'open' if window.until >= now else 'ended'}@{window.until:.0f}"
            for app, window in sorted(self._windows.items())) + ">")

    def __contains__(self, app: object) -> bool:
        return app in self._windows

    def window(self, app: str) -> DebugWindow | None:
        return self._windows.get(app)

    def open(self, app: str, ttl: float = DEFAULT_TTL, *, now: float | None = None
             ) -> DebugWindow:
        """Open ``app``'s session, or extend it, until ``ttl`` seconds from now."""
        if ttl <= 0:
            raise ValueError(f"a debug session's ttl must be positive, not {ttl}")
        now = self.clock() if now is None else now
        known = self._windows.get(app)
        # extending a session keeps its start; one that ended starts afresh (the requests
        # between the two were not asked for)
        opened = min(known.opened, now) if known is not None and known.until >= now else now
        window = self._windows[app] = DebugWindow(opened=opened, until=now + ttl)
        self._wake()
        return window

    def close(self, app: str) -> None:
        """End ``app``'s session now (its window is forgotten at once). Idempotent."""
        if self._windows.pop(app, None) is not None:
            self._wake()

    def covers(self, app: str, ts: float) -> bool:
        """Whether a request of ``app`` made at ``ts`` is traced.

        Safe to call from a worker thread (the participant's log reader does): it is one
        dict lookup of an immutable window, and the trio thread only ever replaces
        windows or the dict, never changes a window in place.
        """
        window = self._windows.get(app)
        return window is not None and window.covers(ts)

    def active(self, *, now: float | None = None) -> dict[str, float]:
        """The sessions still open: app -> until."""
        now = self.clock() if now is None else now
        return {app: w.until for app, w in self._windows.items() if w.until > now}

    def next_due(self) -> float | None:
        """When ``expire`` next has something to drop (epoch seconds), if ever."""
        return min((w.until + self.retain for w in self._windows.values()), default=None)

    def expire(self, *, now: float | None = None) -> list[str]:
        """Forget the sessions ended over ``retain`` seconds ago; their apps, sorted."""
        now = self.clock() if now is None else now
        ended = sorted(app for app, w in self._windows.items() if w.until + self.retain <= now)
        for app in ended:
            del self._windows[app]
        return ended

    async def run(self, on_expire: Callable[[list[str]], None] | None = None, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire sessions when they are due, forever; start with ``nursery.start``.

        ``on_expire`` gets the apps whose sessions were forgotten (to persist the change).
        """
        task_status.started()
        while True:
            changed = self._changed
            due = self.next_due()
            with trio.move_on_after(max(0.0, due - self.clock()) if due is not None
                                    else float("inf")):
                await changed.wait()
            ended = self.expire()
            if ended and on_expire is not None:
                on_expire(ended)

    def to_json(self) -> dict[str, Any]:
        return {app: [w.opened, w.until] for app, w in self._windows.items()}

    def load(self, doc: object) -> None:
        """Replace the sessions with those of ``to_json``'s form; raises ``BadRecord``."""
        if not isinstance(doc, dict):
            raise BadRecord("not a JSON object", kind=SESSIONS_TYPE)
        windows: dict[str, DebugWindow] = {}
        for app, pair in doc.items():
            try:
                opened, until = (float(value) for value in pair)
            except (TypeError, ValueError):
                raise BadRecord(f"not an [opened, until] pair: {pair!r}", kind=SESSIONS_TYPE,
                                field=str(app)) from None
            windows[str(app)] = DebugWindow(opened=opened, until=until)
        self._windows = windows
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
