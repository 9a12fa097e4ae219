"""The backup file: a consistent copy of the coordinators' state and the artifacts it names.

Theory of operation. A backup is a plain tar with three kinds of members, in this order:

- ``backup.json``: what the backup is (``format``, when and where it was taken, the Raft
  commit index it reflects, the state's digest, the artifacts' count);
- ``state.json``: the replicated ``ClusterState`` as its canonical JSON, read under the
  state's lock, so no command is half applied in it;
- ``artifacts/<sha256>``: every release blob the state names.

Consistency while the cluster runs comes for free from two properties: the state is read
in one piece at one point of the log, and artifacts are immutable and content-addressed,
so the blobs it names are the same bytes whenever they are copied after that point (a
release is committed only once its blob is stored on a majority, and a coordinator lacking
one fetches it from a peer first). Nothing in the file is pickled; restoring it checks
every member (names, types, sizes, each blob's sha256, that the state parses and that
every release it names has its blob) before anything is stored: ``BadBackup`` (400)
names what is wrong. The functions here do blocking file I/O: run them in a thread.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from superagent.coordinator.errors import BadBackup, SnapshotError
from superagent.coordinator.state import ClusterState

FORMAT = 1
META, STATE, ARTIFACTS = "backup.json", "state.json", "artifacts/"
META_MAX = 64 * 1024  # bytes of backup.json
STATE_MAX = 1024**3  # bytes of state.json: far above any real cluster's state
_BLOB = re.compile(r"artifacts/([0-9a-f]{64})")
_CHUNK = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Backup:
    """A checked backup file's contents: ``artifacts`` are extracted under the caller's
    directory, by sha256."""

    meta: dict[str, Any]
    state_json: str
    artifacts: dict[str, Path] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"<Backup taken_at={self.meta.get('taken_at')} "
                f"commit={self.meta.get('commit_index')} artifacts={len(self.artifacts)}>")


def needed_artifacts(state: ClusterState) -> set[str]:
    """The blobs ``state``'s releases name."""
    return {r.sha256 for rs in state.releases.values() for r in rs}


def write_backup(path: Path, *, meta: Mapping[str, Any], state_json: str,
                 blobs: Mapping[str, Path]) -> None:
    """Write the backup file at ``path`` (meta gets ``format`` and the artifacts' count)."""
    doc = {**meta, "format": FORMAT, "artifacts": len(blobs)}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, META, json.dumps(doc, sort_keys=True).encode())
        _add_bytes(tar, STATE, state_json.encode())
        for sha256 in sorted(blobs):
            info = tar.gettarinfo(str(blobs[sha256]), arcname=f"{ARTIFACTS}{sha256}")
            info.mode, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, "", ""
            with open(blobs[sha256], "rb") as fh:
                tar.addfile(info, fh)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def read_backup(path: Path, dest: Path, *, max_blob: int) -> Backup:
    """Check the backup file at ``path`` and extract its blobs under ``dest``.

    Raises BadBackup naming the member (or the release) that is wrong."""
    meta: dict[str, Any] | None = None
    state_json: str | None = None
    artifacts: dict[str, Path] = {}
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    raise BadBackup(f"member {member.name!r} is not a regular file")
                if member.name == META:
                    meta = _json_member(tar, member, META_MAX)
                elif member.name == STATE:
                    if member.size > STATE_MAX:
                        raise BadBackup(f"{STATE} is over {STATE_MAX} bytes")
                    state_json = _read(tar, member).decode("utf-8")
                elif (match := _BLOB.fullmatch(member.name)) is not None:
                    if member.size > max_blob:
                        raise BadBackup(f"member {member.name!r} is over {max_blob} bytes")
                    artifacts[match[1]] = _extract_blob(tar, member, match[1], dest)
                else:
                    raise BadBackup(f"unexpected member {member.name!r}")
    except (tarfile.TarError, EOFError) as exc:
        raise BadBackup(f"not a readable backup (tar): {exc}") from None
    except UnicodeDecodeError:
        raise BadBackup(f"{STATE} is not UTF-8") from None
    if meta is None or state_json is None:
        raise BadBackup(f"not a superagent backup: {META} and {STATE} are required")
    if meta.get("format") != FORMAT:
        raise BadBackup(f"unknown backup format {meta.get('format')!r} (this version reads"
                        f" {FORMAT})")
    try:
        state = ClusterState.from_json(state_json)
    except SnapshotError as exc:
        raise BadBackup(f"{STATE}: {exc}") from None
    for app, releases in sorted(state.releases.items()):
        for release in releases:
            if release.sha256 not in artifacts:
                raise BadBackup(f"release {app}@r{release.number} names artifact"
                                f" {release.sha256}, which the backup lacks")
    return Backup(meta=meta, state_json=state_json, artifacts=artifacts)


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fh = tar.extractfile(member)
    if fh is None:
        raise BadBackup(f"member {member.name!r} cannot be read")
    return fh.read()


def _json_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> dict[str, Any]:
    if member.size > limit:
        raise BadBackup(f"{member.name} is over {limit} bytes")
    try:
        doc = json.loads(_read(tar, member))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the limit
        raise BadBackup(f"{member.name} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadBackup(f"{member.name} is not a JSON object")
    return doc


def _extract_blob(tar: tarfile.TarFile, member: tarfile.TarInfo, sha256: str,
                  dest: Path) -> Path:
    fh = tar.extractfile(member)
    if fh is None:
        raise BadBackup(f"member {member.name!r} cannot be read")
    target = dest / sha256
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        raise BadBackup(f"member {member.name!r} does not hash to its name"
                        f" (sha256 {digest.hexdigest()})")
    return target
