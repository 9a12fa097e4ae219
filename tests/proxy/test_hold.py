"""The cold-start hold (``proxy/hold.py``): queue bound, release order, outcomes, wakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import trio.testing

from superagent.proxy import control
from superagent.proxy.errors import ColdStartError
from superagent.proxy.hold import (
    QUEUE_FULL,
    READY,
    START_FAILED,
    START_TIMEOUT,
    Holds,
    with_header,
    with_retry_after,
)
from superagent.proxy.http1 import error_response
from superagent.proxy.snapshot import AppRoute, ColdStart, Instance, RoutingSnapshot
from superagent.proxy.state import WorkerState

COLD = ColdStart(queue=3, wait=10.0)


def route(state: str = "idle", reason: str = "") -> AppRoute:
    return AppRoute(name="web", instances=(), prefix="/web",
                    cold=ColdStart(state=state, reason=reason, queue=3, wait=10.0))


def test_the_queue_is_bounded_and_named() -> None:
    """Beyond ``queue`` held requests the next one is refused: 503 queue-full."""
    holds = Holds()
    for _ in range(3):
        holds.admit("web", COLD, 0.0)
    with pytest.raises(ColdStartError) as refused:
        holds.admit("web", COLD, 0.0)
    assert (refused.value.status, refused.value.code) == (503, QUEUE_FULL)
    assert holds.held == 3


def test_a_snapshot_with_an_instance_releases_in_arrival_order() -> None:
    """Every waiter is released, oldest first, and the oldest's arrival is reported."""
    holds = Holds()
    waiters = [holds.admit("web", COLD, float(t)) for t in range(3)]
    started = holds.settle({"web": route()}, {"web": True})
    assert started == [("web", 0.0)]
    assert [w.outcome for w in waiters] == [READY] * 3
    assert all(w.event.is_set() and w.error(10.0) is None for w in waiters)


def test_a_failed_state_or_a_removed_route_fails_the_waiters() -> None:
    """state failed -> start-failed with the reason; no route any more -> start-failed."""
    holds = Holds()
    first = holds.admit("web", COLD, 0.0)
    assert holds.settle({"web": route("starting")}, {"web": False}) == []
    assert first.outcome is None  # still starting: keeps waiting
    holds.settle({"web": route("failed", "exit 3")}, {"web": False})
    error = first.error(10.0)
    assert error is not None and (error.code, error.detail) == (START_FAILED, "exit 3")
    second = holds.admit("web", COLD, 1.0)
    holds.settle({}, {})
    assert second.outcome == START_FAILED and "no longer routed" in second.detail


async def test_a_waiter_that_outlives_the_wait_is_a_start_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    """Nothing decides: the bounded wait ends in 503 start-timeout and leaves the queue."""
    holds = Holds()
    waiter = holds.admit("web", COLD, trio.current_time())
    with trio.move_on_after(COLD.wait):
        await waiter.event.wait()
    holds.leave(waiter)
    error = waiter.error(COLD.wait)
    assert error is not None and error.code == START_TIMEOUT and holds.held == 0


async def test_the_first_waiter_wakes_the_driver_once_and_a_refusal_fails_them(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """One wake for a queue; the driver's refusal answers every waiter with its reason."""
    path = str(tmp_path / "wake.sock")
    wakes: list[dict[str, object]] = []

    async def driver(message: dict[str, object]) -> dict[str, object]:
        wakes.append(message)
        return {"ok": False, "error": "the last start failed: exit 3"}

    holds = Holds()
    cold = ColdStart(queue=3, wait=10.0, wake=path)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve_control, path, driver)
        await nursery.start(holds.run_wakes)
        waiters = [holds.admit("web", cold, 0.0) for _ in range(3)]
        for waiter in waiters:
            with trio.fail_after(5):
                await waiter.event.wait()
        nursery.cancel_scope.cancel()
    assert wakes == [{"type": "wake", "app": "web"}]
    assert {(w.outcome, w.detail) for w in waiters} == {
        (START_FAILED, "the last start failed: exit 3")}


async def test_a_driver_that_is_away_is_asked_again_while_requests_wait(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """No one on the wake socket: the wake is retried until the driver answers."""
    path = str(tmp_path / "wake.sock")
    holds = Holds()
    cold = ColdStart(queue=3, wait=30.0, wake=path)
    wakes: list[str] = []

    async def driver(message: dict[str, object]) -> dict[str, object]:
        wakes.append(json.dumps(message))
        return {"ok": True}

    async with trio.open_nursery() as nursery:
        await nursery.start(holds.run_wakes)
        holds.admit("web", cold, 0.0)
        await trio.sleep(3.0)  # several failed attempts
        await nursery.start(control.serve_control, path, driver)
        with trio.fail_after(5):
            while not wakes:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert len(wakes) == 1


def test_headers_are_added_to_heads_and_answers() -> None:
    """The cold-start header goes before the blank line; Retry-After after the status."""
    assert with_header(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n", b"X", b"12") == (
        b"HTTP/1.1 200 OK\r\nA: b\r\nX: 12\r\n\r\n")
    answer = with_retry_after(error_response(503, START_FAILED, "x", b"id", close=False), 5)
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\n")


def test_an_undrained_instance_releases_what_was_held_while_it_drained() -> None:
    """An idling called off (its instance marked draining, then not): the held requests
    go to the instance at once, without waiting for a snapshot."""
    app = AppRoute(name="web", instances=(Instance(id="i1", host="127.0.0.1", port=1),),
                   prefix="/web", cold=COLD)
    state = WorkerState(parser="httptools",
                        snapshot=RoutingSnapshot(version=1, listeners=(), apps=(app,)))
    state.upstreams.set_draining("i1", True)
    waiter = state.holds.admit("web", COLD, 0.0)
    state.settle_holds()
    assert waiter.outcome is None  # still draining: nothing to pick
    state.upstreams.set_draining("i1", False)
    state.settle_holds()
    assert waiter.outcome == READY
    assert state.metrics.cold_starts["web"][-1] == 1
