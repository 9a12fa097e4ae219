"""Confinement of app instances to CPUs, through the cgroup cpuset controller.

Theory of operation
-------------------
A cpu quota bounds how much CPU an app gets over a period and a cpu weight who gets a
CPU over time, but neither decides whether a task that wakes up preempts a neighbour's
running hog at once: on a kernel ticking at 250 Hz the proxy worker, or the app it wakes,
may wait for the next tick (4 ms) behind it. So an instance held under n cores
(``limits.cpu``, n rounded up) on a machine with more CPUs is confined to n of them;
its hog then always leaves the others to the wake-ups of its neighbours and the proxy.

``confine_cpus`` writes an instance group's ``cpuset.cpus`` (``cgroups.InstanceCgroup``
calls it when the group is made). ``choose_cpus`` (pure) picks the least loaded CPUs, a
CPU's load being the quota of the instances already confined to it. Those loads are read
from the kernel's files each time (``_loads``), so an agent restart loses nothing, and a
lock makes concurrent creates (worker threads) see each other's choice. An instance
without a quota, or with a quota of every CPU, gets them all. The kernel holds an app to
its cpuset: its ``sched_setaffinity`` cannot widen it. In cgroup v1 a new cpuset group
has neither cpus nor mems and refuses tasks until it has both (``inherit_cpuset``); our
parent group gets them at detection (``prepare_v1_cpuset``), where a refusal leaves
instances unconfined rather than failing every start.
Everything here but the pure functions blocks (small file reads and writes).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from superagent.participant.cgroupfs import read, write

_LOCK = threading.Lock()  # creates run in worker threads: one choice at a time


def confine_cpus(group: Path, parent: Path, cpu: float | None, *, cpu_parent: Path,
                 v1_root: Path | None) -> str:
    """Give the instance group ``group`` its CPUs for a quota of ``cpu`` cores: those
    ``choose_cpus`` picks among the CPUs of our parent group ``parent``, else all of them.
    ``cpu_parent`` is our parent group where the instances' quotas are (the same as
    ``parent`` in v2); ``v1_root`` the v1 cpuset hierarchy, None in v2. Returns the value
    read back; raises ``OSError`` when the kernel refuses it."""
    with _LOCK:  # the loads read and the choice written as one step
        if v1_root is not None:
            # from the hierarchy's root: the parent may be more than one level deep
            inherit_cpuset(v1_root, group)
            available = parse_cpus(read(parent / "cpuset.cpus"))
        else:
            available = parse_cpus(read(parent / "cpuset.cpus.effective"))
        loads = _loads(parent, available, exclude=group, cpu_parent=cpu_parent,
                       v2=v1_root is None)
        chosen = choose_cpus(available, cpu, loads)
        write(group / "cpuset.cpus", format_cpus(chosen or available))
    return read(group / "cpuset.cpus")


def choose_cpus(available: Sequence[int], cpu: float | None,
                loads: Mapping[int, float]) -> tuple[int, ...] | None:
    """The CPUs an instance held to ``cpu`` cores is confined to, None for all ``available``.

    It gets ``cpu`` rounded up of them, the least loaded (``loads``: cores of quota already
    confined to each CPU), ties to the highest-numbered (the kernel's housekeeping and
    default interrupt affinity favour CPU 0). No quota, or one that needs every CPU, is
    not confined.
    """
    if cpu is None:
        return None
    count = math.ceil(round(cpu, 6))
    if count >= len(available):
        return None
    ranked = sorted(available, key=lambda n: (loads.get(n, 0.0), -n))
    return tuple(sorted(ranked[:count]))


def parse_cpus(text: str) -> tuple[int, ...]:
    """A kernel cpu list (``0-3,8,10-11``) as sorted CPU numbers; "" is none."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return tuple(sorted(cpus))


def format_cpus(cpus: Sequence[int]) -> str:
    """Sorted CPU numbers as a kernel cpu list: ``(0, 1, 2, 5)`` -> ``0-2,5``."""
    runs: list[list[int]] = []
    for n in sorted(cpus):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def prepare_v1_cpuset(hierarchy: Path, parent: str) -> str:
    """v1 detection: "" when ``hierarchy`` is a writable cpuset hierarchy whose root's cpus
    and mems our parent group (made here) could take, else why not.

    This is the real test, as enabling the controller is in v2: the kernel refuses
    (EINVAL) the root's cpus where a sibling holds some of them exclusively. Found here,
    that leaves instances unconfined rather than failing every create.
    """
    if not ((hierarchy / "cgroup.procs").is_file() and (hierarchy / "cpuset.cpus").is_file()
            and os.access(hierarchy, os.W_OK)):
        return "no writable cpuset hierarchy"
    try:
        (hierarchy / parent).mkdir(parents=True, exist_ok=True)
        inherit_cpuset(hierarchy, hierarchy / parent)
    except OSError as exc:
        with contextlib.suppress(OSError):  # not ours to remove at stop then
            (hierarchy / parent).rmdir()
        return f"cannot give {hierarchy / parent} the root's cpus: {exc.strerror or exc}"
    return ""


def inherit_cpuset(root: Path, group: Path) -> None:
    """v1: give each level from ``root``'s child down to ``group`` the cpus and mems of
    its parent where it has none (a new group's state)."""
    for level in reversed((group, *group.parents)):
        if level == root or root not in level.parents:
            continue
        for name in ("cpuset.mems", "cpuset.cpus"):
            if not read(level / name):
                write(level / name, read(level.parent / name))


def _loads(parent: Path, available: Sequence[int], *, exclude: Path, cpu_parent: Path,
           v2: bool) -> dict[int, float]:
    """Cores of quota confined to each CPU by the other instances under ``parent``
    (``<app>/<instance>`` groups whose cpus are fewer than ``available``). An instance's
    quota counts evenly on each of its CPUs; one without a quota counts as a core each."""
    loads: dict[int, float] = {}
    for group in parent.glob("*/*"):
        if group == exclude or not group.is_dir():
            continue
        try:
            cpus = parse_cpus(read(group / "cpuset.cpus"))
        except (OSError, ValueError):
            continue  # not an instance's group, or one being removed
        if not cpus or set(available) <= set(cpus):
            continue
        cores = _quota_cores(cpu_parent / group.relative_to(parent), v2=v2)
        for n in cpus:
            loads[n] = loads.get(n, 0.0) + (cores or len(cpus)) / len(cpus)
    return loads


def _quota_cores(group: Path, *, v2: bool) -> float | None:
    """The cpu quota of ``group`` (in the cpu hierarchy) in cores, None for none."""
    try:
        if v2:
            quota, period = read(group / "cpu.max").split()
        else:
            quota = read(group / "cpu.cfs_quota_us")
            period = read(group / "cpu.cfs_period_us")
        return int(quota) / int(period) if quota not in ("max", "-1") else None
    except (OSError, ValueError):
        return None
