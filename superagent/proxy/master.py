"""The standalone proxy: N worker processes, their routing snapshot, reloads, admin.

``ProxyMaster`` starts the workers (``superagent.proxy.workers.spawn_worker``: each
says it is ready with one line on an inherited pipe), pushes the snapshot and
counts it applied only when every worker acknowledged its version. A worker that
dies is restarted and given the current snapshot. Asking every worker, the restart
loop and stopping them are ``superagent.proxy.workerset.WorkerSet``'s, shared with the
participant agent's proxy driver.

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
from superagent.proxy.snapshot import RoutingSnapshot
from superagent.proxy.workers import KILL_MARGIN, push_snapshot, spawn_worker
from superagent.proxy.workerset import WorkerSet, WorkerSlot

WATCH_INTERVAL = 1.0  # how often the config file's mtime/size/inode are compared

log = structlog.get_logger("superagent.proxy")


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
        self.run_dir = tempfile.mkdtemp(prefix="superagent-proxy-")
        self.workers = WorkerSet([os.path.join(self.run_dir, f"worker-{i}.sock")
                                  for i in range(process.worker_count())])
        # The lifelines: each worker holds a read end, this process every write end; when
        # this process dies, however it dies, the workers see EOF and stop gracefully.
        self._lifelines: list[tuple[int, int]] = []
        self._reload_lock = trio.Lock()
        self._stat = self._file_stat()

    def __repr__(self) -> str:
        return (f"<ProxyMaster v{self.snapshot.version} workers={len(self.workers)}"
                f" config={self.config_path}>")

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until SIGTERM/SIGINT; raises ConfigError if the first snapshot is refused."""
        try:
            self._lifelines = [os.pipe() for _ in self.workers.slots]
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
            for fds in self._lifelines:
                for fd in fds:
                    os.close(fd)
            shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("proxy stopped")

    async def _start(self, nursery: trio.Nursery) -> None:
        admin = self.process.admin
        if admin is not None:  # a taken admin port fails before any worker is spawned
            check_bindable(admin, source=self.config_path or "", key="proxy.admin")
        for slot in self.workers.slots:
            try:
                await self._spawn(slot)
            except WorkerStartError as exc:
                raise ConfigError(f"{exc}; see its log above") from None
            nursery.start_soon(self.workers.supervise, slot, self._restart)
        await self.push(self.snapshot)
        if admin is not None:
            # starlette and hypercorn are loaded only by a proxy that serves an admin API
            from superagent.proxy.admin import serve_admin

            await nursery.start(serve_admin, self, admin)
        if self.config_path is not None:
            nursery.start_soon(self._watch_config)
        log.info("proxy ready", workers=len(self.workers), parser=self.process.parser,
                 listeners=[f"{lst.host}:{lst.port}" for lst in self.snapshot.listeners],
                 admin=f"{admin[0]}:{admin[1]}" if admin else None,
                 version=self.snapshot.version)

    # ------------------------------------------------------------------ workers
    async def _spawn(self, slot: WorkerSlot) -> None:
        """Start the worker of ``slot``; raises WorkerStartError."""
        lifeline = self._lifelines[slot.index][0]
        slot.process = await spawn_worker(
            slot.control_path, parser=self.process.parser, grace=self.process.grace,
            extra_fds=(lifeline,),
            extra_args=("--lifeline-fd", str(lifeline), "--log-level", self.log_level))

    async def _restart(self, slot: WorkerSlot) -> None:
        """Replace a dead worker and give it the current snapshot; raises WorkerStartError."""
        await self._spawn(slot)
        try:
            await self._push_one(slot, self.snapshot)
        except (control.ControlError, ConfigError) as exc:
            log.error("restarted worker refused the snapshot", worker=slot.index, error=str(exc))

    async def _stop_workers(self) -> None:
        await self.workers.stop(grace=self.process.grace + KILL_MARGIN, reap_timeout=KILL_MARGIN)

    # ------------------------------------------------------------------ snapshots
    async def push(self, snapshot: RoutingSnapshot) -> None:
        """Send ``snapshot`` to every worker; returns when all acknowledged its version.

        Raises ConfigError naming the first refusal.
        """
        outcomes = await self.workers.each(lambda slot: self._push_one(slot, snapshot),
                                           self.workers.slots)
        errors = [f"worker {o.slot.index} refused the routing snapshot: {o.error}"
                  for o in outcomes if not o.ok]
        if errors:
            raise ConfigError("; ".join(sorted(errors)))
        self.snapshot = snapshot

    async def _push_one(self, slot: WorkerSlot, snapshot: RoutingSnapshot) -> None:
        await push_snapshot(slot.control_path, snapshot_to_wire(snapshot))
        if self.node_draining:
            await control.call(slot.control_path, {"type": "node", "draining": True})

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
        replies = []
        for outcome in await self.workers.call(message, self.workers.slots):
            if outcome.value is None:
                log.warning("worker did not answer", worker=outcome.slot.index,
                            error=outcome.error)
            else:
                replies.append(outcome.value)
        return replies

    async def stats(self) -> tuple[dict[str, Any], int]:
        """Every answering worker's figures, merged, and how many answered."""
        return await self.workers.stats(self.workers.slots)
