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

and persists what a restarted agent needs in ``<data_dir>/state.json`` (asked for after
every change, a supervisor's restart of an instance included, and written off the event
loop by ``agentstate.StateWriter``; an RPC answer and a new process wait until it is on
disk, see ``agentstate`` for the ordering). Apps and
proxy workers do not depend on the agent process: when it stops or dies they keep
serving, and a new agent on the same data directory re-adopts them (instances by pid and
start time, workers by their control sockets) instead of restarting them. An instance
whose process is gone by then (or was between restarts) is started afresh with the same
id and port, after a SIGKILL of whatever is left in its cgroup. ``stop_all`` ends
everything, for a node that is being taken away.

This module holds the agent's state and its RPC signals; the rest is in modules whose
functions take the ``Agent`` explicitly: ``tracking`` (adopting, adding, supervising and
forgetting instances), ``routing`` (the snapshot pushed to the proxy workers),
``scaletozero`` (idling apps and cold starts), ``reporting`` (status, heartbeat, load),
``egress`` (permission detection, the nftables egress table) and ``agentstate``
(state.json).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import secrets
import shutil
from collections.abc import AsyncIterator
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
from superagent.manifest import TEST_TIMEOUT
from superagent.participant import agentstate, reporting
from superagent.participant.agentcgroup import AgentCgroup
from superagent.participant.agentview import AgentConfig as AgentConfig  # the CLI's, tests'
from superagent.participant.archive import check as check_archive
from superagent.participant.cgroups import PARENT_GROUP, detect_cgroups, remove_empty_parent
from superagent.participant.egress import (
    keep_egress_table,
    loopback_user,
    permission_support,
)
from superagent.participant.errors import (
    CoordinatorError,
    InstanceNotReady,
    ParticipantError,
    StartFailed,
    UnknownInstance,
    UnknownRelease,
)
from superagent.participant.idle import ActivityWatch, ColdApp
from superagent.participant.isolation import AppUser, ensure_app_user
from superagent.participant.joiner import CoordinatorLink
from superagent.participant.load import LoadSampler
from superagent.participant.logs import LogHub
from superagent.participant.permissions import PermissionSupport
from superagent.participant.ports import PortAllocator, ephemeral_overlap
from superagent.participant.proxydriver import ACCESS_LOG, ProxyDriver
from superagent.participant.releases import ReleaseStore
from superagent.participant.routing import apply_routes, keep_routes, unroute
from superagent.participant.rpc import rpc_app
from superagent.participant.scaletozero import (
    forget_idle,
    on_wake,
    resume_cold_starts,
    watch_idle,
)
from superagent.participant.signals import SignalLedger
from superagent.participant.supervisor import Instance, InstanceConfig, State
from superagent.participant.tracking import add, adopt, forget, join_agent_group, supervise
from superagent.proxy.control import serve_control
from superagent.proxy.snapshot import AppRoute, ServerSettings
from superagent.rpc import messages as msg
from superagent.rpc.credentials import CREDENTIAL_FILE, read_credential, signal_key

WAKE_SOCKET = "wake.sock"  # in the proxy's run directory: workers ask for cold starts here
log = structlog.get_logger("superagent.participant")


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
        self.state_writer = agentstate.StateWriter(data / agentstate.STATE_FILE,
                                                   partial(agentstate.document, self))
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
        saved = agentstate.load_state(self)
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
            join_agent_group(self, os.getpid())
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.state_writer.run)
            await self.proxy.start()
            for slot in self.proxy.slots:  # adopted workers of an earlier agent, too
                if slot.process is not None and slot.process.pid is not None:
                    join_agent_group(self, slot.process.pid)
            await nursery.start(self.proxy.supervise)
            self.log_hub.add_proxy_events(self.proxy.run_dir / ACCESS_LOG,
                                          wanted=self.debug_sessions.covers,
                                          release_of=self._release_of)
            await nursery.start(self.log_hub.run)
            await nursery.start(self.debug_sessions.run, lambda _ended: self.persist())
            nursery.start_soon(keep_routes, self)
            nursery.start_soon(reporting.sample_load, self)
            nursery.start_soon(keep_egress_table, self)
            await nursery.start(serve_control, str(self.wake_path), partial(on_wake, self))
            nursery.start_soon(watch_idle, self)
            for doc in saved.get("cold", []):
                with contextlib.suppress(KeyError, ValueError, TypeError):
                    cold = ColdApp.from_json(doc)
                    self.cold[cold.app] = cold
                    self.idle_ids.update(cold.ids)
            for record in saved.get("instances", []):
                await adopt(self, record)
            self.routes = {app: [i for i in ids if i in self.instances]
                           for app, ids in saved.get("routes", {}).items()}
            self.standby = {app: [i for i in ids if i in self.instances]
                            for app, ids in saved.get("standby", {}).items()}
            resume_cold_starts(self)
            if self.is_offline:
                await self.proxy.set_offline(True)
            await apply_routes(self)
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
        await self.persisted()

    # ------------------------------------------------------------------ state
    def persist(self) -> None:
        """Ask for state.json to be written (``agentstate.StateWriter``); returns at once."""
        self.state_writer.ask()

    async def persisted(self) -> None:
        """Return once what ``persist`` was asked so far is on disk (raises
        StateWriteError when it cannot be written)."""
        await self.state_writer.flush()

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
        log_dir = self.config.data_dir / "logs" / app
        log_dir.mkdir(parents=True, exist_ok=True)
        permissions = await permission_support(self, prepared.spec.permissions)
        # a loopback-only app's instances run with its egress group (permissions)
        switched = await loopback_user(switched, app=app, support=permissions,
                                       network=prepared.spec.permissions.network)
        if user is not None:
            self._cold_users[app] = switched or user
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
            instances.append(Instance(config, eager=app in self.cold))  # requests wait
        failures: list[ParticipantError] = []

        async def start_one(instance: Instance) -> None:
            assert self._nursery is not None
            add(self, instance, from_start=True)
            try:
                await self._nursery.start(supervise, self, instance)
            except ParticipantError as exc:  # an IsolationError too: the reply names it
                forget(self, instance)  # unless stopped meanwhile
                failures.append(exc)
                self.persist()
            # A started instance's record was on disk before its spawn, and its pid before
            # it was ready (``tracking.keep_record``); its readiness asks for no write.

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
        if forget_idle(self, instances):
            await apply_routes(self)
        instances = [i for i in instances if i not in self.idle_ids]
        targets = [self._instance(i) for i in instances]
        remaining = await self.proxy.drain(
            instances, grace=self.config.drain_grace if grace is None else grace)
        if unroute(self, set(instances)):
            await apply_routes(self)
        failures: list[ParticipantError] = []

        async def stop_one(instance: Instance) -> None:
            try:
                await instance.stop()
            except ParticipantError as exc:  # its cgroup stays: the coordinator repeats
                failures.append(exc)
                return
            # a start that was still waiting for readiness may have cleaned up already
            forget(self, instance)

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
        # asked first, so the write runs beside the proxy's snapshot (the RPC answer waits
        # for both); a restarted agent applies the routes state.json names either way
        self.persist()
        await self.proxy.undrain(instances)
        version = await apply_routes(self)
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
        """What ``GET /v1/status`` answers (``reporting.status``)."""
        return reporting.status(self)

    def coordinator_status(self) -> dict[str, Any]:
        """The compact status a heartbeat carries (``reporting.coordinator_status``)."""
        return reporting.coordinator_status(self)

    def app_states(self) -> dict[str, dict[str, Any]]:
        """Each app with routes here and its scale-to-zero state
        (``reporting.app_states``)."""
        return reporting.app_states(self)

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
