"""The agent's internal RPC: HTTP/JSON (Starlette on hypercorn's trio worker).

Every request must carry ``Authorization: Bearer <cluster secret>``; anything
else gets 401 and a warning in the log. Signals change state and are fenced
and idempotent (``signals.SignalLedger``): each carries an ``id`` and the
sender's ``term``; a stale term gets 409, a repeated id the first result.

  PUT  /v1/releases/{app}/{release}   tarball body; headers X-Superagent-Sha256,
                                      X-Superagent-Signal (id), X-Superagent-Term -> prepare
  POST /v1/signals/start              {"id","term","app","release","count"}
  POST /v1/signals/stop               {"id","term","instances":[...],"grace"?}
  POST /v1/signals/switch             {"id","term","app","instances":[...]}
  POST /v1/signals/drain              {"id","term","instances":[...],"grace"}
  POST /v1/signals/offline            {"id","term","offline": true|false}
  POST /v1/signals/debug              {"id","term","app","enabled": true|false,"ttl"?}
  POST /v1/signals/prepare            {"id","term","app","release","sha256"}: fetch the
                                      artifact from the coordinators, then prepare
  POST /v1/signals/test               {"id","term","app","release","timeout"?}: run the
                                      release's [test] command; a failure is a result
  GET  /v1/status                     instances, releases, isolation, figures
  GET  /v1/logs?app=&instance=&request_id=&n=   recent lines; &follow=1 streams NDJSON

The work itself is the ``AgentService``'s; this module only authenticates,
validates, fences and translates errors (a ``ParticipantError``'s
``status_hint`` becomes the status, with a JSON body naming the problem).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from superagent.jsonbody import field, read_object
from superagent.manifest import TEST_TIMEOUT
from superagent.names import SHA256
from superagent.participant.errors import ParticipantError, SignalError
from superagent.participant.signals import DONE, RUNNING, SignalLedger

MAX_ARCHIVE = 512 * 1024 * 1024  # an uploaded release; the extractor has its own budgets
MAX_SIGNAL = 1024 * 1024  # a signal's JSON body
DEBUG_TTL = 3600.0  # a debug session left open ends by itself after an hour
MAX_DEBUG_TTL = 86400.0
MAX_TEST_TIMEOUT = 86400.0  # a test signal's own timeout, at most a day
log = structlog.get_logger("superagent.participant.rpc")


class AgentService(Protocol):
    """What the RPC layer drives; ``service.py`` implements it."""

    async def prepare(self, app: str, release: str, archive: Path, sha256: str
                      ) -> dict[str, Any]: ...

    async def start(self, app: str, release: str, count: int) -> dict[str, Any]: ...

    async def stop(self, instances: list[str], grace: float | None) -> dict[str, Any]: ...

    async def switch(self, app: str, instances: list[str]) -> dict[str, Any]: ...

    async def drain(self, instances: list[str], grace: float) -> dict[str, Any]: ...

    async def offline(self, offline: bool) -> dict[str, Any]: ...

    async def debug(self, app: str, enabled: bool, ttl: float) -> dict[str, Any]: ...

    async def prepare_artifact(self, app: str, release: str, sha256: str
                               ) -> dict[str, Any]: ...

    async def test(self, app: str, release: str, timeout: float) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...

    def logs(self, *, app: str | None, instance: str | None, n: int,
             request_id: str | None = None) -> list[dict[str, Any]]: ...

    def follow(self, *, app: str | None, instance: str | None,
               request_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        ...

    def persist(self) -> None:
        """Write the agent's state (the ledger included) after a signal changed it."""


def _error(status: int, error: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "status": status, "detail": detail, **extra},
                        status_code=status)


def _from_exception(exc: ParticipantError) -> JSONResponse:
    extra = {k: v for k, v in (("app", exc.app), ("release", exc.release),
                               ("log", getattr(exc, "tail", ""))) if v}
    return _error(exc.status_hint, type(exc).__name__, str(exc), **extra)


def _signal_error(message: str, status: int) -> SignalError:
    return SignalError(message, status_hint=status)


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...],
           default: Any = ...) -> Any:
    """``body[name]`` checked against ``kind``; raises SignalError naming the field."""
    return field(body, name, kind, error=_signal_error, default=default)


def _instances(body: dict[str, Any]) -> list[str]:
    value = _field(body, "instances", list)
    if not value or not all(isinstance(v, str) and v for v in value):
        raise SignalError("field 'instances' must be a non-empty list of instance ids")
    return list(value)


def _grace(body: dict[str, Any], default: Any = ...) -> Any:
    value = _field(body, "grace", (int, float), default)
    if value is not None and value < 0:
        raise SignalError("field 'grace' must be >= 0 seconds")
    return None if value is None else float(value)


def rpc_app(service: AgentService, *, secret: str, ledger: SignalLedger) -> Starlette:
    """The RPC application; ``secret`` is the cluster secret every caller must present."""
    if not secret:
        raise ValueError("the RPC server needs a non-empty cluster secret")
    expected = f"Bearer {secret}".encode()

    def authorised(request: Request) -> bool:
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return True
        log.warning("rpc request refused: bad or missing credentials", path=request.url.path,
                    peer=request.client.host if request.client else None)
        return False

    async def fenced(signal_id: object, term: object,
                     act: Callable[[], Awaitable[dict[str, Any]]]) -> Response:
        try:
            state, result = ledger.admit(signal_id, term)
        except SignalError as exc:
            return _from_exception(exc)
        assert isinstance(signal_id, str)
        if state == DONE:
            return JSONResponse({**(result or {}), "repeated": True})
        if state == RUNNING:
            result = await ledger.wait(signal_id)
            if result is None:
                return _error(409, "SignalError", "the original signal failed; send a new id")
            return JSONResponse({**result, "repeated": True})
        try:
            result = await act()
        except ParticipantError as exc:
            ledger.abandon(signal_id)
            return _from_exception(exc)
        except BaseException:
            ledger.abandon(signal_id)
            raise
        ledger.finish(signal_id, result)
        service.persist()
        return JSONResponse(result)

    async def signal(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "Unauthorized", "a valid cluster secret is required")
        kind = request.path_params["kind"]
        try:
            body = await read_object(request, limit=MAX_SIGNAL, error=_signal_error)
            if kind == "start":
                app, release = _field(body, "app", str), _field(body, "release", str)
                count = _field(body, "count", int, 1)
                if not 1 <= count <= 64:
                    raise SignalError("field 'count' must be between 1 and 64")
                act = partial(service.start, app, release, count)
            elif kind == "stop":
                ids, grace = _instances(body), _grace(body, None)
                act = partial(service.stop, ids, grace)
            elif kind == "switch":
                app, ids = _field(body, "app", str), _field(body, "instances", list)
                if not all(isinstance(v, str) for v in ids):
                    raise SignalError("field 'instances' must be a list of instance ids")
                act = partial(service.switch, app, ids)
            elif kind == "drain":
                ids, grace = _instances(body), _grace(body)
                act = partial(service.drain, ids, grace)
            elif kind == "offline":
                offline = _field(body, "offline", bool)
                act = partial(service.offline, offline)
            elif kind == "debug":
                app, enabled = _field(body, "app", str), _field(body, "enabled", bool)
                ttl = float(_field(body, "ttl", (int, float), DEBUG_TTL))
                if not 1 <= ttl <= MAX_DEBUG_TTL:
                    raise SignalError(f"field 'ttl' must be 1..{MAX_DEBUG_TTL} seconds")
                act = partial(service.debug, app, enabled, ttl)
            elif kind == "prepare":
                app, release = _field(body, "app", str), _field(body, "release", str)
                sha256 = _field(body, "sha256", str)
                if not SHA256.fullmatch(sha256):
                    raise SignalError("field 'sha256' must be a lower-case sha256 hex digest")
                act = partial(service.prepare_artifact, app, release, sha256)
            elif kind == "test":
                app, release = _field(body, "app", str), _field(body, "release", str)
                timeout = float(_field(body, "timeout", (int, float), TEST_TIMEOUT))
                if not 0 < timeout <= MAX_TEST_TIMEOUT:
                    raise SignalError(f"field 'timeout' must be 0..{MAX_TEST_TIMEOUT:g} seconds")
                act = partial(service.test, app, release, timeout)
            else:
                return _error(404, "UnknownSignal", f"no signal named {kind!r}")
        except SignalError as exc:
            return _from_exception(exc)
        return await fenced(body.get("id"), body.get("term"), act)

    async def upload(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "Unauthorized", "a valid cluster secret is required")
        app, release = request.path_params["app"], request.path_params["release"]
        sha256 = request.headers.get("x-superagent-sha256", "").lower()
        signal_id = request.headers.get("x-superagent-signal")
        try:
            term = int(request.headers.get("x-superagent-term", ""))
        except ValueError:
            term = -1
        if not SHA256.fullmatch(sha256):
            return _error(400, "SignalError", "header X-Superagent-Sha256 must be a sha256"
                                              " hex digest")
        with tempfile.NamedTemporaryFile(prefix="upload-", suffix=".tar") as spool:
            digest = hashlib.sha256()
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_ARCHIVE:
                    return _error(413, "ArchiveTooLarge", f"archive over {MAX_ARCHIVE} bytes")
                digest.update(chunk)
                spool.write(chunk)
            spool.flush()
            if digest.hexdigest() != sha256:
                return _error(400, "ChecksumMismatch",
                              f"archive sha256 is {digest.hexdigest()}, header says {sha256}",
                              app=app, release=release)
            path = Path(spool.name)
            return await fenced(signal_id, term,
                                partial(service.prepare, app, release, path, sha256))

    async def status(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "Unauthorized", "a valid cluster secret is required")
        return JSONResponse(service.status())

    async def logs(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "Unauthorized", "a valid cluster secret is required")
        q = request.query_params
        app, instance = q.get("app") or None, q.get("instance") or None
        request_id = q.get("request_id") or None
        try:
            n = int(q.get("n", "100"))
        except ValueError:
            return _error(400, "SignalError", "query parameter 'n' must be an integer")
        if not 1 <= n <= 10_000:
            return _error(400, "SignalError", "query parameter 'n' must be 1..10000")
        if q.get("follow") in ("1", "true"):
            async def lines() -> AsyncIterator[bytes]:
                for line in service.logs(app=app, instance=instance, n=n,
                                         request_id=request_id):
                    yield json.dumps(line).encode() + b"\n"
                async for line in service.follow(app=app, instance=instance,
                                                 request_id=request_id):
                    yield json.dumps(line).encode() + b"\n"

            return StreamingResponse(lines(), media_type="application/x-ndjson")
        return JSONResponse({"lines": service.logs(app=app, instance=instance, n=n,
                                                   request_id=request_id)})

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("rpc request failed", path=request.url.path, exc_info=exc)
        return _error(500, "InternalError", f"{type(exc).__name__}: {exc}")

    return Starlette(exception_handlers={Exception: unexpected}, routes=[
        Route("/v1/signals/{kind}", signal, methods=["POST"]),
        Route("/v1/releases/{app}/{release}", upload, methods=["PUT"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/v1/logs", logs, methods=["GET"]),
    ])
