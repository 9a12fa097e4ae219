"""Process-level tests of ``superagent proxy``: the real master, real workers, real sockets.

Every test spawns ``python -m superagent proxy`` on free loopback ports in front of
upstream HTTP servers started here (threads on 127.0.0.1), waits for readiness by
polling with a deadline, and always kills the proxy's process group on the way out.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.support.ports import free_port
from tests.support.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0  # a cold start imports trio, httptools, starlette: ~2 s normally
STEP_TIMEOUT = 15.0  # any single condition we wait for
GATE_TIMEOUT = 30.0  # a slow upstream request never blocks longer than this
GRACE = 5.0  # [proxy] grace of every config here: SIGTERM must finish within it


# ---------------------------------------------------------------------------- helpers
def client(port: int, **kw: Any) -> httpx.Client:
    """A keep-alive client for a loopback port that ignores any proxy in the environment."""
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False,
                        timeout=kw.pop("timeout", 10.0), **kw)


def get_once(port: int, path: str, **kw: Any) -> httpx.Response:
    """One request on a fresh connection."""
    with client(port) as c:
        return c.get(path, **kw)


def connection_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0):
            return False
    except ConnectionRefusedError:
        return True


def group_gone(pgid: int) -> bool:
    """True when no process of the process group ``pgid`` is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def write_atomically(path: Path, text: str | bytes) -> None:
    """Replace ``path`` whole, so the proxy's file watcher never reads a half-written file."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text to {(name, labels): value}; comment lines skipped."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    line_re = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        assert m, f"malformed metrics line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float | None:
    return metrics.get((name, frozenset(labels.items())))


# ---------------------------------------------------------------------------- upstreams
class Upstream(http.server.ThreadingHTTPServer):
    """A loopback HTTP/1.1 app that answers JSON naming itself; ``/slow`` waits on ``gate``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)
        self.name = name
        self.port = int(self.server_address[1])
        self.address = f"127.0.0.1:{self.port}"
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.hits = 0  # requests other than /slow
        self.slow_started = 0
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       name=f"upstream-{name}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.gate.set()
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


class _UpstreamHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 65536  # head and body leave in one write (no Nagle/delayed-ACK stall)
    server: Upstream

    def do_GET(self) -> None:
        srv = self.server
        if "/slow" in self.path:
            with srv.lock:
                srv.slow_started += 1
            srv.gate.wait(GATE_TIMEOUT)
        else:
            with srv.lock:
                srv.hits += 1
        body = json.dumps({"upstream": srv.name, "path": self.path,
                           "host": self.headers.get("Host")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[Callable[[str], Upstream]]:
    """Factory of upstream servers, all closed at teardown."""
    servers: list[Upstream] = []

    def make(name: str) -> Upstream:
        srv = Upstream(name)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.close()


def app_toml(name: str, instances: list[Upstream] | list[tuple[str, Upstream]], **fields: Any
             ) -> str:
    """An ``[apps.NAME]`` section; instances are servers or (id, server) pairs."""
    items = []
    for inst in instances:
        if isinstance(inst, tuple):
            items.append(f'{{ id = "{inst[0]}", address = "{inst[1].address}" }}')
        else:
            items.append(f'"{inst.address}"')
    lines = [f"[apps.{name}]", f"instances = [{', '.join(items)}]"]
    for key, value in fields.items():
        lines.append(f"{key} = {json.dumps(value)}")  # JSON scalars/lists are valid TOML
    return "\n".join(lines) + "\n\n"


# ---------------------------------------------------------------------------- the proxy
@dataclass
class ProxyProcess:
    """One running ``superagent proxy`` and its files."""

    proc: subprocess.Popen[bytes]
    config: Path
    port: int
    admin_port: int
    stdout: Path
    stderr: Path
    run_dir: Path
    grace: float

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return get_once(self.port, path, **kw)

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        with client(self.admin_port) as c:
            return c.request(method, path, **kw)

    def status(self) -> dict[str, Any]:
        r = self.admin("GET", "/api/v1/status")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        r = self.admin("GET", "/metrics")
        assert r.status_code == 200, r.text
        return parse_metrics(r.text)

    def logs(self) -> list[dict[str, Any]]:
        """Structured log lines of the master and workers (stderr)."""
        return _json_lines(self.stderr)

    def access_log(self) -> list[dict[str, Any]]:
        return [line for line in _json_lines(self.stdout) if line.get("event") == "access"]

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.logs() if line.get("event") == event]

    def wait_log(self, event: str, what: str = "", timeout: float = STEP_TIMEOUT,
                 where: Callable[[dict[str, Any]], bool] = lambda line: True
                 ) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            self.assert_alive()
            return next((line for line in self.events(event) if where(line)), None)
        return wait_until(found, what or f"log event {event!r}", timeout=timeout)

    def assert_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(f"proxy exited with {code}; stderr:\n{self.stderr_text()}")

    def stderr_text(self) -> str:
        return self.stderr.read_text(errors="replace")[-8000:]

    def worker_pids(self) -> set[int]:
        """Live (non-zombie) worker processes of the master."""
        pids = set()
        for child in psutil.Process(self.proc.pid).children():
            with contextlib.suppress(psutil.Error):
                if child.status() != psutil.STATUS_ZOMBIE:
                    pids.add(child.pid)
        return pids

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left; never raises."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=self.grace + 5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        if line.startswith("{") and line.endswith("}"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


ConfigFn = Callable[[int, int], str]  # (listen port, admin port) -> TOML text


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Factory that starts ``superagent proxy`` and waits until it is ready."""
    started: list[ProxyProcess] = []
    # Unix socket paths are limited to ~107 bytes, so the master's run dir gets a short TMPDIR.
    run_dirs: list[Path] = []

    def start(config: ConfigFn, *, workers: int | None = 2,
              parser: str | None = None) -> ProxyProcess:
        last = ""
        for attempt in range(3):  # a free port can be taken by someone else meanwhile
            port, admin_port = free_port(), free_port()
            path = tmp_path / "proxy.toml"
            path.write_text(config(port, admin_port))
            run_dir = Path(tempfile.mkdtemp(prefix="sa-", dir="/tmp"))
            run_dirs.append(run_dir)
            args = [sys.executable, "-m", "superagent", "proxy", "--config", str(path)]
            if workers is not None:
                args += ["--workers", str(workers)]
            if parser is not None:
                args += ["--parser", parser]
            out, err = tmp_path / f"stdout-{attempt}.log", tmp_path / f"stderr-{attempt}.log"
            env = {**os.environ, "TMPDIR": str(run_dir), "PYTHONUNBUFFERED": "1"}
            with open(out, "wb") as fout, open(err, "wb") as ferr:
                proc = subprocess.Popen(args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=fout,
                                        stderr=ferr, env=env, start_new_session=True)
            p = ProxyProcess(proc=proc, config=path, port=port, admin_port=admin_port,
                             stdout=out, stderr=err, run_dir=run_dir, grace=GRACE)
            started.append(p)

            def ready(p: ProxyProcess = p) -> bool:
                if p.proc.poll() is not None:
                    return True
                if not any(line.get("event") == "proxy ready" for line in p.logs()):
                    return False
                return p.admin("GET", "/-/healthz").status_code == 200

            wait_until(ready, "the proxy to become ready", timeout=READY_TIMEOUT)
            if p.proc.poll() is None:
                return p
            last = p.stderr_text()
            if "in use" not in last:
                break
        raise AssertionError(f"the proxy did not start; stderr:\n{last}")

    yield start
    for p in started:
        p.stop()
    for d in run_dirs:
        shutil.rmtree(d, ignore_errors=True)


def proxy_section(port: int, admin_port: int, *, extra: str = "") -> str:
    return (f'[proxy]\nlisten = ["127.0.0.1:{port}"]\nadmin = "127.0.0.1:{admin_port}"\n'
            f'grace = "{GRACE:g}s"\n{extra}\n')


class SlowRequest:
    """A request run in a thread (it waits on an upstream gate); ``result`` when joined."""

    def __init__(self, port: int, path: str) -> None:
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(port, path), daemon=True)
        self.thread.start()

    def _run(self, port: int, path: str) -> None:
        try:
            self.response = get_once(port, path, timeout=GATE_TIMEOUT + 5)
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float = STEP_TIMEOUT) -> httpx.Response:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the slow request did not finish"
        assert self.error is None, f"the slow request failed: {self.error!r}"
        assert self.response is not None
        return self.response


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_routes_traffic_through_two_workers(parser: str, upstream: Callable[[str], Upstream],
                                            proxy: Callable[..., ProxyProcess]) -> None:
    """Prefix, stripped-prefix and host rules reach their upstreams through two workers."""
    a, b, h = upstream("a"), upstream("b"), upstream("h")
    p = proxy(lambda port, admin: proxy_section(port, admin, extra="workers = 1")
              + app_toml("a", [a], prefix="/a")
              + app_toml("b", [b], prefix="/b", strip_prefix=True)
              + app_toml("h", [h], hosts=["svc.example"]), parser=parser)

    status = p.status()
    assert status["workers"] == 2  # --workers beats the file's workers = 1
    assert status["workers_answering"] == 2
    assert status["parser"] == parser
    assert status["version"] == 1
    assert status["listeners"] == [{"host": "127.0.0.1", "port": p.port, "app": None}]

    with client(p.port) as c:
        for i in range(10):  # keep-alive: several exchanges on one connection
            r = c.get(f"/a/item/{i}?q=1")
            assert r.status_code == 200, r.text
            assert r.json() == {"upstream": "a", "path": f"/a/item/{i}?q=1",
                                "host": f"127.0.0.1:{p.port}"}
        r = c.get("/b/x/y")
        assert r.status_code == 200
        assert r.json()["upstream"] == "b"
        assert r.json()["path"] == "/x/y"
        r = c.get("/anything", headers={"Host": "svc.example"})
        assert r.status_code == 200
        assert r.json()["upstream"] == "h"
        assert r.json()["path"] == "/anything"
        r = c.get("/nowhere")
        assert r.status_code == 404
        assert r.headers["x-superagent-error"] == "no-route"
    for i in range(10):  # fresh connections, spread over the workers by the kernel
        r = p.get(f"/a/fresh/{i}")
        assert r.status_code == 200
        assert r.json()["upstream"] == "a"
    assert a.hits == 20 and b.hits == 1 and h.hits == 1

    def logged() -> list[dict[str, Any]]:
        lines = p.access_log()
        return lines if len(lines) >= 23 else []

    lines = wait_until(logged, "23 access-log lines on the workers' stdout")
    first = next(line for line in lines if line["path"] == "/a/item/0?q=1")
    assert first["app"] == "a" and first["status"] == 200 and first["method"] == "GET"
    assert first["instance"] == a.address
    miss = next(line for line in lines if line["path"] == "/nowhere")
    assert miss["status"] == 404 and miss["error"] == "no-route"


def test_metrics_counts_latency_gauges_and_workers(upstream: Callable[[str], Upstream],
                                                   proxy: Callable[..., ProxyProcess]) -> None:
    """/metrics has requests by app/status, a latency histogram, in-flight/pool gauges, workers."""
    m_up = upstream("m")
    p = proxy(lambda port, admin: proxy_section(port, admin)
              + app_toml("m", [("m1", m_up)], prefix="/m"))
    with client(p.port) as c:
        for i in range(5):
            assert c.get(f"/m/{i}").status_code == 200
        assert c.get("/missing").status_code == 404

    def counted() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        m = p.metrics()
        ok = metric(m, "superagent_proxy_requests_total", app="m", status="200") == 5
        return m if ok and metric(m, "superagent_proxy_requests_total", app="-",
                                  status="404") == 1 else None

    m = wait_until(counted, "request counters to reach 5 (m, 200) and 1 (-, 404)")
    assert metric(m, "superagent_proxy_workers") == 2
    hist = "superagent_proxy_request_duration_seconds"
    assert metric(m, f"{hist}_count", app="m") == 5
    assert metric(m, f"{hist}_bucket", app="m", le="+Inf") == 5
    assert (metric(m, f"{hist}_sum", app="m") or 0) > 0
    buckets = sorted((float(dict(labels)["le"]), value) for (name, labels), value in m.items()
                     if name == f"{hist}_bucket" and dict(labels)["app"] == "m"
                     and dict(labels)["le"] != "+Inf")
    assert len(buckets) >= 5
    counts = [value for _, value in buckets]
    assert counts == sorted(counts), "histogram buckets must be cumulative"
    assert counts[-1] == 5  # every loopback request fits in the largest finite bucket
    assert metric(m, "superagent_proxy_in_flight", app="m", instance="m1") == 0
    assert (metric(m, "superagent_proxy_pool_idle_connections", app="m", instance="m1")
            or 0) >= 1
    assert metric(m, "superagent_proxy_instance_draining", app="m", instance="m1") == 0

    slow = SlowRequest(p.port, "/m/slow")
    try:
        wait_until(lambda: m_up.slow_started == 1, "the slow request to reach the upstream")
        wait_until(lambda: metric(p.metrics(), "superagent_proxy_in_flight", app="m",
                                instance="m1") == 1, "in_flight gauge 1 during a slow request")
    finally:
        m_up.gate.set()
    assert slow.result().status_code == 200
    wait_until(lambda: metric(p.metrics(), "superagent_proxy_in_flight", app="m",
                            instance="m1") == 0, "in_flight back to 0")


@pytest.mark.slow
def test_reload_under_load_fails_no_request(upstream: Callable[[str], Upstream],
                                            proxy: Callable[..., ProxyProcess]) -> None:
    """Keep-alive load sees only 200s while SIGHUP and a rewritten file add routes."""
    a, c_up, d_up = upstream("a"), upstream("c"), upstream("d")
    sections: dict[str, str] = {}

    def config(port: int, admin: int) -> str:
        base = proxy_section(port, admin) + app_toml("a", [a], prefix="/a")
        c_section = app_toml("c", [c_up], prefix="/c")
        # The first and second versions have the same size, so that with the old mtime put
        # back only SIGHUP (not the file watcher) can notice the change.
        sections["v2"] = base + c_section + "#" + "-" * 40 + "\n"
        sections["d"] = app_toml("d", [d_up], prefix="/d")
        v1 = base + "#" + "-" * (len(c_section) + 40) + "\n"
        assert len(v1) == len(sections["v2"])
        return v1

    p = proxy(config)
    clients, min_seconds, hard_limit, max_requests = 4, 2.0, 40.0, 50_000
    done = threading.Event()  # set once both reloads took effect
    results: list[list[tuple[float, int]]] = [[] for _ in range(clients)]
    failures: list[str] = []
    start = time.monotonic()

    def load(index: int) -> None:
        mine = results[index]
        with client(p.port, timeout=5.0) as c:
            for n in range(max_requests):
                now = time.monotonic()
                if now - start > hard_limit or (done.is_set() and now - start >= min_seconds):
                    return
                try:
                    r = c.get(f"/a/load/{index}/{n}")
                except httpx.HTTPError as exc:
                    failures.append(f"client {index} request {n}: {exc!r}")
                    continue
                mine.append((time.monotonic(), r.status_code))
                if r.status_code != 200 or r.json()["upstream"] != "a":
                    failures.append(f"client {index} request {n}: {r.status_code} {r.text}")

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(len(r) >= 10 for r in results), "every load client to be busy")

        # 1. SIGHUP after an in-place change the file watcher cannot see.
        st = p.config.stat()
        with open(p.config, "r+b") as f:
            f.write(sections["v2"].encode())
        os.utime(p.config, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert p.config.stat().st_size == st.st_size
        before_hup = sum(len(r) for r in results)
        p.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: p.get("/c/new").status_code == 200, "the /c route after SIGHUP")
        assert p.get("/c/new").json()["upstream"] == "c"
        p.wait_log("config reloaded", where=lambda line: line.get("version") == 2)
        assert not p.events("config file changed; reloading"), "the watcher, not SIGHUP, reloaded"

        # 2. Rewrite the file (append: same inode, new size and mtime): the watcher reloads.
        hup_done = time.monotonic()
        with open(p.config, "ab") as f:
            f.write(sections["d"].encode())
        wait_until(lambda: p.get("/d/new").status_code == 200, "the /d route after the rewrite")
        assert p.get("/d/new").json()["upstream"] == "d"
        assert p.get("/c/still").json()["upstream"] == "c"
        p.wait_log("config file changed; reloading")
        p.wait_log("config reloaded", where=lambda line: line.get("version") == 3)
        watch_done = time.monotonic()
        done.set()
    finally:
        done.set()
        for t in threads:
            t.join(hard_limit + 10)
    assert not any(t.is_alive() for t in threads)
    assert failures == [], f"{len(failures)} failed requests, first: {failures[:5]}"
    total = sum(len(r) for r in results)
    assert total >= 200, f"only {total} requests: the load was not real"
    assert before_hup > 0
    assert any(ts > hup_done for r in results for ts, _ in r)
    assert any(ts > watch_done for r in results for ts, _ in r)
    assert all(code == 200 for r in results for _, code in r)
    assert not p.events("config refused; the previous one stays in force")
    assert p.status()["version"] == 3


def test_invalid_config_is_refused_and_old_routes_stay(upstream: Callable[[str], Upstream],
                                                       proxy: Callable[..., ProxyProcess]
                                                       ) -> None:
    """A reload with an unknown key is refused (log names file, key; API 422); old routes work."""
    a = upstream("a")
    good: dict[str, str] = {}

    def config(port: int, admin: int) -> str:
        good["text"] = proxy_section(port, admin) + app_toml("a", [a], prefix="/a")
        return good["text"]

    p = proxy(config)
    write_atomically(p.config, good["text"] + app_toml("z", [a], prefix="/z", bogus_key=1))
    p.proc.send_signal(signal.SIGHUP)
    refused = p.wait_log("config refused; the previous one stays in force")
    assert f"{p.config}: apps.z.bogus_key: unknown key" in refused["error"]
    assert refused["version"] == 1

    r = p.get("/a/still")
    assert r.status_code == 200 and r.json()["upstream"] == "a"
    assert p.get("/z/new").status_code == 404

    r = p.admin("POST", "/api/v1/reload")
    assert r.status_code == 422
    body = r.json()
    assert body["ok"] is False
    assert "apps.z.bogus_key" in body["error"] and str(p.config) in body["error"]
    assert body["version"] == 1
    assert p.status()["version"] == 1
    assert p.get("/a/after-api").status_code == 200

    # Fixing the file makes the next reload succeed.
    write_atomically(p.config, good["text"] + app_toml("z", [a], prefix="/z"))
    r = p.admin("POST", "/api/v1/reload")
    assert r.status_code == 200, r.text
    assert r.json()["ok"] is True and r.json()["version"] >= 2
    assert p.get("/z/new").status_code == 200


def test_undecodable_config_is_refused_and_proxy_stays_up(
        upstream: Callable[[str], Upstream], proxy: Callable[..., ProxyProcess]) -> None:
    """A reload of a file that is not UTF-8 is refused like any invalid file; serving goes on."""
    a = upstream("a")
    good: dict[str, str] = {}

    def config(port: int, admin: int) -> str:
        good["text"] = proxy_section(port, admin) + app_toml("a", [a], prefix="/a")
        return good["text"]

    p = proxy(config)
    write_atomically(p.config, good["text"].encode() + b"# caf\xe9 in Latin-1\n")
    p.proc.send_signal(signal.SIGHUP)
    refused = p.wait_log("config refused; the previous one stays in force",
                         where=lambda line: str(p.config) in line.get("error", ""))
    assert refused["version"] == 1
    p.assert_alive()
    assert p.get("/a/still").status_code == 200
    r = p.admin("POST", "/api/v1/reload")
    assert r.status_code == 422, r.text
    assert str(p.config) in r.json()["error"]
    p.assert_alive()
    assert p.status()["version"] == 1


def test_reload_flags_restart_only_for_changed_process_settings(
        upstream: Callable[[str], Upstream], proxy: Callable[..., ProxyProcess]) -> None:
    """restart_needed lists only process settings the file changed, not command-line overrides."""
    a = upstream("a")
    base: dict[str, str] = {}

    def config(port: int, admin: int) -> str:
        base["text"] = proxy_section(port, admin) + app_toml("a", [a], prefix="/a")
        return base["text"]

    p = proxy(config, workers=2, parser="h11")  # both differ from the file's defaults
    r = p.admin("POST", "/api/v1/reload")  # the file is unchanged
    assert r.status_code == 200, r.text
    assert r.json()["ok"] is True
    assert r.json()["restart_needed"] == []
    assert not p.events("these settings change only on restart")

    write_atomically(p.config, base["text"].replace(f'grace = "{GRACE:g}s"', 'grace = "7s"'))
    r = p.admin("POST", "/api/v1/reload")
    assert r.status_code == 200, r.text
    assert r.json()["restart_needed"] == ["grace"]


def test_reload_adds_and_removes_a_dedicated_port(upstream: Callable[[str], Upstream],
                                                  proxy: Callable[..., ProxyProcess]) -> None:
    """A reloaded dedicated port is refused while taken, then served by all workers, then shut."""
    a, b = upstream("a"), upstream("b")
    base: dict[str, str] = {}

    def config(port: int, admin: int) -> str:
        base["text"] = proxy_section(port, admin) + app_toml("a", [a], prefix="/a")
        return base["text"]

    p = proxy(config)
    with socket.socket() as taken:  # held without SO_REUSEPORT: the workers cannot bind it
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        dedicated = int(taken.getsockname()[1])
        write_atomically(p.config, base["text"] + app_toml("dp", [b], port=dedicated))
        r = p.admin("POST", "/api/v1/reload")
        assert r.status_code == 422, r.text
        assert f"cannot listen on 127.0.0.1:{dedicated}" in r.json()["error"]
        assert p.status()["version"] == 1
        assert all(lst["port"] != dedicated for lst in p.status()["listeners"])
        assert p.get("/a/x").json()["upstream"] == "a"
    assert connection_refused(dedicated)
    r = p.admin("POST", "/api/v1/reload")
    assert r.status_code == 200, r.text
    assert r.json()["ok"] is True
    assert {"host": "127.0.0.1", "port": dedicated, "app": "dp"} in p.status()["listeners"]
    for i in range(8):  # fresh connections: every worker must have bound the new port
        r = get_once(dedicated, f"/any/path/{i}")
        assert r.status_code == 200
        assert r.json() == {"upstream": "b", "path": f"/any/path/{i}",
                            "host": f"127.0.0.1:{dedicated}"}
    assert p.get("/a/x").json()["upstream"] == "a"
    assert len(wait_until(lambda: [w for w in p.worker_pids() if any(
        c.laddr.port == dedicated and c.status == psutil.CONN_LISTEN
        for c in psutil.Process(w).net_connections("tcp"))], "listening workers")) == 2

    write_atomically(p.config, base["text"])
    r = p.admin("POST", "/api/v1/reload")
    assert r.status_code == 200 and r.json()["ok"] is True
    wait_until(lambda: connection_refused(dedicated), "the removed dedicated port to close")
    assert p.get("/a/x").status_code == 200


def test_instance_drain_stops_new_requests_and_reports_in_flight(
        upstream: Callable[[str], Upstream], proxy: Callable[..., ProxyProcess]) -> None:
    """Draining an instance sends new requests elsewhere and reports its in-flight request."""
    one, two = upstream("one"), upstream("two")
    p = proxy(lambda port, admin: proxy_section(port, admin)
              + app_toml("s", [("one", one), ("two", two)], prefix="/s"))
    servers = {"one": one, "two": two}
    slow = SlowRequest(p.port, "/s/slow")
    try:
        busy = wait_until(lambda: next((n for n, s in servers.items() if s.slow_started), None),
                        "the slow request to reach an instance")
        other = "two" if busy == "one" else "one"
        r = p.admin("POST", f"/api/v1/instances/{busy}/drain", json={"draining": True})
        assert r.status_code == 200, r.text
        assert r.json().items() >= {"id": busy, "draining": True, "in_flight": 1}.items()

        info = p.admin("GET", f"/api/v1/instances/{busy}").json()
        assert info.items() >= {"id": busy, "app": "s", "in_flight": 1, "pool_idle": 0,
                                "draining": True}.items()
        listing = {i["id"]: i for i in p.admin("GET", "/api/v1/instances").json()["instances"]}
        assert set(listing) == {"one", "two"}
        assert listing[busy]["draining"] is True and listing[other]["draining"] is False
        assert metric(p.metrics(), "superagent_proxy_instance_draining", app="s",
                      instance=busy) == 1

        hits_before = servers[busy].hits
        with client(p.port) as c:
            for i in range(6):
                assert c.get(f"/s/ka/{i}").json()["upstream"] == other
        for i in range(6):
            assert p.get(f"/s/fresh/{i}").json()["upstream"] == other
        assert servers[busy].hits == hits_before
    finally:
        one.gate.set()
        two.gate.set()
    r = slow.result()
    assert r.status_code == 200 and r.json()["upstream"] == busy
    wait_until(lambda: p.admin("GET", f"/api/v1/instances/{busy}").json()["in_flight"] == 0,
             "in_flight of the drained instance to drop to 0")

    r = p.admin("POST", f"/api/v1/instances/{busy}/drain", json={"draining": False})
    assert r.status_code == 200 and r.json()["draining"] is False
    assert p.admin("GET", f"/api/v1/instances/{busy}").json()["draining"] is False
    seen = {p.get(f"/s/back/{i}").json()["upstream"] for i in range(10)}
    assert busy in seen, "an undrained instance gets requests again"


def test_node_drain_makes_proxy_healthz_503(upstream: Callable[[str], Upstream],
                                            proxy: Callable[..., ProxyProcess]) -> None:
    """POST /api/v1/node/drain turns /-/healthz on the listener to 503 in every worker."""
    a = upstream("a")
    p = proxy(lambda port, admin: proxy_section(port, admin)
              + app_toml("a", [a], prefix="/a"))
    with client(p.port) as kept:
        assert kept.get("/-/healthz").status_code == 200
        for _ in range(6):
            r = p.get("/-/healthz")
            assert r.status_code == 200 and r.text == "ok\n"

        r = p.admin("POST", "/api/v1/node/drain")
        assert r.status_code == 200
        assert r.json() == {"draining": True, "workers": 2}
        assert p.status()["node_draining"] is True
        r = kept.get("/-/healthz")  # an open keep-alive connection sees it too
        assert r.status_code == 503 and r.text == "draining\n"
        for _ in range(10):
            r = p.get("/-/healthz")
            assert r.status_code == 503 and r.text == "draining\n"
        assert p.get("/a/x").status_code == 200  # draining is a signal; traffic still flows
        assert p.admin("GET", "/-/healthz").status_code == 200  # the admin server is up

        r = p.admin("POST", "/api/v1/node/drain", json={"draining": False})
        assert r.status_code == 200 and r.json()["draining"] is False
        assert p.status()["node_draining"] is False
        assert kept.get("/-/healthz").status_code == 200
        for _ in range(6):
            assert p.get("/-/healthz").status_code == 200


@pytest.mark.slow
def test_sigterm_finishes_in_flight_request_then_exits_zero(
        upstream: Callable[[str], Upstream], proxy: Callable[..., ProxyProcess]) -> None:
    """On SIGTERM an in-flight request completes with 200, new connections are refused, exit 0."""
    a = upstream("a")
    p = proxy(lambda port, admin: proxy_section(port, admin)
              + app_toml("a", [a], prefix="/a"))
    slow = SlowRequest(p.port, "/a/slow")
    try:
        wait_until(lambda: a.slow_started == 1, "the slow request to reach the upstream")
        sent = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: connection_refused(p.port), "the listener to stop accepting",
                 timeout=p.grace)
        assert slow.thread.is_alive(), "the in-flight request was cut"
    finally:
        a.gate.set()
    r = slow.result()
    assert r.status_code == 200
    assert r.json() == {"upstream": "a", "path": "/a/slow", "host": f"127.0.0.1:{p.port}"}
    assert connection_refused(p.port)
    code = p.proc.wait(timeout=p.grace + 10)
    elapsed = time.monotonic() - sent
    assert code == 0, p.stderr_text()
    assert elapsed < p.grace, f"exit took {elapsed:.1f}s, grace is {p.grace}s"
    assert group_gone(p.proc.pid), "workers outlived the master"
    events = [line.get("event") for line in p.logs()]
    assert "proxy stopped" in events
    assert events.count("worker stopped") == 2
    assert "worker outlived the grace period; killing" not in events
    lines = p.access_log()
    assert any(line["path"] == "/a/slow" and line["status"] == 200 for line in lines)


def test_clean_stop_leaves_no_files(upstream: Callable[[str], Upstream],
                                    proxy: Callable[..., ProxyProcess]) -> None:
    """After a clean SIGTERM stop the master's run dir (control sockets) is gone."""
    a = upstream("a")
    p = proxy(lambda port, admin: proxy_section(port, admin)
              + app_toml("a", [a], prefix="/a"))
    assert p.get("/a/x").status_code == 200
    created = list(p.run_dir.iterdir())
    assert created, "the master makes its run dir under TMPDIR"
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(timeout=p.grace + 10) == 0
    left = sorted(str(f.relative_to(p.run_dir)) for f in p.run_dir.rglob("*"))
    assert left == [], f"left behind in TMPDIR: {left}"


@pytest.mark.parametrize("which", ["listen", "admin"])
def test_taken_port_fails_startup_with_one_line(which: str, tmp_path: Path,
                                                upstream: Callable[[str], Upstream]) -> None:
    """A listen or admin port already taken stops startup: exit 2, one line, no workers left."""
    a = upstream("a")
    with socket.socket() as taken:  # held without SO_REUSEPORT
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy, free = int(taken.getsockname()[1]), free_port()
        port, admin = (busy, free) if which == "listen" else (free, busy)
        path = tmp_path / "proxy.toml"
        path.write_text(proxy_section(port, admin) + app_toml("a", [a], prefix="/a"))
        proc = subprocess.Popen([sys.executable, "-m", "superagent", "proxy", "--config",
                                 str(path), "--workers", "2"], cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _out, err = proc.communicate(timeout=READY_TIMEOUT)
            wait_until(lambda: group_gone(proc.pid), "the failed proxy's workers to exit",
                       timeout=10.0)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    plain = [line for line in err.splitlines() if line.strip() and not line.startswith("{")]
    assert len(plain) == 1, err
    assert plain[0].startswith("superagent proxy: ")
    assert f"cannot listen on 127.0.0.1:{busy}" in plain[0]


@pytest.mark.slow
def test_killed_worker_is_restarted_and_traffic_flows(upstream: Callable[[str], Upstream],
                                                      proxy: Callable[..., ProxyProcess]) -> None:
    """kill -9 of one worker: the master restarts it with the snapshot; requests keep working."""
    a = upstream("a")
    p = proxy(lambda port, admin: proxy_section(port, admin)
              + app_toml("a", [a], prefix="/a"))
    old = wait_until(lambda: p.worker_pids() if len(p.worker_pids()) == 2 else None,
                   "two worker processes")
    victim = min(old)
    survivor = (old - {victim}).pop()
    os.kill(victim, signal.SIGKILL)

    def victim_gone() -> bool:
        try:
            return psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(victim_gone, "the killed worker to die")
    served = 0

    def restarted() -> set[int] | None:
        nonlocal served
        try:  # traffic while one worker is down and back (wait_for would swallow errors)
            r = p.get(f"/a/during/{served}")
        except httpx.HTTPError as exc:
            raise AssertionError(f"request {served} failed during the restart: {exc!r}") from exc
        assert r.status_code == 200, r.text
        served += 1
        pids = p.worker_pids()
        return pids if len(pids) == 2 and victim not in pids else None

    pids = wait_until(restarted, "a replacement worker process")
    assert survivor in pids
    new = (pids - {survivor}).pop()
    assert served >= 1
    p.wait_log("worker exited; restarting", where=lambda line: line.get("code") == -9)

    def listening() -> bool:
        return any(c.laddr.port == p.port and c.status == psutil.CONN_LISTEN
                   for c in psutil.Process(new).net_connections("tcp"))

    wait_until(listening, "the new worker to listen on the proxy port (snapshot applied)")
    wait_until(lambda: p.status()["workers_answering"] == 2, "both workers to answer control")
    wait_until(lambda: metric(p.metrics(), "superagent_proxy_workers") == 2,
             "/metrics to count two workers")
    assert p.status()["version"] == 1
    for i in range(20):  # fresh connections, some of which land on the new worker
        r = p.get(f"/a/after/{i}")
        assert r.status_code == 200 and r.json()["upstream"] == "a"
    assert p.proc.poll() is None


def test_admin_rejects_bad_input_with_json_errors(upstream: Callable[[str], Upstream],
                                                  proxy: Callable[..., ProxyProcess]) -> None:
    """Bad JSON bodies get 400 and unknown instances 404, as JSON, and change nothing."""
    a = upstream("a")
    p = proxy(lambda port, admin: proxy_section(port, admin)
              + app_toml("a", [("one", a)], prefix="/a"))
    cases = [
        (b"{not json", "request body is not valid JSON"),
        (b"[true]", "request body must be a JSON object"),
        (b'{"draining": "yes"}', "'draining' must be true or false"),
        (b'{"drain": true}', "unknown field 'drain'"),
    ]
    for body, message in cases:
        for path in ("/api/v1/instances/one/drain", "/api/v1/node/drain"):
            r = p.admin("POST", path, content=body,
                        headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (path, body, r.text)
            assert r.headers["content-type"].startswith("application/json")
            assert r.json() == {"error": message, "status": 400}

    r = p.admin("POST", "/api/v1/instances/nope/drain", json={"draining": True})
    assert r.status_code == 404
    assert r.json() == {"error": "unknown instance 'nope'", "status": 404}
    r = p.admin("GET", "/api/v1/instances/nope")
    assert r.status_code == 404
    assert r.json() == {"error": "unknown instance 'nope'", "status": 404}

    assert p.admin("GET", "/api/v1/instances/one").json()["draining"] is False
    assert p.status()["node_draining"] is False
    assert p.get("/-/healthz").status_code == 200
    assert p.get("/a/x").status_code == 200
