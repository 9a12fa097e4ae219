"""``InstanceConfig``: everything one supervised instance needs, and its persisted form.

Built from a release's manifest (``from_spec``: command, env, health, limits,
permissions) when the agent starts an instance; written into the agent's state.json as
``to_record`` and rebuilt by ``from_record`` when a restarted agent adopts it (the
agent's cgroup and permission support are not recorded: they are the machine's, detected
afresh). The tunables of supervision (grace, restart backoff, crash-loop window, log
rotation size) default to the named constants here. ``supervisor.Instance`` runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from superagent.manifest import AppSpec, HealthSpec
from superagent.participant.cgroups import CgroupLimits, CgroupSupport, app_cpu_weight
from superagent.participant.errors import SupervisorError
from superagent.participant.isolation import AppUser, RLimits
from superagent.participant.permissions import PermissionSupport, Sandbox, build_sandbox

DEFAULT_GRACE = 10.0  # seconds between SIGTERM and SIGKILL; what most app servers need to drain
BACKOFF_INITIAL = 0.5  # first restart delay; doubles per consecutive crash
BACKOFF_MAX = 30.0  # cap on the restart delay
MAX_RESTARTS = 5  # this many restarts within RESTART_WINDOW is a crash loop
RESTART_WINDOW = 60.0  # seconds
LOG_MAX_BYTES = 10 * 1024**2  # rotate a log file over this size at the next spawn


@dataclass(frozen=True, kw_only=True)
class InstanceConfig:
    """Everything one instance needs; tunables default to the named constants above.

    ``cwd`` is the release's source directory, ``home`` a writable per-instance directory
    (created, and chowned to the app user when switching), ``cgroups`` the agent's
    detected support (None: no cgroup at all).
    """

    app: str
    release: str
    instance: str
    port: int
    cwd: Path
    command: str
    home: Path
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    health: HealthSpec = field(default_factory=HealthSpec)
    user: AppUser | None = None
    cgroups: CgroupSupport | None = None
    cgroup_limits: CgroupLimits = field(default_factory=CgroupLimits)
    rlimits: RLimits = field(default_factory=RLimits)
    # [permissions] of the manifest; ``writable`` the trees a "release" filesystem keeps
    # writable; ``permission_support`` what the agent can enforce (not recorded, like cgroups)
    network: str = "any"
    filesystem: str = "any"
    writable: tuple[Path, ...] = ()
    permission_support: PermissionSupport | None = None
    grace: float = DEFAULT_GRACE
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX
    max_restarts: int = MAX_RESTARTS
    restart_window: float = RESTART_WINDOW
    log_max_bytes: int = LOG_MAX_BYTES

    @classmethod
    def from_spec(cls, spec: AppSpec, *, release: str, instance: str, port: int, cwd: Path,
                  home: Path, log_dir: Path, user: AppUser | None = None,
                  cgroups: CgroupSupport | None = None, release_dir: Path | None = None,
                  permissions: PermissionSupport | None = None) -> InstanceConfig:
        """The config of an instance of ``spec`` (limits, health, env, command and
        permissions from it); ``release_dir`` and ``home`` stay writable under
        ``filesystem = "release"``."""
        limits = spec.limits
        return cls(app=spec.name, release=release, instance=instance, port=port, cwd=cwd,
                   command=spec.run.command, home=home, log_dir=log_dir, env=spec.env_dict(),
                   health=spec.health, user=user, cgroups=cgroups,
                   cgroup_limits=CgroupLimits(memory=limits.memory, cpu=limits.cpu,
                                              cpu_weight=app_cpu_weight(limits.cpu),
                                              pids=limits.pids),
                   rlimits=RLimits(nofile=limits.nofile),
                   network=spec.permissions.network, filesystem=spec.permissions.filesystem,
                   writable=(release_dir or cwd, home), permission_support=permissions)

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict from which ``from_record`` rebuilds this config.

        ``cgroups`` is left out: it is the agent's detected support, not the instance's.
        """
        return {
            "app": self.app, "release": self.release, "instance": self.instance,
            "port": self.port, "cwd": str(self.cwd), "command": self.command,
            "home": str(self.home), "log_dir": str(self.log_dir), "env": dict(self.env),
            "health": asdict(self.health),
            "user": asdict(self.user) if self.user is not None else None,
            "cgroup_limits": asdict(self.cgroup_limits), "rlimits": asdict(self.rlimits),
            "network": self.network, "filesystem": self.filesystem,
            "writable": [str(p) for p in self.writable], "grace": self.grace,
            "backoff_initial": self.backoff_initial,
            "backoff_max": self.backoff_max, "max_restarts": self.max_restarts,
            "restart_window": self.restart_window, "log_max_bytes": self.log_max_bytes,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, cgroups: CgroupSupport | None = None,
                    permissions: PermissionSupport | None = None) -> InstanceConfig:
        """The config ``to_record`` wrote, with the agent's current cgroup ``support``.

        Raises ``SupervisorError`` naming the problem when the record is malformed.
        """
        try:
            user = record["user"]
            return cls(
                app=record["app"], release=record["release"], instance=record["instance"],
                port=int(record["port"]), cwd=Path(record["cwd"]), command=record["command"],
                home=Path(record["home"]), log_dir=Path(record["log_dir"]),
                env={str(k): str(v) for k, v in record["env"].items()},
                health=HealthSpec(**record["health"]),
                user=AppUser(**user) if user is not None else None, cgroups=cgroups,
                cgroup_limits=CgroupLimits(**record["cgroup_limits"]),
                rlimits=RLimits(**record["rlimits"]), grace=float(record["grace"]),
                # records of agents before [permissions] have none: "any"
                network=str(record.get("network", "any")),
                filesystem=str(record.get("filesystem", "any")),
                writable=tuple(Path(p) for p in record.get("writable", ())),
                permission_support=permissions,
                backoff_initial=float(record["backoff_initial"]),
                backoff_max=float(record["backoff_max"]),
                max_restarts=int(record["max_restarts"]),
                restart_window=float(record["restart_window"]),
                log_max_bytes=int(record["log_max_bytes"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SupervisorError(f"malformed instance record: {exc!r}",
                                  app=str(record.get("app", "")),
                                  instance=str(record.get("instance", ""))) from exc

    def sandbox(self) -> Sandbox:
        """The instance's permissions as this agent can enforce them."""
        return build_sandbox(self.permission_support, network=self.network,
                             filesystem=self.filesystem, writable=self.writable,
                             switched_user=self.user is not None and self.user.switched,
                             loopback_gid=self.user.loopback_gid if self.user else None)

    @property
    def out_log(self) -> Path:
        return self.log_dir / f"{self.instance}.out.log"

    @property
    def err_log(self) -> Path:
        return self.log_dir / f"{self.instance}.err.log"
