"""The app manifest: what an app's source says about how to build, run and route it.

An app's source tree carries ``superagent.toml`` (schema in docs/ARCHITECTURE.md,
"Apps, releases, instances"). A tree with only a ``Procfile`` is accepted as the
minimal manifest, as Heroku and piku users expect: its ``web:`` line is the run
command, the app name comes from the caller, everything else is a default. When
both files exist, ``superagent.toml`` wins and the Procfile is not read.

``parse_manifest`` is the one validator: it reads a parsed TOML document through
``superagent.config.Table``, so an unknown key or a bad value raises ConfigError
naming the file and the dotted key. ``spec_to_json`` writes a spec back into the
same document shape (JSON-safe: no ``None``, sizes as integers, durations as
seconds) and ``spec_from_json`` feeds it through ``parse_manifest`` again, so a
spec that crossed RPC or came out of the Raft log is validated exactly like one
read from disk, and the round trip is lossless for every spec the parser makes.

The sections about an app's instances (``[scale]``, ``[limits]``, ``[permissions]``: their
specs, readers and bounds) are in ``superagent.manifest_instances``; this module
assembles them and re-exports their public names, so callers import the app model from
here alone.

Everything here is pure apart from ``load_manifest``, which reads at most two
small files from the source directory. This is the one app model: the coordinator,
the participant, ``superagent pack`` and the CLI all read apps through it, so it
belongs to the shared core and imports no role package.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from superagent.config import Table, parse_toml
from superagent.errors import ConfigError, HTTPSyntaxError
from superagent.httprules import (
    DEFAULT_MIN_BODY_RATE,
    DEFAULT_UPGRADES,
    normalize_host,
    normalize_path,
    upgrade_protocol,
)
from superagent.manifest_instances import (
    AUTOSCALE_METRICS,
    FILESYSTEM_PERMISSIONS,
    MAX_CPU,
    MAX_INSTANCES,
    MAX_NOFILE,
    MAX_PER_NODE,
    MIN_MEMORY,
    MIN_NOFILE,
    NETWORK_PERMISSIONS,
    LimitsSpec,
    PermissionsSpec,
    ScaleSpec,
    describe_scale,
    read_limits,
    read_permissions,
    read_scale,
    scale_json,
)
from superagent.names import ENV_KEY, is_app_name

__all__ = [
    "AUTOSCALE_METRICS", "FILESYSTEM_PERMISSIONS", "MANIFEST", "MAX_CPU", "MAX_INSTANCES",
    "MAX_NOFILE", "MAX_PER_NODE", "MIN_MEMORY", "MIN_NOFILE", "NETWORK_PERMISSIONS",
    "PROCFILE", "PYTHON_PIN", "RESERVED_ENV", "RESERVED_ENV_PREFIX", "TEST_TIMEOUT",
    "AppSpec", "BuildSpec", "HealthSpec", "LimitsSpec", "PermissionsSpec", "RoutesSpec",
    "RunSpec", "ScaleSpec", "TestSpec", "describe_scale", "load_manifest", "manifest_from",
    "parse_manifest", "parse_procfile", "spec_from_json", "spec_to_json",
]

MANIFEST = "superagent.toml"
PROCFILE = "Procfile"

# App names, group names and environment keys follow superagent.names. The patterns are
# used with fullmatch: "^...$" with match() would accept a trailing newline.
_PROCFILE_LINE = re.compile(r"([A-Za-z0-9_-]+)\s*:\s*(.*)")
PYTHON_PIN = re.compile(r"3(\.\d{1,2})?")  # [build] python: "3" or "3.N"
RESERVED_ENV = "PORT"
RESERVED_ENV_PREFIX = "SUPERAGENT_"  # the agent sets SUPERAGENT_APP, _RELEASE, _INSTANCE, ...

TEST_TIMEOUT = 600.0  # seconds the [test] command may run; a test suite gets as long as a build


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildSpec:
    """``[build]``: ``command`` None means the detected default; ``python`` pins the
    interpreter's version (None: the machine's default one).

    Detection (done by the builder, not here): requirements.txt or pyproject.toml -> a
    virtual environment in .venv with the app's packages; package.json -> npm ci (with a
    lock file) or npm install.
    """

    command: str | None = None
    python: str | None = None  # "3" or "3.N": the interpreter version the release runs on


@dataclass(frozen=True, kw_only=True, slots=True)
class TestSpec:
    """``[test]``: the CI gate run once per release; ``command`` None means no gate."""

    __test__ = False  # not a pytest test class, despite the name

    command: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSpec:
    """``[run]`` (or the Procfile's ``web:`` line): the app must listen on 127.0.0.1:$PORT."""

    command: str


@dataclass(frozen=True, kw_only=True, slots=True)
class HealthSpec:
    """``[health]``: liveness (``path``) restarts, readiness (``ready_path``) gates traffic.

    Liveness: the instance is restarted after ``failures`` consecutive failed checks,
    one every ``interval`` seconds, each bounded by ``timeout``. Readiness must succeed
    within ``ready_deadline`` seconds of start. ``ready_path`` defaults to ``path``
    (also when the spec is built directly, so the JSON round trip stays lossless).
    """

    path: str | None = None
    ready_path: str | None = None
    interval: float = 5.0
    timeout: float = 2.0
    failures: int = 3
    ready_deadline: float = 60.0

    def __post_init__(self) -> None:
        if self.ready_path is None and self.path is not None:
            object.__setattr__(self, "ready_path", self.path)


@dataclass(frozen=True, kw_only=True, slots=True)
class RoutesSpec:
    """``[routes]``: path prefix on the shared port, host rules, dedicated port (all optional)."""

    prefix: str | None = None
    strip_prefix: bool = False
    rewrite_paths: bool = False  # put the stripped prefix back into Location/Set-Cookie paths
    hosts: tuple[str, ...] = ()
    port: int | None = None
    upgrades: tuple[str, ...] = DEFAULT_UPGRADES  # Upgrade protocols the proxy tunnels


@dataclass(frozen=True, kw_only=True, slots=True)
class AppSpec:
    """A validated manifest. ``env`` is sorted by key (also when built directly)."""

    name: str
    build: BuildSpec
    test: TestSpec
    run: RunSpec
    health: HealthSpec
    routes: RoutesSpec
    scale: ScaleSpec
    limits: LimitsSpec
    env: tuple[tuple[str, str], ...] = ()
    permissions: PermissionsSpec = PermissionsSpec()  # noqa: RUF009 - frozen, so shareable

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.env))
        if ordered != self.env:
            object.__setattr__(self, "env", ordered)

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)


# --- parsing -------------------------------------------------------------------------------


def parse_manifest(doc: Mapping[str, Any], *, source: str) -> AppSpec:
    """Validate a parsed ``superagent.toml`` document; raises ConfigError naming source and key."""
    root = Table(doc, source=source)
    app = root.table("app", required=True)
    name = _app_name(app)
    app.done()
    spec = AppSpec(
        name=name,
        build=_read_build(root.table("build")),
        test=TestSpec(command=_optional_command(root.table("test"))),
        run=_read_run(root.table("run", required=True)),
        health=_read_health(root.table("health")),
        routes=_read_routes(root.table("routes")),
        scale=read_scale(root.table("scale")),
        limits=read_limits(root.table("limits")),
        env=_read_env(root.table("env")),
        permissions=read_permissions(root.table("permissions")),
    )
    root.done()
    return spec


def _app_name(app: Table) -> str:
    name: str = app.text("name")
    if not is_app_name(name):
        raise app.error("name", (
            f"{name!r} is not a valid app name: use 1-40 lower-case letters, digits and '-', "
            "starting with a letter or digit (the name becomes part of a Unix user name and "
            "a cgroup name)"))
    return name


def _command(table: Table, name: str, value: str) -> str:
    if not value.strip():
        raise table.error(name, "must not be empty")
    if "\0" in value:
        raise table.error(name, "must not contain NUL characters")
    return value


def _read_build(table: Table) -> BuildSpec:
    python: str | None = table.text("python", None)
    if python is not None and not PYTHON_PIN.fullmatch(python):
        raise table.error("python", f'expected a Python version such as "3.11", got {python!r}')
    return BuildSpec(command=_optional_command(table), python=python)


def _optional_command(table: Table) -> str | None:
    value: str | None = table.text("command", None)
    table.done()
    if value is None:
        return None
    return _command(table, "command", value)


def _read_run(table: Table) -> RunSpec:
    command = _command(table, "command", table.text("command"))
    table.done()
    return RunSpec(command=command)


def _positive(table: Table, name: str, default: float) -> float:
    value = table.duration(name, default)
    if value <= 0:
        raise table.error(name, "must be greater than zero")
    return value


def _http_path(table: Table, name: str) -> str | None:
    value: str | None = table.text(name, None)
    if value is not None and not value.startswith("/"):
        raise table.error(name, f"must be a path starting with '/', got {value!r}")
    return value


def _read_health(table: Table) -> HealthSpec:
    d = HealthSpec()
    spec = HealthSpec(
        path=_http_path(table, "path"),
        ready_path=_http_path(table, "ready_path"),
        interval=_positive(table, "interval", d.interval),
        timeout=_positive(table, "timeout", d.timeout),
        failures=table.integer("failures", d.failures, minimum=1),
        ready_deadline=_positive(table, "ready_deadline", d.ready_deadline),
    )
    table.done()
    return spec


def _read_routes(table: Table) -> RoutesSpec:
    # Prefix and host rules are normalised exactly as the proxy normalises requests and
    # its own config, so a rule written here matches what the proxy will compare it to.
    prefix: str | None = table.text("prefix", None)
    if prefix is not None:
        try:
            prefix = normalize_path(prefix, merge_slashes=True)
        except HTTPSyntaxError as exc:
            raise table.error("prefix", f"{exc}, got {prefix!r}") from None
        if "?" in prefix or "%" in prefix:
            raise table.error("prefix", f"a prefix is a plain path like '/hello', got {prefix!r}")
        prefix = prefix.rstrip("/") or "/"
    strip_prefix = table.flag("strip_prefix", False)
    if strip_prefix and prefix is None:
        raise table.error("strip_prefix", "needs a prefix to strip: set routes.prefix")
    rewrite_paths = table.flag("rewrite_paths", False)
    if rewrite_paths and not strip_prefix:
        raise table.error("rewrite_paths", "rewrites the paths of a stripped prefix: set"
                                           " routes.strip_prefix")
    hosts: list[str] = []
    for value in table.str_list("hosts", []):
        host = _host_rule(table, value)
        if host in hosts:
            raise table.error("hosts", f"host {host!r} is listed twice")
        hosts.append(host)
    port: int | None = table.integer("port", None, minimum=1, maximum=65535)
    upgrades: list[str] = []
    for value in table.str_list("upgrades", list(DEFAULT_UPGRADES)):
        try:
            upgrades.append(upgrade_protocol(value))
        except HTTPSyntaxError as exc:
            raise table.error("upgrades", str(exc)) from None
    table.done()
    return RoutesSpec(prefix=prefix, strip_prefix=strip_prefix, rewrite_paths=rewrite_paths,
                      hosts=tuple(hosts), port=port, upgrades=tuple(dict.fromkeys(upgrades)))


def _host_rule(table: Table, value: str) -> str:
    wildcard = value.startswith("*.")
    bare = value[2:] if wildcard else value
    # normalize_host drops a ":port" (it parses Host headers); in a rule that is a mistake.
    if ":" in bare and not bare.startswith("["):
        raise table.error("hosts", f"a host rule has no port (use routes.port), got {value!r}")
    try:
        host = normalize_host(bare)
    except HTTPSyntaxError:
        raise table.error("hosts", f"not a host name: {value!r}") from None
    return "*." + host if wildcard else host


def _read_env(table: Table) -> tuple[tuple[str, str], ...]:
    env: list[tuple[str, str]] = []
    for key in table:
        if not ENV_KEY.fullmatch(key):
            raise table.error(key, "environment variable names are letters, digits and '_', "
                                   "not starting with a digit")
        if key == RESERVED_ENV or key.startswith(RESERVED_ENV_PREFIX):
            raise table.error(key, f"is reserved: the agent sets {RESERVED_ENV} and "
                                   f"{RESERVED_ENV_PREFIX}* for every instance")
        value = table.raw(key)
        if not isinstance(value, str):
            raise table.error(key, f"expected a string (quote it), got {value!r}")
        if "\0" in value:
            raise table.error(key, "must not contain NUL characters")
        env.append((key, value))
    table.done()
    return tuple(sorted(env))


# --- files ---------------------------------------------------------------------------------


def parse_procfile(text: str, *, source: str) -> dict[str, str]:
    """Process types to commands from a Procfile's text; raises ConfigError naming the line.

    Lines are ``type: command``; blank lines and ``#`` comments are skipped.
    """
    processes: dict[str, str] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"line {number}"
        match = _PROCFILE_LINE.fullmatch(line)
        if match is None:
            raise ConfigError(f"expected 'type: command', got {line!r}", source=source, key=where)
        kind, command = match.group(1), match.group(2).strip()
        if not command:
            raise ConfigError(f"process type {kind!r} has no command", source=source, key=where)
        if kind in processes:
            raise ConfigError(f"process type {kind!r} is listed twice", source=source, key=where)
        processes[kind] = command
    return processes


def load_manifest(directory: Path, *, app: str | None = None) -> AppSpec:
    """The manifest of the app source in ``directory``; raises ConfigError.

    ``superagent.toml`` if present (``app``, when given, must match its ``[app] name``
    and stands in for it when the name is left out); otherwise a ``Procfile`` with a
    ``web:`` line, named by ``app``, which is then required.
    """

    def read(name: str) -> bytes | None:
        try:
            return (directory / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}",
                              source=str(directory / name)) from exc

    return manifest_from(read, source=str(directory), app=app)


def manifest_from(read: Callable[[str], bytes | None], *, source: str,
                  app: str | None = None) -> AppSpec:
    """``load_manifest`` over any file source: ``read(name)`` gives a top-level file's
    bytes, or None when it does not exist (a directory, a tarball...)."""
    data = read(MANIFEST)
    if data is not None:
        where = f"{source}/{MANIFEST}"
        doc = parse_toml(data, source=where)
        app_table = doc.get("app")
        if app is not None and isinstance(app_table, dict) and "name" not in app_table:
            doc["app"] = {**app_table, "name": app}
        elif app is not None and "app" not in doc:
            doc["app"] = {"name": app}
        spec = parse_manifest(doc, source=where)
        if app is not None and spec.name != app:
            raise ConfigError(f"names app {spec.name!r} but is being deployed as {app!r}",
                              source=where, key="app.name")
        return spec
    data = read(PROCFILE)
    if data is not None:
        where = f"{source}/{PROCFILE}"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"not UTF-8 text (byte {exc.start})", source=where) from exc
        web = parse_procfile(text, source=where).get("web")
        if web is None:
            raise ConfigError("has no 'web:' line (the command that serves HTTP on $PORT)",
                              source=where)
        if app is None:
            raise ConfigError(f"a Procfile does not name the app: give the app name, or add "
                              f"{MANIFEST} with [app] name", source=where)
        return parse_manifest({"app": {"name": app}, "run": {"command": web}}, source=where)
    raise ConfigError(f"no app manifest: expected {MANIFEST} or a {PROCFILE} with a 'web:' line",
                      source=source)


# --- JSON codec ----------------------------------------------------------------------------


def spec_to_json(spec: AppSpec) -> dict[str, Any]:
    """The JSON-safe manifest document that ``spec_from_json`` turns back into ``spec``."""
    h, r, s, lim = spec.health, spec.routes, spec.scale, spec.limits
    health: dict[str, Any] = {"interval": h.interval, "timeout": h.timeout,
                              "failures": h.failures, "ready_deadline": h.ready_deadline}
    _put(health, "path", h.path)
    _put(health, "ready_path", h.ready_path)
    routes: dict[str, Any] = {"strip_prefix": r.strip_prefix, "hosts": list(r.hosts)}
    if r.rewrite_paths:
        routes["rewrite_paths"] = True
    _put(routes, "prefix", r.prefix)
    _put(routes, "port", r.port)
    if r.upgrades != DEFAULT_UPGRADES:  # only when set: older documents stay as they were
        routes["upgrades"] = list(r.upgrades)
    limits: dict[str, Any] = {"nofile": lim.nofile, "timeout": lim.timeout,
                              "max_body": lim.max_body}
    if lim.min_body_rate != DEFAULT_MIN_BODY_RATE:
        limits["min_body_rate"] = lim.min_body_rate
    _put(limits, "memory", lim.memory)
    _put(limits, "cpu", lim.cpu)
    _put(limits, "pids", lim.pids)
    build: dict[str, Any] = {}
    _put(build, "command", spec.build.command)
    _put(build, "python", spec.build.python)
    test: dict[str, Any] = {}
    _put(test, "command", spec.test.command)
    return {
        "app": {"name": spec.name},
        "build": build,
        "test": test,
        "run": {"command": spec.run.command},
        "health": health,
        "routes": routes,
        "scale": scale_json(s),
        "limits": limits,
        "env": dict(spec.env),
        # only when set: a spec without permissions keeps the document older versions wrote
        **({"permissions": {"network": spec.permissions.network,
                            "filesystem": spec.permissions.filesystem}}
           if spec.permissions != PermissionsSpec() else {}),
    }


def _put(target: dict[str, Any], key: str, value: object) -> None:
    if value is not None:  # JSON has null, TOML does not: absent means "not set" in both
        target[key] = value


def spec_from_json(doc: Mapping[str, Any]) -> AppSpec:
    """Validate a spec received over RPC or from the log; raises ConfigError (source "spec")."""
    return parse_manifest(doc, source="spec")
