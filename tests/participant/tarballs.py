"""Building tar archives in memory for the archive and release tests, hostile ones included.

Members are written with ``TarFile.addfile`` from hand-made headers, so a test can write
whatever an attacker would: absolute names, ``..``, links anywhere, devices, duplicates.
"""

from __future__ import annotations

import io
import tarfile

Member = tuple[tarfile.TarInfo, bytes | None]


def file(name: str, data: bytes | str = b"", *, mode: int = 0o644) -> Member:
    payload = data.encode() if isinstance(data, str) else data
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid = len(payload), mode, 1234, 1234
    info.mtime = 1_700_000_000
    return info, payload


def directory(name: str, *, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def special(name: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, None


def make_tar(members: list[Member], *, gz: bool = True, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()
