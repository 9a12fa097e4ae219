"""Live fan-out of log lines to subscribers, bounded per subscriber, never blocking.

Theory of operation
-------------------
A producer (a participant's log reader, a coordinator merging participants' streams)
calls ``Fanout.publish`` with each new line; every ``Subscription`` whose filter matches
gets it through its own bounded trio memory channel, filled with ``send_nowait``. When
a subscriber's queue is full the line is dropped *for that subscriber* and counted in
``Subscription.dropped``: a slow consumer never slows the producer or the other
subscribers, and what it missed is visible (and can be fetched again from the ring
buffers with a ``Cursor``). ``publish`` never awaits, so it can be called from any code
on the trio thread, however time-critical.

Ownership: a ``Subscription`` belongs to its caller, who closes it (``with
fanout.subscribe(...) as sub``); closing detaches it, and the lines already queued can
still be read. ``Fanout.close`` closes every subscription (their iteration ends) and
refuses new ones: a producer that stops for good calls it.
"""

from __future__ import annotations

from types import TracebackType

import trio

from superagent.debug.filters import LogFilter
from superagent.debug.records import LogLine

SUBSCRIBER_BUFFER = 1000  # lines queued per subscriber before new ones are dropped
DROPPED_NOTE = "dropped"  # the ``type`` of a stream's note of lines a subscription dropped


class Subscription:
    """A live feed of matching lines, with a bounded queue and a drop counter.

    An async iterator of ``LogLine``; iteration ends when the subscription or its fan-out
    is closed. Use as a context manager so it is detached when done.
    """

    def __init__(self, fanout: Fanout, filter: LogFilter, buffer: int) -> None:
        if buffer < 1:
            raise ValueError(f"subscriber buffer must be at least 1, not {buffer}")
        self.filter = filter
        self.buffer = buffer
        self.dropped = 0
        self.delivered = 0
        self._fanout = fanout
        self._send, self._receive = trio.open_memory_channel[LogLine](buffer)

    def __repr__(self) -> str:
        queued = self._receive.statistics().current_buffer_used
        return (f"<Subscription {self.filter} queued={queued}/{self.buffer} "
                f"delivered={self.delivered} dropped={self.dropped}"
                f"{' closed' if self.closed else ''}>")

    @property
    def queued(self) -> int:
        """Lines waiting in the queue."""
        return int(self._receive.statistics().current_buffer_used)

    @property
    def closed(self) -> bool:
        return self not in self._fanout

    def offer(self, line: LogLine) -> None:
        """Queue ``line`` if it matches; never blocks (a full queue drops and counts)."""
        if not self.filter.matches(line):
            return
        try:
            self._send.send_nowait(line)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        else:
            self.delivered += 1

    def close(self) -> None:
        """Detach; lines already queued can still be read. Idempotent."""
        self._fanout.detach(self)
        self._send.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
        self._receive.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> LogLine:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None


class Fanout:
    """The set of live subscriptions of one producer."""

    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()
        self.published = 0
        self.closed = False

    def __repr__(self) -> str:
        dropped = sum(sub.dropped for sub in self._subscriptions)
        return (f"<Fanout subscribers={len(self._subscriptions)} published={self.published}"
                f" dropped={dropped}{' closed' if self.closed else ''}>")

    def __len__(self) -> int:
        return len(self._subscriptions)

    def __contains__(self, sub: object) -> bool:
        return sub in self._subscriptions

    def subscribe(self, filter: LogFilter | None = None, *,
                  buffer: int = SUBSCRIBER_BUFFER) -> Subscription:
        """A live feed of new lines matching ``filter``; close it (or use ``with``) when done.

        After ``close`` the feed is returned already closed: its iteration ends at once.
        Raises ``ValueError`` when ``buffer`` is below 1.
        """
        sub = Subscription(self, filter or LogFilter(), buffer)
        if self.closed:
            sub.close()
        else:
            self._subscriptions.add(sub)
        return sub

    def detach(self, sub: Subscription) -> None:
        """Forget ``sub`` (``Subscription.close`` calls this). Idempotent."""
        self._subscriptions.discard(sub)

    def publish(self, lines: list[LogLine]) -> None:
        """Offer each line to every subscription, in order. Never blocks."""
        self.published += len(lines)
        subs = list(self._subscriptions)
        for line in lines:
            for sub in subs:
                sub.offer(line)

    def close(self) -> None:
        """Close every subscription (their iteration ends) and refuse new ones."""
        self.closed = True
        for sub in list(self._subscriptions):
            sub.close()
