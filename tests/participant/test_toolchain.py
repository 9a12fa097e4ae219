"""Tests of ``superagent.participant.toolchain``: real files, modes and interpreters."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from superagent.participant.errors import BuildFailed
from superagent.participant.toolchain import (
    Toolchain,
    find_python,
    find_uv,
    install_bin,
    python_version,
    release_env,
    runnable_by_all,
)


def private_copy(tmp_path: Path, name: str, source: str) -> Path:
    """``source`` copied under a directory only its owner may enter (as in /root)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700, exist_ok=True)
    private.chmod(0o700)
    target = private / name
    shutil.copy2(source, target)
    return target


def test_runnable_by_all_needs_the_file_and_every_directory_above_it(world_dir: Path) -> None:
    """o+x on the file and on each parent directory; symlinks are followed."""
    tmp_path = world_dir
    tool = tmp_path / "open" / "tool"
    tool.parent.mkdir(mode=0o755)
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert runnable_by_all(tool)
    tool.chmod(0o750)
    assert not runnable_by_all(tool)
    hidden = private_copy(tmp_path, "tool", str(tool))
    hidden.chmod(0o755)
    assert not runnable_by_all(hidden)
    link = tmp_path / "open" / "link"
    link.symlink_to(hidden)
    assert not runnable_by_all(link)
    assert not runnable_by_all(tmp_path / "missing")


def test_a_private_agent_interpreter_gives_way_to_the_systems(tmp_path: Path) -> None:
    """An interpreter under a private directory (pyenv in /root) is passed over."""
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if system is None or not runnable_by_all(Path(system)):
        pytest.skip("no system python3 that every user can run")
    own = private_copy(tmp_path, "python3", sys.executable)
    assert find_python(own=own) == Path(system).resolve()  # the file, not a link to it
    assert python_version(Path(system)).startswith("3.")


def test_a_pinned_version_that_is_not_installed_is_named(tmp_path: Path) -> None:
    """[build] python = "3.99" fails the build naming what was looked for."""
    with pytest.raises(BuildFailed, match=r"no python3\.99 on"):
        find_python("3.99")


def test_a_private_uv_is_copied_where_every_user_can_run_it(world_dir: Path) -> None:
    """uv beside a private interpreter is copied once into the tools directory."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent))
    if uv is None:
        pytest.skip("uv is not installed beside this interpreter")
    tmp_path = world_dir
    own = private_copy(tmp_path, "python3", sys.executable)
    private_copy(tmp_path, "uv", uv)
    tools = tmp_path / "tools"
    copy = find_uv(tools, own=own)
    assert copy == tools / "uv" and runnable_by_all(copy)
    first = copy.stat().st_ino
    assert find_uv(tools, own=own) == copy and copy.stat().st_ino == first  # not copied again


def test_release_bin_and_environment(tmp_path: Path) -> None:
    """bin/ links python, python3 and uv; PATH puts the venv, node_modules/.bin, bin first."""
    release = tmp_path / "r1"
    src = release / "src"
    src.mkdir(parents=True)
    tools = Toolchain(python=Path("/usr/bin/python3"), version="3.11.2", uv=Path("/bin/uv"))
    bin_dir = install_bin(release, tools)
    assert {p.name: os.readlink(p) for p in bin_dir.iterdir()} == {
        "python": "/usr/bin/python3", "python3": "/usr/bin/python3", "uv": "/bin/uv"}
    assert release_env(src, "/usr/bin") == {
        "PATH": f"{src}/.venv/bin:{src}/node_modules/.bin:{release}/bin:/usr/bin"}
    (src / ".venv" / "bin").mkdir(parents=True)
    assert release_env(src, "/usr/bin")["VIRTUAL_ENV"] == str(src / ".venv")
    assert "uv" in tools.describe() and "3.11.2" in tools.describe()


def test_a_link_through_a_private_directory_is_followed_to_the_file(world_dir: Path) -> None:
    """A venv's python under a private directory that links to a system interpreter is
    usable, but only by its target: the release's bin/ must link the file itself."""
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if system is None or not runnable_by_all(Path(system)):
        pytest.skip("no system python3 that every user can run")
    private = world_dir / "private"
    private.mkdir(mode=0o700)
    (private / "python3").symlink_to(system)
    assert find_python(own=private / "python3") == Path(system).resolve()
