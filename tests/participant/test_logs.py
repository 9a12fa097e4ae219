"""Log capture tests: real files in tmp_path, real trio, one real child process.

Most tests drive ``LogHub.poll()`` by hand so they are deterministic; the subscriber
and rotation tests run ``LogHub.run`` in a nursery with a short poll interval. Every
wait on a condition has a ``trio.fail_after`` deadline.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from superagent.participant.logs import (
    POLL_INTERVAL,
    LineSplitter,
    LogFilter,
    LogHub,
    LogLine,
    Subscription,
)
from tests.participant.children import child_python

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


async def wait_until(cond: Callable[[], bool]) -> None:
    with trio.fail_after(WAIT):
        while not cond():
            await trio.sleep(FAST_POLL)


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


async def test_json_line_fields_level_and_request_id(tmp_path: Path) -> None:
    """A JSON object line keeps its fields and surfaces level and request_id; others do not."""
    out, err = paths(tmp_path)
    hub = LogHub()
    hub.add("web", "r1", "web-1", out, err, from_start=True)
    append(out, b'{"level": "error", "request_id": "req-9", "msg": "boom", "n": 3}\n'
                b"[1, 2]\n{not json\nplain \xff bytes\r\n")
    lines = await hub.poll()
    first, array, broken, plain = lines
    assert first.fields == {"level": "error", "request_id": "req-9", "msg": "boom", "n": 3}
    assert (first.level, first.request_id) == ("error", "req-9")
    assert array.fields is None and broken.fields is None and broken.level is None
    assert plain.text == "plain \ufffd bytes"
    assert LogLine.from_json(first.to_json()) == first
    assert first.to_json()["type"] == "log_line"


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
    hub = LogHub(max_line=16)
    hub.add("web", "r1", "web-1", out, err, from_start=True)
    append(out, b"x" * 40)  # no newline yet: cut as soon as it is too long
    (cut,) = await hub.poll()
    assert cut.cut and cut.text == "x" * 16
    append(out, b"xxxx-rest\nshort\n" + b"y" * 20 + b"\n")
    after = await hub.poll()
    assert [(line.text, line.cut) for line in after] == [("short", False), ("y" * 16, True)]
    assert after[1].to_json()["cut"] is True


def test_splitter_byte_by_byte() -> None:
    """The pure splitter gives the same lines whatever the chunking."""
    data = b"a\n\nbcd\n" + b"z" * 10 + b"\nend\npart"
    whole = LineSplitter(max_line=8).feed(data)
    splitter = LineSplitter(max_line=8)
    pieces = [line for i in range(len(data)) for line in splitter.feed(data[i:i + 1])]
    assert pieces == whole == [(b"a", False), (b"", False), (b"bcd", False),
                               (b"z" * 8, True), (b"end", False)]
    assert splitter.pending == 4


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


async def test_copy_truncate_rotation_with_a_real_appending_child(tmp_path: Path) -> None:
    """A child writing O_APPEND keeps its lines appearing across rotations; .1 holds old ones."""
    out, err = paths(tmp_path)
    max_bytes = 4096
    count = 300  # ~27 KB: several rotations
    hub = LogHub(max_bytes=max_bytes, poll_interval=FAST_POLL, ring=count)
    hub.add("web", "r1", "web-1", out, err, from_start=True)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)  # as the supervisor does
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            with trio.fail_after(WAIT):
                await trio.run_process([child_python(), "-I", "-c", CHATTY, str(count)],
                                       stdout=fd)
            last = f"line {count - 1:05d}"
            await wait_until(lambda: any(t.startswith(last) for t in texts(hub.tail(n=count))))
            nursery.cancel_scope.cancel()
    finally:
        os.close(fd)
    seen = [int(t.split()[1]) for t in texts(hub.tail(n=count))]
    assert seen == sorted(seen)
    ilog = hub.instance_log("web-1")
    assert ilog.closed and ilog.rotations >= count * 90 // max_bytes - 1
    # Copy-truncate may lose the lines written inside its microsecond window (module doc);
    # with a 2 ms gap between writes that is at most one line per rotation, and usually none.
    missing = set(range(count)) - set(seen)
    assert len(missing) <= count * 100 // max_bytes
    current, old = out.read_bytes(), out.with_name(out.name + ".1").read_bytes()
    assert b"\0" not in current  # O_APPEND: the child continued at the new end, no hole
    assert len(current) <= max_bytes + 4 * 1024
    old_numbers = [int(line.split()[1]) for line in old.splitlines()]
    assert old_numbers and old_numbers == sorted(old_numbers)
    assert max(old_numbers) < int(current.splitlines()[0].split()[1]) if current else True


async def test_slow_subscriber_drops_while_fast_one_gets_everything(tmp_path: Path) -> None:
    """A full subscriber queue drops and counts; another subscriber and the hub are unaffected."""
    out, err = paths(tmp_path)
    hub = LogHub(poll_interval=FAST_POLL)
    hub.add("web", "r1", "web-1", out, err, from_start=True)
    got: list[LogLine] = []
    async with trio.open_nursery() as nursery:
        with hub.subscribe() as fast, hub.subscribe(buffer=5) as slow:

            async def consume() -> None:
                async for line in fast:
                    got.append(line)

            nursery.start_soon(consume)
            await nursery.start(hub.run)
            for batch in range(5):
                append(out, b"".join(b"line %d\n" % (batch * 10 + i) for i in range(10)))
                await trio.sleep(FAST_POLL)
            await wait_until(lambda: len(got) == 50)
            assert texts(got) == [f"line {i}" for i in range(50)]
            assert (slow.dropped, slow.delivered, fast.dropped) == (45, 5, 0)
            assert "dropped=45" in repr(slow) and "queued=5/5" in repr(slow)
            assert texts(await drain(slow)) == [f"line {i}" for i in range(5)]
            nursery.cancel_scope.cancel()


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
                await trio.sleep(2 * POLL_INTERVAL)
                assert "subscribers=1" in repr(hub) and "polls=" in repr(hub)
                nursery.cancel_scope.cancel()
            await ended.wait()
    assert sub.closed and "subscribers=0" in repr(hub)
    with pytest.raises(ValueError, match="buffer"):
        hub.subscribe(buffer=0)
