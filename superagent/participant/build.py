"""A release's build: the detected build command, its environment, and running it.

Theory of operation
-------------------
``releases.ReleaseStore.prepare`` builds each release in place, as the app's user. Without
a ``[build] command`` the build is detected from the tree (``default_build_command``):
requirements.txt or pyproject.toml makes a virtual environment with uv (pip without uv),
package.json runs npm. ``command_env`` is the whole environment a build or test command
gets, and ``run_build`` runs one as ``/bin/sh -c`` in its own session, collecting stdout
and stderr interleaved into a bounded log (``BuildOutput``: the end of a log is where the
error is), killing the whole process group at its timeout or cancellation.

A build may leave a daemon behind in a session of its own (``setsid``), out of reach of
the process group's kill. It would run on as the app's user with the app's own group,
outside the egress set of a loopback-only app, and relay its instances' traffic out of the
machine over loopback. A child cannot leave its cgroup, though: once the last running
build of a user in the builds cgroup ends, ``kill_strays`` kills what that user still has
there. (Without a builds cgroup the agent has no such hold on them.)
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from superagent.manifest import AppSpec
from superagent.participant.toolchain import VENV, Toolchain, build_env, release_env
from superagent.procs import terminate_group

BUILD_KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for a build being stopped
LOG_LIMIT = 1024**2  # bytes of build output kept; the end of a log is where the error is
TAIL_LINES = 40  # lines of the log a BuildFailed carries to the deploy record and the CLI
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"  # build PATH when the agent has none
BUILD_UMASK = 0o022  # whatever the agent's umask, the build makes files the runtime can read
_CHUNK = 64 * 1024  # read unit for build output
STRAY_ROUNDS = 50  # kill passes over a builds cgroup: a forking daemon makes new children
# builds running, by (builds cgroup.procs, uid): strays are killed when the last one ends,
# so concurrent builds of one app do not kill each other's processes
_running: Counter[tuple[Path, int]] = Counter()


def needs_python(src: Path) -> bool:
    """Whether the detected build of ``src`` makes a Python environment."""
    return (src / "requirements.txt").is_file() or (src / "pyproject.toml").is_file()


def npm_command(src: Path) -> str:
    """The detected build's npm step for ``src`` (which has a package.json)."""
    npm = "npm ci" if (src / "package-lock.json").is_file() else "npm install"
    # --prefer-offline: the app's own npm cache answers what it holds, without a
    # metadata round trip to the registry per package
    return f"{npm} --prefer-offline --no-audit --no-fund"


def default_build_command(src: Path, tools: Toolchain | None, *, npm: bool = True
                          ) -> str | None:
    """The detected build of a tree whose manifest has no ``[build] command``; None: none.

    requirements.txt (else pyproject.toml): a virtual environment in ``.venv`` on the
    toolchain's interpreter with the requirements (else the project) installed, by uv
    when the toolchain has it (its per-app cache makes an unchanged set install in well
    under a second), by pip otherwise; package.json: ``npm ci`` with a
    package-lock.json, else ``npm install`` (both preferring the app's cache to the
    registry). Both: both. ``tools`` may be None only for
    a tree that does not ``needs_python``; ``npm`` False leaves the npm step out (the
    release got its node_modules from the dependency cache).
    """
    steps: list[str] = []
    if needs_python(src):
        assert tools is not None
        python = shlex.quote(str(tools.python))
        what = "-r requirements.txt" if (src / "requirements.txt").is_file() else "."
        if tools.uv is not None:
            steps.append(f"uv venv --quiet --python {python} {VENV} && uv pip install "
                         f"--python {VENV}/bin/python {what}")
        else:
            steps.append(f"{python} -m venv {VENV} && {VENV}/bin/pip install "
                         f"--disable-pip-version-check --no-input {what}")
    if npm and (src / "package.json").is_file():
        steps.append(npm_command(src))
    return " && ".join(steps) or None


@dataclass
class BuildOutput:
    """The build log being collected: a header line, then the last ``limit`` bytes of output."""

    head: bytes
    limit: int = LOG_LIMIT
    tail: bytearray = field(default_factory=bytearray)
    dropped: int = 0

    def feed(self, data: bytes | bytearray) -> None:
        self.tail += data
        excess = len(self.tail) - self.limit
        if excess > 0:
            del self.tail[:excess]
            self.dropped += excess

    def render(self, footer: str) -> bytes:
        notice = f"[... {self.dropped} bytes of output dropped ...]\n" if self.dropped else ""
        newline = b"\n" if self.tail and not self.tail.endswith(b"\n") else b""
        return self.head + notice.encode() + bytes(self.tail) + newline + footer.encode()


@dataclass(frozen=True, slots=True)
class BuildResult:
    returncode: int | None  # None: timed out
    log: bytes
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def command_env(app: str, release: str, *, home: Path, spec: AppSpec, src: Path,
                cache: Path | None = None,
                extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a build or test command: PATH (the release's venv,
    node_modules/.bin and bin/ first: ``toolchain.release_env``), VIRTUAL_ENV once there
    is one, HOME, LANG=C.UTF-8, SUPERAGENT_APP and SUPERAGENT_RELEASE, for builds (with
    ``cache``) the package caches and the machine's index settings
    (``toolchain.build_env``), under the manifest's ``[env]``, under ``extra``; nothing
    else of the agent's environment."""
    return {"HOME": str(home), "LANG": "C.UTF-8", "SUPERAGENT_APP": app,
            "SUPERAGENT_RELEASE": release,
            **release_env(src, os.environ.get("PATH") or DEFAULT_PATH),
            **(build_env(cache, os.environ) if cache is not None else {}),
            **spec.env_dict(), **(extra or {})}


def _join_then_switch(procs: Path, uid: int | None, gid: int | None) -> Callable[[], None]:
    """A ``preexec_fn``: join the cgroup whose ``cgroup.procs`` is ``procs`` (as root, so
    before the user switch, which it then does as Popen's user/group would)."""
    path = os.fsencode(procs)

    def enter() -> None:
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        except OSError:
            pass  # the build still runs, in the agent's group: slower apps, not a failure
        if uid is not None or gid is not None:
            os.setgroups([])
        if gid is not None:
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)

    return enter


async def run_build(command: str, *, cwd: Path, env: Mapping[str, str], uid: int | None,
                    gid: int | None, timeout: float, limit: int = LOG_LIMIT,
                    note: str = "", cgroup: Path | None = None) -> BuildResult:
    """``/bin/sh -c command`` in its own session; output interleaved into a bounded log.

    On timeout or cancellation the whole process group gets SIGTERM, then SIGKILL after
    ``BUILD_KILL_GRACE``; stragglers left in the group after a normal exit are killed too.
    The output is read to end-of-file, so a background child that keeps the build's stdout
    open holds the build until the timeout (and then fails it): builds must not leave
    daemons behind. ``cgroup``: the ``cgroup.procs`` file the build joins first
    (``agentcgroup.AgentCgroup.builds``); None leaves it in the agent's group.
    """
    output = BuildOutput(head=f"{note}$ {command}\n".encode(), limit=limit)
    started = time.monotonic()
    as_user = uid is not None or gid is not None
    switch: dict[str, Any] = (
        {"preexec_fn": _join_then_switch(cgroup, uid, gid)} if cgroup is not None
        else {"user": uid, "group": gid, "extra_groups": [] if as_user else None})
    # only a user of its own: the agent's (uid None, or its own) must never be swept
    strays = (cgroup, uid) if (cgroup is not None and uid is not None and uid != 0
                               and uid != os.getuid()) else None
    if strays is not None:
        _running[strays] += 1
    try:
        proc = await trio.lowlevel.open_process(
            ["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, cwd=str(cwd), env=dict(env), start_new_session=True,
            umask=BUILD_UMASK, **switch)
        stdout = proc.stdout
        assert stdout is not None  # stdout=PIPE
        try:
            with trio.move_on_after(timeout) as scope:
                while chunk := await stdout.receive_some(_CHUNK):
                    output.feed(chunk)
                await proc.wait()
        finally:
            with trio.CancelScope(shield=True):
                await terminate_group(proc, grace=BUILD_KILL_GRACE)
                await stdout.aclose()
    finally:
        if strays is not None:
            _running[strays] -= 1
            if _running[strays] <= 0:
                del _running[strays]
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(kill_strays, *strays)
    seconds = time.monotonic() - started
    if scope.cancelled_caught:
        return BuildResult(None, output.render(f"[timed out after {timeout:g}s]\n"), seconds)
    code = proc.returncode
    return BuildResult(code, output.render(f"[exit status {code} after {seconds:.1f}s]\n"),
                        seconds)


def kill_strays(procs: Path, uid: int) -> int:
    """SIGKILL every live process of ``uid`` in the cgroup whose ``cgroup.procs`` is
    ``procs``, pass after pass until none is left (or ``STRAY_ROUNDS``); how many
    signals were sent. Never raises. Blocking."""
    killed = 0
    for _ in range(STRAY_ROUNDS):
        try:
            members = [int(pid) for pid in procs.read_text().split()]
        except (OSError, ValueError):
            return killed
        found = [pid for pid in members if _live_owner(pid) == uid]
        if not found:
            return killed
        for pid in found:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


def _live_owner(pid: int) -> int | None:
    """The real uid of ``pid``; None when it is gone or a zombie (killed already)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("State", "").strip().startswith("Z"):
        return None
    uids = fields.get("Uid", "").split()
    return int(uids[0]) if uids and uids[0].isdigit() else None


def log_tail(log_bytes: bytes) -> str:
    lines = log_bytes.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-TAIL_LINES:])
