"""The participant agent: releases, instances, the proxy and logs behind the RPC.

``Agent`` implements the RPC's ``AgentService``. It owns

- the release store (``releases``: prepare = verify, unpack safely, build as the app's user),
- one ``supervisor.Instance`` per running instance, each on a port from ``ports``,
- the proxy workers through ``proxydriver.ProxyDriver``: ``switch`` (and ``stop``) say
  which instances an app's routes point at; of those, a snapshot carries only the ones
  serving right now (ready, or failing fewer checks than the restart threshold), so an
  instance the supervisor restarts is out of the routes until it is ready again. A
  snapshot counts as applied once every worker acknowledged it,
- the log hub following every instance's output files,
- the signal ledger (term fencing, idempotent results),

- with ``coordinator`` URLs, the ``joiner.CoordinatorLink`` (``Agent.link``) that registers
  the node, heartbeats a compact status and fetches release artifacts for ``prepare``
  signals (into ``<data_dir>/downloads``, removed once the release is prepared),

and persists what a restarted agent needs in ``<data_dir>/state.json`` (written
atomically after every change, a supervisor's restart of an instance included). Apps and
proxy workers do not depend on the agent process: when it stops or dies they keep
serving, and a new agent on the same data directory re-adopts them (instances by pid and
start time, workers by their control sockets) instead of restarting them. An instance
whose process is gone by then (or was between restarts) is started afresh with the same
id and port, after a SIGKILL of whatever is left in its cgroup. ``stop_all`` ends
everything, for a node that is being taken away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from superagent import codec
from superagent.compiled import describe as describe_hot_path
from superagent.config import parse_address
from superagent.debug import DROPPED_NOTE, DebugSessions, LogFilter
from superagent.httpserver import check_bindable, serve_app
from superagent.manifest import TEST_TIMEOUT, PermissionsSpec
from superagent.participant.archive import check as check_archive
from superagent.participant.cgroups import (
    PARENT_GROUP,
    AgentCgroup,
    InstanceCgroup,
    detect_cgroups,
    remove_empty_parent,
)
from superagent.participant.errors import (
    AdoptionFailed,
    CoordinatorError,
    InstanceNotReady,
    ParticipantError,
    StartFailed,
    SupervisorError,
    UnknownInstance,
    UnknownRelease,
)
from superagent.participant.figures import cpu_seconds, node_figures, process_figures
from superagent.participant.idle import ActivityWatch, ColdApp, Event, Phase, app_counts
from superagent.participant.isolation import AppUser, ensure_app_user
from superagent.participant.joiner import CoordinatorLink
from superagent.participant.load import LOAD_PERIOD, LoadSampler, traffic
from superagent.participant.logs import LogHub
from superagent.participant.permissions import (
    EGRESS_CHECK_PERIOD,
    EGRESS_TABLE,
    LOOPBACK_GROUP,
    PermissionSupport,
    detect_permissions,
    restore_egress_table,
    unenforced,
)
from superagent.participant.ports import (
    DEFAULT_HIGH,
    DEFAULT_LOW,
    PortAllocator,
    ephemeral_overlap,
)
from superagent.participant.proxydriver import ACCESS_LOG, ProxyDriver
from superagent.participant.releases import DEFAULT_KEEP, ReleaseStore
from superagent.participant.rpc import rpc_app
from superagent.participant.signals import SignalLedger
from superagent.participant.supervisor import (
    GROUP_POLL,
    REAP_TIMEOUT,
    Instance,
    InstanceConfig,
    State,
)
from superagent.proxy.control import serve_control
from superagent.proxy.metrics import BUCKETS
from superagent.proxy.snapshot import AppRoute, ColdStart, ServerSettings, Timeouts
from superagent.proxy.snapshot import Instance as RouteInstance
from superagent.rpc import messages as msg
from superagent.rpc.credentials import CREDENTIAL_FILE, read_credential, signal_key

STATE_FILE = "state.json"
STATE_VERSION = 1
IDLE_TICK = 1.0  # seconds between looks at the proxy's figures for apps that scale to zero
HOLD_QUEUE = 256  # requests each proxy worker holds per app during its cold start
HOLD_MARGIN = 5.0  # seconds a held request waits beyond the app's ready deadline
WAKE_SOCKET = "wake.sock"  # in the proxy's run directory: workers ask for cold starts here
log = structlog.get_logger("superagent.participant")


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentConfig:
    """Settings of ``superagent participant``."""

    data_dir: Path
    secret: str = ""  # the legacy shared secret of a cluster in migration ("": none)
    join_token: str = ""  # enrols the machine once; then <data_dir>/credential is used
    node: str = socket.gethostname()
    rpc: tuple[str, int] = ("127.0.0.1", 7001)
    listen: tuple[str, ...] = ("0.0.0.0:8080",)
    proxy_workers: int = 1
    parser: str = "httptools"
    groups: tuple[str, ...] = ("default",)
    ports: tuple[int, int] = (DEFAULT_LOW, DEFAULT_HIGH)
    keep_releases: int = DEFAULT_KEEP  # when the coordinator names no releases to keep
    drain_grace: float = 30.0  # in-flight requests get this long before an instance stops
    coordinator: tuple[str, ...] = ()  # coordinator API URLs; empty: no cluster to join
    advertise: str | None = None  # HOST:PORT coordinators reach the RPC at (default: rpc)
    capacity: int = 100  # instances this node offers the scheduler
    # Front load balancers whose X-Forwarded-For/-Proto/-Host the proxy appends to rather
    # than replaces, so apps see the client and not the balancer (networks, "10.0.0.0/8").
    trusted_proxies: tuple[str, ...] = ()
    heartbeat_interval: float = 1.0  # seconds between heartbeats to the coordinator
    tls_listen: tuple[str, ...] = ()  # proxy listeners that speak TLS (docs/proxy-config.md)
    tls_cert: str | None = None  # their PEM certificate chain, an absolute path
    tls_key: str | None = None  # its PEM private key (None: in the tls_cert file)
    # Move the agent and its proxy workers into the cpu group weighted above the apps
    # (cgroups.AgentCgroup). ``superagent participant`` does; an agent embedded in another
    # process (tests) leaves that process where it is.
    agent_cgroup: bool = False
    # [permissions]: the group of loopback-only instances and the nftables table keyed on it
    # (host-wide; tests pass their own names)
    loopback_group: str = LOOPBACK_GROUP
    egress_table: str = EGRESS_TABLE


class Agent:
    """The agent of one machine (see the module docstring)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        # Which the proxy workers this agent starts run, for `superagent status`: fixed
        # by the installation (pip's build or scripts/compile-proxy), so read once.
        self.hot_path = describe_hot_path()
        data = config.data_dir
        self.store = ReleaseStore(data / "releases", keep=config.keep_releases)
        listener_ports = [parse_address(a, source="participant", key="listen")[1]
                          for a in (*config.listen, *config.tls_listen)]
        self.ports = PortAllocator(*config.ports, reserved=listener_ports,
                                   start=int(hashlib.sha256(config.node.encode()).hexdigest(),
                                             16))
        self.proxy = ProxyDriver(data / "proxy", workers=config.proxy_workers,
                                 parser=config.parser, listen=config.listen,
                                 tls_listen=config.tls_listen,
                                 settings=ServerSettings(
                                     trusted_proxies=tuple(ipaddress.ip_network(n)
                                                           for n in config.trusted_proxies),
                                     tls_cert=config.tls_cert, tls_key=config.tls_key))
        self.log_hub = LogHub()
        # one parent group per node name, so two agents on one machine never share a group
        self.cgroups = (detect_cgroups(parent=f"{PARENT_GROUP}.{config.node}")
                        if os.geteuid() == 0 else None)
        self.agent_group: AgentCgroup | None = None
        # detected when the first instance asks for a permission: an agent whose apps ask
        # for none never touches nftables or groups
        self.permissions: PermissionSupport | None = None
        self.ledger = SignalLedger()
        self.instances: dict[str, Instance] = {}
        self.routes: dict[str, list[str]] = {}  # app -> the instances switch() routed
        self._applied: list[AppRoute] | None = None  # the apps of the last snapshot applied
        self._routes_lock = trio.Lock()
        self._routes_stale = trio.Event()  # a routed instance started or stopped serving
        # app -> the instances its last switch replaced, still warm until stopped: the
        # proxy's standbys, which serve when no routed instance can (a new release that
        # dies right after its switch costs no request, and no coordinator round trip)
        self.standby: dict[str, list[str]] = {}
        # apps scaled to zero here (``idle.py``): routed with no instance, started on demand
        self.cold: dict[str, ColdApp] = {}
        self.activity = ActivityWatch()
        self.idle_ids: set[str] = set()  # instance ids stopped for idleness: stop is a no-op
        self._cold_users: dict[str, AppUser] = {}  # app -> its user, as its last start found
        self._owned: set[tuple[str, str]] = set()  # (app, release) given to the app's user
        self.is_offline = False
        self.closing = False  # stop_all began: no more starts
        # a request is traced when its own timestamp falls in its app's window, however
        # late the proxy's batched record is read (see debug.sessions)
        self.debug_sessions = DebugSessions()
        self.load = LoadSampler()  # per-instance in-flight and CPU, for the heartbeat
        self.traffic: dict[str, Any] = {}  # the proxy's counters per app, for the heartbeat
        self._seq = 0
        self._nursery: trio.Nursery | None = None
        self.link: CoordinatorLink | None = None
        if config.coordinator:
            host, port = config.rpc
            self.link = CoordinatorLink(
                list(config.coordinator), secret=config.secret, node=config.node,
                address=config.advertise or f"{host}:{port}", groups=config.groups,
                capacity=config.capacity, status=self.coordinator_status,
                interval=config.heartbeat_interval, join_token=config.join_token,
                credential_file=data / CREDENTIAL_FILE)
        self._credential = read_credential(data / CREDENTIAL_FILE)  # without a link

    @property
    def wake_path(self) -> Path:
        return self.proxy.run_dir / WAKE_SOCKET

    def signal_keys(self) -> list[str]:
        """The keys a coordinator's signal may bear: the one derived from this machine's
        credential (see ``superagent.rpc.credentials``)."""
        credential = self.link.credential if self.link is not None else self._credential
        return [signal_key(credential)] if credential else []

    def __repr__(self) -> str:
        return (f"<Agent node={self.config.node} instances={len(self.instances)}"
                f" routed={sorted(self.routes)} offline={self.is_offline}>")

    # ------------------------------------------------------------------ lifecycle
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Adopt what a previous agent left running, serve the RPC until cancelled.

        Cancelling leaves apps and proxy workers running (see the module docstring).
        """
        # Tenants' processes traverse releases/ and homes/ to reach their own directory;
        # logs and the proxy's state are the agent's alone.
        for sub, mode in (("releases", 0o755), ("homes", 0o711), ("logs", 0o700),
                          ("proxy", 0o700), ("downloads", 0o700)):
            path = self.config.data_dir / sub
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(mode)
        saved = self._load_state()
        overlap = ephemeral_overlap(*self.config.ports)
        if overlap is not None:
            log.warning("instance ports overlap the kernel's ephemeral range: outgoing"
                        " connections may hold some for a while; reserve them with"
                        " sysctl net.ipv4.ip_local_reserved_ports",
                        ports=f"{overlap[0]}-{overlap[1]}")
        # a taken RPC port fails before proxy workers are spawned (they would outlive us)
        check_bindable(self.config.rpc, key="--rpc")
        if self.link is not None:  # a new machine: before anything runs (raises if refused)
            await self.link.enrol()
        if self.config.agent_cgroup and self.cgroups is not None:
            # before the workers start: they inherit the group
            self.agent_group = await trio.to_thread.run_sync(AgentCgroup.create, self.cgroups)
            self.store.build_cgroup = self.agent_group.builds  # builds: an app's weight
            self._join_agent_group(os.getpid())
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.proxy.start()
            for slot in self.proxy.slots:  # adopted workers of an earlier agent, too
                if slot.process is not None and slot.process.pid is not None:
                    self._join_agent_group(slot.process.pid)
            await nursery.start(self.proxy.supervise)
            self.log_hub.add_proxy_events(self.proxy.run_dir / ACCESS_LOG,
                                          wanted=self.debug_sessions.covers,
                                          release_of=self._release_of)
            await nursery.start(self.log_hub.run)
            await nursery.start(self.debug_sessions.run, lambda _ended: self.persist())
            nursery.start_soon(self._keep_routes)
            nursery.start_soon(self._sample_load)
            nursery.start_soon(self._keep_egress_table)
            await nursery.start(serve_control, str(self.wake_path), self._on_wake)
            nursery.start_soon(self._watch_idle)
            for doc in saved.get("cold", []):
                with contextlib.suppress(KeyError, ValueError, TypeError):
                    cold = ColdApp.from_json(doc)
                    self.cold[cold.app] = cold
                    self.idle_ids.update(cold.ids)
            for record in saved.get("instances", []):
                await self._adopt(record)
            self.routes = {app: [i for i in ids if i in self.instances]
                           for app, ids in saved.get("routes", {}).items()}
            self.standby = {app: [i for i in ids if i in self.instances]
                            for app, ids in saved.get("standby", {}).items()}
            if self.is_offline:
                await self.proxy.set_offline(True)
            await self._apply_routes()
            self.persist()
            await nursery.start(serve_app, rpc_app(self, secret=self.config.secret,
                                                   keys=self.signal_keys,
                                                   ledger=self.ledger), self.config.rpc)
            log.info("participant ready", node=self.config.node,
                     rpc=f"{self.config.rpc[0]}:{self.config.rpc[1]}",
                     listen=list(self.config.listen), instances=len(self.instances),
                     cgroups=self.cgroups.mode if self.cgroups else "not root")
            if self.link is not None:  # reports started at once; joins in the background
                await nursery.start(self.link.run)
            task_status.started()
            await trio.sleep_forever()

    async def _permission_support(self, wanted: PermissionsSpec) -> PermissionSupport | None:
        if self.permissions is None and wanted != PermissionsSpec():
            self.permissions = await trio.to_thread.run_sync(functools.partial(
                detect_permissions, group=self.config.loopback_group,
                table=self.config.egress_table))
        return self.permissions

    async def _keep_egress_table(self) -> None:
        """A firewall reload drops the nftables egress table: put it back (permissions)."""
        while True:
            await trio.sleep(EGRESS_CHECK_PERIOD)
            if self.permissions is not None and self.permissions.loopback_gid is not None:
                await trio.to_thread.run_sync(restore_egress_table, self.permissions)

    def _join_agent_group(self, pid: int) -> None:
        if self.agent_group is not None:
            problem = self.agent_group.add(pid)
            if problem is not None:
                log.warning("process not in the agent's cpu group", pid=pid, reason=problem)

    async def stop_all(self) -> None:
        """Stop every instance (draining first) and the proxy workers: the node goes away.
        From now on a start is refused: the coordinators' reconciler, seeing the instances
        go, would otherwise start new ones that outlive the agent."""
        self.closing = True
        await self.proxy.set_offline(True)
        if self.instances:
            await self.stop(list(self.instances), None)
        await self.proxy.stop()
        if self.agent_group is not None:  # its workers are gone: nothing else is in it
            await trio.to_thread.run_sync(self.agent_group.leave)
        if self.cgroups is not None:
            await trio.to_thread.run_sync(remove_empty_parent, self.cgroups)
        self.persist()

    async def _adopt(self, record: dict[str, Any]) -> None:
        """Supervise again the instance a previous agent recorded: its process when it
        still runs, else a fresh one with the same id and port (started in the
        background, so one slow app does not hold up the agent's start)."""
        assert self._nursery is not None
        try:
            config = InstanceConfig.from_record(record["config"], cgroups=self.cgroups)
            wanted = PermissionsSpec(network=config.network, filesystem=config.filesystem)
            config = dataclasses.replace(config,
                                         permission_support=await self._permission_support(wanted))
        except (KeyError, ValueError, TypeError) as exc:
            log.error("unreadable instance record; it will not be served", error=str(exc),
                      record=record.get("config", {}).get("instance"))
            return
        self.ports.adopt(config.port)
        try:
            if record.get("pid") is None:
                raise AdoptionFailed("no process was running", pid=0,
                                     instance=config.instance)
            instance = Instance.adopt(config, pid=int(record["pid"]),
                                      create_time=float(record["create_time"]))
        except (AdoptionFailed, KeyError, ValueError, TypeError) as exc:
            log.warning("instance not adopted; starting it afresh", error=str(exc),
                        instance=config.instance)
            if config.cgroups is not None:  # a process nobody recorded may hold the port
                await _empty_cgroup(InstanceCgroup.existing(config.cgroups, config.app,
                                                            config.instance))
            instance = Instance(config)
            self._add(instance, from_start=False)  # the old process's output is not replayed
            self._nursery.start_soon(self._supervise, instance)
            return
        self._add(instance, from_start=False)
        try:
            await self._nursery.start(self._supervise, instance)
        except SupervisorError as exc:
            self._forget(instance)
            log.warning("adopted instance did not become ready", error=str(exc),
                        instance=config.instance)
            return
        log.info("instance adopted", instance=config.instance, pid=record["pid"])

    def _add(self, instance: Instance, *, from_start: bool) -> None:
        """Track ``instance``: its changes are persisted and may change the routes."""
        config = instance.config
        self.instances[config.instance] = instance
        instance.on_change = self._instance_changed
        self.log_hub.add(config.app, config.release, config.instance, config.out_log,
                         config.err_log, from_start=from_start)

    def _forget(self, instance: Instance) -> None:
        """Stop tracking ``instance`` (stopped, or failed to start) unless already done."""
        config = instance.config
        if self.instances.get(config.instance) is instance:
            del self.instances[config.instance]
            self.ports.release(config.port)
            self.log_hub.remove(config.instance)
            self._unroute({config.instance})  # no route names what is gone

    def _unroute(self, gone: set[str]) -> bool:
        """Take ``gone`` out of every app's routes and standbys; True if any was there."""
        changed = False
        for table in (self.routes, self.standby):
            for app, ids in table.items():
                kept = [i for i in ids if i not in gone]
                if kept != ids:
                    table[app] = kept
                    changed = True
        return changed

    async def _supervise(self, instance: Instance, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        """``instance.run``, whose failures before it is ready go to the starter (through
        ``nursery.start``) and after it to the log: one instance never takes the agent
        down."""
        started = _Started(task_status)
        try:
            await instance.run(task_status=started)
        except SupervisorError as exc:  # IsolationError is one too
            if not started.done:
                if task_status is not trio.TASK_STATUS_IGNORED:
                    raise  # the starter forgets the instance
                self._forget(instance)  # a fresh start of a lost instance failed
                self.persist()
                self._routes_stale.set()
            log.error("instance supervision ended", instance=instance.config.instance,
                      error=str(exc))

    def _instance_changed(self, instance: Instance) -> None:
        """A state or process change: persist the pid; wake the route keeper when the
        instance is routed."""
        instance_id = instance.config.instance
        if self.instances.get(instance_id) is not instance:
            return
        self.persist()
        if any(instance_id in ids for ids in (*self.routes.values(), *self.standby.values())):
            self._routes_stale.set()

    async def _keep_routes(self) -> None:
        """Re-apply the routes whenever a routed instance starts or stops serving."""
        while True:
            await self._routes_stale.wait()
            self._routes_stale = trio.Event()
            try:
                await self._apply_routes()
            except ParticipantError as exc:
                log.error("routes not applied after an instance changed", error=str(exc))

    # ------------------------------------------------------------------ state
    def _load_state(self) -> dict[str, Any]:
        path = self.config.data_dir / STATE_FILE
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ParticipantError(f"cannot read {path}: {exc}") from None
        self.ledger = SignalLedger.from_json(doc.get("ledger", {}))
        self._seq = int(doc.get("seq", 0))
        self.is_offline = bool(doc.get("offline", False))
        self.debug_sessions.load(doc.get("debug", {}))
        return doc

    def persist(self) -> None:
        """Write state.json atomically (temp file, fsync, rename)."""
        doc = {
            "version": STATE_VERSION, "node": self.config.node, "seq": self._seq,
            "offline": self.is_offline, "routes": self.routes, "standby": self.standby,
            "cold": [cold.to_json() for cold in self.cold.values()],
            "ledger": self.ledger.to_json(),
            "debug": self.debug_sessions.to_json(),
            "instances": [inst.to_record() for inst in self.instances.values()],
        }
        path = self.config.data_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # ------------------------------------------------------------------ signals
    async def prepare(self, app: str, release: str, archive: Path, sha256: str,
                      keep: tuple[str, ...] = ()) -> msg.PrepareReply:
        """Prepare the release, then remove the app's releases no longer wanted: those not
        in use and not in ``keep`` (the coordinator's retention), or beyond the newest
        few when the coordinator named none.

        A new archive is checked before anything is made for it: a refused one never
        creates the app's system user."""
        if not self._prepared_from(app, release, sha256):
            await trio.to_thread.run_sync(partial(
                check_archive, archive, max_bytes=self.store.max_bytes,
                max_files=self.store.max_files))
        user = await self._user(app)
        prepared = await self.store.prepare(
            app, release, archive, sha256,
            uid=user.uid if user and user.switched else None,
            gid=user.gid if user and user.switched else None)
        in_use = {inst.config.release for inst in self.instances.values()
                  if inst.config.app == app} | {release}
        if app in self.cold:  # an idle app's release is in use: a request starts it
            in_use.add(self.cold[app].release)
        removed = await trio.to_thread.run_sync(
            partial(self.store.gc, app, in_use, wanted=set(keep) or None))
        if removed:
            log.info("old releases removed", app=app, releases=removed)
        return msg.PrepareReply(app=app, release=release, sha256=prepared.sha256,
                                build_log=str(prepared.build_log),
                                removed_releases=tuple(removed))

    async def prepare_artifact(self, app: str, release: str, sha256: str,
                               keep: tuple[str, ...] = ()) -> msg.PrepareReply:
        """``prepare`` from the artifact ``sha256`` fetched from the coordinators.

        A release already prepared from that archive is returned without a download.
        Raises CoordinatorError (409) without a link, ArtifactUnavailable, or what
        ``prepare`` raises; the downloaded file is removed in every case.
        """
        if self.link is None:
            raise CoordinatorError("this agent has no coordinator to fetch artifacts from"
                                   " (started without --coordinator): upload the archive",
                                   app=app, release=release)
        dest = self.config.data_dir / "downloads" / f"artifact-{secrets.token_hex(8)}.tar"
        try:
            if self._prepared_from(app, release, sha256):
                # ReleaseStore.prepare answers a same-archive repeat without reading it
                return await self.prepare(app, release, dest, sha256, keep)
            try:
                await self.link.fetch_artifact(sha256, dest)
            except ParticipantError as exc:
                raise exc.bind(app=app, release=release) from None
            return await self.prepare(app, release, dest, sha256, keep)
        finally:
            dest.unlink(missing_ok=True)

    def _prepared_from(self, app: str, release: str, sha256: str) -> bool:
        """Whether ``app@release`` is prepared from the archive ``sha256`` (a repeat)."""
        with contextlib.suppress(UnknownRelease):  # InvalidName goes to the caller
            return self.store.get(app, release).sha256 == sha256
        return False

    async def test(self, app: str, release: str, timeout: float = TEST_TIMEOUT
                   ) -> msg.TestReply:
        """Run the prepared release's ``[test] command`` as the app's user (with a scratch
        HOME removed afterwards); a failing test is a result with ``ok`` false."""
        prepared = self.store.get(app, release)
        if prepared.spec.test.command is None:
            return codec.decode(msg.TestReply, (await self.store.test(app, release)).to_json())
        user = await self._user(app)
        uid, gid = (user.uid, user.gid) if user is not None and user.switched else (None, None)
        if uid is not None and gid is not None:
            await trio.to_thread.run_sync(self.store.ensure_owner, prepared, uid, gid)
        home = self.config.data_dir / "homes" / f"test-{app}@{release}.{secrets.token_hex(4)}"
        home.mkdir(mode=0o700, parents=True)
        try:
            if uid is not None and gid is not None:
                os.chown(home, uid, gid)
            result = await self.store.test(app, release, uid=uid, gid=gid, home=home,
                                           timeout=timeout)
        finally:
            await trio.to_thread.run_sync(partial(shutil.rmtree, home, ignore_errors=True))
        return codec.decode(msg.TestReply, result.to_json())

    async def start(self, app: str, release: str, count: int) -> msg.StartReply:
        """Start ``count`` instances of a prepared release at once and answer when every one
        is ready. When one fails to start, the first failure is raised once all have
        settled; the ones that did come up keep running (the coordinator reads them from
        ``status`` and stops them)."""
        assert self._nursery is not None
        if self.closing:
            raise StartFailed("the agent is shutting down and stops its apps",
                              returncode=None, app=app, release=release)
        prepared = self.store.get(app, release)
        # a cold start (an idle app woken by a request) reuses what the first start checked:
        # the app's user (useradd takes a host-wide lock) and the release's owner
        user = self._cold_users.get(app) if app in self.cold else None
        if user is None:
            user = await self._user(app)
        switched = user if user is not None and user.switched else None
        if switched is not None and not (app in self.cold and (app, release) in self._owned):
            await trio.to_thread.run_sync(self.store.ensure_owner, prepared, switched.uid,
                                          switched.gid)
            self._owned.add((app, release))
        if user is not None:
            self._cold_users[app] = user
        log_dir = self.config.data_dir / "logs" / app
        log_dir.mkdir(parents=True, exist_ok=True)
        permissions = await self._permission_support(prepared.spec.permissions)
        instances = []
        for _ in range(count):
            self._seq += 1
            instance_id = f"{app}@{release}.{self._seq}"
            home = self.config.data_dir / "homes" / instance_id
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
            if switched is not None:
                os.chown(home, switched.uid, switched.gid)
            config = InstanceConfig.from_spec(prepared.spec, release=release,
                                              instance=instance_id, port=self.ports.allocate(),
                                              cwd=prepared.src, home=home, log_dir=log_dir,
                                              user=switched, cgroups=self.cgroups,
                                              release_dir=prepared.path,
                                              permissions=permissions)
            instances.append(Instance(config))
        failures: list[SupervisorError] = []

        async def start_one(instance: Instance) -> None:
            assert self._nursery is not None
            self._add(instance, from_start=True)
            try:
                await self._nursery.start(self._supervise, instance)
            except SupervisorError as exc:
                self._forget(instance)  # unless stopped meanwhile
                failures.append(exc)
                self.persist()
            # A started instance persisted itself at its spawn and when ready (each write
            # an fsync on the event loop, which every other instance's start waits for).

        async with trio.open_nursery() as starting:
            for instance in instances:
                starting.start_soon(start_one, instance)
        if failures:
            raise failures[0]
        return msg.StartReply(app=app, release=release, instances=tuple(
            msg.StartedInstance(id=i.config.instance, port=i.config.port, state=i.state.value)
            for i in instances))

    async def stop(self, instances: list[str], grace: float | None) -> msg.StopReply:
        """Drain (no new requests; in-flight ones finish or hit the grace period), take the
        instances out of the routes, then stop them. An instance stopped for idleness is
        stopped already: it leaves its app's idle record (the last one, the app's route)."""
        asked = tuple(instances)
        if self._forget_idle(instances):
            await self._apply_routes()
        instances = [i for i in instances if i not in self.idle_ids]
        targets = [self._instance(i) for i in instances]
        remaining = await self.proxy.drain(
            instances, grace=self.config.drain_grace if grace is None else grace)
        if self._unroute(set(instances)):
            await self._apply_routes()
        failures: list[ParticipantError] = []

        async def stop_one(instance: Instance) -> None:
            try:
                await instance.stop()
            except ParticipantError as exc:  # its cgroup stays: the coordinator repeats
                failures.append(exc)
                return
            # a start that was still waiting for readiness may have cleaned up already
            self._forget(instance)

        # At once: each stop waits out its app's own shutdown (a uvicorn takes 0.1-0.2 s),
        # and one after the other they added up. Every stop runs to its end, whatever
        # another one raised, before the first failure is answered.
        async with trio.open_nursery() as stopping:
            for instance in targets:
                stopping.start_soon(stop_one, instance)
        self.persist()
        if failures:
            raise failures[0]
        return msg.StopReply(stopped=asked, in_flight_cut=remaining)

    async def switch(self, app: str, instances: list[str]) -> msg.SwitchReply:
        for instance_id in instances:
            instance = self._instance(instance_id)
            if instance.config.app != app:
                raise UnknownInstance(f"instance {instance_id} is not one of app {app!r}",
                                      app=app)
            if instance.state is not State.READY:
                raise InstanceNotReady(f"instance {instance_id} is {instance.state.value},"
                                       " not ready", app=app)
        cold = self.cold.get(app)
        if cold is not None and instances and set(instances) <= set(cold.ids):
            cold.ids = tuple(instances)  # keep these idle instances (the others go)
            self.persist()
            return msg.SwitchReply(app=app, instances=tuple(instances),
                                   version=self.proxy.snapshot.version)
        if self.cold.pop(app, None) is not None:  # a deploy or a scaling wakes an idle app
            self.activity.touch(app, trio.current_time())
        replaced = self.routes.get(app, [])
        self.routes[app] = list(instances)
        # a repeated switch keeps the standbys an earlier one made
        self.standby[app] = [i for i in dict.fromkeys((*replaced, *self.standby.get(app, ())))
                             if i not in instances and i in self.instances]
        await self.proxy.undrain(instances)
        version = await self._apply_routes()
        self.persist()
        return msg.SwitchReply(app=app, instances=tuple(instances), version=version)

    async def drain(self, instances: list[str], grace: float) -> msg.DrainReply:
        instances = [i for i in instances if i not in self.idle_ids]  # nothing to drain
        for instance_id in instances:
            self._instance(instance_id)
        return msg.DrainReply(remaining=await self.proxy.drain(instances, grace=grace))

    async def offline(self, offline: bool) -> msg.OfflineReply:
        await self.proxy.set_offline(offline)
        self.is_offline = offline
        self.persist()
        return msg.OfflineReply(offline=offline)

    async def debug(self, app: str, enabled: bool, ttl: float) -> msg.DebugReply:
        """Open (for ``ttl`` seconds) or close the debug session of ``app``: while it is
        open, every request's proxy record joins the app's captured output."""
        if enabled:
            self.debug_sessions.open(app, ttl)
        else:
            self.debug_sessions.close(app)
        self.persist()
        window = self.debug_sessions.window(app)
        return msg.DebugReply(app=app, debug=enabled, until=window.until if window else None)

    def _release_of(self, app: str, instance: str) -> str:
        found = self.instances.get(instance)
        return found.config.release if found is not None else ""

    # ------------------------------------------------------------------ queries
    def status(self) -> msg.StatusReply:
        """What ``GET /v1/status`` answers (decoded here, so a field the reply does not
        declare fails the agent's own tests rather than a coordinator)."""
        instances = list(self.instances.values())
        pids = [inst.pid for inst in instances]
        figures = process_figures(pids)
        return codec.decode(msg.StatusReply, {
            "node": self.config.node, "groups": list(self.config.groups),
            "offline": self.is_offline,
            "isolation": {"root": os.geteuid() == 0,
                          "cgroups": self.cgroups.mode if self.cgroups else "none",
                          "reason": self.cgroups.reason if self.cgroups else "not root",
                          "agent_cgroup": (self.agent_group.to_json()
                                           if self.agent_group is not None else None),
                          "permissions": (self.permissions.to_json()
                                          if self.permissions is not None else None)},
            "proxy": {"version": self.proxy.snapshot.version,
                      "workers": [s.pid for s in self.proxy.slots]},
            "routes": self.routes,
            "apps": self.app_states(),
            "debug_sessions": self.debug_sessions.active(),
            "instances": [{**inst.status(), "figures": None if pid is None else figures.get(pid)}
                          for inst, pid in zip(instances, pids, strict=True)],
            "releases": {app: [r.release for r in self.store.releases(app)]
                         for app in self._apps_on_disk()},
            "figures": node_figures(),
        })

    def coordinator_status(self) -> dict[str, Any]:
        """The compact status a heartbeat carries: what runs where (with each instance's
        load: ``in_flight``, and ``cpu`` in cores once sampled twice, and ``unenforced``: the
        permissions its manifest asks for that this machine cannot enforce), routes,
        offline, figures."""
        return {
            "instances": [{"id": inst.config.instance, "app": inst.config.app,
                           "release": inst.config.release, "state": inst.state.value,
                           "port": inst.config.port,
                           "unenforced": unenforced(inst.isolation.permissions
                                                    if inst.isolation is not None else None),
                           **self.load.latest.get(instance_id, {})}
                          for instance_id, inst in self.instances.items()]
            # an idle app's stopped instances: the coordinator counts them as running
            + [{"id": i, "app": cold.app, "release": cold.release, "state": "idle",
                "port": None} for cold in self.cold.values() for i in cold.ids],
            "routes": self.routes, "offline": self.is_offline, "figures": node_figures(),
            "listen": list(self.config.listen), "traffic": self.traffic,
            "proxy_hot_path": self.hot_path, "apps": self.app_states(),
        }

    async def _sample_load(self) -> None:
        """Every LOAD_PERIOD: the proxy's in-flight counts and the instances' CPU seconds."""
        while True:
            await trio.sleep(LOAD_PERIOD)
            stats = await self.proxy.stats()  # from the workers that answer
            table = stats["instances"]
            self.traffic = traffic(stats, BUCKETS)
            pids = {i: inst.pid for i, inst in self.instances.items()}
            by_pid = await trio.to_thread.run_sync(cpu_seconds, pids.values())
            cpu = {i: None if pid is None else by_pid.get(pid) for i, pid in pids.items()}
            self.load.sample(trio.current_time(), table, cpu)

    def app_states(self) -> dict[str, dict[str, Any]]:
        """Each app with routes here: ``state`` idle, starting or serving; an idle app's
        ``release`` and ``instances`` (the count a cold start starts); ``start_error``
        when its last cold start failed."""
        states: dict[str, dict[str, Any]] = {
            app: {"state": "serving"} for app, ids in self.routes.items() if ids}
        for app, cold in self.cold.items():
            states[app] = {"state": cold.state, "release": cold.release,
                           "instances": len(cold.ids),
                           **({"start_error": cold.reason} if cold.reason else {})}
        return states

    # ------------------------------------------------------------------ scale to zero
    def _forget_idle(self, instances: list[str]) -> bool:
        """Take stopped idle instances out of their apps' idle records (a record left with
        none is dropped: the app is no longer here); True when a record changed."""
        gone = set(instances) & self.idle_ids
        changed = False
        for app, cold in list(self.cold.items()):
            kept = tuple(i for i in cold.ids if i not in gone)
            if kept != cold.ids:
                changed = True
                if kept or cold.phase is Phase.STARTING:
                    cold.ids = kept
                else:
                    del self.cold[app]
        return changed

    def _idle_timeouts(self) -> dict[str, float]:
        """The routed, serving apps that scale to zero, and their idle timeouts."""
        timeouts = {}
        for app, ids in self.routes.items():
            if ids and app not in self.cold and ids[0] in self.instances:
                release = self.instances[ids[0]].config.release
                with contextlib.suppress(ParticipantError):
                    timeout = self.store.get(app, release).spec.scale.idle_timeout
                    if timeout > 0:
                        timeouts[app] = timeout
        return timeouts

    async def _watch_idle(self) -> None:
        """Every IDLE_TICK: note each watched app's traffic; idle the ones due."""
        while True:
            await trio.sleep(IDLE_TICK)
            timeouts = self._idle_timeouts()
            for app in [a for a in self.activity.seen if a not in timeouts]:
                self.activity.forget(app)
            if not timeouts or self.closing:
                continue
            requests, in_flight = app_counts(await self.proxy.stats())
            now = trio.current_time()
            for app in timeouts:
                self.activity.observe(app, now, requests=requests.get(app, 0),
                                      in_flight=in_flight.get(app, 0))
            for app in self.activity.due(now, timeouts):
                try:
                    await self._go_idle(app)
                except ParticipantError as exc:
                    log.error("app not idled", app=app, error=str(exc))
                    self.activity.touch(app, trio.current_time())

    async def _go_idle(self, app: str) -> None:
        """Drain ``app``'s instances; with nothing in flight after the mark, route it with
        none and stop them (see ``idle.py``); else route them again."""
        ids = list(self.routes.get(app, []))
        standby = [i for i in self.standby.get(app, []) if i in self.instances]
        if not ids or app in self.cold or any(i not in self.instances for i in ids):
            return
        cold = ColdApp(app=app, release=self.instances[ids[0]].config.release,
                       ids=tuple(ids))
        self.cold[app] = cold
        try:
            remaining = await self.proxy.drain([*ids, *standby], grace=0)
        except ParticipantError:
            if self.cold.get(app) is cold:  # nothing changed: the app keeps serving
                del self.cold[app]
            raise
        if any(remaining.values()) or self.cold.get(app) is not cold \
                or self.routes.get(app) != ids:
            if self.cold.get(app) is cold:
                cold.on(Event.BUSY)
                del self.cold[app]
            await self.proxy.undrain([*ids, *standby])
            self.activity.touch(app, trio.current_time())
            return
        self.routes[app] = []
        self.standby[app] = []
        self.idle_ids.update(ids)
        await self._apply_routes()
        targets = [self.instances[i] for i in (*ids, *standby) if i in self.instances]
        async with trio.open_nursery() as stopping:
            for instance in targets:
                stopping.start_soon(self._stop_quietly, instance)
        self.activity.forget(app)
        if self.cold.get(app) is cold:
            cold.on(Event.STOPPED)
            log.info("app idle: its instances stopped", app=app, release=cold.release,
                     instances=ids)
            if cold.wanted:
                cold.wanted = False
                cold.on(Event.WAKE)
                assert self._nursery is not None
                self._nursery.start_soon(self._cold_start, app)
        self.persist()

    async def _stop_quietly(self, instance: Instance) -> None:
        try:
            await instance.stop()
        except ParticipantError as exc:
            log.error("idle instance did not stop", instance=instance.config.instance,
                      error=str(exc))
            return
        self._forget(instance)

    async def _on_wake(self, message: dict[str, Any]) -> dict[str, Any]:
        """A proxy worker holds a request for ``app``: start it unless starting (or
        refused after a recent failure). Answered at once."""
        if message.get("type") != "wake" or not isinstance(message.get("app"), str):
            raise ValueError("expected {'type': 'wake', 'app': NAME}")
        app = message["app"]
        cold = self.cold.get(app)
        if cold is None:  # serving (the next snapshot routes it) or not here at all
            if self.routes.get(app) or app in self._applied_names():
                return {"ok": True}
            return {"ok": False, "error": f"app {app!r} is not routed on this node"}
        before = cold.phase
        ok, reason = cold.wake(trio.current_time())
        if not ok:
            return {"ok": False, "error": f"app {app!r} failed to start: {reason}"}
        if before is not Phase.STARTING and cold.phase is Phase.STARTING:
            assert self._nursery is not None
            self._nursery.start_soon(self._cold_start, app)
        return {"ok": True}

    def _applied_names(self) -> set[str]:
        return {route.name for route in self._applied or ()}

    async def _cold_start(self, app: str) -> None:
        """Start an idle app's instances (as many as it had) and route them; a failure
        goes to the app's status, the log and the held requests (503 start-failed)."""
        cold = self.cold[app]
        began, wall = trio.current_time(), time.time()
        log.info("cold start", app=app, release=cold.release, instances=len(cold.ids))
        try:
            reply = await self.start(app, cold.release, max(1, len(cold.ids)))
            started = trio.current_time()
            if self.cold.get(app) is not cold:
                return  # a deploy or a stop took the app over meanwhile
            cold.on(Event.READY)
            # what ``switch`` does, minus its undrain of instances no worker knows yet: the
            # held requests wait for this snapshot, so nothing else (no fsync) goes first
            del self.cold[app]
            self.routes[app] = [i.id for i in reply.instances]
            self.standby[app] = []
            self.activity.touch(app, trio.current_time())
            await self._apply_routes()
            routed = trio.current_time()
            self.persist()
            first = self.instances.get(reply.instances[0].id)
            spawned = first.started_at if first is not None else None
            ready = first.ready_at if first is not None else None
            # where the time went: before the spawn (user, cgroup), the app's own boot (to
            # its first ready probe), the rest of the start, the routing snapshot
            log.info("cold start done", app=app, release=cold.release,
                     ms=round((routed - began) * 1000, 1),
                     spawn_ms=None if spawned is None else round((spawned - wall) * 1000, 1),
                     boot_ms=(None if spawned is None or ready is None
                              else round((ready - spawned) * 1000, 1)),
                     start_ms=round((started - began) * 1000, 1),
                     route_ms=round((routed - started) * 1000, 1))
        except ParticipantError as exc:
            if self.cold.get(app) is cold and cold.phase is Phase.STARTING:
                cold.on(Event.FAILED, now=trio.current_time(), reason=str(exc))
                log.error("cold start failed", app=app, release=cold.release, error=str(exc))
                with contextlib.suppress(ParticipantError):
                    await self._apply_routes()
            self.persist()

    def logs(self, *, app: str | None, instance: str | None, n: int,
             request_id: str | None = None) -> list[dict[str, Any]]:
        return [line.to_json() for line in self.log_hub.tail(instance=instance, app=app, n=n,
                                                             request_id=request_id)]

    async def follow(self, *, app: str | None, instance: str | None, n: int,
                     request_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """The newest ``n`` lines, then new lines as their documents; after a line,
        ``{"type": "dropped", "dropped": n}`` when the subscription dropped ``n`` more since
        the last such note (its queue was full: a burst larger than it), once what was
        queued is sent: a reader learns of the loss at once rather than from the sequence
        numbers of the next line, which may be long in coming.

        The tail is read in the same step as the subscription begins (no await between):
        the log hub records and publishes a poll's lines in one step too, so each line is
        in the tail or in the subscription, never in both and never in neither."""
        wanted = LogFilter(app=app, instance=instance, request_id=request_id)
        with self.log_hub.subscribe(wanted) as subscription:
            tail = self.logs(app=app, instance=instance, n=n, request_id=request_id)
            for doc in tail:
                yield doc
            told = 0
            async for line in subscription:
                yield line.to_json()
                if subscription.dropped > told and not subscription.queued:  # once drained
                    yield {"type": DROPPED_NOTE, "dropped": subscription.dropped - told}
                    told = subscription.dropped

    # ------------------------------------------------------------------ helpers
    def _instance(self, instance_id: str) -> Instance:
        instance = self.instances.get(instance_id)
        if instance is None:
            raise UnknownInstance(f"no instance {instance_id!r} on this node")
        return instance

    async def _user(self, app: str) -> AppUser | None:
        if os.geteuid() != 0:
            return None
        return await trio.to_thread.run_sync(ensure_app_user, app)

    def _apps_on_disk(self) -> list[str]:
        root = self.store.root
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []

    async def _apply_routes(self) -> int:
        """Push the routes (their serving instances) to the proxy unless unchanged;
        returns the snapshot version in force."""
        async with self._routes_lock:  # computed and applied in one go: the newest wins
            apps = []
            for app, ids in sorted({**self.routes, **{a: [] for a in self.cold}}.items()):
                cold = self.cold.get(app)
                if not ids and cold is None:
                    continue
                release = self.instances[ids[0]].config.release if ids else (
                    cold.release if cold is not None else "")
                spec = self.store.get(app, release).spec
                r, limits = spec.routes, spec.limits
                timeout = limits.timeout or Timeouts().first_byte
                standby = [i for i in self.standby.get(app, ()) if i in self.instances]
                apps.append(AppRoute(
                    name=app,
                    instances=tuple(RouteInstance(id=i, host="127.0.0.1",
                                                  port=self.instances[i].config.port,
                                                  standby=i in standby)
                                    for i in (*ids, *standby) if self.instances[i].serving),
                    prefix=r.prefix if (r.prefix or r.hosts or r.port) else f"/{app}",
                    strip_prefix=r.strip_prefix if r.prefix else not (r.hosts or r.port),
                    rewrite_paths=r.rewrite_paths,
                    hosts=r.hosts, port=r.port, max_body=limits.max_body,
                    min_body_rate=limits.min_body_rate, upgrades=r.upgrades,
                    timeouts=Timeouts(first_byte=timeout, idle=timeout),
                    cold=None if spec.scale.idle_timeout <= 0 and cold is None else ColdStart(
                        state=_COLD_STATES.get(cold.phase, "idle") if cold else "serving",
                        reason=cold.reason if cold else "", queue=HOLD_QUEUE,
                        wait=spec.health.ready_deadline + HOLD_MARGIN,
                        wake=str(self.wake_path))))
            if apps == self._applied:
                return self.proxy.snapshot.version
            version = await self.proxy.apply(apps)
            self._applied = apps
            return version


_COLD_STATES = {Phase.STARTING: "starting", Phase.FAILED: "failed"}  # else: idle


async def _empty_cgroup(group: InstanceCgroup) -> None:
    """SIGKILL what is in ``group`` until it is empty (bounded by REAP_TIMEOUT)."""
    with trio.move_on_after(REAP_TIMEOUT):
        while await trio.to_thread.run_sync(group.kill_all):
            await trio.sleep(GROUP_POLL)


class _Started:
    """A ``task_status`` that remembers whether ``started`` was called."""

    def __init__(self, inner: trio.TaskStatus[None]) -> None:
        self.inner = inner
        self.done = False

    def started(self, value: None = None) -> None:
        self.done = True
        self.inner.started(value)
