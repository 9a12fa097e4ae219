"""What an app's build and run find on their PATH: an interpreter and uv its user can run.

Theory of operation
-------------------
Builds and instances run as the app's own user, not as the agent. The agent's own Python
is often of no use to them: a pyenv or virtualenv interpreter under root's home directory
(mode 0700) cannot be executed by another user, and Debian has ``python3`` but no
``python``. So each release gets a ``bin/`` of its own, beside its ``src/``, holding
``python`` and ``python3`` (symlinks to an interpreter every user can run) and ``uv``
when the agent has it. The release's ``bin/`` comes on PATH after the release's virtual
environment and ``node_modules/.bin`` (``release_env``), for the build, the test command
and every instance alike: ``python app.py`` runs the release's venv interpreter when the
build made one and a system interpreter otherwise, and ``gunicorn app:app`` finds the
gunicorn the build installed.

``find_python`` picks the interpreter: with a pinned version (``[build] python``), the
first ``pythonX.Y`` on the system PATH; otherwise the agent's own if every user can run it,
else the system ``python3``. "Every user can run it" means the file, and every directory
above it, has its others-execute bit (``runnable_by_all``). ``uv`` (PyPI ``uv`` ships the
binary beside the agent's interpreter) is linked the same way, or copied once into the
agent's tools directory when its own location is private. Blocking (file system only).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from superagent.participant.errors import BuildFailed

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"  # where system interpreters are looked for
BIN = "bin"  # the release's own tools, beside src/
VENV = ".venv"  # the virtual environment a Python build makes in src/
VERSION_TIMEOUT = 10.0  # seconds for `python -c 'print(version)'`


@dataclass(frozen=True, kw_only=True)
class Toolchain:
    """An interpreter (and uv, when there is one) that every user on the machine can run."""

    python: Path
    version: str  # "3.11.2"
    uv: Path | None

    def describe(self) -> str:
        """One line for the build log: which tools the build gets."""
        uv = f", uv {self.uv}" if self.uv is not None else ", no uv (pip)"
        return f"python {self.version} at {self.python}{uv}"


def runnable_by_all(path: Path) -> bool:
    """Whether any user can execute ``path`` (after symlinks): the file has o+x and every
    directory above it o+x (search permission)."""
    try:
        real = path.resolve(strict=True)
        if not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents)
    except OSError:
        return False


def find_python(pin: str | None = None, *, own: Path = Path(sys.executable),
                search: str = SYSTEM_PATH) -> Path:
    """An interpreter every user can run: ``python<pin>`` when pinned, else the agent's own
    or the system's ``python3``. Raises ``BuildFailed`` naming what was tried."""
    names = [f"python{pin}"] if pin else ["python3"]
    candidates = [] if pin else [own]
    for name in names:
        found = shutil.which(name, path=search)
        if found is not None:
            candidates.append(Path(found))
    for candidate in candidates:
        if runnable_by_all(candidate):
            # the file itself: a link through a private directory (a venv's python under
            # /root linking to /usr/bin/python3) would not be followable by the app's user
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates) or f"no {names[0]} on {search}"
    raise _unusable(f"no Python interpreter the app's user can run ({tried}); install "
                    f"{names[0]} system-wide (e.g. apt-get install python3-venv)")


def find_uv(tools_dir: Path, *, own: Path = Path(sys.executable)) -> Path | None:
    """A uv binary every user can run: the one installed beside the agent's interpreter, or
    a copy of it in ``tools_dir`` (kept up to date by size and mtime); None without uv."""
    found = shutil.which("uv", path=str(own.parent)) or shutil.which("uv", path=SYSTEM_PATH)
    if found is None:
        return None
    source = Path(found).resolve()
    if runnable_by_all(source):
        return source
    copy = tools_dir / "uv"
    src_stat = source.stat()
    try:
        copy_stat = copy.stat()
        current = (copy_stat.st_size, copy_stat.st_mtime) == (src_stat.st_size,
                                                              src_stat.st_mtime)
    except FileNotFoundError:
        current = False
    if not current:  # a temporary file of its own: builds may copy at the same moment
        tools_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=tools_dir, prefix=".uv.")
        os.close(fd)
        try:
            shutil.copy2(source, tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, copy)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return copy if runnable_by_all(copy) else None


def python_version(python: Path) -> str:
    """``python``'s version ("3.11.2"); raises ``BuildFailed`` when it does not run."""
    try:
        done = subprocess.run([str(python), "-c", "import platform; "
                               "print(platform.python_version())"], capture_output=True,
                              text=True, timeout=VERSION_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _unusable(f"{python} does not run: {exc}") from exc
    if done.returncode != 0:
        raise _unusable(f"{python} does not run: {done.stderr.strip()}")
    return done.stdout.strip()


def _unusable(message: str) -> BuildFailed:
    return BuildFailed(message, log_path=None, tail=message, returncode=None)


def toolchain(pin: str | None, tools_dir: Path) -> Toolchain:
    """The tools for a build: see ``find_python`` and ``find_uv``. Raises ``BuildFailed``."""
    python = find_python(pin)
    return Toolchain(python=python, version=python_version(python), uv=find_uv(tools_dir))


def install_bin(release_dir: Path, tools: Toolchain) -> Path:
    """The release's ``bin/``: ``python``, ``python3`` and ``uv`` links; returns it."""
    bin_dir = release_dir / BIN
    bin_dir.mkdir(mode=0o755, exist_ok=True)
    links = {"python": tools.python, "python3": tools.python}
    if tools.uv is not None:
        links["uv"] = tools.uv
    for name, target in links.items():
        link = bin_dir / name
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    return bin_dir


def release_env(src: Path, base_path: str = SYSTEM_PATH) -> dict[str, str]:
    """PATH (and VIRTUAL_ENV when the build made one) of everything run in a release:
    the venv's bin, node_modules/.bin, the release's bin/, then ``base_path``."""
    venv = src / VENV
    path = os.pathsep.join([str(venv / "bin"), str(src / "node_modules" / ".bin"),
                            str(src.parent / BIN), base_path])
    env = {"PATH": path}
    if (venv / "bin").is_dir():
        env["VIRTUAL_ENV"] = str(venv)
    return env


# How the machine reaches package indexes: a build gets these from the agent's environment
# (a proxy, a private index, a company CA), and nothing else of it. Instances get none.
BUILD_NETWORK_ENV = (
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "PIP_CERT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL",
    "UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX", "UV_EXTRA_INDEX_URL",
    "NODE_EXTRA_CA_CERTS", "npm_config_registry",
)


def build_env(cache_dir: Path, agent_env: Mapping[str, str]) -> dict[str, str]:
    """What a build gets beyond the run environment: where uv, pip and npm keep one app's
    package caches, and the machine's ``BUILD_NETWORK_ENV`` settings from ``agent_env``."""
    return {**{name: agent_env[name] for name in BUILD_NETWORK_ENV if name in agent_env},
            "UV_CACHE_DIR": str(cache_dir / "uv"), "PIP_CACHE_DIR": str(cache_dir / "pip"),
            "npm_config_cache": str(cache_dir / "npm"),
            "UV_PYTHON_DOWNLOADS": "never",  # the toolchain's interpreter, never a download
            "UV_SYSTEM_CERTS": "1",  # trust the machine's CA store, as pip and npm do
            "UV_NATIVE_TLS": "1",  # the same, as uv releases before UV_SYSTEM_CERTS say it
            "UV_NO_PROGRESS": "1"}
