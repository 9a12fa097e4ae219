"""The participant's side of the RPC: one Starlette app that decodes, fences and dispatches.

Theory of operation. Every request is checked in the same order: the caller's key
(``Authorization: Bearer <key>``, else 401 and a warning; the keys are the signal key
derived from this machine's credential, which only the coordinators also hold, and the
legacy shared secret while a cluster migrates), the protocol version (a
different major is refused, see ``version.py``), then the message itself, decoded by the
shared codec into its typed class (an unknown field, a missing one or a wrong type is a
``BAD_REQUEST`` naming the field). A signal is then fenced and made idempotent by the
``Ledger`` (a stale term is refused; a repeated id gets the first answer with
``repeated`` set, or waits for the original still running), handed to the
``AgentService`` method it stands for, and its typed reply encoded, remembered and
persisted (a failed one's answer, too, waits for what its failure undid to be on disk).
Errors raised by the service become an ``ErrorReply`` through ``translate``,
which the participant supplies: the mapping from its error classes to ``ErrorCode`` lives
in one place, on its side. An exception ``translate`` does not know is an ``INTERNAL``
500 and is logged.

  PUT  /v1/releases/{app}/{release}   Upload: the tarball is the body; id, term and sha256
                                      in X-Superagent-Signal, X-Superagent-Term,
                                      X-Superagent-Sha256
  POST /v1/signals/{type}             prepare, test, start, stop, switch, drain, offline,
                                      debug: the message's fields as a JSON object
  GET  /v1/status                     StatusReply
  GET  /v1/logs?app=&instance=&request_id=&n=   LogsReply; &follow=1 streams NDJSON lines

This module imports no role package: the service, the ledger and the translation are
handed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from superagent import codec
from superagent.errors import CodecError
from superagent.httpserver import allowed_methods
from superagent.jsonbody import read_object
from superagent.rpc import messages as msg
from superagent.rpc import version
from superagent.rpc.errors import VersionMismatch

MAX_ARCHIVE = 512 * 1024 * 1024  # an uploaded release; the extractor has its own budgets
MAX_SIGNAL = 1024 * 1024  # a signal's JSON body
_MAX_TERM = 20  # digits of a term header: a 64-bit counter; longer is refused as not an int
NEW, DONE, RUNNING = "new", "done", "running"  # what ``Ledger.admit`` answers
log = structlog.get_logger("superagent.rpc.server")


class AgentService(Protocol):
    """What the RPC drives; the participant's ``Agent`` implements it."""

    async def prepare(self, app: str, release: str, archive: Path, sha256: str
                      ) -> msg.PrepareReply: ...

    async def prepare_artifact(self, app: str, release: str, sha256: str,
                               keep: tuple[str, ...] = ()) -> msg.PrepareReply: ...

    async def test(self, app: str, release: str, timeout: float) -> msg.TestReply: ...

    async def start(self, app: str, release: str, count: int) -> msg.StartReply: ...

    async def stop(self, instances: list[str], grace: float | None) -> msg.StopReply: ...

    async def switch(self, app: str, instances: list[str]) -> msg.SwitchReply: ...

    async def drain(self, instances: list[str], grace: float) -> msg.DrainReply: ...

    async def offline(self, offline: bool) -> msg.OfflineReply: ...

    async def debug(self, app: str, enabled: bool, ttl: float) -> msg.DebugReply: ...

    def status(self) -> msg.StatusReply: ...

    def logs(self, *, app: str | None, instance: str | None, n: int,
             request_id: str | None = None) -> list[dict[str, Any]]: ...

    def follow(self, *, app: str | None, instance: str | None, n: int,
               request_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """The newest ``n`` lines, then each new line as it comes: the tail is read where
        the subscription begins, so no line falls between the two or comes twice."""
        ...

    def persist(self) -> None:
        """Ask for the agent's state (the ledger included) to be written after a signal
        changed it."""

    async def persisted(self) -> None:
        """Return once the state asked for is on disk: a signal is answered only then, as
        the coordinator acts on the answer."""


class Ledger(Protocol):
    """Term fencing and remembered results (``participant.signals.SignalLedger``)."""

    def admit(self, signal_id: object, term: object) -> tuple[str, dict[str, Any] | None]: ...

    def finish(self, signal_id: str, result: dict[str, Any]) -> None: ...

    def abandon(self, signal_id: str) -> None: ...

    async def wait(self, signal_id: str) -> dict[str, Any] | None: ...


Translate = Callable[[Exception], msg.ErrorReply | None]


def _dispatch(service: AgentService, message: msg.Signal[Any]) -> Awaitable[msg.Reply]:
    """The service call a JSON signal stands for."""
    match message:
        case msg.Prepare():
            return service.prepare_artifact(message.app, message.release, message.sha256,
                                            message.keep)
        case msg.Test():
            return service.test(message.app, message.release, message.timeout)
        case msg.Start():
            return service.start(message.app, message.release, message.count)
        case msg.Stop():
            return service.stop(list(message.instances), message.grace)
        case msg.Switch():
            return service.switch(message.app, list(message.instances))
        case msg.Drain():
            return service.drain(list(message.instances), message.grace)
        case msg.Offline():
            return service.offline(message.offline)
        case msg.Debug():
            return service.debug(message.app, message.enabled, message.ttl)
    raise AssertionError(f"no service call for {message!r}")


def answer(doc: dict[str, Any], status: int = 200) -> JSONResponse:
    """A JSON answer carrying this side's protocol version."""
    return JSONResponse(doc, status_code=status, headers={version.HEADER: str(version.CURRENT)})


def refuse(reply: msg.ErrorReply) -> JSONResponse:
    return answer({k: v for k, v in codec.encode(reply).items() if v != ""}, reply.status)


def bad_request(reason: str, status: int = 400, **where: str) -> JSONResponse:
    return refuse(msg.ErrorReply(error=msg.ErrorCode.BAD_REQUEST, status=status, detail=reason,
                                 **where))


class _BodyError(Exception):
    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)


def rpc_app(service: AgentService, *, secret: str = "", ledger: Ledger, translate: Translate,
            keys: Callable[[], Iterable[str]] | None = None) -> Starlette:
    """The RPC application; a caller must present ``secret`` or one of ``keys()`` (asked
    on every request: a machine's key exists once it is enrolled)."""
    if not secret and keys is None:
        raise ValueError("the RPC server needs a key or a non-empty secret")

    def accepted(given: bytes) -> bool:
        found = False
        for key in ([secret] if secret else []) + list(keys() if keys else []):
            found |= bool(key) and hmac.compare_digest(given, f"Bearer {key}".encode())
        return found

    def gate(request: Request) -> JSONResponse | version.Version:
        """The caller's protocol version, or the refusal to send instead."""
        given = request.headers.get("authorization", "").encode()
        if not accepted(given):
            log.warning("rpc request refused: bad or missing credentials", path=request.url.path,
                        peer=request.client.host if request.client else None)
            return refuse(msg.ErrorReply(error=msg.ErrorCode.UNAUTHORIZED, status=401,
                                         detail="a coordinator's key is required"))
        try:
            peer = version.Version.parse(request.headers.get(version.HEADER))
            version.check(peer, peer_role="coordinator")
        except VersionMismatch as exc:
            log.warning("rpc request refused: protocol version", path=request.url.path,
                        error=str(exc))
            return refuse(msg.ErrorReply(error=msg.ErrorCode.VERSION_MISMATCH, status=400,
                                         detail=str(exc)))
        return peer

    def failed(exc: Exception) -> JSONResponse:
        if isinstance(exc, CodecError):
            return bad_request(str(exc))
        reply = translate(exc)
        if reply is None:
            raise exc
        return refuse(reply)

    async def fenced(message: msg.Signal[Any], act: Callable[[], Awaitable[msg.Reply]]
                     ) -> Response:
        try:
            state, result = ledger.admit(message.id, message.term)
        except Exception as exc:  # a stale term, a bad id: the participant says which
            return failed(exc)
        if state == RUNNING:
            result = await ledger.wait(message.id)
            if result is None:
                return refuse(msg.ErrorReply(
                    error=msg.ErrorCode.SIGNAL_FAILED, status=409,
                    detail="the original signal failed; send a new id"))
        if state in (DONE, RUNNING):
            try:  # the first answer may still wait for the state to be on disk
                await service.persisted()
            except Exception as exc:
                return failed(exc)
            return answer({**(result or {}), "repeated": True})
        try:
            reply = await act()
        except Exception as exc:
            # what the failed signal undid (a start's instances forgotten) is on disk
            # before the coordinator hears of it, from this answer or from a repeat of the
            # signal waiting for it (``ledger.wait``); the failure is the answer either way
            try:
                with contextlib.suppress(Exception):
                    await service.persisted()
            finally:
                ledger.abandon(message.id)
            return failed(exc)
        except BaseException:
            ledger.abandon(message.id)
            raise
        assert isinstance(reply, message.REPLY), (message, reply)
        doc = codec.encode(reply)
        ledger.finish(message.id, doc)
        service.persist()
        try:
            await service.persisted()
        except Exception as exc:  # the state is not on disk: the answer says so
            return failed(exc)
        return answer(doc)

    async def signal(request: Request) -> Response:
        peer = gate(request)
        if isinstance(peer, Response):
            return peer
        kind = request.path_params["kind"]
        cls = msg.SIGNALS.get(kind)
        if cls is None:
            return refuse(msg.ErrorReply(error=msg.ErrorCode.UNKNOWN_SIGNAL, status=404,
                                         detail=f"no signal named {kind!r}"))
        try:
            body = await read_object(request, limit=MAX_SIGNAL, error=_BodyError)
            message = codec.decode(cls, body, ignore_unknown=version.lenient(peer))
        except _BodyError as exc:
            return bad_request(str(exc), exc.status)
        except CodecError as exc:
            return bad_request(f"{kind}: {exc}")
        return await fenced(message, lambda: _dispatch(service, message))

    async def upload(request: Request) -> Response:
        peer = gate(request)
        if isinstance(peer, Response):
            return peer
        app, release = request.path_params["app"], request.path_params["release"]
        term = request.headers.get("x-superagent-term", "")
        try:
            message = codec.decode(msg.Upload, {
                "id": request.headers.get("x-superagent-signal", ""),
                "term": int(term) if term.isascii() and term.isdigit() and len(term) <= _MAX_TERM
                else term, "app": app,
                "release": release,
                "sha256": request.headers.get("x-superagent-sha256", "").lower()})
        except CodecError as exc:
            return bad_request(f"upload: {exc} (headers X-Superagent-Signal, -Term, -Sha256)")
        with tempfile.NamedTemporaryFile(prefix="upload-", suffix=".tar") as spool:
            digest = hashlib.sha256()
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_ARCHIVE:
                    return refuse(msg.ErrorReply(
                        error=msg.ErrorCode.ARCHIVE_TOO_LARGE, status=413,
                        detail=f"archive over {MAX_ARCHIVE} bytes", app=app, release=release))
                digest.update(chunk)
                spool.write(chunk)
            spool.flush()
            if digest.hexdigest() != message.sha256:
                return refuse(msg.ErrorReply(
                    error=msg.ErrorCode.CHECKSUM_MISMATCH, status=400, app=app, release=release,
                    detail=f"archive sha256 is {digest.hexdigest()},"
                           f" header says {message.sha256}"))
            path = Path(spool.name)
            return await fenced(message, lambda: service.prepare(app, release, path,
                                                                 message.sha256))

    async def status(request: Request) -> Response:
        peer = gate(request)
        if isinstance(peer, Response):
            return peer
        return answer(codec.encode(service.status()))

    async def logs(request: Request) -> Response:
        peer = gate(request)
        if isinstance(peer, Response):
            return peer
        try:
            query = msg.LogsQuery.from_params(dict(request.query_params))
        except CodecError as exc:
            return bad_request(f"logs: {exc}")
        if not query.follow:
            recent = service.logs(app=query.app, instance=query.instance, n=query.n,
                                  request_id=query.request_id)
            return answer(codec.encode(msg.LogsReply(lines=tuple(recent))))

        async def lines() -> AsyncIterator[bytes]:
            async for line in service.follow(app=query.app, instance=query.instance,
                                             n=query.n, request_id=query.request_id):
                yield json.dumps(line).encode() + b"\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 headers={version.HEADER: str(version.CURRENT)})

    async def unrouted(request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (no route, a method the route does not take) as JSON."""
        assert isinstance(exc, HTTPException)
        method, path = request.method, request.url.path
        if exc.status_code == 405:
            allowed = allowed_methods(request.app.router.routes, request.scope)
            response = refuse(msg.ErrorReply(
                error=msg.ErrorCode.METHOD_NOT_ALLOWED, status=405,
                detail=f"{method} is not allowed on {path}; allowed: {', '.join(allowed)}"))
            response.headers["allow"] = ", ".join(allowed)
            return response
        if exc.status_code == 404:
            return refuse(msg.ErrorReply(error=msg.ErrorCode.NOT_FOUND, status=404,
                                         detail=f"no route for {path}"))
        return bad_request(str(exc.detail), exc.status_code)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("rpc request failed", path=request.url.path, exc_info=exc)
        return refuse(msg.ErrorReply(error=msg.ErrorCode.INTERNAL, status=500,
                                     detail=f"{type(exc).__name__}: {exc}"))

    routes = [
        Route("/v1/signals/{kind}", signal, methods=["POST"]),
        Route("/v1/releases/{app}/{release}", upload, methods=["PUT"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/v1/logs", logs, methods=["GET"]),
    ]
    return Starlette(exception_handlers={Exception: unexpected, HTTPException: unrouted},
                     routes=routes)
