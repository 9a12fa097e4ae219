"""Building tar archives in memory for the archive and release tests, hostile ones included.

Members are written with ``TarFile.addfile`` from hand-made headers, so a test can write
whatever an attacker would: absolute names, ``..``, links anywhere, devices, duplicates.
"""

from __future__ import annotations

import gzip
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



def raw_members(members: list[Member]) -> bytes:
    """The tar blocks of ``members`` without the end-of-archive marker, so more can follow."""
    out = bytearray()
    for info, data in members:
        out += info.tobuf(tarfile.GNU_FORMAT)
        if data:
            out += data + bytes(-len(data) % tarfile.BLOCKSIZE)
    return bytes(out)


END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)


def zero_bomb(name: str, size: int, *, first: tuple[Member, ...] = ()) -> bytes:
    """A tar.gz holding ``first`` then ``size`` zero bytes in ``name``, compressed to about a
    thousandth of that: one gzip member per MiB of zeros (a multi-member gzip stream is
    valid gzip), so building even a 2 GiB bomb takes milliseconds."""
    mib, rest = divmod(size, 1024**2)
    one_mib = gzip.compress(bytes(1024**2), compresslevel=9)
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
    header = raw_members(list(first)) + info.tobuf(tarfile.GNU_FORMAT)
    tail = bytes(rest + (-size % tarfile.BLOCKSIZE)) + END_OF_ARCHIVE
    return gzip.compress(header) + one_mib * mib + gzip.compress(tail)


def many_files(count: int, *, first: tuple[Member, ...] = ()) -> bytes:
    """A tar.gz of ``first`` then ``count`` empty files ``f0``, ``f1``…, built from raw
    headers (tarfile's writer takes seconds for 100k members)."""
    template = bytearray(file("f")[0].tobuf(tarfile.GNU_FORMAT))
    template[148:156] = b" " * 8  # the checksum counts its own field as spaces
    base = sum(template) - ord("f")
    headers = bytearray()
    for i in range(count):
        name = f"f{i}".encode()
        block = bytearray(template)
        block[:len(name)] = name
        block[148:156] = b"%06o\0 " % (base + sum(name))
        headers += block
    return gzip.compress(raw_members(list(first)) + headers + END_OF_ARCHIVE, compresslevel=1)
