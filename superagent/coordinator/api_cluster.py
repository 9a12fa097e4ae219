"""Cluster administration over the API: the coordinators' membership, backup and restore.

Theory of operation.

- **Membership** (``POST /api/v1/cluster/members``, ``DELETE .../members/{id}``) is the
  leader's: a follower forwards the request as it is. The leader takes
  ``membership_lock`` without waiting (a second change meanwhile is a 409), decides with
  ``quorum.plan_change`` from the members it sees and those it is connected to, then acts:
  an add commits ``AddCoordinator`` (the id of the address) and then pysyncobj's own
  membership entry; a remove commits pysyncobj's entry and then ``RemoveCoordinator``.
  Removing the leader itself is checked the same way, then the leader hands the
  leadership to a caught-up follower and forwards the request to it (which decides
  again, under its own lock). A new member catches up by itself: Raft sends it the log
  (or a snapshot) and its artifact sync fetches every release blob from its peers; its
  ``GET /api/v1/cluster`` reports ``last_applied`` and ``artifacts_missing``.
- **Backup** (``GET /api/v1/backup``): any coordinator first passes a barrier (it has
  applied everything committed before the request), reads the state in one piece,
  fetches any blob it lacks from a peer, writes the tar (``coordinator.backup``) under
  its data dir and streams it; the file is removed once sent.
- **Restore** (``POST /api/v1/restore``, the backup as the body) onto an empty cluster:
  the file is staged and checked completely, each blob is stored here and replicated to
  a majority, then ``RestoreState`` replaces the state (``state_admin``). A cluster that
  is not empty answers 409 once the body is read, before anything is stored. Staged
  files live under ``<data dir>/backup-staging`` and are removed when the request ends
  (and at the coordinator's start, after a crash).

Both need the ``cluster:admin`` permission (admin tokens).
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from superagent import __version__
from superagent.coordinator import commands as cmd
from superagent.coordinator import state_admin
from superagent.coordinator.api_common import (
    MAX_JSON,
    Context,
    bad_request,
    error,
    forward,
    from_result,
    idempotency_key,
    read_json,
)
from superagent.coordinator.backup import Backup, needed_artifacts, read_backup, write_backup
from superagent.coordinator.errors import (
    ArtifactUnavailable,
    BadBackup,
    MembershipRefused,
    NoLeader,
    RaftError,
    UnknownArtifact,
)
from superagent.coordinator.host import ApiHost
from superagent.coordinator.quorum import ADD, REMOVE, MemberChange, plan_change
from superagent.jsonbody import field, read_body

log = structlog.get_logger(__name__)

MEMBERSHIP_TIMEOUT = 10.0  # one membership entry committed (a Raft round, or an election)
PROBE_TIMEOUT = 2.0  # a new member's Raft port answers a TCP connect within this
HANDOVER_TIMEOUT = 6.0  # a leader removing itself waits this long for its successor
HANDOVER_ATTEMPT = 1.5  # ...asking again when after this long it still (or again) leads
BACKUP_MAX = 64 * 1024**3  # bytes of an uploaded backup: far above a real cluster's
STAGING = "backup-staging"  # under the data dir: files being written or read, then removed
_CHUNK = 1024 * 1024


# ---------------------------------------------------------------------- membership
def members_view(c: ApiHost) -> list[dict[str, Any]]:
    """Every current member: id, Raft and API addresses, connected, leader, self, lag."""
    status = c.raft.status()
    urls: dict[str, str] = c.read(lambda s: dict(s.coordinators))
    rows = []
    for cid, address in sorted(c.member_ids().items()):
        me = address == c.config.raft_address
        # lag: log entries the member is behind the commit index, as this one knows it
        # (its own applied index; a partner's matched index, known on the leader only)
        matched = (status["last_applied"] if me
                   else status.get("match_index", {}).get(address))
        rows.append({"id": cid, "raft": address, "api_url": urls.get(cid), "self": me,
                     "connected": True if me else status["partners"].get(address, False),
                     "leader": address == status["leader"],
                     "lag": None if matched is None
                     else max(0, status["commit_index"] - matched)})
    return rows


async def add_member(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    if not c.is_leader():
        return await forward(request, ctx)
    body = await read_json(request)
    cid = field(body, "id", str, error=bad_request)
    address = field(body, "raft", str, error=bad_request)
    await _change(c, ADD, cid, address, ctx.actor)
    return JSONResponse({"ok": True, "added": cid, "members": members_view(c)})


async def remove_member(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    if not c.is_leader():
        return await forward(request, ctx)
    cid = request.path_params["coordinator"]
    if c.member_ids().get(cid) == c.config.raft_address:
        # decide first: a removal the successor would refuse must not cost an election
        await _plan(c, REMOVE, cid, "")
        await _hand_over(c)  # a leader cannot remove itself: its successor does
        return await forward(request, ctx)
    await _change(c, REMOVE, cid, "", ctx.actor)
    return JSONResponse({"ok": True, "removed": cid, "members": members_view(c)})


async def _change(c: ApiHost, kind: str, cid: str, address: str, actor: str) -> None:
    """Decide and carry out one membership change (see the module docstring)."""
    if c.membership_lock.locked():
        raise MembershipRefused("another change of the coordinators is under way")
    async with c.membership_lock:
        change = await _plan(c, kind, cid, address)
        log.info("coordinators change", kind=kind, coordinator=cid, address=change.address,
                 noop=change.noop, after=change.members_after)
        if kind == ADD:
            await _commit(c, c.command(cmd.AddCoordinator, actor=actor, coordinator=cid,
                                       raft_address=address))
            if not change.noop:
                await _raft_change(c, "add", address)
        else:
            await _raft_change(c, "remove", change.address)
            await _commit(c, c.command(cmd.RemoveCoordinator, actor=actor, coordinator=cid))


async def _plan(c: ApiHost, kind: str, cid: str, address: str) -> MemberChange:
    """``quorum.plan_change`` from the members this coordinator sees and is connected to
    now (and, for an add, whether the new member's Raft port answers)."""
    members = c.member_ids()
    status = c.raft.status()
    live = {m for m, a in members.items()
            if a == c.config.raft_address or status["partners"].get(a)}
    if kind == ADD:  # bad input first, as the most lenient plan: then probe the address
        plan_change(kind=kind, coordinator=cid, address=address, members=members, live=live,
                    joining_answers=True)
    answers = kind == ADD and await _answers(address)
    return plan_change(kind=kind, coordinator=cid, address=address, members=members,
                       live=live, joining_answers=answers)


async def _answers(address: str) -> bool:
    """Whether something accepts a TCP connection at ``address`` (host:port) now."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return False
    with trio.move_on_after(PROBE_TIMEOUT):
        try:
            stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
        except (OSError, ValueError):  # ValueError: a name IDNA cannot encode
            return False
        await stream.aclose()
        return True
    return False


async def _commit(c: ApiHost, command: cmd.Command) -> None:
    result = await c.submit(command)
    if not result.get("ok"):
        raise MembershipRefused(str(result.get("error", "refused")))


async def _raft_change(c: ApiHost, kind: str, address: str) -> None:
    try:
        await c.raft.change_membership(kind, address, MEMBERSHIP_TIMEOUT)
    except RaftError as exc:
        if exc.reason == "request_denied":
            raise MembershipRefused("Raft refused the change: the previous change of the"
                                    " coordinators has not committed yet, or this one is"
                                    " void") from None
        raise


async def _hand_over(c: ApiHost) -> None:
    """Make a caught-up follower the leader, and wait until it is known.

    A hand-over can miss: pysyncobj sends ``TimeoutNow`` only to a follower that holds the
    leader's whole log, but the leader goes on appending (a deploy running), so the
    follower's election may find voters with a longer log, fail, and this node win the
    next one. So it asks again while it (again) leads, within ``HANDOVER_TIMEOUT``; a
    refusal because no follower is caught up at that instant is retried the same way.
    """
    if len(c.member_ids()) == 1:
        raise MembershipRefused(f"coordinator {c.config.id} is the only member")
    refused = ""
    with trio.move_on_after(HANDOVER_TIMEOUT):
        while True:
            if c.is_leader():
                try:
                    await c.raft.transfer_leadership(HANDOVER_ATTEMPT)
                except RaftError as exc:
                    if exc.reason != "request_denied":
                        raise MembershipRefused(f"{c.config.id} leads and cannot hand over"
                                                f" ({exc.reason}): retry in a moment") from None
                    refused = exc.reason
            with trio.move_on_after(HANDOVER_ATTEMPT):
                while c.is_leader() or c.leader_url() in (None, c.config.url):
                    await trio.sleep(0.05)
                return
    if refused and c.is_leader():
        raise MembershipRefused(f"{c.config.id} leads and no follower could take over"
                                f" ({refused}): retry in a moment")
    raise NoLeader(node=c.config.id, waited=HANDOVER_TIMEOUT)


# ---------------------------------------------------------------------- backup
def clear_staging(data_dir: Path) -> None:
    """Remove what a crash left staged (called at the coordinator's start)."""
    shutil.rmtree(data_dir / STAGING, ignore_errors=True)


def _staging(c: ApiHost) -> Path:
    path = c.config.data_dir / STAGING / secrets.token_hex(8)
    path.mkdir(parents=True)
    return path


async def backup(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    # a GET has no use for a body, but one left unread under a streamed answer could stall
    # the connection (seen with hypercorn): read it, within bounds, first
    await read_body(request, limit=MAX_JSON, error=bad_request)
    await c.barrier()  # everything committed before this request is in the copy
    state_json, needed, digest = c.read(
        lambda s: (s.to_json(), sorted(needed_artifacts(s)), s.digest()))
    index = c.raft.status()["last_applied"]
    for sha256 in needed:
        try:
            await c.ensure_artifact(sha256)
        except UnknownArtifact as exc:  # not a 404: the route exists, the blob is away
            raise ArtifactUnavailable(sha256, why=str(exc)) from None
    staging = await trio.to_thread.run_sync(_staging, c)
    path = staging / "backup.tar"
    meta = {"taken_at": time.time(), "coordinator": c.config.id, "commit_index": index,
            "digest": digest, "version": __version__}
    try:
        await trio.to_thread.run_sync(lambda: write_backup(
            path, meta=meta, state_json=state_json,
            blobs={sha: c.store.path(sha) for sha in needed}))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("backup taken", commit_index=index, artifacts=len(needed),
             bytes=path.stat().st_size)
    size = path.stat().st_size
    name = f"superagent-backup-{int(meta['taken_at'])}.tar"
    return StreamingResponse(_sent_then_removed(path, staging),
                             media_type="application/x-tar",
                             headers={"content-length": str(size),
                                      "content-disposition": f'attachment; filename="{name}"'})


async def _sent_then_removed(path: Path, staging: Path) -> AsyncIterator[bytes]:
    """The file's bytes; the staging dir is removed when they are sent or the client left."""
    try:
        async for chunk in _chunks(path):
            yield chunk
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(shutil.rmtree, staging, True)


# ---------------------------------------------------------------------- restore
async def restore(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    key = idempotency_key(request)
    staging = await trio.to_thread.run_sync(_staging, c)
    try:
        upload = staging / "upload.tar"
        # the whole body first: a client refused mid-upload sees a reset, not the 409
        await _receive(request.stream(), upload)
        if not c.read(state_admin.is_empty):
            return error(409, "conflict", "the cluster is not empty: a backup is restored"
                                          " onto a new cluster, before its participants"
                                          " start")
        found: Backup = await trio.to_thread.run_sync(
            lambda: read_backup(upload, staging / "artifacts", max_blob=c.config.max_upload))
        for sha256, blob in sorted(found.artifacts.items()):
            stored = await c.store.put(_chunks(blob), expected_sha256=sha256)
            await c.replicate_artifact(sha256, stored.size)
        source = f"backup taken {found.meta.get('taken_at')} on {found.meta.get('coordinator')}"
        result = await c.submit(c.command(cmd.RestoreState, actor=ctx.actor, key=key,
                                          state=found.state_json, source=source[:200]))
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(shutil.rmtree, staging, True)
    if result.get("ok"):
        log.info("backup restored", apps=result.get("apps"), nodes=result.get("nodes"))
    return from_result(result)


async def _receive(chunks: AsyncIterator[bytes], path: Path) -> None:
    size = 0
    async with await trio.open_file(path, "wb") as out:
        async for chunk in chunks:
            size += len(chunk)
            if size > BACKUP_MAX:
                raise BadBackup(f"the backup is over {BACKUP_MAX} bytes")
            await out.write(chunk)
    if size == 0:
        raise BadBackup("no backup in the request body")


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    async with await trio.open_file(path, "rb") as fh:
        while chunk := await fh.read(_CHUNK):
            yield chunk

