"""Tests of superagent/coordinator/artifacts.py: real files under tmp_path, trio, and fake peers
that each upload into a real ArtifactStore of their own."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
import trio
import trio.testing

from superagent.coordinator.artifacts import Artifact, ArtifactStore, Peer, replicate
from superagent.coordinator.errors import (
    ArtifactTooLarge,
    BadArtifactName,
    ChecksumMismatch,
    CorruptArtifact,
    NoQuorum,
    UnknownArtifact,
)

CHUNKS = [b"a" * 100_000, b"b" * 70_000, b"", b"c" * 3]
DATA = b"".join(CHUNKS)
SHA = hashlib.sha256(DATA).hexdigest()


async def stream(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await trio.lowlevel.checkpoint()
        yield chunk


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    async with await trio.open_file(path, "rb") as fh:
        while chunk := await fh.read(32_768):
            yield chunk


def leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def copying_peer(store: ArtifactStore) -> Peer:
    async def peer(sha256: str, path: Path) -> None:
        await store.put(file_chunks(path), expected_sha256=sha256)

    return peer


async def failing_peer(sha256: str, path: Path) -> None:
    raise ConnectionRefusedError("peer is down")


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "local", max_bytes=200_000)


async def test_put_then_read_back_multi_chunk_blob(store: ArtifactStore) -> None:
    """A multi-chunk upload is stored under its sha256 and reads back byte for byte."""
    artifact = await store.put(stream(CHUNKS), expected_sha256=SHA)
    assert artifact == Artifact(sha256=SHA, size=len(DATA))
    assert store.path(SHA) == store.root / "sha256" / SHA[:2] / SHA
    assert await store.has(SHA)
    read = b"".join([chunk async for chunk in store.open_chunks(SHA)])
    assert hashlib.sha256(read).hexdigest() == SHA
    assert await store.verify(SHA) == artifact
    assert await store.list() == [artifact]
    assert leftovers(store.root) == [store.path(SHA)]


async def test_checksum_mismatch_is_refused_and_leaves_nothing(store: ArtifactStore) -> None:
    """An upload that does not hash to the announced sha256 is refused; no file remains."""
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatch) as info:
        await store.put(stream(CHUNKS), expected_sha256=wrong)
    assert info.value.status_hint == 400
    assert info.value.actual == SHA
    assert leftovers(store.root) == []
    assert not await store.has(wrong)


async def test_oversize_upload_is_refused_mid_stream(store: ArtifactStore) -> None:
    """Passing max_bytes raises 413 before the stream is consumed, and leaves nothing."""
    consumed: list[int] = []

    async def endless() -> AsyncIterator[bytes]:
        for index in range(1000):
            consumed.append(index)
            yield b"x" * 50_000

    with pytest.raises(ArtifactTooLarge) as info:
        await store.put(endless())
    assert info.value.status_hint == 413
    assert len(consumed) == 5  # 4 chunks fit in 200_000 bytes, the 5th is refused
    assert leftovers(store.root) == []


async def test_put_is_idempotent(store: ArtifactStore) -> None:
    """Storing the same bytes twice keeps the first blob and leaves no temporary file."""
    first = await store.put(stream(CHUNKS))
    inode = store.path(SHA).stat().st_ino
    second = await store.put(stream([DATA]), expected_sha256=SHA)
    assert first == second
    assert store.path(SHA).stat().st_ino == inode
    assert leftovers(store.root) == [store.path(SHA)]


async def test_unknown_and_malformed_names(store: ArtifactStore) -> None:
    """An absent blob is a 404 everywhere; a name that is not 64 lowercase hex is a 400."""
    absent = "f" * 64
    assert not await store.has(absent)
    with pytest.raises(UnknownArtifact) as info:
        [chunk async for chunk in store.open_chunks(absent)]
    assert info.value.status_hint == 404
    with pytest.raises(UnknownArtifact):
        await store.verify(absent)
    assert not await store.remove(absent)
    for bad in ("F" * 64, "f" * 63, "../" + "f" * 61):
        with pytest.raises(BadArtifactName):
            store.path(bad)
    assert await store.list() == []


async def test_verify_detects_and_removes_corrupt_blob(store: ArtifactStore) -> None:
    """A blob whose bytes changed on disk is reported as corrupt and removed."""
    await store.put(stream(CHUNKS))
    path = store.path(SHA)
    path.write_bytes(b"Z" + DATA[1:])
    with pytest.raises(CorruptArtifact) as info:
        await store.verify(SHA)
    assert info.value.actual == hashlib.sha256(b"Z" + DATA[1:]).hexdigest()
    assert not await store.has(SHA)


async def test_replicate_reaches_majority_when_one_peer_fails(
    store: ArtifactStore, tmp_path: Path
) -> None:
    """With 3 nodes, self plus one good peer is a majority even if the other peer fails."""
    peer_store = ArtifactStore(tmp_path / "peer1")
    await store.put(stream(CHUNKS))
    held = await replicate(
        SHA, len(DATA), store, [failing_peer, copying_peer(peer_store)], timeout=5
    )
    assert held == 2
    assert await peer_store.verify(SHA) == Artifact(sha256=SHA, size=len(DATA))


async def test_replicate_without_quorum_when_both_peers_fail(store: ArtifactStore) -> None:
    """Two failing peers of three nodes: NoQuorum (503) naming the one node that has it."""
    await store.put(stream(CHUNKS))
    with pytest.raises(NoQuorum) as info:
        await replicate(SHA, len(DATA), store, [failing_peer, failing_peer], timeout=5)
    assert info.value.status_hint == 503
    assert (info.value.succeeded, info.value.needed, info.value.cluster) == (1, 2, 3)
    assert not info.value.timed_out
    assert "on 1 of 3 nodes" in str(info.value)


async def test_replicate_honours_timeout_with_hanging_peer(
    store: ArtifactStore, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer that never answers, beside a failed one, gives NoQuorum at the timeout."""
    await store.put(stream(CHUNKS))

    async def hanging_peer(sha256: str, path: Path) -> None:
        await trio.sleep_forever()

    start = trio.current_time()
    with pytest.raises(NoQuorum) as info:
        await replicate(SHA, len(DATA), store, [hanging_peer, failing_peer], timeout=30)
    assert trio.current_time() - start == pytest.approx(30)
    assert info.value.timed_out
    assert info.value.succeeded == 1


async def test_replicate_cancels_stragglers_once_majority_is_reached(
    store: ArtifactStore, tmp_path: Path
) -> None:
    """Once a majority holds the blob, a peer still sending is cancelled and the call returns."""
    await store.put(stream(CHUNKS))
    peer_store = ArtifactStore(tmp_path / "peer1")
    cancelled = trio.Event()

    async def hanging_peer(sha256: str, path: Path) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    with trio.fail_after(5):
        held = await replicate(
            SHA, len(DATA), store, [hanging_peer, copying_peer(peer_store)], timeout=60
        )
    assert held == 2
    assert cancelled.is_set()
    assert await peer_store.has(SHA)


async def test_replicate_refuses_a_blob_not_stored_here(store: ArtifactStore) -> None:
    """Replicating a blob this node does not hold is a 404, not a silent success."""
    with pytest.raises(UnknownArtifact):
        await replicate(SHA, len(DATA), store, [failing_peer], timeout=5)
