"""The agent's ``<data_dir>/state.json``: what a restarted agent needs.

It holds the signal ledger, the instance sequence, offline, routes, standbys, apps scaled
to zero, debug sessions and each instance's record (config, pid, start time).
``load_state`` reads it back at the agent's start (the caller adopts the instances and
routes it names).

Writing. Every change asks for a write (``StateWriter.ask``, which returns at once); the
writer task writes the file atomically (temp file, fsync, rename) in a worker thread, so
an fsync (6-12 ms on a busy disk) never stalls the event loop, and one write at a time:
the asks made while a write runs are covered by the next one, whose document is built on
the event loop when it begins, from the tables as they are then. The file therefore only
ever moves forward, and a burst of changes (an instance spawned, ready, routed) costs one
or two writes. A document equal to the last one written (a change of state the file does
not record, such as an instance becoming ready) is not written again.

Ordering against a crash (``kill -9`` at any moment): what the agent tells or starts
outside itself waits for ``flush`` (``Agent.persisted``), which returns once everything
asked so far is on disk:

- every RPC answer (``superagent.rpc.server``): a coordinator acts on it, so what it says
  (instances started or stopped, routes switched, the ledger's result) must survive;
- a new process (``supervisor.Instance.keep_record``): the instance's record is on disk
  before it is spawned and its pid right after, before it can be ready and routed. An
  agent killed before the pid is written finds the record without one and starts the
  instance afresh, after a SIGKILL of whatever is in its cgroup; killed after it, it
  adopts the process.

What is asked but not flushed may be lost: the routes a cold start applied after the app
was ready (``scaletozero.resume_cold_starts`` routes the recorded instances again), a
restarted instance's new pid (the old one is gone: the instance is started afresh). When
no writer task runs (before the agent's run, after it ended) ``ask`` writes at once, on
the caller's thread, as it always did; the task's end writes what was still asked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from superagent.participant.agentview import AgentView
from superagent.participant.errors import ParticipantError, StateWriteError
from superagent.participant.signals import SignalLedger

STATE_FILE = "state.json"
STATE_VERSION = 1
WRITE_RETRY: Final = 1.0  # seconds before a failed write (a full disk) is tried again
log = structlog.get_logger("superagent.participant")


def load_state(agent: AgentView) -> dict[str, Any]:
    path = agent.config.data_dir / STATE_FILE
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ParticipantError(f"cannot read {path}: {exc}") from None
    agent.ledger = SignalLedger.from_json(doc.get("ledger", {}))
    agent._seq = int(doc.get("seq", 0))
    agent.is_offline = bool(doc.get("offline", False))
    agent.debug_sessions.load(doc.get("debug", {}))
    return doc


def document(agent: AgentView) -> dict[str, Any]:
    """What state.json holds, as of now."""
    return {
        "version": STATE_VERSION, "node": agent.config.node, "seq": agent._seq,
        "offline": agent.is_offline, "routes": agent.routes, "standby": agent.standby,
        "cold": [cold.to_json() for cold in agent.cold.values()],
        "ledger": agent.ledger.to_json(),
        "debug": agent.debug_sessions.to_json(),
        "instances": [inst.to_record() for inst in agent.instances.values()],
    }


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename); blocking."""
    tmp = path.with_suffix(".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(kw_only=True, slots=True)
class WriteLedger:
    """Which asks a write covers (pure: the writer's bookkeeping).

    Asks are numbered 1, 2, ...; a write begun after ask ``n`` covers every ask up to
    ``n`` (its document is built when it begins). One write runs at a time.
    """

    asked: int = 0  # the newest ask
    written: int = 0  # every ask up to this one is on disk
    writing: int = 0  # the newest ask the write under way covers (0: none runs)
    failed: int = 0  # the newest ask whose write failed (and no later write covered it)

    def ask(self) -> int:
        self.asked += 1
        return self.asked

    def begin(self) -> int:
        """The write to begin now covers asks up to the returned one; 0 when one runs
        already or nothing new is asked."""
        if self.writing or self.written >= self.asked:
            return 0
        self.writing = self.asked
        return self.writing

    def done(self, *, ok: bool) -> None:
        """The write under way ended (``ok``: on disk)."""
        if ok:
            self.written = self.writing
            self.failed = self.failed if self.failed > self.written else 0
        else:
            self.failed = self.writing
        self.writing = 0

    def covered(self, ask: int) -> bool:
        return self.written >= ask

    def lost(self, ask: int) -> bool:
        """The write that covered ``ask`` failed, and none has covered it since."""
        return not self.covered(ask) and self.failed >= ask


class StateWriter:
    """Writes state.json off the event loop (see the module docstring): ``ask`` after a
    change, ``await flush()`` before telling or starting anything that depends on it;
    ``run`` is the writer task."""

    def __init__(self, path: Path, build: Callable[[], dict[str, Any]], *,
                 write: Callable[[Path, str], None] = write_atomically) -> None:
        self.path = path
        self._build = build
        self._write = write
        self.ledger = WriteLedger()
        self.running = False
        self.writes = 0  # files written (figures, tests)
        self._last = ""  # the text last written
        self._error = ""
        self._wanted = trio.Event()  # an ask waits for the writer task
        self._ended = trio.Event()  # set, then replaced, whenever a write ends

    def __repr__(self) -> str:
        return (f"<StateWriter {self.path} asked={self.ledger.asked}"
                f" written={self.ledger.written} running={self.running}>")

    def ask(self) -> int:
        """Ask for a write of the state as it will be; returns the ask's number."""
        ask = self.ledger.ask()
        if self.running:
            self._wanted.set()
        else:
            self._write_now()
        return ask

    async def flush(self, ask: int | None = None) -> None:
        """Return once every ask up to ``ask`` (default: all so far) is on disk; raises
        StateWriteError when the write covering it failed."""
        wanted = self.ledger.asked if ask is None else ask
        while not self.ledger.covered(wanted):
            if self.ledger.lost(wanted):
                raise StateWriteError(f"cannot write {self.path}: {self._error}",
                                      path=str(self.path))
            if not self.running:
                self._write_now()
                continue
            ended = self._ended
            self._wanted.set()
            await ended.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Write whenever asked, until cancelled; then write what is still asked."""
        self.running = True
        try:
            task_status.started()
            while True:
                await self._wanted.wait()
                self._wanted = trio.Event()
                if not self.ledger.begin():
                    continue
                text = json.dumps(self._build())  # on the loop: the tables as they are now
                error = None
                if text != self._last:
                    try:  # the thread runs to its end even when the task is cancelled
                        await trio.to_thread.run_sync(self._write, self.path, text)
                    except OSError as exc:
                        error = exc
                ok = self._ended_write(text, error)
                self._ended.set()
                self._ended = trio.Event()
                if not ok:
                    await trio.sleep(WRITE_RETRY)
                    self._wanted.set()  # what is asked is still to be written
        finally:
            self.running = False
            if self.ledger.writing:  # cancelled between its begin and its end
                self.ledger.done(ok=False)
            if not self.ledger.covered(self.ledger.asked):
                self._write_now()
            self._ended.set()

    def _write_now(self) -> None:
        """Write on the caller's thread (no writer task runs); failures are logged and
        left to ``flush``."""
        if not self.ledger.begin():
            return
        text = json.dumps(self._build())
        error = None
        if text != self._last:
            try:
                self._write(self.path, text)
            except OSError as exc:
                error = exc
        self._ended_write(text, error)

    def _ended_write(self, text: str, error: OSError | None) -> bool:
        """Book a write of ``text`` that ended (``error``: how it failed; an unchanged
        ``text`` was not written and counts as on disk); True when it is."""
        if error is not None:
            self._error = str(error)
            log.error("state not written", path=str(self.path), error=str(error))
        elif text != self._last:
            self._last, self.writes = text, self.writes + 1
        self.ledger.done(ok=error is None)
        return error is None
