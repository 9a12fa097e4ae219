"""The operator's commands for machine trust: ``nodes join-token`` and ``nodes revoke``.

``superagent nodes join-token [--expires 1h] [--uses N] [--node NAME]`` asks for a join
token (``POST /api/v1/nodes/join-tokens``) and prints it (the cluster keeps only its hash,
so it is shown this once). By default it enrols one machine within an hour; ``--uses 0``
lets it enrol any number until it expires; ``--node`` restricts it to one node name and
lets it replace that node's credential (a reinstalled or revoked machine).

``superagent nodes revoke NODE`` revokes a node's credential
(``POST /api/v1/nodes/{node}/revoke``): every call it makes is refused from then on and
it gets no more work.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from superagent.client import ClientError
from superagent.client_cli import client_of, command, emit
from superagent.config import parse_duration


def _join_token(args: argparse.Namespace) -> int:
    try:
        parse_duration(args.expires)
    except ValueError as exc:
        raise ClientError(f"--expires: {exc}") from None
    if args.uses < 0:
        raise ClientError("--uses must be 0 (until it expires) or more")
    body: dict[str, Any] = {"expires": args.expires, "uses": args.uses}
    if args.node:
        body["node"] = args.node
    doc = client_of(args).post("/api/v1/nodes/join-tokens", json=body)
    return emit(args, doc, _render_token)


def _render_token(doc: dict[str, Any]) -> str:
    left = max(0.0, doc["expires_at"] - time.time())
    uses = "any number of machines" if doc["uses"] == 0 else (
        "1 machine" if doc["uses"] == 1 else f"{doc['uses']} machines")
    node = f" (node {doc['node']} only)" if doc.get("node") else ""
    return (f"{doc['token']}\n# enrols {uses}{node} within {left / 60:.0f} min:"
            f" superagent participant --join-token TOKEN --coordinator URL ...")


def _revoke(args: argparse.Namespace) -> int:
    doc = client_of(args).post(f"/api/v1/nodes/{args.node}/revoke", json={})
    return emit(args, doc, lambda d: f"{d['node']}: revoked"
                + ("" if d.get("changed", True) else " (already)"))


def add_trust_commands(nested: Any) -> None:
    """``join-token`` and ``revoke`` under the ``nodes`` parser's sub-commands."""
    with command(nested, "join-token", "make a token that enrols a machine (shown once)",
                 _join_token, nested=True) as token:
        token.add_argument("--expires", default="1h", metavar="DURATION",
                           help="how long it is valid (default 1h)")
        token.add_argument("--uses", type=int, default=1, metavar="N",
                           help="machines it enrols (default 1; 0: any number until it"
                                " expires)")
        token.add_argument("--node", metavar="NAME",
                           help="only this node; may replace its credential (re-enrolment)")
    with command(nested, "revoke", "revoke a node's credential: its calls are refused and it"
                 " gets no more work", _revoke, nested=True) as revoke:
        revoke.add_argument("node")
