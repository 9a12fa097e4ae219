"""Line-by-line capture of instance output: ring buffers, size-bounded files, live fan-out.

Theory of operation
-------------------
The supervisor gives every app process two files as stdout and stderr,
``<log_dir>/<instance>.out.log`` and ``.err.log``, opened ``O_APPEND`` (files, not pipes,
so apps outlive an agent restart). This module follows those files from the outside:

1. **Split (pure).** ``LineSplitter`` turns the bytes read from one file into complete
   lines. A partial last line waits for its newline; a line longer than ``MAX_LINE`` is
   cut at ``MAX_LINE`` bytes, flagged ``cut``, and the rest of it up to the next newline
   is discarded. ``make_line`` decodes a line (UTF-8, ``errors="replace"``) and parses a
   JSON object line into ``fields``, surfacing ``level`` and ``request_id``.
2. **Follow (blocking I/O).** ``InstanceLog`` keeps one open read fd per file and reads
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
   round (``POLL_INTERVAL`` plus the round's reads); ``.1`` holds at most ``hard_bytes +
   read_budget`` plus the marker line; ``.1.tmp`` exists only during a truncate.
   *Race window:* bytes the app writes between the ``fstat`` that measures what is
   dropped and the ``truncate(2)`` right after it are lost without being counted. The
   two syscalls are adjacent, but the thread takes the GIL back in between: usually a
   few microseconds (about 1 KB of a flood), milliseconds when the trio thread holds the
   GIL or no CPU is free. That is the cost of copy-truncate (logrotate's ``copytruncate``
   has the same window) for not having to signal or restart the app.
4. **Fan out (trio).** ``LogHub.run`` polls every instance every ``POLL_INTERVAL``. The
   file reads (and the copies of truncates) run in a worker thread so they never
   stall the event loop; ring buffers, sequence-ordered tails and subscriber queues are
   only touched on the trio thread. Each ``Subscription`` has a bounded memory channel
   filled with ``send_nowait``: when it is full the line is dropped for that subscriber
   and counted in ``Subscription.dropped`` — a slow consumer never slows the hub, and
   the hub never slows the app (the app writes to a file, never to us).

Ownership: ``LogHub`` owns its ``InstanceLog``s and their fds; ``remove`` closes them
(deferred to the end of the poll when one is in progress, so the worker thread never
reads a closed fd). ``Subscription`` objects are owned by their caller, who closes them
(``with hub.subscribe(...) as sub``); the hub closes them all when ``run`` ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal

import structlog
import trio

log = structlog.get_logger("superagent.participant.logs")

POLL_INTERVAL = 0.1  # seconds; the files are appended by processes we do not control and
#                      inotify is not in the stdlib, so we poll: 10 stats per second per file
#                      is negligible and keeps `logs -f` feeling live
MAX_LINE = 64 * 1024  # bytes; a longer line is cut so one runaway line cannot eat the buffers
RING_LINES = 1000  # lines kept in memory per instance for `tail`
PROXY_EVENTS = "proxy-events"  # the hub's key for the proxy's debug events
MAX_BYTES = 10 * 1024**2  # a log file read past this size is rotated by copy-truncate
HARD_BYTES = 2 * MAX_BYTES  # a log file over this size is truncated even when not all read:
#                            room for a burst the reader catches up with, never for a flood
READ_CHUNK = 256 * 1024  # bytes per read(2)
READ_BUDGET = 4 * 1024**2  # bytes per file per poll, so one chatty app cannot starve others
SUBSCRIBER_BUFFER = 1000  # lines queued per subscriber before new ones are dropped

Stream = Literal["stdout", "stderr", "proxy"]


# --- lines (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class LogLine:
    """One line of one instance's output, as read by the agent at ``ts``."""

    ts: float
    app: str
    release: str
    instance: str
    stream: Stream
    text: str
    seq: int
    fields: dict[str, Any] | None = None
    level: str | None = None
    request_id: str | None = None
    cut: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``fields`` and optional keys only when present)."""
        doc: dict[str, Any] = {"type": "log_line", "ts": self.ts, "app": self.app,
                               "release": self.release, "instance": self.instance,
                               "stream": self.stream, "seq": self.seq, "text": self.text}
        if self.fields is not None:
            doc["fields"] = self.fields
        if self.level is not None:
            doc["level"] = self.level
        if self.request_id is not None:
            doc["request_id"] = self.request_id
        if self.cut:
            doc["cut"] = True
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> LogLine:
        """The inverse of ``to_json``; raises KeyError/ValueError on a malformed document."""
        stream = doc["stream"]
        if stream not in ("stdout", "stderr"):
            raise ValueError(f"bad stream {stream!r}")
        return cls(ts=float(doc["ts"]), app=str(doc["app"]), release=str(doc["release"]),
                   instance=str(doc["instance"]), stream=stream, text=str(doc["text"]),
                   seq=int(doc["seq"]), fields=doc.get("fields"), level=doc.get("level"),
                   request_id=doc.get("request_id"), cut=bool(doc.get("cut", False)))


@dataclass(frozen=True, kw_only=True, slots=True)
class Origin:
    """Who wrote a line: the labels every line of one instance carries."""

    app: str
    release: str
    instance: str


def make_line(raw: bytes, *, cut: bool, origin: Origin, stream: Stream, ts: float,
              seq: int) -> LogLine:
    """Decode one raw line (no newline) and parse it as a JSON object when it is one."""
    text = raw.decode("utf-8", errors="replace")
    if text.endswith("\r"):
        text = text[:-1]
    fields: dict[str, Any] | None = None
    level: str | None = None
    request_id: str | None = None
    if not cut and text.lstrip().startswith("{"):
        with contextlib.suppress(ValueError, RecursionError):
            parsed = json.loads(text)
            if isinstance(parsed, dict):
                fields = parsed
    if fields is not None:
        if isinstance(fields.get("level"), str):
            level = fields["level"]
        if isinstance(fields.get("request_id"), str | int):
            request_id = str(fields["request_id"])
    return LogLine(ts=ts, app=origin.app, release=origin.release, instance=origin.instance,
                   stream=stream, text=text, seq=seq, fields=fields, level=level,
                   request_id=request_id, cut=cut)


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


# --- following files (blocking I/O; called from a worker thread) ------------------------------


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


def dropped_marker(count: int) -> bytes:
    """The line that stands for ``count`` bytes of output dropped unread."""
    return b"[... %d bytes of output dropped: written faster than they could be read ...]" % count


class _Follower:
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
        return (f"<_Follower {self.path.name} offset={self.offset} "
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


class InstanceLog:
    """Both output files of one instance, with a ring buffer of its last lines.

    ``read_new`` does blocking file I/O and may run in a worker thread; ``record`` and
    ``tail`` touch the ring buffer and belong to the trio thread. ``poll`` does both.
    """

    def __init__(self, origin: Origin, out_path: Path, err_path: Path, *, from_start: bool,
                 ring: int = RING_LINES, limits: FileLimits = FileLimits()) -> None:
        self.origin = origin
        self._followers: dict[Stream, _Follower] = {
            "stdout": _Follower(out_path, from_start=from_start, limits=limits),
            "stderr": _Follower(err_path, from_start=from_start, limits=limits),
        }
        self._ring: deque[LogLine] = deque(maxlen=ring)
        self._seq = 0
        self.closed = False

    def __repr__(self) -> str:
        out, err = self._followers["stdout"], self._followers["stderr"]
        return (f"<InstanceLog {self.origin.instance} app={self.origin.app} "
                f"release={self.origin.release} lines={len(self._ring)}/{self._ring.maxlen} "
                f"seq={self._seq} out@{out.offset} err@{err.offset} "
                f"rotations={self.rotations} dropped_bytes={self.dropped_bytes}"
                f"{' closed' if self.closed else ''}>")

    @property
    def instance(self) -> str:
        return self.origin.instance

    def read_new(self) -> list[LogLine]:
        """Read both files; new lines, numbered. Blocking; raises OSError on I/O trouble."""
        lines: list[LogLine] = []
        for stream, follower in self._followers.items():
            raw = follower.read()
            ts = time.time()
            for text, cut in raw:
                self._seq += 1
                lines.append(make_line(text, cut=cut, origin=self.origin, stream=stream,
                                       ts=ts, seq=self._seq))
        return lines

    def record(self, lines: Iterable[LogLine]) -> None:
        self._ring.extend(lines)

    def poll(self) -> list[LogLine]:
        """``read_new`` then ``record``: the synchronous one-shot used by tests and tools."""
        lines = self.read_new()
        self.record(lines)
        return lines

    def tail(self, n: int = 100) -> list[LogLine]:
        if n <= 0:
            return []
        return list(self._ring)[-n:]

    @property
    def rotations(self) -> int:
        """Copy-truncate rotations done on this instance's files."""
        return sum(follower.rotations for follower in self._followers.values())

    @property
    def dropped_bytes(self) -> int:
        """Bytes of output dropped unread because the app wrote faster than it was read."""
        return sum(follower.dropped_bytes for follower in self._followers.values())

    def close(self) -> None:
        """Close the files (idempotent); the ring buffer stays readable."""
        for follower in self._followers.values():
            follower.close()
        self.closed = True


class ProxyEventLog(InstanceLog):
    """The proxy workers' access log, as debug events of the apps with an open session.

    Every worker writes one JSON line per request to the access log (``event: "access"``:
    request id, app, instance, rule, status, bytes, first-byte and total times, retries,
    error). For a request of an app whose debug session was open when the request was
    logged (``wanted(app, ts)``: the proxy writes its records in batches), each such line
    becomes a ``LogLine`` of stream ``"proxy"`` attributed to that app, its release
    (``release_of(app, instance)``) and instance, with the record as ``fields`` — so the
    lines of one request id show the proxy's view beside the app's own output. Other
    lines are read and dropped.
    """

    def __init__(self, path: Path, *, wanted: Callable[[str, float], bool],
                 release_of: Callable[[str, str], str], ring: int = RING_LINES,
                 limits: FileLimits = FileLimits()) -> None:
        super().__init__(Origin(app="-", release="", instance=PROXY_EVENTS), path, path,
                         from_start=False, ring=ring, limits=limits)
        self._followers["stderr"].close()
        del self._followers["stderr"]
        self._wanted = wanted
        self._release_of = release_of

    def read_new(self) -> list[LogLine]:
        lines: list[LogLine] = []
        raw = self._followers["stdout"].read()
        ts = time.time()
        for text, cut in raw:
            if cut:
                continue
            with contextlib.suppress(ValueError, RecursionError):
                record = json.loads(text)
                if not isinstance(record, dict) or record.get("event") != "access":
                    continue
                app, when = record.get("app"), record.get("ts")
                if not isinstance(app, str) or not isinstance(when, int | float) \
                        or not self._wanted(app, float(when)):
                    continue
                instance = str(record.get("instance") or "-")
                self._seq += 1
                lines.append(LogLine(
                    ts=ts, app=app, release=self._release_of(app, instance), instance=instance,
                    stream="proxy", seq=self._seq, fields=record, level="info",
                    request_id=str(record.get("request_id") or "") or None, cut=False,
                    text=(f"{record.get('method')} {record.get('path')} -> "
                          f"{record.get('status')} in {record.get('duration_ms')} ms"
                          f" (first byte {record.get('first_byte_ms')} ms, rule"
                          f" {record.get('rule')}, retries {record.get('retries')}"
                          + (f", error {record['error']}" if record.get("error") else "")
                          + ")")))
        return lines


# --- fan-out (trio) ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class LogFilter:
    """Which lines a subscriber wants; ``None`` matches anything. ``level`` ignores case."""

    app: str | None = None
    instance: str | None = None
    level: str | None = None
    request_id: str | None = None

    def matches(self, line: LogLine) -> bool:
        return ((self.app is None or line.app == self.app)
                and (self.instance is None or line.instance == self.instance)
                and (self.level is None
                     or (line.level is not None and line.level.lower() == self.level.lower()))
                and (self.request_id is None or line.request_id == self.request_id))


class Subscription:
    """A live feed of matching lines, with a bounded queue and a drop counter.

    An async iterator of ``LogLine``; iteration ends when the subscription or the hub is
    closed. Use as a context manager so it is detached from the hub when done.
    """

    def __init__(self, hub: LogHub, filter: LogFilter, buffer: int) -> None:
        self.filter = filter
        self.buffer = buffer
        self.dropped = 0
        self.delivered = 0
        self._hub = hub
        self._send, self._receive = trio.open_memory_channel[LogLine](buffer)

    def __repr__(self) -> str:
        queued = self._receive.statistics().current_buffer_used
        return (f"<Subscription {self.filter} queued={queued}/{self.buffer} "
                f"delivered={self.delivered} dropped={self.dropped}"
                f"{' closed' if self.closed else ''}>")

    @property
    def closed(self) -> bool:
        return self not in self._hub._subscriptions

    def offer(self, line: LogLine) -> None:
        """Queue ``line`` if it matches; never blocks (a full queue drops and counts)."""
        if not self.filter.matches(line):
            return
        try:
            self._send.send_nowait(line)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        else:
            self.delivered += 1

    def close(self) -> None:
        """Detach from the hub; lines already queued can still be read. Idempotent."""
        self._hub._subscriptions.discard(self)
        self._send.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
        self._receive.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> LogLine:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None


@dataclass(slots=True)
class _HubStats:
    polls: int = 0
    lines: int = 0
    errors: int = 0
    dropped_bytes: int = 0  # output dropped unread, all instances (see InstanceLog's)


class LogHub:
    """All instances' logs on this node: tails for queries, subscriptions for `logs -f`."""

    def __init__(self, *, ring: int = RING_LINES, limits: FileLimits = FileLimits(),
                 poll_interval: float = POLL_INTERVAL) -> None:
        self.ring = ring
        self.limits = limits
        self.poll_interval = poll_interval
        self.stats = _HubStats()
        self._logs: dict[str, InstanceLog] = {}
        self._subscriptions: set[Subscription] = set()
        self._polling = False
        self._close_after_poll: list[InstanceLog] = []
        self._poll_lock = trio.Lock()

    def __repr__(self) -> str:
        return (f"<LogHub instances={sorted(self._logs)} subscribers={len(self._subscriptions)} "
                f"polls={self.stats.polls} lines={self.stats.lines} errors={self.stats.errors} "
                f"dropped_bytes={self.stats.dropped_bytes}>")

    def __contains__(self, instance: str) -> bool:
        return instance in self._logs

    def instance_log(self, instance: str) -> InstanceLog:
        """The ``InstanceLog`` of ``instance``; raises KeyError when it is not followed."""
        return self._logs[instance]

    def add(self, app: str, release: str, instance: str, out_path: Path, err_path: Path, *,
            from_start: bool) -> InstanceLog:
        """Follow an instance's files: from 0 for a fresh instance, else from their end.

        Adding an instance already followed replaces it (its ring buffer is discarded).
        """
        self.remove(instance)
        ilog = InstanceLog(Origin(app=app, release=release, instance=instance), Path(out_path),
                           Path(err_path), from_start=from_start, ring=self.ring,
                           limits=self.limits)
        self._logs[instance] = ilog
        return ilog

    def remove(self, instance: str) -> None:
        """Stop following ``instance`` and forget its lines. Unknown instances are ignored."""
        ilog = self._logs.pop(instance, None)
        if ilog is None:
            return
        if self._polling:
            self._close_after_poll.append(ilog)  # the worker thread may be reading its fds
        else:
            ilog.close()

    def tail(self, instance: str | None = None, app: str | None = None,
             n: int = 100, request_id: str | None = None) -> list[LogLine]:
        """The last ``n`` buffered lines matching, oldest first (the proxy's debug events
        included: they carry their app and instance)."""
        wanted = LogFilter(app=app, instance=instance, request_id=request_id)
        lines: list[LogLine] = []
        for ilog in self._logs.values():
            if ilog.instance != PROXY_EVENTS and (
                    (instance is not None and ilog.instance != instance)
                    or (app is not None and ilog.origin.app != app)):
                continue
            lines += [line for line in ilog.tail(RING_LINES) if wanted.matches(line)][-n:]
        lines.sort(key=lambda line: (line.ts, line.instance, line.seq))
        return lines[-n:] if n > 0 else []

    def add_proxy_events(self, path: Path, *, wanted: Callable[[str, float], bool],
                         release_of: Callable[[str, str], str]) -> None:
        """Follow the proxy workers' access log for debug events (see ``ProxyEventLog``)."""
        self.remove(PROXY_EVENTS)
        self._logs[PROXY_EVENTS] = ProxyEventLog(path, wanted=wanted, release_of=release_of,
                                                 ring=self.ring, limits=self.limits)

    def subscribe(self, filter: LogFilter | None = None, *,
                  buffer: int = SUBSCRIBER_BUFFER) -> Subscription:
        """A live feed of new lines matching ``filter``; close it (or use ``with``) when done."""
        if buffer < 1:
            raise ValueError(f"subscriber buffer must be at least 1, not {buffer}")
        sub = Subscription(self, filter or LogFilter(), buffer)
        self._subscriptions.add(sub)
        return sub

    async def poll(self) -> list[LogLine]:
        """One round: read every instance (in a worker thread), record and fan out."""
        async with self._poll_lock:
            logs = [ilog for ilog in self._logs.values() if not ilog.closed]
            dropped_before = [ilog.dropped_bytes for ilog in logs]
            self._polling = True
            try:
                results = await trio.to_thread.run_sync(_read_all, logs)
            finally:
                self._polling = False
                for ilog in self._close_after_poll:
                    ilog.close()
                self._close_after_poll.clear()
            self.stats.polls += 1
            new: list[LogLine] = []
            for (ilog, lines, error), before in zip(results, dropped_before, strict=True):
                if error is not None:
                    self.stats.errors += 1
                    log.warning("log read failed", instance=ilog.instance, app=ilog.origin.app,
                                error=str(error))
                if ilog.dropped_bytes > before:
                    self.stats.dropped_bytes += ilog.dropped_bytes - before
                    if before == 0:  # once per instance; the counters and markers say the rest
                        log.warning("log output dropped: written faster than it is read",
                                    instance=ilog.instance, app=ilog.origin.app,
                                    dropped_bytes=ilog.dropped_bytes)
                if ilog.closed or not lines:
                    continue  # removed while we were reading
                ilog.record(lines)
                new += lines
            self.stats.lines += len(new)
            for line in new:
                for sub in list(self._subscriptions):
                    sub.offer(line)
            return new

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll forever; start with ``await nursery.start(hub.run)``.

        On exit (cancellation) the hub is closed: subscriptions end their iteration, files
        are closed, tails stay readable.
        """
        task_status.started()
        try:
            while True:
                await self.poll()
                await trio.sleep(self.poll_interval)
        finally:
            self.close()

    def close(self) -> None:
        """Close every subscription and every file; buffered lines stay readable by tail()."""
        for sub in list(self._subscriptions):
            sub.close()
        for ilog in self._logs.values():
            if self._polling:
                self._close_after_poll.append(ilog)
            else:
                ilog.close()


def _read_all(
    logs: list[InstanceLog],
) -> list[tuple[InstanceLog, list[LogLine], OSError | None]]:
    """Worker-thread body: read every instance; one instance's I/O error spares the rest."""
    out: list[tuple[InstanceLog, list[LogLine], OSError | None]] = []
    for ilog in logs:
        try:
            out.append((ilog, ilog.read_new(), None))
        except OSError as exc:
            out.append((ilog, [], exc))
    return out

