"""Line-by-line capture of instance output: ring buffers, size-bounded files, live fan-out.

Theory of operation
-------------------
The supervisor gives every app process two files as stdout and stderr,
``<log_dir>/<instance>.out.log`` and ``.err.log``, opened ``O_APPEND`` (files, not pipes,
so apps outlive an agent restart). This module follows those files from the outside:

1. **Lines.** ``logfiles`` follows each file (``FileFollower``: offsets, truncation and
   rotation by others, the size bound and what a flood drops) and splits it into
   complete lines (``LineSplitter``). ``make_line`` decodes a line (UTF-8,
   ``errors="replace"``) and parses a JSON object line into ``fields``, surfacing
   ``level`` and ``request_id``. ``InstanceLog`` holds both files of an instance and a
   ring buffer of its last lines.
2. **Fan out (trio).** ``LogHub.run`` polls every instance every ``POLL_INTERVAL``. The
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
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import structlog
import trio

from superagent.participant.logfiles import DEFAULT_LIMITS, FileFollower, FileLimits

log = structlog.get_logger("superagent.participant.logs")

POLL_INTERVAL = 0.1  # seconds; the files are appended by processes we do not control and
#                      inotify is not in the stdlib, so we poll: 10 stats per second per file
#                      is negligible and keeps `logs -f` feeling live
RING_LINES = 1000  # lines kept in memory per instance for `tail`
PROXY_EVENTS = "proxy-events"  # the hub's key for the proxy's debug events
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


# --- following files (blocking I/O in logfiles.py; called from a worker thread) ---------------


class InstanceLog:
    """Both output files of one instance, with a ring buffer of its last lines.

    ``read_new`` does blocking file I/O and may run in a worker thread; ``record`` and
    ``tail`` touch the ring buffer and belong to the trio thread. ``poll`` does both.
    """

    def __init__(self, origin: Origin, out_path: Path, err_path: Path, *, from_start: bool,
                 ring: int = RING_LINES, limits: FileLimits = DEFAULT_LIMITS) -> None:
        self.origin = origin
        self._followers: dict[Stream, FileFollower] = {
            "stdout": FileFollower(out_path, from_start=from_start, limits=limits),
            "stderr": FileFollower(err_path, from_start=from_start, limits=limits),
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
                 limits: FileLimits = DEFAULT_LIMITS) -> None:
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

    def __init__(self, *, ring: int = RING_LINES, limits: FileLimits = DEFAULT_LIMITS,
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

