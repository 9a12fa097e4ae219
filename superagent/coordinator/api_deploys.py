"""The API's deploy routes: a deploy's view and progress stream, cancel, rollback, and the
deploy options a release upload or a rollback takes.

A deploy is a saga the leader's ``DeployRunner`` drives (``deploy/runner.py``); these
handlers only read its replicated record (``ClusterState.deploys``) or commit one command
(a ``cancel`` event, or the start of a rollback through ``begin_deploy``). The progress
stream polls the local state every ``SSE_POLL`` seconds and sends the deploy's view each
time it changes, until the runner has finished it.

Routes are declared in ``api.ROUTES`` with the rest.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from superagent.coordinator import commands as cmd
from superagent.coordinator.api_common import (
    Context,
    error,
    from_result,
    idempotency_key,
    read_json,
    truthy,
)
from superagent.coordinator.deploy.runner import begin_deploy
from superagent.coordinator.errors import BadRequest, UnknownDeploy
from superagent.coordinator.state import ClusterState

SSE_POLL, SSE_KEEPALIVE = 0.2, 5.0  # a deploy stream looks this often; comments when quiet
ROLLBACK_PARALLEL = 1000  # nodes a rollback rolls at once by default: all of them


def deploy_options(query: Any) -> dict[str, Any]:
    """max_parallel and drain_grace from the query string, checked."""
    options: dict[str, Any] = {}
    for name, kind, low, high in (("max_parallel", int, 1, 1000),
                                  ("drain_grace", float, 0.0, 3600.0)):
        raw = query.get(name)
        if raw is None:
            continue
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise BadRequest(f"{name} must be a number")
        try:
            value = kind(raw)
        except ValueError:
            raise BadRequest(f"{name} must be a number") from None
        if not low <= value <= high:
            raise BadRequest(f"{name} must be {low}..{high}")
        options[name] = value
    return options


def deploy_view(deploy: Any) -> dict[str, Any]:
    return {"deploy_id": deploy.deploy_id, "app": deploy.app, "actor": deploy.actor,
            "created_at": deploy.created_at, "updated_at": deploy.updated_at,
            "release": deploy.record["release"], "stage": deploy.record["stage"],
            "status": deploy.record["status"], "reason": deploy.record["reason"],
            "finished": deploy.finished,
            "steps": deploy.record["steps"], "logs": deploy.record["logs"],
            "history": deploy.history}


def _deploy(ctx: Context, request: Request) -> dict[str, Any]:
    app, deploy_id = request.path_params["app"], request.path_params["deploy"]
    found: dict[str, Any] | None = ctx.coordinator.read(
        lambda s: deploy_view(s.deploys[deploy_id])
        if deploy_id in s.deploys and s.deploys[deploy_id].app == app else None)
    if found is None:
        raise UnknownDeploy(app, deploy_id)
    return found


async def list_deploys(request: Request, ctx: Context) -> Response:
    app = request.path_params["app"]
    deploys = ctx.coordinator.read(
        lambda s: None if app not in s.apps else [
            {k: v for k, v in deploy_view(d).items() if k not in ("logs", "history", "steps")}
            for d in s.deploys.values() if d.app == app])
    if deploys is None:
        return error(404, "unknown_app", f"app {app!r} does not exist")
    return JSONResponse({"app": app, "deploys": deploys[::-1]})


async def get_deploy(request: Request, ctx: Context) -> Response:
    return JSONResponse(_deploy(ctx, request))


async def deploy_events(request: Request, ctx: Context) -> Response:
    """Server-sent events: the deploy's view each time it changes, until it is finished."""
    first = _deploy(ctx, request)

    async def stream() -> AsyncIterator[bytes]:
        last: dict[str, Any] | None = None
        view = first
        quiet = 0.0
        while True:
            if view != last:
                yield f"event: deploy\ndata: {json.dumps(view)}\n\n".encode()
                last, quiet = view, 0.0
                if view["finished"]:
                    return
            elif quiet >= SSE_KEEPALIVE:  # tells a client the stream is alive
                yield b": keep-alive\n\n"
                quiet = 0.0
            await trio.sleep(SSE_POLL)
            quiet += SSE_POLL
            try:
                view = _deploy(ctx, request)
            except UnknownDeploy:
                return

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


async def cancel_deploy(request: Request, ctx: Context) -> Response:
    c = ctx.coordinator
    view = _deploy(ctx, request)
    if view["finished"] or view["stage"] == "done":
        return error(409, "conflict", f"deploy {view['deploy_id']} is already {view['status']}")
    result = await c.submit(c.command(
        cmd.DeployEvent, actor=ctx.actor, key=idempotency_key(request), app=view["app"],
        deploy_id=view["deploy_id"],
        event={"type": "cancel", "reason": f"cancelled by {ctx.actor}"}))
    return from_result(result)


async def rollback(request: Request, ctx: Context) -> Response:
    """Deploy an earlier release again (default: the newest earlier one that served)."""
    c = ctx.coordinator
    app = request.path_params["app"]
    body = await read_json(request)
    to = body.get("to")

    def choose(s: ClusterState) -> tuple[str | None, list[str], list[str]] | None:
        if app not in s.apps:
            return None
        names = [f"r{r.number}" for r in s.releases[app]]
        current = s.apps[app].current_release
        served = [f"r{r.number}" for r in s.releases[app] if r.served]
        return current, names, served

    found = c.read(choose)
    if found is None:
        return error(404, "unknown_app", f"app {app!r} does not exist")
    current, names, served = found
    if to is None:  # the newest release before the current one that served
        earlier = [n for n in names[:names.index(current)] if n in served] \
            if current in names else []
        if not earlier:
            return error(409, "nothing_to_roll_back_to",
                         f"{app} has no release before {current or 'its first deploy'}"
                         " that served")
        to = earlier[-1]
    if not isinstance(to, str) or to not in names:
        return error(404, "unknown_release", f"{app} has no release {to!r}; it has {names}")
    if not truthy(body.get("force")) and to not in served:
        return error(409, "never_succeeded",
                     f"{app} {to} never served (no deploy of it succeeded); pass force to"
                     " roll back to it all the same", release=to)
    options = deploy_options(body)
    # a rollback is the way out of trouble: every node at once unless asked otherwise
    options.setdefault("max_parallel", ROLLBACK_PARALLEL)
    started = await begin_deploy(c, app=app, release=to, actor=ctx.actor,
                                 key=idempotency_key(request), **options)
    if not started.get("ok"):
        return from_result(started)
    return JSONResponse({**started, "app": app}, status_code=201)
