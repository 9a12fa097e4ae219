"""What ``GET /v1/status`` reports of each instance's processes and of the node.

Theory of operation. An instance's figures (CPU seconds, RSS, threads, TCP connections,
processes) are summed over its processes: those its cgroup lists where the caller passes
them (``members``), else its process tree, the app and whatever it forked. Finding a
tree means knowing every process's parent, which only a walk of all of /proc tells
(4-10 ms on a machine with a hundred processes), so it is walked once for all the
instances of a status, not once per instance, and not at all where the caller passes
each instance's ``members``: the processes its cgroup lists, which are the tree (and any
process that left it by daemonising), read from one small file per hierarchy. The load
sample asks for CPU seconds every second; a walk of /proc each time was a burst of the
agent's CPU long enough to delay the proxy workers beside it. Blocking (reads /proc).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psutil

Members = Mapping[int, Sequence[int]]  # an instance's pid -> the pids its cgroup lists


def process_figures(pids: Iterable[int | None],
                    members: Members | None = None) -> dict[int, dict[str, Any] | None]:
    """Figures of the processes of each of ``pids`` (None where it is gone or not
    readable): its ``members`` where given, else its tree. None pids are skipped."""
    return {pid: _tree_figures(tree) for pid, tree in _processes(pids, members).items()}


def cpu_seconds(pids: Iterable[int | None],
                members: Members | None = None) -> dict[int, float | None]:
    """User + system CPU seconds of the processes of each of ``pids`` (None where it is
    gone), found as ``process_figures`` finds them: the once-a-second load sample,
    without the status's costlier figures."""
    out: dict[int, float | None] = {}
    for root, tree in _processes(pids, members).items():
        total: float | None = 0.0
        for pid in tree:
            try:
                times = psutil.Process(pid).cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                if pid == root:
                    total = None
                    break
                continue  # a child that exited since the walk
            total = (total or 0.0) + times.user + times.system
        out[root] = total
    return out


def _processes(pids: Iterable[int | None], members: Members | None) -> dict[int, list[int]]:
    """Each pid (None skipped) with its processes, itself first: its ``members`` where it
    has some, else its tree, from one walk of /proc for all those without."""
    members = members or {}
    roots = [pid for pid in pids if pid is not None]
    children = _children() if any(not members.get(root) for root in roots) else {}
    return {root: [root, *(pid for pid in members[root] if pid != root)] if members.get(root)
            else _tree(root, children) for root in roots}


def _children() -> dict[int, list[int]]:
    """Every process's children: one walk of /proc."""
    children: defaultdict[int, list[int]] = defaultdict(list)
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info["ppid"]
        if ppid is not None:
            children[ppid].append(proc.pid)
    return children


def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
    """``root`` and its descendants, breadth first."""
    tree, seen = [root], {root}
    for pid in tree:  # grows while it is walked
        for child in children.get(pid, ()):
            if child not in seen:
                seen.add(child)
                tree.append(child)
    return tree


def _tree_figures(tree: list[int]) -> dict[str, Any] | None:
    cpu = rss = threads = conns = 0.0
    counted = 0
    for pid in tree:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                times = proc.cpu_times()
                cpu += times.user + times.system
                rss += proc.memory_info().rss
                threads += proc.num_threads()
            conns += len(proc.net_connections(kind="tcp"))
            counted += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            if pid == tree[0]:
                return None
            # a child that exited since the walk: not part of the tree any more
    return {"cpu_seconds": round(cpu, 3), "rss_bytes": int(rss), "threads": int(threads),
            "connections": int(conns), "processes": counted}


def node_figures() -> dict[str, Any]:
    """The machine's CPUs, load and memory, and the agent's own RSS."""
    memory = psutil.virtual_memory()
    return {"cpus": psutil.cpu_count(), "load": os.getloadavg(),
            "memory_total": memory.total, "memory_available": memory.available,
            "agent_rss_bytes": psutil.Process().memory_info().rss}
