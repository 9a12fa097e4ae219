"""The worker set both proxy drivers share (``superagent.proxy.workerset``), with fake
workers: restart timing runs on trio's MockClock, so nothing really sleeps."""

from __future__ import annotations

import signal

import trio
import trio.testing

from superagent.errors import ConfigError
from superagent.proxy.errors import WorkerStartError
from superagent.proxy.workerset import RESTART_DELAYS, WorkerSet, WorkerSlot


class FakeWorker:
    """A worker process as the set sees it: exits when told, records its signals."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []
        self._exit = trio.Event()

    @property
    def exited(self) -> bool:
        return self._exit.is_set()

    def die(self) -> None:
        self._exit.set()

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        self.die()  # a worker stops at once on SIGTERM

    async def wait(self) -> None:
        await self._exit.wait()


async def test_a_dead_worker_is_restarted_after_the_ramp_of_delays(
        autojump_clock: trio.testing.MockClock) -> None:
    """Each exit waits the next delay (0.5, 1, 2, then 5 s) before ``restart``; a worker
    that never became ready is retried after the next delay; stop ends the loop."""
    workers = WorkerSet(["/nonexistent/w0.sock"])
    slot = workers.slots[0]
    slot.process = first = FakeWorker(100)
    restarted_at: list[float] = []
    spawned: list[FakeWorker] = []
    start = trio.current_time()

    async def restart(slot: WorkerSlot) -> None:
        restarted_at.append(trio.current_time() - start)
        if len(restarted_at) == 2:
            raise WorkerStartError("not ready")
        slot.process = worker = FakeWorker(100 + len(restarted_at))
        spawned.append(worker)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(workers.supervise, slot, restart)
        first.die()  # t=0: restarted at 0.5
        for kill_at in (30, 60, 90):
            await trio.sleep_until(start + kill_at)
            spawned[-1].die()
        await trio.sleep_until(start + 120)
        # t=30: restarted at 31, which fails (not ready) and is retried at 33;
        # t=60: restarted at 65; t=90: restarted at 95 (the ramp's last step repeats).
        assert restarted_at == [0.5, 31.0, 33.0, 65.0, 95.0]
        assert slot.restarts == 5
        assert workers.running() == [slot]
        assert await workers.stop(grace=1.0) == []
        assert spawned[-1].signals == [signal.SIGTERM]
        await trio.sleep(60)
    assert restarted_at[-1] == 95.0, "no restart after stop"
    assert RESTART_DELAYS == (0.5, 1.0, 2.0, 5.0)


async def test_each_reports_every_slot_in_order() -> None:
    """Errors of one worker become its outcome; the others' values come back in order."""
    workers = WorkerSet([f"/nonexistent/w{i}.sock" for i in range(3)])
    for i, slot in enumerate(workers.slots):
        slot.process = FakeWorker(200 + i)
    workers.slots[2].process = None  # dead: skipped unless asked for by name

    async def action(slot: WorkerSlot) -> int:
        if slot.index == 1:
            raise ConfigError("refused")
        await trio.sleep(0.01 * (3 - slot.index))  # answers arrive out of order
        return slot.index * 10

    outcomes = await workers.each(action)
    assert [(o.slot.index, o.value, o.error, o.ok) for o in outcomes] == [
        (0, 0, None, True), (1, None, "refused", False)]
    outcomes = await workers.call({"type": "ping"}, workers.slots)
    assert [o.slot.index for o in outcomes] == [0, 1, 2]
    assert all(o.value is None and o.error for o in outcomes), "no socket: all unreachable"
