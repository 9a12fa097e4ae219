"""Tests of the suite's own helpers: tests/support/{ports,wait,logs,procs}.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.support import logs, ports
from tests.support.procs import REPO, LoggedProcess
from tests.support.wait import wait_until, wait_until_async


# ---------------------------------------------------------------------------- ports
def test_pool_lies_outside_the_ephemeral_range_and_the_instance_ports() -> None:
    """The default range gives 20000-32767; another range gives the larger stretch left."""
    assert ports.pool((32768, 60999)) == range(20000, 32768)
    assert ports.pool((49152, 65535)) == range(20000, 49152)
    assert ports.pool((1024, 40000)) == range(40001, 65536)
    with pytest.raises(RuntimeError, match="fewer than"):
        ports.pool((15000, 65000))
    low, high = ports.ephemeral_range()
    current = ports.pool()
    assert current.start >= 20000 and (current.stop <= low or current.start > high)


def test_free_ports_are_distinct_bindable_and_never_repeated() -> None:
    """Ports come from the pool, bind on 127.0.0.1, and none is handed out twice."""
    first = ports.free_ports(50)
    second = [ports.free_port() for _ in range(50)]
    both = first + second
    assert len(set(both)) == 100
    assert all(p in ports.pool() for p in both)
    assert all(ports.bindable(p, udp=True) for p in ports.free_ports(3, udp=True))


def test_a_port_in_use_is_skipped() -> None:
    """A port with a listener on it is not bindable, so never handed out."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports.free_port()))
        taken.listen()
        busy = taken.getsockname()[1]
        assert not ports.bindable(busy)


# ---------------------------------------------------------------------------- wait
def test_wait_until_returns_the_first_truthy_value() -> None:
    """The probe's first truthy value is returned; errors of "not up yet" are retried."""
    answers = iter([OSError("refused"), None, 0, "ready"])

    def probe() -> object:
        answer = next(answers)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    assert wait_until(probe, "ready", timeout=5.0, interval=0.001) == "ready"


def test_wait_until_names_what_and_the_last_value_and_error() -> None:
    """On timeout the message names what was awaited, the last value and last error."""
    calls = iter(range(1000))

    def probe() -> list[int]:
        if next(calls) == 0:
            raise ConnectionRefusedError("not yet")
        return []

    with pytest.raises(AssertionError) as info:
        wait_until(probe, "the server", timeout=0.05, interval=0.001)
    message = str(info.value)
    assert "waiting for the server" in message
    assert "last value: []" in message and "ConnectionRefusedError('not yet')" in message


def test_wait_until_with_until_shows_the_last_value() -> None:
    """With ``until`` the wait ends on the first value it accepts (even a falsy one), and
    a timeout shows the last value, not a bare False."""
    counter = iter(range(1000))
    assert wait_until(lambda: next(counter) - 3, "zero", until=lambda v: v == 0,
                      interval=0.001) == 0
    with pytest.raises(AssertionError, match=r"last value: \{'ok': 2\}"):
        wait_until(lambda: {"ok": 2}, "five answers", until=lambda c: c["ok"] >= 5,
                   timeout=0.02, interval=0.001)


def test_wait_until_lets_other_errors_through() -> None:
    """An exception not in ``ignore`` fails the wait at once."""
    def probe() -> bool:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        wait_until(probe, "anything", timeout=60.0)


async def test_wait_until_async_runs_on_trio_time(
        autojump_clock: trio.testing.MockClock) -> None:
    """The async wait measures its deadline on trio's clock and awaits async probes."""
    start = trio.current_time()

    async def probe() -> float | None:
        await trio.sleep(0)
        return trio.current_time() if trio.current_time() - start >= 3.0 else None

    assert await wait_until_async(probe, "three seconds", timeout=10.0) - start >= 3.0
    with pytest.raises(AssertionError, match=r"timed out after 10.0s waiting for never"):
        await wait_until_async(lambda: False, "never", timeout=10.0)
    assert trio.current_time() - start >= 13.0


# ---------------------------------------------------------------------------- logs, procs
def test_tail_is_bounded(tmp_path: Path) -> None:
    """A log's tail has at most the asked lines and bytes; a missing log says so."""
    log = tmp_path / "big.log"
    log.write_text("".join(f"line {i}\n" for i in range(10000)))
    text = logs.tail(log, lines=3)
    assert text.splitlines() == ["line 9997", "line 9998", "line 9999"]
    assert len(logs.tail(log, lines=10000, limit=100)) <= 100
    assert logs.tail(tmp_path / "missing.log").startswith("(no log")


def test_logged_process_logs_stops_and_is_reported(tmp_path: Path) -> None:
    """A process's output lands in its log, which is in the report until closed."""
    proc = LoggedProcess("sleeper", tmp_path / "sleeper.log")
    code = "import sys, time; print('hello from the child', flush=True); time.sleep(60)"
    proc.start([sys.executable, "-c", code])
    try:
        wait_until(lambda: "hello from the child" in logs.tail(proc.log_path),
                   "the child's greeting in its log")
        assert "hello from the child" in logs.report()
        proc.sigstop()
        assert proc.stop(grace=5.0) == -15  # SIGCONT first, then SIGTERM ends it
        assert not proc.alive()
    finally:
        proc.close()
    assert "sleeper" in repr(proc) and "rc=-15" in repr(proc)


def test_failing_test_report_shows_process_logs(tmp_path: Path) -> None:
    """The conftest hook appends the tails of watched logs to a failing test's report."""
    (tmp_path / "conftest.py").write_text(
        "from tests.support.logs import pytest_runtest_makereport  # noqa: F401\n")
    (tmp_path / "test_x.py").write_text(textwrap.dedent("""
        from tests.support import logs

        def test_fails(tmp_path):
            log = tmp_path / "member.log"
            log.write_text("the member's last words\\n")
            logs.watch("member c1", log)
            assert False

        def test_passes():
            pass
    """))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:trio",
         "-o", "addopts=", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    out = result.stdout
    assert "1 failed, 1 passed" in out, out
    section = out[out.index("process logs (call)"):]
    assert "member c1" in section and "the member's last words" in section, out
