"""The manifest's sections about an app's instances: ``[scale]``, ``[limits]``, ``[permissions]``.

How many instances an app runs and where (``ScaleSpec``: per node in machine groups, a
total, or autoscaled between bounds), what each may use (``LimitsSpec``: memory, CPU,
tasks, files, and the proxy's request limits for the app) and may do
(``PermissionsSpec``: egress, writable filesystem). Each section's frozen spec, its
reader (``read_scale``, ``read_limits``, ``read_permissions``: a ``superagent.config.Table``
in, a spec out, ConfigError naming the key for anything wrong) and the bounds every role
applies (``MAX_PER_NODE``, ``MAX_INSTANCES``...) live here; ``superagent.manifest``
assembles them into the ``AppSpec``, re-exports every public name here, and is what the
rest of superagent imports. ``scale_json`` writes ``[scale]`` back into the document
``spec_to_json`` makes, and ``describe_scale`` puts a stored scale into words.

Pure: no I/O. Part of the shared core, so it imports no role package.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from superagent.config import Table
from superagent.httprules import DEFAULT_MAX_BODY, DEFAULT_MIN_BODY_RATE
from superagent.names import group_name_problem

MIN_MEMORY = 4 * 1024**2  # below this not even a bare interpreter starts; a typo like "256K"
MAX_CPU = 64.0  # cores; more is a typo (cpu = 500 meaning 500 millicores)
MAX_PER_NODE = 64  # instances of one app on one machine; more is a typo, not a plan
AUTOSCALE_METRICS = ("in_flight", "cpu")  # what [scale] target is per instance of
MAX_INSTANCES = 10_000  # instances of one app in the whole cluster (a node takes 10,000 at most)
MIN_NOFILE = 64  # an interpreter with a listening socket and a few imports needs this many
MAX_NOFILE = 1024**2  # the Linux default fs.nr_open; setrlimit fails above it


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


# --- parsing -------------------------------------------------------------------------------


def read_scale(table: Table) -> ScaleSpec:
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


def read_limits(table: Table) -> LimitsSpec:
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


def read_permissions(table: Table) -> PermissionsSpec:
    spec = PermissionsSpec(
        network=table.text("network", "any", choices=NETWORK_PERMISSIONS),
        filesystem=table.text("filesystem", "any", choices=FILESYSTEM_PERMISSIONS))
    table.done()
    return spec


# --- JSON and words ------------------------------------------------------------------------


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


def scale_json(s: ScaleSpec) -> dict[str, Any]:
    """``[scale]`` as ``spec_to_json`` writes it."""
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
