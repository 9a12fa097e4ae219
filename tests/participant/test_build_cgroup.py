"""Builds and ``[test]`` commands run in ``<parent>/_builds``, weighted as one app, not in
the agent's cpu group (whose weight is the proxy's: a build there would take the CPU from
every app and stand level with the proxy workers).

Real cgroups and a real build running as ``nobody``; needs root and a cgroup hierarchy
with a cpu controller (skipped, naming what is missing, otherwise). The groups carry a
random suffix and are removed in teardown.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import secrets
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from superagent.participant.agentcgroup import AgentCgroup
from superagent.participant.build import run_build
from superagent.participant.cgroups import (
    APP_CPU_WEIGHT,
    CgroupSupport,
    detect_cgroups,
    remove_empty_parent,
)
from superagent.participant.releases import ReleaseStore
from tests.participant.tarballs import file, make_tar
from tests.support.wait import wait_until_async


@pytest.fixture
def support() -> Iterator[CgroupSupport]:
    if os.geteuid() != 0:
        pytest.skip("cgroups need root")
    found = detect_cgroups(parent=f"superagent.t-{secrets.token_hex(5)}")
    if found.mode == "none":
        pytest.skip(f"no usable cgroups: {found.reason}")
    try:
        yield found
    finally:
        remove_empty_parent(found)


async def test_a_build_runs_in_the_builds_group(support: CgroupSupport, tmp_path: Path) -> None:
    agent = AgentCgroup.create(support)
    assert agent.path is not None and agent.builds is not None, agent.reason
    weight = (agent.builds.parent / "cpu.weight" if support.mode == "v2"
              else agent.builds.parent / "cpu.shares")
    assert int(weight.read_text()) == (APP_CPU_WEIGHT if support.mode == "v2" else 1024)
    store = ReleaseStore(tmp_path / "store", keep=1)
    store.build_cgroup = agent.builds
    manifest = ('[app]\nname = "hello"\n[run]\ncommand = "x"\n'
                '[build]\ncommand = "cat /proc/self/cgroup > cgroup.txt; id -u > uid.txt"\n')
    archive = make_tar([file("superagent.toml", manifest)])
    nobody = pwd.getpwnam("nobody")
    prepared = await store.prepare("hello", "r1", archive, hashlib.sha256(archive).hexdigest(),
                                   uid=nobody.pw_uid, gid=nobody.pw_gid)
    assert (prepared.src / "uid.txt").read_text().strip() == str(nobody.pw_uid)
    groups = (prepared.src / "cgroup.txt").read_text().splitlines()
    wanted = f"/{support.parent}/_builds"
    cpu = [line for line in groups
           if line.split(":")[1] in ("", "cpu", "cpu,cpuacct", "cpuacct,cpu")]
    assert any(line.endswith(wanted) for line in cpu), groups


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (killed, awaiting its reaper)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


async def test_a_daemon_a_build_leaves_behind_is_killed(support: CgroupSupport) -> None:
    """A build that starts a daemon in a session of its own is out of reach of its
    process group's kill, but not of its cgroup: it must not outlive the build. Left
    running, it is the app's code with the app's own group, outside the egress set: the
    instances of a loopback-only app could send anything out of the machine through it."""
    agent = AgentCgroup.create(support)
    assert agent.builds is not None, agent.reason
    nobody = pwd.getpwnam("nobody")
    pid = 0
    with tempfile.TemporaryDirectory(prefix="sa-build-") as work:
        os.chmod(work, 0o777)
        command = ("setsid sh -c 'echo $$ > daemon.pid.tmp; mv daemon.pid.tmp daemon.pid; "
                   "exec sleep 300' </dev/null >/dev/null 2>&1 &\n"
                   "while [ ! -s daemon.pid ]; do :; done")
        try:
            result = await run_build(command, cwd=Path(work), env={"PATH": "/usr/bin:/bin"},
                                     uid=nobody.pw_uid, gid=nobody.pw_gid, timeout=10.0,
                                     cgroup=agent.builds)
            assert result.returncode == 0, result.log
            pid = int((Path(work) / "daemon.pid").read_text())
            assert pid > 0
            await wait_until_async(lambda: not running(pid), "the build's daemon killed",
                                   timeout=3.0)
        finally:
            if pid > 0:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
