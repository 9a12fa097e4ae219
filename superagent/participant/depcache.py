"""Per-app cache of built ``node_modules``: a release whose dependencies did not change
skips npm and gets a copy of the tree an earlier build of the same app made.

Theory of operation
-------------------
Even from a warm per-app npm cache, ``npm install`` asks the registry about every package
and takes seconds. So after a successful detected npm build, ``store`` keeps a copy of the
release's ``node_modules`` under a key, and the next build of the app with the same key
gets a copy of it (``restore``) instead of running npm.

The key (``node_key``) is the sha256 of what decides the tree npm builds: package.json,
package-lock.json / npm-shrinkwrap.json / .npmrc when present, the node and npm versions
the build would run, the machine, the npm step's command line, and what npm reads of the
build's environment (``npm_config_*``, NODE_ENV, NODE_OPTIONS, the machine's registry,
proxy and CA settings; other variables, such as a native addon's CC, are not in it: any
change to package.json, even of its version, builds afresh). Some trees are not
cacheable, and their builds run npm every time (``node_key`` raises ``Uncacheable``
naming why): the package runs lifecycle scripts of its own on install (``postinstall``,
``prepare`` ...: they may write outside ``node_modules``), it names a local directory
dependency (``file:`` a directory: its contents are not in the key), or the app's
environment sets PATH (the tools the build runs would not be the ones the key names). A
``file:`` tarball is in the key by its sha256. Without a lock file the cached tree keeps
the versions the first build resolved until package.json changes, as a lock file would.

Layout, only the agent's (mode 0700, never readable by an app user)::

    root/<app>/<key>/node_modules/    one tree per key; the directory's mtime is its last use
    root/<app>/.tmp-<random>/         a copy being stored (renamed into place when complete)

Trust. A release's tree belongs to the app's user, who may change it at any moment: its
running instances and the build's leftovers run as that user. So ``store`` runs right after
the build, before the release is prepared (so before any of its instances runs), and copies
as the agent with ``_copy_tree``: every directory is opened relative to its parent's file
descriptor with O_NOFOLLOW and checked against what was listed (a directory swapped for a
symlink is refused), files are opened O_NOFOLLOW|O_NONBLOCK and must be regular files
owned by the app's user (a hard link to a file of someone else is refused), symlinks are
copied as symlinks and never followed, and must stay inside the tree; anything else (a
device, a fifo, a socket) refuses the copy. A refused or oversized copy keeps nothing: the
build succeeded all the same and the next one runs npm again. Copies land in a fresh
directory of the agent's and are renamed into place complete. ``restore`` copies a tree
only the agent can write into the release's ``src/`` while that still belongs to the agent;
the release store chowns the whole tree to the app's user afterwards, so the app's files
are real copies its user may change, and nothing it does reaches the cache. Each app has
its own directory: no key of one app is ever looked up for another.

Each app keeps its ``keep`` (3) most recently used trees; ``remove`` drops an app's cache.
Blocking (file system): async callers use ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from superagent.participant.errors import Uncacheable
from superagent.tarcheck import link_escapes

log = structlog.get_logger("superagent.participant")

MODULES = "node_modules"
DEFAULT_KEEP = 3  # trees kept per app: the current dependencies and a couple to go back to
MAX_TREE_BYTES = 1024**3  # a bigger node_modules is not cached (npm builds it every time)
MAX_TREE_ENTRIES = 200_000  # files, directories and links of one tree
MAX_DEPTH = 256  # nested directories; npm's deepest real trees are a few dozen
VERSION_TIMEOUT = 10.0  # seconds for `node --version`
KEY_FORMAT = 1  # bump to orphan every stored tree (they age out by ``keep``)
_CHUNK = 1024**2
# A staging copy untouched this long was left by an agent that died mid-store (two builds
# of one app may store at once, so a younger one may still be written).
STALE_STAGING = 3600.0

# Scripts npm runs for the package itself on install: they may write outside node_modules.
LIFECYCLE_SCRIPTS = ("preinstall", "install", "postinstall", "prepublish", "preprepare",
                     "prepare", "postprepare", "dependencies")
DEPENDENCY_FIELDS = ("dependencies", "devDependencies", "optionalDependencies",
                     "peerDependencies")
NPM_ENV = frozenset({"NODE_ENV", "NODE_OPTIONS"})  # beside npm_config_*: see npm_env
KEY_FILES = ("package.json", "package-lock.json", "npm-shrinkwrap.json", ".npmrc")
_KEY = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True)
class ToolVersions:
    """node's and npm's versions as a build on ``path`` would run them."""

    node: str
    npm: str


@dataclass
class _Budget:
    entries: int = 0
    bytes: int = 0
    max_entries: int = MAX_TREE_ENTRIES
    max_bytes: int = MAX_TREE_BYTES

    def add(self, entries: int = 1, size: int = 0) -> None:
        self.entries += entries
        self.bytes += size
        if self.entries > self.max_entries or self.bytes > self.max_bytes:
            raise Uncacheable(f"over {self.max_entries} entries or {self.max_bytes} bytes")


# --- the key ---------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str | None:
    """None when there is no such file; ``Uncacheable`` when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None
    except OSError as exc:  # a directory named package-lock.json, a dangling link ...
        raise Uncacheable(f"{path.name} unreadable: {exc.strerror}") from None


def npm_env(env: Mapping[str, str], network: Iterable[str] = ()) -> dict[str, str]:
    """What of a build's environment npm itself reads: ``npm_config_*`` (any case),
    NODE_ENV (production leaves devDependencies out), NODE_OPTIONS, and the ``network``
    settings (proxy, CA, registry)."""
    names = set(network) | NPM_ENV
    return {name: value for name, value in sorted(env.items())
            if name in names or name.lower().startswith("npm_config_")}


def node_key(src: Path, *, versions: ToolVersions, npm_command: str,
             env: Mapping[str, str], network: Iterable[str] = ()) -> str:
    """The cache key of ``src``'s npm build (see the module docstring); raises
    ``Uncacheable`` naming why the tree must be built by npm. ``env`` is what the app
    adds to its build's environment (and ``network`` the names of the machine's index
    settings in it): the part npm reads is in the key (``npm_env``). Reads the release's
    files, which the agent still owns (they were just unpacked)."""
    if "PATH" in env:
        raise Uncacheable("the app's environment sets PATH")
    try:
        package = json.loads((src / "package.json").read_bytes())
    except (OSError, ValueError) as exc:
        raise Uncacheable(f"package.json unreadable: {exc}") from None
    if not isinstance(package, dict):
        raise Uncacheable("package.json is not an object")
    scripts = package.get("scripts")
    if isinstance(scripts, dict):
        run = sorted(name for name in LIFECYCLE_SCRIPTS if name in scripts)
        if run:
            raise Uncacheable(f"package.json runs install scripts of its own ({', '.join(run)})")
    local: dict[str, str | None] = {}
    for what in DEPENDENCY_FIELDS:
        deps = package.get(what)
        if not isinstance(deps, dict):
            continue
        for name, spec in deps.items():
            if not isinstance(spec, str) or not spec.startswith(("file:", "link:")):
                continue
            target = (src / spec.split(":", 1)[1]).resolve()
            if not target.is_relative_to(src.resolve()) or not target.is_file():
                raise Uncacheable(f"dependency {name} is a local directory or outside the"
                                  " source")
            local[spec] = _sha256_file(target)
    doc = {"format": KEY_FORMAT, "files": {name: _sha256_file(src / name) for name in KEY_FILES},
           "local": local, "node": versions.node, "npm": versions.npm,
           "machine": platform.machine(), "command": npm_command,
           "env": npm_env(env, network)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass
class ToolProbe:
    """node's and npm's versions on a PATH, remembered per binary (path, size, mtime):
    ``npm --version`` alone takes a third of a second."""

    _seen: dict[tuple[object, ...], ToolVersions] = field(default_factory=dict)

    def versions(self, path: str) -> ToolVersions:
        """Raises ``Uncacheable`` when node or npm is missing or does not run."""
        node, npm = shutil.which("node", path=path), shutil.which("npm", path=path)
        if node is None or npm is None:
            raise Uncacheable("node or npm is not on the build's PATH")
        real_node, real_npm = Path(node).resolve(), Path(npm).resolve()
        try:
            stats = [real_node.stat(), real_npm.stat()]
        except OSError as exc:
            raise Uncacheable(f"node or npm unreadable: {exc}") from None
        signature = tuple((str(p), s.st_size, s.st_mtime_ns, s.st_ino)
                          for p, s in zip((real_node, real_npm), stats, strict=True))
        found = self._seen.get(signature)
        if found is None:
            found = ToolVersions(node=_run_version([str(real_node), "--version"]),
                                 npm=_npm_version(real_npm, path))
            self._seen[signature] = found
        return found


def _npm_version(npm: Path, path: str) -> str:
    """npm's version from the package.json beside its CLI script, else ``npm --version``."""
    for parent in npm.parents:
        manifest = parent / "package.json"
        if manifest.is_file():
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(manifest.read_bytes())
                if isinstance(doc, dict) and doc.get("name") == "npm":
                    return str(doc.get("version"))
            break
    return _run_version([str(npm), "--version"], path=path)


def _run_version(argv: list[str], path: str | None = None) -> str:
    env = {"PATH": path or os.environ.get("PATH", ""), "HOME": "/nonexistent",
           "npm_config_update_notifier": "false"}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=VERSION_TIMEOUT,
                              check=False, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Uncacheable(f"{argv[0]} does not run: {exc}") from None
    if done.returncode != 0 or not done.stdout.strip():
        raise Uncacheable(f"{argv[0]} --version failed: {done.stderr.strip()[:200]}")
    return done.stdout.strip()


# --- the copy --------------------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _copy_tree(src_fd: int, dst_fd: int, *, owner: int, budget: _Budget,
               links: dict[tuple[str, ...], str], depth: int = 0,
               inside: tuple[str, ...] = ()) -> None:
    """Copy the directory ``src_fd`` into the empty directory ``dst_fd`` (see the module
    docstring's Trust), collecting its symlinks in ``links`` (path parts -> target) for the
    caller to resolve once the whole tree is known; raises ``Uncacheable`` on anything it
    refuses."""
    if depth > MAX_DEPTH:
        raise Uncacheable(f"nested deeper than {MAX_DEPTH} directories")
    with os.scandir(src_fd) as it:
        names = [entry.name for entry in it]
    for name in names:
        st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        where = "/".join((*inside, name))
        if st.st_uid != owner:
            raise Uncacheable(f"{where} belongs to uid {st.st_uid}, not {owner}")
        mode = stat.S_IMODE(st.st_mode) & 0o777  # never setuid, setgid or sticky
        budget.add()
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=src_fd)
            if os.path.isabs(target):
                raise Uncacheable(f"{where} links out of the tree ({target})")
            links[(*inside, name)] = target
            os.symlink(target, name, dir_fd=dst_fd)
        elif stat.S_ISDIR(st.st_mode):
            sub_src = os.open(name, _DIR_FLAGS, dir_fd=src_fd)
            try:
                _same(sub_src, st, where)
                os.mkdir(name, 0o700, dir_fd=dst_fd)
                sub_dst = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
                try:
                    _copy_tree(sub_src, sub_dst, owner=owner, budget=budget, links=links,
                               depth=depth + 1, inside=(*inside, name))
                    os.fchmod(sub_dst, mode | 0o700)
                finally:
                    os.close(sub_dst)
            finally:
                os.close(sub_src)
        elif stat.S_ISREG(st.st_mode):
            budget.add(entries=0, size=st.st_size)
            _copy_file(src_fd, dst_fd, name, st, mode, where)
        else:
            raise Uncacheable(f"{where} is not a file, directory or symlink")


def _same(fd: int, listed: os.stat_result, where: str) -> None:
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (listed.st_dev, listed.st_ino):
        raise Uncacheable(f"{where} changed while it was copied")


def _copy_file(src_fd: int, dst_fd: int, name: str, st: os.stat_result, mode: int,
               where: str) -> None:
    try:
        source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=src_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Uncacheable(f"{where} changed while it was copied") from None
        raise
    try:
        opened = os.fstat(source)
        if not stat.S_ISREG(opened.st_mode) or opened.st_uid != st.st_uid:
            raise Uncacheable(f"{where} changed while it was copied")
        _same(source, st, where)
        target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dst_fd)
        try:
            _copy_bytes(source, target, opened.st_size)
            os.fchmod(target, mode | 0o600)
        finally:
            os.close(target)
    finally:
        os.close(source)


def _copy_bytes(source: int, target: int, size: int) -> None:
    """``size`` bytes at most (a file growing meanwhile is cut where it was listed): in the
    kernel, or by read and write where copy_file_range is not supported."""
    left = size
    try:
        while left > 0:
            sent = os.copy_file_range(source, target, min(left, _CHUNK))
            if sent == 0:
                return
            left -= sent
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while left > 0:
        data = os.read(source, min(left, _CHUNK))
        if not data:
            return
        os.write(target, data)
        left -= len(data)


def copy_tree(source: Path, dest: Path, *, owner: int, max_bytes: int = MAX_TREE_BYTES,
              max_entries: int = MAX_TREE_ENTRIES) -> None:
    """Copy the directory ``source`` (whose every entry must belong to ``owner``) to
    ``dest``, which must not exist; on any refusal ``dest`` is removed and ``Uncacheable``
    raised. ``dest`` is created 0700 and gets ``source``'s mode (owner bits added)."""
    top = os.open(source, _DIR_FLAGS)
    try:
        st = os.fstat(top)
        if st.st_uid != owner:
            raise Uncacheable(f"{source.name} belongs to uid {st.st_uid}, not {owner}")
        os.mkdir(dest, 0o700)
        try:
            out = os.open(dest, _DIR_FLAGS)
            try:
                links: dict[tuple[str, ...], str] = {}
                _copy_tree(top, out, owner=owner, links=links,
                           budget=_Budget(max_entries=max_entries, max_bytes=max_bytes))
                for path, target in links.items():  # resolved through each other, as
                    if link_escapes(links, path[:-1], target):  # the kernel would
                        where = "/".join(path)
                        raise Uncacheable(f"{where} links out of the tree ({target})")
                os.fchmod(out, (stat.S_IMODE(st.st_mode) & 0o777) | 0o700)
            finally:
                os.close(out)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    finally:
        os.close(top)


# --- the cache -------------------------------------------------------------------------------


class DependencyCache:
    """The ``node_modules`` trees of each app under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, *, keep: int = DEFAULT_KEEP,
                 max_bytes: int = MAX_TREE_BYTES, max_entries: int = MAX_TREE_ENTRIES) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.root = Path(root)
        self.keep = keep
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.tools = ToolProbe()

    def __repr__(self) -> str:
        return f"<DependencyCache {self.root} keep={self.keep}>"

    def _app_dir(self, app: str) -> Path:
        """The app's directory, the agent's alone (made when missing)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        path = self.root / app
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise Uncacheable(f"{path} is not a directory of the agent's")
        return path

    def entries(self, app: str) -> list[str]:
        """The app's keys, most recently used first."""
        try:
            with os.scandir(self.root / app) as it:
                found = [(e.stat(follow_symlinks=False).st_mtime_ns, e.name) for e in it
                         if _KEY.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        return [name for _, name in sorted(found, reverse=True)]

    def restore(self, app: str, key: str, dest: Path) -> bool:
        """Copy the app's tree for ``key`` to ``dest`` (which must not exist), owned by the
        agent; False when there is none. Marks the tree used."""
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a cache key: {key!r}")
        entry = self.root / app / key
        tree = entry / MODULES
        try:
            st = tree.lstat()
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            return False
        try:
            copy_tree(tree, dest, owner=os.geteuid(), max_bytes=self.max_bytes,
                      max_entries=self.max_entries)
        except Uncacheable as exc:  # not what store wrote: drop it, build with npm
            log.warning("cached node_modules unusable; removed", app=app, key=key,
                        reason=str(exc))
            _remove(entry)
            return False
        os.utime(entry)
        return True

    def store(self, app: str, key: str, source: Path, *, owner: int) -> None:
        """Keep a copy of ``source`` (a release's node_modules, every entry ``owner``'s)
        under ``key``, then drop the app's trees beyond ``keep``. Raises ``Uncacheable``
        when the tree is refused (nothing is kept then)."""
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a cache key: {key!r}")
        app_dir = self._app_dir(app)
        entry = app_dir / key
        if entry.is_dir():
            os.utime(entry)
            return
        staging = app_dir / f".tmp-{secrets.token_hex(8)}"
        os.mkdir(staging, 0o700)
        try:
            copy_tree(source, staging / MODULES, owner=owner, max_bytes=self.max_bytes,
                      max_entries=self.max_entries)
            try:
                os.rename(staging, entry)
            except OSError as exc:  # stored meanwhile by another build of the same key
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        finally:
            _remove(staging)
        self.prune(app)

    def prune(self, app: str) -> list[str]:
        """Drop the app's trees beyond the ``keep`` most recently used, and what stores
        interrupted long ago left; returns the dropped keys."""
        dropped = self.entries(app)[self.keep:]
        for key in dropped:
            _remove(self.root / app / key)
        now = time.time()
        with contextlib.suppress(FileNotFoundError), os.scandir(self.root / app) as it:
            stale = [Path(e.path) for e in it if e.name.startswith(".tmp-")
                     and now - e.stat(follow_symlinks=False).st_mtime > STALE_STAGING]
        for path in stale:
            _remove(path)
        return dropped

    def remove(self, app: str) -> None:
        """Forget every tree of ``app`` (the app is gone from this node)."""
        _remove(self.root / app)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
