"""Running a short python3 child with a ``preexec_fn``, for the isolation and cgroup tests.

The child's interpreter must be one every user may execute (the uid-switch tests run it
as an app user), and it runs in a new session with a minimal environment, as the
supervisor runs instances.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

CHILD_TIMEOUT = 20.0  # any child here finishes in well under a second


def world_python() -> str | None:
    """A python3 every user may execute (pyenv's under /root is not), or None."""
    for candidate in ("/usr/bin/python3", shutil.which("python3"), sys.executable):
        if candidate and world_executable(Path(candidate)):
            return str(Path(candidate).resolve())
    return None


def child_python() -> str:
    """``world_python``, or the test is skipped: without it no child can run as an app
    user."""
    python = world_python()
    if python is None:
        pytest.skip("no python3 that an unprivileged user can execute")
    return python


def world_executable(path: Path) -> bool:
    """True when others may traverse every directory to ``path`` and execute it."""
    try:
        real = path.resolve(strict=True)
    except OSError:
        return False
    return all(os.stat(part).st_mode & stat.S_IXOTH for part in (real, *real.parents))


def run_child(code: str, setup: object, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python3 -c code`` with ``setup`` as preexec_fn in a new session, output captured."""
    assert callable(setup)
    return subprocess.run([child_python(), "-I", "-S", "-c", code, *args], preexec_fn=setup,
                          start_new_session=True, capture_output=True, text=True, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
                          timeout=CHILD_TIMEOUT, check=False)
