"""The source distribution carries what a build from it needs.

pyproject.toml names an in-tree build backend (``backend-path = ["build_support"]``); a
build from the sdist (``python -m build``, ``pip install superagent-X.tar.gz``) finds it
only if the sdist carries it. The sdist is made, and then asked for its wheel's build
requirements (the first hook pip calls), by the backend's own hooks in a child process:
no index, no network, no wheel package needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOK = ("import sys, tomllib\n"
        "conf = tomllib.load(open('pyproject.toml', 'rb'))['build-system']\n"
        "sys.path[:0] = conf['backend-path']\n"
        "backend = __import__(conf['build-backend'])\n"
        "print(getattr(backend, sys.argv[1])(*sys.argv[2:]))\n")


def _hook(cwd: Path, hook: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", HOOK, hook, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SUPERAGENT_PURE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_sdist_carries_its_build_backend(tmp_path: Path) -> None:
    # From a copy of the tracked files: setuptools adds whatever an earlier build listed in
    # the checkout's *.egg-info/SOURCES.txt, which would hide a file the sdist misses.
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a checkout (the sdist is made from the tracked files)")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode().split("\0")
    tree = tmp_path / "tree"
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    dist = tmp_path / "dist"
    dist.mkdir()
    sdist = dist / _hook(tree, "build_sdist", str(dist))
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "src", filter="data")
    (unpacked,) = (tmp_path / "src").iterdir()
    assert (unpacked / "superagent" / "compiled.py").is_file()  # setup.py loads it
    assert "mypy" in _hook(unpacked, "get_requires_for_build_wheel")
