"""Log capture tests: real files in tmp_path, real trio, one real child process.

Most tests drive ``LogHub.poll()`` by hand so they are deterministic; the subscriber
and rotation tests run ``LogHub.run`` in a nursery with a short poll interval. Every
wait on a condition has a ``trio.fail_after`` deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import trio

from superagent.debug import DebugSessions, LogFilter, LogLine, Subscription
from superagent.participant.logfiles import FileLimits, dropped_marker
from superagent.participant.logs import POLL_INTERVAL, LogHub
from tests.participant.children import child_python
from tests.support.wait import wait_until_async

WAIT = 10.0  # generous bound on any condition below; each is met in well under a second
FAST_POLL = 0.01  # the hub's poll interval in the tests that run it


def append(path: Path, data: bytes) -> None:
    """Append as an app does: O_APPEND, one write."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def paths(tmp_path: Path, instance: str = "web-1") -> tuple[Path, Path]:
    return tmp_path / f"{instance}.out.log", tmp_path / f"{instance}.err.log"


def texts(lines: list[LogLine]) -> list[str]:
    return [line.text for line in lines]


async def drain(sub: Subscription) -> list[LogLine]:
    """Everything queued on ``sub`` (closing it first so iteration ends)."""
    sub.close()
    return [line async for line in sub]


async def test_lines_appear_in_tail_with_labels_in_order(tmp_path: Path) -> None:
    """Lines of both files reach tail() labelled with stream, instance, app, release, in order."""
    out, err = paths(tmp_path)
    hub = LogHub()
    hub.add("web", "r3", "web-1", out, err, from_start=True)
    append(out, b"one\ntwo\n")
    append(err, b"oops\n")
    await hub.poll()
    append(out, b"three\n")
    await hub.poll()
    lines = hub.tail("web-1")
    assert [(line.stream, line.text) for line in lines] == [
        ("stdout", "one"), ("stdout", "two"), ("stderr", "oops"), ("stdout", "three")]
    assert {(line.app, line.release, line.instance) for line in lines} == {("web", "r3", "web-1")}
    assert [line.seq for line in lines] == [1, 2, 3, 4]
    assert texts(hub.tail(app="web", n=2)) == ["oops", "three"]
    assert hub.tail(app="other") == []


async def test_partial_line_waits_for_its_newline(tmp_path: Path) -> None:
    """A line without its newline yet is held back until the newline arrives."""
    out, err = paths(tmp_path)
    hub = LogHub()
    hub.add("web", "r1", "web-1", out, err, from_start=True)
    append(out, b"hel")
    assert await hub.poll() == []
    append(out, b"lo\nwor")
    assert texts(await hub.poll()) == ["hello"]
    append(out, b"ld\n")
    assert texts(await hub.poll()) == ["world"]


async def test_overlong_line_is_cut_and_flagged(tmp_path: Path) -> None:
    """A line over max_line is cut at max_line, flagged, and its remainder discarded."""
    out, err = paths(tmp_path)
    hub = LogHub(limits=FileLimits(max_line=16))
    hub.add("web", "r1", "web-1", out, err, from_start=True)
    append(out, b"x" * 40)  # no newline yet: cut as soon as it is too long
    (cut,) = await hub.poll()
    assert cut.cut and cut.text == "x" * 16
    append(out, b"xxxx-rest\nshort\n" + b"y" * 20 + b"\n")
    after = await hub.poll()
    assert [(line.text, line.cut) for line in after] == [("short", False), ("y" * 16, True)]
    assert after[1].to_json()["cut"] is True


async def test_ring_buffer_keeps_last_n(tmp_path: Path) -> None:
    """Only the last `ring` lines of an instance are kept."""
    out, err = paths(tmp_path)
    hub = LogHub(ring=5)
    hub.add("web", "r1", "web-1", out, err, from_start=True)
    append(out, b"".join(b"line %d\n" % i for i in range(12)))
    await hub.poll()
    assert texts(hub.tail("web-1", n=100)) == [f"line {i}" for i in range(7, 12)]
    assert "lines=5/5" in repr(hub.instance_log("web-1"))


async def test_attach_from_end_skips_old_content(tmp_path: Path) -> None:
    """from_start=False (re-attaching after an agent restart) skips what was already there."""
    out, err = paths(tmp_path)
    append(out, b"old out\n")
    append(err, b"old err\n")
    hub = LogHub()
    hub.add("web", "r1", "web-1", out, err, from_start=False)
    append(out, b"new out\n")
    assert texts(await hub.poll()) == ["new out"]
    hub.add("web", "r1", "web-1", out, err, from_start=True)  # replaces: a fresh follower
    assert texts(await hub.poll()) == ["old out", "new out", "old err"]


async def test_external_truncation_and_rename_restart_at_zero(tmp_path: Path) -> None:
    """A file truncated or renamed away by someone else is read again from its start."""
    out, err = paths(tmp_path)
    hub = LogHub()
    hub.add("web", "r1", "web-1", out, err, from_start=True)
    append(out, b"a fairly long first line\n")
    await hub.poll()
    os.truncate(out, 0)
    append(out, b"short\n")
    assert texts(await hub.poll()) == ["short"]
    out.rename(out.with_name(out.name + ".1"))  # the supervisor's rename-before-spawn
    append(out.with_name(out.name + ".1"), b"late in old file\n")
    append(out, b"fresh file\n")
    assert texts(await hub.poll()) == ["late in old file", "fresh file"]


CHATTY = r"""
import sys, time
for i in range(int(sys.argv[1])):
    sys.stdout.write("line %05d %s\n" % (i, "." * 80))
    sys.stdout.flush()
    time.sleep(0.002)
"""


MARKER = dropped_marker(0).split(b" 0 ")[0].decode()  # "[..." then the dropped byte count


def line_numbers(captured: list[str]) -> list[int]:
    """The numbers of CHATTY's lines, in order; a dropped-output marker is not one of them."""
    return [int(t.split()[1]) for t in captured if not t.startswith(MARKER)]


async def test_copy_truncate_rotation_with_a_real_appending_child(tmp_path: Path) -> None:
    """A child writing O_APPEND keeps its lines appearing across rotations; .1 holds old ones."""
    out, err = paths(tmp_path)
    max_bytes = 4096
    count = 300  # ~27 KB: several rotations
    hub = LogHub(limits=FileLimits(max_bytes=max_bytes), poll_interval=FAST_POLL,
                 ring=count)
    hub.add("web", "r1", "web-1", out, err, from_start=True)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)  # as the supervisor does
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            with trio.fail_after(WAIT):
                await trio.run_process([child_python(), "-I", "-c", CHATTY, str(count)],
                                       stdout=fd)
            last = f"line {count - 1:05d}"
            await wait_until_async(
                lambda: any(t.startswith(last) for t in texts(hub.tail(n=count))),
                f"a line starting {last!r} in the tail", timeout=WAIT, interval=FAST_POLL)
            nursery.cancel_scope.cancel()
    finally:
        os.close(fd)
    captured = texts(hub.tail(n=count))
    seen = line_numbers(captured)
    assert seen == sorted(seen)
    ilog = hub.instance_log("web-1")
    assert ilog.closed and ilog.rotations >= count * 90 // max_bytes - 1
    # Copy-truncate may lose the lines written inside its microsecond window (module doc);
    # with a 2 ms gap between writes that is at most one line per rotation, and usually none.
    # Each loss is counted and stands as a marker line of its own.
    missing = set(range(count)) - set(seen)
    assert len(missing) <= count * 100 // max_bytes
    markers = [t for t in captured if t.startswith(MARKER)]
    assert sum(int(t.split()[1]) for t in markers) == ilog.dropped_bytes
    assert len(markers) <= len(missing)
    current, old = out.read_bytes(), out.with_name(out.name + ".1").read_bytes()
    assert b"\0" not in current  # O_APPEND: the child continued at the new end, no hole
    assert len(current) <= max_bytes + 4 * 1024
    old_numbers = line_numbers(old.decode().splitlines())
    assert old_numbers and old_numbers == sorted(old_numbers)
    assert max(old_numbers) < int(current.splitlines()[0].split()[1]) if current else True


async def test_filters_by_app_instance_level_request_id(tmp_path: Path) -> None:
    """Each filter field narrows a subscription; level ignores case."""
    hub = LogHub()
    for app, instance in (("web", "web-1"), ("web", "web-2"), ("api", "api-1")):
        out, err = paths(tmp_path, instance)
        hub.add(app, "r1", instance, out, err, from_start=True)
        append(out, b'{"level": "INFO", "request_id": "r-%s", "msg": "hi"}\n'
                    % instance.encode())
        append(err, b'{"level": "error", "msg": "bad"}\nnot json\n')
    subs = {
        "all": hub.subscribe(),
        "app": hub.subscribe(LogFilter(app="web")),
        "instance": hub.subscribe(LogFilter(instance="api-1")),
        "level": hub.subscribe(LogFilter(level="info")),
        "request": hub.subscribe(LogFilter(request_id="r-web-2")),
        "both": hub.subscribe(LogFilter(app="web", level="ERROR")),
    }
    await hub.poll()
    got = {name: await drain(sub) for name, sub in subs.items()}
    assert len(got["all"]) == 9
    assert {line.app for line in got["app"]} == {"web"} and len(got["app"]) == 6
    assert {line.instance for line in got["instance"]} == {"api-1"} and len(got["instance"]) == 3
    assert sorted(line.instance for line in got["level"]) == ["api-1", "web-1", "web-2"]
    assert [(line.instance, line.request_id) for line in got["request"]] == [("web-2", "r-web-2")]
    assert sorted(line.instance for line in got["both"]) == ["web-1", "web-2"]
    assert "closed" in repr(subs["all"])


async def test_proxy_events_of_debugged_apps_join_their_tail(tmp_path: Path) -> None:
    """Access records of an app with an open session become its proxy lines; others do not."""
    out, err = paths(tmp_path)
    access = tmp_path / "access.log"
    append(access, b'{"event": "access", "ts": 1, "app": "web", "request_id": "old"}\n')
    sessions = DebugSessions(clock=lambda: 1000.0)
    sessions.open("web", 60)
    hub = LogHub()
    hub.add("web", "r3", "web-1", out, err, from_start=True)
    hub.add_proxy_events(access, wanted=sessions.covers,
                         release_of=lambda app, instance: f"release of {instance}")
    append(out, b'{"request_id": "req-1", "msg": "handling"}\n')
    record = {"event": "access", "ts": 1010.0, "app": "web", "instance": "web-1",
              "request_id": "req-1", "status": 200}
    append(access, b"".join(json.dumps(doc).encode() + b"\n" for doc in (
        record, {**record, "app": "api"}, {**record, "ts": 2000.0}, {"event": "other"})))
    with hub.subscribe(LogFilter(request_id="req-1")) as sub:
        await hub.poll()
        got = await drain(sub)
    assert [(line.stream, line.release) for line in got] == [
        ("stdout", "r3"), ("proxy", "release of web-1")]
    # by request id, the records outside any session are found too (the recent ring),
    # the one the session made a line of only once
    by_rid = hub.tail(app="web", request_id="req-1")
    assert [(line.stream, line.fields and line.fields.get("ts")) for line in by_rid] == [
        ("stdout", None), ("proxy", 1010.0), ("proxy", 2000.0)]
    assert by_rid[1] == got[1] and by_rid[2].seq > by_rid[1].seq
    assert [line.app for line in hub.tail(request_id="req-1") if line.stream == "proxy"
            ] == ["web", "api", "web"]
    assert hub.tail(app="api", request_id="nope") == []
    # without a request id only the session's lines show: the stream is as it was
    assert [line.stream for line in hub.tail(instance="web-1")] == ["stdout", "proxy"]
    assert "proxy-events" in hub and got[1].fields == record


async def test_run_ends_subscriptions_and_remove_forgets(tmp_path: Path) -> None:
    """Cancelling run() ends subscribers' iteration; remove() drops an instance's lines."""
    out, err = paths(tmp_path)
    hub = LogHub(poll_interval=POLL_INTERVAL)
    hub.add("web", "r1", "web-1", out, err, from_start=True)
    append(out, b"hello\n")
    await hub.poll()
    hub.remove("web-1")
    hub.remove("web-1")  # idempotent
    assert hub.tail() == [] and "web-1" not in hub
    sub = hub.subscribe()
    ended = trio.Event()

    async def consume() -> None:
        async for _ in sub:
            pass
        ended.set()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as outer:
            outer.start_soon(consume)
            async with trio.open_nursery() as nursery:
                await nursery.start(hub.run)
                await wait_until_async(lambda: hub.stats.polls >= 2, "two polls of the hub",
                                       timeout=WAIT, interval=FAST_POLL)
                assert "subscribers=1" in repr(hub) and "polls=" in repr(hub)
                nursery.cancel_scope.cancel()
            await ended.wait()
    assert sub.closed and "subscribers=0" in repr(hub)
    with pytest.raises(ValueError, match="buffer"):
        hub.subscribe(buffer=0)


FLOOD = r"""
import os, sys
dots = b"." * 90
for i in range(int(sys.argv[1]) // 100):
    os.write(1, b"%08d %s\n" % (i, dots))  # 100-byte lines, one write each, no pause
"""


async def test_flooding_child_cannot_grow_its_files_past_the_bound(tmp_path: Path) -> None:
    """An app writing far faster than the reader keeps its file and .1 bounded; loss is counted."""
    out, err = paths(tmp_path)
    old = out.with_name(out.name + ".1")
    limits = FileLimits(max_bytes=64 * 1024, hard_bytes=128 * 1024, read_budget=64 * 1024)
    total = 96 * 1024**2  # ~1 s of writing, over ten times what the reader reads meanwhile
    # Unbounded, the file would reach `total`. Bounded, it holds hard_bytes plus what the
    # child writes in one poll round: 2-4 MB on a quiet machine (10-30 ms at ~120 MB/s),
    # but a poll round is as long as this test's event loop waits for a CPU, which the
    # writing child does not: 19 MB and 42 MB were seen with the suite and other work
    # loading both cores. Two thirds of `total` still fails whenever the bound is missing
    # (the file then ends at `total`); the end size below checks the bound exactly.
    file_bound = total * 2 // 3
    old_bound = limits.hard_bytes + limits.read_budget + 200  # 200: the marker line
    hub = LogHub(limits=limits)
    hub.add("web", "r1", "web-1", out, err, from_start=True)
    largest = {out: 0, old: 0}
    done = trio.Event()

    async def sample() -> None:
        while not done.is_set():
            for path in largest:
                with contextlib.suppress(FileNotFoundError):
                    largest[path] = max(largest[path], path.stat().st_size)
            await trio.sleep(0.001)

    async def poll() -> None:
        while not done.is_set():
            await hub.poll()
            await trio.sleep(FAST_POLL)

    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)  # as the supervisor does
    with hub.subscribe(buffer=total // 100) as sub:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                nursery.start_soon(poll)
                with trio.fail_after(WAIT):
                    await trio.run_process([child_python(), "-I", "-c", FLOOD, str(total)],
                                           stdout=fd)
                done.set()
        finally:
            os.close(fd)
        with trio.fail_after(WAIT):
            while await hub.poll():  # until the reader has caught up with what is left
                pass
        lines = await drain(sub)
    ilog = hub.instance_log("web-1")
    assert largest[out] <= file_bound and out.stat().st_size <= limits.hard_bytes
    assert 0 < largest[old] <= old_bound and old.stat().st_size <= old_bound
    assert not out.with_name(out.name + ".1.tmp").exists()
    assert b"\0" not in out.read_bytes()  # O_APPEND: the child went on at the new end
    markers = [line for line in lines if line.text.startswith("[... ")]
    others = [line for line in lines if not line.text.startswith("[... ")]
    dropped = sum(int(line.text.split()[1]) for line in markers)
    assert 0 < ilog.dropped_bytes == hub.stats.dropped_bytes == dropped
    assert f"dropped_bytes={dropped}" in repr(ilog) and f"dropped_bytes={dropped}" in repr(hub)
    # Every byte written was delivered in a line or counted as dropped, but for what the
    # race windows lost: ~1 KB per truncate, but a window that waits for the GIL or a CPU
    # on a loaded machine can lose a few MB, hence the 10%.
    delivered = sum(len(line.text) + (not line.cut) for line in others)
    assert total * 9 // 10 <= delivered + dropped <= total
    numbers = [int(line.text[:8]) for line in others if not line.cut]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    *kept, last = old.read_bytes().splitlines()  # in order, a marker only as the last line
    kept_numbers = [int(line[:8]) for line in kept if len(line) == 99]  # whole lines
    assert kept_numbers == sorted(set(kept_numbers))
    assert not any(line.startswith(b"[... ") for line in kept) and last


async def test_unread_output_over_hard_limit_is_dropped_counted_and_marked(tmp_path: Path) -> None:
    """Over hard_bytes the reader takes one more budget, drops the rest, counts it, says so."""
    out, err = paths(tmp_path)
    old = out.with_name(out.name + ".1")
    hub = LogHub(limits=FileLimits(max_bytes=1000, hard_bytes=2000, read_budget=425))
    hub.add("web", "r1", "web-1", out, err, from_start=True)
    written = b"".join(b"%04d %s\n" % (i, b"." * 94) for i in range(50))  # 50 lines of 100 B
    append(out, written)
    lines = await hub.poll()  # reads 425 B, sees 5000 > 2000: reads 425 more, drops 4150
    marker = "[... 4150 bytes of output dropped: written faster than they could be read ...]"
    assert [(line.text, line.cut) for line in lines] == [
        *((f"{i:04d} {'.' * 94}", False) for i in range(8)), (f"0008 {'.' * 45}", True),
        (marker, False)]
    assert out.stat().st_size == 0
    assert old.read_bytes() == written[:850] + b"\n" + marker.encode() + b"\n"
    ilog = hub.instance_log("web-1")
    assert ilog.dropped_bytes == hub.stats.dropped_bytes == 4150 and ilog.rotations == 1
    append(out, b"after the gap\n")
    assert texts(await hub.poll()) == ["after the gap"]
    assert hub.stats.dropped_bytes == 4150


async def test_late_attach_to_oversized_file_keeps_only_hard_bytes_in_dot_1(tmp_path: Path) -> None:
    """Attaching to a big file (agent restart) rotates it at once; .1 gets its last hard_bytes."""
    out, err = paths(tmp_path)
    append(out, b"x" * 4000 + b"y" * 2000)
    hub = LogHub(limits=FileLimits(max_bytes=1000, hard_bytes=2000))
    hub.add("web", "r1", "web-1", out, err, from_start=False)
    assert await hub.poll() == []
    assert out.stat().st_size == 0 and out.with_name(out.name + ".1").read_bytes() == b"y" * 2000
    assert hub.instance_log("web-1").dropped_bytes == 0  # not written while we followed it
    with pytest.raises(ValueError, match="hard_bytes"):
        FileLimits(max_bytes=1000, hard_bytes=999)
    with pytest.raises(ValueError, match="read_budget"):
        FileLimits(read_budget=0)
