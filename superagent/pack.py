"""Packing an app's source directory into the tarball that ``superagent deploy PATH`` uploads.

``pack`` works in two passes. The scan walks the tree (an excluded directory is not
descended into), validates the manifest with the participant's own loader
(``superagent.manifest``), and refuses before a byte is written: no manifest, a manifest
hidden by the ignore rules, a symlink leaving the tree, a device, fifo or socket, a name
the extractor would refuse, too many entries or too many bytes. The write pass streams
every file from an open descriptor (``O_NOFOLLOW``, checked again with ``fstat``) through
tarfile and gzip into ``dest``, hashing and counting on the way out, so nothing is ever
held whole in memory.

The output is deterministic so that re-deploying unchanged source is recognisable by its
sha256: entries sorted by path, owners 0 and "", mtimes 0, modes normalised to 0644/0755,
and a gzip header without name or timestamp. (The same tree gives the same bytes with the
same zlib; a different zlib build may compress differently.) Members are named relative to
the directory (``app.py``, ``static/``), which is the layout the participant's
``archive.safe_extract`` unpacks into a release's src/.

What is left out: ``ALWAYS_EXCLUDED`` (version control, caches, virtualenvs, the agent's own
state), which no ``!`` pattern can bring back, then the rules of ``.gitignore`` and then
``.superagentignore`` at the root of the directory (the later file wins, so
``.superagentignore`` can re-include what ``.gitignore`` leaves out). ``IgnoreRules`` matches
paths with git's own pattern rules, through the pathspec library (its ``GitIgnoreSpec``).
Nested ignore files, ``core.excludesFile`` and ``[[:alpha:]]``-style classes (which
pathspec does not know) are not read.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pathspec

from superagent.errors import SuperagentError
from superagent.manifest import MANIFEST, PROCFILE, load_manifest
from superagent.tarcheck import MAX_ARCHIVE_BYTES, MAX_ARCHIVE_FILES

MAX_PACK_BYTES = MAX_ARCHIVE_BYTES  # more would be refused at upload (superagent.tarcheck)
MAX_PACK_FILES = MAX_ARCHIVE_FILES  # counted the same way (all members)
IGNORE_FILES = (".gitignore", ".superagentignore")  # read in this order; later rules win
# Never deployed, whatever the ignore files say: history, caches and environments the
# build recreates, and the agent's own state.
ALWAYS_EXCLUDED = (".git/", ".superagent/", "__pycache__/", "*.pyc", ".venv/", "node_modules/")

_GZIP_LEVEL = 6  # zlib's default: level 9 costs about twice the time for ~1% on source trees
_MAX_NAME_BYTES = 255  # the extractor refuses longer components (NAME_MAX)
_MAX_PATH_BYTES = 4000  # and longer paths
# A stand-in app name to validate a Procfile-only tree when the caller did not name the app:
# the Procfile does not carry a name, the deploy command supplies it.
_PROCFILE_PLACEHOLDER = "procfile-app"


class PackError(SuperagentError):
    """The directory cannot be packed; ``path`` names the offending file or directory."""

    def __init__(self, message: str, *, path: Path | str = "") -> None:
        self.path = str(path)
        super().__init__(f"{path}: {message}" if path else message)


@dataclass(frozen=True, kw_only=True, slots=True)
class PackResult:
    """What ``pack`` wrote: ``sha256`` and ``size`` of the gzip'd tarball as uploaded.

    ``files`` counts regular files and symlinks (directories are members too but are not
    counted here), ``excluded`` the paths left out (an excluded directory counts once),
    ``app_name`` is the manifest's ``[app] name`` (None for a Procfile-only tree).
    """

    sha256: str
    size: int
    files: int
    excluded: int
    app_name: str | None


# --- ignore rules (pure) -------------------------------------------------------------------


class IgnoreRules:
    """An ordered list of gitignore patterns; the last pattern matching a path decides.

    Paths are relative to the root, '/'-separated, without a leading '/'. As in git, a
    path below an ignored directory is ignored whatever later rules say. The patterns are
    compiled by pathspec's ``GitIgnoreSpec`` (git's wildmatch rules); a directory is asked
    about with a trailing '/', which is how pathspec tells it from a file.
    """

    def __init__(self, lines: Iterable[str] = ()) -> None:
        # The pattern lines as written (blank lines and comments dropped), for repr and +.
        self.patterns = tuple(line for line in lines if line.rstrip() and line[0] != "#")
        self._spec = pathspec.GitIgnoreSpec.from_lines(map(_git_equivalent, self.patterns))

    def __repr__(self) -> str:
        return f"IgnoreRules({list(self.patterns)!r})"

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> IgnoreRules:
        """Compile gitignore lines; blank lines and comments are skipped."""
        return cls(lines)

    def __add__(self, other: IgnoreRules) -> IgnoreRules:
        return IgnoreRules(self.patterns + other.patterns)

    def ignored(self, relpath: str, is_dir: bool) -> bool:
        """Whether ``relpath`` (a directory if ``is_dir``) is excluded, its parents included."""
        parts = [p for p in relpath.split("/") if p not in ("", ".")]
        for depth in range(1, len(parts)):
            if self.matches("/".join(parts[:depth]), is_dir=True):
                return True
        return bool(parts) and self.matches("/".join(parts), is_dir=is_dir)

    def matches(self, relpath: str, *, is_dir: bool) -> bool:
        """The verdict of the rules on ``relpath`` alone, not looking at its parents."""
        return self._spec.match_file(relpath + "/" if is_dir else relpath)


def _git_equivalent(line: str) -> str:
    """``line``, with a trailing ``/**`` spelled ``/**/*``, which means the same to git.

    Both match everything inside the directory and not the directory itself, but
    pathspec also matches the directory itself against ``dir/**``: the directory would
    then be skipped whole, and ``dir/**`` followed by ``!dir/keep`` could not keep it.
    """
    stripped = line.rstrip(" ")
    return stripped + "/*" if stripped.endswith("/**") else line


_BUILTIN = IgnoreRules.from_lines(ALWAYS_EXCLUDED)


def load_rules(directory: Path) -> IgnoreRules:
    """The rules of the ignore files at the root of ``directory`` (missing files add none)."""
    rules = IgnoreRules()
    for name in IGNORE_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PackError(f"cannot read ignore file ({exc})", path=path) from exc
        rules = rules + IgnoreRules.from_lines(text.splitlines())
    return rules


# --- scanning ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    parts: tuple[str, ...]
    kind: str  # "dir", "file", "symlink"
    path: Path
    executable: bool = False
    size: int = 0
    target: str = ""

    @property
    def name(self) -> str:
        return "/".join(self.parts)


@dataclass(slots=True)
class _Scan:
    entries: list[_Entry]
    excluded: int
    total: int


def _scan(root: Path, rules: IgnoreRules, *, max_bytes: int, max_files: int,
          skip: tuple[int, int] | None) -> _Scan:
    real_root = os.path.realpath(root)
    scan = _Scan([], 0, 0)
    pending: list[tuple[str, ...]] = [()]
    while pending:
        where = pending.pop()
        directory = root.joinpath(*where)
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise PackError(f"cannot list directory ({exc.strerror})", path=directory) from exc
        for child in children:
            parts = (*where, child.name)
            relpath = "/".join(parts)
            path = Path(child.path)
            try:
                st = child.stat(follow_symlinks=False)
            except OSError as exc:
                raise PackError(f"cannot stat ({exc.strerror})", path=path) from exc
            is_dir = stat.S_ISDIR(st.st_mode)
            if (_BUILTIN.matches(relpath, is_dir=is_dir) or rules.matches(relpath, is_dir=is_dir)
                    or (skip is not None and (st.st_dev, st.st_ino) == skip)):
                scan.excluded += 1
                continue
            _check_name(relpath, path)
            if is_dir:
                scan.entries.append(_Entry(parts, "dir", path))
                pending.append(parts)
            elif stat.S_ISREG(st.st_mode):
                scan.total += st.st_size
                if scan.total > max_bytes:
                    raise PackError(f"the files add up to more than {max_bytes} bytes; exclude "
                                    "build output and assets with .superagentignore",
                                    path=root)
                scan.entries.append(_Entry(parts, "file", path, executable=bool(
                    st.st_mode & 0o111), size=st.st_size))
            elif stat.S_ISLNK(st.st_mode):
                target = _link_target(path, real_root)
                scan.entries.append(_Entry(parts, "symlink", path, target=target))
            else:
                raise PackError(f"is a {_kind(st.st_mode)}: only files, directories and "
                                "symlinks can be deployed (remove it or list it in "
                                ".superagentignore)", path=path)
            if len(scan.entries) > max_files:
                raise PackError(f"more than {max_files} files and directories; exclude "
                                "dependencies and build output with .superagentignore",
                                path=root)
    scan.entries.sort(key=lambda e: e.parts)
    return scan


def _check_name(relpath: str, path: Path) -> None:
    try:
        encoded = relpath.encode("utf-8")
    except UnicodeEncodeError:
        raise PackError("the file name is not valid UTF-8", path=path) from None
    if len(encoded) > _MAX_PATH_BYTES or any(
            len(part) > _MAX_NAME_BYTES for part in encoded.split(b"/")):
        raise PackError("the path is too long to deploy", path=path)


def _link_target(path: Path, real_root: str) -> str:
    """The target of the symlink ``path``, which must be relative and stay inside the tree."""
    try:
        target = os.readlink(path)
    except OSError as exc:
        raise PackError(f"cannot read symlink ({exc.strerror})", path=path) from exc
    if os.path.isabs(target):
        raise PackError(f"symlink to an absolute path {target!r}: only relative links "
                        "inside the app directory can be deployed", path=path)
    resolved = os.path.realpath(path)
    if os.path.commonpath([resolved, real_root]) != real_root:
        raise PackError(f"symlink points outside the app directory ({target!r})", path=path)
    try:
        target.encode("utf-8")
    except UnicodeEncodeError:
        raise PackError("the symlink target is not valid UTF-8", path=path) from None
    return target


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "special file"


# --- writing -------------------------------------------------------------------------------


class _HashingWriter:
    """Passes bytes on to ``dest``, hashing and counting them on the way."""

    def __init__(self, dest: BinaryIO) -> None:
        self.dest = dest
        self.digest = hashlib.sha256()
        self.size = 0

    def __repr__(self) -> str:
        return f"<_HashingWriter {self.size} bytes>"

    def write(self, data: bytes, /) -> int:
        self.digest.update(data)
        self.size += len(data)
        self.dest.write(data)
        return len(data)

    def flush(self) -> None:
        self.dest.flush()


def _tarinfo(entry: _Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    if entry.kind == "dir":
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    elif entry.kind == "symlink":
        info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, entry.target
    else:
        info.mode = 0o755 if entry.executable else 0o644
    return info


def _add_file(tar: tarfile.TarFile, entry: _Entry, budget: int, max_bytes: int) -> int:
    """Stream one file into ``tar``; returns its size. The file may have changed since the scan."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(entry.path, flags)
    except OSError as exc:
        raise PackError(f"cannot open ({exc.strerror})", path=entry.path) from exc
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PackError("changed into something other than a file while packing",
                            path=entry.path)
        if st.st_size > budget:
            raise PackError(f"the files add up to more than {max_bytes} bytes", path=entry.path)
        info = _tarinfo(entry)
        info.size = st.st_size
        try:
            tar.addfile(info, f)
        except OSError as exc:  # tarfile: "unexpected end of data" when the file shrank
            raise PackError(f"cannot read while packing ({exc})", path=entry.path) from exc
    return st.st_size


def _dest_identity(dest: BinaryIO) -> tuple[int, int] | None:
    """(st_dev, st_ino) of ``dest`` if it is a file, so a tarball inside the tree is skipped."""
    try:
        st = os.fstat(dest.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def validate_manifest(directory: Path, *, app: str | None = None) -> str | None:
    """The app name from ``directory``'s manifest (None for a Procfile without ``app``).

    Raises PackError when there is no manifest, ConfigError (naming the file and key)
    when it is invalid.
    """
    if not (directory / MANIFEST).is_file() and not (directory / PROCFILE).is_file():
        raise PackError(f"not an app directory: it has no {MANIFEST} or {PROCFILE}",
                        path=directory)
    if (directory / MANIFEST).is_file() or app is not None:
        return load_manifest(directory, app=app).name
    load_manifest(directory, app=_PROCFILE_PLACEHOLDER)
    return None


def pack(directory: Path, dest: BinaryIO, *, max_bytes: int = MAX_PACK_BYTES,
         max_files: int = MAX_PACK_FILES, app: str | None = None) -> PackResult:
    """Write ``directory`` as a deterministic tar.gz to ``dest``; see the module docstring.

    ``app``, when given, is the name the app is deployed as (checked against the manifest,
    and naming a Procfile-only app). Raises PackError naming the path at fault, or
    ConfigError for an invalid manifest. The scan refuses before anything is written;
    if a file changes during the write, ``dest`` is left partly written and the caller
    (who owns ``dest``) discards it. Blocking.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PackError("not a directory", path=directory)
    app_name = validate_manifest(directory, app=app)
    rules = load_rules(directory)
    for name in (MANIFEST, PROCFILE):
        if (directory / name).is_file() and rules.matches(name, is_dir=False):
            raise PackError(f"{name} is excluded by {' or '.join(IGNORE_FILES)}; the app "
                            "cannot be deployed without its manifest", path=directory)
    scan = _scan(directory, rules, max_bytes=max_bytes, max_files=max_files,
                 skip=_dest_identity(dest))
    out = _HashingWriter(dest)
    written = 0
    files = 0
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=_GZIP_LEVEL,
                       mtime=0) as gz, tarfile.open(fileobj=gz, mode="w",
                                                    format=tarfile.PAX_FORMAT) as tar:
        for entry in scan.entries:
            if entry.kind == "file":
                written += _add_file(tar, entry, max_bytes - written, max_bytes)
                files += 1
            else:
                tar.addfile(_tarinfo(entry))
                files += entry.kind == "symlink"
    out.flush()
    return PackResult(sha256=out.digest.hexdigest(), size=out.size, files=files,
                      excluded=scan.excluded, app_name=app_name)

