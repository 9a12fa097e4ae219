"""state.json's writer: asks coalesce, one write at a time, off the event loop.

``WriteLedger`` is pure; ``StateWriter`` runs here with a fake write (a list of the
documents written, optionally held in its thread until the test lets it go), under
``MockClock`` for the retry after a failed write.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from superagent.participant.agentstate import (
    WRITE_RETRY,
    StateWriter,
    WriteLedger,
    write_atomically,
)
from superagent.participant.errors import StateWriteError


def test_asks_made_during_a_write_are_covered_by_the_next_one() -> None:
    ledger = WriteLedger()
    assert ledger.begin() == 0  # nothing asked
    for _ in range(3):
        ledger.ask()
    assert ledger.begin() == 3
    assert ledger.ask() == 4
    assert ledger.begin() == 0  # one write at a time
    ledger.done(ok=True)
    assert ledger.covered(3) and not ledger.covered(4)
    assert ledger.begin() == 4
    ledger.done(ok=True)
    assert ledger.covered(4) and ledger.begin() == 0


def test_a_failed_write_loses_its_asks_until_a_later_write_covers_them() -> None:
    ledger = WriteLedger()
    ledger.ask()
    ledger.begin()
    ledger.done(ok=False)
    assert ledger.lost(1) and not ledger.covered(1)
    ledger.ask()
    assert ledger.begin() == 2  # the retry covers the lost ask too
    ledger.done(ok=True)
    assert ledger.covered(1) and not ledger.lost(1) and ledger.failed == 0


class Disk:
    """A fake ``write``: keeps each document; ``hold`` keeps the next write in its thread
    until ``let_go``; ``fail`` makes writes raise OSError."""

    def __init__(self) -> None:
        self.docs: list[dict[str, Any]] = []
        self.fail = False
        self.held = threading.Event()
        self.held.set()
        self.entered = trio.Event()
        self.entered_at = 0.0
        self.token = trio.lowlevel.current_trio_token()

    def hold(self) -> None:
        self.held.clear()
        self.entered = trio.Event()

    def let_go(self) -> None:
        self.held.set()

    def _enter(self) -> None:
        self.entered_at = trio.current_time()  # on the loop, when a write begins
        self.entered.set()

    def write(self, _path: Path, text: str) -> None:
        trio.from_thread.run_sync(self._enter, trio_token=self.token)
        self.held.wait(timeout=10)
        if self.fail:
            raise OSError(28, "No space left on device")
        self.docs.append(json.loads(text))


async def test_a_burst_of_asks_costs_two_writes_and_ends_with_the_newest_state(
        ) -> None:
    state = {"n": 0}
    disk = Disk()
    writer = StateWriter(Path("/nonexistent/state.json"), lambda: dict(state),
                         write=disk.write)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        disk.hold()
        state["n"] = 1
        writer.ask()
        await disk.entered.wait()  # the first write is in its thread
        for n in range(2, 6):
            state["n"] = n
            writer.ask()
        disk.let_go()
        await writer.flush()
        assert disk.docs == [{"n": 1}, {"n": 5}]
        writer.ask()  # nothing changed: not written again
        await writer.flush()
        assert writer.writes == 2
        nursery.cancel_scope.cancel()


async def test_flush_waits_for_the_write_under_way_and_the_next() -> None:
    state = {"n": 1}
    disk = Disk()
    writer = StateWriter(Path("/nonexistent/state.json"), lambda: dict(state),
                         write=disk.write)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        disk.hold()
        writer.ask()
        await disk.entered.wait()
        state["n"] = 2
        ask = writer.ask()  # after the running write's document was built
        flushed = trio.Event()

        async def flush() -> None:
            await writer.flush(ask)
            flushed.set()

        nursery.start_soon(flush)
        await trio.testing.wait_all_tasks_blocked()
        assert not flushed.is_set()
        disk.let_go()
        await flushed.wait()
        assert disk.docs[-1] == {"n": 2}
        nursery.cancel_scope.cancel()


async def test_a_failed_write_fails_its_flush_and_is_tried_again(
        autojump_clock: trio.testing.MockClock) -> None:
    disk = Disk()
    disk.fail = True
    writer = StateWriter(Path("/nonexistent/state.json"), lambda: {"n": 1},
                         write=disk.write)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.ask()
        with pytest.raises(StateWriteError, match="No space left"):
            await writer.flush()
        disk.fail = False
        began = trio.current_time()
        disk.entered = trio.Event()
        await disk.entered.wait()  # the writer's retry begins, WRITE_RETRY later
        # the time it began, taken on the loop: while a write runs in its thread the
        # autojump clock moves on, so the time this task wakes says nothing
        assert disk.entered_at - began <= WRITE_RETRY + 0.2
        while not writer.ledger.covered(writer.ledger.asked):  # until the retry is booked
            await trio.sleep(0.01)  # (a flush before it would still see the loss)
        assert disk.docs == [{"n": 1}]
        await writer.flush()
        nursery.cancel_scope.cancel()


async def test_without_a_writer_task_asks_write_at_once_and_its_end_writes_the_rest(
        tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = {"n": 1}
    writer = StateWriter(path, lambda: dict(state))
    writer.ask()  # no task: written here
    assert json.loads(path.read_text()) == {"n": 1}
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            state["n"] = 2
            writer.ask()
            scope.cancel()  # before the task got to it: written as the task ends
    assert json.loads(path.read_text()) == {"n": 2}
    assert not writer.running


def test_write_atomically_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, '{"a": 1}')
    write_atomically(path, '{"a": 2}')
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
