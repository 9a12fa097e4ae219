"""Tests of ``superagent.participant.cgroups``, ``cpusets`` and ``agentcgroup``.

Detection runs against fake cgroup trees in tmp_path and against the real
``/sys/fs/cgroup``. The rest uses the real kernel: real cgroups under a test-only
parent group, real children put into them through ``isolation.child_setup``.
Everything created is removed in ``finally`` blocks, even when a test fails.
Tests that need root or a cgroup controller skip, naming it, where the
capability is missing.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from superagent.errors import ConfigError
from superagent.participant import cgroups as cgroups_module
from superagent.participant import cpusets as cpusets_module
from superagent.participant.agentcgroup import AgentCgroup
from superagent.participant.cgroups import (
    AGENT_CPU_WEIGHT,
    APP_CPU_WEIGHT,
    CgroupLimits,
    CgroupSupport,
    InstanceCgroup,
    app_cpu_weight,
    detect_cgroups,
    remove_empty_parent,
    v1_shares,
)
from superagent.participant.cpusets import choose_cpus, format_cpus, parse_cpus
from superagent.participant.errors import IsolationError
from superagent.participant.isolation import IsolationReport, RLimits, child_setup
from tests.participant.children import CHILD_TIMEOUT, run_child
from tests.support.cgroups import remove_trees, rmdir_when_empty

MIB = 1024 * 1024
TEST_PARENT = f"superagent-test-{os.getpid()}"  # never the production parent group
APP = "satest"
REMOVE_TIMEOUT = 5.0  # killed test children leave their group within ms

ALLOCATE = """
chunks = []
for _ in range(200):
    chunks.append(bytearray(1 << 20))  # zero-filled: every page is touched and charged
print("survived", flush=True)
"""

FORK_UNTIL_REFUSED = """
import os
read_end, write_end = os.pipe()
children = 0
for _ in range(64):
    try:
        pid = os.fork()
    except BlockingIOError:
        break
    if pid == 0:
        os.close(write_end)
        os.read(read_end, 1)  # until the parent closes the pipe
        os._exit(0)
    children += 1
os.close(write_end)
for _ in range(children):
    os.wait()
print(children)
"""


# --- helpers ----------------------------------------------------------------------------------


def remove_groups(support: CgroupSupport) -> None:
    """Kill whatever is left under the test parent group and rmdir it bottom-up."""
    remove_trees(support.parent_dirs().values(), timeout=REMOVE_TIMEOUT)


def remove_groups_at(path: Path | None) -> None:
    """rmdir one group whose processes are gone (they leave within ms of their death)."""
    if path is not None:
        rmdir_when_empty(path, timeout=REMOVE_TIMEOUT)


@pytest.fixture
def cgroups() -> Iterator[CgroupSupport]:
    """Real cgroup support under a test-only parent group, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creating cgroups and writing cgroup.procs")
    support = detect_cgroups(parent=TEST_PARENT)
    if support.mode == "none":
        pytest.skip(f"no usable cgroup v2 or v1 memory/cpu/pids controllers: {support.reason}")
    try:
        yield support
    finally:
        remove_groups(support)


def fake_v1(root: Path) -> None:
    """A v1 layout: memory, cpu and pids hierarchies with their root files."""
    for name, marker in (("memory", "memory.limit_in_bytes"), ("cpu", "cpu.cfs_quota_us"),
                         ("pids", "tasks")):
        (root / name).mkdir(parents=True)
        for file in ("cgroup.procs", "tasks", marker):
            (root / name / file).write_text("")


# --- detection --------------------------------------------------------------------------------


def test_detect_pure_v2_enables_controllers(tmp_path: Path) -> None:
    """A v2 root with cpu and memory gives v2 and enables them down to the parent group."""
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    support = detect_cgroups(tmp_path)
    assert support.mode == "v2"
    assert support.v2_root == tmp_path
    assert support.v2_controllers == ("cpu", "memory", "pids", "cpuset")
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +memory +pids +cpuset"
    assert (tmp_path / "superagent" / "cgroup.subtree_control").read_text() == \
        "+cpu +memory +pids +cpuset"
    assert support.parent_dirs() == {"unified": tmp_path / "superagent"}


def test_detect_v2_leaves_enabled_controllers_alone(tmp_path: Path) -> None:
    """Controllers already in subtree_control are not written again; pids is optional."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "cgroup.subtree_control").write_text("cpu memory\n")
    support = detect_cgroups(tmp_path, parent="a/b")
    assert support.mode == "v2"
    assert support.v2_controllers == ("cpu", "memory")
    assert (tmp_path / "cgroup.subtree_control").read_text() == "cpu memory\n"
    assert (tmp_path / "a" / "b" / "cgroup.subtree_control").read_text() == "+cpu +memory"


def test_detect_v1(tmp_path: Path) -> None:
    """Mounted, writable memory/cpu/pids v1 hierarchies give v1."""
    fake_v1(tmp_path)
    support = detect_cgroups(tmp_path)
    assert support.mode == "v1"
    assert support.parent_dirs() == {name: tmp_path / name / "superagent"
                                     for name in ("memory", "cpu", "pids")}
    assert not (tmp_path / "memory" / "superagent").exists()  # nothing created for v1


def test_detect_mixed_prefers_v1_when_unified_lacks_controllers(tmp_path: Path) -> None:
    """Hybrid layout like this machine: v2 'unified' with hugetlb only, v1 for the rest."""
    fake_v1(tmp_path)
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    with capture_logs() as logs:
        support = detect_cgroups(tmp_path)
    assert support.mode == "v1"
    assert not (tmp_path / "unified" / "superagent").exists()
    assert logs == []


def test_detect_hybrid_with_controllers_on_unified_gives_v2(tmp_path: Path) -> None:
    """A hybrid whose unified hierarchy holds cpu and memory uses v2 there."""
    fake_v1(tmp_path)
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("cpu memory pids\n")
    support = detect_cgroups(tmp_path)
    assert support.mode == "v2"
    assert support.v2_root == tmp_path / "unified"


def test_detect_none_warns_once_with_reason(tmp_path: Path) -> None:
    """No usable hierarchy gives "none", a reason naming what is missing, one warning."""
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    (tmp_path / "memory").mkdir()
    with capture_logs() as logs:
        support = detect_cgroups(tmp_path)
    assert support.mode == "none"
    assert "lacks cpu and memory (has hugetlb)" in support.reason
    assert "no cgroup v1 pids hierarchy" in support.reason
    assert support.parent_dirs() == {}
    assert [entry["log_level"] for entry in logs] == ["warning"]
    assert logs[0]["reason"] == support.reason


def test_detect_v2_that_refuses_enabling_falls_back(tmp_path: Path) -> None:
    """A v2 root whose subtree_control cannot be written is not taken as usable."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "cgroup.subtree_control").mkdir()  # reading or writing it fails
    with capture_logs():
        support = detect_cgroups(tmp_path)
    assert support.mode == "none"
    assert "cannot enable cpu memory" in support.reason


def test_detect_v2_that_refuses_cpuset_keeps_the_rest(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that refuses to enable cpuset (EBUSY, a group with cpusets of its own) still
    gives v2 with the other controllers, and the reason says instances are not confined."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory cpuset\n")
    enable = cgroups_module._enable_controllers

    def refuse_cpuset(group: Path, wanted: tuple[str, ...]) -> None:
        if "cpuset" in wanted:  # stands in for the kernel's refusal
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        enable(group, wanted)

    monkeypatch.setattr(cgroups_module, "_enable_controllers", refuse_cpuset)
    support = detect_cgroups(tmp_path)
    assert support.mode == "v2" and support.v2_controllers == ("cpu", "memory")
    assert support.cpuset_parent() is None
    assert "cannot enable cpu memory cpuset" in support.reason
    assert "not confined" in support.reason


def test_detect_real_machine() -> None:
    """The real /sys/fs/cgroup of this machine kind offers v1 or v2 controllers."""
    root = Path("/sys/fs/cgroup")
    if not ((root / "cgroup.controllers").exists() or (root / "memory").is_dir()):
        pytest.skip("no cgroup filesystem mounted at /sys/fs/cgroup")
    if os.geteuid() != 0:
        pytest.skip("needs root: cgroup hierarchies are writable by root only")
    support = detect_cgroups(root, parent=TEST_PARENT)
    try:
        assert support.mode in {"v1", "v2"}, support.reason
    finally:
        remove_groups(support)


# --- cgroup files (fake trees: what gets written) ---------------------------------------------


def test_create_v2_writes_limits_in_fake_tree(tmp_path: Path) -> None:
    """v2: memory.max, cpu.max "quota period", pids.max, subtree_control of the app group."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    support = detect_cgroups(tmp_path)
    group = InstanceCgroup.create(support, "hello", "i1",
                                  CgroupLimits(memory=256 * MIB, cpu=0.5, pids=128))
    path = tmp_path / "superagent" / "hello" / "i1"
    assert group.paths == {"unified": path}
    assert (path / "memory.max").read_text() == str(256 * MIB)
    assert (path / "cpu.max").read_text() == "50000 100000"
    assert (path / "pids.max").read_text() == "128"
    assert (path.parent / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert group.applied["memory.swap.max"] == "unavailable (no swap accounting)"
    assert group.procs() == []


def test_create_v1_writes_limits_in_fake_tree(tmp_path: Path) -> None:
    """v1: limit_in_bytes, then memsw equal to it (swap 0), cfs quota/period, pids.max."""
    fake_v1(tmp_path)
    support = detect_cgroups(tmp_path)
    (tmp_path / "memory" / "superagent" / "hello" / "i1").mkdir(parents=True)
    (tmp_path / "memory" / "superagent" / "hello" / "i1" /
     "memory.memsw.limit_in_bytes").write_text("")
    group = InstanceCgroup.create(support, "hello", "i1", CgroupLimits(memory=64 * MIB, cpu=2.0))
    base = {name: tmp_path / name / "superagent" / "hello" / "i1"
            for name in ("memory", "cpu", "pids")}
    assert (base["memory"] / "memory.limit_in_bytes").read_text() == str(64 * MIB)
    assert (base["memory"] / "memory.memsw.limit_in_bytes").read_text() == str(64 * MIB)
    assert (base["cpu"] / "cpu.cfs_quota_us").read_text() == "200000"
    assert (base["cpu"] / "cpu.cfs_period_us").read_text() == "100000"
    assert (base["pids"] / "pids.max").read_text() == "max"
    assert len(group.procs_files()) == 3


def test_create_refuses_group_with_processes(tmp_path: Path) -> None:
    """A leftover group that still holds processes is not reused."""
    fake_v1(tmp_path)
    support = detect_cgroups(tmp_path)
    leftover = tmp_path / "pids" / "superagent" / "hello" / "i1"
    leftover.mkdir(parents=True)
    (leftover / "cgroup.procs").write_text("4242\n")
    with pytest.raises(IsolationError, match="already holds processes"):
        InstanceCgroup.create(support, "hello", "i1", CgroupLimits())


def test_none_mode_is_a_noop_that_says_so() -> None:
    """Mode "none": no paths, nothing to kill or remove, and the repr gives the reason."""
    support = CgroupSupport(mode="none", reason="no cgroup hierarchy under /x")
    group = InstanceCgroup.create(support, "hello", "i1", CgroupLimits(memory=64 * MIB))
    group.add(os.getpid())
    group.remove()
    assert (group.paths, group.procs(), group.oom_killed(), group.kill_all()) == ({}, [], 0, 0)
    assert group.procs_files() == ()
    assert repr(group) == "<InstanceCgroup hello/i1 none (no limits: no cgroup hierarchy under /x)>"


def test_bad_names_and_limits_are_refused() -> None:
    """Unsafe group names raise IsolationError; impossible limits raise ConfigError."""
    support = CgroupSupport(mode="none", reason="test")
    for name in ("../etc", "a/b", "", ".hidden"):
        with pytest.raises(IsolationError):
            InstanceCgroup.create(support, "hello", name, CgroupLimits())
    with pytest.raises(ConfigError, match=r"limits\.cpu"):
        CgroupLimits(cpu=0.001)
    with pytest.raises(ConfigError, match=r"limits\.memory"):
        CgroupLimits(memory=1000)
    with pytest.raises(ConfigError, match=r"limits\.pids"):
        CgroupLimits(pids=0)


# --- real cgroups -----------------------------------------------------------------------------


def test_memory_limit_oom_kills_child_only(cgroups: CgroupSupport) -> None:
    """A child allocating 200 MiB under a 32 MiB limit is SIGKILLed; the OOM kill is counted."""
    group = InstanceCgroup.create(cgroups, APP, "oom", CgroupLimits(memory=32 * MIB))
    try:
        done = run_child(ALLOCATE, child_setup(None, group, RLimits()))
        assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout, done.stderr)
        assert "survived" not in done.stdout
        if cgroups.mode == "v1" and "oom_kill" not in (
                group.paths["memory"] / "memory.oom_control").read_text():
            assert int((group.paths["memory"] / "memory.failcnt").read_text()) > 0
        else:
            assert group.oom_killed() >= 1
    finally:
        group.kill_all()
        group.remove(timeout=REMOVE_TIMEOUT)
    assert all(not path.exists() for path in group.paths.values())


def test_pids_limit_refuses_fork(cgroups: CgroupSupport) -> None:
    """Under pids.max=8 the child's 8th fork fails with EAGAIN; the test process is untouched."""
    group = InstanceCgroup.create(cgroups, APP, "pids", CgroupLimits(pids=8))
    try:
        done = run_child(FORK_UNTIL_REFUSED, child_setup(None, group, RLimits(nproc=None)))
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) == 7  # the child itself is the 8th task
        assert group.procs() == []
    finally:
        group.kill_all()
        group.remove(timeout=REMOVE_TIMEOUT)
    pid = os.fork()  # the test process still forks freely
    if pid == 0:
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0


def test_cpu_memory_pids_limits_read_back(cgroups: CgroupSupport) -> None:
    """The kernel files hold the limits written, and the report shows them as JSON."""
    limits = CgroupLimits(memory=64 * MIB, cpu=0.5, pids=100)
    group = InstanceCgroup.create(cgroups, APP, "cpu", limits)
    try:
        if cgroups.mode == "v2":
            path = group.paths["unified"]
            assert (path / "cpu.max").read_text().split() == ["50000", "100000"]
            assert (path / "memory.max").read_text().strip() == str(64 * MIB)
            assert (path / "pids.max").read_text().strip() == "100"
        else:
            cpu, memory = group.paths["cpu"], group.paths["memory"]
            assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
            assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
            assert (memory / "memory.limit_in_bytes").read_text().strip() == str(64 * MIB)
            memsw = memory / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                assert memsw.read_text().strip() == str(64 * MIB)
            assert (group.paths["pids"] / "pids.max").read_text().strip() == "100"
        report = IsolationReport.build(None, group, RLimits()).to_json()
        assert json.loads(json.dumps(report)) == report
        cgroup = report["cgroup"]
        assert isinstance(cgroup, dict)
        assert cgroup["mode"] == cgroups.mode
        assert set(cgroup["paths"]) == set(group.paths)
        assert "50000" in json.dumps(cgroup["limits"])
        assert report["rlimits"] == {"nofile": 4096, "core": 0}  # no nproc without a switch
    finally:
        group.remove(timeout=REMOVE_TIMEOUT)


def test_add_procs_kill_all_remove(cgroups: CgroupSupport) -> None:
    """add() moves a running process in, procs() lists it, kill_all() ends it, remove() works."""
    group = InstanceCgroup.create(cgroups, APP, "adopt", CgroupLimits())
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        group.add(sleeper.pid)
        assert group.procs() == [sleeper.pid]
        assert group.kill_all() == 1
        assert sleeper.wait(timeout=CHILD_TIMEOUT) == -signal.SIGKILL
        group.remove(timeout=REMOVE_TIMEOUT)
        assert all(not path.exists() for path in group.paths.values())
        assert "adopt" in repr(group)
    finally:
        sleeper.kill()
        sleeper.wait()
        group.kill_all()
        group.remove(timeout=REMOVE_TIMEOUT)


def test_procs_of_a_group_removed_between_open_and_read_is_empty(
        cgroups: CgroupSupport, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group removed (by the instance's stop, in another thread) after its cgroup.procs
    was opened fails the read with ENODEV, not ENOENT: procs() reads that as gone too, so
    the once-a-second load sample, which reads every instance's group, cannot fail."""
    group = InstanceCgroup.create(cgroups, APP, "racing", CgroupLimits())
    real = Path.read_text

    def removed_mid_read(self: Path, *args: Any, **kwargs: Any) -> str:
        if self.name != "cgroup.procs" or not self.parent.is_dir():
            return real(self, *args, **kwargs)
        with open(self, encoding="ascii") as opened:
            self.parent.rmdir()  # the real kernel's answer to the read that follows
            return opened.read()

    try:
        monkeypatch.setattr(Path, "read_text", removed_mid_read)
        assert group.procs() == []
        monkeypatch.undo()
        assert all(not path.exists() for path in group.paths.values())
    finally:
        group.remove(timeout=REMOVE_TIMEOUT)


def test_remove_refuses_live_group(cgroups: CgroupSupport) -> None:
    """remove() of a group with a live process raises IsolationError after its timeout."""
    group = InstanceCgroup.create(cgroups, APP, "busy", CgroupLimits())
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True,
                               preexec_fn=child_setup(None, group, RLimits()))
    try:
        with pytest.raises(IsolationError, match="cannot remove cgroup"):
            group.remove(timeout=0.05)
    finally:
        group.kill_all()
        sleeper.wait(timeout=CHILD_TIMEOUT)
        group.remove(timeout=REMOVE_TIMEOUT)


def test_remove_empty_parent_keeps_what_is_in_use(tmp_path: Path) -> None:
    """A node going away removes its empty groups; one still holding something stays."""
    roots = {name: tmp_path / name for name in ("memory", "pids")}
    for root in roots.values():
        (root / "superagent.n1" / "idle").mkdir(parents=True)
    busy = roots["pids"] / "superagent.n1" / "busy"
    busy.mkdir()
    (busy / "cgroup.procs").write_text("123\n")  # stands for a group with a process in it
    remove_empty_parent(CgroupSupport(mode="v1", reason="test", parent="superagent.n1",
                                      v1_roots=roots))
    assert not (roots["memory"] / "superagent.n1").exists()
    assert busy.exists() and not (roots["pids"] / "superagent.n1" / "idle").exists()


# --- cpu weights and the agent's group ----------------------------------------------------------


def test_cpu_weight_written_in_fake_trees(tmp_path: Path) -> None:
    """v2 writes cpu.weight, v1 the equivalent cpu.shares; a quota under a core lowers it."""
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cgroup.controllers").write_text("cpu memory pids\n")
    v2 = detect_cgroups(tmp_path / "v2")
    InstanceCgroup.create(v2, "hello", "i1", CgroupLimits(cpu=0.5,
                                                          cpu_weight=app_cpu_weight(0.5)))
    assert (tmp_path / "v2" / "superagent" / "hello" / "i1" / "cpu.weight").read_text() == "50"
    fake_v1(tmp_path / "v1")
    v1 = detect_cgroups(tmp_path / "v1")
    InstanceCgroup.create(v1, "hello", "i1", CgroupLimits())
    shares = tmp_path / "v1" / "cpu" / "superagent" / "hello" / "i1" / "cpu.shares"
    assert shares.read_text() == "1024"
    assert app_cpu_weight(None) == app_cpu_weight(3.0) == APP_CPU_WEIGHT
    with pytest.raises(ConfigError, match="cpu_weight"):
        CgroupLimits(cpu_weight=0)


def test_agent_group_outweighs_the_apps_in_fake_tree(tmp_path: Path) -> None:
    """<parent>.agent beside <parent>, weighted above it; nothing without cgroups."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    support = detect_cgroups(tmp_path)
    group = AgentCgroup.create(support)
    assert group.path == tmp_path / "superagent.agent"
    agent = int((tmp_path / "superagent.agent" / "cpu.weight").read_text())
    apps = int((tmp_path / "superagent" / "cpu.weight").read_text())
    assert agent == AGENT_CPU_WEIGHT > apps
    assert group.add(4242) is None
    assert (tmp_path / "superagent.agent" / "cgroup.procs").read_text() == "4242"
    none = AgentCgroup.create(CgroupSupport(mode="none", reason="no hierarchy"))
    assert none.path is None and "no hierarchy" in (none.add(1) or "")


def test_agent_group_real(cgroups: CgroupSupport) -> None:
    """A real child moved into the agent's group is listed there, with the weight read back."""
    group = AgentCgroup.create(cgroups)
    assert group.path is not None, group.reason
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert group.add(child.pid) is None
        listed = (group.path / "cgroup.procs").read_text().split()
        assert str(child.pid) in listed
        key = "cpu.weight" if cgroups.mode == "v2" else "cpu.shares"
        expected = AGENT_CPU_WEIGHT if cgroups.mode == "v2" else v1_shares(AGENT_CPU_WEIGHT)
        assert int((group.path / key).read_text()) == expected == int(group.weight)
    finally:
        child.kill()
        child.wait()
        remove_groups_at(group.path)


def test_agent_group_is_removed_when_the_agent_leaves(cgroups: CgroupSupport) -> None:
    """``leave`` (the node going away: ``stop_all``) moves the agent back to the group it
    came from and removes ``<parent>.agent``; it runs in a child standing for the agent."""
    code = ("import json, sys\n"
            "from pathlib import Path\n"
            "from superagent.participant.agentcgroup import AgentCgroup\n"
            "from superagent.participant.cgroups import CgroupSupport\n"
            "f = json.loads(sys.argv[1])\n"
            "support = CgroupSupport(mode=f['mode'], parent=f['parent'], reason=f['reason'],\n"
            "    v2_root=Path(f['v2_root']) if f['v2_root'] else None,\n"
            "    v2_controllers=tuple(f['v2_controllers']),\n"
            "    v1_roots={k: Path(v) for k, v in f['v1_roots'].items()})\n"
            "before = Path('/proc/self/cgroup').read_text()\n"
            "group = AgentCgroup.create(support)\n"
            "assert group.add(__import__('os').getpid()) is None, group.reason\n"
            "assert before != Path('/proc/self/cgroup').read_text()\n"
            "group.leave()\n"
            "assert before == Path('/proc/self/cgroup').read_text()\n"
            "print(group.path)\n")
    fields = {"mode": cgroups.mode, "parent": cgroups.parent, "reason": cgroups.reason,
              "v2_root": str(cgroups.v2_root) if cgroups.v2_root else None,
              "v2_controllers": list(cgroups.v2_controllers),
              "v1_roots": {k: str(v) for k, v in cgroups.v1_roots.items()}}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(fields)],
                          capture_output=True, text=True, timeout=30)
    path = Path(done.stdout.strip()) if done.stdout.strip() else None
    try:
        assert done.returncode == 0, done.stderr
        assert path is not None and not path.exists()
    finally:
        if path is not None and path.exists():
            remove_groups_at(path)


# --- confinement to CPUs ----------------------------------------------------------------------


def test_choose_cpus_spreads_quotas_over_the_least_loaded() -> None:
    """n cores of quota (rounded up) get the n least loaded CPUs, ties to the highest; no
    quota, or one of every CPU, is not confined."""
    four = (0, 1, 2, 3)
    assert choose_cpus(four, None, {}) is None
    assert choose_cpus(four, 4.0, {}) is None
    assert choose_cpus((0, 1), 1.5, {}) is None
    assert choose_cpus((0,), 0.5, {}) is None
    assert choose_cpus(four, 0.5, {}) == (3,)
    assert choose_cpus(four, 1.0, {}) == (3,)
    assert choose_cpus(four, 0.5, {3: 0.5}) == (2,)
    assert choose_cpus(four, 2.5, {3: 0.5, 2: 0.25}) == (0, 1, 2)
    assert choose_cpus((0, 1), 0.5, {1: 0.5, 0: 0.75}) == (1,)
    assert choose_cpus((4, 6), 0.2, {}) == (6,)


def test_cpu_lists_round_trip() -> None:
    assert parse_cpus("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpus("") == parse_cpus("\n") == ()
    assert format_cpus((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"
    assert format_cpus((3,)) == "3"
    assert parse_cpus(format_cpus((1, 2, 9))) == (1, 2, 9)


def fake_v1_cpuset(root: Path, cpus: str = "0-3", *, parent: str = "superagent") -> None:
    """``fake_v1`` and a cpuset hierarchy with ``cpus`` at its root, memory node 0, and
    the ``parent`` group with the empty cpuset files the kernel gives a new group."""
    fake_v1(root)
    (root / "cpuset").mkdir()
    for file, text in (("cgroup.procs", ""), ("cpuset.cpus", cpus), ("cpuset.mems", "0")):
        (root / "cpuset" / file).write_text(text)
    level = root / "cpuset"
    for part in Path(parent).parts:
        level = level / part
        level.mkdir()
        for file in ("cpuset.cpus", "cpuset.mems"):
            (level / file).write_text("")


def fake_cpuset_group(root: Path, app: str, instance: str, *,
                      parent: str = "superagent") -> None:
    """The empty cpuset files the kernel gives new v1 groups (a plain directory has none)."""
    group = root / "cpuset" / parent / app / instance
    group.mkdir(parents=True, exist_ok=True)
    for level in (group, *group.parents):
        if level == root / "cpuset":
            break
        for file in ("cpuset.cpus", "cpuset.mems"):
            if not (level / file).exists():
                (level / file).write_text("")


def test_confinement_in_fake_v1_tree(tmp_path: Path) -> None:
    """v1: every level gets cpus and mems from its parent; instances under a core go to
    different CPUs, by quota; an unlimited one gets them all; a group made by an agent that
    did not confine is left out when adopted."""
    fake_v1_cpuset(tmp_path)
    support = detect_cgroups(tmp_path)
    assert support.cpuset_parent() == tmp_path / "cpuset" / "superagent"
    assert "cpuset" in support.reason
    made: dict[str, str] = {}
    for instance, cpu in (("i1", 0.5), ("i2", 0.25), ("i3", 0.5), ("i4", None), ("i5", 2.0)):
        fake_cpuset_group(tmp_path, "hello", instance)
        group = InstanceCgroup.create(support, "hello", instance, CgroupLimits(cpu=cpu))
        made[instance] = (tmp_path / "cpuset" / "superagent" / "hello" / instance
                          / "cpuset.cpus").read_text()
        assert group.applied["cpuset.cpus"] == made[instance]
        assert group.paths["cpuset"] == tmp_path / "cpuset" / "superagent" / "hello" / instance
    assert made == {"i1": "3", "i2": "2", "i3": "1", "i4": "0-3", "i5": "0,2"}
    for level in ("superagent", "superagent/hello", "superagent/hello/i1"):
        assert (tmp_path / "cpuset" / level / "cpuset.mems").read_text() == "0"
    assert (tmp_path / "cpuset" / "superagent" / "cpuset.cpus").read_text() == "0-3"
    for key in ("memory", "cpu", "pids"):
        (tmp_path / key / "superagent" / "old" / "i9").mkdir(parents=True)
    assert "cpuset" not in InstanceCgroup.existing(support, "old", "i9").paths
    assert "cpuset" in InstanceCgroup.existing(support, "hello", "i1").paths


def test_v1_cpuset_the_kernel_refuses_is_left_out(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """v1: a parent group the kernel gives no cpus (EINVAL: a sibling cpuset holds them
    exclusively, as ``cset shield`` makes) is found at detection: cpuset is left out and
    the reason says why, and instances still start, unconfined, rather than each failing."""
    fake_v1_cpuset(tmp_path)
    write = cpusets_module.write

    def refuse_cpus(path: Path, value: str) -> None:
        if path.name == "cpuset.cpus":  # stands in for the kernel's refusal
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path))
        write(path, value)

    monkeypatch.setattr(cpusets_module, "write", refuse_cpus)
    support = detect_cgroups(tmp_path)
    assert support.mode == "v1" and support.cpuset_parent() is None
    assert "cpuset" not in support.parent_dirs()
    assert os.strerror(errno.EINVAL) in support.reason and "not confined" in support.reason
    group = InstanceCgroup.create(support, "hello", "i1", CgroupLimits(cpu=0.5))
    assert group.applied["cpuset.cpus"] == "unavailable (no cpuset controller)"
    assert set(group.paths) == {"memory", "cpu", "pids"}


def test_confinement_below_a_parent_of_two_levels(tmp_path: Path) -> None:
    """v1: a parent group of two levels (``detect_cgroups(parent="a/b")``, as v2 allows)
    gets cpus and mems at both levels from the hierarchy's root, not from the empty upper
    level: otherwise the instance's group would have no CPU and take no task."""
    fake_v1_cpuset(tmp_path, parent="superagent/n1")
    support = detect_cgroups(tmp_path, parent="superagent/n1")
    fake_cpuset_group(tmp_path, "hello", "i1", parent="superagent/n1")
    group = InstanceCgroup.create(support, "hello", "i1", CgroupLimits(cpu=0.5))
    assert group.applied["cpuset.cpus"] == "3"
    for level in ("superagent", "superagent/n1", "superagent/n1/hello"):
        assert (tmp_path / "cpuset" / level / "cpuset.cpus").read_text() == "0-3", level
        assert (tmp_path / "cpuset" / level / "cpuset.mems").read_text() == "0", level


def test_confinement_in_fake_v2_tree(tmp_path: Path) -> None:
    """v2: cpuset enabled down to the app when the machine has it, the parent's effective
    cpus shared out; without the controller nothing is confined and the report says so."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids cpuset\n")
    support = detect_cgroups(tmp_path)
    assert support.v2_controllers == ("cpu", "memory", "pids", "cpuset")
    (tmp_path / "superagent" / "cpuset.cpus.effective").write_text("0-1\n")
    group = InstanceCgroup.create(support, "hello", "i1", CgroupLimits(cpu=0.5))
    path = tmp_path / "superagent" / "hello" / "i1"
    assert (path / "cpuset.cpus").read_text() == "1" == group.applied["cpuset.cpus"]
    assert "+cpuset" in (path.parent / "cgroup.subtree_control").read_text()
    InstanceCgroup.create(support, "hello", "i2", CgroupLimits(cpu=0.5))
    assert (path.parent / "i2" / "cpuset.cpus").read_text() == "0"

    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "cgroup.controllers").write_text("cpu memory pids\n")
    plain = detect_cgroups(tmp_path / "plain")
    assert plain.cpuset_parent() is None and "not confined" in plain.reason
    group = InstanceCgroup.create(plain, "hello", "i1", CgroupLimits(cpu=0.5))
    assert group.applied["cpuset.cpus"] == "unavailable (no cpuset controller)"


AFFINITY = """
import json, os
before = sorted(os.sched_getaffinity(0))
try:
    os.sched_setaffinity(0, range(os.cpu_count()))  # an app trying to widen its confinement
except OSError:
    pass
print(json.dumps([before, sorted(os.sched_getaffinity(0))]))
"""


def test_instances_under_a_core_are_confined_to_separate_cpus(cgroups: CgroupSupport) -> None:
    """Real groups: two half-core instances are confined to one CPU each, not the same one;
    an app cannot widen its confinement with sched_setaffinity."""
    if cgroups.cpuset_parent() is None:
        pytest.skip(f"no usable cpuset controller: {cgroups.reason}")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to confine an app to")
    groups = [InstanceCgroup.create(cgroups, APP, f"cpuset{n}", CgroupLimits(cpu=0.5))
              for n in range(2)]
    try:
        seen = []
        for group in groups:
            done = run_child(AFFINITY, child_setup(None, group, RLimits()))
            assert done.returncode == 0, done.stderr
            before, after = json.loads(done.stdout)
            assert len(before) == 1 and after == before, done.stdout
            assert [int(group.applied["cpuset.cpus"])] == before
            seen.append(before[0])
        assert seen[0] != seen[1]
    finally:
        for group in groups:
            group.kill_all()
            group.remove(timeout=REMOVE_TIMEOUT)
