"""The child's side of an instance's spawn: its shell command, and the gate on its record.

``shell_command`` is the ``sh -c`` argument the supervisor runs. ``gated_fork`` forks
while the agent's record of the instance is being written (``agentstate``): the child
waits on a pipe, before its isolation set-up and its exec, until the parent says the
record is on disk (``GATE_OPEN``). So the write's fsync and the fork (tens of ms for a
large agent process) take the time of the longer one, not their sum, and still no process
runs the app before a record names it: a child whose pipe ends first (the agent died) or
that waited ``GATE_TIMEOUT`` exits without exec'ing anything.
"""

from __future__ import annotations

import errno
import os
import re
import select
import subprocess
from collections.abc import Awaitable, Callable
from typing import Final

import trio

GATE_OPEN: Final = b"1"
# A child waits at most this long for its record. Its own pipe ends when the agent dies,
# unless a sibling forked meanwhile holds a copy of the write end (until its own exec, or
# its own end of waiting): the bound ends such a pair too.
GATE_TIMEOUT: Final = 10.0
_SHELL_SYNTAX = re.compile(r"[;&|<>()`$\\\n*?\[\]{}~#!]|^\s*\w+=")


def shell_command(command: str) -> str:
    """The ``sh -c`` argument for ``command``: a simple command is ``exec``'d, so the app is
    the group leader and gets SIGTERM itself (some shells, dash among them, fork it)."""
    if (_SHELL_SYNTAX.search(command) or not command.strip()
            or command.split()[0] == "exec"):
        return command
    return f"exec {command}"


def gated(read_end: int, write_end: int, then: Callable[[], None]) -> Callable[[], None]:
    """A ``preexec_fn``: wait until ``GATE_OPEN`` arrives on the pipe, then run ``then``
    (the isolation set-up); raise when the pipe ends or ``GATE_TIMEOUT`` passes first (the
    child exits, nothing is exec'd). The child closes its copy of the write end first.
    Only syscalls in the child, as in ``isolation.child_setup``."""
    wait = select.select

    def setup() -> None:
        os.close(write_end)
        readable, _, _ = wait([read_end], [], [], GATE_TIMEOUT)
        if not readable or os.read(read_end, 1) != GATE_OPEN:
            raise OSError(errno.ECANCELED, "the agent did not record the instance")
        then()

    return setup


async def gated_fork(fork: Callable[[Callable[[], None]], Awaitable[trio.Process]],
                     preexec: Callable[[], None], record: Callable[[], Awaitable[None]]
                     ) -> trio.Process:
    """``fork(preexec_fn)`` with its child held until ``record()`` returned (see the module
    docstring). Raises what the fork raised (OSError, SubprocessError)."""
    read_end, write_end = os.pipe()
    forked: list[trio.Process] = []
    failed: list[OSError | subprocess.SubprocessError] = []

    async def open_gate() -> None:
        try:
            await record()
            os.write(write_end, GATE_OPEN)
        finally:
            os.close(write_end)  # unwritten, the child reads the pipe's end and exits

    async def spawn() -> None:
        try:
            forked.append(await fork(gated(read_end, write_end, preexec)))
        except (OSError, subprocess.SubprocessError) as exc:
            failed.append(exc)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_gate)
            nursery.start_soon(spawn)
    finally:
        os.close(read_end)
    if failed:
        raise failed[0]
    return forked[0]
