"""Tests of the bundled demo app (``superagent/demo/app``): a real child process on loopback.

The app runs under the system ``python3`` when there is one (that is what an app user gets),
from a copy of its directory so nothing is written into the package. Every wait is on a
condition with a deadline: a line on the child's output, a response, the child's exit.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from superagent.demo import demo_app_dir
from superagent.manifest import load_manifest
from superagent.pack import pack
from superagent.participant.archive import safe_extract
from tests.support.ports import free_port

PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
DEADLINE = 10.0  # seconds for anything that should take milliseconds


@dataclass
class Child:
    """The running demo app, with its stdout and stderr lines arriving on queues."""

    proc: subprocess.Popen[str]
    port: int
    stdout: queue.Queue[str] = field(default_factory=queue.Queue)
    stderr: queue.Queue[str] = field(default_factory=queue.Queue)

    def wait_line(self, lines: queue.Queue[str], needle: str, timeout: float = DEADLINE
                  ) -> str:
        """The first line containing ``needle``; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                break
            if needle in line:
                return line
        pytest.fail(f"no line containing {needle!r} within {timeout}s")

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE)


def _pump(stream: io.TextIOBase, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Child]:
    """The demo app started from a copy of its directory, ready to serve."""
    src = shutil.copytree(demo_app_dir(), tmp_path / "src")
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PORT": str(port),
           "GREETING": "hi there", "SUPERAGENT_APP": "hello", "SUPERAGENT_RELEASE": "r1",
           "SUPERAGENT_INSTANCE": "hello-r1-0", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([PYTHON, "app.py"], cwd=src, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    c = Child(proc, port)
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, c.stdout), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, c.stderr), daemon=True)]
    for pump in pumps:
        pump.start()
    try:
        c.wait_line(c.stdout, "listening")
        yield c
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(DEADLINE)
        for pump in pumps:
            pump.join(DEADLINE)


def get(conn: http.client.HTTPConnection, path: str,
        headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read()


def test_greeting(child: Child) -> None:
    """/ shows the instance's identity, the greeting, a counter and the request id."""
    conn = child.connect()
    status, body = get(conn, "/", {"X-Request-Id": "abc123"})
    assert status == 200
    info = json.loads(body)
    assert info == {"greeting": "hi there", "app": "hello", "release": "r1",
                    "instance": "hello-r1-0", "count": 1, "request_id": "abc123"}
    assert json.loads(get(conn, "/")[1])["count"] == 2
    conn.close()


def test_healthz(child: Child) -> None:
    """/healthz answers 200 ok."""
    conn = child.connect()
    assert get(conn, "/healthz") == (200, b"ok\n")
    conn.close()


def test_keep_alive(child: Child) -> None:
    """Two requests travel on one connection."""
    conn = child.connect()
    assert get(conn, "/healthz")[0] == 200
    first = conn.sock
    assert first is not None
    assert get(conn, "/")[0] == 200
    assert conn.sock is first
    conn.close()


def test_slow(child: Child) -> None:
    """/slow?s=0.2 answers after about that long."""
    conn = child.connect()
    started = time.monotonic()
    status, body = get(conn, "/slow?s=0.2")
    assert status == 200
    assert json.loads(body) == {"slept": 0.2}
    assert time.monotonic() - started >= 0.2
    conn.close()


def test_sigterm_finishes_in_flight_request(child: Child) -> None:
    """SIGTERM during a /slow request: the request completes, then the app exits 0."""
    result: queue.Queue[tuple[int, bytes] | BaseException] = queue.Queue()

    def request() -> None:
        conn = child.connect()
        try:
            result.put(get(conn, "/slow?s=1"))
        except BaseException as exc:
            result.put(exc)
        finally:
            conn.close()

    client = threading.Thread(target=request, daemon=True)
    client.start()
    child.wait_line(child.stderr, "slow request: sleeping")  # the request is in flight
    child.proc.send_signal(signal.SIGTERM)
    outcome = result.get(timeout=DEADLINE)
    assert outcome == (200, b'{"slept": 1.0}\n')
    assert child.proc.wait(DEADLINE) == 0
    client.join(DEADLINE)
    child.wait_line(child.stdout, "stopped")


def test_demo_dir_validates_and_packs(tmp_path: Path) -> None:
    """The bundled directory is a valid app that packs, unpacks and passes its own test."""
    spec = load_manifest(demo_app_dir())
    assert spec.name == "hello"
    assert (spec.routes.prefix, spec.routes.strip_prefix) == ("/hello", True)
    assert (spec.health.path, spec.health.ready_path) == ("/healthz", "/healthz")
    assert spec.scale.per_node == 2
    assert spec.test.command is not None
    buf = io.BytesIO()
    result = pack(demo_app_dir(), buf)
    assert result.app_name == "hello"
    out = tmp_path / "src"
    safe_extract(buf.getvalue(), out)
    assert sorted(p.name for p in out.iterdir()) == ["app.py", "superagent.toml", "test_app.py"]
    test = subprocess.run(spec.test.command, shell=True, cwd=out, capture_output=True,
                          text=True, timeout=60,
                          env={"PATH": f"{Path(PYTHON).parent}:{os.environ.get('PATH', '')}"})
    assert test.returncode == 0, test.stderr
