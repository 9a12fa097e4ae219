"""The operator's commands about access: ``tokens`` and ``teams``.

``superagent tokens create NAME --role deployer --team shop [--team ...] [--expires 30d]``
makes an API token here (``auth.new_token``), sends it to the coordinator
(``POST /api/v1/tokens``), which replicates only its sha256, and prints it once on
stdout (the rest goes to stderr, so ``TOKEN=$(superagent tokens create ...)`` works).
Making it here rather than on the coordinator means a retry of the request (same
Idempotency-Key, same token) applies once. ``--expires`` is turned into an absolute time
here for the same reason. ``tokens list`` shows names, roles, teams, expiry, creation
and last use, never a token or its hash; ``tokens revoke NAME`` ends a token at once.

``superagent teams quota TEAM [--apps N] [--instances N] [--memory 4G]`` sets a team's
quota (options left out lift that limit; none at all removes the quota); ``teams list``
shows the teams the token sees with their quota and usage. All of these but
``teams list`` need an admin token.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
import time
from typing import Any

from superagent.client import ClientError
from superagent.client_cli import client_of, command, emit, showing, table
from superagent.config import parse_size

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# the coordinator's policy.ROLES and auth.new_token's form: the CLI does not load the coordinator
ROLES = ("admin", "deployer", "viewer")
TOKEN_PREFIX = "sa_"


def parse_expiry(value: str) -> float:
    """Seconds from ``30d``, ``12h``, ``90m``, ``2w``, ``3600s``; raises ClientError."""
    match = _DURATION.fullmatch(value.strip())
    if match is None or float(match.group(1)) <= 0:
        raise ClientError(f"--expires {value!r}: give a duration like 30d, 12h, 90m or 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _when(epoch: float | None) -> str | None:
    return None if epoch is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def _expiry(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return f"{_when(epoch)}{' (expired)' if epoch <= time.time() else ''}"


def render_tokens(doc: dict[str, Any]) -> str:
    rows = [(t["name"], t["role"], ",".join(t["teams"]) or ("*" if t["role"] != "deployer"
                                                             else "-"),
             _expiry(t["expires_at"]), _when(t["created_at"]), t.get("created_by"),
             _when(t.get("last_used")))
            for t in doc["tokens"]]
    out = table(rows, ("NAME", "ROLE", "TEAMS", "EXPIRES", "CREATED", "BY", "LAST USED"))
    return out + "\n* every team; LAST USED: on the coordinator that answered, since it started"


def _create(args: argparse.Namespace) -> int:
    if args.role == "deployer" and not args.team:
        raise ClientError("a deployer token needs at least one --team")
    body: dict[str, Any] = {"name": args.name, "role": args.role,
                            "teams": list(dict.fromkeys(args.team or [])),
                            "token": TOKEN_PREFIX + secrets.token_urlsafe(32)}
    if args.expires:
        body["expires_at"] = round(time.time() + parse_expiry(args.expires), 3)
    doc = client_of(args).post("/api/v1/tokens", json=body)
    if getattr(args, "json", False):
        return emit(args, doc, str)
    teams = f" of {','.join(doc['teams'])}" if doc.get("teams") else ""
    expiry = f", expires {_when(doc['expires_at'])}" if doc.get("expires_at") else ""
    print(f"token {doc['name']} ({doc['role']}{teams}{expiry}) created; it is shown once:",
          file=sys.stderr)
    print(doc["token"])
    return 0


def _revoke(args: argparse.Namespace) -> int:
    doc = client_of(args).request("DELETE", f"/api/v1/tokens/{args.name}",
                                  headers={"idempotency-key": secrets.token_hex(16)})
    return emit(args, doc, lambda d: f"token {d['token']} revoked")


def _count(name: str, value: int | None) -> int | None:
    if value is not None and value < 0:
        raise ClientError(f"--{name} must be 0 or more")
    return value


def _quota(args: argparse.Namespace) -> int:
    memory = None
    if args.memory is not None:
        try:
            memory = parse_size(args.memory)
        except ValueError as exc:
            raise ClientError(f"--memory: {exc}") from None
    body = {"apps": _count("apps", args.apps), "instances": _count("instances", args.instances),
            "memory": memory}
    doc = client_of(args).request("PUT", f"/api/v1/teams/{args.team}/quota", json=body)
    return emit(args, doc, lambda d: f"{d['team']}: " + (", ".join(
        f"{k} {_size(k, v)}" for k, v in d["quota"].items() if v is not None)
        if d.get("quota") else "no quota"))


def _size(key: str, value: int | None) -> str:
    if value is None:
        return "-"
    if key == "memory":
        for unit, size in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
            if value >= size and value % size == 0:
                return f"{value // size}{unit}"
    return str(value)


def render_teams(doc: dict[str, Any]) -> str:
    if not doc["teams"]:
        return "no teams"
    rows = []
    for t in doc["teams"]:
        quota, used = t.get("quota") or {}, t["usage"]
        rows.append((t["team"], *(f"{_size(k, used[k])}/{_size(k, quota.get(k))}"
                                  for k in ("apps", "instances", "memory"))))
    return table(rows, ("TEAM", "APPS", "INSTANCES", "MEMORY")) + "\n(used/quota; - no limit)"


def add_access_commands(sub: Any) -> None:
    """``tokens`` (create, list, revoke) and ``teams`` (list, quota)."""
    list_tokens = showing("/api/v1/tokens", render_tokens)
    list_teams = showing("/api/v1/teams", render_teams)
    with command(sub, "tokens", "API tokens: `tokens create|list|revoke` (admin; without an"
                 " action: list)", list_tokens) as tokens:
        pass
    actions = tokens.add_subparsers(dest="tokens_command", metavar="ACTION")
    with command(actions, "create", "make a token; it is printed once", _create,
                 nested=True) as create:
        create.add_argument("name")
        create.add_argument("--role", choices=ROLES, default="viewer",
                            help="admin (everything), deployer (its teams' apps) or viewer"
                                 " (read only; default)")
        create.add_argument("--team", action="append", metavar="TEAM",
                            help="a team the token acts for, repeatable (a viewer without"
                                 " one sees every team)")
        create.add_argument("--expires", metavar="DURATION",
                            help="the token ends after this long: 30d, 12h, 90m, 2w"
                                 " (default: never)")
    with command(actions, "list", "names, roles, teams, expiry, last use", list_tokens,
                 nested=True):
        pass
    with command(actions, "revoke", "end a token now", _revoke, nested=True) as revoke:
        revoke.add_argument("name")

    with command(sub, "teams", "teams with their quota and usage; `teams quota` sets one"
                 " (admin)", list_teams) as teams:
        pass
    team_actions = teams.add_subparsers(dest="teams_command", metavar="ACTION")
    with command(team_actions, "list", "teams the token sees", list_teams, nested=True):
        pass
    with command(team_actions, "quota", "set a team's quota (left-out limits are lifted)",
                 _quota, nested=True) as quota:
        quota.add_argument("team")
        quota.add_argument("--apps", type=int, metavar="N", help="apps the team may have")
        quota.add_argument("--instances", type=int, metavar="N",
                           help="instances its apps may plan in all")
        quota.add_argument("--memory", metavar="SIZE",
                           help="memory its instances may reserve in all ([limits] memory),"
                                " e.g. 4G")
