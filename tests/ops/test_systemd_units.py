"""The systemd units in ops/systemd: systemd accepts them, they keep the properties the
install guide promises (apps outlive the agent, no restart loop on a usage error, app
isolation left working), and the command lines they build parse with today's flags."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from superagent.cli import build_parser

SYSTEMD = Path(__file__).resolve().parents[2] / "ops" / "systemd"
UNITS = ("superagent-coordinator.service", "superagent-participant.service")
BINARY = "/opt/superagent/bin/superagent"


def directives(unit: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file (continuation lines joined), by key."""
    found: dict[str, list[str]] = {}
    logical = ""
    for line in (SYSTEMD / unit).read_text().splitlines():
        if line.startswith(("#", ";", "[")) and not logical:
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if "=" in logical:
            key, _, value = logical.partition("=")
            found.setdefault(key.strip(), []).append(" ".join(value.split()))
        logical = ""
    return found


def env_file() -> dict[str, str]:
    values = {}
    for line in (SYSTEMD / "superagent.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def expanded_argv(unit: str) -> list[str]:
    """ExecStart as systemd runs it with the example environment file: ``${X}`` is one
    word, ``$X`` splits into words, ``%d`` is the credentials directory."""
    env = env_file()
    words = []
    for word in shlex.split(directives(unit)["ExecStart"][0]):
        if word.startswith("${"):
            words.append(env[word[2:-1]])
        elif word.startswith("$"):
            words += env[word[1:]].split()
        else:
            words.append(word.replace("%d", "/run/credentials/x"))
    return words


def test_the_participant_unit_leaves_apps_running_and_isolation_working() -> None:
    unit = directives(UNITS[1])
    assert unit["KillMode"] == ["process"]  # mixed/control-group would kill every app
    assert unit["Restart"] == ["always"]
    assert unit["RestartPreventExitStatus"] == ["2"]
    assert unit["OOMPolicy"] == ["continue"]
    assert "User" not in unit and "DynamicUser" not in unit  # useradd, setuid, cgroups
    assert unit["ProtectSystem"] == ["yes"]  # full/strict make /etc read-only: no useradd
    for breaks_cgroups in ("ProtectControlGroups", "ProtectKernelTunables", "PrivateUsers"):
        assert breaks_cgroups not in unit, breaks_cgroups
    caps = set(unit["CapabilityBoundingSet"][0].split())
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL"} <= caps


def test_the_coordinator_unit_runs_unprivileged_and_restarts() -> None:
    unit = directives(UNITS[0])
    assert unit["DynamicUser"] == ["yes"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert unit["Restart"] == ["always"]
    assert unit["RestartPreventExitStatus"] == ["2"]
    assert unit["LoadCredential"] == ["coordinator-secret:/etc/superagent/coordinator-secret"]


@pytest.mark.parametrize("unit", UNITS)
def test_the_command_line_parses_with_todays_flags(unit: str) -> None:
    argv = expanded_argv(unit)
    assert argv[0] == BINARY
    args = build_parser().parse_args(argv[1:])
    assert args.command == unit.removeprefix("superagent-").removesuffix(".service")
    assert args.data_dir.startswith("/var/lib/superagent")


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    fake = tmp_path / "superagent"  # verify checks that ExecStart's binary is executable
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    for unit in UNITS:
        (tmp_path / unit).write_text((SYSTEMD / unit).read_text().replace(BINARY, str(fake)))
    done = subprocess.run([analyze, "verify", "--man=no", *(str(tmp_path / u) for u in UNITS)],
                          capture_output=True, text=True, timeout=60)
    # verify exits 0 on an unknown key and only says so: any output is a finding.
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr)


def _restricts_mount_namespaces(value: str) -> bool:
    """systemd's RestrictNamespaces=: yes/no, a list of the types allowed, or ~list of
    those refused."""
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("", "no", "false", "off", "0"):
        return False
    if value.startswith("~"):
        return "mnt" in value[1:].split()
    return "mnt" not in value.split()


def test_the_participant_unit_leaves_app_permissions_enforceable(tmp_path: Path) -> None:
    """[permissions] need CAP_NET_ADMIN (nft) and CAP_SYS_ADMIN plus mount namespaces (a
    filesystem = "release" instance's read-only namespace): the agent, run with the unit's
    capability bounding set, detects both as enforceable."""
    unit = directives(UNITS[1])
    assert not _restricts_mount_namespaces(unit.get("RestrictNamespaces", ["no"])[-1])
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None or shutil.which("nft") is None:
        pytest.skip("needs root, setpriv and nft (the agent's own conditions)")
    caps = unit["CapabilityBoundingSet"][0].split()
    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    name = "sa-unit-" + "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=6))
    code = ("import json, sys\n"
            "from superagent.participant.permissions import detect_permissions\n"
            "print(json.dumps(detect_permissions(group=sys.argv[1], table=sys.argv[2])"
            ".to_json()))\n")
    try:
        done = subprocess.run([setpriv, f"--bounding-set={bounding}", sys.executable, "-c", code,
                               name, name.replace("-", "_")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1]) == {"network": "enforced",
                                                            "filesystem": "enforced"}
    finally:
        subprocess.run(["nft", "delete", "table", "inet", name.replace("-", "_")],
                       capture_output=True, check=False)
        subprocess.run(["groupdel", name], capture_output=True, check=False)
