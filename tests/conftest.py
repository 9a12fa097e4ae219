"""Suite-wide pytest hooks and fixtures: failing tests show the tails of their processes'
logs; ``world_dir`` is a directory other users may enter."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.logs import pytest_runtest_makereport  # noqa: F401


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is private to root), for what
    an app's own user must reach: releases, builds, interpreters."""
    path = Path(tempfile.mkdtemp(prefix="superagent-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
