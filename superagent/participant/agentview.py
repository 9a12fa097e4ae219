"""The agent's settings (``AgentConfig``) and what its parts see of it (``AgentView``).

``service.Agent`` holds the agent's tables; the modules that act on them (``tracking``,
``routing``, ``scaletozero``, ``reporting``, ``egress``, ``agentstate``) are functions
that take the agent explicitly. They name its type as ``AgentView``, a protocol that
``Agent`` satisfies, so that none of them imports ``service`` (which imports them all):
the import graph stays free of cycles, type-only ones included.

``AgentConfig`` is the settings of ``superagent participant``; the CLI builds it from
its flags, tests directly. ``superagent.participant.service`` re-exports it beside
``Agent``, where its callers import it from.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from superagent.debug import DebugSessions
from superagent.participant.agentcgroup import AgentCgroup
from superagent.participant.cgroups import CgroupSupport
from superagent.participant.idle import ActivityWatch, ColdApp
from superagent.participant.load import LoadSampler
from superagent.participant.logs import LogHub
from superagent.participant.nftegress import EGRESS_TABLE
from superagent.participant.permissions import LOOPBACK_GROUP, PermissionSupport
from superagent.participant.ports import DEFAULT_HIGH, DEFAULT_LOW, PortAllocator
from superagent.participant.proxydriver import ProxyDriver
from superagent.participant.releases import DEFAULT_KEEP, ReleaseStore
from superagent.participant.signals import SignalLedger
from superagent.participant.supervisor import Instance
from superagent.proxy.snapshot import AppRoute
from superagent.rpc import messages as msg


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
    # (agentcgroup.AgentCgroup). ``superagent participant`` does; an agent embedded in another
    # process (tests) leaves that process where it is.
    agent_cgroup: bool = False
    # [permissions]: the shared group earlier agents gave loopback-only instances (its gid
    # stays in the egress set while it exists) and the host-wide nftables egress table
    # (tests pass their own names)
    loopback_group: str = LOOPBACK_GROUP
    egress_table: str = EGRESS_TABLE



class AgentView(Protocol):
    """The ``Agent``'s tables and the few of its methods its parts use (each attribute
    is described where ``Agent.__init__`` sets it)."""

    config: AgentConfig
    hot_path: str
    store: ReleaseStore
    ports: PortAllocator
    proxy: ProxyDriver
    log_hub: LogHub
    cgroups: CgroupSupport | None
    agent_group: AgentCgroup | None
    permissions: PermissionSupport | None
    ledger: SignalLedger
    instances: dict[str, Instance]
    routes: dict[str, list[str]]
    standby: dict[str, list[str]]
    cold: dict[str, ColdApp]
    activity: ActivityWatch
    idle_ids: set[str]
    is_offline: bool
    closing: bool
    debug_sessions: DebugSessions
    load: LoadSampler
    traffic: dict[str, Any]
    _applied: list[AppRoute] | None
    _routes_lock: trio.Lock
    _routes_stale: trio.Event
    _seq: int
    _nursery: trio.Nursery | None

    @property
    def wake_path(self) -> Path: ...

    def persist(self) -> None: ...

    async def persisted(self) -> None: ...

    async def start(self, app: str, release: str, count: int) -> msg.StartReply: ...
