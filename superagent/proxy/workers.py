"""Starting proxy worker processes and handing them snapshots: what every driver does.

Both drivers of the workers — the standalone proxy's master and the participant
agent's proxy driver — start a worker the same way (``python -P -m
superagent.proxy.worker`` with a ready pipe, waiting for its line with a deadline; ``-P``
so that it imports the package its driver runs, never a ``superagent/`` folder in the
current directory) and push a snapshot the same way (send it over the control socket,
and count it applied only when the worker acknowledged that very version). Asking all
workers, restarting and stopping them is ``superagent.proxy.workerset``'s.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import trio

from superagent.errors import ConfigError
from superagent.procs import kill
from superagent.proxy import control
from superagent.proxy.errors import WorkerStartError

READY_TIMEOUT = 30.0  # a worker imports trio and httptools: a second normally, more under load
KILL_MARGIN = 5.0  # extra seconds after the workers' grace period before SIGKILL
CONTROL_TIMEOUT = 5.0  # a worker answers control requests from its event loop, at once
# ``-P``: ``python -m`` would put the current directory first on the worker's sys.path, so
# a driver started from a directory holding a ``superagent/`` folder (a source checkout)
# would run workers from that folder rather than the package the driver itself runs.
# PYTHONPATH is still honoured (``-I`` would drop it, and the user site).
WORKER_COMMAND = (sys.executable, "-P", "-m", "superagent.proxy.worker")


async def spawn_worker(control_path: str, *, parser: str, grace: float,
                       stdout: int | None = None, stderr: int | None = None,
                       extra_fds: Sequence[int] = (), extra_args: Sequence[str] = (),
                       new_session: bool = False,
                       ready_timeout: float = READY_TIMEOUT) -> trio.Process:
    """Start one worker and wait until it serves its control socket.

    Raises WorkerStartError (after killing and reaping it) when the worker exits or says
    nothing within ``ready_timeout``. The caller owns the returned process.
    """
    read_fd, write_fd = os.pipe()
    try:
        try:
            proc = await trio.lowlevel.open_process(
                [*WORKER_COMMAND, "--control", control_path,
                 "--parser", parser, "--grace", str(grace), "--ready-fd", str(write_fd),
                 *extra_args],
                pass_fds=(write_fd, *extra_fds),
                stdout=stdout, stderr=stderr, start_new_session=new_session)
        finally:
            os.close(write_fd)
        stream = trio.lowlevel.FdStream(read_fd)
        read_fd = -1  # the stream owns it now
        async with stream:
            ready = b""
            with trio.move_on_after(ready_timeout):
                ready = await stream.receive_some(64)
    finally:
        if read_fd >= 0:
            os.close(read_fd)
    if not ready:
        with trio.CancelScope(shield=True):
            await kill([proc], reap_timeout=KILL_MARGIN)
        raise WorkerStartError(f"proxy worker at {control_path} was not ready within "
                               f"{ready_timeout}s (exit status {proc.returncode})")
    return proc


async def push_snapshot(control_path: str, wire: dict[str, Any]) -> None:
    """Send a snapshot document; returns once the worker acknowledged its version.

    Raises ControlError (unreachable) or ConfigError (refused, with the worker's reason).
    """
    reply = await control.call(control_path, {"type": "snapshot", "snapshot": wire},
                               timeout=CONTROL_TIMEOUT)
    if not reply.get("ok") or reply.get("version") != wire["version"]:
        raise ConfigError(str(reply.get("error", reply)))
