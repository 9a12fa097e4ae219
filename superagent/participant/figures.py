"""What ``GET /v1/status`` reports of each instance's process tree and of the node.

Theory of operation. An instance's figures (CPU seconds, RSS, threads, TCP connections,
processes) are summed over its process tree: the app and whatever it forked. Finding a
tree means knowing every process's parent, which only a walk of all of /proc tells
(about 10 ms on a busy machine with a hundred processes), so ``process_figures`` walks it
once for all the instances of a status, not once per instance: the status is computed on
the agent's event loop, and the deploy runner asks for it around every start and drain.
Blocking (reads /proc).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import psutil


def process_figures(pids: Iterable[int | None]) -> dict[int, dict[str, Any] | None]:
    """Figures of the process tree under each of ``pids`` (None where it is gone or not
    readable); the pids that are None are skipped."""
    roots = [pid for pid in pids if pid is not None]
    if not roots:
        return {}
    children = _children()
    return {pid: _tree_figures(_tree(pid, children)) for pid in roots}


def cpu_seconds(pids: Iterable[int | None]) -> dict[int, float | None]:
    """User + system CPU seconds of the process tree under each of ``pids`` (None where
    it is gone): the once-a-second load sample, without the status's costlier figures."""
    roots = [pid for pid in pids if pid is not None]
    if not roots:
        return {}
    children = _children()
    out: dict[int, float | None] = {}
    for root in roots:
        total: float | None = 0.0
        for pid in _tree(root, children):
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
