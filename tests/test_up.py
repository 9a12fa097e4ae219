"""`superagent up --demo` as a user runs it: a real process, Ctrl-C, and a resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from superagent.up import relocated_dir
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
PORTS: dict[Path, tuple[int, int]] = {}  # raft and rpc ports of each test's cluster


def start_up(cwd: Path, api: int, listen: int, *extra: str) -> subprocess.Popen[str]:
    raft, rpc = PORTS.setdefault(cwd, (free_port(), free_port()))
    return subprocess.Popen(
        [sys.executable, "-m", "superagent", "up", "--api", f"127.0.0.1:{api}",
         "--listen", f"127.0.0.1:{listen}", "--raft", f"127.0.0.1:{raft}",
         "--rpc", f"127.0.0.1:{rpc}", *extra],
        cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def read_banner(proc: subprocess.Popen[str], timeout: float = 120.0) -> str:
    """stdout up to the banner's last line; fails with stderr if the process exits first."""
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                return "".join(lines)
            continue
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    err = proc.stderr.read() if proc.stderr else ""
    raise AssertionError(f"no banner; stdout={''.join(lines)!r} stderr tail={err[-3000:]}")


def get_json(url: str) -> dict[str, object]:
    try:
        response = urllib.request.urlopen(url, timeout=10)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{url}: {exc.code} {exc.read()!r} {dict(exc.headers)}") from None
    with response:
        doc: dict[str, object] = json.loads(response.read())
        return doc


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def interrupt_and_wait(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    """Ctrl-C; returns the processes it had started that are still alive after it exits."""
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 10
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    return alive


def test_up_demo_serves_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)  # apps run as their own user and traverse the state dir
    api, listen = free_port(), free_port()
    proc = start_up(tmp_path, api, listen, "--demo")
    try:
        banner = read_banner(proc)
        token = (tmp_path / ".superagent" / "admin-token").read_text().strip()
        assert f"http://127.0.0.1:{api}/api/v1" in banner
        assert f"http://127.0.0.1:{listen}" in banner
        assert token in banner
        app_url = f"http://127.0.0.1:{listen}/hello/"
        assert f"app hello@r1: {app_url}" in banner
        assert get_json(app_url)["release"] == "r1"
        left = interrupt_and_wait(proc)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        assert left == [], f"still running after Ctrl-C: {left}"
        with pytest.raises(OSError):
            urllib.request.urlopen(app_url, timeout=2)

        proc = start_up(tmp_path, api, listen)  # no --demo: the cluster and its app resume
        banner = read_banner(proc)
        assert token in banner
        try:
            assert get_json(app_url)["release"] == "r1"
        except AssertionError:
            assert proc.stderr is not None
            os.set_blocking(proc.stderr.fileno(), False)
            raise AssertionError(proc.stderr.read()) from None
        left = interrupt_and_wait(proc)
        assert proc.returncode == 0 and left == []
    finally:
        for child in descendants(proc.pid):
            child.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(relocated_dir(tmp_path / ".superagent"), ignore_errors=True)


@pytest.mark.parametrize("which", ["--api", "--rpc"])
def test_up_refuses_a_taken_port_and_leaves_nothing_running(tmp_path: Path, which: str
                                                             ) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        if which == "--rpc":
            PORTS[tmp_path] = (free_port(), port)
        proc = start_up(tmp_path, port if which == "--api" else free_port(), free_port())
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            shutil.rmtree(relocated_dir(tmp_path / ".superagent"), ignore_errors=True)
    assert proc.returncode == 2
    assert "Traceback" not in err
    assert "cannot listen" in err and which in err
    assert not [p for p in psutil.process_iter(["cmdline"])
                if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
