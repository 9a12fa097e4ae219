"""A real coordinator cluster for tests and benchmarks: N ``superagent coordinator`` processes.

``Cluster(root, size=3)`` picks free loopback ports (one Raft and one API port per member,
``tests.support.ports``), gives member *i* (id ``c{i+1}``) its own data dir under ``root``,
and shares one coordinators' secret file and one admin-token file between them. Unless
``participant_secret=None``, the members also accept the legacy shared participant secret
``SECRET`` (a cluster in migration), which tests use to call participant endpoints as a
participant would; ``join_token()`` makes a join token for real participants.
``watch_window`` sets the members' ``--watch-window``: a test that deploys but is not
about the window passes ``tests.coordinator.helpers.TEST_WATCH_WINDOW``, so that each
deploy does not wait out the product's 3 s. ``start_all()`` then ``add_member()`` makes
one more (started later, then added with ``cluster add``).
``wait_ready()`` waits until every running member names the same leader, knows every
member's API URL (so followers can forward writes), and the first leader has written the
admin token; ``token`` holds it from then on.

Each member is a ``tests.support.procs.LoggedProcess``: its own process group (so
``kill9``/``sigstop``/``sigcont`` signal the group), stdout and stderr (JSON log lines)
appended to ``root/c{i+1}.log`` across restarts, and the tail of that log in the report of
any failing test while the cluster is open. ``close()`` (also the context manager's exit)
SIGKILLs every group still there, whatever state the test left it in.

Requests go through one sync httpx client (``get``/``post``/``request``) with the admin token
unless the caller passes its own ``Authorization``. Every wait polls with a deadline
(``tests.support.wait.wait_until``); nothing sleeps in place of a condition.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from tests.support.ports import free_ports
from tests.support.procs import LoggedProcess
from tests.support.wait import wait_until

SECRET = "cluster-test-secret"  # the legacy secret participants shared
COORDINATOR_SECRET = "cluster-test-coordinators-secret"  # Raft and peer calls only
READY_TIMEOUT = 30.0  # cold start (imports, first election, token, API URLs): ~3 s normally
STEP_TIMEOUT = 15.0  # any other single condition waited for
STOP_GRACE = 10.0  # SIGTERM -> exit; then SIGKILL
REQUEST_TIMEOUT = 5.0  # one API request (a write waits at most ~10 s for a leader server-side)
PROBE_TIMEOUT = 0.5  # a /healthz probe: a stopped member must not stall a poll loop


class Member(LoggedProcess):
    """One coordinator: its id, ports, data dir and (while running) its process."""

    def __init__(self, index: int, root: Path, raft_port: int, api_port: int) -> None:
        self.index = index
        self.id = f"c{index + 1}"
        self.raft_port = raft_port
        self.api_port = api_port
        self.data_dir = root / self.id
        super().__init__(f"Member {self.id} api={api_port} raft={raft_port}",
                         root / f"{self.id}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"


class Cluster:
    """N coordinator processes on loopback (see the module docstring)."""

    def __init__(self, root: Path, size: int = 3, *, node_timeout: float | None = None,
                 log_level: str = "info", participant_secret: str | None = SECRET,
                 watch_window: float | None = None, extra_args: tuple[str, ...] = ()
                 ) -> None:
        self.root = root
        self.watch_window = watch_window  # --watch-window; None: the product's default
        self.extra_args = extra_args  # more `superagent coordinator` options, for every member
        self.root.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 * size)
        self.members = [Member(i, root, ports[2 * i], ports[2 * i + 1]) for i in range(size)]
        self.node_timeout = node_timeout
        self.log_level = log_level
        self.coordinator_secret_file = root / "coordinator-secret"
        self.coordinator_secret_file.write_text(COORDINATOR_SECRET + "\n")
        self.secret_file: Path | None = None
        if participant_secret is not None:
            self.secret_file = root / "secret"
            self.secret_file.write_text(participant_secret + "\n")
        self.token_file = root / "admin-token"
        self.token = ""
        self.http = httpx.Client(trust_env=False, timeout=REQUEST_TIMEOUT)

    def __repr__(self) -> str:
        return f"<Cluster {self.root} {self.members}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

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
                "--data-dir", str(m.data_dir),
                "--coordinator-secret-file", str(self.coordinator_secret_file),
                "--admin-token-file", str(self.token_file)]
        if self.secret_file is not None:
            argv += ["--secret-file", str(self.secret_file)]
        if self.node_timeout is not None:
            argv += ["--node-timeout", str(self.node_timeout)]
        if self.watch_window is not None:
            argv += ["--watch-window", str(self.watch_window)]
        return argv + list(self.extra_args)

    def start(self, i: int) -> None:
        """Start member ``i`` (again, on the same ports and data dir)."""
        self.members[i].start(self.argv(i))

    def add_member(self) -> int:
        """One more member (not started, not yet in the Raft members: ``cluster add`` it),
        whose ``--peers`` name every member so far and itself; its index."""
        index = len(self.members)
        raft_port, api_port = free_ports(2)
        self.members.append(Member(index, self.root, raft_port, api_port))
        return index

    def start_all(self) -> None:
        for i in range(len(self.members)):
            self.start(i)

    def kill9(self, i: int) -> None:
        """SIGKILL member ``i`` and reap it."""
        self.members[i].kill9()

    def stop(self, i: int) -> int:
        """SIGTERM member ``i``; SIGKILL after ``STOP_GRACE``. Returns the exit code."""
        return self.members[i].stop(STOP_GRACE)

    def sigstop(self, i: int) -> None:
        self.members[i].sigstop()

    def sigcont(self, i: int) -> None:
        self.members[i].sigcont()

    def running(self) -> list[int]:
        """Indices of members that are alive and not SIGSTOPped."""
        return [m.index for m in self.members if m.alive() and not m.stopped]

    def close(self) -> None:
        """SIGKILL every member's process group still there."""
        for m in self.members:
            m.close()
        self.http.close()

    def log_tails(self) -> str:
        """The end of every member's log (a failing test's report shows them anyway)."""
        return "\n".join(m.tail() for m in self.members)

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

    def join_token(self, i: int, *, uses: int = 1, expires: str = "1h",
                   node: str | None = None) -> str:
        """A join token made through member ``i`` (``uses=0``: any number of machines)."""
        body: dict[str, Any] = {"uses": uses, "expires": expires}
        if node is not None:
            body["node"] = node
        r = self.post(i, "/api/v1/nodes/join-tokens", json=body)
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token

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
        found = wait_until(lambda: _boxed(self.agreed_leader(indices)),
                           f"a leader agreed by {indices}", timeout=timeout)
        assert found is not None
        return found[0]

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> int:
        """Wait for an agreed leader, the admin token, and every member's API URL known to
        every running member (so followers can forward). Returns the leader's index."""
        deadline = time.monotonic() + timeout
        wait_until(lambda: self.token_file.exists() and self.token_file.read_text().strip(),
                   "the admin token file", timeout=timeout)
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

        found = wait_until(ready, "a ready cluster",
                           timeout=max(0.1, deadline - time.monotonic()))
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

        digest = wait_until(same, f"equal state digests on {indices}", timeout=timeout)
        assert digest is not None
        return digest


def _boxed(index: int | None) -> tuple[int] | None:
    """``(index,)``, truthy even for index 0, as ``wait_until`` needs; None stays None."""
    return None if index is None else (index,)
