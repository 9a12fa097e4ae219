"""The API's views of apps and nodes as the fleet runs them, and the writes that change
where apps run: ``POST /api/v1/apps/{app}/scale`` and ``POST /api/v1/nodes/{node}/groups``.

Theory of operation: every view is built from one consistent read of the replicated
state (``ApiHost.read``) plus, on the leader only, the heartbeats it has received
(``liveness.status``): what each node reports running is in the leader's memory, not in
Raft, so a follower answers ``null`` for it (and ``"live": false`` in lists) rather than
something stale. The writes are single commands: ``SetScale`` (the leader's reconciler
sees the new effective scale, places the app and ends the scaling with ``FinishScale``)
and ``LabelNode``. A request is checked here field by field, so a bad one gets a 400
naming the field before anything is proposed; what depends on the state (unknown app,
a deploy running) is the state's answer (404, 409).

Routes are declared in ``api.ROUTES`` with the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from superagent.coordinator import commands as cmd
from superagent.coordinator.api_common import (
    Context,
    error,
    from_result,
    idempotency_key,
    read_json,
)
from superagent.coordinator.autoscale import auto_spec
from superagent.coordinator.errors import BadRequest
from superagent.coordinator.host import ApiHost
from superagent.coordinator.policy import ADMIN
from superagent.coordinator.state import ClusterState, Node
from superagent.manifest import MAX_INSTANCES, MAX_PER_NODE
from superagent.names import GROUP_NAME, group_name_problem

SCALE_FIELDS = ("per_node", "instances", "auto", "groups")
_GROUPS = {"type": "array", "minItems": 1, "uniqueItems": True,
           "items": {"type": "string", "pattern": f"^{GROUP_NAME.pattern}$"}}
# request bodies, for the OpenAPI document (the handlers check them field by field)
SCALE_BODY: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {"per_node": {"type": "integer", "minimum": 0, "maximum": MAX_PER_NODE},
                   "instances": {"type": "integer", "minimum": 1, "maximum": MAX_INSTANCES},
                   "auto": {"type": "object", "additionalProperties": False,
                            "required": ["min", "max", "target"],
                            "properties": {"min": {"type": "integer", "minimum": 0},
                                           "max": {"type": "integer", "minimum": 1},
                                           "target": {"type": "number",
                                                      "exclusiveMinimum": 0},
                                           "metric": {"enum": ["in_flight", "cpu"]}}},
                   "groups": _GROUPS},
    "oneOf": [{"required": ["per_node"]}, {"required": ["instances"]},
              {"required": ["auto"]}]}
LABEL_BODY: dict[str, Any] = {"type": "object", "additionalProperties": False,
                              "required": ["groups"], "properties": {"groups": _GROUPS}}
STOPPED = "stopped"  # a reported instance in this state holds no place on its node
IDLE = "idle"  # stopped by its node for idleness (scale to zero): holds no memory there


# ---------------------------------------------------------------------- reported instances
def reported(coordinator: ApiHost) -> dict[str, list[dict[str, Any]]] | None:
    """Node -> the instances its last heartbeat reported ({id, app, release, state, port});
    None when this coordinator does not lead (it has no heartbeats)."""
    liveness = coordinator.liveness
    if liveness.leader_since is None:
        return None
    found: dict[str, list[dict[str, Any]]] = {}
    for node, status in liveness.status.items():
        listed = _instances(status)
        if listed is not None:
            found[node] = listed
    return found


def _instances(status: object) -> list[dict[str, Any]] | None:
    """The instances of one heartbeat status; None when it has no list of them."""
    entries = status.get("instances") if isinstance(status, dict) else None
    if not isinstance(entries, list):
        return None
    # a heartbeat is the participant's word: keep the documented keys, nothing else
    return [{**{key: e.get(key) for key in ("id", "app", "release", "state", "port")},
             "unenforced": _names(e.get("unenforced"))}
            for e in entries if isinstance(e, dict)]


def _names(value: object) -> list[str]:
    """The permissions a participant says it cannot enforce ([] from one that predates
    them, or for anything that is not a list of names)."""
    if not isinstance(value, list):
        return []
    return [str(v) for v in value if isinstance(v, str)]


# ---------------------------------------------------------------------- views
def app_view(state: ClusterState, name: str,
             instances: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """An app with its effective scale, placement and scaling; ``instances`` (from
    ``reported``) adds, per node, what runs of it there (null: not known here)."""
    app = state.apps[name]
    releases = state.releases.get(name, [])
    placement = state.placement.get(name, {})
    doc: dict[str, Any] = {
        "name": name, "team": app.team, "spec": app.spec, "created_at": app.created_at,
        "updated_at": app.updated_at, "releases": len(releases),
        "latest_release": f"r{releases[-1].number}" if releases else None,
        "current_release": app.current_release,
        "scale": state.effective_scale(name), "scale_override": app.scale is not None,
        "placement": placement,
        "placement_reason": state.placement_reason.get(name, ""),
        "scaling": app.scaling, "last_scaling": app.last_scaling,
        "instances": None, "state": None,
    }
    if instances is not None:
        doc["instances"] = {
            node: found for node in sorted({*placement, *instances})
            if (found := [i for i in instances.get(node, []) if i["app"] == name])
            or node in placement}
        doc["state"] = app_state([i["state"] for found in doc["instances"].values()
                                  for i in found])
    return doc


def app_state(states: list[Any]) -> str | None:
    """An app's state from its reported instances' states: ``serving`` when one serves,
    else ``starting`` when one starts, else ``idle`` when scaled to zero; None when
    nothing of it is reported."""
    if any(s in ("ready", "unhealthy") for s in states):
        return "serving"
    if "starting" in states:
        return "starting"
    if IDLE in states:
        return IDLE
    return None


def node_view(coordinator: ApiHost, node: Node, now: float,
              shown: Callable[[str], bool] | None = None, credential: str = ""
              ) -> dict[str, Any]:
    """A node's replicated record (groups, labeled, capacity, lifecycle, up), how it
    authenticates (``credential``: enrolled, revoked, or shared secret before it enrolled)
    and, on the leader, its last heartbeat: its age, the status and the instances it reports.
    ``shown(app)`` keeps the instances and routes of the apps the caller may see (the
    count of instances used stays the node's own: it tells how full the node is)."""
    doc = asdict(node)
    doc["credential"] = credential or None
    leading = coordinator.liveness.leader_since is not None
    doc["heartbeat_age"] = coordinator.liveness.age(node.name, now) if leading else None
    status = coordinator.liveness.status.get(node.name) if leading else None
    listed = (_instances(status) or []) if leading else None
    doc["instances_used"] = (None if listed is None
                             else sum(1 for i in listed if i["state"] not in (STOPPED, IDLE)))
    if shown is not None and isinstance(status, dict):
        status = {**status,
                  "instances": [i for i in status.get("instances") or []
                                if isinstance(i, dict) and shown(str(i.get("app")))],
                  "routes": {app: ids for app, ids in (status.get("routes") or {}).items()
                             if shown(app)}}
        listed = [i for i in listed or [] if shown(str(i["app"]))]
    doc["status"], doc["instances"] = status, listed
    return doc


def credential_of(state: ClusterState, node: str) -> str:
    """"revoked", "enrolled", or "shared secret" (a node registered before machine
    credentials, see docs/coordinator.md "Migrating")."""
    if state.trust.revoked(node):
        return "revoked"
    return "enrolled" if state.trust.enrolled(node) else "shared secret"


def _shown(ctx: Context, state: ClusterState) -> Callable[[str], bool] | None:
    """None for a caller who sees every app, else whether it sees the app of a name (an
    app no longer in the state is nobody's but an admin's)."""
    if ctx.principal is None or ctx.principal.role == ADMIN:
        return None
    teams = {name: app.team for name, app in state.apps.items()}
    return lambda app: app in teams and ctx.sees(teams[app])


def now() -> float:
    return trio.current_time()


# ---------------------------------------------------------------------- handlers
async def list_nodes(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    at = now()
    nodes = c.read(lambda s: [node_view(c, n, at, _shown(ctx, s), credential_of(s, n.name))
                              for _, n in sorted(s.nodes.items())])
    return JSONResponse({"nodes": nodes, "live": c.is_leader()})


async def get_node(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    name, at = request.path_params["node"], now()
    found = c.read(lambda s: node_view(c, s.nodes[name], at, _shown(ctx, s),
                                       credential_of(s, name))
                   if name in s.nodes else None)
    if found is None:
        return error(404, "unknown_node", f"node {name!r} is not registered")
    return JSONResponse(found)


async def label_node(request: Request, ctx: Context) -> Response:
    """Set a node's groups; they stay when the node registers again with others."""
    c = ctx.coordinator
    body = await read_json(request)
    _only(body, ("groups",))
    if "groups" not in body:
        raise BadRequest("missing field 'groups' (a list of group names)")
    command = c.command(cmd.LabelNode, actor=ctx.actor, key=idempotency_key(request),
                        node=request.path_params["node"], groups=_groups(body["groups"]))
    return from_result(await c.submit(command))


async def scale_app(request: Request, ctx: Context) -> Response:
    """``{"per_node": k}``, ``{"instances": K}`` or ``{"auto": {"min", "max", "target",
    "metric"?}}``, with optional ``"groups"`` (default: the app's current groups): 202 with
    the scaling the leader now carries out."""
    c = ctx.coordinator
    app = request.path_params["app"]
    body = await read_json(request)
    _only(body, SCALE_FIELDS)
    per_node, instances, auto = body.get("per_node"), body.get("instances"), body.get("auto")
    if sum(x is not None for x in (per_node, instances, auto)) != 1:
        raise BadRequest("give exactly one of 'per_node' (instances on every node of the"
                         " groups), 'instances' (in total) and 'auto' (autoscaling:"
                         " {min, max, target, metric})")
    if per_node is not None:
        _count("per_node", per_node, 0, MAX_PER_NODE)
    if instances is not None:
        _count("instances", instances, 1, MAX_INSTANCES)
    if auto is not None:
        if not isinstance(auto, dict):
            raise BadRequest(f"field 'auto' must be an object, got {auto!r}")
        _only(auto, ("min", "max", "target", "metric"))
        try:
            auto = auto_spec(auto).to_doc()
        except KeyError as exc:
            raise BadRequest(f"field 'auto' needs {exc}") from None
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"field 'auto': {exc}") from None
    current = c.read(lambda s: s.effective_scale(app) if app in s.apps else None)
    if current is None:
        return error(404, "unknown_app", f"app {app!r} does not exist")
    groups = _groups(body["groups"]) if "groups" in body else tuple(current["groups"])
    command = c.command(cmd.SetScale, actor=ctx.actor, key=idempotency_key(request), app=app,
                        groups=groups, per_node=1 if per_node is None else per_node,
                        instances=instances, auto=auto)
    result = await c.submit(command)
    if not result.get("ok"):
        return from_result(result)
    view = c.read(lambda s: app_view(s, app) if app in s.apps else None)
    scaling = view["scaling"] if view else None
    if scaling is None or scaling.get("id") != result["scale_id"]:  # already over
        scaling = view["last_scaling"] if view else None
    return JSONResponse({"ok": True, "app": app, "scale_id": result["scale_id"],
                         "scale": result["scale"], "scaling": scaling}, status_code=202)


# ---------------------------------------------------------------------- checks
def _only(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}: expected {list(allowed)}")


def _count(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"field {name!r} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise BadRequest(f"field {name!r} must be {low}-{high}, got {value}")


def _groups(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
        raise BadRequest(f"field 'groups' must be a list of group names, got {value!r}")
    if not value:
        raise BadRequest("field 'groups' must name at least one group")
    for group in value:
        problem = group_name_problem(group)
        if problem is not None:
            raise BadRequest(f"field 'groups': {problem}")
    if len(set(value)) != len(value):
        raise BadRequest("field 'groups' lists a group twice")
    return tuple(value)
