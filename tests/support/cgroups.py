"""Removing the cgroups a test left behind.

An agent that stops its instances removes their groups; one a test killed (``kill -9``,
``--stop-on-exit`` off for an upgrade) cannot, and its node's groups would stay on the
machine after the test: empty directories that pile up run after run. ``remove_trees``
kills what is still in such groups and removes them bottom-up; ``node_groups`` names a
node's top groups (``superagent.<node>`` and ``superagent.<node>.agent`` below each
hierarchy's root, as ``superagent.participant.cgroups`` makes them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from superagent.participant.cgroups import AGENT_GROUP_SUFFIX, CGROUP_ROOT, PARENT_GROUP

REMOVE_TIMEOUT = 5.0  # killed processes leave their group within milliseconds


def node_groups(node: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """The top groups of ``node``'s agent that exist, in v2 and in every v1 hierarchy."""
    names = (f"{PARENT_GROUP}.{node}", f"{PARENT_GROUP}.{node}{AGENT_GROUP_SUFFIX}")
    hierarchies = [root, *sorted(root.glob("*/"))]  # v2 at the root; v1 one per controller
    return [h / name for h in hierarchies for name in names if (h / name).is_dir()]


def remove_trees(tops: Iterable[Path], *, timeout: float = REMOVE_TIMEOUT) -> None:
    """SIGKILL whatever is left in each group under ``tops`` (never this test process) and
    rmdir them bottom-up. Every group is tried; the first OSError (a group still busy
    after ``timeout`` seconds, or holding this process) is raised at the end."""
    failures: list[OSError] = []
    for top in tops:
        if not top.is_dir():
            continue
        groups = sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: -len(p.parts))
        for group in groups:
            try:
                _remove(group, timeout)
            except OSError as exc:
                failures.append(exc)
    if failures:
        raise failures[0]


def _remove(group: Path, timeout: float) -> None:
    procs = group / "cgroup.procs"
    pids = [int(pid) for pid in (procs.read_text().split() if procs.exists() else ())]
    if os.getpid() in pids:  # an in-process agent put the test itself there
        raise OSError(f"{group} holds this test process")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    rmdir_when_empty(group, timeout=timeout)


def rmdir_when_empty(group: Path, *, timeout: float = REMOVE_TIMEOUT) -> None:
    """rmdir ``group`` once its processes, dead or dying, have left it (within ms of their
    death); raises OSError when it is still busy after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
