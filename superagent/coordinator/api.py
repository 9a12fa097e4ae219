"""The coordinator's HTTP API: JSON under ``/api/v1``, Starlette on hypercorn's trio worker.

Authentication, by route (``ROUTES`` is the table, and the OpenAPI document is built from it):

- ``token``: ``Authorization: Bearer <API token>``; the token's name is the audit log's
  actor, and the route's ``permission`` is checked against the token's role and teams
  by the one policy (``policy.decide``, called by ``api_access.token_access``).
  Without that header, the dashboard's session cookie stands for the token it was made
  from (``ui.web.Dashboard.session_credential``; writes also need its CSRF header).
- ``secret``: the coordinators' secret, for peer coordinators only.
- ``node``: a participant's machine credential, for its own node only.
- ``any``: an API token, or a machine credential for the artifacts of its own apps.
- ``join``: a join token (enrolment).
- ``none``: ``/healthz``, ``/metrics`` and the OpenAPI document.

``auth.authenticate_machine`` decides everything but API tokens: a machine credential is
refused with 403 outside its scope and 401 everywhere once revoked.

Errors are JSON ``{"error": code, "detail": message}`` with the status the error names;
a missing, wrong, expired or revoked credential is a 401 before anything else is looked
at, and a token whose role or teams do not allow the route a 403 naming what is missing.
Every response carries ``X-Superagent-Leader`` (the leader's API URL) when a leader is
known, so a client can go straight to it. Writes on a follower are not redirected:
``Coordinator.submit`` forwards the command to the leader, and the two participant calls
whose effect lives in the leader's memory (register, heartbeat) are forwarded as they are.

``ROUTES`` is the one place routes are declared. Handlers live here and beside it:
``api_fleet`` (app and node views, scale, node labels), ``api_nodes`` (register,
heartbeat, drain / offline / online), ``api_deploys`` (a deploy's view and stream,
cancel, rollback), ``api_access`` (the token check, tokens, team quotas, the audit log),
``api_trust`` (join tokens, enrolment, revoke), ``api_logs`` and ``api_debug`` (logs,
debug sessions, traces), ``api_traffic`` (the proxies' counters); the dashboard's
pages, login and logout (``/ui``) are ``ui.web``'s; ``api_common`` has what they share
(context, JSON errors, request bodies, idempotency keys, forwarding to the leader).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from superagent import __version__
from superagent.coordinator import commands as cmd
from superagent.coordinator import policy as perm
from superagent.coordinator.api_access import (
    QUOTA_BODY,
    TOKEN_BODY,
    audit,
    create_token,
    list_teams,
    list_tokens,
    new_app_team,
    revoke_token,
    set_quota,
    token_access,
    upload_team,
    whoami,
)
from superagent.coordinator.api_cluster import (
    add_member,
    backup,
    members_view,
    remove_member,
    restore,
)
from superagent.coordinator.api_common import (
    Context,
    bad_request,
    error,
    from_result,
    idempotency_key,
    query_flag,
    read_json,
    unrouted,
)
from superagent.coordinator.api_debug import DEBUG_BODY, close_debug, open_debug, trace
from superagent.coordinator.api_deploys import (
    cancel_deploy,
    deploy_events,
    deploy_options,
    get_deploy,
    list_deploys,
    rollback,
)
from superagent.coordinator.api_fleet import (
    LABEL_BODY,
    SCALE_BODY,
    app_view,
    get_node,
    label_node,
    list_nodes,
    reported,
    scale_app,
)
from superagent.coordinator.api_logs import app_logs
from superagent.coordinator.api_nodes import (
    heartbeat,
    node_lifecycle,
    node_running,
    register_node,
)
from superagent.coordinator.api_openapi import openapi_document
from superagent.coordinator.api_traffic import traffic
from superagent.coordinator.api_trust import (
    ENROL_BODY,
    JOIN_TOKEN_BODY,
    create_join_token,
    enrol_node,
    revoke_node,
)
from superagent.coordinator.auth import authenticate_machine, bearer
from superagent.coordinator.deploy.runner import begin_deploy
from superagent.coordinator.errors import (
    BadArchive,
    CoordinatorError,
    Forbidden,
)
from superagent.coordinator.host import APPLIED_INDEX, PROPOSE_TIMEOUT, ApiHost
from superagent.coordinator.state import ClusterState
from superagent.coordinator.ui.web import Dashboard
from superagent.errors import ConfigError
from superagent.jsonbody import parse_json, read_body
from superagent.manifest import parse_manifest, spec_to_json
from superagent.names import APP_NAME, is_app_name, is_sha256

log = structlog.get_logger(__name__)

MAX_COMMAND = 16 * 1024**2  # bytes of a forwarded command (a deploy record carries logs)
MAX_COMMAND_DEPTH = 64  # nesting of a forwarded command (a spec inside a record inside it)
MEMBER_BODY: dict[str, Any] = {
    "type": "object", "required": ["id", "raft"],
    "properties": {"id": {"type": "string"}, "raft": {"type": "string"}}}
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD"})  # counted apart in /metrics

Handler = Callable[[Request, "Context"], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    auth: str  # token | secret | node | any | join | none
    summary: str
    handler: Handler
    status: int = 200  # the success status, for the OpenAPI document
    body: dict[str, Any] | None = None  # the JSON schema of the request body, if it has one
    permission: str = ""  # what a token needs (policy.PERMISSIONS), for token and any


def from_exception(exc: CoordinatorError | ConfigError) -> JSONResponse:
    if isinstance(exc, ConfigError):
        return error(400, "bad_manifest", str(exc))
    if isinstance(exc, BadArchive):
        return error(exc.status_hint, exc.code, str(exc), member=exc.member)
    if isinstance(exc, Forbidden):
        return error(exc.status_hint, exc.code, str(exc), missing=exc.missing)
    return error(exc.status_hint, exc.code, str(exc))


# ---------------------------------------------------------------------- views of the state
def release_view(release: Any) -> dict[str, Any]:
    doc = asdict(release)
    doc["name"] = f"r{release.number}"
    return doc


# ---------------------------------------------------------------------- handlers
async def healthz(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    status = c.raft.status()
    body = {"ok": status["leader"] is not None, "id": c.config.id,
            "role": "leader" if status["is_leader"] else "follower",
            "leader": c.leader_id(), "has_quorum": status["has_quorum"]}
    return JSONResponse(body, status_code=200 if body["ok"] else 503)


async def metrics(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    status = c.raft.status()
    counts = c.read(lambda s: (len(s.apps), sum(len(r) for r in s.releases.values()),
                               sum(1 for n in s.nodes.values() if n.up),
                               sum(1 for n in s.nodes.values() if not n.up)))
    lines = [
        "# HELP superagent_coordinator_is_leader 1 on the Raft leader.",
        "# TYPE superagent_coordinator_is_leader gauge",
        f"superagent_coordinator_is_leader {int(status['is_leader'])}",
        "# TYPE superagent_coordinator_has_quorum gauge",
        f"superagent_coordinator_has_quorum {int(status['has_quorum'])}",
        "# TYPE superagent_raft_term gauge",
        f"superagent_raft_term {status['term']}",
        "# TYPE superagent_raft_commit_index gauge",
        f"superagent_raft_commit_index {status['commit_index']}",
        "# TYPE superagent_apps gauge",
        f"superagent_apps {counts[0]}",
        "# TYPE superagent_releases gauge",
        f"superagent_releases {counts[1]}",
        "# TYPE superagent_nodes gauge",
        f'superagent_nodes{{up="true"}} {counts[2]}',
        f'superagent_nodes{{up="false"}} {counts[3]}',
        "# HELP superagent_api_requests_total API requests answered, by method and status.",
        "# TYPE superagent_api_requests_total counter",
    ]
    for (method, code), n in sorted(c.requests.items()):
        lines.append(f'superagent_api_requests_total{{method="{method}",status="{code}"}} {n}')
    return PlainTextResponse("\n".join(lines) + "\n",
                             media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi(request: Request, ctx: Context) -> Response:
    return JSONResponse(openapi_document(ROUTES))


async def cluster(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    status = c.raft.status()
    digest = c.read(lambda s: s.digest())
    return JSONResponse({
        "id": c.config.id, "leader": c.leader_id(), "leader_url": c.leader_url(),
        "term": status["term"], "commit_index": status["commit_index"],
        "last_applied": status["last_applied"], "has_quorum": status["has_quorum"],
        "healthy": status["has_quorum"] and status["leader"] is not None,
        "members": members_view(c), "state_digest": digest, "version": __version__,
        "artifacts_missing": len(await c.missing_artifacts()),
        "uptime": round(time.time() - c.started_at, 3)})


async def list_apps(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    instances = reported(c)
    apps = c.read(lambda s: [app_view(s, n, instances) for n in sorted(s.apps)
                             if ctx.sees(s.apps[n].team)])
    return JSONResponse({"apps": apps, "live": c.is_leader()})


async def create_app(request: Request, ctx: Context) -> Response:
    body = await read_json(request)
    team = new_app_team(ctx, body.pop("team", None))  # beside the manifest's tables
    spec = parse_manifest(body, source="request body")
    command = ctx.coordinator.command(cmd.CreateApp, actor=ctx.actor,
                                      key=idempotency_key(request), name=spec.name,
                                      spec=spec_to_json(spec), team=team)
    result = await ctx.coordinator.submit(command)
    if not result.get("ok"):
        return from_result(result)
    return JSONResponse(ctx.coordinator.read(lambda s: app_view(s, spec.name)), status_code=201)


async def get_app(request: Request, ctx: Context) -> Response:
    name = request.path_params["app"]
    c = ctx.coordinator
    instances = reported(c)
    found = c.read(lambda s: app_view(s, name, instances) if name in s.apps else None)
    if found is None:
        return error(404, "unknown_app", f"app {name!r} does not exist")
    return JSONResponse(found)


async def delete_app(request: Request, ctx: Context) -> Response:
    command = ctx.coordinator.command(cmd.DeleteApp, actor=ctx.actor,
                                      key=idempotency_key(request),
                                      app=request.path_params["app"])
    return from_result(await ctx.coordinator.submit(command))


async def list_releases(request: Request, ctx: Context) -> Response:
    name = request.path_params["app"]
    def view(s: ClusterState) -> list[dict[str, Any]] | None:
        if name not in s.apps:
            return None
        outcomes = s.release_outcomes(name)
        return [{**release_view(r), "current": f"r{r.number}" == s.apps[name].current_release,
                 "outcome": outcomes.get(f"r{r.number}")} for r in s.releases[name]]
    found = ctx.coordinator.read(view)
    if found is None:
        return error(404, "unknown_app", f"app {name!r} does not exist")
    return JSONResponse({"app": name, "releases": found})


async def create_release(request: Request, ctx: Context) -> Response:
    """Store the tarball on a majority of coordinators, then record the release (creating
    the app from the manifest when it does not exist yet)."""
    c = ctx.coordinator
    name = request.path_params["app"]
    if not is_app_name(name):
        return error(400, "bad_app_name", f"app name {name!r} does not match"
                                          f" {APP_NAME.pattern}")
    expected = request.query_params.get("sha256")
    if expected is not None:
        expected = expected.strip().lower()
        if not is_sha256(expected):
            return error(400, "bad_request", "query parameter 'sha256' must be 64 hex digits")
    options = deploy_options(request.query_params)  # refused before anything is stored
    team = upload_team(ctx, name, request.query_params.get("team"))
    force = query_flag(request, "force", default=False)
    deploy = query_flag(request, "deploy", default=True)
    if expected and not force:  # the client named the content: nothing need be stored
        unchanged = _unchanged(c, name, expected)
        if unchanged is not None:
            read = 0  # read (and drop) the body the client sends, so it sees the answer
            async for chunk in request.stream():  # rather than a reset connection
                read += len(chunk)
                if read > UNCHANGED_DRAIN_MAX:
                    break
            return unchanged
    sha256, size, spec = await c.store_release(request.stream(), app=name,
                                               expected_sha256=expected)
    if not force:
        unchanged = _unchanged(c, name, sha256)
        if unchanged is not None:
            return unchanged
    key = idempotency_key(request)
    spec_doc = spec_to_json(spec)
    if not c.read(lambda s: name in s.apps):
        created = await c.submit(c.command(cmd.CreateApp, actor=ctx.actor, name=name,
                                           spec=spec_doc, team=team))
        if not created.get("ok") and created.get("code") != "conflict":
            return from_result(created)
        upload_team(ctx, name, team)  # made meanwhile by another token: of a team of this one?
    result = await c.submit(c.command(cmd.AddRelease, actor=ctx.actor, key=key, app=name,
                                      sha256=sha256, size=size, spec=spec_doc))
    if not result.get("ok"):
        return from_result(result)
    release = f"r{result['release']}"
    doc: dict[str, Any] = {"ok": True, "app": name, "release": release, "sha256": sha256,
                           "size": size, "repeated": bool(result.get("repeated")),
                           "deploy_id": None}
    if not deploy:
        return JSONResponse(doc, status_code=201)
    try:
        started = await begin_deploy(c, app=name, release=release, actor=ctx.actor,
                                     key=f"{key}:deploy" if key else None, **options)
    except CoordinatorError as exc:
        return error(exc.status_hint, exc.code, f"release {release} recorded, not deployed:"
                     f" {exc}", release=release)
    if not started.get("ok"):
        return error(int(started.get("status", 409)), str(started.get("code")),
                     f"release {release} recorded, not deployed: {started.get('error')}",
                     release=release)
    return JSONResponse({**doc, "deploy_id": started["deploy_id"]}, status_code=201)


UNCHANGED_DRAIN_MAX = 1024**3  # bytes of an unchanged upload read before answering anyway


def _unchanged(c: ApiHost, app: str, sha256: str) -> Response | None:
    """The answer to an upload of what the app already serves (no release, no deploy), or
    None when the content is new; ``force=true`` deploys it again all the same."""
    serving = c.read(lambda s: None if any(d.app == app and d.running
                                           for d in s.deploys.values()) else next(
        (f"r{r.number}" for r in s.releases.get(app, [])
         if app in s.apps and f"r{r.number}" == s.apps[app].current_release
         and r.sha256 == sha256), None))  # while a deploy runs the normal path says so
    if serving is None:
        return None
    return JSONResponse({"ok": True, "app": app, "release": serving, "sha256": sha256,
                         "unchanged": True, "deploy_id": None,
                         "detail": f"unchanged: {serving} already serving this content"
                                   " (force=true deploys it again)"})


async def get_artifact(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    sha256 = request.path_params["sha256"]
    if request.headers.get("x-superagent-no-fetch") != "1":
        await c.ensure_artifact(sha256)
    size = (await c.store.stat(sha256)).size
    return StreamingResponse(c.store.open_chunks(sha256), media_type="application/octet-stream",
                             headers={"content-length": str(size),
                                      "x-superagent-sha256": sha256})


async def put_artifact(request: Request, ctx: Context) -> Response:
    artifact = await ctx.coordinator.store.put(request.stream(),
                                               expected_sha256=request.path_params["sha256"])
    return JSONResponse({"ok": True, "sha256": artifact.sha256, "size": artifact.size})


async def propose(request: Request, ctx: Context) -> Response:
    """A command forwarded by a follower; answered here only while this node leads."""
    c = ctx.coordinator
    if not c.is_leader():
        return error(421, "not_leader", f"{c.config.id} is not the leader")
    raw = await read_body(request, limit=MAX_COMMAND, error=bad_request)
    doc = parse_json(raw, error=bad_request, max_depth=MAX_COMMAND_DEPTH)
    if not isinstance(doc, dict):
        return error(400, "bad_command", "a command is a JSON object")
    command = cmd.decode_doc(doc)  # refuse garbage before it reaches the log
    result = await c.raft.propose(raw.decode(), PROPOSE_TIMEOUT)
    c.committed(command)
    # the follower waits until it has applied this far, so its next read sees the write
    return JSONResponse({**result, APPLIED_INDEX: c.raft.status()["commit_index"]})


ROUTES: tuple[Endpoint, ...] = (
    Endpoint("GET", "/healthz", "none", "Liveness; 503 while no leader is known", healthz),
    Endpoint("GET", "/metrics", "none", "Prometheus metrics", metrics),
    Endpoint("GET", "/api/v1/openapi.json", "none", "This API's OpenAPI document", openapi),
    Endpoint("GET", "/api/v1/cluster", "token",
             "Raft members, leader, term, commit index, health", cluster,
             permission=perm.CLUSTER_READ),
    Endpoint("GET", "/api/v1/whoami", "token",
             "The token's name, role, teams, expiry and the permissions of its role",
             whoami, permission=perm.CLUSTER_READ),
    Endpoint("GET", "/api/v1/traffic", "token",
             "The proxies' cumulative request counts and latency histograms per app (the"
             " apps the token sees), summed over machines: take two to get rates",
             traffic, permission=perm.APPS_READ),
    Endpoint("POST", "/api/v1/cluster/members", "token",
             "Add a coordinator ({\"id\": \"c4\", \"raft\": \"host:port\"}; start it first"
             " with --peers naming every member and itself)", add_member, body=MEMBER_BODY,
             permission=perm.CLUSTER_ADMIN),
    Endpoint("DELETE", "/api/v1/cluster/members/{coordinator}", "token",
             "Remove a coordinator (refused when the live members left would not be a"
             " majority)", remove_member, permission=perm.CLUSTER_ADMIN),
    Endpoint("GET", "/api/v1/backup", "token",
             "A consistent backup (tar) of the state and every artifact it names",
             backup, permission=perm.CLUSTER_ADMIN),
    Endpoint("POST", "/api/v1/restore", "token",
             "Restore a backup (the body) onto a new, empty cluster", restore,
             permission=perm.CLUSTER_ADMIN),
    Endpoint("GET", "/api/v1/apps", "token", "List apps (those of the token's teams)",
             list_apps, permission=perm.APPS_READ),
    Endpoint("POST", "/api/v1/apps", "token",
             "Create an app from a manifest document (superagent.toml as JSON; an optional"
             " \"team\" beside its tables)", create_app, permission=perm.APPS_WRITE),
    Endpoint("GET", "/api/v1/apps/{app}", "token", "One app", get_app, permission=perm.APPS_READ),
    Endpoint("DELETE", "/api/v1/apps/{app}", "token", "Delete an app", delete_app,
             permission=perm.APPS_WRITE),
    Endpoint("GET", "/api/v1/apps/{app}/releases", "token", "An app's releases",
             list_releases, permission=perm.APPS_READ),
    Endpoint("POST", "/api/v1/apps/{app}/releases", "token",
             "Upload a source tarball (body) as a new release (?team= for a new app)",
             create_release, permission=perm.APPS_WRITE),
    Endpoint("POST", "/api/v1/apps/{app}/scale", "token",
             "Scale an app at run time ({\"per_node\": k}, {\"instances\": K} or {\"auto\":"
             " {min, max, target, metric}}, optional \"groups\"): 202 with the scaling",
             scale_app, 202, SCALE_BODY, permission=perm.APPS_WRITE),
    Endpoint("GET", "/api/v1/apps/{app}/deploys", "token", "An app's deploys, newest first",
             list_deploys, permission=perm.APPS_READ),
    Endpoint("GET", "/api/v1/apps/{app}/deploys/{deploy}", "token",
             "A deploy: stage, per-node steps, timeline, logs", get_deploy,
             permission=perm.APPS_READ),
    Endpoint("GET", "/api/v1/apps/{app}/deploys/{deploy}/events", "token",
             "Server-sent events of a deploy's progress until it is done", deploy_events,
             permission=perm.APPS_READ),
    Endpoint("POST", "/api/v1/apps/{app}/deploys/{deploy}/cancel", "token",
             "Cancel a running deploy (it is compensated)", cancel_deploy,
             permission=perm.APPS_WRITE),
    Endpoint("POST", "/api/v1/apps/{app}/rollback", "token",
             "Deploy an earlier release again ({\"to\": \"rN\"}, default the previous)",
             rollback, permission=perm.APPS_WRITE),
    Endpoint("GET", "/api/v1/apps/{app}/logs", "token",
             "An app's output merged across its machines (?instance=&node=&stream=&since="
             "&grep=&request_id=&n=; follow=1: server-sent events, resumable with"
             " Last-Event-ID)", app_logs, permission=perm.APPS_READ),
    Endpoint("POST", "/api/v1/apps/{app}/debug", "token",
             "Open (or extend) a debug session on every machine running the app"
             " ({\"ttl\": seconds})", open_debug, body=DEBUG_BODY,
             permission=perm.APPS_WRITE),
    Endpoint("DELETE", "/api/v1/apps/{app}/debug", "token",
             "Close the app's debug session on every machine running it", close_debug,
             permission=perm.APPS_WRITE),
    Endpoint("GET", "/api/v1/trace/{request_id}", "token",
             "Every line carrying a request id across the machines (?app= to narrow it),"
             " the proxy's record among them", trace, permission=perm.APPS_READ),
    Endpoint("GET", "/api/v1/artifacts/{sha256}", "any", "A stored blob by sha256",
             get_artifact, permission=perm.ARTIFACTS_READ),
    Endpoint("GET", "/api/v1/nodes", "token",
             "Participants: groups, lifecycle, liveness, capacity, instances",
             list_nodes, permission=perm.NODES_READ),
    Endpoint("POST", "/api/v1/nodes/register", "node", "A participant joins", register_node),
    Endpoint("POST", "/api/v1/nodes/enrol", "join",
             "A machine exchanges a join token for its credential (bearer: the join token)",
             enrol_node, body=ENROL_BODY),
    Endpoint("POST", "/api/v1/nodes/join-tokens", "token",
             "Make a join token (shown once): {\"expires\": \"1h\", \"uses\": 1,"
             " \"node\": optional}", create_join_token, 201, JOIN_TOKEN_BODY,
             permission=perm.NODES_WRITE),
    Endpoint("GET", "/api/v1/nodes/{node}", "token", "One participant", get_node,
             permission=perm.NODES_READ),
    Endpoint("POST", "/api/v1/nodes/{node}/heartbeat", "node",
             "A participant's heartbeat", heartbeat),
    Endpoint("POST", "/api/v1/nodes/{node}/groups", "token",
             "Label a node with groups ({\"groups\": [...]}); they win over its own",
             label_node, body=LABEL_BODY, permission=perm.NODES_WRITE),
    Endpoint("GET", "/api/v1/nodes/{node}/running", "token",
             "What still runs or is placed on a node (a drain is over when nothing is)",
             node_running, permission=perm.NODES_READ),
    Endpoint("POST", "/api/v1/nodes/{node}/revoke", "token",
             "Revoke a node's credential: refused from now on, no more work", revoke_node,
             permission=perm.NODES_WRITE),
    Endpoint("POST", "/api/v1/nodes/{node}/{action}", "token",
             "Set a node's lifecycle: drain, offline or online", node_lifecycle,
             permission=perm.NODES_WRITE),
    Endpoint("GET", "/api/v1/audit", "token", "The audit log, newest first (?limit=N)",
             audit, permission=perm.AUDIT_READ),
    Endpoint("GET", "/api/v1/tokens", "token",
             "API tokens: name, role, teams, expiry, creation, last use (never the token)",
             list_tokens, permission=perm.TOKENS_ADMIN),
    Endpoint("POST", "/api/v1/tokens", "token",
             "Create an API token ({name, role, teams, expires_at}); shown once", create_token,
             201, TOKEN_BODY, permission=perm.TOKENS_ADMIN),
    Endpoint("DELETE", "/api/v1/tokens/{name}", "token", "Revoke an API token", revoke_token,
             permission=perm.TOKENS_ADMIN),
    Endpoint("GET", "/api/v1/teams", "token",
             "Teams the token sees: their apps, quota and usage", list_teams,
             permission=perm.APPS_READ),
    Endpoint("PUT", "/api/v1/teams/{team}/quota", "token",
             "Set a team's quota ({apps, instances, memory}; null lifts one)", set_quota,
             body=QUOTA_BODY, permission=perm.QUOTAS_WRITE),
    Endpoint("POST", "/api/v1/internal/propose", "secret",
             "A command forwarded by a follower", propose),
    Endpoint("PUT", "/api/v1/internal/artifacts/{sha256}", "secret",
             "Store a blob replicated by a peer", put_artifact),
)


def _endpoint(coordinator: ApiHost, e: Endpoint, dashboard: Dashboard
              ) -> Callable[[Request], Awaitable[Response]]:
    async def view(request: Request) -> Response:
        credential = bearer(request.headers.get("authorization", ""))
        if credential is None and e.auth in ("token", "any"):
            session = dashboard.session_credential(request)  # the dashboard's cookie
            if isinstance(session, Response):
                return session
            if session is not None:
                credential = session
                request = _with_bearer(request, session)  # what forward() passes on
        actor, principal = "", None
        if e.auth != "none":
            if e.auth in ("token", "any"):
                found = token_access(coordinator, credential, e.permission,
                                     request.path_params)
                if isinstance(found, Response):  # expired (401) or not allowed (403)
                    return found
                if found is not None:
                    actor, principal = found.name, found
            if not actor:
                machine = authenticate_machine(coordinator, e.auth, request.path_params,
                                               credential)
                if not machine.actor:
                    return error(machine.status, machine.code, machine.detail)
                actor = machine.actor
        try:
            return await e.handler(request, Context(coordinator, actor, principal))
        except (CoordinatorError, ConfigError) as exc:
            return from_exception(exc)
        except ClientDisconnect:  # e.g. a replica cancelled once a majority held the blob
            log.info("client went away mid-request", path=request.url.path)
            return error(400, "client_disconnected", "the client closed the request")
    view.__name__ = e.handler.__name__
    return view


def _with_bearer(request: Request, token: str) -> Request:
    """The request as if it had come with ``Authorization: Bearer token``."""
    headers = [(k, v) for k, v in request.scope["headers"]
               if k not in (b"authorization", b"cookie")]
    scope = {**request.scope, "headers": [*headers, (b"authorization",
                                                      f"Bearer {token}".encode())]}
    return Request(scope, request.receive)


class _LeaderHeader:
    """Adds ``X-Superagent-Leader`` and counts responses for ``/metrics``."""

    def __init__(self, app: ASGIApp, coordinator: ApiHost) -> None:
        self.app, self.coordinator = app, coordinator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                method = scope["method"] if scope["method"] in METHODS else "other"
                key = (method, int(message["status"]))
                counts = self.coordinator.requests
                counts[key] = counts.get(key, 0) + 1
                url = self.coordinator.leader_url()
                if url is not None:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"x-superagent-leader", url.encode())]}
            await send(message)

        await self.app(scope, receive, sending)


def api_app(coordinator: ApiHost) -> ASGIApp:
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("api handler failed", path=request.url.path)
        return error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    dashboard = Dashboard(coordinator)
    routes = [Route(e.path, _endpoint(coordinator, e, dashboard), methods=[e.method])
              for e in ROUTES]
    routes += [Route("/ui", dashboard.root, methods=["GET"]),
               Route("/ui/", dashboard.page, methods=["GET"]),
               Route("/ui/login", dashboard.login, methods=["POST"]),
               Route("/ui/logout", dashboard.logout, methods=["POST"]),
               Route("/ui/{name}", dashboard.page, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={Exception: unexpected,
                                                       HTTPException: unrouted})
    return _LeaderHeader(app, coordinator)
