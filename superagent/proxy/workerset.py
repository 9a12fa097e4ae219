"""The proxy workers of one driver, as a set: ask them all, restart the dead, stop them.

Theory of operation. Both drivers of the workers — the standalone proxy's master
(``superagent.proxy.master``) and the participant agent's proxy driver
(``superagent.participant.proxydriver``) — hold N worker positions (``WorkerSlot``), each
filled by one process at a time, and do the same things with them:

- **ask every worker at once** (``each``, ``call``, ``push``, ``stats``): one task per
  worker in a nursery, so one slow worker costs its own timeout, not N of them; each
  answer is an ``Outcome`` naming the slot, so the driver decides what a refusal means
  (the master refuses a reload, the agent's driver rolls the others back);
- **restart a worker that died** (``supervise``): wait on its process (never poll), wait
  the slot's backoff (0.5, 1, 2, then 5 s between restarts), and call the driver's
  ``restart`` — which spawns and brings the new worker up to date, since only the driver
  knows how (lifeline or detached session, log files, drain marks);
- **stop them** (``stop``): SIGTERM to each worker, the grace period, SIGKILL
  (``superagent.procs.terminate``; workers are signalled one by one, as the master's share
  its own process group).

What stays with each driver is what differs: how a worker is spawned, whether workers
outlive the driver (the agent's are adopted by the next agent), and the record it keeps.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
import trio

from superagent.backoff import Backoff
from superagent.errors import ConfigError
from superagent.procs import REAP_TIMEOUT, Child, has_exited, terminate
from superagent.proxy import control
from superagent.proxy.errors import WorkerStartError
from superagent.proxy.metrics import merge
from superagent.proxy.workers import CONTROL_TIMEOUT, push_snapshot

RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0)  # seconds before restarting a worker that died

log = structlog.get_logger("superagent.proxy")

T = TypeVar("T")


class WorkerSlot:
    """One worker position: the process filling it now (our child, or a handle on one a
    previous driver started) and its restart history."""

    __slots__ = ("backoff", "control_path", "create_time", "index", "process", "restarts")

    def __init__(self, index: int, control_path: str) -> None:
        self.index = index
        self.control_path = control_path
        self.process: Child | None = None
        self.create_time = 0.0  # psutil's start time of the process, for adoption records
        self.restarts = 0
        self.backoff = Backoff.ramp(*RESTART_DELAYS)  # never reset: a flapping worker stays slow

    def __repr__(self) -> str:
        how = ("dead" if not self.running else
               "own" if isinstance(self.process, trio.Process) else "adopted")
        return f"<WorkerSlot #{self.index} pid={self.pid} {how} restarts={self.restarts}>"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and not has_exited(self.process)

    @property
    def returncode(self) -> int | None:
        """The exit status of our own child; None while running or for an adopted one."""
        return self.process.returncode if isinstance(self.process, trio.Process) else None

    async def wait_exit(self) -> None:
        """Return once the current process exited (at once when there is none)."""
        if self.process is not None:
            await self.process.wait()


@dataclass(frozen=True, kw_only=True)
class Outcome(Generic[T]):
    """What one worker made of a request: its answer, or why there is none."""

    slot: WorkerSlot
    value: T | None = None
    error: str | None = None  # unreachable, or refused with the worker's reason

    @property
    def ok(self) -> bool:
        return self.error is None


class WorkerSet:
    """N worker slots and what is done to all of them; see the module docstring."""

    def __init__(self, control_paths: Sequence[str], *, name: str = "worker") -> None:
        self.slots = [WorkerSlot(i, path) for i, path in enumerate(control_paths)]
        self.name = name  # "worker" or "proxy worker": how log lines call one
        self.stopping = False

    def __repr__(self) -> str:
        pids = ",".join(str(s.pid) if s.running else "-" for s in self.slots)
        return f"<WorkerSet [{pids}]{' stopping' if self.stopping else ''}>"

    def __len__(self) -> int:
        return len(self.slots)

    def running(self) -> list[WorkerSlot]:
        return [slot for slot in self.slots if slot.running]

    # ------------------------------------------------------------------ asking
    async def each(self, action: Callable[[WorkerSlot], Awaitable[T]],
                   slots: Sequence[WorkerSlot] | None = None) -> list[Outcome[T]]:
        """Run ``action`` for every slot (default: every running one) concurrently.

        A ControlError or ConfigError of one slot becomes its outcome's ``error``; the
        outcomes come back in slot order.
        """
        outcomes: dict[int, Outcome[T]] = {}

        async def one(slot: WorkerSlot) -> None:
            try:
                outcomes[slot.index] = Outcome(slot=slot, value=await action(slot))
            except (control.ControlError, ConfigError) as exc:
                outcomes[slot.index] = Outcome(slot=slot, error=str(exc))

        async with trio.open_nursery() as nursery:
            for slot in self.running() if slots is None else slots:
                nursery.start_soon(one, slot)
        return [outcomes[index] for index in sorted(outcomes)]

    async def call(self, message: dict[str, Any], slots: Sequence[WorkerSlot] | None = None,
                   ) -> list[Outcome[dict[str, Any]]]:
        """Send ``message`` to every worker; a reply without ``ok`` counts as a refusal
        (its ``value`` is kept: the reply may say more)."""
        outcomes = await self.each(
            lambda slot: control.call(slot.control_path, message, timeout=CONTROL_TIMEOUT),
            slots)
        return [o if o.value is None or o.value.get("ok")
                else Outcome(slot=o.slot, value=o.value,
                             error=str(o.value.get("error", o.value)))
                for o in outcomes]

    async def push(self, wire: dict[str, Any], slots: Sequence[WorkerSlot] | None = None,
                   ) -> list[Outcome[None]]:
        """Send a snapshot document; a slot's outcome is ok once it acknowledged that very
        version (``superagent.proxy.workers.push_snapshot``)."""
        return await self.each(lambda slot: push_snapshot(slot.control_path, wire), slots)

    async def stats(self, slots: Sequence[WorkerSlot] | None = None
                    ) -> tuple[dict[str, Any], int]:
        """The figures of every answering worker, merged, and how many answered."""
        parts = []
        for outcome in await self.call({"type": "stats"}, slots):
            if outcome.value is None:
                log.warning(f"{self.name} did not answer", worker=outcome.slot.index,
                            error=outcome.error)
            elif outcome.ok:
                parts.append(outcome.value["stats"])
        return merge(parts), len(parts)

    # ------------------------------------------------------------------ restarts / stop
    async def supervise(self, slot: WorkerSlot,
                        restart: Callable[[WorkerSlot], Awaitable[None]]) -> None:
        """Restart ``slot``'s worker whenever it exits, until ``stopping``.

        ``restart`` spawns a worker into the slot and brings it up to date; raising
        WorkerStartError means the new worker never became ready (retried after the
        backoff). Anything else ``restart`` wants to survive it handles itself.
        """
        while True:
            await slot.wait_exit()
            if self.stopping:
                return
            event = f"{self.name} exited; restarting"
            details: dict[str, object] = {"pid": slot.pid, "code": slot.returncode}
            while True:
                delay = slot.backoff.next()
                slot.restarts += 1
                log.error(event, worker=slot.index, delay=delay, **details)
                await trio.sleep(delay)
                if self.stopping:
                    return
                try:
                    await restart(slot)
                    break
                except WorkerStartError as exc:
                    event = f"{self.name} did not become ready; restarting"
                    details = {"error": str(exc)}

    async def stop(self, *, grace: float, reap_timeout: float = REAP_TIMEOUT) -> list[Child]:
        """Stop restarting, SIGTERM every running worker, SIGKILL those still there after
        ``grace``; returns those still running ``reap_timeout`` after that. Not shielded."""
        self.stopping = True
        processes = [slot.process for slot in self.running() if slot.process is not None]
        return await terminate(processes, grace=grace, reap_timeout=reap_timeout,
                               what=self.name)


__all__ = ["RESTART_DELAYS", "Outcome", "WorkerSet", "WorkerSlot"]
