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
    children: defaultdict[int, list[int]] = defaultdict(list)
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info["ppid"]
        if ppid is not None:
            children[ppid].append(proc.pid)
    return {pid: _tree_figures(pid, children) for pid in roots}


def _tree_figures(root: int, children: dict[int, list[int]]) -> dict[str, Any] | None:
    tree, seen = [root], {root}
    for pid in tree:  # grows while it is walked: breadth first
        for child in children.get(pid, ()):
            if child not in seen:
                seen.add(child)
                tree.append(child)
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
            if pid == root:
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
