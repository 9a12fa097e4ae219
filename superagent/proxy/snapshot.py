"""The routing snapshot: everything a proxy worker needs to route, as immutable values.

A snapshot is versioned and replaced whole: the standalone proxy builds one from
its TOML file, the participant agent builds one from its desired state, and both
send it to every worker over the control socket in its wire form (the same
document shape as the TOML file, plus ``version``). Requests in flight keep the
snapshot they started with.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Final

from superagent.httprules import DEFAULT_MAX_BODY, DEFAULT_MIN_BODY_RATE, DEFAULT_UPGRADES

PATH_POLICIES: Final = ("normalize", "reject")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeouts:
    """Per-app limits on waiting for the upstream, in seconds; ``total`` 0 means none."""

    connect: float = 5.0
    first_byte: float = 60.0
    idle: float = 60.0
    total: float = 0.0
    websocket_idle: float = 3600.0
    # A streamed request body: the client must send at least ``AppRoute.min_body_rate``
    # bytes per second, averaged over each ``body_window`` seconds the proxy waits for it
    # (time spent waiting for the app to read does not count), and all of it within
    # ``body`` seconds (0: no limit). Either failing is answered 408 client-body-timeout.
    body_window: float = 10.0
    body: float = 0.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Instance:
    """One upstream process of an app, reachable at ``host:port``.

    A ``standby`` instance gets a request only when no other instance of the app can be
    had (none routed, or every one failed to connect): the warm instances of the release
    a deploy just replaced, kept until the deploy commits, so a new release that dies
    right after its switch costs no request.
    """

    id: str
    host: str
    port: int
    standby: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class ColdStart:
    """An app that scales to zero: with no instance to pick, a request is held while the
    driver starts one (``superagent/proxy/hold.py``).

    ``state`` is the driver's word: ``idle`` (nothing runs), ``starting`` or ``failed``
    (``reason`` says why; held requests get a 503 naming it). ``queue`` bounds the held
    requests per worker, ``wait`` how long each is held; ``wake`` is the Unix socket a
    worker asks the driver to start an instance on.
    """

    state: str = "idle"  # idle, starting, failed; serving while instances run
    reason: str = ""
    queue: int = 100
    wait: float = 30.0
    wake: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class AppRoute:
    """An app: its rules (dedicated port, hosts, prefix), instances and limits."""

    name: str
    instances: tuple[Instance, ...]
    prefix: str | None = None
    strip_prefix: bool = False
    # with strip_prefix: the prefix goes back into the responses' Location and Set-Cookie
    # paths, for apps that cannot be told their mount point
    rewrite_paths: bool = False
    hosts: tuple[str, ...] = ()
    port: int | None = None
    max_body: int = DEFAULT_MAX_BODY  # 0: no limit
    min_body_rate: int = DEFAULT_MIN_BODY_RATE  # bytes/s over timeouts.body_window; 0: none
    # Upgrade protocols tunnelled to the app (lower case); any other Upgrade is dropped
    # and the request relayed as a plain one.
    upgrades: tuple[str, ...] = DEFAULT_UPGRADES
    retries: int = 2
    timeouts: Timeouts = field(default_factory=Timeouts)
    cold: ColdStart | None = None  # set for an app that may have no instance (scale to zero)


@dataclass(frozen=True, kw_only=True, slots=True)
class Listener:
    """A listening address; ``app`` is set for a dedicated port, ``None`` for a shared one.

    ``tls``: clients speak TLS here, with the snapshot's ``ServerSettings.tls_cert``.
    """

    host: str
    port: int
    app: str | None = None
    tls: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerSettings:
    """Limits that apply before a request is routed, plus pool and logging knobs."""

    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_request_line: int = 8 * 1024
    max_connections: int = 10_000
    trusted_proxies: tuple[IPNetwork, ...] = ()
    access_log: bool = True
    pool_idle_timeout: float = 4.0
    pool_max_idle: int = 64
    merge_slashes: bool = False  # fold "//" in request paths (not an RFC 3986 equivalence)
    path_policy: str = "normalize"  # "reject": 400 for dot segments, encoded dot/slash/backslash
    # PEM files of the TLS listeners (tls.py); key None: the key is in the certificate file
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RoutingSnapshot:
    """One complete, versioned routing state."""

    version: int
    listeners: tuple[Listener, ...]
    apps: tuple[AppRoute, ...]
    settings: ServerSettings = field(default_factory=ServerSettings)

    def instance_ids(self) -> set[str]:
        return {inst.id for app in self.apps for inst in app.instances}
