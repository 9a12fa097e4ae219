"""The front load balancer examples in ops/ are valid configurations for the installed
haproxy and nginx, and check what the fleet answers on: every machine's /-/healthz."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

OPS = Path(__file__).resolve().parents[2] / "ops"


def tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.access(path, os.X_OK):
        pytest.skip(f"{name} is not installed")
    return path


def test_the_haproxy_example_is_valid_and_checks_healthz() -> None:
    cfg = OPS / "haproxy" / "haproxy.cfg"
    done = subprocess.run([tool("haproxy"), "-c", "-f", str(cfg)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    text = cfg.read_text()
    assert "uri /-/healthz" in text and "expect status 200" in text


def test_the_nginx_example_is_valid(tmp_path: Path) -> None:
    conf = tmp_path / "nginx.conf"  # the example is an http {} include, as in conf.d
    conf.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
                    f"events {{}}\nhttp {{\n  access_log off;\n"
                    f"  include {OPS / 'nginx' / 'superagent.conf'};\n}}\n")
    done = subprocess.run([tool("nginx"), "-t", "-p", str(tmp_path), "-c", str(conf)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "proxy_next_upstream error timeout http_502 http_503" in (
        OPS / "nginx" / "superagent.conf").read_text()
