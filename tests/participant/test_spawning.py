"""The spawn gated on the agent's record (``spawning.gated_fork``), with real processes:
the child runs nothing until the record is written, and nothing at all when the wait for
it ends otherwise (the agent cancelled, or gone)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import trio

from superagent.participant.spawning import gated_fork


def forker(marker: Path) -> Callable[[Callable[[], None]], trio.Process]:
    async def fork(preexec: Callable[[], None]) -> trio.Process:
        return await trio.lowlevel.open_process(
            ["/bin/sh", "-c", f"echo ran > {marker}"], stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=preexec, close_fds=True)
    return fork  # type: ignore[return-value]


async def test_the_child_runs_once_the_record_is_written(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    written = trio.Event()
    order: list[str] = []

    async def record() -> None:
        await written.wait()
        order.append("recorded")

    async def write_later() -> None:
        await trio.sleep(0.2)  # a window in which a child not held would have run
        assert not marker.exists()
        written.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_later)
        process = await gated_fork(forker(marker), lambda: None, record)
    assert order == ["recorded"]
    assert await process.wait() == 0
    assert marker.read_text() == "ran\n"


async def test_a_child_whose_record_is_never_written_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with trio.move_on_after(0.3) as scope:  # the agent gives up (as when it goes away)
        await gated_fork(forker(marker), lambda: None, trio.sleep_forever)
    assert scope.cancelled_caught
    # gated_fork returned after the fork's thread did: the child had exited, unexec'd
    assert not marker.exists()
