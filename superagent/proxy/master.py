"""The standalone proxy: N worker processes, their routing snapshot, reloads, admin.

``ProxyMaster`` starts the workers (``superagent.proxy.workers.spawn_worker``: each
says it is ready with one line on an inherited pipe), pushes the snapshot and
counts it applied only when every worker acknowledged its version. A worker that
dies is restarted and given the current snapshot.

Reload (SIGHUP, a changed config file, or ``POST /api/v1/reload``): the file is
validated first; an invalid file is refused with a log line naming the key and
the old snapshot stays in force. Listeners keep accepting throughout, so a
reload drops no connection.

Stop (SIGTERM/SIGINT): workers get SIGTERM, finish in-flight requests within the
grace period, and are killed if they outlive it by ``KILL_MARGIN``.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from dataclasses import replace
from typing import Any

import structlog
import trio

from superagent.errors import ConfigError
from superagent.httpserver import check_bindable
from superagent.proxy import control
from superagent.proxy.config import ProxyConfig, load_config, snapshot_to_wire
from superagent.proxy.errors import WorkerStartError
from superagent.proxy.metrics import merge
from superagent.proxy.snapshot import RoutingSnapshot
from superagent.proxy.workers import KILL_MARGIN, push_snapshot, spawn_worker

RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0)  # seconds before restarting a worker that died
WATCH_INTERVAL = 1.0  # how often the config file's mtime/size/inode are compared

log = structlog.get_logger("superagent.proxy")


class WorkerHandle:
    """One worker process as the master sees it."""

    __slots__ = ("control_path", "index", "proc", "restarts")

    def __init__(self, index: int, control_path: str) -> None:
        self.index = index
        self.control_path = control_path
        self.proc: trio.Process | None = None
        self.restarts = 0

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<WorkerHandle #{self.index} pid={pid} restarts={self.restarts}>"


class ProxyMaster:
    """Drives the workers of ``superagent proxy`` (see the module docstring)."""

    def __init__(self, *, config_path: str | None, process: ProxyConfig,
                 snapshot: RoutingSnapshot, log_level: str = "info",
                 file_process: ProxyConfig | None = None) -> None:
        self.config_path = config_path
        self.process = process  # in force: the file's settings plus command-line overrides
        self.file_process = file_process or process  # as the file said, to detect changes
        self.snapshot = snapshot
        self.log_level = log_level
        self.node_draining = False
        self.stopping = False
        self.run_dir = tempfile.mkdtemp(prefix="superagent-proxy-")
        self.workers = [WorkerHandle(i, os.path.join(self.run_dir, f"worker-{i}.sock"))
                        for i in range(process.worker_count())]
        self._reload_lock = trio.Lock()
        self._stat = self._file_stat()

    def __repr__(self) -> str:
        return (f"<ProxyMaster v{self.snapshot.version} workers={len(self.workers)}"
                f" config={self.config_path}>")

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until SIGTERM/SIGINT; raises ConfigError if the first snapshot is refused."""
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async with trio.open_nursery() as nursery:
                    await self._start(nursery)
                    task_status.started()
                    async for signum in sigs:
                        if signum != signal.SIGHUP:
                            break
                        nursery.start_soon(self.reload)
                    await self._stop_workers()
                    nursery.cancel_scope.cancel()
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("proxy stopped")

    async def _start(self, nursery: trio.Nursery) -> None:
        admin = self.process.admin
        if admin is not None:  # a taken admin port fails before any worker is spawned
            check_bindable(admin, source=self.config_path or "", key="proxy.admin")
        for handle in self.workers:
            await nursery.start(self._supervise, handle)
        await self.push(self.snapshot)
        if admin is not None:
            from superagent.proxy.admin import serve_admin

            await nursery.start(serve_admin, self, admin)
        if self.config_path is not None:
            nursery.start_soon(self._watch_config)
        log.info("proxy ready", workers=len(self.workers), parser=self.process.parser,
                 listeners=[f"{lst.host}:{lst.port}" for lst in self.snapshot.listeners],
                 admin=f"{admin[0]}:{admin[1]}" if admin else None,
                 version=self.snapshot.version)

    # ------------------------------------------------------------------ workers
    async def _supervise(self, handle: WorkerHandle,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        # The lifeline: the worker holds the read end, this process the write end; when this
        # process dies, however it dies, the worker sees EOF and stops gracefully.
        lifeline_read, lifeline_write = os.pipe()
        try:
            while not self.stopping:
                try:
                    handle.proc = await spawn_worker(
                        handle.control_path, parser=self.process.parser,
                        grace=self.process.grace, extra_fds=(lifeline_read,),
                        extra_args=("--lifeline-fd", str(lifeline_read),
                                    "--log-level", self.log_level))
                except WorkerStartError as exc:
                    if not started:
                        raise ConfigError(f"{exc}; see its log above") from None
                    event = "worker did not become ready; restarting"
                    details: dict[str, object] = {"error": str(exc)}
                else:
                    if started:
                        try:
                            await self._push_one(handle, self.snapshot)
                        except (control.ControlError, ConfigError) as exc:
                            log.error("restarted worker refused the snapshot",
                                      worker=handle.index, error=str(exc))
                    else:
                        started = True
                        task_status.started()
                    code = await handle.proc.wait()
                    if self.stopping:
                        return
                    event, details = "worker exited; restarting", {"code": code}
                delay = RESTART_BACKOFF[min(handle.restarts, len(RESTART_BACKOFF) - 1)]
                handle.restarts += 1
                log.error(event, worker=handle.index, delay=delay, **details)
                await trio.sleep(delay)
        finally:
            os.close(lifeline_read)
            os.close(lifeline_write)

    async def _stop_workers(self) -> None:
        self.stopping = True
        procs = [h.proc for h in self.workers if h.proc is not None and h.proc.returncode is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(self.process.grace + KILL_MARGIN):
            for proc in procs:
                await proc.wait()
        for proc in procs:
            if proc.returncode is None:
                log.warning("worker outlived the grace period; killing", pid=proc.pid)
                proc.kill()
                await proc.wait()

    # ------------------------------------------------------------------ snapshots
    async def push(self, snapshot: RoutingSnapshot) -> None:
        """Send ``snapshot`` to every worker; returns when all acknowledged its version.

        Raises ConfigError naming the first refusal.
        """
        errors: list[str] = []

        async def one(handle: WorkerHandle) -> None:
            try:
                await self._push_one(handle, snapshot)
            except (control.ControlError, ConfigError) as exc:
                errors.append(f"worker {handle.index} refused the routing snapshot: {exc}")

        async with trio.open_nursery() as nursery:
            for handle in self.workers:
                nursery.start_soon(one, handle)
        if errors:
            raise ConfigError("; ".join(sorted(errors)))
        self.snapshot = snapshot

    async def _push_one(self, handle: WorkerHandle, snapshot: RoutingSnapshot) -> None:
        await push_snapshot(handle.control_path, snapshot_to_wire(snapshot))
        if self.node_draining:
            await control.call(handle.control_path, {"type": "node", "draining": True})

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply it; a refused file leaves the old one in force."""
        async with self._reload_lock:
            self._stat = self._file_stat()
            if self.config_path is None:
                return {"ok": False, "error": "the proxy was not started from a config file"}
            try:
                process, snapshot = load_config(self.config_path)
                snapshot = replace(snapshot, version=self.snapshot.version + 1)
                await self.push(snapshot)
            except ConfigError as exc:
                log.error("config refused; the previous one stays in force", error=str(exc),
                          version=self.snapshot.version)
                return {"ok": False, "error": str(exc), "version": self.snapshot.version}
            fixed = [k for k in ("parser", "workers", "admin", "grace")
                     if getattr(process, k) != getattr(self.file_process, k)]
            self.file_process = process
            if fixed:
                log.warning("these settings change only on restart", keys=fixed)
            log.info("config reloaded", version=snapshot.version, apps=len(snapshot.apps))
            return {"ok": True, "version": snapshot.version, "restart_needed": fixed}

    def _file_stat(self) -> tuple[int, int, int] | None:
        if self.config_path is None:
            return None
        try:
            st = os.stat(self.config_path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    async def _watch_config(self) -> None:
        seen = self._stat
        while True:
            await trio.sleep(WATCH_INTERVAL)
            stat = self._file_stat()
            # Reload once the change has settled for an interval: an editor that truncates
            # and rewrites in place must not get its half-written file loaded.
            if stat is not None and stat != self._stat and stat == seen:
                log.info("config file changed; reloading", path=self.config_path)
                await self.reload()
            seen = stat

    # ------------------------------------------------------------------ queries
    async def broadcast(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """Send ``message`` to every worker; replies of the workers that answered."""
        replies: list[dict[str, Any]] = []

        async def one(handle: WorkerHandle) -> None:
            try:
                replies.append(await control.call(handle.control_path, message, timeout=5.0))
            except control.ControlError as exc:
                log.warning("worker did not answer", worker=handle.index, error=str(exc))

        async with trio.open_nursery() as nursery:
            for handle in self.workers:
                nursery.start_soon(one, handle)
        return replies

    async def stats(self) -> tuple[dict[str, Any], int]:
        replies = await self.broadcast({"type": "stats"})
        parts = [r["stats"] for r in replies if r.get("ok")]
        return merge(parts), len(parts)
