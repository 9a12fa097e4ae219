"""A command whose output a test reads as it comes: ``superagent logs -f``, ``debug``...

``PipedProcess(argv)`` runs ``argv`` with stdout and stderr as text pipes and reads each
on a daemon thread, handing every line to ``on_out`` or ``on_err`` under ``lock``; a
subclass says what it keeps of them (and reads what it kept under the same lock). Its
own attributes must be set before it calls ``PipedProcess.__init__``, which starts the
threads. ``close()`` SIGTERMs, waits, then SIGKILLs; call it in a ``finally``.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from typing import IO

STOP_GRACE = 10.0  # SIGTERM -> exit; then SIGKILL


class PipedProcess:
    """One process and the two threads reading its output (see the module docstring)."""

    def __init__(self, argv: list[str]) -> None:
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for pipe, handle in ((self.proc.stdout, self.on_out), (self.proc.stderr, self.on_err)):
            threading.Thread(target=self._read, args=(pipe, handle), daemon=True).start()

    def _read(self, pipe: IO[str], handle: Callable[[str], None]) -> None:
        for raw in pipe:
            with self.lock:
                handle(raw)

    def on_out(self, raw: str) -> None:
        """One line of stdout (``lock`` held)."""

    def on_err(self, raw: str) -> None:
        """One line of stderr (``lock`` held)."""

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
