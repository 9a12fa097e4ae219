"""Release directories: unpacking, the build, keep-the-last-K.

Layout, one directory per prepared release::

    root/<app>/<release>/                the release directory (HOME of the build)
        bin/                             python, python3, uv: the release's toolchain
        src/                             the app source, built in place
        build.log                        build output, stdout and stderr interleaved, last 1 MiB
        release.json                     written last: its presence means "prepared"
    root/<app>/<release>.failed.log      output of the last failed build of that release

``ReleaseStore.prepare`` runs under a per-(app, release) ``trio.Lock``, so concurrent
prepares of one release in this process do the work once and the later callers get the
finished release. Steps: (1) a release.json with the same sha256 returns at once (with
another sha256: ``ChecksumMismatch``, 409); (2) a directory without release.json is what an
interrupted prepare left behind, and is removed; (3) the archive's sha256 is checked before
a byte is unpacked; (4) ``archive.safe_extract`` unpacks it to src/; (5) the manifest is
read from src/ (``load_manifest``); (6) with ``uid``/``gid`` the tree is chowned to the
app's user and the build runs as that user; (7) build.log, then release.json are written,
each through a temporary file and a rename. A failed build leaves ``<release>.failed.log``
and no release directory.

``ReleaseStore.test`` runs a prepared release's ``[test] command`` (the CI gate) the way the
build ran: ``/bin/sh -c`` in src/, as the app's user, in the same clean environment (no
PORT: the test serves nobody), output bounded to its last ``TEST_LOG_LIMIT`` bytes, killed at
its timeout. A failing test is a result (``TestResult.ok`` false), not an error.

Why the release is built in place rather than in a temporary directory renamed at the end:
builds bake absolute paths into their output (every script in a venv starts with
``#!/abs/path/.venv/bin/python``), so a release must be built where it will run. Atomicity
comes from release.json instead: every reader ignores a directory without it, and the next
prepare (or gc) removes such a directory.

Trust. The archive is hostile until ``safe_extract`` has checked every header (how, and
what it refuses, is in ``archive``'s docstring), and the build is the app's own code: as
root, the release directory belongs to the app's user only while its build runs; it is then
handed back to the agent (mode 755), so the app cannot swap the build.log and release.json
the agent writes afterwards. src/ stays the app user's. The spec is kept in release.json
(``spec_to_json``) and read back from there, never again from src/, which the app may since
have changed. (So at run time HOME is not writable by the app.) One ``ReleaseStore`` owns a
root; two agents sharing one root are not supported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from superagent.errors import ConfigError
from superagent.manifest import TEST_TIMEOUT, AppSpec, load_manifest, spec_from_json, spec_to_json
from superagent.names import SHA256
from superagent.participant.archive import MAX_ARCHIVE_BYTES, MAX_ARCHIVE_FILES, safe_extract
from superagent.participant.build import (
    DEFAULT_PATH,
    BuildResult,
    command_env,
    default_build_command,
    log_tail,
    needs_python,
    npm_command,
    run_build,
)
from superagent.participant.depcache import MODULES, DependencyCache, node_key
from superagent.participant.errors import (
    BadManifest,
    BuildFailed,
    ChecksumMismatch,
    InvalidName,
    ParticipantError,
    ReleaseError,
    Uncacheable,
    UnknownRelease,
)
from superagent.participant.toolchain import BUILD_NETWORK_ENV, Toolchain, install_bin, toolchain

log = structlog.get_logger("superagent.participant")

DEFAULT_KEEP = 5  # prepared releases kept per app when no coordinator says which
BUILD_TIMEOUT = 600.0  # seconds; a cold npm or pip install of a large app takes minutes
TEST_LOG_LIMIT = 64 * 1024  # bytes of test output returned: it travels in a signal's answer

SRC = "src"
BUILD_LOG = "build.log"
RELEASE_JSON = "release.json"
FAILED_LOG_SUFFIX = ".failed.log"

# Directory names: no '/', no leading '.' (temporary and removing directories are hidden).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


# --- the store -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class _Modules:
    """What the dependency cache did for one build: ``key`` None when the tree is not
    cached (or not npm's); ``note`` is the build log's line about it."""

    key: str | None = None
    reused: bool = False
    seconds: float = 0.0  # the copy from the cache
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """release.json's ``build.node_modules``, when the cache was consulted."""
        if self.key is None:
            return {}
        return {"node_modules": {"key": self.key, "reused": self.reused,
                                 "copy_seconds": round(self.seconds, 3)}}



@dataclass(frozen=True, kw_only=True, repr=False)
class PreparedRelease:
    """A built release ready to run: ``src`` is the working directory of its instances."""

    app: str
    release: str
    path: Path
    src: Path
    spec: AppSpec
    sha256: str
    build_log: Path
    prepared_at: datetime

    def __repr__(self) -> str:
        return (f"<PreparedRelease {self.app}@{self.release} sha256={self.sha256[:12]} "
                f"prepared_at={self.prepared_at.isoformat(timespec='seconds')} at {self.path}>")


@dataclass(frozen=True, kw_only=True, slots=True)
class TestResult:
    """What ``ReleaseStore.test`` found: ``exit_code`` None when it timed out (or was
    skipped: the manifest has no test command); ``log`` is the output's last bytes."""

    __test__ = False  # not a pytest test class, despite the name

    app: str
    release: str
    skipped: bool
    exit_code: int | None
    timed_out: bool
    log: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.skipped or self.exit_code == 0

    def to_json(self) -> dict[str, Any]:
        return {"app": self.app, "release": self.release, "ok": self.ok,
                "exit_code": self.exit_code, "timed_out": self.timed_out, "log": self.log,
                "skipped": self.skipped, "seconds": round(self.seconds, 3)}


class ReleaseStore:
    """Prepared releases under ``root``; ``gc`` keeps the ones named (or the newest
    ``keep`` per app)."""

    def __init__(self, root: Path, *, keep: int = DEFAULT_KEEP,
                 max_bytes: int = MAX_ARCHIVE_BYTES, max_files: int = MAX_ARCHIVE_FILES,
                 tools_dir: Path | None = None, cache_dir: Path | None = None,
                 modules_dir: Path | None = None) -> None:
        """``tools_dir`` holds what builds need and the agent's own copy is not runnable
        by the app users (uv), ``cache_dir`` one package cache per app (the app user's),
        ``modules_dir`` the built node_modules trees of each app (the agent's alone:
        ``depcache``); all default to siblings of ``root``."""
        if keep < 1:
            raise ValueError("keep must be at least 1: the current release")
        self.root = Path(root)
        self.tools_dir = tools_dir or self.root.parent / "tools"
        self.cache_dir = cache_dir or self.root.parent / "cache"
        self.modules = DependencyCache(modules_dir or self.root.parent / "modules")
        self.keep = keep
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._locks: dict[tuple[str, str], trio.Lock] = {}
        self._preparing: set[tuple[str, str]] = set()
        # cgroup.procs of the group builds and tests join (agentcgroup.AgentCgroup.builds,
        # set by the agent once it made it); None: they stay in the agent's group
        self.build_cgroup: Path | None = None

    def __repr__(self) -> str:
        preparing = ", ".join(sorted(f"{app}@{release}" for app, release in self._preparing))
        return f"<ReleaseStore {self.root} keep={self.keep} preparing=[{preparing}]>"

    async def prepare(self, app: str, release: str, archive: bytes | Path, sha256: str, *,
                      uid: int | None = None, gid: int | None = None,
                      env: Mapping[str, str] | None = None, timeout: float = BUILD_TIMEOUT
                      ) -> PreparedRelease:
        """Unpack, check and build one release; idempotent. See the module docstring.

        Raises ``InvalidName``, ``ChecksumMismatch``, ``UnsafeArchive``, ``BadManifest``,
        ``BuildFailed``, or ``ReleaseError`` (500) when the store itself fails. The build
        gets ``command_env`` (with ``env`` on top) and runs as ``uid``/``gid`` when given
        (the agent is root).
        """
        _check_name(app, "app")
        _check_name(release, "release")
        expected = sha256.strip().lower()
        if not SHA256.fullmatch(expected):
            raise ChecksumMismatch("not a sha256 hex digest", expected=sha256, actual="",
                                   app=app, release=release)
        key = (app, release)
        lock = self._locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                existing = self._load(app, release)
                if existing is not None:
                    if existing.sha256 != expected:
                        raise ChecksumMismatch(
                            f"already prepared from another archive ({existing.sha256})",
                            expected=expected, actual=existing.sha256, status_hint=409)
                    return existing
                self._preparing.add(key)
                try:
                    return await self._prepare(app, release, archive, expected, uid=uid,
                                               gid=gid, env=env or {}, timeout=timeout)
                finally:
                    self._preparing.discard(key)
        except ParticipantError as exc:
            exc.bind(app=app, release=release)
            raise
        except OSError as exc:
            raise ReleaseError(f"release store failure: {exc}", app=app,
                               release=release) from exc
        finally:
            if not lock.locked() and self._locks.get(key) is lock:
                del self._locks[key]

    async def _prepare(self, app: str, release: str, archive: bytes | Path, expected: str, *,
                       uid: int | None, gid: int | None, env: Mapping[str, str],
                       timeout: float) -> PreparedRelease:
        bound = log.bind(app=app, release=release)
        app_dir = self.root / app
        release_dir = app_dir / release
        src = release_dir / SRC
        failed_log = app_dir / f"{release}{FAILED_LOG_SUFFIX}"
        app_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        if os.path.lexists(release_dir):
            bound.warning("removing what an interrupted prepare left behind",
                          path=str(release_dir))
            _remove_dir(release_dir)
        actual = await trio.to_thread.run_sync(_sha256_of, archive)
        if actual != expected:
            raise ChecksumMismatch(f"archive has sha256 {actual}, expected {expected}",
                                   expected=expected, actual=actual)
        bound.info("preparing release", sha256=expected)
        release_dir.mkdir(mode=0o755)
        try:
            os.chmod(release_dir, 0o755)
            await trio.to_thread.run_sync(partial(
                safe_extract, archive, src, max_bytes=self.max_bytes, max_files=self.max_files))
            try:
                spec = load_manifest(src, app=app)
            except ConfigError as exc:
                raise BadManifest(str(exc)) from exc
            tools = await self._toolchain(spec, src, release_dir)
            # Before the tree is the app user's: a cached node_modules is copied in as
            # the agent, then chowned with the rest below.
            modules = await trio.to_thread.run_sync(self._reuse_modules, app, spec, src, env)
            command = spec.build.command or default_build_command(
                src, tools, npm=not modules.reused)
            as_user = uid is not None or gid is not None
            cache = await trio.to_thread.run_sync(self._app_cache, app, uid, gid)
            if as_user:
                await trio.to_thread.run_sync(_chown_tree, src, uid, gid)
                os.chown(release_dir, -1 if uid is None else uid, -1 if gid is None else gid)
            note = (f"# tools: {tools.describe()}\n" if tools is not None
                    else "# tools: no Python interpreter the app's user can run\n")
            note += modules.note
            if command is None:
                result = BuildResult(0, note.encode() + (
                    b"npm not run\n" if modules.reused else
                    b"no build step: no [build] command, requirements.txt, pyproject.toml "
                    b"or package.json\n"), 0.0)
            else:
                build_env = command_env(app, release, home=release_dir, spec=spec, src=src,
                                        cache=cache, extra=env)
                result = await run_build(command, cwd=src, env=build_env, uid=uid, gid=gid,
                                          timeout=timeout, note=note, cgroup=self.build_cgroup)
            result = BuildResult(result.returncode, result.log,
                                 result.seconds + modules.seconds)
            if as_user:
                # The build is over: the release directory is the agent's again, enterable
                # only by the app's group; the source tree is the app user's alone, so other
                # tenants can read neither the code nor the build log.
                os.chown(release_dir, os.geteuid(), -1 if gid is None else gid,
                         follow_symlinks=False)
                os.chmod(release_dir, 0o750)
                os.chmod(src, 0o700)
            if not result.ok:
                _write_atomic(failed_log, result.log)
                what = (f"timed out after {timeout:g}s" if result.returncode is None
                        else f"exited with status {result.returncode}")
                bound.warning("build failed", returncode=result.returncode,
                              seconds=round(result.seconds, 1), log=str(failed_log))
                raise BuildFailed(f"build {what}; log in {failed_log}", log_path=failed_log,
                                  tail=log_tail(result.log), returncode=result.returncode,
                                  timed_out=result.returncode is None)
            # Before release.json: no instance of this release has run yet.
            kept = await trio.to_thread.run_sync(self._keep_modules, app, modules, src, uid)
            _write_atomic(release_dir / BUILD_LOG, result.log + kept.encode())
            doc = {"app": app, "release": release, "sha256": expected,
                   "prepared_at": datetime.now(UTC).isoformat(),
                   "build": {"command": command, "seconds": round(result.seconds, 3),
                             **modules.to_json()},
                   "spec": spec_to_json(spec)}
            _write_atomic(release_dir / RELEASE_JSON, json.dumps(doc, indent=2).encode())
        except BaseException:
            _remove_dir(release_dir)
            raise
        with contextlib.suppress(FileNotFoundError):
            failed_log.unlink()
        prepared = self._load(app, release)
        if prepared is None:  # pragma: no cover - we just wrote it
            raise ReleaseError("release.json unreadable right after writing it")
        bound.info("release prepared", seconds=round(result.seconds, 1))
        return prepared

    async def _toolchain(self, spec: AppSpec, src: Path, release_dir: Path
                         ) -> Toolchain | None:
        """The release's tools, linked into its bin/; None when no interpreter the app
        users can run exists and the build does not need one. Raises ``BuildFailed``."""
        try:
            tools = await trio.to_thread.run_sync(toolchain, spec.build.python, self.tools_dir)
        except BuildFailed:
            if spec.build.python is not None or (spec.build.command is None
                                                 and needs_python(src)):
                raise
            return None
        await trio.to_thread.run_sync(install_bin, release_dir, tools)
        return tools

    def _reuse_modules(self, app: str, spec: AppSpec, src: Path, env: Mapping[str, str]
                       ) -> _Modules:
        """The app's cached node_modules for this tree copied into ``src`` when there is
        one (see ``depcache``): only for the detected npm build. Blocking."""
        if spec.build.command is not None or not (src / "package.json").is_file():
            return _Modules()
        if os.path.lexists(src / MODULES):
            return _Modules(note="node_modules: shipped in the archive, not cached\n")
        agent_path = os.environ.get("PATH") or DEFAULT_PATH
        key_env = {**{name: os.environ[name] for name in BUILD_NETWORK_ENV
                      if name in os.environ}, **spec.env_dict(), **env}
        try:
            key = node_key(src, versions=self.modules.tools.versions(agent_path),
                           npm_command=npm_command(src), env=key_env,
                           network=BUILD_NETWORK_ENV)
        except Uncacheable as exc:
            return _Modules(note=f"node_modules: not cached: {exc}\n")
        started = time.monotonic()
        try:
            reused = self.modules.restore(app, key, src / MODULES)
        except OSError as exc:  # the copy is removed: npm builds the tree
            log.warning("cached node_modules not restored", app=app, key=key, error=str(exc))
            return _Modules(key=key, note=f"node_modules: not restored ({exc.strerror})\n")
        if reused:
            return _Modules(key=key, reused=True, seconds=time.monotonic() - started,
                            note=f"node_modules: reused from cache (key {key[:16]})\n")
        return _Modules(key=key, note=f"node_modules: not in the cache (key {key[:16]})\n")

    def _keep_modules(self, app: str, modules: _Modules, src: Path, uid: int | None) -> str:
        """After a successful npm build: a copy of its node_modules into the app's cache;
        the build log's line about it. Blocking."""
        if modules.key is None or modules.reused:
            return ""
        if not (src / MODULES).is_dir():  # no dependencies: npm made no tree
            return ""
        try:
            self.modules.store(app, modules.key, src / MODULES,
                               owner=os.geteuid() if uid is None else uid)
        except (Uncacheable, OSError) as exc:  # the build stands; the next one runs npm
            log.warning("node_modules not cached", app=app, key=modules.key, reason=str(exc))
            return f"node_modules: not cached: {exc}\n"
        return f"node_modules: kept in the cache (key {modules.key[:16]})\n"

    def _app_cache(self, app: str, uid: int | None, gid: int | None) -> Path:
        """The app's package cache (uv, pip, npm), its user's alone: apps never share a
        cache, so one tenant cannot plant packages in another's builds. Blocking."""
        self.cache_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        cache = self.cache_dir / app
        owner = os.geteuid() if uid is None else uid
        with contextlib.suppress(FileNotFoundError):
            if cache.lstat().st_uid != owner:  # an app user made again: start afresh
                _remove_dir(cache)
        cache.mkdir(mode=0o700, exist_ok=True)
        if uid is not None or gid is not None:
            os.chown(cache, -1 if uid is None else uid, -1 if gid is None else gid)
        return cache

    async def test(self, app: str, release: str, *, uid: int | None = None,
                   gid: int | None = None, home: Path | None = None,
                   timeout: float = TEST_TIMEOUT) -> TestResult:
        """Run the prepared release's ``[test] command`` (see the module docstring).

        ``home`` is HOME for the command (default: the release directory, which the app's
        user cannot write); as ``uid``/``gid`` when given. Raises ``UnknownRelease`` or
        ``InvalidName``; a test that fails or times out is a result, not an error.
        """
        prepared = self.get(app, release)
        command = prepared.spec.test.command
        if command is None:
            return TestResult(app=app, release=release, skipped=True, exit_code=None,
                              timed_out=False, log="no [test] command in the manifest\n",
                              seconds=0.0)
        env = command_env(app, release, home=home or prepared.path, spec=prepared.spec,
                          src=prepared.src)
        env.pop("PORT", None)
        bound = log.bind(app=app, release=release)
        bound.info("running the release's tests", command=command)
        result = await run_build(command, cwd=prepared.src, env=env, uid=uid, gid=gid,
                                  timeout=timeout, limit=TEST_LOG_LIMIT,
                                  cgroup=self.build_cgroup)
        outcome = TestResult(app=app, release=release, skipped=False,
                             exit_code=result.returncode, timed_out=result.returncode is None,
                             log=result.log.decode("utf-8", "replace"),
                             seconds=result.seconds)
        (bound.info if outcome.ok else bound.warning)(
            "tests finished", ok=outcome.ok, exit_code=outcome.exit_code,
            timed_out=outcome.timed_out, seconds=round(result.seconds, 1))
        return outcome

    def releases(self, app: str) -> list[PreparedRelease]:
        """The app's prepared releases, newest first; raises ``InvalidName``."""
        _check_name(app, "app")
        found: list[PreparedRelease] = []
        for name in self._release_dirs(app):
            prepared = self._load(app, name)
            if prepared is not None:
                found.append(prepared)
        found.sort(key=lambda p: (p.prepared_at, p.release), reverse=True)
        return found

    def get(self, app: str, release: str) -> PreparedRelease:
        """One prepared release; raises ``UnknownRelease`` (or ``InvalidName``)."""
        _check_name(app, "app")
        _check_name(release, "release")
        prepared = self._load(app, release)
        if prepared is None:
            raise UnknownRelease("no such prepared release", app=app, release=release)
        return prepared

    def ensure_owner(self, prepared: PreparedRelease, uid: int, gid: int) -> bool:
        """Make ``prepared``'s files the app user's again if they are not: True if changed.

        Prepare gave the source tree to the app's uid and the release directory to its
        gid; when the system's ids for the app differ now (the user was deleted and
        made again), those files belong to ids another app may hold. Checked before
        every start, so an instance never runs on files it cannot read or that others
        can. Blocking.
        """
        st = prepared.src.stat()
        if (st.st_uid, st.st_gid) == (uid, gid) and prepared.path.stat().st_gid == gid:
            return False
        log.warning("release files owned by other ids: giving them to the app user",
                    app=prepared.app, release=prepared.release, uid=st.st_uid, gid=st.st_gid,
                    app_uid=uid, app_gid=gid)
        _chown_tree(prepared.src, uid, gid)
        os.chown(prepared.path, os.geteuid(), gid, follow_symlinks=False)
        return True

    def gc(self, app: str, in_use: set[str], *, wanted: set[str] | None = None) -> list[str]:
        """Remove prepared releases no longer wanted, never one in ``in_use``: with
        ``wanted`` (the coordinator's retention: the serving release and the last ones
        that served), every other one; without, those beyond the newest ``keep``.

        Also removes directories interrupted prepares left (not while one is running) and
        failed-build logs beyond the newest ``keep``. Returns the removed releases' names.
        Blocking (it deletes trees): async callers may use ``trio.to_thread.run_sync``.
        """
        prepared = self.releases(app)
        busy = {release for a, release in self._locks if a == app}
        removed: list[str] = []
        unwanted = (prepared[self.keep:] if wanted is None
                    else [p for p in prepared if p.release not in wanted])
        for old in unwanted:
            if old.release not in in_use and old.release not in busy:
                _remove_dir(old.path)
                removed.append(old.release)
        app_dir = self.root / app
        known = {p.release for p in prepared}
        for name in self._release_dirs(app):
            if name not in known and name not in busy and name not in in_use:
                log.warning("removing an unfinished release directory", app=app, release=name)
                _remove_dir(app_dir / name)
        failed: list[tuple[float, Path]] = []
        leftovers: list[Path] = []
        with contextlib.suppress(FileNotFoundError), os.scandir(app_dir) as it:
            for entry in it:
                if entry.name.endswith(FAILED_LOG_SUFFIX) and entry.is_file(follow_symlinks=False):
                    failed.append((entry.stat(follow_symlinks=False).st_mtime, Path(entry.path)))
                elif entry.name.startswith(".") and ".removing-" in entry.name:
                    leftovers.append(Path(entry.path))
        for _mtime, path in sorted(failed, reverse=True)[self.keep:]:
            path.unlink(missing_ok=True)
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        if removed:
            log.info("old releases removed", app=app, releases=removed)
        return removed

    def _release_dirs(self, app: str) -> list[str]:
        try:
            with os.scandir(self.root / app) as it:
                return [e.name for e in it if _is_release_name(e.name)
                        and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    def _load(self, app: str, release: str) -> PreparedRelease | None:
        """The release as its release.json describes it; None if absent or unreadable."""
        path = self.root / app / release
        try:
            fd = os.open(path / RELEASE_JSON, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:  # ELOOP: a symlink where the agent writes a file
            log.warning("release.json unreadable", app=app, release=release, error=str(exc))
            return None
        try:
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise ValueError("not a regular file")
                doc: Any = json.loads(f.read())
            if doc["app"] != app or doc["release"] != release:
                raise ValueError(f"names {doc['app']}@{doc['release']}")
            spec = spec_from_json(doc["spec"])
            if spec.name != app:
                raise ValueError(f"spec names app {spec.name!r}")
            sha256 = doc["sha256"]
            if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
                raise ValueError("bad sha256")
            prepared_at = datetime.fromisoformat(doc["prepared_at"])
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
            log.warning("release.json unreadable", app=app, release=release, error=str(exc))
            return None
        return PreparedRelease(app=app, release=release, path=path, src=path / SRC, spec=spec,
                               sha256=sha256, build_log=path / BUILD_LOG,
                               prepared_at=prepared_at)


# --- file helpers ----------------------------------------------------------------------------


def _is_release_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and not name.endswith(FAILED_LOG_SUFFIX)


def _check_name(name: str, what: str) -> None:
    if not _is_release_name(name):
        raise InvalidName(f"{what} name {name!r} is not usable as a directory name: use up to "
                          "100 letters, digits, '.', '_' and '-', starting with a letter or "
                          f"digit, not ending in {FAILED_LOG_SUFFIX!r}")


def _sha256_of(archive: bytes | Path) -> str:
    if isinstance(archive, bytes | bytearray | memoryview):
        return hashlib.sha256(archive).hexdigest()
    with open(archive, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _chown_tree(top: Path, uid: int | None, gid: int | None) -> None:
    """Give ``top`` and everything below it to uid/gid; symlinks themselves, never followed.

    Walked by directory fd (``fwalk``), each entry changed relative to its directory's fd:
    a directory swapped for a symlink while we walk is never followed out of the tree.
    """
    u, g = (-1 if uid is None else uid), (-1 if gid is None else gid)
    os.chown(top, u, g, follow_symlinks=False)
    for _, dirnames, filenames, dirfd in os.fwalk(top):  # does not descend into dir symlinks
        for name in dirnames + filenames:
            os.chown(name, u, g, dir_fd=dirfd, follow_symlinks=False)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a fresh temporary file and a rename: never through what is at ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _remove_dir(path: Path) -> None:
    """Make ``path`` disappear at once (a rename), then delete it; gc retries what is left."""
    hidden = path.with_name(f".{path.name}.removing-{secrets.token_hex(4)}")
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return
    try:
        shutil.rmtree(hidden)
    except OSError as exc:
        log.warning("could not remove a release directory; gc retries", path=str(hidden),
                    error=str(exc))
