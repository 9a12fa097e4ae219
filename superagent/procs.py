"""Stopping child processes: SIGTERM, a grace period, then SIGKILL — written once.

Theory of operation. Every role stops processes the same way (trio's
``_posix_deliver_cancel`` is the model): signal SIGTERM, *wait* on the process — never
poll it — for at most ``grace`` seconds, then SIGKILL what is left and wait at most
``reap_timeout`` for the kernel to let it go (longer means a process stuck in D state;
the caller logs it and moves on rather than hanging a shutdown).

Two targets:

- ``terminate(children, ...)`` signals each process alone (``kill`` is its second half,
  for a process that gets no grace). The standalone proxy's workers
  share the master's process group, so they must never be stopped by group.
- ``terminate_group(leader, ...)`` signals the whole process group that ``leader`` leads
  (it was started with ``start_new_session``): builds and app instances, whose shells and
  helpers must go with them. The final SIGKILL always goes to the group, even when the
  leader exited by itself, so nothing it left behind survives. With ``members=True`` the
  grace period also waits for the other members of the group (a shell that ran the app as
  its child exits at once; the app must still get its grace): each member is waited for
  on a pidfd, as a process that is not our child can only be waited for that way.

Signalling a group by number is only safe while its leader has not been reaped, or was
reaped an instant ago: the number cannot be handed out again while any member of the
group lives, and once the group is empty it is reused only after the pid space wraps
around. Callers therefore stop a leader they still hold, or one their own wait just
reaped — never one that exited long ago.

A signal that finds no process (``ProcessLookupError``) is the normal end of a race with
the exit. ``PermissionError`` is not: the group exists but no member may be signalled
by us — its number now belongs to another user's session, or a member changed its
credentials (a setuid program). Retrying cannot help and raising from a stop path (often
a shielded ``finally``) would hide the error that led there and leave the leader
unreaped, so it is logged as a warning and the stop goes on to its bounded waits, as
trio does when a kill fails; what outlives them is reported by the caller (e.g. "not
reaped after SIGKILL"). Silencing it, as one copy of this code did, hid processes that
survived their stop.

This module imports no role package: the participant, the proxy and the coordinator
all use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import psutil
import structlog
import trio

REAP_TIMEOUT = 5.0  # after SIGKILL the kernel reaps within ms; longer means a D-state process

log = structlog.get_logger("superagent.procs")


class Handle(Protocol):
    """A process we may not be the parent of (an adopted one, a proxy worker slot):
    it can say that it exited, be signalled and be waited for."""

    @property
    def pid(self) -> int | None: ...

    @property
    def exited(self) -> bool: ...

    def send_signal(self, signum: int) -> None: ...

    async def wait(self) -> object: ...


Child = trio.Process | Handle


def has_exited(child: Child) -> bool:
    """True once ``child`` is known to have ended."""
    if isinstance(child, trio.Process):
        return child.returncode is not None
    return child.exited


def signal_group(pgid: int, signum: int) -> None:
    """Send ``signum`` to process group ``pgid``; a group that is gone is fine, one we may
    not signal is logged (see the module docstring)."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        log.warning("may not signal process group", pgid=pgid,
                    signal=signal.Signals(signum).name, error=str(exc))


def _signal(child: Child, signum: int) -> None:
    # trio.Process.send_signal does nothing once the process was reaped, so a recycled
    # pid is never hit; a Handle signals through its pidfd or not at all.
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signum)


async def _wait_all(children: Sequence[Child]) -> None:
    async with trio.open_nursery() as nursery:
        for child in children:
            nursery.start_soon(child.wait)


async def terminate(children: Sequence[Child], *, grace: float,
                    reap_timeout: float = REAP_TIMEOUT, what: str = "process") -> list[Child]:
    """SIGTERM each running child, wait up to ``grace`` seconds for all of them, SIGKILL
    the rest and wait up to ``reap_timeout``. Returns those still running after that.

    Children are signalled one by one, never by group. Not shielded: a caller that must
    finish stopping even when cancelled shields the call.
    """
    running = [child for child in children if not has_exited(child)]
    for child in running:
        _signal(child, signal.SIGTERM)
    with trio.move_on_after(grace):
        await _wait_all(running)
    running = [child for child in running if not has_exited(child)]
    for child in running:
        log.warning(f"{what} outlived the grace period; killing", pid=child.pid, grace=grace)
    return await kill(running, reap_timeout=reap_timeout)


async def kill(children: Sequence[Child], *, reap_timeout: float = REAP_TIMEOUT) -> list[Child]:
    """SIGKILL each running child and wait up to ``reap_timeout``; returns those still
    running. Not shielded."""
    running = [child for child in children if not has_exited(child)]
    for child in running:
        _signal(child, signal.SIGKILL)
    with trio.move_on_after(reap_timeout):
        await _wait_all(running)
    return [child for child in running if not has_exited(child)]


async def terminate_group(leader: Child, *, grace: float, reap_timeout: float = REAP_TIMEOUT,
                          members: bool = False,
                          kill_rest: Callable[[], Awaitable[None]] | None = None) -> bool:
    """Stop the process group ``leader`` leads: SIGTERM to the group, up to ``grace``
    seconds for the leader (and with ``members``, every member) to exit, SIGKILL to the
    group, ``kill_rest`` if given (a cgroup's kill), then up to ``reap_timeout`` for the
    leader. Returns True once the leader is reaped.

    A leader that has already exited gets only the SIGKILL to its group (members it left
    behind): call this only just after reaping it (see the module docstring). Not
    shielded: a caller that must finish stopping even when cancelled shields the call.
    """
    pgid = leader.pid
    if pgid is None:
        return True
    if not has_exited(leader):
        signal_group(pgid, signal.SIGTERM)
        with trio.move_on_after(grace):
            await leader.wait()
            if members:
                await wait_group(pgid)
    signal_group(pgid, signal.SIGKILL)
    if kill_rest is not None:
        await kill_rest()
    with trio.move_on_after(reap_timeout):
        await leader.wait()
    return has_exited(leader)


async def wait_group(pgid: int) -> None:
    """Return once no process of group ``pgid`` runs (zombies do not count: PID 1 of a
    container may never reap the orphans of a shell that exited).

    Each member found is waited for on a pidfd; the group is listed again afterwards, in
    case a member forked meanwhile. Listing walks /proc, so it runs in a thread.
    """
    while members := await trio.to_thread.run_sync(group_members, pgid):
        for pid in members:
            await _wait_pid(pid, pgid)


def group_members(pgid: int) -> list[int]:
    """The pids of the live (not zombie) processes of group ``pgid``."""
    try:
        os.killpg(pgid, 0)  # cheap: an empty group ends the question here
    except ProcessLookupError:
        return []
    except PermissionError:
        pass  # it exists; psutil tells whose it is
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


async def _wait_pid(pid: int, pgid: int) -> None:
    """Wait for ``pid`` to exit, if it is still a member of ``pgid``."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        # Opened after the listing: the pid may belong to a newcomer by now. Checked after
        # the pidfd pins the process, so the answer holds for what the pidfd waits on.
        try:
            if os.getpgid(pid) != pgid:
                return
        except ProcessLookupError:
            return
        await trio.lowlevel.wait_readable(pidfd)  # readable once the process exited
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)


__all__ = ["REAP_TIMEOUT", "Child", "Handle", "group_members", "has_exited", "kill",
           "signal_group", "terminate", "terminate_group", "wait_group"]
