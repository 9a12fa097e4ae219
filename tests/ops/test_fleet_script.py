"""``ops/fleet-netns`` refuses bad arguments with a message and exit status 2, before it
touches the network (no root needed for these)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "ops" / "fleet-netns"


@pytest.mark.parametrize(("argv", "message"), [
    (["up", "--coordinators", "2"], "--coordinators must be 1, 3 or 5"),
    (["up", "--machines", "2", "--coordinators", "3"], "at most --machines"),
    (["up", "--machines", "0"], "--machines must be 1..200"),
    (["sideways"], "invalid choice"),
    (["down", "nothex"], "a fleet's suffix is 6 hex digits"),
])
def test_bad_arguments_are_named(argv: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the script checks names only as root")
@pytest.mark.parametrize(("argv", "message"), [
    (["up", "--suffix", "xyz"], "--suffix must be 6 hex digits"),
    (["up", "--subnet", "192.168.1"], "--subnet must be 10.X.Y"),
])
def test_bad_names_are_named(argv: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True,
                          text=True, timeout=30)
    assert (done.returncode, done.stderr.strip()) == (2, f"fleet-netns: {message}" + (
        " (a /24 of the private 10.0.0.0/8)" if "subnet" in message else ""))


@pytest.mark.skipif(os.geteuid() != 0, reason="the script checks --dir only as root")
def test_a_used_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m1").mkdir()  # another fleet's state: never mixed with a new one
    done = subprocess.run([sys.executable, str(SCRIPT), "up", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr.strip()) == (
        2, f"fleet-netns: --dir {tmp_path} is not empty: give a new or empty directory")


@pytest.mark.skipif(os.geteuid() != 0, reason="creates cgroups (root)")
def test_teardown_removes_the_agents_cpu_groups_too() -> None:
    """An agent started by ``superagent participant`` lives in ``superagent.<node>.agent``
    beside its apps' ``superagent.<node>`` (agentcgroup.AgentCgroup); the fleet's teardown
    removes both once they are empty, or every fleet leaves one group per machine."""
    import importlib.machinery
    import importlib.util
    import secrets

    loader = importlib.machinery.SourceFileLoader("fleet_netns", str(SCRIPT))
    spec = importlib.util.spec_from_loader("fleet_netns", loader)
    assert spec is not None
    fleet = importlib.util.module_from_spec(spec)
    loader.exec_module(fleet)
    root = fleet.CGROUP_ROOT
    hierarchy = root / "cpu" if (root / "cpu" / "cgroup.procs").is_file() else root
    if not (hierarchy / "cgroup.procs").is_file() or not os.access(hierarchy, os.W_OK):
        pytest.skip(f"no writable cgroup hierarchy at {hierarchy}")
    node = f"m1-{secrets.token_hex(3)}"
    made = [hierarchy / f"superagent.{node}", hierarchy / f"superagent.{node}.agent"]
    try:
        for path in made:
            path.mkdir()
        fleet.remove_cgroups([node])
        assert [p for p in made if p.exists()] == []
    finally:
        for path in made:
            if path.exists():
                path.rmdir()
