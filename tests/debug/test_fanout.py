"""Fan-out: bounded per-subscriber queues, drop counters, a producer that never waits."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from superagent.debug import Fanout, LogFilter, LogLine, Origin, Subscription, make_line


def batch(start: int, count: int, instance: str = "web-1") -> list[LogLine]:
    origin = Origin(app="web", release="r1", instance=instance)
    return [make_line(b"line %d" % i, cut=False, origin=origin, stream="stdout", ts=float(i),
                      seq=i) for i in range(start, start + count)]


async def drain(sub: Subscription) -> list[str]:
    """Everything queued on ``sub`` (closing it first so iteration ends)."""
    sub.close()
    return [line.text async for line in sub]


def test_slow_subscriber_drops_while_fast_one_gets_everything() -> None:
    """A full queue drops and counts for that subscriber only; publish never waits."""

    async def scenario() -> None:
        fanout = Fanout()
        got: list[str] = []
        async with trio.open_nursery() as nursery:
            with fanout.subscribe() as fast, fanout.subscribe(buffer=5) as slow:

                async def consume() -> None:
                    async for line in fast:
                        got.append(line.text)

                nursery.start_soon(consume)
                for start in range(0, 50, 10):
                    fanout.publish(batch(start, 10))  # synchronous: it cannot block
                    await trio.testing.wait_all_tasks_blocked()  # the consumer catches up
                assert got == [f"line {i}" for i in range(50)]
                assert (slow.dropped, slow.delivered, fast.dropped) == (45, 5, 0)
                assert "dropped=45" in repr(slow) and "queued=5/5" in repr(slow)
                assert "subscribers=2 published=50 dropped=45" in repr(fanout)
                assert await drain(slow) == [f"line {i}" for i in range(5)]
                nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_filter_and_close() -> None:
    """A subscription gets only matching lines; close ends iteration, keeps what was queued."""
    fanout = Fanout()
    sub = fanout.subscribe(LogFilter(instance="web-2"))
    fanout.publish(batch(1, 2, "web-1") + batch(3, 1, "web-2"))
    assert sub.delivered == 1 and not sub.closed and sub in fanout
    assert await drain(sub) == ["line 3"]
    assert sub.closed and "closed" in repr(sub) and len(fanout) == 0
    sub.close()  # idempotent
    with pytest.raises(ValueError, match="buffer"):
        fanout.subscribe(buffer=0)


async def test_closing_the_fanout_ends_every_subscription() -> None:
    """close() ends subscribers' iteration; a later subscription is born closed."""
    fanout = Fanout()
    first = fanout.subscribe()
    ended = trio.Event()

    async def consume() -> None:
        async for _ in first:
            pass
        ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked()
        fanout.close()
        with trio.fail_after(5):
            await ended.wait()
    late = fanout.subscribe()
    assert late.closed and await drain(late) == []
    fanout.publish(batch(1, 1))
    assert first.delivered == 0 and "closed" in repr(fanout)


async def test_queued_counts_what_waits_for_the_reader() -> None:
    """``queued`` lets a producer tell its reader of drops once the queue is drained."""
    fanout = Fanout()
    with fanout.subscribe(buffer=2) as sub:
        fanout.publish(batch(1, 3))
        assert (sub.queued, sub.dropped) == (2, 1)
        await sub.__anext__()
        await sub.__anext__()
        assert sub.queued == 0
