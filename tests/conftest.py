"""Suite-wide pytest hooks and fixtures: failing tests show the tails of their processes'
logs; ``world_dir`` is a directory other users may enter; structlog's configuration is
put back after every test; SIGINT reaches the processes tests start as it would from a
terminal, however the suite itself was started."""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.support.logs import pytest_runtest_makereport  # noqa: F401


def pytest_configure(config: pytest.Config) -> None:
    """A shell starts a background job (``scripts/test &``, nohup in a script) with SIGINT
    ignored, every process it starts inherits that, and a Python started so installs no
    KeyboardInterrupt handler: a test that stops a CLI with SIGINT (Ctrl-C) then waits in
    vain. A handler here makes the children start with SIGINT at its default again."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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


@pytest.fixture(autouse=True)
def _structlog_config() -> Iterator[None]:
    """A test that runs the CLI in this process (``cli.main``) configures structlog for
    the whole process, e.g. ``--log-level error``: later tests' ``capture_logs`` then saw
    no warnings at all. Each test gets back the configuration it started with."""
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)
