"""Following one output file of an app instance: complete lines out, the file bounded.

Blocking I/O, called from a worker thread by ``logs.LogHub`` (see ``logs`` for the
files themselves and the fan-out). ``output_tails`` reads the ends of an instance's two
files for the message of a start that failed.

1. **Split (pure).** ``LineSplitter`` turns the bytes read from one file into complete
   lines. A partial last line waits for its newline; a line longer than ``MAX_LINE`` is
   cut at ``MAX_LINE`` bytes, flagged ``cut``, and the rest of it up to the next newline
   is discarded.
2. **Follow (blocking I/O).** ``FileFollower`` keeps one open read fd per file and reads
   from an offset: the end of the file when attaching to an instance that was already
   running (after an agent restart), or 0 for a fresh one. A file that became shorter
   than the offset was truncated by someone else: reading restarts at 0. A path that
   now names a different inode was rotated by rename (the supervisor does that before a
   spawn): the old fd is drained first, then the new file is read from 0.
3. **Bound (copy-truncate; what cannot be read is dropped).** After each read a file is
   truncated when the reader has caught up with it past ``max_bytes`` (the normal case),
   or when it is over ``hard_bytes`` (default: twice ``MAX_BYTES``) however far behind the
   reader is — the app writes faster than it is read (``read_budget`` per file per poll;
   ``FileLimits`` holds these numbers). A truncate copies what was read of the file (its
   last ``hard_bytes`` at most) to ``<name>.1.tmp``, reads and copies up to one more
   ``read_budget`` of the rest, truncates the file to 0 in place and renames the copy
   over ``<name>.1``. What is still unread then is dropped: its size is added to
   ``dropped_bytes`` (of the follower, the instance and the hub's stats) and one line
   ``[... N bytes of output dropped ...]`` stands for it, both in the captured lines and
   at the end of ``.1``, after the line the gap cut short (captured flagged ``cut``).
   The app keeps its fd; since it writes with ``O_APPEND``, its next write lands at the
   new end of file (offset 0), not at its old offset, so no signal or restart of the app
   is needed.
   *Disk bound, whatever the write rate:* a file is over ``hard_bytes`` for one poll
   round at most, so it holds at most ``hard_bytes`` plus what the app writes in one
   round (``logs.POLL_INTERVAL`` plus the round's reads); ``.1`` holds at most ``hard_bytes +
   read_budget`` plus the marker line; ``.1.tmp`` exists only during a truncate.
   *Race window:* bytes the app writes between the ``fstat`` that measures what is
   dropped and the ``truncate(2)`` right after it are lost without being counted. The
   two syscalls are adjacent, but the thread takes the GIL back in between: usually a
   few microseconds (about 1 KB of a flood), milliseconds when the trio thread holds the
   GIL or no CPU is free. That is the cost of copy-truncate (logrotate's ``copytruncate``
   has the same window) for not having to signal or restart the app.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAX_LINE = 64 * 1024  # bytes; a longer line is cut so one runaway line cannot eat the buffers
MAX_BYTES = 10 * 1024**2  # a log file read past this size is rotated by copy-truncate
HARD_BYTES = 2 * MAX_BYTES  # a log file over this size is truncated even when not all read:
#                            room for a burst the reader catches up with, never for a flood
READ_CHUNK = 256 * 1024  # bytes per read(2)
READ_BUDGET = 4 * 1024**2  # bytes per file per poll, so one chatty app cannot starve others


class LineSplitter:
    """Bytes in, complete lines out: ``(line_without_newline, cut)`` pairs."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._skipping = False  # inside the discarded rest of a cut line

    def __repr__(self) -> str:
        return f"<LineSplitter pending={len(self._buf)} skipping={self._skipping}>"

    @property
    def pending(self) -> int:
        """Bytes of a partial line waiting for its newline."""
        return len(self._buf)

    @property
    def at_line_start(self) -> bool:
        """True when the bytes fed so far ended with a newline (or nothing was fed)."""
        return not self._buf and not self._skipping

    def flush(self) -> list[tuple[bytes, bool]]:
        """End the current line at a gap in the input: a partial line comes out ``cut``."""
        out = [(bytes(self._buf), True)] if self._buf else []
        self._buf.clear()
        self._skipping = False
        return out

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        out: list[tuple[bytes, bool]] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                if not self._skipping:
                    self._buf += data[start:]
                    if len(self._buf) > self.max_line:
                        out.append((bytes(self._buf[: self.max_line]), True))
                        self._buf.clear()
                        self._skipping = True
                return out
            if self._skipping:
                self._skipping = False
            else:
                self._buf += data[start:nl]
                if len(self._buf) > self.max_line:
                    out.append((bytes(self._buf[: self.max_line]), True))
                else:
                    out.append((bytes(self._buf), False))
                self._buf.clear()
            start = nl + 1


@dataclass(frozen=True, kw_only=True, slots=True)
class FileLimits:
    """How much of one output file is read per poll and kept on disk (module doc, 3)."""

    max_bytes: int = MAX_BYTES
    hard_bytes: int = HARD_BYTES
    max_line: int = MAX_LINE
    read_budget: int = READ_BUDGET

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_line", "read_budget"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.hard_bytes < self.max_bytes:
            raise ValueError(f"hard_bytes ({self.hard_bytes}) must be at least max_bytes "
                             f"({self.max_bytes})")


DEFAULT_LIMITS = FileLimits()


def dropped_marker(count: int) -> bytes:
    """The line that stands for ``count`` bytes of output dropped unread."""
    return b"[... %d bytes of output dropped: written faster than they could be read ...]" % count


class FileFollower:
    """One file read from an offset, surviving truncation, copy-truncate and rename."""

    def __init__(self, path: Path, *, from_start: bool, limits: FileLimits) -> None:
        self.path = path
        self.limits = limits
        self.offset = 0
        self.rotations = 0
        self.dropped_bytes = 0  # written by the app, never read: dropped by a truncate
        self.splitter = LineSplitter(limits.max_line)
        self._fd: int | None = None
        self._ino: int | None = None
        if not from_start:
            # Attaching to a running instance: what is in the file now was written before
            # this agent started and is not replayed. Opened here, not at the first poll,
            # so lines written in between are not skipped too.
            with contextlib.suppress(FileNotFoundError):
                self._open()
                assert self._fd is not None
                self.offset = os.fstat(self._fd).st_size

    def __repr__(self) -> str:
        return (f"<FileFollower {self.path.name} offset={self.offset} "
                f"open={self._fd is not None} rotations={self.rotations} "
                f"dropped_bytes={self.dropped_bytes}>")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self) -> list[tuple[bytes, bool]]:
        """New complete lines since the last call; truncates the file when it is too big."""
        out: list[tuple[bytes, bool]] = []
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if self._fd is not None and (st is None or st.st_ino != self._ino):
            out += self._drain()  # renamed away: finish the old file, then follow the new one
            self.close()
            self.offset = 0
        if self._fd is None:
            if st is None:
                return out
            try:
                self._open()
            except FileNotFoundError:
                return out
            self.offset = 0
        out += self._drain()
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        caught_up = self.offset >= size
        if (caught_up and self.offset > self.limits.max_bytes) or size > self.limits.hard_bytes:
            out += self._truncate()
        return out

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._ino = os.fstat(self._fd).st_ino

    def _drain(self, copy: BinaryIO | None = None) -> list[tuple[bytes, bool]]:
        """Read from the offset towards EOF, at most one read budget (a copy to ``copy``)."""
        assert self._fd is not None
        if os.fstat(self._fd).st_size < self.offset:
            self.offset = 0  # truncated by someone else: what is there now is new
        out: list[tuple[bytes, bool]] = []
        budget = self.limits.read_budget
        while budget > 0:
            data = os.pread(self._fd, min(READ_CHUNK, budget), self.offset)
            if not data:
                break
            self.offset += len(data)
            budget -= len(data)
            if copy is not None:
                copy.write(data)
            out += self.splitter.feed(data)
        return out

    def _truncate(self) -> list[tuple[bytes, bool]]:
        """Copy-truncate: ``.1`` gets what was read of the file, which is emptied in place.

        Up to one more read budget is read first; what the app wrote beyond that is
        dropped, counted in ``dropped_bytes`` and stands as one marker line, in the lines
        returned and at the end of ``.1`` (module doc, 3).
        """
        assert self._fd is not None
        old = self.path.with_name(self.path.name + ".1")
        tmp = self.path.with_name(self.path.name + ".1.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            with open(os.open(tmp, flags, 0o640), "wb") as copy:
                # Its last hard_bytes at most: a reader that attached to a running instance
                # (after an agent restart) may be far into a file nobody bounded meanwhile.
                _copy_range(self._fd, copy, max(0, self.offset - self.limits.hard_bytes),
                            self.offset)
                out = self._drain(copy)  # written during the copy, or not read yet
                # The race window: bytes written after this fstat and before the truncate
                # are lost without being counted.
                lost = max(0, os.fstat(self._fd).st_size - self.offset)
                os.truncate(self.path, 0)
                self.offset = 0
                self.rotations += 1
                if lost:
                    self.dropped_bytes += lost
                    marker = dropped_marker(lost)
                    copy.write((b"" if self.splitter.at_line_start else b"\n") + marker + b"\n")
                    out += self.splitter.flush()  # the line the gap cut short, flagged cut
                    out.append((marker, False))
            os.replace(tmp, old)  # atomic: a reader of `.1` sees the older or the newer copy
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # a full disk is no reason to leave a partial copy on it
            raise
        return out


def _copy_range(fd: int, dest: BinaryIO, start: int, end: int) -> None:
    """Copy bytes ``[start, end)`` of ``fd`` to ``dest`` (fewer if the file is shorter)."""
    while start < end:
        data = os.pread(fd, min(READ_CHUNK, end - start), start)
        if not data:
            return
        dest.write(data)
        start += len(data)


# --- the tails a failed start carries ---

TAIL_LINES = 20  # lines of stdout and of stderr a start failure carries to the deploy record
TAIL_LINE_MAX = 300  # characters kept of each of them (app output may be long, or secret)
TAIL_BYTES = 8192  # read from the end of each output file for them


def output_tails(out_log: Path, err_log: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of an instance's stdout and stderr files, for a start
    failure's message (which reaches the deploy record and the CLI); "" when both are
    empty."""
    parts = []
    for stream, path in (("stdout", out_log), ("stderr", err_log)):
        text = _tail_of(path, lines)
        if text:
            parts.append(f"\n--- last {stream} ---\n{text}")
    return "".join(parts)


def _tail_of(path: Path, lines: int, limit: int = TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - limit))
            data = file.read()
    except OSError:
        return ""
    return "\n".join(line if len(line) <= TAIL_LINE_MAX else line[:TAIL_LINE_MAX] + " [...]"
                     for line in data.decode("utf-8", "replace").splitlines()[-lines:])
