"""``scripts/test`` installs the system packages some tests need (nftables, chromium,
haproxy); under CI a package it cannot install fails the run at once, before any test,
rather than letting those tests skip and the run pass.

The machine's own nft, chromium and haproxy are hidden in a private mount namespace
(``/dev/null`` bound over each), and ``apt-get`` is a stub that fails and records its
arguments. Needs root and ``unshare``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = ("/usr/sbin/nft", "/usr/bin/chromium", "/usr/sbin/haproxy")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="needs root and unshare (a private mount namespace)")


def _run_without_packages(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "apt-calls"
    (stubs / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit 100\n')
    (stubs / "apt-get").chmod(0o755)
    hide = " && ".join(f"{{ [ ! -e {p} ] || mount --bind /dev/null {p}; }}" for p in HIDDEN)
    path = f"{stubs}:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
    script = f"{hide} && exec env PATH={path} {ROOT / 'scripts' / 'test'} --collect-only -q"
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, stdin=subprocess.DEVNULL)


def test_ci_fails_when_a_package_cannot_be_installed(tmp_path: Path) -> None:
    done = _run_without_packages(tmp_path, {"CI": "true"})
    assert done.returncode != 0, done.stdout + done.stderr
    assert "nftables" in done.stderr
    assert "== ruff" not in done.stdout  # nothing ran: the run stopped at the install
    calls = (tmp_path / "apt-calls").read_text()
    assert "install" in calls and "nftables" in calls
