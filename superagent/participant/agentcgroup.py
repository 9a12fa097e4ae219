"""The agent's own cpu group: the agent and its proxy workers weighted above the apps.

Theory of operation
-------------------
A quota bounds a hog's share over a period, not when it runs: a proxy worker that wakes
up on a core where a neighbour's hog runs waits for the scheduler to prefer it.
``AgentCgroup`` is the group ``<parent>.agent``, a sibling of ``<parent>`` at the
hierarchy's top, with the highest cpu weight (``AGENT_CPU_WEIGHT``) against the apps'
default (``APP_CPU_WEIGHT``, given to every app group and to ``<parent>`` itself): the
agent and its proxy workers move into it, so a waking worker preempts the apps at once.
Only the cpu controller: in v1 the agent keeps its memory and pids groups (whatever
started it set those), in v2 a group has all controllers but only ``cpu.weight`` is
written. Processes the agent starts later (proxy workers) inherit it; instances do not,
they join their own group. Builds and ``[test]`` commands run the apps' code too: they
join ``<parent>/_builds`` (``AgentCgroup.builds``), weighted as one app, rather than
outweighing every app and competing with the proxy workers at the agent's weight.

``AgentCgroup.create`` makes the groups once at agent start; it never raises (a failure
is its ``reason``: the proxy then shares the CPU with the apps). The weights in cgroup v2
units are ``cgroups``' constants; v1 gets the equivalent ``cpu.shares``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from superagent.participant.cgroupfs import read as _read
from superagent.participant.cgroupfs import write as _write
from superagent.participant.cgroups import (
    AGENT_CPU_WEIGHT,
    AGENT_GROUP_SUFFIX,
    APP_CPU_WEIGHT,
    APPS_CPU_WEIGHT,
    BUILDS_GROUP,
    CgroupSupport,
    v1_shares,
)

log = structlog.get_logger("superagent.participant")


@dataclass(frozen=True, kw_only=True)
class AgentCgroup:
    """The agent's cpu group (see the module docstring), as ``AgentCgroup.create``
    left it: ``path`` None when there is none (mode "none", or it could not be made, with
    ``reason``); ``weight`` the value read back (cpu.weight, or cpu.shares in v1)."""

    path: Path | None
    reason: str
    weight: str = ""
    builds: Path | None = None  # cgroup.procs of <parent>/_builds in the cpu hierarchy
    origin: Path | None = None  # the cpu group the creating process was in (``leave``)

    @classmethod
    def create(cls, support: CgroupSupport, *, weight: int = AGENT_CPU_WEIGHT) -> AgentCgroup:
        """Make ``<parent>.agent`` with ``weight`` and give ``<parent>`` (the apps' common
        group) the apps' weight. Never raises: a failure is the ``reason`` (one warning)."""
        if support.mode == "none":
            return cls(path=None, reason=f"no cgroups: {support.reason}")
        cpu_root = support.v2_root if support.mode == "v2" else support.v1_roots.get("cpu")
        if cpu_root is None:
            return cls(path=None, reason="no cpu hierarchy")
        path = cpu_root / f"{support.parent}{AGENT_GROUP_SUFFIX}"
        apps = cpu_root / support.parent
        builds = apps / BUILDS_GROUP
        try:
            path.mkdir(exist_ok=True)
            apps.mkdir(exist_ok=True)
            builds.mkdir(exist_ok=True)
            if support.mode == "v2":
                _write(path / "cpu.weight", str(weight))
                _write(apps / "cpu.weight", str(APPS_CPU_WEIGHT))
                _write(builds / "cpu.weight", str(APP_CPU_WEIGHT))
                applied = _read(path / "cpu.weight")
            else:
                _write(path / "cpu.shares", str(v1_shares(weight)))
                _write(apps / "cpu.shares", str(v1_shares(APPS_CPU_WEIGHT)))
                _write(builds / "cpu.shares", str(v1_shares(APP_CPU_WEIGHT)))
                applied = _read(path / "cpu.shares")
        except OSError as exc:
            reason = f"cannot set up the agent's cpu group {path}: {exc.strerror or exc}"
            log.warning("agent cgroup unusable: the proxy shares the CPU with the apps",
                        reason=reason)
            return cls(path=None, reason=reason)
        key = "cpu.weight" if support.mode == "v2" else "cpu.shares"
        origin = _own_cpu_group(support, cpu_root)
        return cls(path=path, reason=f"{path} with {key} {applied}", weight=applied,
                   builds=builds / "cgroup.procs", origin=None if origin == path else origin)

    def leave(self) -> None:
        """Move this process back to the group it came from and remove the agent's group
        (empty once the proxy workers stopped): the node is going away. Never raises."""
        if self.path is None or self.origin is None:
            return
        with contextlib.suppress(OSError):
            _write(self.origin / "cgroup.procs", str(os.getpid()))
        with contextlib.suppress(OSError):
            self.path.rmdir()

    def add(self, pid: int) -> str | None:
        """Move process ``pid`` (all its threads) in; None when done, else why not."""
        if self.path is None:
            return self.reason
        try:
            _write(self.path / "cgroup.procs", str(pid))
        except OSError as exc:
            return f"cannot move pid {pid} into {self.path}: {exc.strerror or exc}"
        return None

    def to_json(self) -> dict[str, object]:
        return {"path": str(self.path) if self.path is not None else None,
                "weight": self.weight, "reason": self.reason}


def _own_cpu_group(support: CgroupSupport, cpu_root: Path) -> Path | None:
    """This process's group in the cpu hierarchy ``cpu_root``, from /proc/self/cgroup."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if (controllers == "" if support.mode == "v2" else "cpu" in controllers.split(",")):
            return cpu_root / where.lstrip("/")
    return None
