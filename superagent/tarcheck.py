"""The rules a release archive (tar or tar.gz) must meet, checked by streaming its headers.

Theory of operation. An app's source archive is hostile until every header has been read:
it comes from whoever can deploy, and a tar member can name any path, link anywhere and
claim any size. Two places read it, with these same rules: the coordinator when the
archive is uploaded (``check_archive``, so a bad one is refused with a 400 and never stored
or replicated), and the participant when it prepares a release
(``superagent.participant.archive.safe_extract``, which scans with ``scan`` and then
writes). One implementation, so the two can never disagree.

``scan`` reads every header but no data, in one pass over the (decompressed) stream, and
stops at the first member that breaks a rule, raising ``ArchiveRefused`` naming it:

- an absolute path, a ``..`` component, a name or path longer than the kernel allows;
- a hardlink, a device, a fifo or any type other than file, directory and symlink;
- a symlink with an empty or absolute target, or one whose target, resolved through every
  symlink in the archive, leaves the tree;
- a member below a symlink or below a file; a name listed twice (directories excepted);
- ``ArchiveOverLimit``: more than ``max_files`` members, declared file sizes adding up to
  more than ``max_bytes``, or a compressed stream that unpacks to more than
  ``MAX_RATIO`` times its size once past ``RATIO_FLOOR`` (a gzip bomb).

tarfile's own "data" filter is consulted afterwards as a second opinion. The stream is read
through ``BudgetReader``, which refuses to go past ``max_bytes`` plus the per-member header
overhead and refuses any single read over ``MAX_HEADER_READ`` (tarfile reads a pax or GNU
long-name header whole): decompression work and memory are bounded whatever the archive
claims. Memory grows with the member count only, which is capped. Only gzip is accepted as
compression: bzip2 and xz decoders can need a lot of memory for little input.

Nothing here writes a file or imports a role: this module belongs to the shared core.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from superagent.errors import ArchiveOverLimit, ArchiveRefused

MAX_ARCHIVE_BYTES = 512 * 1024**2  # unpacked source size; a bigger app ships its assets elsewhere
MAX_ARCHIVE_FILES = 20_000  # members; a vendored node_modules fits, a runaway tree does not
MAX_RATIO = 200  # unpacked / compressed; source trees compress 3-10x, zeros ~1000x
RATIO_FLOOR = 64 * 1024**2  # the ratio is judged only past this many unpacked bytes
MAX_HEADER_READ = 1024**2  # tarfile reads a pax or GNU long-name header whole; cap it
MEMBER_OVERHEAD = 8 * 1024  # stream bytes allowed per member beyond its data: header, padding

_GZIP_MAGIC = b"\x1f\x8b"
_SEEK_STEP = 1024**2  # a seek over gzip'd data decompresses; check the ratio every MiB of it
_MAX_LINK_HOPS = 40  # the kernel's own symlink-follow limit (MAXSYMLINKS)
_MAX_NAME_BYTES = 255  # NAME_MAX: longer components fail at open(), refuse them up front
_MAX_PATH_BYTES = 4000  # a little under PATH_MAX (4096)
# The data filter judges paths against a destination; any fresh absolute one gives the same
# answers, because the destination never exists before extraction.
_FILTER_ROOT = "/nonexistent-superagent-release"
# What a corrupt or truncated archive raises from tarfile, gzip and zlib.
READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
# tarfile.data_filter arrived in 3.11.4; older 3.11s get our checks alone.
_DATA_FILTER: Callable[[tarfile.TarInfo, str], tarfile.TarInfo] | None = getattr(
    tarfile, "data_filter", None)

Kind = Literal["dir", "file", "symlink"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One member that passed the scan: its path components, kind and header."""

    parts: tuple[str, ...]
    kind: Kind
    member: tarfile.TarInfo


@dataclass(frozen=True, kw_only=True, slots=True)
class Summary:
    """What ``check_archive`` found in an acceptable archive."""

    members: int
    files: int
    unpacked_bytes: int


def check_archive(archive: Path | bytes, *, max_bytes: int = MAX_ARCHIVE_BYTES,
                  max_files: int = MAX_ARCHIVE_FILES) -> Summary:
    """Check every header of ``archive`` against the rules (module docstring); write nothing.

    Raises ``ArchiveRefused`` (``ArchiveOverLimit`` for the limits) naming the first bad
    member; a corrupt or truncated archive is an ``ArchiveRefused`` too. ``OSError`` from
    reading the file propagates. Blocking: async callers use ``trio.to_thread.run_sync``.
    """
    with contextlib.ExitStack() as stack:
        try:
            tf = open_archive(archive, stack, max_bytes=max_bytes, max_files=max_files)
            entries = scan(tf, max_bytes=max_bytes, max_files=max_files)
        except READ_ERRORS as exc:
            raise ArchiveRefused(f"not a readable tar or tar.gz archive ({exc})") from exc
    files = [e for e in entries if e.kind == "file"]
    return Summary(members=len(entries), files=len(files),
                   unpacked_bytes=sum(e.member.size for e in files))


class BudgetReader:
    """Read-only view of the (decompressed) archive stream that refuses to go past ``limit``.

    tarfile seeks over member data while scanning; on a gzip stream every seek forward
    decompresses, so bounding positions bounds the work. ``max_read`` bounds one read:
    tarfile reads extended headers in one piece, file data arrives in small chunks.
    ``compressed`` is the raw stream under a gzip one (None for a plain tar), against which
    the ratio is judged. ``member`` is the member whose data or next header is being read,
    set by whoever drives tarfile, so that a refusal can name it.
    """

    def __init__(self, stream: IO[bytes] | gzip.GzipFile, *, limit: int, max_read: int,
                 compressed: IO[bytes] | None = None) -> None:
        self.stream = stream
        self.limit = limit
        self.max_read = max_read
        self.compressed = compressed
        self.member = ""

    def __repr__(self) -> str:
        return f"<BudgetReader at {self.stream.tell()} of at most {self.limit}>"

    def read(self, size: int = -1, /) -> bytes:
        if size < 0 or size > self.max_read:
            raise ArchiveOverLimit(f"an extended header over {self.max_read} bytes"
                                   + (f" follows {self.member!r}" if self.member else ""))
        self._check(self.stream.tell() + size)
        data = self.stream.read(size)
        self._check_ratio()
        return data

    def seek(self, pos: int, whence: int = io.SEEK_SET, /) -> int:
        if whence not in (io.SEEK_SET, io.SEEK_CUR):  # tarfile never does, reading a stream
            raise ArchiveRefused("not a streamable tar archive (seeks from its end)")
        target = pos + (self.stream.tell() if whence == io.SEEK_CUR else 0)
        self._check(target)
        if self.compressed is None:
            return self.stream.seek(target)
        while self.stream.tell() < target:  # decompressing: look at the ratio on the way
            self.stream.seek(min(target, self.stream.tell() + _SEEK_STEP))
            self._check_ratio()
        return self.stream.seek(target)

    def tell(self) -> int:
        return self.stream.tell()

    def write(self, data: bytes, /) -> int:
        raise io.UnsupportedOperation("read-only")

    def close(self) -> None:
        """The caller's ExitStack owns the underlying streams."""

    def _check(self, position: int) -> None:
        if position > self.limit:
            raise ArchiveOverLimit(f"the unpacked stream exceeds {self.limit} bytes",
                                   member=self.member)

    def _check_ratio(self) -> None:
        if self.compressed is None:
            return
        unpacked = self.stream.tell()
        if unpacked > RATIO_FLOOR and unpacked > MAX_RATIO * max(self.compressed.tell(), 1):
            raise ArchiveOverLimit(f"unpacks to more than {MAX_RATIO} times its compressed "
                                   f"size ({unpacked} bytes so far)", member=self.member)


def stream_limit(*, max_bytes: int, max_files: int) -> int:
    """How far into the unpacked stream an archive within the limits can reach."""
    return max_bytes + (max_files + 1) * MEMBER_OVERHEAD + MAX_HEADER_READ


def open_archive(archive: Path | bytes, stack: contextlib.ExitStack, *, max_bytes: int,
                 max_files: int) -> tarfile.TarFile:
    """A streaming TarFile over ``archive`` read through a ``BudgetReader``; ``stack`` owns
    the open file and streams. Raises ``READ_ERRORS`` for what is not a tar at all."""
    raw: IO[bytes]
    if isinstance(archive, bytes | bytearray | memoryview):
        raw = io.BytesIO(archive)
    else:
        raw = stack.enter_context(open(archive, "rb"))  # noqa: SIM115 - the stack closes it
    compressed = raw.read(2) == _GZIP_MAGIC
    raw.seek(0)
    stream: IO[bytes] | gzip.GzipFile = raw
    if compressed:
        stream = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
    reader = BudgetReader(stream, limit=stream_limit(max_bytes=max_bytes, max_files=max_files),
                          max_read=MAX_HEADER_READ, compressed=raw if compressed else None)
    return stack.enter_context(tarfile.open(fileobj=reader, mode="r:"))


def scan(tf: tarfile.TarFile, *, max_bytes: int, max_files: int) -> list[Entry]:
    """Every member checked, alone and against the others; the entries in archive order.

    Raises ``ArchiveRefused`` naming the first bad member, and ``READ_ERRORS`` from tarfile
    for a corrupt stream (the caller words those).
    """
    entries: list[Entry] = []
    kinds: dict[tuple[str, ...], Kind] = {}
    links: dict[tuple[str, ...], str] = {}
    total = 0
    reader = tf.fileobj if isinstance(tf.fileobj, BudgetReader) else None
    for count, member in enumerate(tf, start=1):  # lazily: stops at the first member too many
        if reader is not None:
            reader.member = member.name  # its data is what the stream reads next
        if count > max_files:
            raise ArchiveOverLimit(f"more than {max_files} members", member=member.name)
        parts = member_parts(member.name)
        kind = member_kind(member)
        if kind == "file":
            total += member.size
            if total > max_bytes:
                raise ArchiveOverLimit(f"files add up to more than {max_bytes} bytes "
                                       f"(this one declares {member.size})", member=member.name)
        if not parts:  # "./", the archive's root
            if kind != "dir":
                raise ArchiveRefused("names the root but is not a directory",
                                     member=member.name)
            continue
        if kind == "symlink":
            _check_link_target(member)
            links[parts] = member.linkname
        previous = kinds.get(parts)
        if previous is not None:
            if previous == kind == "dir":
                continue
            raise ArchiveRefused("appears twice in the archive", member=member.name)
        kinds[parts] = kind
        entries.append(Entry(parts, kind, member))
    if reader is not None:
        reader.member = ""
    for entry in entries:
        for depth in range(1, len(entry.parts)):
            above = kinds.get(entry.parts[:depth])
            if above == "symlink":
                raise ArchiveRefused("lies below a symlink: nothing is unpacked through a link",
                                     member=entry.member.name)
            if above == "file":
                raise ArchiveRefused("lies below a regular file", member=entry.member.name)
        if entry.kind == "symlink":
            reason = link_escapes(links, entry.parts[:-1], entry.member.linkname)
            if reason is not None:
                raise ArchiveRefused(f"{reason} (target {entry.member.linkname!r})",
                                     member=entry.member.name)
    if _DATA_FILTER is not None:  # a second opinion, after ours: it should never disagree
        for entry in entries:
            try:
                _DATA_FILTER(entry.member, _FILTER_ROOT)
            except tarfile.FilterError as exc:
                raise ArchiveRefused(f"refused by tarfile's data filter: {exc}",
                                     member=entry.member.name) from exc
    return entries


def member_parts(name: str) -> tuple[str, ...]:
    """The path components of a member name ("." and empty ones dropped); refuses
    absolute paths, ``..`` and names the kernel would refuse."""
    if name.startswith("/"):
        raise ArchiveRefused("absolute path", member=name)
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ArchiveRefused("path has a '..' component", member=name)
    if len(os.fsencode(name)) > _MAX_PATH_BYTES or any(
            len(os.fsencode(part)) > _MAX_NAME_BYTES for part in parts):
        raise ArchiveRefused("name too long", member=name)
    return parts


def member_kind(member: tarfile.TarInfo) -> Kind:
    """file, dir or symlink; anything else is refused, hardlinks included."""
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        raise ArchiveRefused(f"hardlinks are refused (to {member.linkname!r}); "
                             "pack with 'tar --hard-dereference'", member=member.name)
    what = ("character device" if member.ischr() else "block device" if member.isblk()
            else "fifo" if member.isfifo() else f"member type {member.type!r}")
    raise ArchiveRefused(f"{what}: only files, directories and symlinks are unpacked",
                         member=member.name)


def _check_link_target(member: tarfile.TarInfo) -> None:
    target = member.linkname
    if not target:
        raise ArchiveRefused("symlink with an empty target", member=member.name)
    if target.startswith("/"):
        raise ArchiveRefused(f"symlink to an absolute path {target!r}", member=member.name)
    if len(os.fsencode(target)) > _MAX_PATH_BYTES:
        raise ArchiveRefused("symlink target too long", member=member.name)


def link_escapes(links: Mapping[tuple[str, ...], str], where: tuple[str, ...], target: str
                  ) -> str | None:
    """Why ``target``, a symlink in directory ``where``, leaves the tree; None if it stays.
    ``links`` maps every symlink of the tree (its path parts) to its target.

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
