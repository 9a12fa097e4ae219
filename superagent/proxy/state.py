"""What every connection of a proxy worker shares: the routing table, pools, counters.

``WorkerState`` holds the current ``RouteTable`` (swapped whole by ``apply``;
requests in flight keep the table they started with), the ``Upstreams`` with
their pools and drain marks, the counters, and the set of live connections. Its
``reap`` is the timeout mechanism: each connection keeps one deadline and the
phase it stands for, and the worker calls ``reap`` every tick to expire those
whose deadline passed.
"""

from __future__ import annotations

import ipaddress
import time
from typing import TYPE_CHECKING, Any, Final

from superagent.proxy import http1
from superagent.proxy.accesslog import AccessLog
from superagent.proxy.hold import Holds
from superagent.proxy.http1 import Peer
from superagent.proxy.metrics import Metrics
from superagent.proxy.routes import RouteTable
from superagent.proxy.snapshot import RoutingSnapshot
from superagent.proxy.upstream import Upstreams

if TYPE_CHECKING:
    from superagent.proxy.connection import ClientConnection

IDLE: Final = "idle"  # phases of a connection between requests
SHUTDOWN: Final = "shutdown"
PEER_CACHE_SIZE = 4096  # a cache of trusted-proxy decisions, bounded against many clients


class WorkerState:
    """What every connection of a worker shares: the current table, pools, counters."""

    __slots__ = ("_peers", "access_log", "closing", "holds", "live", "metrics", "node_draining",
                 "parser", "request_ids", "settings", "table", "upstreams")

    def __init__(self, *, parser: str, snapshot: RoutingSnapshot,
                 access_log: AccessLog | None = None) -> None:
        self.parser = parser
        self.upstreams = Upstreams()
        self.metrics = Metrics()
        self.request_ids = http1.RequestIds()
        self.access_log = access_log
        self.closing = False
        self.node_draining = False
        self.live: set[ClientConnection] = set()
        self.holds = Holds()  # requests waiting for an app's cold start
        self._peers: dict[str, Peer] = {}
        self.table = RouteTable(snapshot)
        self.settings = snapshot.settings
        self.upstreams.update(snapshot)

    def __repr__(self) -> str:
        return (f"<WorkerState v{self.table.version} parser={self.parser}"
                f" connections={len(self.live)} closing={self.closing}>")

    @property
    def connections(self) -> int:
        return len(self.live)

    def apply(self, snapshot: RoutingSnapshot) -> None:
        """Swap in a new snapshot; requests in flight keep the table they started with."""
        self.upstreams.update(snapshot)
        self.settings = snapshot.settings
        self._peers.clear()
        self.table = RouteTable(snapshot)
        self.settle_holds()

    def settle_holds(self) -> None:
        """Release the held requests the current table and drain marks decide
        (``hold.Holds.settle``): after a snapshot, and after an instance is undrained."""
        if not self.holds.by_app:
            return
        now = time.monotonic()
        apps = self.table.apps
        has_instance = {name: self.upstreams.pick(apps[name]) is not None
                        for name in self.holds.by_app if name in apps}
        for name, since in self.holds.settle(apps, has_instance):
            self.metrics.cold_start(name, now - since)

    def reap(self, now: float) -> None:
        """Expire every connection whose deadline has passed."""
        for conn in [c for c in self.live if c.deadline <= now]:
            conn.expire(conn.phase)

    def begin_shutdown(self) -> None:
        """Stop keeping connections alive: idle ones close now, busy ones after their answer."""
        self.closing = True
        for conn in [c for c in self.live if c.phase == IDLE]:
            conn.expire(SHUTDOWN)

    def peer(self, ip: str) -> Peer:
        peer = self._peers.get(ip)
        if peer is None:
            trusted = False
            if self.settings.trusted_proxies:
                try:
                    addr = ipaddress.ip_address(ip)
                    trusted = any(addr in net for net in self.settings.trusted_proxies)
                except ValueError:
                    trusted = False
            peer = Peer(ip=ip, trusted=trusted)
            if len(self._peers) < PEER_CACHE_SIZE:
                self._peers[ip] = peer
        return peer

    def stats(self) -> dict[str, Any]:
        """Counters and per-instance gauges, JSON-ready, for the admin server."""
        return {
            "version": self.table.version,
            "connections": len(self.live),
            "held": self.holds.held,
            "metrics": self.metrics.to_json(),
            "instances": {
                up.id: {"app": up.app, "in_flight": up.outstanding, "pool_idle": len(up.idle),
                        "draining": up.draining}
                for up in self.upstreams.all()
            },
        }
