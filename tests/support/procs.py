"""One real process of a test cluster: started in its own process group with its output
appended to a log file, signalled as a group, stopped SIGTERM → grace → SIGKILL.

``LoggedProcess(label, log_path)`` is the part every harness shared (the coordinator
``Cluster`` of tests/coordinator/cluster.py, the participant ``Fleet`` of
tests/e2e/fleet.py, the Raft runner nodes of tests/coordinator/test_raft.py):

- ``start(argv, env=..., pipes=False)`` runs ``argv`` from the repository root with stdin
  from /dev/null and stdout and stderr appended to ``log_path`` (kept across restarts, so
  one file tells the whole story of a member); with ``pipes=True`` stdin and stdout are
  pipes for a line protocol and only stderr goes to the log. The process leads a session
  of its own, so signals reach whatever it started in its group.
- The log is watched (``tests.support.logs``) from the first start until ``close()``: a
  failing test shows its tail.
- ``stop()`` SIGTERMs the group (SIGCONT first if the test SIGSTOPped it), waits
  ``grace``, then SIGKILLs; ``kill9()`` SIGKILLs and reaps; ``close()`` SIGKILLs whatever
  of the group is left, whatever state the test left it in, and never raises.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support import logs

REPO = Path(__file__).resolve().parents[2]
STOP_GRACE = 10.0  # SIGTERM -> exit; then SIGKILL
REAP_TIMEOUT = 15.0  # SIGKILL -> reaped (a loaded machine may take a while to schedule it)


class LoggedProcess:
    """One child process and its log file (see the module docstring)."""

    def __init__(self, label: str, log_path: Path) -> None:
        self.label = label
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped by the test

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        rc = self.proc.returncode if self.proc else None
        return f"<{self.label} pid={pid} rc={rc}{' STOPPED' if self.stopped else ''}>"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self!r} was never started"
        return self.proc.pid

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              pipes: bool = False) -> subprocess.Popen[bytes]:
        """Start (or restart) the process; see the module docstring."""
        assert not self.alive(), f"{self!r} is already running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logs.watch(self.label, self.log_path)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                list(argv), cwd=REPO, env=None if env is None else dict(env),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log, stderr=log,
                start_new_session=True)
        self.stopped = False
        return self.proc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: signal.Signals) -> None:
        """``sig`` to the process group; nothing if the group is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def sigstop(self) -> None:
        self.signal_group(signal.SIGSTOP)
        self.stopped = True

    def sigcont(self) -> None:
        self.signal_group(signal.SIGCONT)
        self.stopped = False

    def kill9(self) -> int:
        """SIGKILL the group and reap the process; its exit code."""
        self.signal_group(signal.SIGKILL)
        self.stopped = False
        assert self.proc is not None
        return self.proc.wait(timeout=REAP_TIMEOUT)

    def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM the group, SIGKILL after ``grace``; the exit code."""
        assert self.proc is not None, f"{self!r} was never started"
        if self.stopped:
            self.sigcont()
        self.signal_group(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return self.kill9()

    def close(self) -> None:
        """SIGKILL whatever is left of the group (a SIGSTOPped one gets SIGCONT first so it
        can be reaped), reap, close pipes; never raises. The log stays for the report."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.signal_group(signal.SIGCONT)
            self.signal_group(signal.SIGKILL)  # the leader may be gone, its group not
            self.proc.wait(timeout=REAP_TIMEOUT)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self.stopped = False
        logs.unwatch(self.log_path)

    def tail(self, lines: int = logs.TAIL_LINES) -> str:
        """The end of the log, headed by this process's repr."""
        return f"----- {self!r} {self.log_path}\n{logs.tail(self.log_path, lines)}"
