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
    DEFAULT_MAX_BODY,
    DEFAULT_MIN_BODY_RATE,
    DEFAULT_UPGRADES,
    normalize_host,
    normalize_path,
    upgrade_protocol,
)
from superagent.names import ENV_KEY, group_name_problem, is_app_name

MANIFEST = "superagent.toml"
PROCFILE = "Procfile"

# App names, group names and environment keys follow superagent.names. The patterns are
# used with fullmatch: "^...$" with match() would accept a trailing newline.
_PROCFILE_LINE = re.compile(r"([A-Za-z0-9_-]+)\s*:\s*(.*)")
PYTHON_PIN = re.compile(r"3(\.\d{1,2})?")  # [build] python: "3" or "3.N"
RESERVED_ENV = "PORT"
RESERVED_ENV_PREFIX = "SUPERAGENT_"  # the agent sets SUPERAGENT_APP, _RELEASE, _INSTANCE, ...

MIN_MEMORY = 4 * 1024**2  # below this not even a bare interpreter starts; a typo like "256K"
MAX_CPU = 64.0  # cores; more is a typo (cpu = 500 meaning 500 millicores)
MAX_PER_NODE = 64  # instances of one app on one machine; more is a typo, not a plan
AUTOSCALE_METRICS = ("in_flight", "cpu")  # what [scale] target is per instance of
MAX_INSTANCES = 10_000  # instances of one app in the whole cluster (a node takes 10,000 at most)
MIN_NOFILE = 64  # an interpreter with a listening socket and a few imports needs this many
MAX_NOFILE = 1024**2  # the Linux default fs.nr_open; setrlimit fails above it
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
class ScaleSpec:
    """``[scale]``: ``per_node`` instances on every machine of ``groups``, or, with
    ``instances`` set, that many in total spread over those machines.

    ``per_node`` does not apply when ``instances`` is set; it is then kept at its default
    (also when the spec is built directly), so the JSON round trip stays lossless.
    ``idle_timeout`` > 0 scales to zero after that many idle seconds; 0 never does.
    With ``min``/``max`` set the app is autoscaled: between ``min`` and ``max`` instances
    in total, aiming at ``target`` per instance of ``metric`` (``in_flight`` requests, or
    ``cpu`` cores); ``instances`` and ``per_node`` then do not apply.
    """

    groups: tuple[str, ...] = ("default",)
    per_node: int = 1
    instances: int | None = None
    idle_timeout: float = 0.0
    min: int | None = None
    max: int | None = None
    target: float | None = None
    metric: str = "in_flight"

    @property
    def auto(self) -> dict[str, Any] | None:
        """The autoscaling policy as the coordinator stores it, or None."""
        if self.min is None or self.max is None or self.target is None:
            return None
        return {"min": self.min, "max": self.max, "target": self.target,
                "metric": self.metric}

    def __post_init__(self) -> None:
        if self.instances is not None and self.per_node != 1:
            object.__setattr__(self, "per_node", 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class LimitsSpec:
    """``[limits]``: per-instance resources and the proxy's limits for this app.

    ``memory`` in bytes, ``cpu`` in cores, ``pids`` a task count; None is unlimited.
    ``timeout`` is the proxy's whole-request timeout in seconds (0: none) and
    ``max_body`` the request body limit in bytes (0: none), ``min_body_rate`` the
    slowest a streamed request body may arrive, in bytes per second (0: no minimum).
    """

    memory: int | None = None
    cpu: float | None = None
    pids: int | None = None
    nofile: int = 4096
    timeout: float = 30.0
    max_body: int = DEFAULT_MAX_BODY
    min_body_rate: int = DEFAULT_MIN_BODY_RATE


NETWORK_PERMISSIONS = ("any", "loopback")  # [permissions] network
FILESYSTEM_PERMISSIONS = ("any", "release")  # [permissions] filesystem


@dataclass(frozen=True, kw_only=True, slots=True)
class PermissionsSpec:
    """``[permissions]``: what an app's instances may do (the agent enforces it where the
    kernel lets it, and its status says where it cannot). ``network = "loopback"``: no
    egress except to loopback addresses; ``filesystem = "release"``: everything outside
    the release and the instance's data directory is read-only."""

    network: str = "any"
    filesystem: str = "any"


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
    permissions: PermissionsSpec = PermissionsSpec()

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
        scale=_read_scale(root.table("scale")),
        limits=_read_limits(root.table("limits")),
        env=_read_env(root.table("env")),
        permissions=_read_permissions(root.table("permissions")),
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


def _read_scale(table: Table) -> ScaleSpec:
    d = ScaleSpec()
    groups = table.str_list("groups", list(d.groups))
    if not groups:
        raise table.error("groups", "must name at least one machine group")
    for group in groups:
        problem = group_name_problem(group)
        if problem is not None:
            raise table.error("groups", problem)
    if len(set(groups)) != len(groups):
        raise table.error("groups", "a group is listed twice")
    instances: int | None = table.integer("instances", None, minimum=1, maximum=MAX_INSTANCES)
    if instances is not None and table.has("per_node"):
        raise table.error("instances", "is K instances in total, per_node is k on every "
                                       "machine: set one of the two, not both")
    idle_timeout = table.duration("idle_timeout", d.idle_timeout)
    spec = ScaleSpec(
        groups=tuple(groups),
        per_node=table.integer("per_node", d.per_node, minimum=0, maximum=MAX_PER_NODE),
        instances=instances,
        idle_timeout=idle_timeout,
        **_read_autoscale(table, idle_timeout),
    )
    table.done()
    return spec


def _read_autoscale(table: Table, idle_timeout: float) -> dict[str, Any]:
    """``min``, ``max``, ``target``, ``metric``: all of min/max/target, or none of them.
    ``min = 0`` only with ``idle_timeout``: the app scales to zero on its nodes when idle
    (while it serves, the autoscaler's floor is 1)."""
    keys = ("min", "max", "target", "metric")
    given = [key for key in keys if table.has(key)]
    if not given:
        return {}
    for key in ("min", "max", "target"):
        if not table.has(key):
            raise table.error(key, f"is required with {', '.join(given)}: autoscaling needs"
                                   " min, max and target")
    for other in ("instances", "per_node"):
        if table.has(other):
            raise table.error(other, "does not apply to an autoscaled app (min/max set):"
                                     " remove it")
    # at least 1: with none running no load is reported, so nothing would ever scale up;
    # 0 is the idle app of scale to zero, which a request starts on its node
    if table.raw("min") == 0 and idle_timeout <= 0:
        raise table.error("min", "must be at least 1 without [scale] idle_timeout (0: the"
                                 " app scales to zero, which needs idle_timeout)")
    low = table.integer("min", minimum=0 if idle_timeout > 0 else 1, maximum=MAX_INSTANCES)
    high = table.integer("max", minimum=1, maximum=MAX_INSTANCES)
    if low > high:
        raise table.error("min", f"must not be above max ({low} > {high})")
    target = table.raw("target")
    if isinstance(target, bool) or not isinstance(target, int | float) or not (
            0 < target < float("inf")):
        raise table.error("target", f"must be a positive number per instance, not {target!r}")
    metric = table.raw("metric", "in_flight")
    if metric not in AUTOSCALE_METRICS:
        raise table.error("metric", f"must be one of {', '.join(AUTOSCALE_METRICS)},"
                                    f" not {metric!r}")
    return {"min": low, "max": high, "target": float(target), "metric": metric}


def _read_limits(table: Table) -> LimitsSpec:
    d = LimitsSpec()
    memory: int | None = None
    if table.has("memory"):
        memory = table.size("memory", 0)
        if memory < MIN_MEMORY:
            raise table.error("memory", f"must be at least 4M, got {memory} bytes")
    cpu_value = table.raw("cpu")
    cpu: float | None = None
    if cpu_value is not None:
        if isinstance(cpu_value, bool) or not isinstance(cpu_value, int | float):
            raise table.error("cpu", f"expected a number of cores like 0.5, got {cpu_value!r}")
        if not 0 < cpu_value <= MAX_CPU:
            raise table.error("cpu", f"must be more than 0 and at most {MAX_CPU:g} cores, "
                                     f"got {cpu_value!r}")
        cpu = float(cpu_value)
    spec = LimitsSpec(
        memory=memory,
        cpu=cpu,
        pids=table.integer("pids", None, minimum=1),
        nofile=table.integer("nofile", d.nofile, minimum=MIN_NOFILE, maximum=MAX_NOFILE),
        timeout=table.duration("timeout", d.timeout),
        max_body=table.size("max_body", d.max_body),
        min_body_rate=table.size("min_body_rate", d.min_body_rate),
    )
    table.done()
    return spec


def _read_permissions(table: Table) -> PermissionsSpec:
    spec = PermissionsSpec(
        network=table.text("network", "any", choices=NETWORK_PERMISSIONS),
        filesystem=table.text("filesystem", "any", choices=FILESYSTEM_PERMISSIONS))
    table.done()
    return spec


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
        "scale": _scale_json(s),
        "limits": limits,
        "env": dict(spec.env),
        # only when set: a spec without permissions keeps the document older versions wrote
        **({"permissions": {"network": spec.permissions.network,
                            "filesystem": spec.permissions.filesystem}}
           if spec.permissions != PermissionsSpec() else {}),
    }


def describe_scale(scale: Mapping[str, Any]) -> str:
    """A scale document (``ClusterState.effective_scale``, the API's ``scale``) in words:
    "2 per node in web,api", "5 instances in web" or "1-8 instances in web, autoscaled to
    10 in_flight per instance"."""
    groups = ",".join(scale["groups"])
    auto = scale.get("auto")
    if auto is not None:
        return (f"{auto['min']}-{auto['max']} instances in {groups}, autoscaled to"
                f" {auto['target']:g} {auto['metric']} per instance")
    if scale.get("instances") is not None:
        return f"{scale['instances']} instances in {groups}"
    return f"{scale['per_node']} per node in {groups}"


def _scale_json(s: ScaleSpec) -> dict[str, Any]:
    # per_node and instances exclude each other in a manifest, so only the one that applies
    # is written; a spec without instances keeps the document older coordinators wrote.
    doc: dict[str, Any] = {"groups": list(s.groups), "idle_timeout": s.idle_timeout}
    if s.auto is not None:
        doc.update(s.auto)
    elif s.instances is None:
        doc["per_node"] = s.per_node
    else:
        doc["instances"] = s.instances
    return doc


def _put(target: dict[str, Any], key: str, value: object) -> None:
    if value is not None:  # JSON has null, TOML does not: absent means "not set" in both
        target[key] = value


def spec_from_json(doc: Mapping[str, Any]) -> AppSpec:
    """Validate a spec received over RPC or from the log; raises ConfigError (source "spec")."""
    return parse_manifest(doc, source="spec")
