"""The proxy's admin API (Starlette on hypercorn's trio worker).

Prometheus text at ``/metrics`` and the interface the participant agent uses to
drain instances and the node. Figures and in-flight counts are the sum over all
workers, asked over their control sockets at request time.

  GET  /metrics                          Prometheus text
  GET  /-/healthz                        200 while the admin server is up
  GET  /api/v1/status                    snapshot version, workers, node draining
  GET  /api/v1/instances                 every instance: app, in_flight, draining, pool_idle
  GET  /api/v1/instances/{id}            one instance (404 if unknown)
  POST /api/v1/instances/{id}/drain      {"draining": true|false}; answers in_flight
  POST /api/v1/node/drain                {"draining": true|false}; /-/healthz answers 503
  POST /api/v1/reload                    re-read the config file
"""

from __future__ import annotations

import json
from collections.abc import Sized
from typing import Any, Protocol

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from superagent.httpserver import serve_app
from superagent.proxy.config import ProxyConfig
from superagent.proxy.metrics import render
from superagent.proxy.snapshot import RoutingSnapshot


class AdminTarget(Protocol):
    """What the admin API needs of the process it serves (``ProxyMaster`` is one): the
    admin module depends on this, not on the master."""

    snapshot: RoutingSnapshot  # in force
    node_draining: bool  # set by POST /api/v1/node/drain

    @property
    def config_path(self) -> str | None: ...

    @property
    def process(self) -> ProxyConfig: ...

    @property
    def workers(self) -> Sized: ...

    async def stats(self) -> tuple[dict[str, Any], int]:
        """The workers' figures merged, and how many workers answered."""
        ...

    async def broadcast(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """Send a control message to every worker; the replies of those that answered."""
        ...

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file; ``{"ok": ...}`` and the version or the error."""
        ...


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


async def _draining_flag(request: Request) -> bool:
    """The ``draining`` field of an optional JSON body (default true); raises ValueError."""
    raw = await request.body()
    if not raw.strip():
        return True
    try:
        body = json.loads(raw)
    except ValueError:
        raise ValueError("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    unknown = set(body) - {"draining"}
    if unknown:
        raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
    value = body.get("draining", True)
    if not isinstance(value, bool):
        raise ValueError("'draining' must be true or false")
    return value


def admin_app(master: AdminTarget) -> Starlette:
    async def metrics(request: Request) -> Response:
        merged, answered = await master.stats()
        return PlainTextResponse(render(merged, workers=answered),
                                 media_type="text/plain; version=0.0.4")

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def status(request: Request) -> Response:
        _merged, answered = await master.stats()
        return JSONResponse({
            "version": master.snapshot.version,
            "workers": len(master.workers),
            "workers_answering": answered,
            "node_draining": master.node_draining,
            "parser": master.process.parser,
            "listeners": [{"host": lst.host, "port": lst.port, "app": lst.app}
                          for lst in master.snapshot.listeners],
        })

    async def instances(request: Request) -> Response:
        merged, _ = await master.stats()
        return JSONResponse({"instances": [{"id": k, **v} for k, v in
                                           sorted(merged["instances"].items())]})

    async def instance(request: Request) -> Response:
        inst_id = request.path_params["id"]
        merged, _ = await master.stats()
        info: dict[str, Any] | None = merged["instances"].get(inst_id)
        if info is None:
            return _error(404, f"unknown instance {inst_id!r}")
        return JSONResponse({"id": inst_id, **info})

    async def drain(request: Request) -> Response:
        inst_id = request.path_params["id"]
        try:
            draining = await _draining_flag(request)
        except ValueError as exc:
            return _error(400, str(exc))
        if inst_id not in master.snapshot.instance_ids():
            return _error(404, f"unknown instance {inst_id!r}")
        replies = await master.broadcast({"type": "drain", "instance": inst_id,
                                          "draining": draining})
        in_flight = sum(r.get("in_flight", 0) for r in replies if r.get("ok"))
        return JSONResponse({"id": inst_id, "draining": draining, "in_flight": in_flight,
                             "workers": len(replies)})

    async def node_drain(request: Request) -> Response:
        try:
            draining = await _draining_flag(request)
        except ValueError as exc:
            return _error(400, str(exc))
        master.node_draining = draining
        replies = await master.broadcast({"type": "node", "draining": draining})
        return JSONResponse({"draining": draining, "workers": len(replies)})

    async def reload(request: Request) -> Response:
        result = await master.reload()
        return JSONResponse(result, status_code=200 if result["ok"] else 422)

    return Starlette(routes=[
        Route("/metrics", metrics),
        Route("/-/healthz", healthz),
        Route("/api/v1/status", status),
        Route("/api/v1/instances", instances),
        Route("/api/v1/instances/{id:path}/drain", drain, methods=["POST"]),
        Route("/api/v1/instances/{id:path}", instance),
        Route("/api/v1/node/drain", node_drain, methods=["POST"]),
        Route("/api/v1/reload", reload, methods=["POST"]),
    ])


async def serve_admin(master: AdminTarget, address: tuple[str, int],
                      task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the admin API on ``address`` until cancelled; raises ConfigError if taken."""
    await serve_app(admin_app(master), address, source=master.config_path or "",
                    key="proxy.admin", task_status=task_status)
