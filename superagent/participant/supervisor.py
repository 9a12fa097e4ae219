"""Supervision of one app instance: spawn, readiness, liveness, restarts, stop.

Theory of operation
-------------------
An ``Instance`` owns one app process at a time and is driven by one task,
``Instance.run``, started with ``await nursery.start(instance.run)``:

1. **Spawn.** ``/bin/sh -c <command>`` (``exec <command>`` when it is a simple command,
   so the app itself leads its group) in a new session (so the process group id is
   the shell's pid and signals reach the whole app), in the release's source dir, with
   a clean environment (PATH, HOME, LANG, PORT, SUPERAGENT_APP/_RELEASE/_INSTANCE plus
   the app's env). ``isolation.child_setup`` joins the instance's cgroup (created
   first when the agent has cgroup support), sets rlimits and no_new_privs and drops
   to the app's uid. stdout and stderr are files ``<log_dir>/<instance>.out.log`` /
   ``.err.log`` opened ``O_APPEND`` by the agent and handed to the child as its fds —
   not pipes — so an app keeps running and logging while the agent restarts.
2. **Readiness.** ``GET ready_path`` over HTTP/1.1 on 127.0.0.1:port, first every
   ``READY_POLL`` seconds (every ``READY_POLL_FIRST`` for the first ``READY_FAST_FOR``
   of an ``eager`` instance, a cold start); a 2xx answer is ready (an
   accepted TCP connection alone is not; an app that declares no health path is ready
   when ``GET /`` gets any HTTP answer below 500).
   Missing ``ready_deadline`` counts as a failed start. On the first start ``run``
   reports ``task_status.started`` once READY and raises ``StartFailed`` otherwise; on a
   restart a failed start is a crash like any other.
3. **Liveness.** ``GET path`` every ``interval``, each bounded by ``timeout``;
   ``failures`` consecutive failures stop the process (SIGTERM, grace, SIGKILL) and it
   is restarted.
4. **Restarts.** After any exit the rest of the process group (and the cgroup) is
   SIGKILLed, then the instance waits an exponential backoff (``backoff_initial``
   doubling to ``backoff_max``; back to the start after a run longer than the crash
   window) and spawns again. ``max_restarts`` restarts within ``restart_window`` seconds
   is a crash loop: state CRASH_LOOP, logged, no more restarts, ``run`` returns.
5. **Stop.** ``stop()``: SIGTERM to the process group, up to ``grace`` seconds for the
   whole group to exit (not just its leader: a shell may exit before the app), then
   SIGKILL to the group (and the cgroup's ``kill_all``), then the cgroup is removed.
   Idempotent; concurrent callers wait for the same stop.

If ``run`` is cancelled from outside (the agent shutting down) the app process is left
running on purpose: apps survive an agent restart and are re-adopted by pid (see
docs/ARCHITECTURE.md). Only ``stop()`` ends an app.

6. **Adoption.** The agent persists ``Instance.to_record()`` (the config, the pid and
   the process's start time). A restarted agent rebuilds the config with
   ``InstanceConfig.from_record`` and calls ``Instance.adopt(config, pid=, create_time=)``,
   which checks the process (``adoption.AdoptedProcess``: same start time, own process
   group, alive) or raises ``AdoptionFailed`` (then the caller starts a fresh instance).
   ``run`` then supervises the adopted process as its first incarnation — readiness
   (the first-start rules: not ready by the deadline is ``StartFailed``), liveness,
   ``stop()`` — except that its exit is seen through a pidfd and its exit code is unknown
   (``last_exit`` None). Every restart after it spawns a normal child. The instance's
   cgroup, if any, is the existing one (``InstanceCgroup.existing``).

Log files: before each spawn a file over ``log_max_bytes`` is renamed to ``<name>.1`` and
the new child gets a fresh one; while an instance runs, ``logs.LogHub`` reads its files
line by line and bounds them by copy-truncate.

The state machine (``instancestate.transition``) is pure; the config and its persisted
form are ``instanceconfig.InstanceConfig``, the health probe and the listening-port
check ``probes``; this module is the trio shell around them (and re-exports
``InstanceConfig``, ``State``, ``Event``, ``transition`` and ``probe``).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeAlias

import structlog
import trio

from superagent.backoff import Backoff
from superagent.participant.adoption import AdoptedProcess, process_create_time
from superagent.participant.cgroups import InstanceCgroup
from superagent.participant.errors import AdoptionFailed, StartFailed, SupervisorError
from superagent.participant.instanceconfig import InstanceConfig as InstanceConfig
from superagent.participant.instancestate import Event as Event
from superagent.participant.instancestate import State as State
from superagent.participant.instancestate import transition as transition
from superagent.participant.isolation import IsolationReport, child_setup, setup_failure
from superagent.participant.logfiles import output_tails
from superagent.participant.probes import listening_ports
from superagent.participant.probes import probe as probe
from superagent.participant.toolchain import release_env
from superagent.procs import REAP_TIMEOUT, terminate_group

log = structlog.get_logger("superagent.participant")

# Readiness probes run READY_POLL apart, and READY_POLL_FIRST apart for the first
# READY_FAST_FOR seconds of an eager start (a cold start, whose held requests wait for
# it). An app is ready between two probes and waits, on average, half the pause for the
# one that sees it: most apps (a uvicorn, an express, a plain http.server) are ready within
# 50-500 ms. A probe of a booting app is a refused loopback connect, about 50 us of the
# agent's CPU: 0.5 % of a core per booting instance at 10 ms, 2.5 % at 2 ms, which only a
# cold start's first second pays (a deploy of 50 instances at once would spend more than a
# core on it).
READY_POLL_FIRST = 0.002
READY_FAST_FOR = 1.0
READY_POLL = 0.01
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_LANG = "C.UTF-8"
GROUP_POLL = 0.05  # while a stopped instance's cgroup empties (a cgroup cannot be waited on)
# An app listening on other ports but not on $PORT this long is failed at once: long enough
# for a server that opens a side port (metrics, debug) and loads before its main one.
WRONG_PORT_GRACE = 5.0
PORT_CHECK_EVERY = 1.0  # seconds between looks at an unready instance's listening sockets
RECORD_VERSION = 1  # of the persisted form, ``Instance.to_record``

# The process an instance supervises: its own child, or one adopted from an earlier agent.
_Process: TypeAlias = trio.Process | AdoptedProcess


def _exited(process: _Process) -> bool:
    if isinstance(process, AdoptedProcess):
        return process.exited
    return process.returncode is not None


# --- the instance -----------------------------------------------------------------------------


class Instance:
    """One app instance and its supervision; see the module docstring.

    ``run`` is the owning task; ``stop`` ends the process and the cgroup. ``status`` is
    a JSON-able dict for the status API.
    """

    def __init__(self, config: InstanceConfig, *, eager: bool = False) -> None:
        self.config = config
        # requests wait for its first readiness (a cold start's hold): probed every
        # READY_POLL_FIRST for READY_FAST_FOR seconds, not every READY_POLL
        self.eager = eager
        self.state = State.STARTING
        self.restarts = 0
        self.last_exit: int | None = None
        self.started_at: float | None = None  # wall clock of the current process's spawn
        self.fork_at: float | None = None  # wall clock when its fork began (set-up done)
        self.create_time: float | None = None  # psutil's start time of the current process
        self.ready_at: float | None = None
        self.isolation: IsolationReport | None = None
        self._process: _Process | None = None
        self._adopted: AdoptedProcess | None = None  # taken by the first incarnation
        self._cgroup: InstanceCgroup | None = None
        self._restart_times: deque[float] = deque()
        # the delay before each restart of a crash streak
        self._backoff = Backoff(config.backoff_initial, config.backoff_max)
        self._stopping = False
        self._running = False
        self._run_done = trio.Event()
        self._stopped = trio.Event()
        self._backoff_scope: trio.CancelScope | None = None
        self._checks_scope: trio.CancelScope | None = None  # the current process's checks
        self._missed_deadline = False  # the last process was killed for missing ready_deadline
        self._wrong_port: str | None = None  # ... or for listening on other ports than $PORT
        self._log = log.bind(app=config.app, release=config.release, instance=config.instance)
        # Called after every change of state or of process (a restart's new pid), so the
        # owner can persist the pid and route only serving instances.
        self.on_change: Callable[[Instance], None] | None = None
        # Awaited before each spawn and again right after it (before the readiness probes):
        # the owner returns once its record of the instance, then of its new pid, is on
        # disk, so an owner killed at any moment finds every process it started.
        self.keep_record: Callable[[Instance], Awaitable[None]] | None = None

    def __repr__(self) -> str:
        pid = self.pid if self.pid is not None else "-"
        return (f"<Instance {self.config.app}@{self.config.release}/{self.config.instance} "
                f"{self.state.name} pid={pid} port={self.config.port} "
                f"restarts={self.restarts} last_exit={self.last_exit}>")

    @property
    def cgroup(self) -> InstanceCgroup | None:
        """The instance's cgroup: None before its first spawn, after a failed start or a
        stop, and without cgroup support (no root); in mode "none" one with no paths."""
        return self._cgroup

    @classmethod
    def adopt(cls, config: InstanceConfig, *, pid: int, create_time: float) -> Instance:
        """An instance whose first process is ``pid``, left running by an earlier agent.

        ``create_time`` is the start time recorded with it (``to_record``). Raises
        ``AdoptionFailed`` when that process is gone or ``pid`` is now another process;
        the caller then starts a fresh instance. Supervision begins with ``run``.
        """
        try:
            adopted = AdoptedProcess.open(pid, create_time)
        except AdoptionFailed as exc:
            exc.instance = config.instance
            raise exc.bind(app=config.app, release=config.release) from None
        instance = cls(config)
        instance._adopted = instance._process = adopted
        instance.create_time = adopted.create_time
        instance.started_at = adopted.create_time
        if config.cgroups is not None:
            instance._cgroup = InstanceCgroup.existing(config.cgroups, config.app,
                                                       config.instance)
        instance.isolation = IsolationReport.build(config.user, instance._cgroup,
                                                   config.rlimits, config.sandbox())
        instance._log.info("instance adopted", pid=pid, port=config.port)
        return instance

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and not _exited(process) else None

    def to_record(self) -> dict[str, Any]:
        """What a state file keeps to re-adopt the running process after an agent restart:
        ``config`` (``InstanceConfig.to_record``), ``pid`` and ``create_time`` (both None
        when no process runs)."""
        pid = self.pid
        return {"version": RECORD_VERSION, "config": self.config.to_record(), "pid": pid,
                "create_time": self.create_time if pid is not None else None}

    def status(self) -> dict[str, Any]:
        """The instance as the status API reports it."""
        return {
            "app": self.config.app, "release": self.config.release,
            "instance": self.config.instance, "state": self.state.value, "pid": self.pid,
            "port": self.config.port, "restarts": self.restarts,
            "last_exit_code": self.last_exit,
            "isolation": self.isolation.to_json() if self.isolation is not None else None,
            "started_at": self.started_at, "ready_at": self.ready_at,
            "create_time": self.create_time,
        }

    def _fire(self, event: Event) -> None:
        new = transition(self.state, event, instance=self.config.instance)
        if new is not self.state:
            self._log.info("instance state", trigger=event.value, old=self.state.value,
                           new=new.value)
        changed, self.state = new is not self.state, new
        if changed:
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    @property
    def serving(self) -> bool:
        """Whether the proxy may send it requests: ready, or failing fewer checks than
        the restart threshold."""
        return self.state in (State.READY, State.UNHEALTHY)

    # --- the supervision loop ---

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Spawn and supervise until ``stop()`` or a crash loop.

        Reports ``started`` once the first process is READY. Raises ``StartFailed`` when
        the first process exits or is not ready by ``ready_deadline`` (it is killed
        first), ``IsolationError`` when the cgroup or the isolation cannot be set up, and
        ``SupervisorError`` when a spawn fails (on any start: supervision ends, the
        instance's state stays where it was) or when ``run`` is called twice or after
        ``stop``. Cancelled from outside, it leaves the app process running.
        """
        if self._running or self._run_done.is_set() or self._stopping:
            raise SupervisorError("run() may be called once, before stop()",
                                  app=self.config.app, instance=self.config.instance)
        self._running = True
        try:
            await self._supervise(task_status)
        except Exception:
            # A supervisor that failed must not leave an unsupervised app behind (unlike
            # cancellation, which is the agent shutting down and leaves apps running).
            process = self._process
            if process is not None:
                with trio.CancelScope(shield=True):
                    await self._terminate(process)
            raise
        finally:
            self._running = False
            self._run_done.set()

    async def _supervise(self, task_status: trio.TaskStatus[None]) -> None:
        config = self.config
        first = True
        while True:
            spawned = time.monotonic()
            ready = await self._incarnation(task_status if first else None)
            if self._stopping:
                if first and not ready:
                    raise StartFailed("stopped before it was ready", returncode=self.last_exit,
                                      app=config.app, release=config.release,
                                      instance=config.instance)
                return
            if first and not ready:
                self._fire(Event.START_FAILED)
                await self._remove_cgroup()
                self._stopped.set()
                if self._wrong_port is not None:
                    what = self._wrong_port
                elif self._missed_deadline:
                    what = f"not ready within {config.health.ready_deadline} s"
                else:
                    what = f"exited with {self.last_exit}"
                killed = self._missed_deadline or self._wrong_port is not None
                code = None if killed else self.last_exit
                tails = await trio.to_thread.run_sync(output_tails, config.out_log,
                                                      config.err_log)
                raise StartFailed(f"instance {config.instance} {what}{tails}",
                                  returncode=code, app=config.app,
                                  release=config.release, instance=config.instance)
            first = False
            self._fire(Event.EXITED)
            now = time.monotonic()
            if now - spawned > config.restart_window:
                self._backoff.reset()  # a long good run ends a crash streak
            while self._restart_times and self._restart_times[0] < now - config.restart_window:
                self._restart_times.popleft()
            if len(self._restart_times) >= config.max_restarts:
                self._fire(Event.CRASH_LOOP)
                self._log.error("instance crash loop: no more restarts",
                                restarts=len(self._restart_times),
                                window=config.restart_window, last_exit=self.last_exit)
                return
            delay = self._backoff.next()
            self._log.warning("instance exited; restarting", last_exit=self.last_exit,
                              delay=delay)
            with trio.CancelScope() as self._backoff_scope:
                await trio.sleep(delay)
            self._backoff_scope = None
            if self._stopping:
                return
            self._restart_times.append(time.monotonic())
            self.restarts += 1
            self._fire(Event.RESTART)

    async def _incarnation(self, task_status: trio.TaskStatus[None] | None) -> bool:
        """Spawn (or take the adopted process), check until it is gone; True when it
        had become READY."""
        process: _Process
        if self._adopted is not None:
            process, self._adopted = self._adopted, None
        else:
            process = await self._spawn()
        ready = False
        self._missed_deadline = False
        self._wrong_port = None
        try:
            async with trio.open_nursery() as nursery:
                self._checks_scope = nursery.cancel_scope
                nursery.start_soon(self._watch_exit, process, nursery.cancel_scope)
                ready = await self._await_ready(process)
                if not ready:
                    self._log.warning("instance not ready",
                                      deadline=self.config.health.ready_deadline,
                                      wrong_port=self._wrong_port)
                    self._missed_deadline = self._wrong_port is None
                    await self._terminate(process)
                    return False
                self.ready_at = time.time()
                self._fire(Event.READY)
                if task_status is not None:
                    task_status.started()
                await self._liveness(process)
        finally:
            self._checks_scope = None
            if _exited(process):
                with trio.CancelScope(shield=True):  # bounded by REAP_TIMEOUT
                    await self._kill_rest(process)
        return ready

    async def _watch_exit(self, process: _Process, scope: trio.CancelScope) -> None:
        await process.wait()
        scope.cancel()

    async def _await_ready(self, process: _Process) -> bool:
        """Probe readiness until ``ready_deadline``. An app that listens on other ports but
        not on $PORT for ``WRONG_PORT_GRACE`` fails at once (``_wrong_port`` says which
        ports), rather than sitting out the deadline."""
        config = self.config
        health = config.health
        fast_until = trio.current_time() + (READY_FAST_FOR if self.eager else 0.0)
        elsewhere_since: float | None = None
        next_port_check = trio.current_time() + PORT_CHECK_EVERY

        def pause() -> float:
            return READY_POLL_FIRST if trio.current_time() < fast_until else READY_POLL

        with trio.move_on_after(health.ready_deadline):
            while True:
                with trio.move_on_after(health.timeout):
                    if await probe(config.port, health.ready_path):
                        return True
                if trio.current_time() < next_port_check:  # /proc walks are not free
                    await trio.sleep(pause())
                    continue
                next_port_check = trio.current_time() + PORT_CHECK_EVERY
                ports = await trio.to_thread.run_sync(listening_ports, process.pid)
                if ports and config.port not in ports:
                    now = trio.current_time()
                    elsewhere_since = now if elsewhere_since is None else elsewhere_since
                    if now - elsewhere_since >= WRONG_PORT_GRACE:
                        chosen = ", ".join(str(port) for port in sorted(ports))
                        self._wrong_port = (f"listens on port {chosen}, not on $PORT "
                                            f"({config.port}): an app must listen on "
                                            f"127.0.0.1:$PORT")
                        return False
                else:
                    elsewhere_since = None
                await trio.sleep(pause())
        return False

    async def _liveness(self, process: _Process) -> None:
        """Check every ``interval``; after ``failures`` in a row, stop the process."""
        health = self.config.health
        failed = 0
        while True:
            await trio.sleep(health.interval)
            ok = False
            with trio.move_on_after(health.timeout):
                ok = await probe(self.config.port, health.path)
            if ok:
                failed = 0
                self._fire(Event.CHECK_OK)
                continue
            failed += 1
            self._fire(Event.CHECK_FAILED)
            if failed >= health.failures:
                self._log.warning("instance failed its liveness checks; restarting",
                                  failures=failed, path=health.path)
                await self._terminate(process)
                return

    # --- spawning ---

    async def _spawn(self) -> trio.Process:
        config = self.config
        if self._cgroup is None and config.cgroups is not None:
            self._cgroup = await trio.to_thread.run_sync(
                InstanceCgroup.create, config.cgroups, config.app, config.instance,
                config.cgroup_limits)
        sandbox = config.sandbox()
        preexec = child_setup(config.user, self._cgroup, config.rlimits, sandbox)
        self.isolation = IsolationReport.build(config.user, self._cgroup, config.rlimits,
                                               sandbox)
        out_fd, err_fd = await trio.to_thread.run_sync(self._open_files)  # one thread hop
        err_size = 0  # where a failed setup's explanation starts in the stderr file
        try:
            err_size = os.fstat(err_fd).st_size
            if self.keep_record is not None:
                # the owner's record of this instance is on disk before its process exists
                await self.keep_record(self)
            self.fork_at = time.time()
            process = await trio.lowlevel.open_process(
                ["/bin/sh", "-c", shell_command(config.command)], cwd=config.cwd,
                env=self._environment(),
                stdin=subprocess.DEVNULL, stdout=out_fd, stderr=err_fd,
                start_new_session=True, preexec_fn=preexec, close_fds=True)
        except (OSError, subprocess.SubprocessError) as exc:
            why = setup_failure(config.err_log, err_size) or str(exc)
            raise SupervisorError(f"cannot spawn instance {config.instance}: {why}",
                                  app=config.app, release=config.release,
                                  instance=config.instance) from exc
        finally:
            os.close(err_fd)
            os.close(out_fd)
        self._process = process
        self.started_at = time.time()
        self.create_time = process_create_time(process.pid)
        self.ready_at = None
        self._log.info("instance spawned", pid=process.pid, port=config.port)
        self._changed()
        if self.keep_record is not None:
            # ... and its pid before it can be ready (routed); the app boots meanwhile
            await self.keep_record(self)
        return process

    def _environment(self) -> dict[str, str]:
        config = self.config
        env = {**release_env(config.cwd, DEFAULT_PATH), "HOME": str(config.home),
               "LANG": DEFAULT_LANG}
        if config.filesystem == "release":  # /tmp is read-only then; the manifest may differ
            env["TMPDIR"] = str(config.home)
        env.update(config.env)
        # Set last: the manifest refuses these keys, and the agent's values must win.
        env.update({"PORT": str(config.port), "SUPERAGENT_APP": config.app,
                    "SUPERAGENT_RELEASE": config.release,
                    "SUPERAGENT_INSTANCE": config.instance})
        return env

    def _open_files(self) -> tuple[int, int]:
        """Make the log and home dirs, open stdout's and stderr's files: the child's fds."""
        config = self.config
        config.log_dir.mkdir(parents=True, exist_ok=True)
        config.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        user = config.user
        if user is not None and user.switched:
            os.chown(config.home, user.uid, user.gid)
        out_fd = self._open_log(config.out_log)
        try:
            return out_fd, self._open_log(config.err_log)
        except BaseException:
            os.close(out_fd)
            raise

    def _open_log(self, path: Path) -> int:
        """Open ``path`` for appending, after renaming it to ``.1`` when over the limit."""
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size > self.config.log_max_bytes:
                path.replace(path.with_name(path.name + ".1"))
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    # --- stopping ---

    async def _terminate(self, process: _Process) -> None:
        """SIGTERM the group, ``grace`` for the whole group to exit, then SIGKILL everything.

        A process reaped before this call is left alone: whoever reaped it killed its
        group then, and its pid may since belong to someone else. The grace covers the
        group, not just the leader: a shell that ran the command as its child exits at
        once, and the app itself still gets the rest of the grace to finish its requests.
        """
        if _exited(process):
            return
        await self._stop_group(process, grace=self.config.grace)

    async def _kill_rest(self, process: _Process) -> None:
        """SIGKILL the process group and the cgroup, and reap the process.

        Only with a live leader or one reaped a moment ago (see ``superagent.procs``).
        """
        await self._stop_group(process, grace=0.0)

    async def _stop_group(self, process: _Process, *, grace: float) -> None:
        cgroup = self._cgroup

        async def kill_cgroup() -> None:
            if cgroup is not None:
                await trio.to_thread.run_sync(cgroup.kill_all)

        if await terminate_group(process, grace=grace, reap_timeout=REAP_TIMEOUT, members=True,
                                 kill_rest=kill_cgroup):
            self.last_exit = process.returncode
        else:
            self._log.error("instance not reaped after SIGKILL", pid=process.pid)

    async def _remove_cgroup(self) -> None:
        cgroup, self._cgroup = self._cgroup, None
        if cgroup is not None:
            await trio.to_thread.run_sync(cgroup.kill_all)
            await trio.to_thread.run_sync(cgroup.remove)

    async def stop(self) -> None:
        """Stop the instance (SIGTERM, grace, SIGKILL) and remove its cgroup; idempotent.

        Returns once the process group is gone and ``run`` has returned. Raises
        ``IsolationError`` when the cgroup cannot be removed.
        """
        if self._stopping or self.state is State.STOPPED:
            await self._stopped.wait()
            return
        self._stopping = True
        self._fire(Event.STOP)
        try:
            # No more checks or restarts: they would race the stop with their own events.
            for scope in (self._backoff_scope, self._checks_scope):
                if scope is not None:
                    scope.cancel()
            process = self._process
            if process is not None:
                await self._terminate(process)
            if self._running:
                with trio.move_on_after(REAP_TIMEOUT):
                    await self._run_done.wait()
            await self._remove_cgroup()
        finally:
            self._fire(Event.STOPPED)
            self._stopped.set()
        self._log.info("instance stopped", last_exit=self.last_exit)


_SHELL_SYNTAX = re.compile(r"[;&|<>()`$\\\n*?\[\]{}~#!]|^\s*\w+=")


def shell_command(command: str) -> str:
    """The ``sh -c`` argument for ``command``: a simple command is ``exec``'d, so the app is
    the group leader and gets SIGTERM itself (some shells, dash among them, fork it)."""
    if (_SHELL_SYNTAX.search(command) or not command.strip()
            or command.split()[0] == "exec"):
        return command
    return f"exec {command}"


__all__ = ["GROUP_POLL", "REAP_TIMEOUT", "Event", "Instance", "InstanceConfig", "State", "probe",
           "shell_command", "transition"]
