"""A handle on an app process that an earlier life of the agent spawned.

Theory of operation
-------------------
Apps survive an agent restart (docs/ARCHITECTURE.md, Participant). The agent's state
file records each instance's pid and the process's start time; a restarted agent calls
``AdoptedProcess.open(pid, create_time)`` to take the process back:

1. ``os.pidfd_open(pid)`` pins *a* process with that pid;
2. psutil confirms that the process with that pid started at ``create_time`` (within
   ``CREATE_TIME_TOLERANCE``) and leads its own process group (it was started with
   ``start_new_session``, so its group is where the supervisor's signals go);
3. the pidfd is checked not to be readable yet. A pidfd becomes readable once its
   process has exited, so a process that died between steps 1 and 2 (its pid perhaps
   reused by the process psutil saw) is caught here: after this check the pidfd and
   psutil agree on one live process.

Any mismatch raises ``AdoptionFailed``: the app is gone and the caller starts a fresh
one. The handle looks like the part of ``trio.Process`` the supervisor uses (``pid``,
``returncode``, ``wait``, ``send_signal``), plus ``exited``: a ``superagent.procs.Handle``.
Its exit is awaited with
``trio.lowlevel.wait_readable(pidfd)`` — no polling. The agent is not the process's
parent, so the exit status is unknown: ``returncode`` is always None.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal

import psutil
import trio

from superagent.participant.errors import AdoptionFailed

# psutil derives a start time from the boot time, which /proc/stat gives in whole seconds
# and which two readings (two agent lives) may round differently; a pid is not reused
# within one second in practice, so this tolerance cannot mistake another process for ours.
CREATE_TIME_TOLERANCE = 1.0


def process_create_time(pid: int) -> float | None:
    """The start time psutil reports for ``pid`` (the value a state file records)."""
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


class AdoptedProcess:
    """A running process that is not the agent's child; see the module docstring.

    Owns its pidfd: closed once the exit has been seen (by ``exited`` or ``wait``).
    """

    returncode: int | None = None  # never known: the agent is not the parent

    def __init__(self, pid: int, pidfd: int, create_time: float) -> None:
        self.pid = pid
        self.create_time = create_time
        self._pidfd: int | None = pidfd
        self._waiter: trio.Event | None = None  # set when the current waiter finishes

    def __repr__(self) -> str:
        return f"<AdoptedProcess pid={self.pid} {'exited' if self.exited else 'running'}>"

    @classmethod
    def open(cls, pid: int, create_time: float) -> AdoptedProcess:
        """Take back the live process ``pid`` that started at ``create_time``.

        Raises ``AdoptionFailed`` when there is no such process, it started at another
        time (the pid was reused), it is not its own process group's leader, or it has
        already exited.
        """
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise AdoptionFailed("no such process", pid=pid) from None
        except OSError as exc:
            raise AdoptionFailed(f"cannot open a pidfd: {exc}", pid=pid) from exc
        try:
            try:
                proc = psutil.Process(pid)
                actual = float(proc.create_time())
                pgid = os.getpgid(pid)
            except (psutil.Error, ProcessLookupError) as exc:
                raise AdoptionFailed(f"process vanished: {exc}", pid=pid) from exc
            if abs(actual - create_time) > CREATE_TIME_TOLERANCE:
                raise AdoptionFailed(f"started at {actual}, not {create_time}: pid reused",
                                     pid=pid)
            if pgid != pid:
                raise AdoptionFailed(f"not a process group leader (group {pgid})", pid=pid)
            if _readable(pidfd):
                raise AdoptionFailed("already exited", pid=pid)
        except BaseException:
            os.close(pidfd)
            raise
        return cls(pid, pidfd, actual)

    @property
    def exited(self) -> bool:
        """True once the process has ended (it may still be a zombie of its real parent)."""
        if self._pidfd is None:
            return True
        if not _readable(self._pidfd):
            return False
        self._close()
        return True

    def send_signal(self, signum: int) -> None:
        """Signal the process through its pidfd (never a recycled pid); nothing once it
        has exited. Raises ProcessLookupError if it exited a moment ago."""
        if self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, signum)

    async def wait(self) -> None:
        """Return once the process has exited; any number of tasks may wait at once."""
        while not self.exited:
            waiter = self._waiter
            if waiter is not None:
                await waiter.wait()
                continue
            self._waiter = waiter = trio.Event()
            try:
                assert self._pidfd is not None
                # ClosedResourceError: another task saw the exit and closed the pidfd.
                with contextlib.suppress(trio.ClosedResourceError):
                    await trio.lowlevel.wait_readable(self._pidfd)
            finally:
                self._waiter = None
                waiter.set()

    def _close(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            with contextlib.suppress(RuntimeError):  # outside trio nobody can be waiting
                trio.lowlevel.notify_closing(fd)
            os.close(fd)


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


__all__ = ["CREATE_TIME_TOLERANCE", "AdoptedProcess", "process_create_time"]
