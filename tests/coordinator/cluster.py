"""A real coordinator cluster for tests and benchmarks: N ``superagent coordinator`` processes.

``Cluster(root, size=3)`` picks free loopback ports (one Raft and one API port per member),
gives member *i* (id ``c{i+1}``) its own data dir under ``root``, and shares one secret file
and one admin-token file between them. ``start_all()`` then ``wait_ready()`` waits until every
running member names the same leader, knows every member's API URL (so followers can forward
writes), and the first leader has written the admin token; ``token`` holds it from then on.

Each member runs in its own process group (``start_new_session``), so ``kill9``/``sigstop``/
``sigcont`` signal the group, and ``close()`` (also the context manager's exit) SIGKILLs every
group that is still there, whatever state the test left it in (a SIGSTOPped member gets a
SIGCONT first so it can be reaped). Each member's stdout and stderr (JSON log lines) go to
``root/c{i+1}.log``, appended across restarts; ``close(show_logs=True)`` prints their tails,
which pytest shows only for a failing test.

Requests go through one sync httpx client (``get``/``post``/``request``) with the admin token
unless the caller passes its own ``Authorization``. Every wait polls with a deadline
(``wait_for`` of tests/proxy/test_master.py); nothing sleeps in place of a condition.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from tests.proxy.test_master import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
SECRET = "cluster-test-secret"
READY_TIMEOUT = 30.0  # cold start (imports, first election, token, API URLs): ~3 s normally
STEP_TIMEOUT = 15.0  # any other single condition waited for
STOP_GRACE = 10.0  # SIGTERM -> exit; then SIGKILL
REQUEST_TIMEOUT = 5.0  # one API request (a write waits at most ~10 s for a leader server-side)
PROBE_TIMEOUT = 0.5  # a /healthz probe: a stopped member must not stall a poll loop
LOG_TAIL = 40  # lines of each member's log printed by close(show_logs=True)


class Member:
    """One coordinator: its id, ports, data dir and (while running) its process."""

    def __init__(self, index: int, root: Path, raft_port: int, api_port: int) -> None:
        self.index = index
        self.id = f"c{index + 1}"
        self.raft_port = raft_port
        self.api_port = api_port
        self.data_dir = root / self.id
        self.log_path = root / f"{self.id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped by the test

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        rc = self.proc.returncode if self.proc else None
        return (f"<Member {self.id} api={self.api_port} raft={self.raft_port} pid={pid}"
                f" rc={rc}{' STOPPED' if self.stopped else ''}>")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: signal.Signals) -> None:
        assert self.proc is not None, f"{self!r} was never started"
        with contextlib.suppress(ProcessLookupError):  # gone: the group has no member left
            os.killpg(self.proc.pid, sig)


class Cluster:
    """N coordinator processes on loopback (see the module docstring)."""

    def __init__(self, root: Path, size: int = 3, *, node_timeout: float | None = None,
                 log_level: str = "info") -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        ports = distinct_free_ports(2 * size)
        self.members = [Member(i, root, ports[2 * i], ports[2 * i + 1]) for i in range(size)]
        self.node_timeout = node_timeout
        self.log_level = log_level
        self.secret_file = root / "secret"
        self.secret_file.write_text(SECRET + "\n")
        self.token_file = root / "admin-token"
        self.token = ""
        self.http = httpx.Client(trust_env=False, timeout=REQUEST_TIMEOUT)

    def __repr__(self) -> str:
        return f"<Cluster {self.root} {self.members}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(show_logs=exc is not None)

    # ------------------------------------------------------------------ processes
    def argv(self, i: int) -> list[str]:
        m = self.members[i]
        if len(self.members) == 1:
            topology = ["--raft", f"127.0.0.1:{m.raft_port}"]
        else:
            topology = ["--peers", ",".join(f"{o.id}=127.0.0.1:{o.raft_port}"
                                            for o in self.members)]
        argv = [sys.executable, "-m", "superagent", "--log-level", self.log_level,
                "coordinator", "--id", m.id, *topology, "--api", f"127.0.0.1:{m.api_port}",
                "--data-dir", str(m.data_dir), "--secret-file", str(self.secret_file),
                "--admin-token-file", str(self.token_file)]
        if self.node_timeout is not None:
            argv += ["--node-timeout", str(self.node_timeout)]
        return argv

    def start(self, i: int) -> None:
        """Start member ``i`` (again, on the same ports and data dir)."""
        m = self.members[i]
        assert not m.alive(), f"{m!r} is already running"
        with open(m.log_path, "ab") as log:
            m.proc = subprocess.Popen(self.argv(i), cwd=REPO, stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=log, start_new_session=True)
        m.stopped = False

    def start_all(self) -> None:
        for i in range(len(self.members)):
            self.start(i)

    def kill9(self, i: int) -> None:
        """SIGKILL member ``i`` and reap it."""
        m = self.members[i]
        m.signal_group(signal.SIGKILL)
        assert m.proc is not None
        m.proc.wait(timeout=STEP_TIMEOUT)
        m.stopped = False

    def stop(self, i: int) -> int:
        """SIGTERM member ``i``; SIGKILL after ``STOP_GRACE``. Returns the exit code."""
        m = self.members[i]
        assert m.proc is not None
        if m.stopped:
            self.sigcont(i)
        m.signal_group(signal.SIGTERM)
        try:
            return m.proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            m.signal_group(signal.SIGKILL)
            return m.proc.wait(timeout=STEP_TIMEOUT)

    def sigstop(self, i: int) -> None:
        self.members[i].signal_group(signal.SIGSTOP)
        self.members[i].stopped = True

    def sigcont(self, i: int) -> None:
        self.members[i].signal_group(signal.SIGCONT)
        self.members[i].stopped = False

    def running(self) -> list[int]:
        """Indices of members that are alive and not SIGSTOPped."""
        return [m.index for m in self.members if m.alive() and not m.stopped]

    def close(self, show_logs: bool = False) -> None:
        """SIGKILL every member's process group still there; print log tails if asked."""
        for m in self.members:
            if m.proc is None:
                continue
            if m.proc.poll() is None:
                m.signal_group(signal.SIGCONT)
                m.signal_group(signal.SIGKILL)
                m.proc.wait(timeout=STEP_TIMEOUT)
            else:  # the leader process is gone; make sure nothing it started lingers
                m.signal_group(signal.SIGKILL)
        self.http.close()
        if show_logs:
            print(self.log_tails())

    def log_tails(self, lines: int = LOG_TAIL) -> str:
        out = []
        for m in self.members:
            try:
                tail = m.log_path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                tail = ["(no log)"]
            out.append(f"----- {m!r} {m.log_path}\n" + "\n".join(tail))
        return "\n".join(out)

    # ------------------------------------------------------------------ requests
    def api(self, i: int) -> str:
        """Member ``i``'s API base URL."""
        return self.members[i].url

    def index_of(self, cid: str) -> int:
        return next(m.index for m in self.members if m.id == cid)

    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    def request(self, method: str, i: int, path: str, **kw: Any) -> httpx.Response:
        """``method`` on member ``i``'s API; the admin token unless headers say otherwise."""
        headers = {**self.admin(), **kw.pop("headers", {})}
        return self.http.request(method, self.api(i) + path, headers=headers, **kw)

    def get(self, i: int, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", i, path, **kw)

    def post(self, i: int, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", i, path, **kw)

    def health(self, i: int) -> dict[str, Any] | None:
        """Member ``i``'s /healthz body (200 or 503), or None when it does not answer."""
        try:
            r = self.http.get(self.api(i) + "/healthz", timeout=PROBE_TIMEOUT)
        except httpx.HTTPError:
            return None
        if r.status_code not in (200, 503):
            return None
        body: dict[str, Any] = r.json()
        return body

    def cluster_view(self, i: int) -> dict[str, Any]:
        r = self.get(i, "/api/v1/cluster", timeout=PROBE_TIMEOUT)
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    # ------------------------------------------------------------------ conditions
    def agreed_leader(self, among: Iterable[int] | None = None) -> int | None:
        """The leader's index when exactly one of ``among`` (default: the running members)
        says it leads and every one of them names it; else None."""
        indices = list(self.running() if among is None else among)
        healths = [self.health(i) for i in indices]
        if any(h is None or not h["ok"] for h in healths):
            return None
        leaders = [i for i, h in zip(indices, healths, strict=True)
                   if h is not None and h["role"] == "leader"]
        if len(leaders) != 1:
            return None
        name = self.members[leaders[0]].id
        if all(h is not None and h["leader"] == name for h in healths):
            return leaders[0]
        return None

    def leader(self, among: Iterable[int] | None = None, timeout: float = STEP_TIMEOUT) -> int:
        """Wait until the members ``among`` agree on a leader; return its index."""
        indices = list(self.running() if among is None else among)
        found = wait_for(lambda: _boxed(self.agreed_leader(indices)),
                         f"a leader agreed by {indices}", timeout)
        assert found is not None
        return found[0]

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> int:
        """Wait for an agreed leader, the admin token, and every member's API URL known to
        every running member (so followers can forward). Returns the leader's index."""
        deadline = time.monotonic() + timeout
        wait_for(lambda: self.token_file.exists() and self.token_file.read_text().strip(),
                 "the admin token file", timeout)
        self.token = self.token_file.read_text().strip()

        def ready() -> tuple[int] | None:
            leader = self.agreed_leader()
            if leader is None:
                return None
            for i in self.running():
                view = self.cluster_view(i)
                if not view["healthy"] or not all(m["api_url"] for m in view["members"]):
                    return None
            return _boxed(leader)

        found = wait_for(ready, "a ready cluster", max(0.1, deadline - time.monotonic()))
        assert found is not None
        return found[0]

    def digests(self, among: Iterable[int] | None = None) -> dict[int, str]:
        indices = list(self.running() if among is None else among)
        return {i: self.cluster_view(i)["state_digest"] for i in indices}

    def wait_converged(self, among: Iterable[int] | None = None,
                       timeout: float = STEP_TIMEOUT) -> str:
        """Wait until the members ``among`` report the same state digest; return it."""
        indices = list(self.running() if among is None else among)

        def same() -> str | None:
            found = set(self.digests(indices).values())
            return found.pop() if len(found) == 1 else None

        digest = wait_for(same, f"equal state digests on {indices}", timeout)
        assert digest is not None
        return digest


def distinct_free_ports(n: int) -> list[int]:
    """``n`` different free loopback ports (``free_port`` alone may hand out one twice)."""
    ports: list[int] = []
    for _ in range(100 * n):
        port = free_port()
        if port not in ports:
            ports.append(port)
        if len(ports) == n:
            return ports
    raise AssertionError(f"could not find {n} distinct free ports: {ports}")


def _boxed(index: int | None) -> tuple[int] | None:
    """``(index,)``, truthy even for index 0, as ``wait_for`` needs; None stays None."""
    return None if index is None else (index,)
