"""The operator's cluster-administration commands: ``cluster add|remove|list``, ``backup``
and ``restore``.

``superagent cluster`` (or ``cluster list``) shows the coordinators; ``cluster add ID
HOST:PORT`` adds one (start it first, ``--peers`` naming every member and itself) and,
unless ``--no-wait``, waits until it answers with the log applied and every artifact
held; ``cluster remove ID`` removes one (the API refuses a change that would leave the
live members short of a majority). ``backup FILE`` writes a consistent backup of the
running cluster (state and artifacts) to FILE (``-``: stdout), through a temporary file
renamed at the end so FILE is never half written; ``restore FILE`` restores one onto a
new, empty cluster. All need an admin token.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from superagent.client import ClientError
from superagent.client_cli import SHOW_CLUSTER, client_of, command, emit

CATCH_UP_WAIT = 120.0  # seconds `cluster add` waits for the new member to catch up
CATCH_UP_POLL = 0.5
BACKUP_TIMEOUT = 600.0  # one backup or restore request, artifacts included
CHUNK = 1024 * 1024


def _add(args: argparse.Namespace) -> int:
    client = client_of(args)
    doc = client.post("/api/v1/cluster/members", json={"id": args.id, "raft": args.raft})
    if not args.no_wait:
        if not args.json:
            print(f"{args.id} added at {args.raft}; waiting for it to catch up", flush=True)
        doc["caught_up"] = _wait_caught_up(client_of(args), doc, args.id)
    return emit(args, doc, lambda d: f"{args.id}: member, caught up"
                if d.get("caught_up", True) else f"{args.id}: member")


def _wait_caught_up(client: Any, doc: dict[str, Any], cid: str) -> bool:
    """Poll the new member's own view until it has a leader, the leader's commit index
    (as it was when added) applied, and no artifact missing."""
    target = client.get("/api/v1/cluster")["commit_index"]
    deadline = time.monotonic() + CATCH_UP_WAIT
    while time.monotonic() < deadline:
        url = next((m["api_url"] for m in client.get("/api/v1/cluster")["members"]
                    if m["id"] == cid), None)
        if url:
            try:
                view = httpx.get(f"{url}/api/v1/cluster", timeout=5.0, headers={
                    "authorization": f"Bearer {client.token}"}).json()
            except (httpx.HTTPError, ValueError):
                view = None
            if view and view.get("healthy") and view["last_applied"] >= target \
                    and view.get("artifacts_missing") == 0:
                return True
        time.sleep(CATCH_UP_POLL)
    raise ClientError(f"{cid} was added but did not catch up within {CATCH_UP_WAIT:.0f} s:"
                      f" see its log and `superagent cluster`")


def _remove(args: argparse.Namespace) -> int:
    doc = client_of(args).request("DELETE", f"/api/v1/cluster/members/{args.id}")
    return emit(args, doc, lambda d: f"{args.id}: removed; stop its process now")


def _backup(args: argparse.Namespace) -> int:
    client = client_of(args)
    if args.file == "-":
        _download(client, sys.stdout.buffer)
        return 0
    target = Path(args.file)
    # checked before anything is fetched: a backup can take minutes to download
    if target.is_dir():
        raise ClientError(f"{target} is a directory: name the backup file to write")
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    except OSError as exc:
        raise ClientError(f"cannot write in {target.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            size = _download(client, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        raise ClientError(f"cannot write {target}: {exc.strerror}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone once renamed: only a failure leaves it
    return emit(args, {"ok": True, "file": str(target), "bytes": size},
                lambda d: f"backup written to {d['file']} ({d['bytes']} bytes)")


def _download(client: Any, out: BinaryIO) -> int:
    """Write the backup's bytes to ``out``; their count. A transfer cut off (the
    coordinator stopped, the network failed) is a ClientError, not a traceback."""
    size = 0
    with client.stream("GET", "/api/v1/backup", timeout=BACKUP_TIMEOUT) as response:
        try:
            for chunk in response.iter_bytes(CHUNK):
                out.write(chunk)
                size += len(chunk)
        except httpx.HTTPError as exc:
            raise ClientError(f"the backup was cut off after {size} bytes ({exc}):"
                              " nothing usable was written; take it again") from None
    return size


def _restore(args: argparse.Namespace) -> int:
    try:
        fh = open(args.file, "rb")  # noqa: SIM115 - closed below, rewound per attempt
    except OSError as exc:
        raise ClientError(f"cannot read {args.file}: {exc.strerror}") from None
    with fh:
        doc = client_of(args).post("/api/v1/restore", content=fh, timeout=BACKUP_TIMEOUT,
                                   headers={"content-type": "application/x-tar"})
    return emit(args, doc, lambda d: f"restored: {d['apps']} apps, {d['releases']} releases,"
                f" {d['nodes']} nodes (down until their participants run)")


def add_cluster_commands(sub: Any, cluster: argparse.ArgumentParser) -> None:
    """``cluster list|add|remove`` under the ``cluster`` parser; ``backup`` and ``restore``
    on the top level."""
    nested = cluster.add_subparsers(dest="cluster_command", metavar="ACTION")
    with command(nested, "list", "the coordinators (the default)", SHOW_CLUSTER, nested=True):
        pass
    with command(nested, "add", "add a coordinator (start it first, with --peers naming every"
                 " member and itself)", _add, nested=True) as add:
        add.add_argument("id", help="its --id")
        add.add_argument("raft", metavar="HOST:PORT", help="its Raft address")
        add.add_argument("--no-wait", action="store_true",
                         help="return once added, without waiting for it to catch up")
    with command(nested, "remove", "remove a coordinator (refused when the live members left"
                 " would not be a majority)", _remove, nested=True) as remove:
        remove.add_argument("id")
    with command(sub, "backup", "write a consistent backup of the running cluster (state and"
                 " artifacts) to FILE", _backup) as backup:
        backup.add_argument("file", metavar="FILE", help="where to write it (-: stdout)")
    with command(sub, "restore", "restore a backup onto a new, empty cluster",
                 _restore) as restore:
        restore.add_argument("file", metavar="FILE")
