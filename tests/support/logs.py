"""Process logs in the failure report: every test process's output goes to a file, and a
failing test shows the tail of each.

A harness that starts a process calls ``watch(label, path)`` for its log file (``procs``
does it for every ``LoggedProcess``). The ``pytest_runtest_makereport`` hook below,
imported by tests/conftest.py, adds a section "process logs" to the report of any failing
phase (setup, call or teardown) with the last ``TAIL_LINES`` lines of each watched file,
at most ``TAIL_BYTES`` of each and ``TOTAL_BYTES`` in all, so a failure under load says
what the processes were doing without flooding the output.

A file stays watched until its owner calls ``unwatch`` (on close) and the test that closed
it has finished, so logs of a module-scoped cluster show for every failing test that used
it, and logs of a process closed in a failing teardown still show.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import pytest

TAIL_LINES = 40  # per process: enough for the last few requests and the error
TAIL_BYTES = 8_000  # per process, read from the end of the file
TOTAL_BYTES = 64_000  # for one report, however many processes ran


@dataclass
class _Watched:
    label: str
    path: Path
    closed: bool = False


_watched: dict[Path, _Watched] = {}


def watch(label: str, path: Path) -> None:
    """Show ``path``'s tail under ``label`` when a test fails (until unwatched)."""
    _watched[path] = _Watched(label, path)


def unwatch(path: Path) -> None:
    """The process behind ``path`` is gone: forget it once the current test ends."""
    if path in _watched:
        _watched[path].closed = True


def tail(path: Path, lines: int = TAIL_LINES, limit: int = TAIL_BYTES) -> str:
    """The last ``lines`` lines of ``path`` within its last ``limit`` bytes."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - limit))
            data = file.read()
    except OSError as exc:
        return f"(no log: {exc})"
    text = data.decode(errors="replace").splitlines()[-lines:]
    return "\n".join(text) if text else "(empty)"


def report() -> str:
    """The tails of every watched log, bounded in total."""
    parts: list[str] = []
    budget = TOTAL_BYTES
    for entry in list(_watched.values()):
        part = f"----- {entry.label} ({entry.path})\n{tail(entry.path)}"
        if len(part) > budget:
            parts.append(f"----- ... {len(_watched) - len(parts)} more logs left out")
            break
        budget -= len(part)
        parts.append(part)
    return "\n".join(parts)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Append the watched logs' tails to a failing phase's report; after the teardown
    phase, drop the logs of processes that were closed."""
    result = yield
    if result.failed and _watched:
        result.sections.append((f"process logs ({result.when})", report()))
    if result.when == "teardown":
        for path in [p for p, entry in _watched.items() if entry.closed]:
            del _watched[path]
    return result
