"""Loading the proxy's TOML config and the routing snapshot's wire form.

The file has two parts (see docs/proxy-config.md):
  ``[proxy]``  listeners, limits and process settings;
  ``[apps.NAME]`` one table per app: instances, rules, body limit, timeouts.

Process settings (``parser``, ``workers``, ``admin``, ``grace``) are fixed for
the life of the process; everything else is the routing snapshot and can be
reloaded. The snapshot's wire form (``snapshot_to_wire``) is the same document
minus the process settings, so both paths share one validator.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from superagent.config import Table, parse_address, read_toml
from superagent.errors import ConfigError, HTTPSyntaxError
from superagent.httprules import (
    DEFAULT_MAX_BODY,
    DEFAULT_MIN_BODY_RATE,
    DEFAULT_UPGRADES,
    normalize_host,
    normalize_path,
    upgrade_protocol,
)
from superagent.proxy.snapshot import (
    PATH_POLICIES,
    AppRoute,
    ColdStart,
    Instance,
    Listener,
    RoutingSnapshot,
    ServerSettings,
    Timeouts,
)
from superagent.proxy.tls import CertFiles, listener_problem, load_context

PARSERS = ("httptools", "h11")
COLD_STATES = ("idle", "starting", "failed", "serving")
_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ProxyConfig:
    """Process settings of ``superagent proxy``; changing them needs a restart."""

    parser: str = "httptools"
    workers: int = 0  # 0: one per CPU
    admin: tuple[str, int] | None = ("127.0.0.1", 9901)
    grace: float = 30.0

    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


def load_config(path: str) -> tuple[ProxyConfig, RoutingSnapshot]:
    """Read and validate a proxy config file; raises ConfigError naming file and key.

    Relative TLS file paths are taken from the config file's directory, and the
    certificate is loaded once here, so ``--check`` and a reload refuse a bad one.
    """
    doc = read_toml(path)
    process, snapshot = config_from_document(doc, source=path, version=1)
    s = snapshot.settings
    if s.tls_cert is not None:
        base = os.path.dirname(os.path.abspath(path))
        cert = os.path.join(base, s.tls_cert)
        key = None if s.tls_key is None else os.path.join(base, s.tls_key)
        try:
            load_context(CertFiles(cert=cert, key=key))
        except ConfigError as exc:
            raise ConfigError(str(exc), source=path, key="proxy.tls_cert") from None
        snapshot = replace(snapshot, settings=replace(s, tls_cert=cert, tls_key=key))
    return process, snapshot


def config_from_document(doc: Mapping[str, Any], *, source: str, version: int
                         ) -> tuple[ProxyConfig, RoutingSnapshot]:
    root = Table(doc, source=source)
    proxy = root.table("proxy")
    process = _read_process(proxy)
    snapshot = _read_snapshot(root, proxy, version=version)
    return process, snapshot


def snapshot_from_wire(doc: Mapping[str, Any]) -> RoutingSnapshot:
    """Validate a snapshot received over the control socket; raises ConfigError."""
    root = Table(doc, source="snapshot")
    version = root.integer("version", minimum=0)
    return _read_snapshot(root, root.table("proxy"), version=version)


def snapshot_to_wire(snapshot: RoutingSnapshot) -> dict[str, Any]:
    """The JSON-ready document that ``snapshot_from_wire`` turns back into ``snapshot``."""
    s = snapshot.settings
    shared = [f"{_fmt_host(lst.host)}:{lst.port}" for lst in snapshot.listeners
              if lst.app is None and not lst.tls]
    secure = [f"{_fmt_host(lst.host)}:{lst.port}" for lst in snapshot.listeners
              if lst.app is None and lst.tls]
    dedicated = [lst for lst in snapshot.listeners if lst.app is not None]
    proxy: dict[str, Any] = {
        "listen": shared,
        "header_timeout": s.header_timeout,
        "keepalive_timeout": s.keepalive_timeout,
        "max_header_bytes": s.max_header_bytes,
        "max_headers": s.max_headers,
        "max_request_line": s.max_request_line,
        "max_connections": s.max_connections,
        "trusted_proxies": [str(net) for net in s.trusted_proxies],
        "access_log": s.access_log,
        "pool_idle_timeout": s.pool_idle_timeout,
        "pool_max_idle": s.pool_max_idle,
        "merge_slashes": s.merge_slashes,
        "path_policy": s.path_policy,
    }
    if dedicated:
        proxy["dedicated_host"] = dedicated[0].host
    if secure:
        proxy["tls_listen"] = secure
    if s.tls_cert is not None:
        proxy["tls_cert"] = s.tls_cert
    if s.tls_key is not None:
        proxy["tls_key"] = s.tls_key
    apps: dict[str, Any] = {}
    for app in snapshot.apps:
        t = app.timeouts
        entry: dict[str, Any] = {
            "instances": [{"id": i.id, "address": f"{_fmt_host(i.host)}:{i.port}",
                           **({"standby": True} if i.standby else {})}
                          for i in app.instances],
            "strip_prefix": app.strip_prefix,
            **({"rewrite_paths": True} if app.rewrite_paths else {}),
            "hosts": list(app.hosts),
            "max_body": app.max_body,
            "min_body_rate": app.min_body_rate,
            "upgrades": list(app.upgrades),
            "retries": app.retries,
            "timeouts": {"connect": t.connect, "first_byte": t.first_byte, "idle": t.idle,
                         "total": t.total, "websocket_idle": t.websocket_idle,
                         "body_window": t.body_window, "body": t.body},
        }
        if app.prefix is not None:
            entry["prefix"] = app.prefix
        if app.port is not None:
            entry["port"] = app.port
        if app.cold is not None:
            c = app.cold
            entry["cold"] = {"state": c.state, "reason": c.reason, "queue": c.queue,
                             "wait": c.wait, "wake": c.wake}
        apps[app.name] = entry
    return {"version": snapshot.version, "proxy": proxy, "apps": apps}


def _fmt_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _read_process(proxy: Table) -> ProxyConfig:
    admin_value = proxy.text("admin", "127.0.0.1:9901")
    admin = None if admin_value in ("", "off") else parse_address(
        admin_value, source=proxy.source, key=proxy.key("admin"))
    return ProxyConfig(
        parser=proxy.text("parser", "httptools", choices=PARSERS),
        workers=proxy.integer("workers", 0, minimum=0, maximum=256),
        admin=admin,
        grace=proxy.duration("grace", 30.0),
    )


def _read_snapshot(root: Table, proxy: Table, *, version: int) -> RoutingSnapshot:
    settings = _read_settings(proxy)
    plain, secure = ([parse_address(value, source=proxy.source, key=proxy.key(name))
                      for value in proxy.str_list(name, default)]
                     for name, default in (("listen", ["0.0.0.0:8080"]), ("tls_listen", [])))
    problem = listener_problem(plain, secure, cert=settings.tls_cert is not None,
                               key=settings.tls_key is not None)
    if problem is not None:
        raise proxy.error(problem.setting, problem.message)
    shared = [Listener(host=h, port=p) for h, p in plain] + [
        Listener(host=h, port=p, tls=True) for h, p in secure]
    default_host = shared[0].host if shared else "0.0.0.0"
    dedicated_host = proxy.text("dedicated_host", default_host)
    proxy.done()

    apps_table = root.table("apps")
    apps: list[AppRoute] = []
    for name in apps_table:
        apps.append(_read_app(apps_table, name))
    apps_table.done()
    root.done()

    listeners = list(shared)
    taken_ports = {lst.port: "a shared listener" for lst in shared}
    hosts: dict[str, str] = {}
    prefixes: dict[str, str] = {}
    for app in apps:
        where = f"apps.{app.name}"
        if app.port is not None:
            if app.port in taken_ports:
                raise ConfigError(f"port {app.port} is already used by {taken_ports[app.port]}",
                                  source=root.source, key=f"{where}.port")
            taken_ports[app.port] = f"app {app.name!r}"
            listeners.append(Listener(host=dedicated_host, port=app.port, app=app.name))
        for host in app.hosts:
            if host in hosts:
                raise ConfigError(f"host {host!r} is already routed to app {hosts[host]!r}",
                                  source=root.source, key=f"{where}.hosts")
            hosts[host] = app.name
        if app.prefix is not None:
            if app.prefix in prefixes:
                raise ConfigError(
                    f"prefix {app.prefix!r} is already routed to app {prefixes[app.prefix]!r}",
                    source=root.source, key=f"{where}.prefix")
            prefixes[app.prefix] = app.name
    return RoutingSnapshot(version=version, listeners=tuple(listeners), apps=tuple(apps),
                           settings=settings)


def _read_settings(proxy: Table) -> ServerSettings:
    networks = []
    for value in proxy.str_list("trusted_proxies", []):
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise proxy.error("trusted_proxies", f"not an IP network: {value!r}") from None
    d = ServerSettings()
    return ServerSettings(
        header_timeout=_positive(proxy, "header_timeout", d.header_timeout),
        keepalive_timeout=_positive(proxy, "keepalive_timeout", d.keepalive_timeout),
        max_header_bytes=proxy.size("max_header_bytes", d.max_header_bytes),
        max_headers=proxy.integer("max_headers", d.max_headers, minimum=1, maximum=10_000),
        max_request_line=proxy.size("max_request_line", d.max_request_line),
        max_connections=proxy.integer("max_connections", d.max_connections, minimum=1),
        trusted_proxies=tuple(networks),
        access_log=proxy.flag("access_log", d.access_log),
        pool_idle_timeout=proxy.duration("pool_idle_timeout", d.pool_idle_timeout),
        pool_max_idle=proxy.integer("pool_max_idle", d.pool_max_idle, minimum=0),
        merge_slashes=proxy.flag("merge_slashes", d.merge_slashes),
        path_policy=proxy.text("path_policy", d.path_policy, choices=PATH_POLICIES),
        tls_cert=_path(proxy, "tls_cert"),
        tls_key=_path(proxy, "tls_key"),
    )


def _path(table: Table, name: str) -> str | None:
    value = table.text(name, None)
    if value is not None and not value.strip():
        raise table.error(name, "must be a file path")
    return None if value is None else str(value)


def _positive(table: Table, name: str, default: float) -> float:
    value = table.duration(name, default)
    if value <= 0:
        raise table.error(name, "must be greater than zero")
    return value


def _read_upgrades(t: Table) -> tuple[str, ...]:
    upgrades: list[str] = []
    for value in t.str_list("upgrades", list(DEFAULT_UPGRADES)):
        try:
            name = upgrade_protocol(value)
        except HTTPSyntaxError as exc:
            raise t.error("upgrades", str(exc)) from None
        if name not in upgrades:
            upgrades.append(name)
    return tuple(upgrades)


def _read_app(apps: Table, name: str) -> AppRoute:
    t = apps.table(name)
    if not _APP_NAME.fullmatch(name):
        raise apps.error(name, "app names are letters, digits, '-', '_' and '.' (max 63)")
    instances = []
    raw_instances = t.raw("instances", [])
    if not isinstance(raw_instances, list):
        raise t.error("instances", "expected a list of 'host:port' strings or tables")
    for index, item in enumerate(raw_instances):
        key = f"{t.key('instances')}[{index}]"
        if isinstance(item, str):
            host, port = parse_address(item, source=t.source, key=key)
            instances.append(Instance(id=item, host=host, port=port))
        else:
            it = Table(item, source=t.source, path=key)
            address = it.text("address")
            host, port = parse_address(address, source=t.source, key=it.key("address"))
            instances.append(Instance(id=it.text("id", address), host=host, port=port,
                                      standby=it.flag("standby", False)))
            it.done()
    if len({i.id for i in instances}) != len(instances):
        raise t.error("instances", "instance ids must be unique")

    prefix = t.text("prefix", None)
    if prefix is not None:
        try:
            prefix = normalize_path(prefix, merge_slashes=True)
        except HTTPSyntaxError as exc:
            raise t.error("prefix", str(exc)) from None
        if "?" in prefix or "%" in prefix:
            raise t.error("prefix", "a prefix is a plain path like '/hello'")
        prefix = prefix.rstrip("/") or "/"
    hosts = []
    for value in t.str_list("hosts", []):
        wildcard = value.startswith("*.")
        try:
            host = normalize_host(value[2:] if wildcard else value)
        except HTTPSyntaxError:
            raise t.error("hosts", f"not a host name: {value!r}") from None
        hosts.append("*." + host if wildcard else host)
    port = t.integer("port", None, minimum=1, maximum=65535)
    timeouts_table = t.table("timeouts")
    d = Timeouts()
    timeouts = Timeouts(
        connect=_positive(timeouts_table, "connect", d.connect),
        first_byte=_positive(timeouts_table, "first_byte", d.first_byte),
        idle=_positive(timeouts_table, "idle", d.idle),
        total=timeouts_table.duration("total", d.total),
        websocket_idle=_positive(timeouts_table, "websocket_idle", d.websocket_idle),
        body_window=_positive(timeouts_table, "body_window", d.body_window),
        body=timeouts_table.duration("body", d.body),
    )
    timeouts_table.done()
    cold = _read_cold(t) if t.has("cold") else None
    app = AppRoute(
        name=name,
        instances=tuple(instances),
        prefix=prefix,
        strip_prefix=t.flag("strip_prefix", False),
        rewrite_paths=t.flag("rewrite_paths", False),
        hosts=tuple(hosts),
        port=port,
        max_body=t.size("max_body", DEFAULT_MAX_BODY),
        min_body_rate=t.size("min_body_rate", DEFAULT_MIN_BODY_RATE),
        upgrades=_read_upgrades(t),
        retries=t.integer("retries", 2, minimum=0, maximum=10),
        timeouts=timeouts,
        cold=cold,
    )
    t.done()
    if prefix is None and not hosts and port is None:
        raise apps.error(name, "has no route: set prefix, hosts or port")
    return app


def _read_cold(app: Table) -> ColdStart:
    """``cold``: the scale-to-zero settings a driver sets (see ``snapshot.ColdStart``)."""
    c = app.table("cold")
    d = ColdStart()
    cold = ColdStart(
        state=c.text("state", d.state, choices=COLD_STATES),
        reason=c.text("reason", d.reason),
        queue=c.integer("queue", d.queue, minimum=1, maximum=100_000),
        wait=_positive(c, "wait", d.wait),
        wake=c.text("wake", d.wake),
    )
    c.done()
    return cold
