"""Tests of ``superagent.participant.figures``: real processes, real /proc."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from superagent.participant import figures
from superagent.participant.figures import node_figures, process_figures
from tests.support.wait import wait_until

PARENT = ("import subprocess, sys, time; "
          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
          "time.sleep(60)")


@pytest.fixture
def trees() -> Iterator[list[psutil.Process]]:
    """Two live process trees, each a Python parent with one child; killed afterwards."""
    procs = [subprocess.Popen([sys.executable, "-c", PARENT]) for _ in range(2)]
    roots = [psutil.Process(p.pid) for p in procs]
    try:
        wait_until(lambda: all(len(r.children()) == 1 for r in roots), "the children",
                   timeout=30)
        yield roots
    finally:
        for root in roots:
            for proc in [*root.children(recursive=True), root]:
                proc.kill()
        for p in procs:
            p.wait(timeout=10)


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per walk of /proc that ``figures`` makes from now on."""
    walked: list[int] = []
    real = psutil.process_iter

    def counted(*args: object, **kwargs: object) -> object:
        walked.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(figures.psutil, "process_iter", counted)
    return walked


def test_each_tree_is_summed_and_the_process_table_walked_once(
        trees: list[psutil.Process], walks: list[int]) -> None:
    """Every root gets its whole tree (parent and child); the parents of all processes are
    read in one walk for all roots; a gone pid reads None, a None pid is skipped."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    found = process_figures([trees[0].pid, None, trees[1].pid, gone.pid])
    assert len(walks) == 1
    assert set(found) == {trees[0].pid, trees[1].pid, gone.pid}
    assert found[gone.pid] is None
    for root in trees:
        tree = found[root.pid]
        assert tree is not None
        assert tree["processes"] == 2
        assert tree["rss_bytes"] >= root.memory_info().rss
        assert tree["threads"] >= 2
    assert process_figures([None]) == {} and len(walks) == 1  # nothing to walk for


def test_node_figures_are_the_machines() -> None:
    """CPUs, memory and the agent's own RSS."""
    node = node_figures()
    assert node["cpus"] == psutil.cpu_count()
    assert 0 < node["memory_available"] <= node["memory_total"]
    assert node["agent_rss_bytes"] > 0


def test_members_stand_for_the_tree_without_a_walk_of_proc(
        trees: list[psutil.Process], walks: list[int]) -> None:
    """An instance whose cgroup lists its processes is summed over those, whether they are
    in its tree or not (a daemonised child is not), and /proc is not walked for it; an
    instance without members still gets its tree, from one walk."""
    root = trees[0]
    outsider = trees[1].children()[0]  # a process outside root's tree, as a daemon's
    group = [outsider.pid, root.pid]  # the group's order: the root still comes first
    members = {root.pid: group}

    def used() -> float:
        return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in group)

    before = used()
    seconds = figures.cpu_seconds([root.pid, None], members)[root.pid]
    assert seconds is not None
    # (summed in another order, equal times may differ in the last bit)
    assert before - 1e-6 <= seconds <= used() + 1e-6
    found = process_figures([root.pid], members)[root.pid]
    assert found is not None and found["processes"] == 2
    assert found["rss_bytes"] >= root.memory_info().rss + outsider.memory_info().rss // 2
    assert walks == []
    both = figures.cpu_seconds([root.pid, trees[1].pid], members)
    assert set(both) == {root.pid, trees[1].pid} and walks == [1]
    assert figures.cpu_seconds([root.pid], {root.pid: []})[root.pid] is not None  # walked
    assert len(walks) == 2
