"""The participant's local proxy: N worker processes the agent drives but does not own.

Theory of operation. The proxy workers (``superagent.proxy.worker``) are child
processes of the agent started in their own session and *without* a lifeline,
so they keep serving when the agent dies or restarts: an agent upgrade must
not drop a single request. ``run_dir/proxy.json`` is the hand-over record:
each worker's pid, its start time (``create_time``, so a recycled pid is never
mistaken for a worker) and control socket, plus the last routing snapshot that
every worker acknowledged, the node's offline flag and the instances marked
draining. A new agent's ``start()`` adopts each recorded worker that is still
alive and answers ``ping``; it kills a recorded worker that is alive but
silent (it would keep its share of SO_REUSEPORT connections and never serve
them), spawns replacements for the missing, and gives them the recorded
snapshot, drain marks and offline flag.

Routing: ``apply()`` builds snapshot version N+1 and pushes it to every running
worker concurrently; it counts as applied (recorded, returned) only once all of
them acknowledged N+1. A refusal rolls the workers that did accept back to N
and raises ``ProxyDriverError``; N stays current. A worker that is dead at that
moment is skipped: ``supervise()`` gives it the current snapshot when it is back.

Drain marks an instance draining in every worker (new requests go elsewhere)
then polls ``stats`` (``DRAIN_POLL_FIRST`` apart, backing off to ``DRAIN_POLL``: most
requests in flight end within milliseconds) until the summed in-flight count
(websocket tunnels included) is zero or the grace period passes. Stop is
SIGTERM, the workers' own grace plus ``KILL_MARGIN``, then SIGKILL.

Exit detection: an own child is awaited with ``trio.Process.wait()``; an
adopted worker is not our child (it was the previous agent's), so it is held as
a ``superagent.participant.adoption.AdoptedProcess``: its exit is seen on a
pidfd, which also makes signalling it immune to pid reuse.

Starting a worker and pushing a snapshot are ``superagent.proxy.workers``'s; asking
every worker, restarting the dead (0.5, 1, 2, then 5 s apart) and stopping them are
``superagent.proxy.workerset.WorkerSet``'s — both shared with the standalone proxy's
master.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import structlog
import trio

from superagent.backoff import Backoff
from superagent.config import parse_address
from superagent.errors import ConfigError
from superagent.participant.adoption import AdoptedProcess
from superagent.participant.errors import AdoptionFailed, ProxyDriverError
from superagent.procs import kill
from superagent.proxy import control
from superagent.proxy.config import snapshot_from_wire, snapshot_to_wire
from superagent.proxy.errors import WorkerStartError
from superagent.proxy.snapshot import AppRoute, Listener, RoutingSnapshot, ServerSettings
from superagent.proxy.workers import CONTROL_TIMEOUT, KILL_MARGIN, push_snapshot, spawn_worker
from superagent.proxy.workerset import WorkerSet, WorkerSlot

STATE_FILE = "proxy.json"
ACCESS_LOG = "proxy-access.log"
# Workers have no push channel: in-flight counts are polled, first DRAIN_POLL_FIRST apart
# (a request in flight at the drain usually ends within a few ms, and every drain of a
# deploy waited a whole 50 ms for it), doubling up to DRAIN_POLL (long requests, tunnels).
DRAIN_POLL_FIRST = 0.005
DRAIN_POLL = 0.05
PING_TIMEOUT = 2.0  # an adoption candidate that cannot answer a ping within this is wedged
CREATE_TIME_SLACK = 0.01  # psutil's create_time is a float from /proc ticks: compare loosely
SUN_PATH_MAX = 107  # bytes of a Unix socket path, NUL excluded (Linux sockaddr_un)

log = structlog.get_logger("superagent.participant.proxy")


# --------------------------------------------------------------------------- the driver

class _AdoptedWorker(AdoptedProcess):
    """A worker a previous agent spawned; reaped after its exit in the one case where it
    is our child after all (a previous driver in this same process, as in tests)."""

    async def wait(self) -> None:
        await super().wait()
        _reap_if_child(self.pid)


class ProxyDriver:
    """Drives this node's proxy workers; see the module docstring.

    Owns the worker processes it spawned or adopted from ``start()`` until ``stop()``.
    """

    def __init__(self, run_dir: Path, *, workers: int, parser: str = "httptools",
                 grace: float = 30.0, listen: Sequence[str] = ("0.0.0.0:8080",),
                 dedicated_host: str | None = None,
                 settings: ServerSettings = ServerSettings(),  # noqa: B008 (frozen)
                 tls_listen: Sequence[str] = ()) -> None:
        if workers < 1:
            raise ValueError("a proxy driver needs at least one worker")
        self.run_dir = Path(run_dir)
        self.parser = parser
        self.grace = grace
        self.listeners = tuple(
            Listener(host=h, port=p) for h, p in
            (parse_address(a, source="ProxyDriver", key="listen") for a in listen)) + tuple(
            Listener(host=h, port=p, tls=True) for h, p in
            (parse_address(a, source="ProxyDriver", key="tls_listen") for a in tls_listen))
        self.dedicated_host = dedicated_host or (self.listeners[0].host if self.listeners
                                                 else "0.0.0.0")
        self.settings = settings
        self.workers = WorkerSet([str(self.run_dir / f"proxy-{i}.sock") for i in range(workers)],
                                 name="proxy worker")
        self.slots = self.workers.slots
        self.snapshot = RoutingSnapshot(version=0, listeners=(), apps=(), settings=settings)
        self.offline = False
        self.draining: set[str] = set()
        self._next_version = 1
        self._lock = trio.Lock()  # serialises snapshot pushes, worker replacement, proxy.json
        for slot in self.slots:
            if len(os.fsencode(slot.control_path)) > SUN_PATH_MAX:
                raise ProxyDriverError(f"control socket path too long for a Unix socket: "
                                       f"{slot.control_path}", worker=slot.index)

    def __repr__(self) -> str:
        pids = ",".join(str(s.pid) if s.running else "-" for s in self.slots)
        flags = " offline" if self.offline else ""
        return (f"<ProxyDriver v{self.snapshot.version} workers=[{pids}]"
                f" draining={len(self.draining)}{flags} run_dir={self.run_dir}>")

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    # ------------------------------------------------------------------ start / stop
    async def start(self) -> None:
        """Adopt the recorded workers still serving, spawn the missing, restore routing.

        Raises ProxyDriverError when a replacement does not start or refuses the snapshot.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = self._read_state()
        recorded = {int(w["index"]): w for w in record.get("workers", [])
                    if isinstance(w, dict) and "index" in w}
        async with self._lock:
            versions: dict[int, int | None] = {}
            for slot in self.slots:
                entry = recorded.pop(slot.index, None)
                if entry is not None and entry.get("control") == slot.control_path:
                    versions[slot.index] = await self._adopt(slot, entry)
            for entry in recorded.values():  # the node had more workers before: retire them
                await _retire(entry)
            # An agent that died mid-apply may have left some workers on a newer version
            # than the record: the next version must be above anything a worker has seen.
            seen = [v for v in versions.values() if v is not None]
            self._next_version = max([self._next_version, *(v + 1 for v in seen)])
            missing = [slot for slot in self.slots if not slot.running]
            try:
                await self._spawn_all(missing)
            finally:
                self._write_state()  # record whatever runs, so a retry adopts it
            for slot in self.slots:
                if slot in missing or versions.get(slot.index) != self.snapshot.version:
                    await self._bring_up_to_date(slot)
            self._write_state()
        log.info("proxy workers ready", driver=repr(self), slots=[repr(s) for s in self.slots])

    async def _adopt(self, slot: WorkerSlot, entry: dict[str, Any]) -> int | None:
        """Take over a recorded worker if it is alive and answers; returns its version."""
        pid, created = entry.get("pid"), entry.get("create_time")
        if not isinstance(pid, int) or not isinstance(created, int | float):
            return None
        try:
            adopted = _AdoptedWorker.open(pid, float(created))
        except AdoptionFailed as exc:
            log.info("recorded proxy worker is gone", worker=slot.index, pid=pid,
                     reason=exc.reason)
            return None
        try:
            reply = await control.call(slot.control_path, {"type": "ping"}, timeout=PING_TIMEOUT)
            if reply.get("pid") != pid:
                raise control.ControlError(f"another process ({reply.get('pid')}) answers")
        except control.ControlError as exc:
            log.warning("recorded proxy worker is alive but silent; killing it",
                        worker=slot.index, pid=pid, error=str(exc))
            await kill([adopted], reap_timeout=KILL_MARGIN)
            return None
        slot.process, slot.create_time = adopted, adopted.create_time
        log.info("adopted proxy worker", worker=slot.index, pid=pid, version=reply.get("version"))
        version = reply.get("version")
        return version if isinstance(version, int) else None

    async def _spawn_all(self, slots: Sequence[WorkerSlot]) -> None:
        """Spawn concurrently (each waits for its ready line); raises the first failure."""
        failures: list[ProxyDriverError] = []

        async def one(slot: WorkerSlot) -> None:
            try:
                await self._spawn(slot)
            except ProxyDriverError as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            for slot in slots:
                nursery.start_soon(one, slot)
        if failures:
            raise min(failures, key=lambda e: e.worker or 0)

    async def _spawn(self, slot: WorkerSlot) -> None:
        out = os.open(self.run_dir / ACCESS_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        err = os.open(self.run_dir / f"proxy-{slot.index}.log",
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            proc = await spawn_worker(slot.control_path, parser=self.parser, grace=self.grace,
                                      stdout=out, stderr=err, new_session=True)
        except WorkerStartError as exc:
            raise ProxyDriverError(str(exc), worker=slot.index, reason="not ready") from None
        finally:
            os.close(out)
            os.close(err)
        slot.process = proc
        try:
            slot.create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            slot.create_time = 0.0  # it died already: supervise() will see it
        log.info("spawned proxy worker", worker=slot.index, pid=proc.pid)

    async def _bring_up_to_date(self, slot: WorkerSlot) -> None:
        """Give a (re)started or stale worker the current snapshot, drain marks, node flag."""
        try:
            if self.snapshot.version > 0:
                await push_snapshot(slot.control_path, snapshot_to_wire(self.snapshot))
            for instance in sorted(self.draining):
                await control.call(slot.control_path, {"type": "drain", "instance": instance,
                                                       "draining": True}, timeout=CONTROL_TIMEOUT)
            await control.call(slot.control_path, {"type": "node", "draining": self.offline},
                               timeout=CONTROL_TIMEOUT)
        except (control.ControlError, ConfigError) as exc:
            raise ProxyDriverError(f"proxy worker {slot.index} refused the current routing: "
                                   f"{exc}", worker=slot.index, reason=str(exc)) from None

    async def stop(self) -> None:
        """SIGTERM every worker (adopted ones too), SIGKILL any still there after the grace
        period plus ``KILL_MARGIN``, and clear the worker records."""
        with trio.CancelScope(shield=True):
            await self.workers.stop(grace=self.grace + KILL_MARGIN, reap_timeout=KILL_MARGIN)
            for slot in self.slots:
                slot.process = None
            async with self._lock:  # after any write under way
                self._write_state()
        log.info("proxy workers stopped")

    # ------------------------------------------------------------------ supervision
    async def supervise(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                        ) -> None:
        """Restart any worker that dies (with backoff) and bring it up to date; runs until
        cancelled or ``stop()``. Cancelling it leaves the workers running."""
        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(self.workers.supervise, slot, self._restart)
            task_status.started()

    async def _restart(self, slot: WorkerSlot) -> None:
        """Replace a dead worker and bring it up to date; a failure is logged and the new
        worker killed, so the next round of ``WorkerSet.supervise`` starts it afresh."""
        async with self._lock:
            if self.workers.stopping:
                return
            try:
                await self._spawn(slot)
                await self._bring_up_to_date(slot)
            except ProxyDriverError as exc:
                log.error("proxy worker restart failed", worker=slot.index, error=str(exc))
                if slot.process is not None and slot.running:
                    with contextlib.suppress(ProcessLookupError):
                        slot.process.send_signal(signal.SIGKILL)
            self._write_state()

    # ------------------------------------------------------------------ routing
    def build(self, apps: Sequence[AppRoute], version: int) -> RoutingSnapshot:
        """The snapshot for ``apps``: the shared listeners plus each dedicated port."""
        dedicated = tuple(Listener(host=self.dedicated_host, port=app.port, app=app.name)
                          for app in apps if app.port is not None)
        return RoutingSnapshot(version=version, listeners=self.listeners + dedicated,
                               apps=tuple(apps), settings=self.settings)

    async def apply(self, apps: Sequence[AppRoute]) -> int:
        """Route ``apps``; returns the new version once every running worker acknowledged it.

        Raises ProxyDriverError naming the first worker that refused (and why); the workers
        that accepted are rolled back and the previous version stays current.
        """
        async with self._lock:
            snapshot = self.build(apps, self._next_version)
            self._next_version += 1
            wire = snapshot_to_wire(snapshot)
            outcomes = await self.workers.push(wire)
            acked = [o.slot for o in outcomes if o.ok]
            refusals = [(o.slot.index, o.error or "") for o in outcomes if not o.ok]
            if refusals:
                await self._roll_back(acked)
                index, reason = min(refusals)
                raise ProxyDriverError(f"proxy worker {index} refused routing snapshot "
                                       f"v{snapshot.version}: {reason}; v{self.snapshot.version}"
                                       " stays in force", worker=index, reason=reason)
            self.snapshot = snapshot
            self.draining &= snapshot.instance_ids()
            await self._save_state()
        log.info("routing applied", version=snapshot.version, apps=len(snapshot.apps),
                 workers=len(acked))
        return snapshot.version

    async def _roll_back(self, slots: list[WorkerSlot]) -> None:
        if self.snapshot.version == 0 or not slots:
            return
        for outcome in await self.workers.push(snapshot_to_wire(self.snapshot), slots):
            if not outcome.ok:
                log.error("proxy worker refused the roll-back", worker=outcome.slot.index,
                          error=outcome.error, version=self.snapshot.version)

    # ------------------------------------------------------------------ drain
    async def drain(self, instance_ids: Sequence[str], *, grace: float) -> dict[str, int]:
        """Stop sending new requests to ``instance_ids``; wait (at most ``grace`` seconds)
        until none has a request or tunnel in flight. Returns what is still in flight per
        instance (all 0 on a clean drain). Instances the snapshot no longer routes (switched
        away from) are waited for too: workers report them as retiring while their requests
        finish. Raises ProxyDriverError when a worker refuses the mark."""
        known = [i for i in instance_ids if i in self.snapshot.instance_ids()]
        await self._mark(known, draining=True)
        remaining = dict.fromkeys(instance_ids, 0)

        async def count() -> bool:
            instances = (await self.stats())["instances"]
            for i in instance_ids:  # unrouted ones too: they finish as "retiring"
                remaining[i] = int(instances.get(i, {}).get("in_flight", 0))
            return not any(remaining.values())

        pauses = Backoff(DRAIN_POLL_FIRST, DRAIN_POLL)
        with trio.move_on_after(grace) as scope:
            while not await count():
                await trio.sleep(pauses.next())
        if scope.cancelled_caught:
            await count()  # the figures as the grace period ran out, even a zero one
        log.info("drained", instances=list(instance_ids), remaining=remaining)
        return remaining

    async def undrain(self, instance_ids: Sequence[str]) -> None:
        """Route new requests to ``instance_ids`` again; raises ProxyDriverError."""
        known = [i for i in instance_ids if i in self.snapshot.instance_ids()]
        await self._mark(known, draining=False)

    async def _mark(self, instance_ids: Sequence[str], *, draining: bool) -> None:
        async with self._lock:
            if draining:
                self.draining.update(instance_ids)
            else:
                self.draining.difference_update(instance_ids)
            try:  # the workers first: the record's write (an fsync) need not hold them up
                for instance in instance_ids:
                    await self._broadcast({"type": "drain", "instance": instance,
                                           "draining": draining})
            finally:
                with trio.CancelScope(shield=True):  # recorded even when cancelled
                    await self._save_state()

    async def set_offline(self, offline: bool) -> None:
        """Node-level drain: every worker's ``/-/healthz`` answers 503 while offline."""
        async with self._lock:
            self.offline = offline
            try:
                await self._broadcast({"type": "node", "draining": offline})
            finally:
                with trio.CancelScope(shield=True):
                    await self._save_state()
        log.info("node offline" if offline else "node online")

    async def stats(self) -> dict[str, Any]:
        """Figures of every answering worker, merged (``superagent.proxy.metrics.merge``),
        plus ``workers``: how many answered."""
        merged, answered = await self.workers.stats()
        merged["workers"] = answered
        return merged

    async def _broadcast(self, message: dict[str, Any]) -> None:
        """Send ``message`` to every running worker; raises ProxyDriverError on a refusal."""
        refusals = [(o.slot.index, o.error or "") for o in await self.workers.call(message)
                    if not o.ok]
        if refusals:
            index, reason = min(refusals)
            raise ProxyDriverError(f"proxy worker {index} refused {message['type']}: {reason}",
                                   worker=index, reason=reason)

    # ------------------------------------------------------------------ proxy.json
    def _read_state(self) -> dict[str, Any]:
        """Load the hand-over record and restore routing from it; {} when there is none."""
        try:
            record = json.loads(self.state_path.read_text())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            document = record.get("snapshot")
            if document:
                self.snapshot = snapshot_from_wire(document)
            self._next_version = max(int(record.get("version", 0)), self.snapshot.version) + 1
            self.offline = bool(record.get("offline", False))
            self.draining = {str(i) for i in record.get("draining", [])}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, ConfigError) as exc:
            log.warning("unusable proxy record; starting without it", path=str(self.state_path),
                        error=str(exc))
            return {}
        return record

    def _write_state(self) -> None:
        """Write proxy.json atomically (tmp + fsync + rename): a crash leaves old or new.
        Called with ``_lock`` held (or before anything else runs), as ``_save_state``."""
        self._write_file(self._state_text())

    async def _save_state(self) -> None:
        """``_write_state`` with the write and its fsync in a thread: the event loop goes on
        (a cold start's held requests are released already, a rollback's other node's
        signals are not held up). Called with ``_lock`` held, so writes never overlap."""
        await trio.to_thread.run_sync(self._write_file, self._state_text())

    def _state_text(self) -> str:
        record = {
            "workers": [_record(s) for s in self.slots if s.running],
            "version": self.snapshot.version,
            "snapshot": snapshot_to_wire(self.snapshot) if self.snapshot.version else None,
            "offline": self.offline,
            "draining": sorted(self.draining),
        }
        return json.dumps(record, indent=1)

    def _write_file(self, text: str) -> None:
        tmp = self.state_path.with_name(STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)


def _record(slot: WorkerSlot) -> dict[str, Any]:
    """What proxy.json keeps of a running worker, for the next agent to adopt it."""
    return {"index": slot.index, "pid": slot.pid, "create_time": slot.create_time,
            "control": slot.control_path}


def _same_process(pid: int, create_time: float) -> bool:
    """True when ``pid`` is alive (not a zombie) and started at ``create_time``."""
    try:
        proc = psutil.Process(pid)
        return bool(abs(proc.create_time() - create_time) < CREATE_TIME_SLACK
                    and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _reap_if_child(pid: int | None) -> None:
    """Collect the exit status when an adopted worker happens to be our own child (only
    when the previous driver lived in this same process, as in tests)."""
    if pid is None:
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


async def _retire(entry: dict[str, Any]) -> None:
    """SIGTERM a recorded worker the node no longer wants, if it is still the same process."""
    pid, created = entry.get("pid"), entry.get("create_time")
    if isinstance(pid, int) and isinstance(created, int | float) and \
            _same_process(pid, float(created)):
        log.info("retiring surplus proxy worker", pid=pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
