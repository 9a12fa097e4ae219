"""The ``superagent`` command as a user runs it: a real process, its exit code and output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import superagent

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 30.0

GOOD_CONFIG = """\
[proxy]
listen = ["127.0.0.1:18080"]
admin = "127.0.0.1:18081"
workers = 3
grace = "10s"

[apps.web]
instances = ["127.0.0.1:9001", "127.0.0.1:9002"]
prefix = "/web"
strip_prefix = true

[apps.api]
instances = [{ id = "api-1", address = "127.0.0.1:9003" }]
hosts = ["api.example"]
port = 18082

[apps.api.timeouts]
connect = "2s"
"""


def run(*args: str, executable: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command with ``args`` and return its result (never hangs past TIMEOUT)."""
    cmd = (executable or [sys.executable, "-m", "superagent"]) + list(args)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *parts: str) -> str:
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {result.stderr!r}"
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(GOOD_CONFIG)
    return path


def test_check_prints_a_summary(config: Path) -> None:
    """--check on a valid file exits 0 with a one-line summary of apps, listeners and workers."""
    result = run("proxy", "--config", str(config), "--check")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{config}: ok (2 apps, 2 listeners, parser httptools, 3 workers)\n"
    assert "Traceback" not in result.stderr


def test_check_applies_command_line_overrides(config: Path) -> None:
    """--workers and --parser on the command line win over the file in the summary."""
    result = run("proxy", "--config", str(config), "--workers", "5", "--parser", "h11",
                 "--check")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{config}: ok (2 apps, 2 listeners, parser h11, 5 workers)\n"


def test_check_json_is_machine_readable(config: Path) -> None:
    """--json --check prints one valid JSON document describing the config."""
    result = run("--json", "proxy", "--config", str(config), "--check")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == {
        "config": str(config), "ok": True, "parser": "httptools", "workers": 3,
        "listeners": ["127.0.0.1:18080", "127.0.0.1:18082 -> api"],
        "apps": {"web": 2, "api": 1},
    }


def test_check_missing_file_is_one_line(tmp_path: Path) -> None:
    """A missing config file exits non-zero with one line naming the file."""
    missing = tmp_path / "nope.toml"
    result = run("proxy", "--config", str(missing), "--check")
    assert_one_line_error(result, str(missing), "cannot read")
    assert result.returncode == 2


@pytest.mark.parametrize("content", [
    b'[proxy]\nlisten = ["127.0.0.1:18080"\n',  # unclosed array
    b'[proxy]\nlisten = ["127.0.0.1:18080"]\n# caf\xe9 (Latin-1, not UTF-8)\n',
], ids=["syntax", "not-utf8"])
def test_check_invalid_toml_is_one_line(tmp_path: Path, content: bytes) -> None:
    """A file that is not TOML exits non-zero with one line naming the file and the problem."""
    bad = tmp_path / "bad.toml"
    bad.write_bytes(content)
    result = run("proxy", "--config", str(bad), "--check")
    assert_one_line_error(result, str(bad), "not valid TOML")


@pytest.mark.parametrize(("text", "key"), [
    ('[proxy]\nlisten = ["127.0.0.1:18080"]\nlisten_on = "x"\n', "proxy.listen_on"),
    ('[apps.web]\ninstances = ["127.0.0.1:9001"]\nprefix = "/w"\nprefx = "/x"\n',
     "apps.web.prefx"),
    ('[apps.web]\ninstances = ["127.0.0.1:9001"]\nprefix = "/w"\n[apps.web.timeouts]\n'
     'conect = "1s"\n', "apps.web.timeouts.conect"),
    ('[proxy]\nlisten = ["127.0.0.1:18080"]\n[prxy]\nadmin = "off"\n', "prxy"),
], ids=["proxy", "app", "timeouts", "top-level"])
def test_check_unknown_key_is_one_line(tmp_path: Path, text: str, key: str) -> None:
    """An unknown key exits non-zero with one line naming the file and the dotted key."""
    path = tmp_path / "typo.toml"
    path.write_text(text)
    result = run("proxy", "--config", str(path), "--check")
    line = assert_one_line_error(result, f"{path}: {key}: unknown key")
    assert line.startswith("superagent proxy: ")
    assert result.returncode == 2


@pytest.mark.parametrize(("text", "key"), [
    ('[proxy]\nlisten = ["127.0.0.1"]\n', "proxy.listen"),
    ('[proxy]\nlisten = ["127.0.0.1:\u00b2"]\n', "proxy.listen"),  # a digit int() refuses
    ('[proxy]\nparser = "fast"\n', "proxy.parser"),
    ('[apps.web]\ninstances = ["127.0.0.1:9001"]\n', "apps.web"),
    ('[apps.web]\ninstances = ["127.0.0.1:9001"]\nport = 18080\n'
     '[proxy]\nlisten = ["127.0.0.1:18080"]\n', "apps.web.port"),
], ids=["no-port", "superscript-port", "bad-parser", "no-route", "port-taken"])
def test_check_invalid_value_is_one_line(tmp_path: Path, text: str, key: str) -> None:
    """A wrong value exits non-zero with one line naming the file and the key."""
    path = tmp_path / "wrong.toml"
    path.write_text(text)
    result = run("proxy", "--config", str(path), "--check")
    assert_one_line_error(result, f"{path}: {key}")


def test_negative_workers_is_one_line(config: Path) -> None:
    """--workers below zero is refused with one line, no traceback."""
    result = run("proxy", "--config", str(config), "--workers", "-1", "--check")
    assert_one_line_error(result, "--workers")


def test_version() -> None:
    """--version prints the package version and exits 0 (module and console script)."""
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"superagent {superagent.__version__}"
    script = shutil.which("superagent")
    if script is not None:  # the console script installed by `pip install -e .`
        result = run("--version", executable=[script])
        assert result.returncode == 0
        assert result.stdout.strip() == f"superagent {superagent.__version__}"


def test_module_help() -> None:
    """python -m superagent --help exits 0 and lists the proxy subcommand."""
    result = run("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: superagent")
    assert "proxy" in result.stdout
    assert result.stderr == ""


def test_proxy_help_lists_options() -> None:
    """superagent proxy --help documents --config, --workers, --parser and --check."""
    result = run("proxy", "--help")
    assert result.returncode == 0
    for option in ("--config", "--workers", "--parser", "--check"):
        assert option in result.stdout


def test_no_command_prints_help_and_fails() -> None:
    """Without a subcommand the help goes out and the exit code is the usage error."""
    result = run()
    assert result.returncode == 2
    assert "usage: superagent" in result.stdout
    assert "Traceback" not in result.stderr


def test_proxy_without_config_is_a_usage_error() -> None:
    """superagent proxy without --config exits 2 with argparse's usage message."""
    result = run("proxy")
    assert result.returncode == 2
    assert "--config" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_reader_that_goes_away_is_no_traceback(config: Path) -> None:
    """`superagent ... --json | head`: a closed pipe ends the command quietly (exit 141)."""
    process = subprocess.Popen([sys.executable, "-m", "superagent", "--json", "proxy",
                                "--config", str(config), "--check"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before the command writes
    err = process.stderr.read().decode()
    assert process.wait(timeout=TIMEOUT) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_a_bad_autoscale_timing_is_one_line(tmp_path: Path) -> None:
    """superagent coordinator --autoscale-timing with an unknown name or a bad value is
    refused at start with one line naming it."""
    for bad, named in (("speed=3", "speed"), ("window=-1", "window")):
        result = run("coordinator", "--data-dir", str(tmp_path), "--autoscale-timing", bad)
        assert_one_line_error(result, "--autoscale-timing", named)
