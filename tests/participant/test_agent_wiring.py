"""The agent's wiring into each instance: environment, cgroup limits, OOM kills, figures.

A real ``Agent`` (its RPC, its proxy worker) starts real app processes from manifests;
the tests then look at what each process really got: the environment it sees, the
cgroup files the kernel enforces, what happens when it outgrows its memory limit, and
the figures ``GET /v1/status`` reports about it. Each agent has a node name of its own,
so its cgroups (``superagent.<node>/<app>/<instance>``) are the test's alone.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from superagent.participant.cgroups import (
    CGROUP_ROOT,
    CPU_PERIOD_US,
    PARENT_GROUP,
    CgroupSupport,
)
from tests.participant.children import child_python
from tests.participant.test_agent import DEADLINE, SECRET, Rig, running_agent, tarball
from tests.support.wait import wait_until_async

POLL = 0.05  # between looks at the status while waiting for a condition with a deadline
MB = 1024**2

# One app for every test here: it reports its environment, burns CPU, holds memory,
# daemonises a sleeper, or allocates without bound, on request.
APP = '''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

held = []

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        path, _, arg = self.path.partition("?")
        if path == "/env":
            body = dict(os.environ)
        elif path == "/burn":  # CPU time of this process, not wall time
            until = time.process_time() + float(arg)
            while time.process_time() < until:
                pass
            body = {"cpu": time.process_time()}
        elif path == "/hold":  # keep this many MB, every page written
            held.append(b"x" * (int(arg) * 1024 * 1024))
            body = {"held_mb": sum(len(b) for b in held) // (1024 * 1024)}
        elif path == "/daemon":  # a sleeper that leaves this process's tree (double fork)
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(float(arg))
                os._exit(0)
            os.wait()
            body = {"daemonised": True}
        elif path == "/hog":  # 1 MB at a time up to 2 GB: far beyond any [limits] here
            hog = [b"x" * (1024 * 1024) for _ in range(2048)]
            body = {"survived_mb": len(hog)}
        else:
            body = {"pid": os.getpid(), "instance": os.environ["SUPERAGENT_INSTANCE"]}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''


def app_archive(name: str, extra: str = "") -> bytes:
    """The release archive of ``APP`` named ``name``; ``extra`` is appended to its manifest."""
    manifest = (f'[app]\nname = "{name}"\n[run]\ncommand = "{child_python()} app.py"\n'
                f'[health]\npath = "/healthz"\n{extra}')
    return tarball({"superagent.toml": manifest, "app.py": APP})


@pytest.fixture
async def rig(data_dir: Path) -> AsyncIterator[Rig]:
    """A running agent with a node name (and so a cgroup parent group) of its own."""
    async with running_agent(data_dir, node=f"wiring-{secrets.token_hex(4)}",
                             drain_grace=1.0) as rig:
        yield rig


async def deploy(rig: Rig, name: str, extra: str = "", count: int = 1) -> list[dict[str, Any]]:
    """Prepare and start ``count`` instances of the app; their start answers (id, port)."""
    prepared = await rig.upload(name, "r1", app_archive(name, extra))
    assert prepared.status_code == 200, prepared.text
    started = await rig.signal("start", app=name, release="r1", count=count)
    assert started.status_code == 200, started.text
    return list(started.json()["instances"])


async def status_of(rig: Rig) -> dict[str, Any]:
    """``GET /v1/status`` over the agent's RPC."""
    answer = await rig.rpc.get("/v1/status")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def entry(status: dict[str, Any], instance: str) -> dict[str, Any]:
    """The status entry of ``instance``."""
    found = [i for i in status["instances"] if i["instance"] == instance]
    assert len(found) == 1, (instance, status["instances"])
    return dict(found[0])


async def wait_for(rig: Rig, what: str, ok: Callable[[dict[str, Any]], bool]
                   ) -> dict[str, Any]:
    """The first status that satisfies ``ok``; fails after ``DEADLINE`` naming ``what``
    and the last status."""
    return await wait_until_async(lambda: status_of(rig), what, until=ok, timeout=DEADLINE,
                                  interval=POLL)


def need_cgroups(rig: Rig) -> CgroupSupport:
    """The agent's cgroup support; skips, naming what is missing, when it has none."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the agent creates cgroups only as root")
    support = rig.agent.cgroups
    if support is None or support.mode == "none":
        reason = support.reason if support is not None else "no detection"
        pytest.skip(f"no usable cgroup v2 or v1 memory/cpu/pids controllers: {reason}")
    return support


def group_dirs(rig: Rig, mode: str, app: str, instance: str) -> dict[str, Path]:
    """Where the instance's cgroup must be, from the documented layout (not from the agent):
    ``<hierarchy>/superagent.<node>/<app>/<instance>``."""
    parent = f"{PARENT_GROUP}.{rig.agent.config.node}"
    support = rig.agent.cgroups
    assert support is not None
    if mode == "v1":
        # cpuset where detection took it (optional: a writable hierarchy the kernel lets
        # the agent's group use)
        cpuset = support.cpuset_parent() is not None
        return {c: CGROUP_ROOT / c / parent / app / instance
                for c in ("memory", "cpu", "pids", *(("cpuset",) if cpuset else ()))}
    assert support.v2_root is not None
    return {"unified": support.v2_root / parent / app / instance}


def procs(group: Path) -> set[int]:
    return {int(pid) for pid in (group / "cgroup.procs").read_text().split()}


def oom_kills(mode: str, dirs: dict[str, Path]) -> int:
    """The kernel's count of OOM kills in the group."""
    if mode == "v1":
        text = (dirs["memory"] / "memory.oom_control").read_text()
    else:
        text = (dirs["unified"] / "memory.events").read_text()
    counters = dict(line.split() for line in text.splitlines())
    assert "oom_kill" in counters, f"this kernel does not count OOM kills: {text!r}"
    return int(counters["oom_kill"])


# --- the environment --------------------------------------------------------------------------


async def test_instance_environment_is_exactly_the_documented_set(
        rig: Rig, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app sees PATH (its release's tools first), HOME, LANG, PORT,
    SUPERAGENT_APP/_RELEASE/_INSTANCE and its [env], nothing of the agent's own environment
    (not even the cluster secret)."""
    monkeypatch.setenv("WIRING_LEAK_CANARY", "from-the-agent")
    monkeypatch.setenv("SUPERAGENT_SECRET", SECRET)
    monkeypatch.setenv("PYTHONPATH", "/nonexistent/agent-only")
    literal = "hello $HOME; `id` w\u00f6rld"  # passed as is: no shell expands it
    [started] = await deploy(rig, "wenv", '[env]\nGREETING = "hello $HOME; `id` w\u00f6rld"\n'
                                          'EMPTY = ""\n')
    instance, port = started["id"], started["port"]
    async with httpx.AsyncClient(timeout=DEADLINE) as client:
        answer = await client.get(f"http://127.0.0.1:{port}/env")
    assert answer.status_code == 200
    env = dict(answer.json())

    # A POSIX sh (the agent spawns /bin/sh -c "exec <command>") exports PWD, the directory
    # it was started in: the release's source, not anything of the agent's.
    src = data_dir / "releases" / "wenv" / "r1" / "src"
    assert Path(env.pop("PWD", str(src))).resolve() == src.resolve()
    assert env == {
        "PATH": f"{src}/.venv/bin:{src}/node_modules/.bin:{src.parent}/bin:"
                "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(data_dir / "homes" / instance),
        "LANG": "C.UTF-8",
        "PORT": str(port),
        "SUPERAGENT_APP": "wenv",
        "SUPERAGENT_RELEASE": "r1",
        "SUPERAGENT_INSTANCE": instance,
        "GREETING": literal,
        "EMPTY": "",
    }
    # The same holds for what the process was exec'd with, as the kernel recorded it.
    pid = entry(await status_of(rig), instance)["pid"]
    assert "WIRING_LEAK_CANARY" not in psutil.Process(pid).environ()


# --- cgroup limits ----------------------------------------------------------------------------


async def test_manifest_limits_reach_the_instances_cgroup(rig: Rig) -> None:
    """[limits] memory, cpu and pids are what the kernel holds for the instance's group, the
    app's pid is in it, and the status reports both."""
    support = need_cgroups(rig)
    mode = support.mode
    memory, cpu, pids = 96 * MB, 0.5, 50
    [started] = await deploy(rig, "wlimits", f'[limits]\nmemory = "96M"\ncpu = {cpu}\n'
                                             f'pids = {pids}\n')
    instance = started["id"]
    status = await status_of(rig)
    me = entry(status, instance)
    pid = me["pid"]
    assert me["state"] == "ready" and pid is not None
    dirs = group_dirs(rig, mode, "wlimits", instance)
    quota = round(cpu * CPU_PERIOD_US)

    if mode == "v1":
        memory_dir, cpu_dir, pids_dir = dirs["memory"], dirs["cpu"], dirs["pids"]
        assert int((memory_dir / "memory.limit_in_bytes").read_text()) == memory
        memsw = memory_dir / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # swap accounting: RAM + swap capped at the RAM limit
            assert int(memsw.read_text()) == memory
        assert int((cpu_dir / "cpu.cfs_quota_us").read_text()) == quota
        assert int((cpu_dir / "cpu.cfs_period_us").read_text()) == CPU_PERIOD_US
        assert (pids_dir / "pids.max").read_text().strip() == str(pids)
        want_limits = {"memory.limit_in_bytes": str(memory),
                       "memory.memsw.limit_in_bytes":
                           str(memory) if memsw.exists() else "unavailable (no swap accounting)",
                       "cpu.cfs_quota_us": str(quota), "cpu.cfs_period_us": str(CPU_PERIOD_US),
                       "pids.max": str(pids)}
    else:
        unified = dirs["unified"]
        assert int((unified / "memory.max").read_text()) == memory
        assert (unified / "cpu.max").read_text().split() == [str(quota), str(CPU_PERIOD_US)]
        want_limits = {"memory.max": str(memory), "cpu.max": f"{quota} {CPU_PERIOD_US}"}
        if (unified / "pids.max").exists():
            assert (unified / "pids.max").read_text().strip() == str(pids)
            want_limits["pids.max"] = str(pids)
    for group in dirs.values():
        assert pid in procs(group), group
    # ... and the kernel agrees about where the process is (v1: one line per hierarchy,
    # "4:memory:/path"; v2: "0::/path").
    where: dict[str, str] = {}
    for line in (Path("/proc") / str(pid) / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            where[controller] = path
    group_path = f"/{PARENT_GROUP}.{rig.agent.config.node}/wlimits/{instance}"
    for controller in (tuple(dirs) if mode == "v1" else ("",)):
        assert where.get(controller) == group_path, (controller, where)
    # half a core on a machine of more CPUs: confined to one of them, which the kernel
    # holds the process to
    if support.cpuset_parent() is not None and len(os.sched_getaffinity(0)) > 1:
        cpuset = dirs["cpuset"] if mode == "v1" else dirs["unified"]
        cpus = (cpuset / "cpuset.cpus").read_text().strip()
        assert os.sched_getaffinity(pid) == {int(cpus)}
        want_limits["cpuset.cpus"] = cpus

    assert status["isolation"]["root"] is True
    assert status["isolation"]["cgroups"] == mode
    assert status["isolation"]["reason"] == support.reason
    report = me["isolation"]["cgroup"]
    assert report["mode"] == mode
    assert report["paths"] == {key: str(path) for key, path in dirs.items()}
    assert {k: v for k, v in report["limits"].items() if k in want_limits} == want_limits


# --- an OOM kill ------------------------------------------------------------------------------


async def test_oom_kill_stays_in_the_instance_and_it_is_restarted(rig: Rig) -> None:
    """An instance that outgrows [limits] memory after it is ready is OOM-killed in its own
    cgroup; the agent and the app's other instance carry on, and it comes back ready."""
    mode = need_cgroups(rig).mode
    victim, bystander = await deploy(rig, "whog", '[limits]\nmemory = "64M"\n', count=2)
    before = await status_of(rig)
    victim_pid = entry(before, victim["id"])["pid"]
    bystander_pid = entry(before, bystander["id"])["pid"]
    victim_dirs = group_dirs(rig, mode, "whog", victim["id"])
    bystander_dirs = group_dirs(rig, mode, "whog", bystander["id"])
    assert oom_kills(mode, victim_dirs) == 0

    async with httpx.AsyncClient(timeout=DEADLINE) as client:
        with pytest.raises(httpx.TransportError):  # killed mid-request: no answer at all
            answer = await client.get(f"http://127.0.0.1:{victim['port']}/hog")
            pytest.fail(f"the app allocated past its 64M limit: {answer.text}")

        after = await wait_for(rig, "the victim restarted and ready again", lambda s: (
            entry(s, victim["id"])["restarts"] >= 1
            and entry(s, victim["id"])["state"] == "ready"
            and entry(s, victim["id"])["pid"] not in (None, victim_pid)))
        again = entry(after, victim["id"])
        assert again["last_exit_code"] == -9  # SIGKILL, from the kernel's OOM killer
        assert oom_kills(mode, victim_dirs) >= 1
        assert not psutil.pid_exists(victim_pid)
        for group in victim_dirs.values():  # the new process is back in the same group
            assert procs(group) == {again["pid"]}
        answer = await client.get(f"http://127.0.0.1:{victim['port']}/")
        assert answer.json() == {"pid": again["pid"], "instance": victim["id"]}

        # The other instance was never touched.
        other = entry(after, bystander["id"])
        assert (other["pid"], other["restarts"], other["state"]) == (bystander_pid, 0, "ready")
        assert oom_kills(mode, bystander_dirs) == 0
        answer = await client.get(f"http://127.0.0.1:{bystander['port']}/")
        assert answer.json() == {"pid": bystander_pid, "instance": bystander["id"]}
    assert len(after["instances"]) == 2


# --- status figures ---------------------------------------------------------------------------


async def test_the_figures_count_what_the_group_holds_a_daemon_too(rig: Rig) -> None:
    """A process that left the app's tree by daemonising is still the instance's: the
    figures (and the load's CPU seconds, found the same way) are of the processes its
    cgroup lists, not of its process tree."""
    need_cgroups(rig)
    [started] = await deploy(rig, "wdaemon")
    instance, base = started["id"], f"http://127.0.0.1:{started['port']}"
    async with httpx.AsyncClient(base_url=base, timeout=DEADLINE) as client:
        assert (await client.get("/daemon?120")).json() == {"daemonised": True}
    status = await wait_for(rig, "the daemon in the figures", lambda s: (
        entry(s, instance)["figures"]["processes"] == 2))
    pid = entry(status, instance)["pid"]
    group = rig.agent.instances[instance].cgroup
    assert group is not None
    (daemon,) = set(group.procs()) - {pid}
    assert daemon not in {c.pid for c in psutil.Process(pid).children(recursive=True)}


async def test_status_figures_of_a_busy_instance_and_the_node(rig: Rig) -> None:
    """CPU seconds, RSS, threads and connections follow what the app really did and holds;
    the node's figures are the machine's."""
    [started] = await deploy(rig, "wfig")
    instance, base = started["id"], f"http://127.0.0.1:{started['port']}"
    held = 3  # keep-alive connections, each with its own handler thread in the app
    clients = [httpx.AsyncClient(base_url=base, timeout=DEADLINE) for _ in range(held)]
    try:
        assert (await clients[0].get("/burn?0.3")).json()["cpu"] >= 0.3
        assert (await clients[1].get("/hold?64")).json() == {"held_mb": 64}
        for client in clients[2:]:
            assert (await client.get("/")).status_code == 200
        status = await status_of(rig)
        figures = entry(status, instance)["figures"]
        pid = entry(status, instance)["pid"]
        assert figures["processes"] == 1  # exec'd: no shell in between
        assert 0.3 <= figures["cpu_seconds"] < 30
        assert 64 * MB <= figures["rss_bytes"] < 1024 * MB
        assert figures["threads"] >= 1 + held  # the main thread and one per connection
        # the listener and every connection this test holds (a health probe may add one)
        assert held + 1 <= figures["connections"] <= held + 2
        established = [c for c in psutil.Process(pid).net_connections(kind="tcp")
                       if c.status == psutil.CONN_ESTABLISHED]
        assert len(established) >= held
    finally:
        for client in clients:
            await client.aclose()
    # Closed connections leave the count once the app's handler threads see the EOF.
    await wait_for(rig, "the closed connections gone from the figures", lambda s: (
        entry(s, instance)["figures"]["connections"] <= 2))

    node = status["figures"]
    assert node["cpus"] == os.cpu_count()
    assert len(node["load"]) == 3 and all(x >= 0 for x in node["load"])
    assert node["memory_total"] == psutil.virtual_memory().total
    assert 0 < node["memory_available"] <= node["memory_total"]
    # the agent runs in this process: its RSS is ours, give or take what moved meanwhile
    ours = psutil.Process().memory_info().rss
    assert ours / 2 < node["agent_rss_bytes"] < ours * 2
