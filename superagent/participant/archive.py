"""Safe unpacking of an app's source archive (tar or tar.gz) into a fresh directory.

The archive is hostile until every header has been checked: it comes from whoever can
deploy, and a tar member can name any path, link anywhere and claim any size.
``releases.ReleaseStore.prepare`` unpacks each release's src/ with ``safe_extract``.

``safe_extract`` reads the archive in two passes. The scan is ``superagent.tarcheck.scan``,
the same rules the coordinator applies when the archive is uploaded: it reads every header
but no data and refuses the archive before anything is written (``UnsafeArchive`` naming
the member; ``ArchiveTooLarge`` for the member-count, size and compression-ratio limits).
The rules are listed in that module. The write pass unpacks into a temporary directory next
to ``dest`` and renames it at the end (on failure it is removed): files are created with
O_EXCL|O_NOFOLLOW and copied with a byte count that stops at ``max_bytes``, symlinks are
created last so nothing is ever written through one, modes keep only the 0o755 bits (no
setuid, setgid, sticky, group or other write) plus owner read/write, and the archive's
owners are ignored. The decompressed stream is read through the scan's budget
(``tarcheck.BudgetReader``) in both passes, so a gzip bomb or a giant pax header costs at
most about ``max_bytes`` of decompression, never unbounded memory.

Hardlinks are refused outright, even those pointing inside the archive: app sources do not
need them (``git archive`` never writes them, GNU tar only for multiply-linked files and not
with ``--hard-dereference``), they were the vector of several tarfile filter bypasses, and
refusing them keeps "every path is a fresh inode the extractor created" true.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from superagent.errors import ArchiveOverLimit, ArchiveRefused
from superagent.participant.errors import ArchiveTooLarge, UnsafeArchive
from superagent.tarcheck import (
    MAX_ARCHIVE_BYTES,
    MAX_ARCHIVE_FILES,
    READ_ERRORS,
    Entry,
    check_archive,
    open_archive,
    scan,
)

__all__ = ["MAX_ARCHIVE_BYTES", "MAX_ARCHIVE_FILES", "check", "safe_extract"]

_CHUNK = 64 * 1024  # copy unit while unpacking


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
    with contextlib.ExitStack() as stack, _translated():
        try:
            tf = open_archive(archive, stack, max_bytes=max_bytes, max_files=max_files)
            entries = scan(tf, max_bytes=max_bytes, max_files=max_files)
        except READ_ERRORS as exc:
            raise UnsafeArchive(f"not a readable tar or tar.gz archive ({exc})") from exc
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
        try:
            try:
                _write_tree(tf, entries, tmp, max_bytes=max_bytes)
            except READ_ERRORS as exc:
                raise UnsafeArchive(f"corrupt or truncated archive ({exc})") from exc
            os.chmod(tmp, 0o755)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def check(archive: Path | bytes, *, max_bytes: int = MAX_ARCHIVE_BYTES,
          max_files: int = MAX_ARCHIVE_FILES) -> None:
    """Check ``archive`` as ``safe_extract`` would, writing nothing; raises the same
    ``UnsafeArchive`` / ``ArchiveTooLarge``. Blocking."""
    with _translated():
        check_archive(archive, max_bytes=max_bytes, max_files=max_files)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """The shared checker's refusals as the participant's own errors (status 400 / 413)."""
    try:
        yield
    except ArchiveOverLimit as exc:
        raise ArchiveTooLarge(exc.reason, member=exc.member) from exc
    except ArchiveRefused as exc:
        raise UnsafeArchive(exc.reason, member=exc.member) from exc


def _write_tree(tf: tarfile.TarFile, entries: list[Entry], root: Path, *, max_bytes: int
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
