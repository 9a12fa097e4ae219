"""Participants as real processes beside a coordinator ``Cluster``, and what drives them.

``Fleet(root, coordinators=[url, ...], size=2)`` runs ``size`` ``superagent participant``
processes (nodes ``n1-<tag>``, ``n2-<tag>`` ..., the tag from ``root``'s name) on free
loopback ports (one RPC and one proxy port each, ``tests.support.ports``), each with its own
data dir under ``root`` and one proxy worker, joined to the coordinators with
``--stop-on-exit`` (unless ``stop_on_exit=False``: an agent that is upgraded leaves its
apps and proxy workers running), enrolled with ``join_token`` when one is given (each then keeps its
own credential) and holding the legacy shared ``secret`` unless it is None. Calls to a
participant's RPC bear what a coordinator's would: the signal key derived from its
credential (or the shared secret).
``wait_joined(cluster)`` waits until the cluster lists every node up and online. Each
agent is a ``tests.support.procs.LoggedProcess``: its output goes to ``root/<node>.log``
and a failing test's report shows the tail.

Cleanup, whatever state a test left things in: ``close()`` takes the psutil tree of every
agent (its proxy workers and app instances; instances run in sessions of their own, so the
agent's process group alone does not hold them), SIGTERMs the agents (``--stop-on-exit``
stops their apps and workers), SIGKILLs each agent's group after ``STOP_GRACE`` and then
every process of those trees still alive, and removes the node cgroups an agent that did
not stop its apps left (``tests.support.cgroups``). ``leftovers(root)`` lists any process
whose command line or working directory lies under ``root``, for the "nothing left
running" assertion.

As root the agent runs app instances as a per-app system user, so ``root`` and the app
sources must be world-traversable/readable: ``make_root()`` creates such a directory, with
the coordinators' (secret-holding) data in a private ``coordinators`` subdirectory.

``Load`` sends light keep-alive traffic through every participant's proxy from one thread
per proxy and counts answers by status and release, and failures (non-2xx and transport
errors) with a sample of each. Waits poll with deadlines (``wait_until``); the only sleep is
``Load``'s pacing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import psutil

from superagent.pack import pack
from superagent.rpc.credentials import CREDENTIAL_FILE, read_credential, signal_key
from tests.coordinator.cluster import SECRET, Cluster
from tests.participant.children import world_python
from tests.support.cgroups import node_groups, remove_trees
from tests.support.ports import free_ports
from tests.support.procs import LoggedProcess
from tests.support.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
DEMO_APP = REPO / "superagent" / "demo" / "app"
JOIN_TIMEOUT = 30.0  # agent start (imports, proxy worker) plus register: ~2 s normally
STOP_GRACE = 15.0  # SIGTERM -> the agent stopped its apps and workers and exited
DEPLOY_TIMEOUT = 60.0  # one deploy of the tiny demo app over two nodes, on a busy 2-core box
REQUEST_TIMEOUT = 10.0  # one API, RPC or proxied request
LOAD_PACE = 0.02  # seconds between one load client's requests: light, leaves CPU to the deploy
SAMPLES = 5  # failures kept verbatim per load client


def make_root(prefix: str) -> Path:
    """A fresh world-traversable temp dir (app users must reach their release dirs)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    (root / "coordinators").mkdir(mode=0o700)
    return root


@contextlib.contextmanager
def kept_on_failure(prefix: str) -> Iterator[Path]:
    """A fresh root (``make_root``) removed when the block ends well and kept, with its
    data dirs and logs, when it raises, so a failure can be read afterwards."""
    root = make_root(prefix)
    try:
        yield root
    except BaseException:
        print(f"data dirs and logs kept in {root}")
        raise
    shutil.rmtree(root, ignore_errors=True)


def app_python() -> str:
    """A python3 every user may execute (as root the app runs as its own user)."""
    python = world_python()
    if python is None:
        raise RuntimeError("no python3 that an unprivileged app user can execute")
    return python


def write_demo_app(dest: Path, *, name: str, version: str, per_node: int = 2) -> Path:
    """The demo app (superagent/demo/app) under ``dest`` as app ``name``, ``per_node``
    instances per node, ``VERSION`` in its env (so each version is a distinct artifact), no
    ``[test]`` step, run by a python3 the app user may execute. Returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO_APP / "app.py", dest / "app.py")
    return write_manifest(dest, name=name, python=app_python(), per_node=per_node,
                          env={"VERSION": version})


def write_manifest(dest: Path, *, name: str, python: str, per_node: int,
                   env: dict[str, str]) -> Path:
    """``superagent.toml`` beside the ``app.py`` in ``dest``: run by ``python``, checked
    on ``/healthz`` (liveness and readiness), routed at ``/name`` with the prefix
    stripped, ``per_node`` instances, ``env``; then every file made readable and every
    directory enterable by the app's user. Returns ``dest``."""
    (dest / "superagent.toml").write_text(
        f'[app]\nname = "{name}"\n'
        f'[run]\ncommand = "{python} app.py"\n'
        '[health]\npath = "/healthz"\nready_path = "/healthz"\n'
        f'[routes]\nprefix = "/{name}"\nstrip_prefix = true\n'
        f'[scale]\nper_node = {per_node}\n'
        '[env]\n' + "".join(f'{key} = "{value}"\n' for key, value in env.items()))
    for path in (dest, *dest.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def upload(cluster: Cluster, member: int, app_dir: Path, **query: Any) -> dict[str, Any]:
    """Pack ``app_dir`` and POST it as a release through member ``member``; the 201 body
    (``release``, ``deploy_id``). Raises AssertionError on any other answer."""
    buf = io.BytesIO()
    packed = pack(app_dir, buf)
    r = cluster.post(member, f"/api/v1/apps/{packed.app_name}/releases",
                     params={"sha256": packed.sha256, **query}, content=buf.getvalue(),
                     headers={"content-type": "application/gzip"}, timeout=30.0)
    assert r.status_code == 201, f"upload of {app_dir}: {r.status_code} {r.text[:500]}"
    body: dict[str, Any] = r.json()
    return body


def deploy_record(cluster: Cluster, member: int, app: str, deploy_id: str) -> dict[str, Any]:
    r = cluster.get(member, f"/api/v1/apps/{app}/deploys/{deploy_id}", timeout=REQUEST_TIMEOUT)
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


def wait_deploy_done(cluster: Cluster, members: list[int], app: str, deploy_id: str,
                     timeout: float = DEPLOY_TIMEOUT) -> dict[str, Any]:
    """Poll the deploy through the first of ``members`` that answers until it is finished;
    return the record."""
    def done() -> dict[str, Any] | None:
        for i in members:
            with contextlib.suppress(httpx.HTTPError):
                record = deploy_record(cluster, i, app, deploy_id)
                return record if record["finished"] else None
        return None

    found = wait_until(done, f"deploy {deploy_id} of {app} done", timeout=timeout)
    assert found is not None
    return found


class Participant(LoggedProcess):
    """One agent: node name, ports, data dir and (while running) its process."""

    def __init__(self, index: int, root: Path, rpc_port: int, listen_port: int) -> None:
        self.index = index
        # Unique per fleet: the agent's cgroups are named after the node and the instance ids
        # repeat from run to run, so two fleets at once must not share node names.
        self.node = f"n{index + 1}-{root.name.rsplit('-', 1)[-1]}".replace("_", "x")
        self.rpc_port = rpc_port
        self.listen_port = listen_port
        self.data_dir = root / self.node
        super().__init__(f"Participant {self.node} rpc={rpc_port} proxy={listen_port}",
                         root / f"{self.node}.log")

    @property
    def rpc(self) -> str:
        return f"http://127.0.0.1:{self.rpc_port}"

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"


class Fleet:
    """``size`` participant processes joined to ``coordinators`` (see the module docstring)."""

    def __init__(self, root: Path, coordinators: list[str], size: int = 2, *,
                 secret: str | None = SECRET, join_token: str | None = None,
                 log_level: str = "info", groups: tuple[str, ...] = ("default",),
                 stop_on_exit: bool = True) -> None:
        self.root = root
        self.stop_on_exit = stop_on_exit
        self.coordinators = coordinators
        self.secret = secret
        self.join_token = join_token
        self.log_level = log_level
        ports = free_ports(2 * size)
        self.members = [Participant(i, root, ports[2 * i], ports[2 * i + 1])
                        for i in range(size)]
        self.groups: dict[int, tuple[str, ...]] = dict.fromkeys(range(size), groups)
        self.http = httpx.Client(trust_env=False, timeout=REQUEST_TIMEOUT)

    def __repr__(self) -> str:
        return f"<Fleet {self.root} {self.members}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ processes
    def argv(self, i: int) -> list[str]:
        p = self.members[i]
        return [sys.executable, "-m", "superagent", "--log-level", self.log_level,
                "participant", "--data-dir", str(p.data_dir),
                "--rpc", f"127.0.0.1:{p.rpc_port}", "--listen", f"127.0.0.1:{p.listen_port}",
                "--proxy-workers", "1", "--node", p.node,
                "--group", ",".join(self.groups.get(i, ("default",))),
                "--coordinator", ",".join(self.coordinators),
                *(["--stop-on-exit"] if self.stop_on_exit else [])]

    def start(self, i: int) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("SUPERAGENT_SECRET", "SUPERAGENT_JOIN_TOKEN")}
        if self.join_token:
            env["SUPERAGENT_JOIN_TOKEN"] = self.join_token
        if self.secret:
            env["SUPERAGENT_SECRET"] = self.secret
        self.members[i].start(self.argv(i), env=env)

    def credential(self, i: int) -> str | None:
        """Participant ``i``'s own credential, once it is enrolled."""
        return read_credential(self.members[i].data_dir / CREDENTIAL_FILE)

    def rpc_headers(self, i: int) -> dict[str, str]:
        """What a coordinator's call to participant ``i`` bears."""
        credential = self.credential(i)
        key = signal_key(credential) if credential else self.secret or ""
        return {"authorization": f"Bearer {key}"}

    def start_all(self) -> None:
        for i in range(len(self.members)):
            self.start(i)

    def add(self, groups: tuple[str, ...] = ("default",)) -> int:
        """One more member (not started) in ``groups``; its index."""
        index = len(self.members)
        rpc_port, listen_port = free_ports(2)
        self.members.append(Participant(index, self.root, rpc_port, listen_port))
        self.groups[index] = groups
        return index

    def kill9(self, i: int) -> None:
        """The machine of member ``i`` dies: SIGKILL its agent, proxy workers and app
        instances (instances run in sessions of their own, so the agent's tree is taken
        first), and reap the agent."""
        p = self.members[i]
        assert p.proc is not None
        tree: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            tree = psutil.Process(p.proc.pid).children(recursive=True)
        p.kill9()
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(tree, timeout=STOP_GRACE)

    def wait_joined(self, cluster: Cluster, member: int,
                    timeout: float = JOIN_TIMEOUT) -> None:
        """Wait until coordinator ``member`` lists every node registered, up and online."""
        names = {p.node for p in self.members}

        def joined() -> bool:
            nodes = cluster.get(member, "/api/v1/nodes").json()["nodes"]
            ready = {n["name"] for n in nodes if n["up"] and n["lifecycle"] == "online"}
            return names <= ready

        for p in self.members:  # an agent that died at start fails at once, with its log
            assert p.alive(), f"{p!r} exited:\n{self.log_tails()}"
        wait_until(joined, f"nodes {sorted(names)} joined", timeout=timeout)

    def close(self) -> None:
        """Stop every agent and everything it started (see the module docstring)."""
        trees: list[psutil.Process] = []
        for p in self.members:
            if p.proc is None:
                continue
            with contextlib.suppress(psutil.Error):
                trees += psutil.Process(p.proc.pid).children(recursive=True)
            if p.alive():  # the agent alone: with --stop-on-exit it stops its workers
                p.proc.send_signal(signal.SIGTERM)
        for p in self.members:
            if p.proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(timeout=STOP_GRACE)
            p.close()  # SIGKILLs the group: workers that outlived their agent
        for proc in trees:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(trees, timeout=STOP_GRACE)
        # an agent that did not stop its instances (killed, or --stop-on-exit off) leaves
        # its node's cgroups: nothing may outlive the fleet, not even empty groups
        with contextlib.suppress(OSError):
            remove_trees(group for p in self.members for group in node_groups(p.node))
        self.http.close()

    def log_tails(self) -> str:
        """The end of every agent's log (a failing test's report shows them anyway)."""
        return "\n".join(p.tail() for p in self.members)

    # ------------------------------------------------------------------ queries
    def status(self, i: int) -> dict[str, Any]:
        r = self.http.get(self.members[i].rpc + "/v1/status", headers=self.rpc_headers(i))
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    def signal(self, i: int, kind: str, body: dict[str, Any]) -> httpx.Response:
        """POST a signal to participant ``i``'s RPC, as a coordinator would."""
        return self.http.post(self.members[i].rpc + f"/v1/signals/{kind}", json=body,
                              headers=self.rpc_headers(i))

    def serving(self, i: int, app: str) -> tuple[set[str], dict[str, dict[str, Any]]]:
        """(the releases of the instances participant ``i`` routes ``app`` to,
        its instances of ``app`` by id)."""
        status = self.status(i)
        instances = {inst["instance"]: inst for inst in status["instances"]
                     if inst["app"] == app}
        routed = status["routes"].get(app, [])
        releases = {instances[iid]["release"] if iid in instances else f"?{iid}"
                    for iid in routed}
        return releases, instances


def leftovers(root: Path) -> list[str]:
    """Processes whose command line or working directory lies under ``root``."""
    prefix = str(root)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        cwd = proc.info["cwd"] or ""
        if prefix in cmdline or cwd.startswith(prefix):
            found.append(f"pid {proc.info['pid']} cwd={cwd} {cmdline[:200]}")
    return found


class Load:
    """Light keep-alive GET traffic through each of ``urls`` (one thread each), counted.

    ``ok`` counts 2xx answers by the ``release`` in their JSON body; ``failed`` counts
    non-2xx answers (``status NNN``) and transport errors (the exception's class name).
    """

    def __init__(self, urls: list[str], pace: float = LOAD_PACE) -> None:
        self.urls = urls
        self.pace = pace
        self.ok: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.samples: list[str] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(url,), daemon=True,
                                          name=f"load {url}") for url in urls]

    def __repr__(self) -> str:
        return f"<Load {self.urls} requests={self.requests} failed={dict(self.failed)}>"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop the clients (idempotent; a client never started is skipped)."""
        self._stop.set()
        for t in self._threads:
            if t.ident is not None:
                t.join(timeout=REQUEST_TIMEOUT + 5)

    def snapshot(self) -> tuple[int, int]:
        """(requests so far, failures so far)."""
        with self._lock:
            return self.requests, sum(self.failed.values())

    def sending(self, http: httpx.Client, url: str) -> bool:
        """Whether to send to ``url`` now (a subclass may act as a load balancer)."""
        return True

    def _client(self, url: str) -> None:
        with httpx.Client(trust_env=False, timeout=REQUEST_TIMEOUT) as http:
            while not self._stop.is_set():
                if not self.sending(http, url):
                    self._stop.wait(self.pace)
                    continue
                key, failure = self._one(http, url)
                with self._lock:
                    self.requests += 1
                    if failure is None:
                        self.ok[key] += 1
                    else:
                        self.failed[key] += 1
                        if len(self.samples) < SAMPLES * len(self.urls):
                            self.samples.append(f"{url}: {failure}")
                self._stop.wait(self.pace)

    @staticmethod
    def _one(http: httpx.Client, url: str) -> tuple[str, str | None]:
        try:
            r = http.get(url)
        except httpx.HTTPError as exc:
            return type(exc).__name__, f"{type(exc).__name__}: {exc}"
        if not 200 <= r.status_code < 300:
            return f"status {r.status_code}", f"status {r.status_code}: {r.text[:200]}"
        try:
            release = str(json.loads(r.content)["release"])
        except (ValueError, KeyError, TypeError):
            return "bad body", f"bad body: {r.text[:200]}"
        return release, None
