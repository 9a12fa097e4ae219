"""Supervisor tests: real app processes on loopback, written to tmp_path.

Every wait on a condition has a ``trio.fail_after`` deadline; the tunables (backoff,
crash window, grace, health interval) are shrunk through ``InstanceConfig`` so the
whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import replace
from functools import partial
from pathlib import Path

import psutil
import pytest
import trio

from superagent.backoff import Backoff
from superagent.manifest import HealthSpec
from superagent.participant import supervisor
from superagent.participant.cgroups import CgroupLimits, detect_cgroups, remove_empty_parent
from superagent.participant.errors import (
    AdoptionFailed,
    InvalidTransition,
    StartFailed,
    SupervisorError,
)
from superagent.participant.isolation import (
    AppUser,
    RLimits,
    app_user_name,
    ensure_app_user,
    remove_app_user,
)
from superagent.participant.supervisor import (
    PORT_CHECK_EVERY,
    READY_FAST_FOR,
    READY_POLL,
    READY_POLL_FIRST,
    WRONG_PORT_GRACE,
    Event,
    Instance,
    InstanceConfig,
    State,
    probe,
    shell_command,
    transition,
)
from tests.participant.children import child_python
from tests.support.ports import free_port
from tests.support.wait import wait_until_async

WAIT = 10.0  # generous bound on any condition below; each is met in well under a second

APP = r'''
import http.server, os, pathlib, signal, subprocess, sys, threading
mode, state = sys.argv[1], pathlib.Path(sys.argv[2])
port = int(os.environ["PORT"])
print("hello out", os.environ["SUPERAGENT_INSTANCE"], flush=True)
print("hello err", flush=True, file=sys.stderr)
pathlib.Path(os.environ["HOME"], "uid").write_text(str(os.getuid()))
if mode == "term":
    def on_term(signum, frame):
        (state / "terminated").write_text("yes")
        os._exit(0)
    signal.signal(signal.SIGTERM, on_term)
if mode == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen([sys.executable, "-c", "import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    (state / "grandchild").write_text(str(grandchild.pid))
if mode == "crash" and (state / "crashed").exists():
    sys.exit(3)
if mode == "liveness":
    (state / "sick").unlink(missing_ok=True)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200
        if mode == "unready" or (mode == "liveness" and (state / "sick").exists()):
            code = 503
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
        if mode == "crash":
            (state / "crashed").write_text("1")
            threading.Timer(0.2, os._exit, (3,)).start()
    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def make_config(base: Path, mode: str, *, python: str = sys.executable,
                **overrides: object) -> InstanceConfig:
    """An instance running APP in ``mode`` below ``base``, with test-speed tunables."""
    src = base / "src"
    state = base / "state"
    src.mkdir(exist_ok=True)
    state.mkdir(exist_ok=True)
    (src / "app.py").write_text(APP)
    command = f"exec {shlex.quote(python)} app.py {mode} {shlex.quote(str(state))}"
    config = InstanceConfig(
        app="hello", release="r1", instance="hello-r1-1", port=free_port(), cwd=src,
        command=command, home=base / "home", log_dir=base / "logs", env={"GREETING": "hi"},
        health=HealthSpec(path="/healthz", interval=0.1, timeout=1.0, failures=2,
                          ready_deadline=5.0),
        grace=2.0, backoff_initial=0.01, backoff_max=0.05, max_restarts=3,
        restart_window=60.0)
    return replace(config, **overrides)  # type: ignore[arg-type]


@asynccontextmanager
async def supervised(config: InstanceConfig) -> AsyncIterator[Instance]:
    """A READY instance, stopped on the way out."""
    instance = Instance(config)
    async with trio.open_nursery() as nursery:
        try:
            with trio.fail_after(WAIT):
                await nursery.start(instance.run)
            yield instance
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(WAIT):
                await instance.stop()


def gone(pid: int) -> bool:
    """True when ``pid`` has exited (absent, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


# --- pure parts -------------------------------------------------------------------------------


def test_illegal_transition_names_state_and_event() -> None:
    """An event the table does not allow raises InvalidTransition naming both."""
    assert transition(State.STARTING, Event.READY) is State.READY
    assert transition(State.CRASH_LOOP, Event.STOP) is State.STOPPING
    with pytest.raises(InvalidTransition, match=r"READY.*STOPPED") as info:
        transition(State.STOPPED, Event.READY)
    assert (info.value.state, info.value.event) == ("STOPPED", "READY")
    with pytest.raises(InvalidTransition):
        transition(State.BACKOFF, Event.CHECK_OK)


def test_backoff_doubles_to_the_cap() -> None:
    """0.5 s doubling per consecutive crash, capped at 30 s."""
    backoff = Backoff(0.5, 30.0)
    delays = [backoff.next() for _ in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


@pytest.mark.parametrize(("eager", "ready_at"), [
    (True, 0.0301), (True, 0.5003), (True, READY_FAST_FOR + 2.0001), (False, 0.0301)])
async def test_readiness_is_seen_within_one_pause(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, eager: bool, ready_at: float,
        autojump_clock: trio.testing.MockClock) -> None:
    """An app ready at ``ready_at`` (seconds into its start) is seen by the next probe:
    within READY_POLL_FIRST during the first READY_FAST_FOR seconds of an eager start (a
    cold start's held requests wait for it), within READY_POLL otherwise, and probes
    slow down to READY_POLL apart once the fast pace is over."""
    probes: list[float] = []

    async def fake_probe(port: int, path: str | None) -> bool:
        probes.append(trio.current_time() - began)
        return probes[-1] >= ready_at

    monkeypatch.setattr(supervisor, "probe", fake_probe)
    # no look at the listening ports: a thread, while which the autojump clock moves on
    monkeypatch.setattr(supervisor, "PORT_CHECK_EVERY", 3600.0)
    instance = Instance(make_config(tmp_path, "ok", health=HealthSpec(
        path="/healthz", interval=1.0, timeout=1.0, failures=2, ready_deadline=30.0)),
        eager=eager)
    process = await trio.lowlevel.open_process(["true"])  # (its pid is never looked at)
    await process.wait()
    began = trio.current_time()  # after the spawn's thread, while which the clock jumps
    assert await instance._await_ready(process)
    fast = eager and ready_at < READY_FAST_FOR
    pause = READY_POLL_FIRST if fast else READY_POLL
    assert ready_at <= probes[-1] <= ready_at + pause + 1e-6, probes[-3:]
    if not fast:
        assert probes[-1] - probes[-2] == pytest.approx(READY_POLL), probes[-3:]


async def test_probe_needs_an_http_answer() -> None:
    """A port that accepts TCP but never answers is not healthy (within the timeout)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with trio.move_on_after(0.3):
            assert not await probe(port, "/healthz")
    assert not await probe(port, "/healthz")  # closed port: refused


@pytest.mark.parametrize(("status", "with_path", "without_path"),
                         [(200, True, True), (404, False, True), (503, False, False)])
async def test_probe_without_a_path_needs_an_http_answer_below_500(
        status: int, with_path: bool, without_path: bool) -> None:
    """Without a health path, GET / must get an HTTP answer below 500; a path needs 2xx."""
    targets: list[bytes] = []

    async def answer(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        targets.append(head.split(b" ")[1])
        await stream.send_all(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % status)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(WAIT):
            assert await probe(port, "/healthz") is with_path
            assert await probe(port, None) is without_path
        nursery.cancel_scope.cancel()
    assert targets == [b"/healthz", b"/"]


# --- real processes ---------------------------------------------------------------------------


async def test_ready_serves_and_logs(tmp_path: Path) -> None:
    """A healthy app reaches READY, answers on its port and its output lands in the logs."""
    config = make_config(tmp_path, "ok")
    async with supervised(config) as instance:
        assert instance.state is State.READY
        assert await probe(config.port, "/healthz")
        status = instance.status()
        assert status["state"] == "ready" and status["pid"] == instance.pid
        assert status["port"] == config.port and status["restarts"] == 0
        assert status["ready_at"] >= status["started_at"]
        assert status["isolation"]["user"]
        assert "READY" in repr(instance) and f"port={config.port}" in repr(instance)
        await wait_until_async(lambda: config.err_log.exists()
                               and "hello err" in config.err_log.read_text(),
                               "the app's stderr line in its log", timeout=WAIT)
        assert "hello out hello-r1-1" in config.out_log.read_text()
        assert (config.home / "uid").read_text() == str(os.getuid())
    assert instance.status()["state"] == "stopped" and instance.pid is None
    await instance.stop()  # idempotent
    assert instance.status()["state"] == "stopped"


async def test_not_ready_is_a_failed_start(tmp_path: Path) -> None:
    """An app that accepts TCP but answers 503 fails its start at the deadline, and is killed."""
    deadline = 1.0
    config = make_config(tmp_path, "unready", health=HealthSpec(
        path="/healthz", timeout=0.5, ready_deadline=deadline))
    instance = Instance(config)
    started = time.monotonic()
    with trio.fail_after(WAIT), pytest.raises(StartFailed, match="not ready") as info:
        await instance.run()
    assert deadline <= time.monotonic() - started < deadline + config.grace + 1.0
    assert info.value.returncode is None
    assert instance.state is State.STOPPED and instance.pid is None
    assert not await probe(config.port, None)  # nothing listens any more


async def test_exit_before_ready_is_a_failed_start(tmp_path: Path) -> None:
    """A command that exits at once fails the first start with its exit code and the last
    lines of both its output streams."""
    config = replace(make_config(tmp_path, "ok"),
                     command="echo starting; echo 'Traceback: bye' >&2; exit 7")
    with trio.fail_after(WAIT), pytest.raises(StartFailed, match="exited with 7") as info:
        await Instance(config).run()
    assert info.value.returncode == 7
    message = str(info.value)
    assert "--- last stdout ---\nstarting" in message
    assert "--- last stderr ---\nTraceback: bye" in message


async def test_an_app_on_another_port_fails_in_seconds_naming_it(tmp_path: Path) -> None:
    """An app that ignores $PORT fails its start within seconds (not at the deadline),
    naming the port it chose."""
    other = free_port()
    config = replace(make_config(tmp_path, "ok"), command=(
        f"exec {shlex.quote(sys.executable)} -m http.server --bind 127.0.0.1 {other}"),
        health=HealthSpec(path="/", timeout=0.5, ready_deadline=60.0))
    # well before the 60 s deadline: the grace, a check a second, and a loaded machine's
    # start of the app (WAIT) on top
    bound = WRONG_PORT_GRACE + PORT_CHECK_EVERY + WAIT
    started = time.monotonic()
    with trio.fail_after(bound), pytest.raises(StartFailed) as info:
        await Instance(config).run()
    assert time.monotonic() - started < bound
    assert f"listens on port {other}, not on $PORT ({config.port})" in str(info.value)
    assert info.value.returncode is None


async def test_crash_loop_stops_restarting(tmp_path: Path) -> None:
    """An app that dies and keeps dying on restart ends in CRASH_LOOP after max_restarts."""
    config = make_config(tmp_path, "crash")
    async with supervised(config) as instance:
        await wait_until_async(lambda: instance.state is State.CRASH_LOOP, "a crash loop",
                               timeout=WAIT)
        assert instance.restarts == config.max_restarts
        assert instance.last_exit == 3
        assert instance.status()["state"] == "crash_loop" and instance.pid is None
    assert instance.state is State.STOPPED


async def test_liveness_failure_restarts(tmp_path: Path) -> None:
    """An app whose health check starts failing is restarted and becomes READY again."""
    config = make_config(tmp_path, "liveness")
    async with supervised(config) as instance:
        first_pid = instance.pid
        (tmp_path / "state" / "sick").write_text("1")
        await wait_until_async(lambda: instance.restarts == 1 and instance.state is State.READY,
                               "one restart, then ready", timeout=WAIT)
        assert instance.pid not in (None, first_pid)
        assert await probe(config.port, "/healthz")


async def test_stop_runs_the_sigterm_handler(tmp_path: Path) -> None:
    """stop() sends SIGTERM, and the app's handler runs before it exits."""
    config = make_config(tmp_path, "term", grace=5.0)
    async with supervised(config) as instance:
        pass
    assert (tmp_path / "state" / "terminated").read_text() == "yes"
    assert instance.last_exit == 0


async def test_stop_kills_after_grace_with_grandchild(tmp_path: Path) -> None:
    """An app and a grandchild that ignore SIGTERM are SIGKILLed after the grace period."""
    config = make_config(tmp_path, "ignore", grace=0.3)
    async with supervised(config) as instance:
        grandchild = int((tmp_path / "state" / "grandchild").read_text())
        assert not gone(grandchild)
        started = time.monotonic()
    assert time.monotonic() - started >= config.grace
    assert instance.last_exit == -9
    await wait_until_async(lambda: gone(grandchild), "the grandchild gone", timeout=WAIT)


async def test_log_rotation_at_spawn(tmp_path: Path) -> None:
    """A log over log_max_bytes is renamed to .1 and the new child gets a fresh file."""
    config = make_config(tmp_path, "ok", log_max_bytes=100)
    config.log_dir.mkdir()
    config.out_log.write_text("old line\n" * 50)
    async with supervised(config):
        await wait_until_async(lambda: "hello out" in config.out_log.read_text(),
                               "the app's stdout line in its log", timeout=WAIT)
    assert "hello out" not in config.out_log.with_name(config.out_log.name + ".1").read_text()
    assert "old line" not in config.out_log.read_text()


async def test_spawn_failure_is_typed(tmp_path: Path) -> None:
    """A spawn that cannot happen (missing source directory) raises SupervisorError."""
    config = replace(make_config(tmp_path, "ok"), cwd=tmp_path / "missing")
    with trio.fail_after(WAIT), pytest.raises(SupervisorError, match="cannot spawn"):
        await Instance(config).run()


async def test_a_failed_setup_says_which_step_and_why(tmp_path: Path) -> None:
    """A child whose isolation set-up fails (here an open-files limit above the kernel's
    ``nr_open``, which even root may not set) fails the spawn with the step and the error,
    not Popen's bare "Exception occurred in preexec_fn"."""
    if os.geteuid() != 0:
        pytest.skip("needs root: for another user the agent caps rlimits at the hard limit")
    config = replace(make_config(tmp_path, "ok"), rlimits=RLimits(nofile=2**31 - 1))
    with trio.fail_after(WAIT), pytest.raises(SupervisorError) as info:
        await Instance(config).run()
    assert "the instance's setup failed" not in str(info.value)  # the prefix is the agent's
    assert "cannot spawn instance hello-r1-1: setting rlimits: " in str(info.value)
    assert "not allowed to raise maximum limit" in str(info.value)  # the error itself
    assert "setting rlimits" in config.err_log.read_text()  # the app's log says it too


async def test_cancelled_run_leaves_the_app_running(tmp_path: Path) -> None:
    """Cancelling run() (agent shutdown) leaves the app up; stop() still ends it."""
    config = make_config(tmp_path, "term")
    instance = Instance(config)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(WAIT):
                await nursery.start(instance.run)
            nursery.cancel_scope.cancel()
        pid = instance.pid
        assert pid is not None and not gone(pid)
        assert await probe(config.port, "/healthz")
        with pytest.raises(SupervisorError, match="called once"):
            await instance.run()
    finally:
        with trio.fail_after(WAIT):
            await instance.stop()
    assert (tmp_path / "state" / "terminated").read_text() == "yes"
    await wait_until_async(lambda: gone(pid), "the app process gone", timeout=WAIT)


# --- adoption: processes an earlier agent left running -------------------------------------


def answers(port: int) -> bool:
    """A blocking readiness check (``previous_agent`` runs outside and inside trio)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@contextmanager
def previous_agent(config: InstanceConfig) -> Iterator[subprocess.Popen[bytes]]:
    """The app of ``config`` started as an earlier agent life would (own session), READY.

    The test process stays its parent, so it reaps it on the way out.
    """
    config.home.mkdir(parents=True, exist_ok=True)
    config.log_dir.mkdir(parents=True, exist_ok=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(config.home), "PORT": str(config.port),
           "SUPERAGENT_APP": config.app, "SUPERAGENT_RELEASE": config.release,
           "SUPERAGENT_INSTANCE": config.instance}
    with config.out_log.open("ab") as out, config.err_log.open("ab") as err:
        popen = subprocess.Popen(["/bin/sh", "-c", config.command], cwd=config.cwd, env=env,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT
        while not answers(config.port):
            assert popen.poll() is None and time.monotonic() < deadline, "app not ready"
            time.sleep(0.02)
        yield popen
    finally:
        with suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=WAIT)


def test_adopt_refuses_a_wrong_start_time_a_dead_pid_and_a_non_leader(tmp_path: Path) -> None:
    """Adoption checks start time, liveness and process-group leadership."""
    config = make_config(tmp_path, "ok")
    with previous_agent(config) as popen:
        create_time = psutil.Process(popen.pid).create_time()
        with pytest.raises(AdoptionFailed, match="pid reused") as info:
            Instance.adopt(config, pid=popen.pid, create_time=create_time + 100.0)
        assert info.value.pid == popen.pid and info.value.instance == config.instance
        assert info.value.status_hint == 410
    with pytest.raises(AdoptionFailed, match=r"no such process|exited|vanished"):
        Instance.adopt(config, pid=popen.pid, create_time=create_time)
    follower = subprocess.Popen(["sleep", "30"])  # in the test's own process group
    try:
        with pytest.raises(AdoptionFailed, match="not a process group leader"):
            Instance.adopt(config, pid=follower.pid,
                           create_time=psutil.Process(follower.pid).create_time())
    finally:
        follower.kill()
        follower.wait()


def test_adopted_app_killed_outside_is_restarted_as_a_child(tmp_path: Path) -> None:
    """An adopted app is READY at once; killed from outside, a child of ours replaces it."""
    config = make_config(tmp_path, "ok")
    with previous_agent(config) as popen:
        create_time = psutil.Process(popen.pid).create_time()
        instance = Instance.adopt(config, pid=popen.pid, create_time=create_time)

        async def scenario() -> None:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(WAIT):
                    await nursery.start(instance.run)
                assert instance.state is State.READY and instance.pid == popen.pid
                record = instance.to_record()
                assert record["pid"] == popen.pid and record["create_time"] == create_time
                os.kill(popen.pid, signal.SIGKILL)
                popen.wait(timeout=WAIT)  # its real parent reaps it, as init would
                await wait_until_async(
                    lambda: instance.restarts == 1 and instance.state is State.READY,
                    "one restart, then ready", timeout=WAIT)
                new = instance.pid
                assert new is not None and new != popen.pid
                assert psutil.Process(new).ppid() == os.getpid()
                assert instance.last_exit is None  # not our child: no exit code
                assert await probe(config.port, "/healthz")
                with trio.fail_after(WAIT):
                    await instance.stop()
            assert instance.status()["state"] == State.STOPPED.value
            await wait_until_async(lambda: gone(new), "the new process gone", timeout=WAIT)

        trio.run(scenario)


async def test_stop_of_an_adopted_app_sends_sigterm(tmp_path: Path) -> None:
    """stop() of an adopted app SIGTERMs its group: its handler runs."""
    config = make_config(tmp_path, "term")
    with previous_agent(config) as popen:
        instance = Instance.adopt(config, pid=popen.pid,
                                  create_time=psutil.Process(popen.pid).create_time())
        async with trio.open_nursery() as nursery:
            with trio.fail_after(WAIT):
                await nursery.start(instance.run)
            with trio.fail_after(WAIT):
                await instance.stop()
        assert (tmp_path / "state" / "terminated").read_text() == "yes"
        assert instance.pid is None and instance.restarts == 0
        assert instance.to_record()["pid"] is None


async def test_agent_restart_round_trip_through_a_record(tmp_path: Path) -> None:
    """run, cancel (agent exits), JSON record, from_record + adopt: the same process."""
    config = make_config(tmp_path, "term")
    first = Instance(config)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(first.run)
        nursery.cancel_scope.cancel()
    record = json.loads(json.dumps(first.to_record()))
    pid = record["pid"]
    assert pid == first.pid and record["create_time"] is not None
    second = Instance.adopt(InstanceConfig.from_record(record["config"]), pid=pid,
                            create_time=record["create_time"])
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(WAIT):
                await nursery.start(second.run)
            assert second.pid == pid and second.state is State.READY
            with trio.fail_after(WAIT):
                await second.stop()
    finally:
        with trio.fail_after(WAIT):
            await second.stop()
    assert (tmp_path / "state" / "terminated").read_text() == "yes"
    await wait_until_async(lambda: gone(pid), "the app process gone", timeout=WAIT)


def test_config_record_round_trips(tmp_path: Path) -> None:
    """InstanceConfig.from_record(to_record()) is the same config, through JSON."""
    config = make_config(tmp_path, "ok", user=AppUser(name="sa-x", uid=1234, gid=1234,
                                                      switched=True, loopback_gid=999),
                         cgroup_limits=CgroupLimits(memory=2**26, cpu=0.5, pids=64),
                         rlimits=RLimits(nofile=100, nproc=None))
    record = json.loads(json.dumps(config.to_record()))
    assert InstanceConfig.from_record(record) == config
    # an earlier agent's record has no egress group: it loads without one
    del record["user"]["loopback_gid"]
    assert InstanceConfig.from_record(record).user == AppUser(name="sa-x", uid=1234,
                                                              gid=1234, switched=True)
    with pytest.raises(SupervisorError, match="malformed instance record"):
        InstanceConfig.from_record({**record, "health": {"nope": 1}})


# --- as root: a uid of its own and a cgroup ---------------------------------------------------


async def test_runs_as_app_user_in_cgroup(world_dir: Path) -> None:
    """As root the instance runs under its app's uid and inside its own cgroup."""
    if os.geteuid() != 0:
        pytest.skip("needs root: useradd, switching uid and cgroups")
    if not (shutil.which("useradd") or Path("/usr/sbin/useradd").exists()):
        pytest.skip("useradd (passwd package) not installed")
    python = child_python()  # skips when no python3 is executable by other users
    app = "svtest"
    user = ensure_app_user(app)
    support = detect_cgroups(parent=f"superagent-test-sv-{os.getpid()}")  # never production's
    try:
        config = make_config(world_dir, "ok", python=python, app=app, instance=f"{app}-1",
                             user=user, cgroups=support)
        async with supervised(config) as instance:
            await wait_until_async(lambda: (config.home / "uid").exists(),
                                   "the app's uid file", timeout=WAIT)
            assert (config.home / "uid").read_text() == str(user.uid)
            report = instance.status()["isolation"]
            assert report["switched_user"] and report["uid"] == user.uid
            assert report["cgroup"]["mode"] == support.mode
            paths = list(report["cgroup"]["paths"].values())
        assert all(not Path(path).exists() for path in paths)
    finally:
        remove_empty_parent(support)
        remove_app_user(app)
        name = app_user_name(app)
        if subprocess.run(["getent", "group", name], capture_output=True,
                          check=False).returncode == 0:
            subprocess.run(["groupdel", name], check=True)


@pytest.mark.parametrize(("command", "expected"), [
    ("python3 app.py", "exec python3 app.py"),
    ("./server --port=8000", "exec ./server --port=8000"),
    ("cd x && python3 app.py", "cd x && python3 app.py"),
    ("python3 app.py; echo done", "python3 app.py; echo done"),
    ("PORT2=1 python3 app.py", "PORT2=1 python3 app.py"),
    ("node $ENTRY", "node $ENTRY"),
    ("python3 a.py > log", "python3 a.py > log"),
    ("exec python3 app.py", "exec python3 app.py"),
])
def test_simple_commands_are_execd(command: str, expected: str) -> None:
    """A simple command replaces the shell, so the app itself gets SIGTERM."""
    assert shell_command(command) == expected
