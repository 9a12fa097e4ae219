"""Stopping processes and process groups (``superagent.procs``), with real processes."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from superagent import procs

# Waits in these tests are bounded by the helpers' own deadlines; this only stops a hung run.
TEST_DEADLINE = 30.0


async def _start(script: str, *, new_session: bool = True) -> trio.Process:
    """A Python child running ``script``; it prints "ready" once its handlers are set."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", textwrap.dedent(script)], stdout=-1,
        start_new_session=new_session)
    assert proc.stdout is not None
    line = b""
    with trio.fail_after(TEST_DEADLINE):
        while not line.endswith(b"\n"):
            line += await proc.stdout.receive_some(1)
    assert line == b"ready\n"
    return proc


STUBBORN = """
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    time.sleep(600)
"""

# SIGTERM's default action: the kernel ends it at once, with no code of its own to
# schedule, so a loaded machine cannot make it outlive a grace period
POLITE = """
    print("ready", flush=True)
    import time
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_terminate_group_kills_what_ignores_sigterm() -> None:
    """A leader that ignores SIGTERM is killed once the grace period is over, and reaped."""
    proc = await _start(STUBBORN)
    started = trio.current_time()
    with trio.fail_after(TEST_DEADLINE):
        assert await procs.terminate_group(proc, grace=0.3)
    assert trio.current_time() - started >= 0.3
    assert proc.returncode == -signal.SIGKILL


async def _shell_with_member(tmp_path: Path, member: str) -> tuple[trio.Process, int]:
    """A shell-like leader in its own group that starts ``member`` (a script; it prints "up"
    once its handlers are set) and exits at once on SIGTERM, leaving the member behind.
    Returns the leader and the member's pid, once both are ready."""
    (tmp_path / "member.py").write_text(textwrap.dedent(member))
    (tmp_path / "shell.py").write_text(textwrap.dedent(f"""
        import os, signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, {str(tmp_path / "member.py")!r}],
                                 stdout=subprocess.PIPE)
        child.stdout.readline()
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the shell leaves at once
        print(child.pid, flush=True)
        print("ready", flush=True)
        time.sleep(600)
    """))
    proc = await trio.lowlevel.open_process([sys.executable, str(tmp_path / "shell.py")],
                                            stdout=-1, start_new_session=True)
    assert proc.stdout is not None
    out = b""
    with trio.fail_after(TEST_DEADLINE):
        while not out.endswith(b"ready\n"):
            chunk = await proc.stdout.receive_some(64)
            assert chunk, "the shell died before it was ready"
            out += chunk
    return proc, int(out.split()[0])


async def test_terminate_group_waits_for_a_member_that_outlives_its_leader(
        tmp_path: Path) -> None:
    """With members=True the grace covers a member still finishing after its leader left:
    the stop returns once the member is done, not at the leader's exit."""
    marker = tmp_path / "finished"
    proc, _ = await _shell_with_member(tmp_path, f"""
        import pathlib, signal, sys, time
        def done(*_):
            time.sleep(0.3)  # finishing its requests
            pathlib.Path({str(marker)!r}).write_text("done")
            sys.exit(0)
        signal.signal(signal.SIGTERM, done)
        print("up", flush=True)
        time.sleep(600)
    """)
    started = trio.current_time()
    # a grace as long as the test's own deadline: the stop's end is the member's exit, so
    # nothing here depends on how fast a loaded machine runs the member
    with trio.fail_after(TEST_DEADLINE + 5):
        assert await procs.terminate_group(proc, grace=TEST_DEADLINE, members=True)
    elapsed = trio.current_time() - started
    assert marker.exists(), f"the stop ended before the member finished ({elapsed:.2f} s)"
    assert elapsed >= 0.3
    assert procs.group_members(proc.pid) == []


async def test_terminate_group_kills_a_member_that_outlives_the_grace(tmp_path: Path) -> None:
    """With members=True a member that ignores SIGTERM is waited for the whole grace, then
    killed with the group."""
    proc, member = await _shell_with_member(
        tmp_path, textwrap.dedent(STUBBORN).replace("ready", "up"))
    started = trio.current_time()
    with trio.fail_after(TEST_DEADLINE):
        assert await procs.terminate_group(proc, grace=0.5, members=True)
    assert trio.current_time() - started >= 0.5, "the member was not waited for"
    with trio.fail_after(TEST_DEADLINE):
        while _alive(member) and procs.group_members(proc.pid):
            await trio.sleep(0.01)  # the orphan is reaped by init, not by us
    assert procs.group_members(proc.pid) == []


async def test_terminate_group_after_exit_only_kills_the_rest() -> None:
    """A leader reaped a moment ago: the SIGKILL still reaches what it left in its group."""
    script = """
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(child.pid, flush=True)
    """
    proc = await trio.lowlevel.open_process([sys.executable, "-c", textwrap.dedent(script)],
                                            stdout=-1, start_new_session=True)
    assert proc.stdout is not None
    with trio.fail_after(TEST_DEADLINE):
        left = int(await proc.stdout.receive_some(64))
        await proc.wait()
        assert procs.group_members(proc.pid) == [left]
        assert await procs.terminate_group(proc, grace=5.0)
        while procs.group_members(proc.pid):
            await trio.sleep(0.01)  # the orphan's reaping by init is not ours to wait on


async def test_terminate_signals_each_child_alone() -> None:
    """terminate() stops a polite and a stubborn child (not in their own groups) and
    warns about the one it had to kill."""
    polite = await _start(POLITE, new_session=False)
    stubborn = await _start(STUBBORN, new_session=False)
    with capture_logs() as logs, trio.fail_after(TEST_DEADLINE):
        survivors = await procs.terminate([polite, stubborn], grace=0.5, what="worker")
    assert survivors == []
    assert (polite.returncode, stubborn.returncode) == (-signal.SIGTERM, -signal.SIGKILL)
    assert [(e["event"], e["pid"]) for e in logs] == [
        ("worker outlived the grace period; killing", stubborn.pid)]


def test_signal_group_logs_a_group_it_may_not_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    """EPERM is logged (the group exists, we may not touch it); ESRCH is silent."""
    def refuse(pgid: int, signum: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "killpg", refuse)
    with capture_logs() as logs:
        procs.signal_group(4242, signal.SIGTERM)
    assert [(e["event"], e["pgid"], e["signal"]) for e in logs] == [
        ("may not signal process group", 4242, "SIGTERM")]
    monkeypatch.undo()
    with capture_logs() as logs:
        procs.signal_group(2**22 + 1, signal.SIGTERM)  # above pid_max's default: no group
    assert logs == []
