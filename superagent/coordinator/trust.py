"""Join tokens and machine credentials in the replicated state (pure, like ``state``).

Theory of operation. Three trust domains, never shared (docs/coordinator.md, "Trust"):
the coordinators' own secret (Raft, peer calls; never in this state), one credential per
participant machine, and API tokens. This module keeps the second kind:

- ``join_tokens``: sha256 of a join token -> ``{expires_at, uses, node, created_at}``.
  ``uses`` counts what is left (0: any number until ``expires_at``); a spent one-use token
  is removed, expired ones go whenever a token is added.
- ``credentials``: node -> ``{sha256, signal_key, enrolled_at, revoked}``. ``sha256`` is
  the hash of the machine's credential (what its requests bear); ``signal_key`` is what
  coordinators bear on signals to it (``superagent.rpc.credentials``).

``EnrolNode`` spends a join token and records the credential; a node name that already
has a live credential is refused unless the token was issued for that node (re-enrolling
a reinstalled machine). A repeat of the same enrolment (same credential) is answered as a
success without spending anything. ``RevokeNode`` marks the credential revoked and the
node down; a revoked node cannot register nor come up until it is enrolled again.

Lookups (``node_of``) compare every record in constant time, with no early exit.
"""

from __future__ import annotations

import copy
import hmac
from collections.abc import Mapping
from typing import Any

from superagent.coordinator import commands as cmd
from superagent.coordinator.errors import JoinRefused, NodeRevoked, UnknownNode

Result = dict[str, Any]


class Trust:
    """The join tokens and node credentials of a ``ClusterState``."""

    def __init__(self) -> None:
        self.join_tokens: dict[str, dict[str, Any]] = {}
        self.credentials: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        revoked = sum(1 for c in self.credentials.values() if c["revoked"])
        return (f"<Trust join_tokens={len(self.join_tokens)} credentials="
                f"{len(self.credentials)} revoked={revoked}>")

    # -- persistence ------------------------------------------------------------------
    def to_doc(self) -> dict[str, Any]:
        return {"join_tokens": copy.deepcopy(self.join_tokens),
                "credentials": copy.deepcopy(self.credentials)}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Trust:
        """From a state document; one written before trust existed has none."""
        trust = cls()
        trust.join_tokens = dict(doc.get("join_tokens", {}))
        trust.credentials = dict(doc.get("credentials", {}))
        return trust

    # -- reads -------------------------------------------------------------------------
    def node_of(self, credential_sha256: str) -> tuple[str | None, bool]:
        """(node, revoked) of the credential with this hash, or (None, False)."""
        found: tuple[str | None, bool] = (None, False)
        for node, record in self.credentials.items():  # no early exit: see the docstring
            if hmac.compare_digest(credential_sha256, str(record["sha256"])):
                found = (node, bool(record["revoked"]))
        return found

    def enrolled(self, node: str) -> bool:
        """Whether ``node`` has a credential (live or revoked): the shared secret of a
        migration no longer speaks for it."""
        record = self.credentials.get(node)
        return record is not None and bool(record["sha256"] or record["revoked"])

    def known_join(self, join_sha256: str, node: str, credential_sha256: str) -> bool:
        """Whether an enrolment could succeed: the token exists, or it repeats the node's
        enrolment (checked before proposing, so junk never reaches the Raft log)."""
        current = self.credentials.get(node)
        return join_sha256 in self.join_tokens or (
            current is not None and current["sha256"] == credential_sha256)

    def revoked(self, node: str) -> bool:
        record = self.credentials.get(node)
        return record is not None and bool(record["revoked"])

    def signal_key(self, node: str) -> str | None:
        """What coordinators bear on signals to ``node``; None when it has no live one."""
        record = self.credentials.get(node)
        if record is None or record["revoked"] or not record["signal_key"]:
            return None
        return str(record["signal_key"])

    def check_not_revoked(self, node: str) -> None:
        if self.revoked(node):
            raise NodeRevoked(f"node {node!r} is revoked: enrol it again with a join token"
                              " issued for it (superagent nodes join-token --node"
                              f" {node})", node=node)

    # -- commands ----------------------------------------------------------------------
    def add_join_token(self, c: cmd.AddJoinToken) -> tuple[Result, str]:
        for digest in [d for d, t in self.join_tokens.items() if t["expires_at"] <= c.at]:
            del self.join_tokens[digest]
        self.join_tokens[c.sha256] = {"expires_at": c.expires_at, "uses": c.uses,
                                      "node": c.node, "created_at": c.at}
        return ({"ok": True, "expires_at": c.expires_at, "uses": c.uses, "node": c.node},
                f"join token for {c.node or 'any node'}, {c.uses or 'unlimited'} use(s)")

    def enrol(self, c: cmd.EnrolNode) -> tuple[Result, str]:
        current = self.credentials.get(c.node)
        if current is not None and current["sha256"] == c.credential_sha256 \
                and not current["revoked"]:
            return {"ok": True, "node": c.node, "repeated": True}, "enrolled again (same)"
        token = self.join_tokens.get(c.join_sha256)
        if token is None:
            raise JoinRefused("the join token is unknown or already used: ask an admin for"
                              " a new one (superagent nodes join-token)", node=c.node)
        if token["expires_at"] <= c.at:
            raise JoinRefused("the join token has expired: ask an admin for a new one"
                              " (superagent nodes join-token)", node=c.node)
        if token["node"] and token["node"] != c.node:
            raise JoinRefused(f"the join token was issued for node {token['node']!r},"
                              f" not {c.node!r}", node=c.node)
        if current is not None and not current["revoked"] and not token["node"]:
            raise JoinRefused(f"node {c.node!r} is already enrolled: revoke it first"
                              f" (superagent nodes revoke {c.node}) or issue a join token"
                              f" for it (superagent nodes join-token --node {c.node})",
                              node=c.node)
        if token["uses"] == 1:
            del self.join_tokens[c.join_sha256]
        elif token["uses"] > 1:
            token["uses"] -= 1
        self.credentials[c.node] = {"sha256": c.credential_sha256, "signal_key": c.signal_key,
                                    "enrolled_at": c.at, "revoked": False}
        return {"ok": True, "node": c.node}, "enrolled"

    def revoke(self, c: cmd.RevokeNode, nodes: Mapping[str, Any]) -> tuple[Result, str]:
        if c.node not in nodes and c.node not in self.credentials:
            raise UnknownNode(c.node)
        record = self.credentials.setdefault(c.node, {"sha256": "", "signal_key": "",
                                                      "enrolled_at": c.at, "revoked": False})
        was = bool(record["revoked"])
        record["revoked"] = True
        node = nodes.get(c.node)
        if node is not None and node.up:
            node.up, node.changed_at = False, c.at
        return ({"ok": True, "node": c.node, "changed": not was},
                "already revoked" if was else "revoked")
