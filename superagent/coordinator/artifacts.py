"""Content-addressed blob store of the coordinator, and majority replication of a blob.

Theory of operation. A blob is named by the sha256 of its bytes and lives at
``root/sha256/<first two hex>/<hex>``. ``put`` streams an upload into a temporary file directly
under ``root`` (same filesystem, so the final rename is atomic), hashing as it writes and refusing
the upload as soon as it passes ``max_bytes``. The file is fsynced, its digest checked against the
name the caller announced, then renamed into place and the directory fsynced: a blob that is
visible under its name is complete and durable. A blob already present is kept (the content is the
same by construction), which makes ``put`` idempotent. Any failure or cancellation removes the
temporary file, so a refused upload leaves nothing behind. Temporary files left by a crash are
ignored by ``list`` (they are not under ``sha256/``).

Every disk access runs in ``trio.to_thread.run_sync`` (one thread hop per chunk doing both the
write and the hashing), so the event loop never blocks on disk. Only ``path`` is synchronous: it
computes a path and touches nothing.

``replicate`` uploads a blob to peer coordinators concurrently and returns as soon as a majority
of the cluster (this node counts as one) holds it. The peers that are still sending at that point
are cancelled: they belong to ``replicate``'s own nursery and nothing outlives the call. A later
leader that lacks a blob fetches it from a node that has it.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog
import trio

from superagent.coordinator.errors import (
    ArtifactTooLarge,
    BadArtifactName,
    ChecksumMismatch,
    CorruptArtifact,
    NoQuorum,
    UnknownArtifact,
)
from superagent.names import is_sha256

log = structlog.get_logger(__name__)

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
"""App source tarballs are small; 512 MiB bounds the disk one runaway upload can fill."""

READ_CHUNK = 1024 * 1024
"""1 MiB per thread hop: large enough that the hop's cost is negligible, small enough to stream."""

TMP_PREFIX = ".upload-"

Peer = Callable[[str, Path], Awaitable[None]]
"""Uploads the blob named by its first argument, read from the file at its second, to one peer."""


def validate_sha256(name: str) -> str:
    """Return ``name`` if it is 64 lowercase hex digits; raise ``BadArtifactName`` otherwise."""
    if not is_sha256(name):
        raise BadArtifactName(name)
    return name


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """A stored blob: its name (the sha256 of its bytes, lowercase hex) and its size in bytes."""

    sha256: str
    size: int


class ArtifactStore:
    """Blobs under ``root``, each stored once under its sha256.

    The store owns the files under ``root``; callers read a blob through ``open_chunks`` or,
    for a transport that sends files, through ``path`` after checking ``has``.
    """

    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.root = root
        self.max_bytes = max_bytes

    def __repr__(self) -> str:
        return f"<ArtifactStore root={str(self.root)!r} max_bytes={self.max_bytes}>"

    def path(self, sha256: str) -> Path:
        """Where blob ``sha256`` lives (whether or not it exists); raises ``BadArtifactName``."""
        validate_sha256(sha256)
        return self.root / "sha256" / sha256[:2] / sha256

    async def has(self, sha256: str) -> bool:
        """Whether the blob is stored; raises ``BadArtifactName``."""
        return await trio.to_thread.run_sync(self.path(sha256).is_file)

    async def stat(self, sha256: str) -> Artifact:
        """The stored blob's ``Artifact``; raises ``UnknownArtifact`` / ``BadArtifactName``."""
        path = self.path(sha256)
        try:
            size = (await trio.to_thread.run_sync(path.stat)).st_size
        except FileNotFoundError:
            raise UnknownArtifact(sha256) from None
        return Artifact(sha256=sha256, size=size)

    async def put(
        self, chunks: AsyncIterator[bytes], *, expected_sha256: str | None = None,
        check: Callable[[Path], object] | None = None,
    ) -> Artifact:
        """Store the bytes of ``chunks`` and return the blob.

        Raises ``ArtifactTooLarge`` as soon as the upload passes ``max_bytes``,
        ``ChecksumMismatch`` when it does not hash to ``expected_sha256``, and
        ``BadArtifactName`` when ``expected_sha256`` is malformed. ``check``, when given,
        is called (in a thread) with the complete temporary file before it is installed;
        whatever it raises refuses the upload. On any error or cancellation nothing is left
        on disk. The caller keeps ownership of ``chunks``.
        """
        if expected_sha256 is not None:
            validate_sha256(expected_sha256)
        tmp = self.root / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        digest = hashlib.sha256()
        size = 0
        fh = await trio.to_thread.run_sync(_create_exclusive, tmp)
        kept = False
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_bytes:
                    raise ArtifactTooLarge(self.max_bytes)
                await trio.to_thread.run_sync(_write_and_hash, fh, digest, chunk)
            await trio.to_thread.run_sync(_fsync_close, fh)
            sha256 = digest.hexdigest()
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise ChecksumMismatch(expected=expected_sha256, actual=sha256)
            if check is not None:
                await trio.to_thread.run_sync(check, tmp)
            kept = await trio.to_thread.run_sync(_install, tmp, self.path(sha256))
        finally:
            if not kept:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_discard, fh, tmp)
        log.info("artifact_stored", sha256=sha256, size=size)
        return Artifact(sha256=sha256, size=size)

    async def open_chunks(self, sha256: str) -> AsyncIterator[bytes]:
        """Yield the blob's bytes in chunks of up to ``READ_CHUNK``.

        Raises ``UnknownArtifact`` (on the first iteration) when the blob is not stored. The
        bytes are not re-hashed here: the receiver verifies them against the name.
        """
        path = self.path(sha256)
        try:
            fh = await trio.to_thread.run_sync(_open_read, path)
        except FileNotFoundError:
            raise UnknownArtifact(sha256) from None
        try:
            while chunk := await trio.to_thread.run_sync(fh.read, READ_CHUNK):
                yield chunk
        finally:
            # Closing a read-only descriptor does not wait on the disk; doing it here rather than
            # in a thread keeps the generator's cleanup free of awaits.
            fh.close()

    async def verify(self, sha256: str) -> Artifact:
        """Re-hash the stored blob and return it.

        Raises ``UnknownArtifact`` when it is absent and ``CorruptArtifact`` when its bytes no
        longer match its name, after removing it so that it is fetched again.
        """
        path = self.path(sha256)
        try:
            actual, size = await trio.to_thread.run_sync(_hash_file, path)
        except FileNotFoundError:
            raise UnknownArtifact(sha256) from None
        if actual != sha256:
            await self.remove(sha256)
            log.warning("artifact_corrupt", sha256=sha256, actual=actual, size=size)
            raise CorruptArtifact(sha256, actual=actual)
        return Artifact(sha256=sha256, size=size)

    async def remove(self, sha256: str) -> bool:
        """Delete the blob; return whether it was there. Raises ``BadArtifactName``."""
        path = self.path(sha256)
        try:
            await trio.to_thread.run_sync(path.unlink)
        except FileNotFoundError:
            return False
        return True

    async def list(self) -> builtins.list[Artifact]:
        """Every stored blob, sorted by name; files that are not blobs are ignored."""
        return await trio.to_thread.run_sync(_scan, self.root / "sha256")


async def replicate(
    sha256: str,
    size: int,
    store: ArtifactStore,
    peers: Sequence[Peer],
    *,
    timeout: float,
) -> int:
    """Send a stored blob to ``peers`` until a majority of the cluster holds it.

    The cluster is this node plus ``peers``; this node counts once it holds the blob. Returns
    how many nodes hold the blob (this one included, at least a majority). Peers still sending
    when the majority is reached are cancelled. Raises ``UnknownArtifact`` when the blob is not
    stored here or has not ``size`` bytes, and ``NoQuorum`` when too many peers fail or
    ``timeout`` seconds pass first. A peer's exception is logged and counts as a failure.
    """
    local = await store.stat(sha256)
    if local.size != size:
        raise UnknownArtifact(sha256)
    path = store.path(sha256)
    cluster = len(peers) + 1
    needed = cluster // 2 + 1
    succeeded = 1
    failed = 0

    async def send(index: int, peer: Peer, scope: trio.CancelScope) -> None:
        nonlocal succeeded, failed
        try:
            await peer(sha256, path)
        except Exception as exc:  # the transport's errors, whatever they are, count as failure
            failed += 1
            log.warning("artifact_replica_failed", sha256=sha256, peer=index, error=repr(exc))
            if cluster - failed < needed:
                scope.cancel()
            return
        succeeded += 1
        if succeeded >= needed:
            scope.cancel()

    with trio.move_on_after(timeout) as deadline:
        async with trio.open_nursery() as nursery:
            if succeeded < needed:
                for index, peer in enumerate(peers):
                    nursery.start_soon(send, index, peer, nursery.cancel_scope)
    if succeeded >= needed:
        log.info("artifact_replicated", sha256=sha256, nodes=succeeded, cluster=cluster)
        return succeeded
    raise NoQuorum(
        sha256,
        succeeded=succeeded,
        needed=needed,
        cluster=cluster,
        timed_out=deadline.cancelled_caught,
    )


# Blocking helpers, run in worker threads only.


def _create_exclusive(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "xb")  # closed by _fsync_close or _discard


def _open_read(path: Path) -> BinaryIO:
    return open(path, "rb")  # closed by open_chunks' finally


def _write_and_hash(fh: BinaryIO, digest: hashlib._Hash, chunk: bytes) -> None:
    fh.write(chunk)
    digest.update(chunk)


def _fsync_close(fh: BinaryIO) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


def _discard(fh: BinaryIO, tmp: Path) -> None:
    fh.close()
    tmp.unlink(missing_ok=True)


def _install(tmp: Path, final: Path) -> bool:
    """Rename ``tmp`` to ``final`` unless a blob is already there; return True if renamed."""
    if final.is_file():
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _scan(base: Path) -> list[Artifact]:
    found: list[Artifact] = []
    if not base.is_dir():
        return found
    for shard in base.iterdir():
        if not shard.is_dir():
            continue
        for blob in shard.iterdir():
            name = blob.name
            if is_sha256(name) and name[:2] == shard.name:
                with contextlib.suppress(FileNotFoundError):
                    found.append(Artifact(sha256=name, size=blob.stat().st_size))
    return sorted(found, key=lambda artifact: artifact.sha256)
