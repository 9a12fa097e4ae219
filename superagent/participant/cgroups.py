"""cgroups of app instances: detection at agent start, one group per instance.

Theory of operation
-------------------
An instance is an ordinary process that must not disturb the other tenants'
instances on the same machine; its cgroup bounds its memory, cpu and pids. Two
steps, both used by the supervisor (``isolation.child_setup`` puts the child in
the group):

1. **Detection, once at start.** ``detect_cgroups()`` looks for a cgroup v2
   hierarchy with the ``cpu`` and ``memory`` controllers (at ``/sys/fs/cgroup``
   on a pure-v2 machine, or ``/sys/fs/cgroup/unified`` on a hybrid one) and
   enables them down to our parent group (``superagent`` by default). Failing
   that it takes the v1 ``memory``, ``cpu`` and ``pids`` hierarchies when they
   are mounted and writable. Failing both, the mode is ``"none"``, with a reason
   and one warning: instances then run without memory, cpu or pids limits.
2. **A cgroup per instance.** ``InstanceCgroup.create()`` makes
   ``<parent>/<app>/<instance>`` in each hierarchy and writes the limits:
   memory (swap capped at 0 where the kernel accounts swap, so an instance over
   its limit is OOM-killed rather than swapping the machine to a halt), a CFS
   cpu quota, a cpu weight and a pids maximum. It reads the limits back, so the
   report shows what the kernel really applied. ``kill_all()`` and ``remove()``
   end it. In mode ``"none"`` every method is a no-op and ``repr()`` says why.
3. **The agent's own group** (``agentcgroup.AgentCgroup``): the agent and its proxy
   workers run weighted above the apps, whose groups get ``APP_CPU_WEIGHT`` (less
   for a quota under a core, ``app_cpu_weight``).
4. **Confinement to CPUs.** Where the machine has the cpuset controller (v2
   ``cpuset``, else the v1 ``cpuset`` hierarchy; optional, found at detection), each
   instance's group gets its CPUs from ``cpusets.confine_cpus``: an instance held under
   n cores is confined to n of them, so its hog leaves the others to the proxy's and
   the neighbours' wake-ups. Without it nothing is confined and the report says so.

Everything that touches the system is blocking (small file writes, rmdir polls);
async callers run it with ``trio.to_thread.run_sync``. Errors are
``IsolationError``: the instance is not started rather than started unisolated.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import structlog

from superagent.errors import ConfigError
from superagent.participant.cgroupfs import read as _read
from superagent.participant.cgroupfs import write as _write
from superagent.participant.cpusets import confine_cpus, prepare_v1_cpuset
from superagent.participant.errors import IsolationError

log = structlog.get_logger("superagent.participant")

CgroupMode = Literal["v2", "v1", "none"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT_GROUP = "superagent"  # our group below each hierarchy's root: <parent>/<app>/<instance>
V2_REQUIRED = ("cpu", "memory")  # without these a v2 hierarchy does not isolate anything useful
V2_WANTED = ("cpu", "memory", "pids")  # enabled down to each instance when available
# v1: each controller's hierarchy and a file only that controller's root has.
V1_MARKERS = {"memory": "memory.limit_in_bytes", "cpu": "cpu.cfs_quota_us", "pids": "tasks"}
CPUSET = "cpuset"  # optional (v2 controller or v1 hierarchy): confinement to CPUs
CPU_PERIOD_US = 100_000  # the kernel's default CFS period: quota = cpus * period
CPU_QUOTA_MIN_US = 1_000  # the kernel refuses a quota under 1 ms
REMOVE_TIMEOUT = 2.0  # killed tasks leave their group within ms; a big exit under load takes longer
REMOVE_POLL = 0.01  # rmdir retry interval while a killed group empties
KILL_ROUNDS = 20  # kill_all sweeps again to catch children forked during a sweep
# cpu weights in cgroup v2 units (1..10000, 100 is the kernel's default); v1 cpu.shares are
# weight * 1024 / 100. The agent's group outweighs the apps' 100 to 1, so the proxy gets the
# CPU the moment it is runnable, however busy the apps are.
APP_CPU_WEIGHT = 100
APPS_CPU_WEIGHT = 1_000  # <parent>, all apps together, against the machine's other processes
AGENT_CPU_WEIGHT = 10_000
CPU_WEIGHT_MAX = 10_000
AGENT_GROUP_SUFFIX = ".agent"  # <parent>.agent: the agent and its proxy workers
BUILDS_GROUP = "_builds"  # <parent>/_builds: builds and [test] commands (no app is named so)
_GROUP_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@:+-]{0,199}$")


# --- detection --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CgroupSupport:
    """What this machine offers, decided once at agent start by ``detect_cgroups``.

    ``v2_root`` is the v2 hierarchy (mode "v2"); ``v1_roots`` maps memory/cpu/pids (and
    cpuset where usable) to their hierarchies (mode "v1"). ``reason`` is one human
    sentence either way.
    """

    mode: CgroupMode
    reason: str
    parent: str = PARENT_GROUP
    v2_root: Path | None = None
    v2_controllers: tuple[str, ...] = ()
    v1_roots: Mapping[str, Path] = field(default_factory=dict, hash=False)

    def parent_dirs(self) -> dict[str, Path]:
        """Our parent group in each hierarchy, keyed "unified" (v2) or by controller (v1)."""
        if self.mode == "v2" and self.v2_root is not None:
            return {"unified": self.v2_root / self.parent}
        if self.mode == "v1":
            return {name: root / self.parent for name, root in self.v1_roots.items()}
        return {}

    def cpuset_parent(self) -> Path | None:
        """Our parent group where the cpuset controller is, None without one."""
        if self.mode == "v2" and CPUSET in self.v2_controllers:
            return self.parent_dirs()["unified"]
        if self.mode == "v1" and CPUSET in self.v1_roots:
            return self.parent_dirs()[CPUSET]
        return None


def remove_empty_parent(support: CgroupSupport) -> None:
    """Remove this agent's parent group (and its per-app groups) where they are empty: the
    node is going away. A group that still holds anything stays; never raises."""
    for top in support.parent_dirs().values():
        if not top.is_dir():
            continue
        for app in sorted((d for d in top.iterdir() if d.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                app.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
        with contextlib.suppress(OSError):  # busy while the agent (or a worker) is still in it
            top.with_name(top.name + AGENT_GROUP_SUFFIX).rmdir()


def detect_cgroups(root: Path = CGROUP_ROOT, *, parent: str = PARENT_GROUP) -> CgroupSupport:
    """Pick cgroup v2, else v1, else "none" (with a reason and one warning).

    For v2 this enables cpu, memory (and pids when available) in ``cgroup.subtree_control``
    from the hierarchy's root down to ``<root>/<parent>``, creating the parent group: that
    write is the real test of "usable". ``parent`` must not hold processes itself (cgroup
    v2's no-internal-processes rule). Never raises for a missing or unusable hierarchy.
    """
    problems: list[str] = []
    for v2_root in (root, root / "unified"):
        controllers = v2_root / "cgroup.controllers"
        if not controllers.is_file():
            continue
        try:
            available = set(controllers.read_text().split())
        except OSError as exc:
            problems.append(f"cannot read {controllers}: {exc.strerror}")
            continue
        missing = [name for name in V2_REQUIRED if name not in available]
        if missing:
            have = " ".join(sorted(available)) or "no controllers"
            problems.append(f"cgroup v2 at {v2_root} lacks {' and '.join(missing)} (has {have})")
            continue
        wanted = tuple(name for name in V2_WANTED if name in available)
        # cpuset is optional: where it cannot be enabled, instances are only not confined
        attempts = [(*wanted, CPUSET), wanted] if CPUSET in available else [wanted]
        errors: list[str] = []
        for enabled in attempts:
            try:
                _enable_down_to(v2_root, parent, enabled)
                break
            except OSError as exc:
                errors.append(f"cannot enable {' '.join(enabled)} for {parent}: "
                              f"{exc.strerror or exc}")
        else:
            problems.append(f"cgroup v2 at {v2_root}: {errors[-1]}")
            continue
        note = "" if CPUSET in enabled else (
            f" ({errors[0] if errors else 'no cpuset controller'}: "
            "instances are not confined to CPUs)")
        return CgroupSupport(mode="v2", parent=parent, v2_root=v2_root,
                             v2_controllers=enabled,
                             reason=f"cgroup v2 at {v2_root} with {' '.join(enabled)}{note}")

    v1_roots: dict[str, Path] = {}
    for name, marker in V1_MARKERS.items():
        hierarchy = root / name
        if not ((hierarchy / "cgroup.procs").is_file() and (hierarchy / marker).is_file()
                and not (hierarchy / "cgroup.controllers").exists()):
            problems.append(f"no cgroup v1 {name} hierarchy at {hierarchy}")
        elif not os.access(hierarchy, os.W_OK):
            problems.append(f"cgroup v1 {name} hierarchy at {hierarchy} is not writable "
                            f"(uid {os.geteuid()})")
        else:
            v1_roots[name] = hierarchy
    if len(v1_roots) == len(V1_MARKERS):
        problem = prepare_v1_cpuset(root / CPUSET, parent)
        if problem:
            have = (f"memory, cpu and pids hierarchies ({problem}: instances are not confined "
                    "to CPUs)")
        else:
            v1_roots[CPUSET] = root / CPUSET
            have = "memory, cpu, pids and cpuset hierarchies"
        return CgroupSupport(mode="v1", parent=parent, v1_roots=v1_roots,
                             reason=f"cgroup v1 {have} under {root}")

    reason = "; ".join(problems) or f"no cgroup hierarchy under {root}"
    log.warning("cgroups unusable: instances run without memory, cpu or pids limits",
                root=str(root), reason=reason)
    return CgroupSupport(mode="none", parent=parent, reason=reason)


def _enable_down_to(v2_root: Path, parent: str, wanted: tuple[str, ...]) -> None:
    """Enable ``wanted`` in subtree_control from ``v2_root`` down to ``v2_root/parent``."""
    group = v2_root
    _enable_controllers(group, wanted)
    for part in Path(parent).parts:
        group = group / part
        group.mkdir(exist_ok=True)
        _enable_controllers(group, wanted)


def _enable_controllers(group: Path, wanted: tuple[str, ...]) -> None:
    """Write ``+name`` for each wanted controller not yet in the group's subtree_control."""
    control = group / "cgroup.subtree_control"
    have = {name.lstrip("+") for name in control.read_text().split()} if control.exists() else set()
    missing = [name for name in wanted if name not in have]
    if missing:
        control.write_text(" ".join(f"+{name}" for name in missing))


# --- one instance's cgroup --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CgroupLimits:
    """Kernel-enforced limits of one instance; None means unlimited."""

    memory: int | None = None  # bytes of RAM; swap is capped at 0 where the kernel accounts it
    cpu: float | None = None  # CPUs: 0.5 is half of one core's time
    pids: int | None = None  # processes and threads
    cpu_weight: int = APP_CPU_WEIGHT  # the group's share under contention (v2 units)

    def __post_init__(self) -> None:
        if self.memory is not None and self.memory < 1024 * 1024:
            raise ConfigError(f"must be at least 1M, got {self.memory} bytes", key="limits.memory")
        if self.cpu is not None and not self.cpu * CPU_PERIOD_US >= CPU_QUOTA_MIN_US:
            least = CPU_QUOTA_MIN_US / CPU_PERIOD_US
            raise ConfigError(f"must be at least {least}, got {self.cpu}", key="limits.cpu")
        if self.pids is not None and self.pids < 1:
            raise ConfigError(f"must be at least 1, got {self.pids}", key="limits.pids")
        if not 1 <= self.cpu_weight <= CPU_WEIGHT_MAX:
            raise ConfigError(f"must be 1 to {CPU_WEIGHT_MAX}, got {self.cpu_weight}",
                              key="limits.cpu_weight")


class InstanceCgroup:
    """The cgroup(s) of one instance: ``<parent>/<app>/<instance>`` in each hierarchy.

    Owned by the instance's supervisor task, which ``create``s it before the spawn (or
    re-opens it with ``existing`` after an agent restart) and ``remove``s it after the
    last process is gone. In mode "none" it holds no path and every method is a no-op.
    """

    def __init__(self, *, mode: CgroupMode, app: str, instance: str, paths: Mapping[str, Path],
                 reason: str = "", applied: Mapping[str, object] | None = None) -> None:
        self.mode = mode
        self.app = app
        self.instance = instance
        # "unified" (v2) or memory/cpu/pids and maybe cpuset (v1) -> the group directory
        self.paths = dict(paths)
        self.reason = reason
        self.applied: dict[str, object] = dict(applied or {})  # limits as read back

    def __repr__(self) -> str:
        if self.mode == "none":
            return f"<InstanceCgroup {self.app}/{self.instance} none (no limits: {self.reason})>"
        limits = "".join(f" {key}={value}" for key, value in self.applied.items())
        return f"<InstanceCgroup {self.app}/{self.instance} {self.mode}{limits}>"

    @classmethod
    def existing(cls, support: CgroupSupport, app: str, instance: str) -> InstanceCgroup:
        """The group of an instance created earlier (re-adoption): no directory is touched.

        A v1 cpuset group that does not exist is left out: the instance was started by an
        agent that did not confine, and stays so until it is started afresh.
        """
        group = cls._at(support, app, instance)
        cpuset = group.paths.get(CPUSET)
        if cpuset is not None and not cpuset.is_dir():
            del group.paths[CPUSET]
        return group

    @classmethod
    def _at(cls, support: CgroupSupport, app: str, instance: str) -> InstanceCgroup:
        _check_group_name(app, app)
        _check_group_name(app, instance)
        paths = {key: parent / app / instance for key, parent in support.parent_dirs().items()}
        return cls(mode=support.mode, app=app, instance=instance, paths=paths,
                   reason=support.reason)

    @classmethod
    def create(cls, support: CgroupSupport, app: str, instance: str,
               limits: CgroupLimits) -> InstanceCgroup:
        """Make the instance's group(s) and write ``limits``.

        An empty leftover group of the same name (a crashed agent) is reused; one that
        still holds processes raises ``IsolationError``, as does any failed write (the
        group is then removed again).
        """
        group = cls._at(support, app, instance)
        if support.mode == "none":
            return group
        try:
            if support.mode == "v2" and support.v2_root is not None:
                # Down to the app's group, again: cheap, and survives a removed parent group.
                _enable_down_to(support.v2_root, f"{support.parent}/{app}",
                                support.v2_controllers)
            for path in group.paths.values():
                path.mkdir(parents=True, exist_ok=True)
                if _read_procs(path):
                    raise IsolationError(f"cgroup {path} already holds processes", app=app,
                                         path=str(path))
            if support.mode == "v2":
                group._write_v2(limits, support.v2_controllers)
            else:
                group._write_v1(limits)
            group._confine(support, limits.cpu)
        except OSError as exc:
            group._discard()
            raise IsolationError(f"cannot create cgroup for {instance}: {exc}", app=app,
                                 path=str(exc.filename or "")) from exc
        except IsolationError:
            group._discard()
            raise
        return group

    def _write_v2(self, limits: CgroupLimits, controllers: tuple[str, ...]) -> None:
        path = self.paths["unified"]
        _write(path / "memory.max", _or_max(limits.memory))
        self.applied["memory.max"] = _read(path / "memory.max")
        swap = path / "memory.swap.max"
        if swap.exists():
            _write(swap, "0" if limits.memory is not None else "max")
            self.applied["memory.swap.max"] = _read(swap)
        else:
            self.applied["memory.swap.max"] = "unavailable (no swap accounting)"
        oom_group = path / "memory.oom.group"
        if oom_group.exists():
            # An OOM kill takes the whole instance, not one worker of it: a half-killed
            # instance may pass liveness checks while serving errors.
            _write(oom_group, "1")
        quota = "max" if limits.cpu is None else str(round(limits.cpu * CPU_PERIOD_US))
        _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        self.applied["cpu.max"] = _read(path / "cpu.max")
        _write(path / "cpu.weight", str(limits.cpu_weight))
        self.applied["cpu.weight"] = _read(path / "cpu.weight")
        if "pids" in controllers:
            _write(path / "pids.max", _or_max(limits.pids))
            self.applied["pids.max"] = _read(path / "pids.max")
        else:
            self.applied["pids.max"] = "unavailable (no pids controller)"

    def _write_v1(self, limits: CgroupLimits) -> None:
        memory, cpu, pids = self.paths["memory"], self.paths["cpu"], self.paths["pids"]
        memsw = memory / "memory.memsw.limit_in_bytes"
        value = "-1" if limits.memory is None else str(limits.memory)
        if memsw.exists():
            # memsw (RAM + swap) may never be below the RAM limit: lift it, set RAM, lower it.
            _write(memsw, "-1")
        _write(memory / "memory.limit_in_bytes", value)
        self.applied["memory.limit_in_bytes"] = _read(memory / "memory.limit_in_bytes")
        if memsw.exists():
            _write(memsw, value)
            self.applied["memory.memsw.limit_in_bytes"] = _read(memsw)
        else:
            self.applied["memory.memsw.limit_in_bytes"] = "unavailable (no swap accounting)"
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        quota = "-1" if limits.cpu is None else str(round(limits.cpu * CPU_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", quota)
        self.applied["cpu.cfs_quota_us"] = _read(cpu / "cpu.cfs_quota_us")
        self.applied["cpu.cfs_period_us"] = _read(cpu / "cpu.cfs_period_us")
        _write(cpu / "cpu.shares", str(v1_shares(limits.cpu_weight)))
        self.applied["cpu.shares"] = _read(cpu / "cpu.shares")
        _write(pids / "pids.max", _or_max(limits.pids))
        self.applied["pids.max"] = _read(pids / "pids.max")

    def _confine(self, support: CgroupSupport, cpu: float | None) -> None:
        """Give the instance its CPUs for a quota of ``cpu`` cores (module docstring, 4)."""
        parent = support.cpuset_parent()
        if parent is None:
            self.applied["cpuset.cpus"] = "unavailable (no cpuset controller)"
            return
        v2 = support.mode == "v2"
        self.applied["cpuset.cpus"] = confine_cpus(
            self.paths["unified" if v2 else CPUSET], parent, cpu,
            cpu_parent=support.parent_dirs()["unified" if v2 else "cpu"],
            v1_root=None if v2 else support.v1_roots[CPUSET])

    def procs_files(self) -> tuple[bytes, ...]:
        """The ``cgroup.procs`` file of each distinct hierarchy, encoded for ``child_setup``."""
        seen: dict[Path, bytes] = {}
        for path in self.paths.values():
            seen.setdefault(path.resolve(), os.fsencode(path / "cgroup.procs"))
        return tuple(seen.values())

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group in every hierarchy."""
        for procs in self.procs_files():
            try:
                with open(procs, "w") as file:
                    file.write(str(pid))
            except OSError as exc:
                raise IsolationError(f"cannot move pid {pid} into {os.fsdecode(procs)}: "
                                     f"{exc.strerror}", app=self.app,
                                     path=os.fsdecode(procs)) from exc

    def procs(self) -> list[int]:
        """Pids in the group (the union over hierarchies), sorted; [] when it is gone."""
        found: set[int] = set()
        for path in self.paths.values():
            found.update(_read_procs(path))
        return sorted(found)

    def oom_killed(self) -> int:
        """How many OOM kills the group has seen.

        v2: ``oom_kill`` of memory.events. v1: ``oom_kill`` of memory.oom_control (Linux
        >= 4.13), else memory.failcnt, which counts limit hits rather than kills.
        """
        try:
            if self.mode == "v2":
                return _keyed(_read(self.paths["unified"] / "memory.events")).get("oom_kill", 0)
            if self.mode == "v1":
                memory = self.paths["memory"]
                counters = _keyed(_read(memory / "memory.oom_control"))
                if "oom_kill" in counters:
                    return counters["oom_kill"]
                return int(_read(memory / "memory.failcnt") or 0)
        except (OSError, ValueError):
            return 0
        return 0

    def kill_all(self) -> int:
        """SIGKILL every process in the group; return how many were signalled.

        v2 uses ``cgroup.kill`` (Linux >= 5.14) where present. Otherwise it sweeps
        ``cgroup.procs`` until no unsignalled pid appears (a forking process cannot
        outrun it for long: the sweep repeats and pids.max bounds it). The pid could in
        theory be reused between the read and the kill; the window is microseconds.
        """
        signalled: set[int] = set()
        kill_file = self.paths.get("unified", Path("/nonexistent")) / "cgroup.kill"
        if self.mode == "v2" and kill_file.exists():
            signalled.update(self.procs())
            _write(kill_file, "1")
            return len(signalled)
        for _ in range(KILL_ROUNDS):
            fresh = [pid for pid in self.procs() if pid not in signalled]
            if not fresh:
                break
            for pid in fresh:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            signalled.update(fresh)
        return len(signalled)

    def remove(self, *, timeout: float = REMOVE_TIMEOUT) -> None:
        """rmdir the group in every hierarchy, and the app's group when it was the last.

        Waits up to ``timeout`` for killed processes to leave (blocking). Raises
        ``IsolationError`` if the group still holds processes then: call ``kill_all``
        first. A group that is already gone is fine.
        """
        deadline = time.monotonic() + timeout
        for path in self.paths.values():
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        raise IsolationError(
                            f"cannot remove cgroup {path}: {exc.strerror} "
                            f"(pids {_read_procs(path)})", app=self.app, path=str(path)) from exc
                    time.sleep(REMOVE_POLL)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # the app's group; busy while another instance lives

    def _discard(self) -> None:
        """Best-effort cleanup of a half-created group."""
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                path.rmdir()


# --- the agent's group ------------------------------------------------------------------------


def app_cpu_weight(cpu: float | None) -> int:
    """An instance's cpu weight: ``APP_CPU_WEIGHT`` scaled down by a quota under one core.

    An app held to half a core has no claim to an equal share of a contended core either:
    with half the weight, a neighbour that wakes up on the core it hogs runs first.
    """
    if cpu is None or cpu >= 1:
        return APP_CPU_WEIGHT
    return max(1, round(APP_CPU_WEIGHT * cpu))


def v1_shares(weight: int) -> int:
    """cgroup v1 ``cpu.shares`` for a v2 ``cpu.weight`` (100 -> 1024, the default)."""
    return max(2, weight * 1024 // 100)


def _check_group_name(app: str, name: str) -> None:
    if not _GROUP_SAFE.match(name):
        raise IsolationError(f"{name!r} is not a safe cgroup name", app=app)


def _or_max(value: int | None) -> str:
    return "max" if value is None else str(value)


def _read_procs(group: Path) -> list[int]:
    """The group's pids; [] once it is gone: a group removed between the open and the
    read of its file fails the read with ENODEV rather than ENOENT."""
    try:
        return [int(line) for line in (group / "cgroup.procs").read_text().split()]
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV):
            return []
        raise


def _keyed(text: str) -> dict[str, int]:
    """``name value`` lines (memory.events, memory.oom_control) as a dict."""
    pairs = (line.split() for line in text.splitlines())
    return {pair[0]: int(pair[1]) for pair in pairs if len(pair) == 2}
