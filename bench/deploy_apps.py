"""``bench/deploy --apps``: deploy figures for real apps with real dependencies.

Theory of operation
-------------------
The default ``bench/deploy`` rolls the stdlib demo app, which has nothing to build. This mode
measures what a user of a real app waits for, on the same harness (a real coordinator and two
real participants on loopback, ``per_node = 2``, ``max_parallel`` 1), for two apps:

- ``python``: Starlette on uvicorn, ``requirements.txt`` with ``starlette`` and ``uvicorn``
  (unpinned), built by the agent's detected build (uv into ``.venv`` from the app's own
  package cache);
- ``node``: express, ``package.json`` only (no lock file: ``npm install``), skipped with a
  ``SKIP:`` line when node or npm is missing.

Per app, one after another, on the same cluster:

1. **first deploy** (r1): POST -> finished, build included; the per-app caches are empty, so
   the build downloads every package from the public index. ``build.seconds`` (the build
   command's own time, from each node's ``release.json``) is read back from both nodes.
2. **boot**: the app's run command spawned directly (``/bin/sh -c``, the release's venv or
   ``node_modules`` on PATH, ``PORT`` set, no agent) in node 1's built r1 source tree, timed
   from spawn until ``/healthz`` answers 200 (polled every 5 ms), median of ``--boots``: the
   same measure as the default mode's boot. Then the same with 4 spawned at once (2 nodes x
   ``PER_NODE``), until the last answers: what a rollback, which starts every node's
   instances at once, meets when both nodes share this machine's cores.
3. **redeploys** r2..r6 with unchanged dependencies (only the app's ``VERSION`` changes), under
   light keep-alive load: wall time per deploy, ``build.seconds`` on each node and whether
   the build copied ``node_modules`` from the agent's dependency cache (``build.node_modules``
   in ``release.json``).
4. **rollback** to r1, five releases back (``POST /rollback {"to": "r1"}``): wall time vs the
   boot time, and proof that nothing was rebuilt: r1's ``build.log`` and ``release.json`` on
   both nodes keep the mtimes they had before.
5. **ready-then-crash** (r7): a version whose instances answer ``/healthz`` and then exit
   (``os._exit(3)`` / ``process.exit(3)``) ``CRASH_AFTER`` seconds (2) after their first
   ``/healthz``, deployed under the keep-alive load. Reported: the deploy's status and reason,
   the requests and failures from the upload until ``POST_CRASH_WINDOW`` seconds after the
   deploy finished, and which release both proxies serve at the end.

The load is ``tests.e2e.fleet.Load`` (one thread per client, keep-alive, a pause between
requests); it is stopped between apps. Everything shares the machine's cores.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.coordinator.cluster import Cluster
from tests.e2e.fleet import Fleet, Load, leftovers, make_root, upload
from tests.support.ports import free_ports
from tests.support.wait import wait_until

PER_NODE = 2
REDEPLOYS = 5  # r2..r6: then r1 is five releases back
CRASH_AFTER = 2.0  # seconds from an instance's first /healthz to its exit
POST_CRASH_WINDOW = 5.0  # load counted this long after the crash deploy finished
DEPLOY_TIMEOUT = 600.0  # a cold build downloads packages from the public index
BOOT_TIMEOUT = 30.0
BOOT_POLL = 0.005
POLL = 0.02
WARMUP_REQUESTS = 20

STARLETTE_APP = '''\
import os
import threading
import time

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

CRASH_AFTER = float(os.environ.get("CRASH_AFTER", "0"))
_armed = threading.Event()


def _crash_later():
    time.sleep(CRASH_AFTER)
    os._exit(3)


async def healthz(request):
    if CRASH_AFTER and not _armed.is_set():  # ready first, then die
        _armed.set()
        threading.Thread(target=_crash_later, daemon=True).start()
    return JSONResponse({"ok": True})


async def index(request):
    return JSONResponse({"release": os.environ.get("SUPERAGENT_RELEASE", ""),
                         "instance": os.environ.get("SUPERAGENT_INSTANCE", ""),
                         "version": os.environ.get("VERSION", "")})


app = Starlette(routes=[Route("/", index), Route("/healthz", healthz)])
'''

EXPRESS_APP = '''\
const express = require("express");

const crashAfter = parseFloat(process.env.CRASH_AFTER || "0");
let armed = false;
const app = express();

app.get("/healthz", (req, res) => {
  if (crashAfter && !armed) {  // ready first, then die
    armed = true;
    setTimeout(() => process.exit(3), crashAfter * 1000);
  }
  res.json({ ok: true });
});

app.get("/", (req, res) => {
  res.json({ release: process.env.SUPERAGENT_RELEASE || "",
             instance: process.env.SUPERAGENT_INSTANCE || "",
             version: process.env.VERSION || "" });
});

const server = app.listen(parseInt(process.env.PORT, 10), "127.0.0.1");
process.on("SIGTERM", () => {
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 5000).unref();
});
'''

PACKAGE_JSON = {"name": "", "version": "1.0.0", "private": True,
                "dependencies": {"express": "^4.21.0"}}

KINDS: dict[str, dict[str, str]] = {
    "python": {"app": "pyapp", "run": "uvicorn app:app --host 127.0.0.1 --port $PORT"},
    "node": {"app": "nodeapp", "run": "node server.js"},
}


def write_app(dest: Path, kind: str, version: str, *, crash_after: float = 0.0) -> Path:
    """App ``kind`` under ``dest``; only ``VERSION`` (and ``CRASH_AFTER``) differ between
    versions, so the dependencies stay the same."""
    name = KINDS[kind]["app"]
    dest.mkdir(parents=True, exist_ok=True)
    if kind == "python":
        (dest / "app.py").write_text(STARLETTE_APP)
        (dest / "requirements.txt").write_text("starlette\nuvicorn\n")
    else:
        (dest / "server.js").write_text(EXPRESS_APP)
        (dest / "package.json").write_text(json.dumps({**PACKAGE_JSON, "name": name},
                                                      indent=2) + "\n")
    env = f'VERSION = "{version}"\n' + (f'CRASH_AFTER = "{crash_after:g}"\n'
                                          if crash_after else "")
    (dest / "superagent.toml").write_text(
        f'[app]\nname = "{name}"\n'
        f'[run]\ncommand = "{KINDS[kind]["run"]}"\n'
        '[health]\npath = "/healthz"\nready_path = "/healthz"\n'
        f'[routes]\nprefix = "/{name}"\nstrip_prefix = true\n'
        f'[scale]\nper_node = {PER_NODE}\n'
        f'[env]\n{env}')
    for path in (dest, *dest.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def release_dir(fleet: Fleet, i: int, app: str, release: str) -> Path:
    return fleet.members[i].data_dir / "releases" / app / release


def build_seconds(fleet: Fleet, app: str, release: str) -> list[float]:
    """``build.seconds`` of ``release`` on every node (its ``release.json``)."""
    return [float(json.loads((release_dir(fleet, i, app, release) / "release.json")
                             .read_text())["build"]["seconds"])
            for i in range(len(fleet.members))]


def modules_reused(fleet: Fleet, app: str, release: str) -> list[bool | None]:
    """Whether each node's build of ``release`` copied node_modules from the agent's
    dependency cache (``release.json`` ``build.node_modules.reused``; None: not consulted)."""
    found: list[bool | None] = []
    for i in range(len(fleet.members)):
        doc = json.loads((release_dir(fleet, i, app, release) / "release.json").read_text())
        modules = doc["build"].get("node_modules")
        found.append(None if modules is None else bool(modules["reused"]))
    return found


def build_mtimes(fleet: Fleet, app: str, release: str) -> list[list[int]]:
    """(build.log, release.json) mtimes in ns of ``release`` on every node."""
    return [[(release_dir(fleet, i, app, release) / name).stat().st_mtime_ns
             for name in ("build.log", "release.json")] for i in range(len(fleet.members))]


def phases(record: dict[str, Any]) -> dict[str, float]:
    """build / roll / commit seconds from the deploy's Raft timeline (as bench/deploy)."""
    history = record["history"]
    t0 = history[0][0]

    def last(*types: str) -> float:
        return float(max((at for at, kind, _ in history if kind in types), default=t0))

    built = last("prepared", "tested")
    rolled = max(built, last("drained"))
    committed = max(rolled, last("old_stopped"), record["updated_at"])
    return {"build_s": round(built - t0, 3), "roll_s": round(rolled - built, 3),
            "commit_s": round(committed - rolled, 3)}


class FailureTrace:
    """When the load's failures happened: (wall clock, failures so far) at each change,
    sampled at every poll, to set beside the deploy's timeline (also wall clock)."""

    def __init__(self, load: Load | None) -> None:
        self.load = load
        self.changes: list[tuple[float, int]] = []
        self._last = load.snapshot()[1] if load is not None else 0

    def sample(self) -> None:
        if self.load is None:
            return
        failed = self.load.snapshot()[1]
        if failed != self._last:
            self.changes.append((time.time(), failed - self._last))
            self._last = failed

    def split(self, at: float) -> tuple[int, int]:
        """(failures seen up to wall clock ``at``, failures seen after it)."""
        before = sum(n for t, n in self.changes if t <= at)
        return before, sum(n for _, n in self.changes) - before


def follow(cluster: Cluster, leader: int, app: str, deploy_id: str, t0: float,
           trace: FailureTrace | None = None) -> tuple[dict[str, Any], float]:
    """Poll the deploy until finished; (record, seconds since ``t0``)."""
    url = f"/api/v1/apps/{app}/deploys/{deploy_id}"
    while True:
        if trace is not None:
            trace.sample()
        record: dict[str, Any] = cluster.get(leader, url).json()
        if record["finished"]:
            return record, time.perf_counter() - t0
        if time.perf_counter() - t0 > DEPLOY_TIMEOUT:
            raise RuntimeError(f"deploy {deploy_id} of {app} not done after {DEPLOY_TIMEOUT}"
                               f" s: {record['stage']} {record['steps']}")
        time.sleep(POLL)  # a poll interval, bounded by the deadline above


def measured(cluster: Cluster, leader: int, app: str, start: Any, load: Load | None,
             *, expect: str | None = "succeeded", trace: FailureTrace | None = None
             ) -> dict[str, Any]:
    """Run ``start()`` (an upload or a rollback POST returning ``deploy_id`` and
    ``release``), follow the deploy; wall time, phases, load counted meanwhile."""
    requests0, failed0 = load.snapshot() if load is not None else (0, 0)
    t0 = time.perf_counter()
    created = start()
    record, wall = follow(cluster, leader, app, created["deploy_id"], t0, trace)
    requests1, failed1 = load.snapshot() if load is not None else (0, 0)
    if expect is not None and record["status"] != expect:
        raise RuntimeError(f"deploy {created['deploy_id']} of {app}: {record['status']}"
                           f" {record['reason']}")
    first = record["history"][0][0]
    return {"release": created["release"], "deploy_s": round(wall, 3), **phases(record),
            "status": record["status"], "reason": record["reason"],
            "requests": requests1 - requests0, "failed": failed1 - failed0,
            "finished_at": time.time(),  # wall clock, to set beside the agents' logs
            "started_at": first,
            "timeline": [[round(at - first, 3), kind, node]
                         for at, kind, node in record["history"]]}


def rollback(cluster: Cluster, leader: int, app: str, to: str) -> dict[str, Any]:
    r = cluster.post(leader, f"/api/v1/apps/{app}/rollback", json={"to": to}, timeout=30.0)
    if r.status_code != 201:
        raise RuntimeError(f"rollback of {app} to {to}: {r.status_code} {r.text[:300]}")
    body: dict[str, Any] = r.json()
    return {"deploy_id": body["deploy_id"], "release": to}


def boot_time(src: Path, kind: str, runs: int, *, together: int = 1) -> dict[str, Any]:
    """The run command spawned directly in a built tree: spawn -> /healthz 200, ``runs``
    times (as bench/deploy times the demo app). With ``together`` > 1, that many are
    spawned at once each time and the time is until the last one answers: what a rollback
    of every node at once meets on this one machine (2 nodes x ``PER_NODE``)."""
    path = f"{src}/.venv/bin:{src}/node_modules/.bin:/usr/local/bin:/usr/bin:/bin"
    samples = []
    with httpx.Client(trust_env=False, timeout=1.0) as http:
        for _ in range(runs):
            ports = free_ports(together)
            t0 = time.perf_counter()
            procs = {}
            for port in ports:
                env = {"PATH": path, "PORT": str(port), "HOME": str(src), "LANG": "C.UTF-8",
                       "SUPERAGENT_APP": KINDS[kind]["app"], "SUPERAGENT_RELEASE": "boot",
                       "SUPERAGENT_INSTANCE": f"boot.{port}", "VERSION": "boot"}
                if (src / ".venv").is_dir():
                    env["VIRTUAL_ENV"] = str(src / ".venv")
                procs[port] = subprocess.Popen(
                    ["/bin/sh", "-c", "exec " + KINDS[kind]["run"]], cwd=src, env=env,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True)
            try:
                waiting = set(ports)
                while waiting:
                    for port in sorted(waiting):
                        try:
                            if http.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                                waiting.discard(port)
                        except httpx.HTTPError:
                            pass
                        if procs[port].poll() is not None:
                            raise RuntimeError(f"{kind} app exited with"
                                               f" {procs[port].returncode} at boot")
                    if time.perf_counter() - t0 > BOOT_TIMEOUT:
                        raise RuntimeError(f"{kind} app did not answer in {BOOT_TIMEOUT} s")
                    if waiting:
                        time.sleep(BOOT_POLL)  # a probe interval, bounded by the checks above
                samples.append(time.perf_counter() - t0)
            finally:
                for proc in procs.values():
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=BOOT_TIMEOUT)
    return {"n": runs, "together": together,
            "median_ms": round(statistics.median(samples) * 1000, 1),
            "min_ms": round(min(samples) * 1000, 1), "max_ms": round(max(samples) * 1000, 1)}


def serving(fleet: Fleet, app: str) -> list[str]:
    """The release each proxy answers ``/<app>/`` from (one request each)."""
    found = []
    with httpx.Client(trust_env=False, timeout=10.0) as http:
        for p in fleet.members:
            r = http.get(f"{p.proxy}/{app}/")
            found.append(r.json()["release"] if r.status_code == 200
                         else f"status {r.status_code}")
    return found


def one_app(kind: str, cluster: Cluster, leader: int, fleet: Fleet, root: Path, *,
            boots: int, clients: int, progress: Any, rollbacks: int = 1) -> dict[str, Any]:
    app = KINDS[kind]["app"]
    src = root / f"src-{app}"

    def deploy_version(n: int, load: Load | None, *, crash_after: float = 0.0,
                       **kw: Any) -> dict[str, Any]:
        app_dir = write_app(src / f"v{n}", kind, str(n), crash_after=crash_after)
        return measured(cluster, leader, app, lambda: upload(cluster, leader, app_dir),
                        load, **kw)

    first = deploy_version(1, None)
    first["build_seconds"] = build_seconds(fleet, app, first["release"])
    progress(f"{kind}: first deploy {first['deploy_s']:.2f} s (build {first['build_seconds']}"
             " s per node, cold cache)")
    built = release_dir(fleet, 0, app, first["release"]) / "src"
    boot = boot_time(built, kind, boots)
    progress(f"{kind}: boot (spawn -> /healthz 200) median {boot['median_ms']} ms of {boots}")
    together = len(fleet.members) * PER_NODE
    boot_all = boot_time(built, kind, boots, together=together)
    progress(f"{kind}: {together} boots at once, until the last answers: median"
             f" {boot_all['median_ms']} ms of {boots}")
    load = Load([f"{p.proxy}/{app}/" for p in fleet.members for _ in range(clients)])
    load.start()
    try:
        wait_until(lambda: load.snapshot()[0] >= WARMUP_REQUESTS, "load warmed up",
                   timeout=30.0)
        redeploys = []
        for n in range(2, 2 + REDEPLOYS):
            r = deploy_version(n, load)
            r["build_seconds"] = build_seconds(fleet, app, r["release"])
            r["modules_reused"] = modules_reused(fleet, app, r["release"])
            redeploys.append(r)
            progress(f"{kind}: redeploy {r['release']} {r['deploy_s']:.2f} s, build"
                     f" {r['build_seconds']} s per node (node_modules from the cache:"
                     f" {r['modules_reused']}), {r['failed']} failed of {r['requests']}")
        target = first["release"]
        before = build_mtimes(fleet, app, target)
        back = measured(cluster, leader, app, lambda: rollback(cluster, leader, app, target),
                        load)
        after = build_mtimes(fleet, app, target)
        back["rebuilt"] = before != after
        back["serving"] = serving(fleet, app)
        progress(f"{kind}: rollback to {target} {back['deploy_s']:.2f} s (boot"
                 f" {boot['median_ms']:.0f} ms), rebuilt: {back['rebuilt']}, serving"
                 f" {back['serving']}")
        times = [back["deploy_s"]]
        newest = redeploys[-1]["release"]
        for n in range(1, rollbacks):  # back and forth between r1 and the newest, 5 apart
            to = newest if n % 2 else target
            again = measured(cluster, leader, app,
                             lambda to=to: rollback(cluster, leader, app, to), load)
            times.append(again["deploy_s"])
            progress(f"{kind}: rollback to {to} {again['deploy_s']:.2f} s")
        back["all_s"] = times
        back["summary"] = summary(times)
        if rollbacks > 1 and len(times) % 2 == 0:  # the crash release follows r1, as always
            measured(cluster, leader, app, lambda: rollback(cluster, leader, app, target),
                     load)
        requests0, failed0 = load.snapshot()
        trace = FailureTrace(load)
        crash = deploy_version(2 + REDEPLOYS, load, crash_after=CRASH_AFTER, expect=None,
                               trace=trace)
        finished = time.perf_counter()

        def window_over() -> bool:
            trace.sample()
            return time.perf_counter() - finished >= POST_CRASH_WINDOW

        wait_until(window_over, "the window after the crash deploy",
                   timeout=POST_CRASH_WINDOW + 5)
        requests1, failed1 = load.snapshot()
        # Failures before the old instances (the proxies' standbys) were stopped, and after.
        committed = crash["started_at"] + max(
            (at for at, kind, _ in crash["timeline"] if kind == "old_stopped"),
            default=crash["deploy_s"])
        early, late = trace.split(committed)
        crash.update(requests_with_window=requests1 - requests0,
                     failed_with_window=failed1 - failed0,
                     failed_before_old_stopped=early, failed_after_old_stopped=late,
                     failure_times_s=[[round(t - crash["started_at"], 3), n]
                                      for t, n in trace.changes],
                     serving=serving(fleet, app))
        progress(f"{kind}: ready-then-crash {crash['release']}: {crash['status']}"
                 f" ({crash['reason']}), {crash['failed_with_window']} failed"
                 f" ({crash['failed_before_old_stopped']} before the old instances stopped) of"
                 f" {crash['requests_with_window']}, serving {crash['serving']}")
    finally:
        load.stop()
    return {"app": app, "first": first, "boot": boot, "boot_together": boot_all,
            "redeploys": redeploys,
            "redeploy_deploy_s": summary([r["deploy_s"] for r in redeploys]),
            "redeploy_build_s": summary([s for r in redeploys for s in r["build_seconds"]]),
            "rollback": back, "ready_then_crash": crash,
            "load": {"requests": load.snapshot()[0], "failed": load.snapshot()[1],
                     "by_release": dict(load.ok), "failures": dict(load.failed),
                     "failure_samples": load.samples}}


def summary(values: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3),
            "max_s": round(max(values), 3)}


def missing_tools(kind: str) -> list[str]:
    needed = ["node", "npm"] if kind == "node" else []
    return [tool for tool in needed if shutil.which(tool) is None]


def print_table(results: dict[str, dict[str, Any]]) -> None:
    rows = [("app", "figure", "value", "target")]
    for kind, f in results.items():
        boot = f["boot"]["median_ms"]
        rb = f["rollback"]
        cr = f["ready_then_crash"]
        rows += [
            (kind, "first deploy, POST -> done (cold cache)", f"{f['first']['deploy_s']:.2f} s",
             ""),
            ("", "  its build per node", " / ".join(f"{s:.2f} s"
                                                    for s in f["first"]["build_seconds"]), ""),
            ("", "app boot, spawn -> /healthz 200", f"{boot:.0f} ms", ""),
            ("", "redeploy, same deps: build (median, max)",
             f"{f['redeploy_build_s']['median_s']:.2f} s, {f['redeploy_build_s']['max_s']:.2f} s",
             "<= 1 s"),
            ("", "redeploy, same deps: POST -> done (median)",
             f"{f['redeploy_deploy_s']['median_s']:.2f} s", ""),
            ("", f"{f['boot_together']['together']} boots at once (the rollback's floor here)",
             f"{f['boot_together']['median_ms']:.0f} ms", ""),
            ("", "rollback to r1 (5 back): POST -> done", f"{rb['deploy_s']:.2f} s",
             f"<= boot + 1 s = {boot / 1000 + 1:.2f} s"),
            ("", f"  all {len(rb['all_s'])} rollbacks: median (min-max)",
             f"{rb['summary']['median_s']:.2f} s ({rb['summary']['min_s']:.2f}-"
             f"{rb['summary']['max_s']:.2f})", ""),
            ("", "  rollback rebuilt anything", "yes" if rb["rebuilt"] else "no", "no"),
            ("", "ready-then-crash: deploy status", f"{cr['status']}", "rolled_back"),
            ("", "ready-then-crash: failed requests",
             f"{cr['failed_with_window']} of {cr['requests_with_window']}", "0"),
            ("", "  before / after the old instances stopped",
             f"{cr['failed_before_old_stopped']} / {cr['failed_after_old_stopped']}", ""),
            ("", "  serving afterwards", ", ".join(cr["serving"]), "r1"),
        ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def main_apps(kinds: list[str], *, boots: int, clients: int, coordinators: int,
              as_json: bool, keep_tmp: bool, command: str, rollbacks: int = 1) -> int:
    """The ``--apps`` mode of bench/deploy: exit status."""
    def progress(text: str) -> None:
        print(text, file=sys.stderr if as_json else sys.stdout, flush=True)

    runnable = []
    for kind in kinds:
        missing = missing_tools(kind)
        if missing:
            print(f"SKIP: {kind} app: {' and '.join(missing)} not found on PATH",
                  flush=True)
        else:
            runnable.append(kind)
    if not runnable:
        return 0
    root = make_root("sa-bench-deploy-apps-")
    failed = True
    cluster = Cluster(root / "coordinators", size=coordinators, log_level="warning")
    fleet = Fleet(root, [m.url for m in cluster.members], log_level="warning")
    results: dict[str, dict[str, Any]] = {}
    try:
        t0 = time.perf_counter()
        cluster.start_all()
        leader = cluster.wait_ready()
        fleet.start_all()
        fleet.wait_joined(cluster, leader)
        progress(f"{coordinators} coordinator(s) and 2 participants ready in"
                 f" {time.perf_counter() - t0:.2f} s")
        for kind in runnable:
            results[kind] = one_app(kind, cluster, leader, fleet, root, boots=boots,
                                    clients=clients, progress=progress, rollbacks=rollbacks)
        failed = False
    except (Exception, KeyboardInterrupt) as exc:
        print(f"bench/deploy --apps failed: {exc!r}", file=sys.stderr)
        print(cluster.log_tails(), file=sys.stderr)
        print(fleet.log_tails(), file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        fleet.close()
        cluster.close()
        left = leftovers(root)
        if left:
            print("processes left running:\n" + "\n".join(left), file=sys.stderr)
        if failed or keep_tmp or left:
            print(f"data dirs and logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    figures = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release(), "root": os.geteuid() == 0,
                    "loadavg": [round(x, 2) for x in os.getloadavg()],
                    "node": _version(["node", "--version"]),
                    "npm": _version(["npm", "--version"])},
        "setup": {"coordinators": coordinators, "participants": 2, "per_node": PER_NODE,
                  "max_parallel": 1, "load_clients_per_proxy": clients,
                  "crash_after_s": CRASH_AFTER, "post_crash_window_s": POST_CRASH_WINDOW},
        "apps": results, "command": command}
    if not as_json:
        print_table(results)
    print(json.dumps(figures))
    return 0


def _version(argv: list[str]) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              check=False).stdout.strip() or None
    except OSError:
        return None
