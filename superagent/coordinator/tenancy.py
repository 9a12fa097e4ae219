"""The replicated side of teams: API token records, team quotas and what a team uses.

Theory of operation: ``ClusterState`` keeps ``tokens`` (name -> record) and ``quotas``
(team -> limits) and hands the commands that change them to the functions here, which,
like every state handler, validate first, then mutate, and return ``(result, outcome)``
for the audit log. They are pure and deterministic (a command's time is its ``at``).

A token record is ``{sha256, created_at, role, teams, expires_at, actor}``; a record
written before roles has only the first two and is the admin token's (``policy.
Principal.from_record`` reads it so). Revoking deletes the record: the hash is gone,
so the token authenticates nobody on any coordinator once the entry applies. The last
admin token cannot be revoked: nobody could make another.

A quota limits a team's apps, planned instances and their memory. ``usage`` plans
instances from each app's scale as the scheduler would place it: ``instances`` when the
scale gives a total, else ``per_node`` on every registered node of the scale's groups, and
an autoscaled app at its ``max`` (the autoscaler's own decisions are never refused);
memory is the instances times the app's ``[limits] memory`` (an app without a
memory limit counts none). Only apps that serve (or the one being changed) count: an app
created but never deployed runs nothing. An app scaled to zero counts in full although the
scheduler gives it no room while it is idle: a quota is a promise for when they all wake
(and the replicated state does not know which apps idle). ``check_quota`` raises ``QuotaExceeded``
naming the limit a create, release, deploy or scale would pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from superagent.coordinator import commands as cmd
from superagent.coordinator.errors import Conflict, Forbidden, QuotaExceeded, UnknownToken
from superagent.coordinator.policy import ADMIN, APPS_WRITE, Principal, decide


class _App(Protocol):
    @property
    def team(self) -> str: ...
    @property
    def current_release(self) -> str | None: ...
    @property
    def spec(self) -> dict[str, Any]: ...
    @property
    def scale(self) -> dict[str, Any] | None: ...


class _Node(Protocol):
    @property
    def groups(self) -> list[str]: ...


class ClusterState(Protocol):
    """What quotas and scopes read of ``state.ClusterState`` (which imports this module)."""

    @property
    def apps(self) -> Mapping[str, _App]: ...
    @property
    def nodes(self) -> Mapping[str, _Node]: ...
    @property
    def quotas(self) -> Mapping[str, Mapping[str, int | None]]: ...
    @property
    def tokens(self) -> Mapping[str, Mapping[str, Any]]: ...

QUOTA_KEYS = ("apps", "instances", "memory")


def add_token(tokens: dict[str, dict[str, Any]], c: cmd.AddToken
              ) -> tuple[dict[str, Any], str]:
    if c.name in tokens:
        raise Conflict(f"token {c.name!r} already exists")
    tokens[c.name] = {"sha256": c.sha256, "created_at": c.at, "role": c.role,
                      "teams": list(c.teams), "expires_at": c.expires_at, "actor": c.actor}
    scope = f" of {','.join(c.teams)}" if c.teams else ""
    return {"ok": True, "token": c.name, "role": c.role}, f"created {c.role}{scope}"


def revoke_token(tokens: dict[str, dict[str, Any]], c: cmd.RevokeToken
                 ) -> tuple[dict[str, Any], str]:
    if c.name not in tokens:
        raise UnknownToken(c.name)
    admins = [n for n, r in tokens.items() if r.get("role", ADMIN) == ADMIN]
    if admins == [c.name]:  # nobody could make tokens or change nodes any more
        raise Conflict(f"token {c.name!r} is the last admin token: create another admin"
                       " token first")
    del tokens[c.name]
    return {"ok": True, "token": c.name}, "revoked"


def set_quota(quotas: dict[str, dict[str, int | None]], c: cmd.SetQuota
              ) -> tuple[dict[str, Any], str]:
    limits = {key: getattr(c, key) for key in QUOTA_KEYS}
    if all(v is None for v in limits.values()):
        quotas.pop(c.team, None)
        return {"ok": True, "team": c.team, "quota": None}, "no quota"
    quotas[c.team] = limits
    return ({"ok": True, "team": c.team, "quota": dict(limits)},
            " ".join(f"{k}={v}" for k, v in limits.items() if v is not None))


def planned_instances(state: ClusterState, scale: dict[str, Any]) -> int:
    auto = scale.get("auto")
    if auto is not None:  # the autoscaler may take it up to its max at any time
        return int(auto["max"])
    if scale.get("instances") is not None:
        return int(scale["instances"])
    groups = set(scale.get("groups", ()))
    nodes = sum(1 for n in state.nodes.values() if groups & set(n.groups))
    return int(scale.get("per_node", 1)) * nodes


def _memory(spec: dict[str, Any]) -> int:
    memory = (spec.get("limits") or {}).get("memory")
    return int(memory) if isinstance(memory, int) else 0


def usage(state: ClusterState, team: str, *, app: str = "", spec: dict[str, Any] | None = None,
          scale: dict[str, Any] | None = None, new_app: bool = False) -> dict[str, int]:
    """What ``team`` uses, with ``app`` changed to ``spec`` and/or ``scale`` (its planned
    instances then count even if it does not serve yet); ``new_app`` counts one app more."""
    apps = instances = memory = 0
    for name, found in state.apps.items():
        if found.team != team:
            continue
        apps += 1
        if name != app and found.current_release is None:
            continue
        app_spec = spec if name == app and spec is not None else found.spec
        if name == app and scale is not None:
            app_scale = scale
        elif found.scale is not None:
            app_scale = found.scale
        else:
            app_scale = _spec_scale(app_spec)
        count = planned_instances(state, app_scale)
        instances += count
        memory += count * _memory(app_spec)
    return {"apps": apps + (1 if new_app else 0), "instances": instances, "memory": memory}


def _spec_scale(spec: dict[str, Any]) -> dict[str, Any]:
    found = spec.get("scale", {})
    scale = {"groups": list(found.get("groups", ["default"])),
             "per_node": found.get("per_node", 1), "instances": found.get("instances")}
    if "max" in found:
        scale["auto"] = {"max": found["max"]}
    return scale


def audit_team(state: ClusterState, command: cmd.Command) -> str | None:
    """The team a command is about, so the audit log can be filtered by team."""
    if isinstance(command, cmd.CreateApp | cmd.SetQuota):
        return command.team
    app = state.apps.get(getattr(command, "app", ""))
    return app.team if app is not None else None


def check_scope(state: ClusterState, command: cmd.Command) -> None:
    """Raise Forbidden when a token's write names an app of a team the token may not
    write: the API checked the team when the request came in, and this checks it again
    where the command applies, so an app created (or deleted and made again by another
    team) in between is never written by the wrong team. Actors that are not tokens (the
    leader's own work, participants, the cluster secret) are not scoped."""
    if isinstance(command, cmd.CreateApp):
        return  # its team is checked by the API against the token that names it
    record = state.tokens.get(command.actor)
    app = state.apps.get(getattr(command, "app", ""))
    if record is None or app is None:
        return
    decision = decide(Principal.from_record(command.actor, record), APPS_WRITE, app.team)
    if not decision.allowed:
        raise Forbidden(decision.reason, missing=decision.missing)


def check_quota(state: ClusterState, team: str, **change: Any) -> None:
    """Raise QuotaExceeded when ``team``'s usage after ``change`` (see ``usage``) passes
    one of its limits; limits already passed before count only if the change grows them."""
    quota = state.quotas.get(team)
    if not quota:
        return
    after = usage(state, team, **change)
    before = usage(state, team)
    for key in QUOTA_KEYS:
        limit = quota.get(key)
        if limit is not None and after[key] > limit and after[key] > before[key]:
            raise QuotaExceeded(team, key, after[key], limit)
