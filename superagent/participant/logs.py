"""Following every instance's output files into ``superagent.debug``'s records and fan-out.

Theory of operation
-------------------
The supervisor gives every app process two files as stdout and stderr,
``<log_dir>/<instance>.out.log`` and ``.err.log``, opened ``O_APPEND`` (files, not pipes,
so apps outlive an agent restart). This module follows those files from the outside;
what it produces is the transport-neutral model of ``superagent.debug``:

1. **Lines.** ``logfiles`` follows each file (``FileFollower``: offsets, truncation and
   rotation by others, the size bound and what a flood drops) and splits it into
   complete lines (``LineSplitter``). ``debug.make_line`` turns each into a ``LogLine``
   (JSON object lines kept as structured events). ``InstanceLog`` holds both files of an
   instance, numbers its lines (one source, one sequence) and keeps the last ones in a
   ``debug.LineRing``. ``ProxyEventLog`` follows the proxy workers' access log the same
   way and keeps the records of apps with an open debug session as ``proxy`` lines;
   every app's last records are kept besides in a ``debug.RecentRecords`` ring (bounded
   by count and bytes), so the trace of a request made outside any session still has
   the proxy's record (``tail`` with a request id looks there too).
2. **Fan out (trio).** ``LogHub.run`` polls every instance every ``POLL_INTERVAL``. The
   file reads (and the copies of truncates) run in a worker thread so they never
   stall the event loop; ring buffers and the ``debug.Fanout`` of subscribers are only
   touched on the trio thread. A subscriber's queue is bounded and a full one drops and
   counts (``Subscription.dropped``): a slow consumer never slows the hub, and the hub
   never slows the app (the app writes to a file, never to us).

Ownership: ``LogHub`` owns its ``InstanceLog``s and their fds; ``remove`` closes them
(deferred to the end of the poll when one is in progress, so the worker thread never
reads a closed fd). ``Subscription`` objects are owned by their caller, who closes them
(``with hub.subscribe(...) as sub``); the hub closes them all when ``run`` ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from superagent.debug import (
    PROXY_SOURCE,
    RING_LINES,
    SUBSCRIBER_BUFFER,
    Fanout,
    Kept,
    LineRing,
    LogFilter,
    LogLine,
    Origin,
    RecentRecords,
    Stream,
    Subscription,
    access_line,
    access_record,
    make_line,
    merge,
    merged_tail,
)
from superagent.participant.logfiles import DEFAULT_LIMITS, FileFollower, FileLimits

log = structlog.get_logger("superagent.participant.logs")

POLL_INTERVAL = 0.1  # seconds; the files are appended by processes we do not control and
#                      inotify is not in the stdlib, so we poll: 10 stats per second per file
#                      is negligible and keeps `logs -f` feeling live
PROXY_EVENTS = PROXY_SOURCE  # the hub's key for the proxy's debug events

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
        self.ring = LineRing(ring)
        self._seq = 0
        self.closed = False

    def __repr__(self) -> str:
        out, err = self._followers["stdout"], self._followers["stderr"]
        return (f"<InstanceLog {self.origin.instance} app={self.origin.app} "
                f"release={self.origin.release} lines={len(self.ring)}/{self.ring.maxlen} "
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
        self.ring.record(lines)

    def poll(self) -> list[LogLine]:
        """``read_new`` then ``record``: the synchronous one-shot used by tests and tools."""
        lines = self.read_new()
        self.record(lines)
        return lines

    def tail(self, n: int = 100) -> list[LogLine]:
        return self.ring.tail(n)

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
    becomes a ``proxy`` line of that app (``debug.access_line``), its release being
    ``release_of(app, instance)``. Other lines are read and dropped.
    """

    def __init__(self, path: Path, *, wanted: Callable[[str, float], bool],
                 release_of: Callable[[str, str], str], ring: int = RING_LINES,
                 limits: FileLimits = DEFAULT_LIMITS,
                 recent: RecentRecords | None = None) -> None:
        super().__init__(Origin(app="-", release="", instance=PROXY_EVENTS), path, path,
                         from_start=False, ring=ring, limits=limits)
        self._followers["stderr"].close()
        del self._followers["stderr"]
        self._wanted = wanted
        self._release_of = release_of
        self.recent = recent if recent is not None else RecentRecords()
        self._pending: list[tuple[str, Kept]] = []  # read, not yet in ``recent``

    def read_new(self) -> list[LogLine]:
        """Every record is numbered and kept for ``recent`` (handed over by ``record``,
        on the trio thread); those of apps in a session also become lines. The numbers
        of one app's lines then jump where other apps' records were, which the proxy
        source's readers expect (``coordinator.logstream``: no gap for it)."""
        lines: list[LogLine] = []
        raw = self._followers["stdout"].read()
        ts = time.time()
        pending = self._pending
        for text, cut in raw:
            event = None if cut else access_record(text)
            if event is None:
                continue
            self._seq += 1
            release = self._release_of(event.app, event.instance)
            pending.append((event.app, Kept(self._seq, ts, release, text)))
            if self._wanted(event.app, event.logged):
                lines.append(access_line(event, release=release, ts=ts, seq=self._seq))
        return lines

    def record(self, lines: Iterable[LogLine]) -> None:
        super().record(lines)
        pending, self._pending = self._pending, []
        for app, kept in pending:
            self.recent.add(app, kept)

    def find(self, filter: LogFilter) -> list[LogLine]:
        """The kept records of ``filter.request_id`` (required), session or not."""
        assert filter.request_id is not None
        return self.recent.find(filter.request_id, filter)


# --- the hub (trio) ----------------------------------------------------------------------------


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
        self.fanout = Fanout()
        self._polling = False
        self._close_after_poll: list[InstanceLog] = []
        self._poll_lock = trio.Lock()

    def __repr__(self) -> str:
        return (f"<LogHub instances={sorted(self._logs)} subscribers={len(self.fanout)} "
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
        lines = merged_tail((ilog.ring for ilog in self._logs.values()), wanted, n)
        proxy = self._logs.get(PROXY_EVENTS)
        if request_id is None or not isinstance(proxy, ProxyEventLog):
            return lines
        # one request's proxy record is kept whether or not a session was open; the
        # same record read through a session is already among ``lines``
        have = {line.seq for line in lines if line.stream == "proxy"}
        kept = [line for line in proxy.find(wanted) if line.seq not in have]
        return list(merge(lines, kept))[-n:] if kept else lines

    def add_proxy_events(self, path: Path, *, wanted: Callable[[str, float], bool],
                         release_of: Callable[[str, str], str]) -> None:
        """Follow the proxy workers' access log for debug events (see ``ProxyEventLog``)."""
        self.remove(PROXY_EVENTS)
        self._logs[PROXY_EVENTS] = ProxyEventLog(path, wanted=wanted, release_of=release_of,
                                                 ring=self.ring, limits=self.limits)

    def subscribe(self, filter: LogFilter | None = None, *,
                  buffer: int = SUBSCRIBER_BUFFER) -> Subscription:
        """A live feed of new lines matching ``filter``; close it (or use ``with``) when done.

        Raises ``ValueError`` when ``buffer`` is below 1 (see ``debug.Fanout.subscribe``).
        """
        return self.fanout.subscribe(filter, buffer=buffer)

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
                if ilog.closed:
                    continue  # removed while we were reading
                ilog.record(lines)  # also with no lines: the proxy's keeps its records
                new += lines
            self.stats.lines += len(new)
            self.fanout.publish(new)
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
        self.fanout.close()
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

