"""Safe unpacking of an app's source archive (tar or tar.gz) into a fresh directory.

The archive is hostile until ``safe_extract`` has checked every header: it comes from
whoever can deploy, and a tar member can name any path, link anywhere and claim any
size. ``releases.ReleaseStore.prepare`` unpacks each release's src/ with it.

``safe_extract`` reads the archive in two passes. The scan reads every header but no data
and refuses the archive before anything is written (``UnsafeArchive`` naming the member)
for: an absolute path or a ``..`` component; a hardlink, device, fifo or any type other than
file, directory and symlink; a symlink whose target, resolved through every symlink in the
archive, leaves the tree; a member below a symlink or a file member; a name listed twice
(directories excepted); declared file sizes over ``max_bytes`` or more than ``max_files``
members (``ArchiveTooLarge``). tarfile's own "data" filter is consulted as a second opinion.
The write pass unpacks into a temporary directory next to ``dest`` and renames it at the
end (on failure it is removed): files are created with O_EXCL|O_NOFOLLOW and copied with a
byte count that stops at ``max_bytes``, symlinks are created last so nothing is ever written
through one, modes keep only the 0o755 bits (no setuid, setgid, sticky, group or other
write) plus owner read/write, and the archive's owners are ignored. The decompressed stream
is read through a budget (``_BudgetReader``), so a gzip bomb or a giant pax header costs at
most about ``max_bytes`` of decompression, never unbounded memory.

Hardlinks are refused outright, even those pointing inside the archive: app sources do not
need them (``git archive`` never writes them, GNU tar only for multiply-linked files and not
with ``--hard-dereference``), they were the vector of several tarfile filter bypasses, and
refusing them keeps "every path is a fresh inode the extractor created" true.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from superagent.participant.errors import ArchiveTooLarge, UnsafeArchive

MAX_ARCHIVE_BYTES = 512 * 1024**2  # unpacked source size; a bigger app ships its assets elsewhere
MAX_ARCHIVE_FILES = 20_000  # members; a vendored node_modules fits, a runaway tree does not

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 64 * 1024  # copy unit while unpacking
_MAX_HEADER_READ = 1024**2  # tarfile reads a pax or GNU long-name header whole; cap it
_MEMBER_OVERHEAD = 8 * 1024  # stream bytes allowed per member beyond its data: header, padding
_MAX_LINK_HOPS = 40  # the kernel's own symlink-follow limit (MAXSYMLINKS)
_MAX_NAME_BYTES = 255  # NAME_MAX: longer components fail at open(), refuse them up front
_MAX_PATH_BYTES = 4000  # a little under PATH_MAX (4096)
# What a corrupt or truncated archive raises from tarfile, gzip and zlib.
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
# tarfile.data_filter arrived in 3.11.4; older 3.11s get our checks alone.
_DATA_FILTER: Callable[[tarfile.TarInfo, str], tarfile.TarInfo] | None = getattr(
    tarfile, "data_filter", None)

_Kind = Literal["dir", "file", "symlink"]


def safe_extract(archive: Path | bytes, dest: Path, *, max_bytes: int = MAX_ARCHIVE_BYTES,
                 max_files: int = MAX_ARCHIVE_FILES) -> None:
    """Unpack a tar or tar.gz archive to ``dest``, which must not exist; see the module docstring.

    Raises ``UnsafeArchive`` (``ArchiveTooLarge`` for the limits) naming the member, and
    leaves nothing behind: ``dest`` appears complete or not at all. ``FileExistsError``
    if ``dest`` exists; other ``OSError``s (disk full) propagate. Blocking: async callers
    use ``trio.to_thread.run_sync``.
    """
    dest = Path(dest)
    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, "extraction target exists", str(dest))
    limit = max_bytes + (max_files + 1) * _MEMBER_OVERHEAD + _MAX_HEADER_READ
    with contextlib.ExitStack() as stack:
        try:
            tf = _open_archive(archive, stack, limit)
            entries = _scan(tf, dest=dest, max_bytes=max_bytes, max_files=max_files)
        except _READ_ERRORS as exc:
            raise UnsafeArchive(f"not a readable tar or tar.gz archive ({exc})") from exc
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
        try:
            try:
                _write_tree(tf, entries, tmp, max_bytes=max_bytes)
            except _READ_ERRORS as exc:
                raise UnsafeArchive(f"corrupt or truncated archive ({exc})") from exc
            os.chmod(tmp, 0o755)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


class _BudgetReader:
    """Read-only view of the (decompressed) archive stream that refuses to go past ``limit``.

    tarfile seeks over member data while scanning; on a gzip stream every seek forward
    decompresses, so bounding positions bounds the work. ``max_read`` bounds one read:
    tarfile reads extended headers in one piece, file data arrives in ``_CHUNK``s.
    """

    def __init__(self, raw: IO[bytes] | gzip.GzipFile, *, limit: int, max_read: int) -> None:
        self.raw = raw
        self.limit = limit
        self.max_read = max_read

    def __repr__(self) -> str:
        return f"<_BudgetReader at {self.raw.tell()} of at most {self.limit}>"

    def read(self, size: int = -1, /) -> bytes:
        if size < 0 or size > self.max_read:
            raise ArchiveTooLarge(f"an extended header over {self.max_read} bytes")
        if self.raw.tell() + size > self.limit:
            raise ArchiveTooLarge(f"the unpacked stream exceeds {self.limit} bytes")
        return self.raw.read(size)

    def seek(self, pos: int, whence: int = io.SEEK_SET, /) -> int:
        target = pos + (self.raw.tell() if whence == io.SEEK_CUR else 0)
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target > self.limit:
            raise ArchiveTooLarge(f"the unpacked stream exceeds {self.limit} bytes")
        return self.raw.seek(target)

    def tell(self) -> int:
        return self.raw.tell()

    def write(self, data: bytes, /) -> int:
        raise io.UnsupportedOperation("read-only")

    def close(self) -> None:
        """The ExitStack in ``safe_extract`` owns the underlying streams."""


def _open_archive(archive: Path | bytes, stack: contextlib.ExitStack, limit: int
                  ) -> tarfile.TarFile:
    raw: IO[bytes]
    if isinstance(archive, bytes | bytearray | memoryview):
        raw = io.BytesIO(archive)
    else:
        raw = stack.enter_context(open(archive, "rb"))  # noqa: SIM115 - the stack closes it
    compressed = raw.read(2) == _GZIP_MAGIC
    raw.seek(0)
    stream: IO[bytes] | gzip.GzipFile = raw
    if compressed:  # only gzip: bzip2 and xz decoders can need a lot of memory for little input
        stream = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
    reader = _BudgetReader(stream, limit=limit, max_read=_MAX_HEADER_READ)
    return stack.enter_context(tarfile.open(fileobj=reader, mode="r:"))


@dataclass(frozen=True, slots=True)
class _Entry:
    parts: tuple[str, ...]
    kind: _Kind
    member: tarfile.TarInfo


def _scan(tf: tarfile.TarFile, *, dest: Path, max_bytes: int, max_files: int) -> list[_Entry]:
    """Every member checked, alone and against the others, before anything is written."""
    entries: list[_Entry] = []
    kinds: dict[tuple[str, ...], _Kind] = {}
    links: dict[tuple[str, ...], str] = {}
    total = 0
    for count, member in enumerate(tf, start=1):  # lazily: stops at the first member too many
        if count > max_files:
            raise ArchiveTooLarge(f"more than {max_files} members", member=member.name)
        parts = _member_parts(member.name)
        kind = _member_kind(member)
        if kind == "file":
            total += member.size
            if total > max_bytes:
                raise ArchiveTooLarge(f"files add up to more than {max_bytes} bytes "
                                      f"(this one declares {member.size})", member=member.name)
        if not parts:  # "./", the archive's root
            if kind != "dir":
                raise UnsafeArchive("names the root but is not a directory", member=member.name)
            continue
        if kind == "symlink":
            _check_link_target(member)
            links[parts] = member.linkname
        previous = kinds.get(parts)
        if previous is not None:
            if previous == kind == "dir":
                continue
            raise UnsafeArchive("appears twice in the archive", member=member.name)
        kinds[parts] = kind
        entries.append(_Entry(parts, kind, member))
    for entry in entries:
        for depth in range(1, len(entry.parts)):
            above = kinds.get(entry.parts[:depth])
            if above == "symlink":
                raise UnsafeArchive("lies below a symlink: nothing is unpacked through a link",
                                    member=entry.member.name)
            if above == "file":
                raise UnsafeArchive("lies below a regular file", member=entry.member.name)
        if entry.kind == "symlink":
            reason = _link_escapes(links, entry.parts[:-1], entry.member.linkname)
            if reason is not None:
                raise UnsafeArchive(f"{reason} (target {entry.member.linkname!r})",
                                    member=entry.member.name)
    if _DATA_FILTER is not None:  # a second opinion, after ours: it should never disagree
        for entry in entries:
            try:
                _DATA_FILTER(entry.member, str(dest))
            except tarfile.FilterError as exc:
                raise UnsafeArchive(f"refused by tarfile's data filter: {exc}",
                                    member=entry.member.name) from exc
    return entries


def _member_parts(name: str) -> tuple[str, ...]:
    if name.startswith("/"):
        raise UnsafeArchive("absolute path", member=name)
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise UnsafeArchive("path has a '..' component", member=name)
    if len(os.fsencode(name)) > _MAX_PATH_BYTES or any(
            len(os.fsencode(part)) > _MAX_NAME_BYTES for part in parts):
        raise UnsafeArchive("name too long", member=name)
    return parts


def _member_kind(member: tarfile.TarInfo) -> _Kind:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        raise UnsafeArchive(f"hardlinks are refused (to {member.linkname!r}); "
                            "pack with 'tar --hard-dereference'", member=member.name)
    what = ("character device" if member.ischr() else "block device" if member.isblk()
            else "fifo" if member.isfifo() else f"member type {member.type!r}")
    raise UnsafeArchive(f"{what}: only files, directories and symlinks are unpacked",
                        member=member.name)


def _check_link_target(member: tarfile.TarInfo) -> None:
    target = member.linkname
    if not target:
        raise UnsafeArchive("symlink with an empty target", member=member.name)
    if target.startswith("/"):
        raise UnsafeArchive(f"symlink to an absolute path {target!r}", member=member.name)
    if len(os.fsencode(target)) > _MAX_PATH_BYTES:
        raise UnsafeArchive("symlink target too long", member=member.name)


def _link_escapes(links: Mapping[tuple[str, ...], str], where: tuple[str, ...], target: str
                  ) -> str | None:
    """Why ``target``, a symlink in directory ``where``, leaves the tree; None if it stays.

    Resolved like the kernel does, through every symlink in the archive: a lexical check
    alone would pass ``s -> .`` plus ``t -> s/..``, which points at the parent of the tree.
    A name not in the archive is taken as a plain directory.
    """
    current = list(where)
    pending = deque(target.split("/"))
    hops = 0
    while pending:
        part = pending.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if not current:
                return "symlink points outside the archive's tree"
            current.pop()
            continue
        link = links.get((*current, part))
        if link is None:
            current.append(part)
            continue
        hops += 1
        if hops > _MAX_LINK_HOPS:
            return "symlink chain too long or circular"
        if link.startswith("/"):
            return "symlink resolves through an absolute symlink"
        pending.extendleft(reversed(link.split("/")))
    return None


def _write_tree(tf: tarfile.TarFile, entries: list[_Entry], root: Path, *, max_bytes: int
                ) -> None:
    """Directories and files in archive order, then symlinks, then directory modes."""
    written = 0
    dir_modes: dict[Path, int] = {}
    for entry in entries:
        path = root.joinpath(*entry.parts)
        if entry.kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
            dir_modes[path] = (entry.member.mode & 0o755) | 0o700
        elif entry.kind == "file":
            path.parent.mkdir(parents=True, exist_ok=True)
            written += _write_file(tf, entry.member, path, budget=max_bytes - written,
                                   max_bytes=max_bytes)
    for entry in entries:
        if entry.kind == "symlink":
            path = root.joinpath(*entry.parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(entry.member.linkname, path)
    for dirpath, dirnames, _files in os.walk(root):  # directories made implicitly get 0o755
        for name in dirnames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                dir_modes.setdefault(path, 0o755)
    for path, mode in dir_modes.items():
        os.chmod(path, mode)  # never a symlink: _scan refuses a name that is both


def _write_file(tf: tarfile.TarFile, member: tarfile.TarInfo, path: Path, *, budget: int,
                max_bytes: int) -> int:
    source = tf.extractfile(member)
    if source is None:  # pragma: no cover - _scan lets only regular files through
        raise UnsafeArchive("is not a regular file", member=member.name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with source, open(os.open(path, flags, 0o600), "wb") as out:
        copied = _copy_bounded(source, out, declared=member.size, budget=budget,
                               max_bytes=max_bytes, name=member.name)
        out.flush()
        os.fchmod(out.fileno(), (member.mode & 0o755) | 0o600)
        with contextlib.suppress(OverflowError, OSError, ValueError):
            os.utime(out.fileno(), (member.mtime, member.mtime))
    return copied


def _copy_bounded(source: IO[bytes], out: IO[bytes], *, declared: int, budget: int,
                  max_bytes: int, name: str) -> int:
    """Copy one member, stopping as soon as it exceeds its header or the archive's budget."""
    copied = 0
    while chunk := source.read(_CHUNK):
        copied += len(chunk)
        if copied > declared:
            raise UnsafeArchive("holds more data than its header declares", member=name)
        if copied > budget:
            raise ArchiveTooLarge(f"unpacks to more than {max_bytes} bytes", member=name)
        out.write(chunk)
    return copied
