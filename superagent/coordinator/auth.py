"""API tokens, the coordinators' secret and machine credentials.

An API token is 32 random bytes, URL-safe base64, prefixed ``sa_`` so it is recognisable in
a leaked file. The cluster stores only its sha256 (a token is high-entropy, so a fast hash
is enough; a slow password hash would only slow every request). Comparisons are constant
time.

Machines authenticate otherwise (``authenticate_machine``), by the route's ``auth`` kind:

- ``secret``: peer calls (``/api/v1/internal/*``): the coordinators' secret only.
- ``node``: a participant's own calls (register, heartbeat): its machine credential, and
  only for its own node; the coordinators' secret; the legacy shared participant secret
  while a cluster migrates (``participant_secret``), for nodes not enrolled yet.
- ``any``: artifact fetches: as ``node``, but a machine credential only for the artifact
  of a release of an app placed on its node (``placement``) or named by a deploy to it.
- ``join``: enrolment: the bearer is a join token, checked when the enrolment commits.
- ``token``: API tokens only (checked before this function).

A machine credential presented anywhere else is answered 403; a revoked one 401
everywhere. See ``superagent.rpc.credentials`` for how credentials are made.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from superagent.rpc.credentials import credential_hash, equal

if TYPE_CHECKING:
    from superagent.coordinator.host import ApiHost
    from superagent.coordinator.state import ClusterState

TOKEN_PREFIX = "sa_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(header: str) -> str | None:
    """The credential of an ``Authorization: Bearer X`` header value, or None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def token_name(credential: str | None, tokens: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The name of the token ``credential`` is, or None."""
    if credential is None:
        return None
    digest = token_hash(credential)
    found = None
    for name, record in tokens.items():  # no early exit: timing says nothing about which
        if hmac.compare_digest(digest, str(record["sha256"])):
            found = name
    return found


def write_private(path: Path, text: str) -> None:
    """Write a credential readable by its owner only, whatever the file's mode was before
    (written beside it and renamed into place, so a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise



@dataclass(frozen=True, kw_only=True)
class Access:
    """Who a machine's request comes from (``actor``), or why it is refused."""

    actor: str = ""
    status: int = 401
    code: str = "unauthorized"
    detail: str = ""


_MISSING = {
    "secret": "the coordinators' secret is required",
    "node": "a participant credential is required",
    "any": "a valid API token or participant credential is required",
    "join": "a join token is required (superagent nodes join-token)",
    "token": "a valid API token is required",
}
_ENROLLED = ("node {node!r} is enrolled: it calls with its own credential, not the shared"
             " participant secret")
_NODE_SCOPE = ("a participant credential may only register, heartbeat and fetch the"
               " artifacts of its own apps")


def authenticate_machine(host: ApiHost, auth: str, params: Mapping[str, str],
                         credential: str | None) -> Access:
    """The access of a request not made with an API token (see the module docstring)."""
    refused = Access(detail=_MISSING.get(auth, _MISSING["token"]))
    if credential is None:
        return refused
    config = host.config
    if auth in ("secret", "node", "any") and equal(credential, config.secret):
        return Access(actor="cluster")
    if auth in ("node", "any") and equal(credential, config.participant_secret):
        named = params.get("node", "")
        if named and host.read(lambda s: s.trust.enrolled(named)):
            return Access(status=403, code="forbidden", detail=_ENROLLED.format(node=named))
        return Access(actor="participants")
    node, revoked = host.read(lambda s: s.trust.node_of(credential_hash(credential)))
    if node is None:
        # a join token is checked by the state when the enrolment spends it
        return Access(actor="join") if auth == "join" else refused
    if revoked:
        return Access(code="node_revoked", detail=f"node {node!r}: its credential was"
                                                  " revoked")
    actor = f"node:{node}"
    forbidden = Access(status=403, code="forbidden", detail=_NODE_SCOPE)
    if auth == "node":
        target = params.get("node")
        return Access(actor=actor) if target in (None, node) else forbidden
    if auth == "any" and "sha256" in params:
        sha256 = params["sha256"]
        if host.read(lambda s: placed_artifact(s, node, sha256)):
            return Access(actor=actor)
        return Access(status=403, code="forbidden", detail=f"artifact {sha256} is not of an"
                      f" app placed on node {node!r}")
    return forbidden


def placed_artifact(state: ClusterState, node: str, sha256: str) -> bool:
    """Whether ``sha256`` is a release of an app placed on ``node``, or of a deploy that
    names ``node`` (a deploy prepares its nodes before the placement says so)."""
    if any(d.record.get("sha256") == sha256 and node in d.record.get("nodes", ())
           for d in state.deploys.values()):
        return True
    return any(r.sha256 == sha256 and node in state.placement.get(app, {})
               for app, releases in state.releases.items() for r in releases)
