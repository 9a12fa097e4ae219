"""The trio shell around the relay core: one client connection, many exchanges.

Theory of operation. ``ClientConnection.run`` loops: wait for a request head
(keep-alive idle wait, then the header timeout once bytes arrive), interpret it
(``http1``), route it (the ``RouteTable`` current at that moment) and relay it
through one ``Upstream`` chosen by least outstanding requests. Pipelined
requests are answered in order: the loop handles one exchange at a time and the
parser queues what follows. Each request's bookkeeping is an ``Exchange``
(``exchange.py``), counted and logged when it ends.

Bodies stream with back-pressure: the proxy reads the next piece from one side
only after the previous one was written to the other. A body already in hand
(the common case) goes out with the head in one write; a body still arriving is
uploaded by a second task (``upload.py``) while the first waits for the response.
An upgrade the app allows is offered upstream, and a 101 for it turns the
connection into a tunnel (``tunnel.py``) until both sides finish.

Timeouts. Each connection has one cancel scope for its whole life, a
``deadline`` and a ``phase`` naming the limit that deadline stands for. Before
every wait the shell re-arms them (two attribute writes, never past the app's
total deadline); the worker's reaper cancels the scope of a connection whose
deadline passed. ``_expired`` then answers what the phase calls for (408 or
504 with ``X-Superagent-Error`` naming it, or just closing) and closes.

Retries: a connect failure moves to another instance (``app.retries`` times); a
pooled connection that dies before any response byte is replaced by a fresh one
only when the request is idempotent and its body is in hand; nothing is resent
once a response byte came back.
"""

from __future__ import annotations

import math
import socket
import time
from typing import Final

import trio

from superagent.httprules import allowed_upgrade
from superagent.proxy import hold, http1, netio
from superagent.proxy.errors import ColdStartError, HTTPError, UpstreamError
from superagent.proxy.exchange import Exchange
from superagent.proxy.http1 import BODY_CHUNKED, BODY_NONE, Request
from superagent.proxy.netio import PeerGone, recv, send_all
from superagent.proxy.parsers import (
    END,
    ParseFailure,
    RequestHead,
    RequestParser,
    ResponseHead,
    request_parser,
)
from superagent.proxy.routes import Match
from superagent.proxy.snapshot import AppRoute, Timeouts
from superagent.proxy.state import IDLE, WorkerState
from superagent.proxy.tunnel import tunnel
from superagent.proxy.upload import Upload
from superagent.proxy.upstream import Upstream, UpstreamConn

ERROR_SEND_TIMEOUT: Final = 5.0  # writing a small error answer to a client that does not read
HEALTH_PATH: Final = "/-/healthz"
CLIENT_CLOSED: Final = 499  # logged status when the client left before an answer (as nginx does)
# Phases whose expiry the proxy answers itself when no response byte was sent yet.
_EXPIRY_ANSWERS: Final = {
    "client-header": (408, "client-header-timeout", "request head not received in time"),
    "client-body": (408, "client-body-timeout", "request body not received in time"),
    "first-byte": (504, "upstream-first-byte-timeout", "the app did not answer in time"),
    "upstream-idle": (504, "upstream-idle-timeout", "the app stopped sending"),
    "total": (504, "upstream-total-timeout", "the app's total time limit passed"),
}
_monotonic: Final = time.monotonic


class _Aborted(Exception):
    """The exchange failed after the response started: the client connection is cut."""


class _Stale(Exception):
    """The upstream connection failed before any response byte."""


class ClientConnection:
    """One accepted client connection (see the module docstring)."""

    __slots__ = ("deadline", "events", "expired", "parser", "peer", "phase", "port", "scope",
                 "sock", "state", "x")

    def __init__(self, sock: socket.socket, state: WorkerState, port: int,
                 peer_ip: str) -> None:
        self.sock = sock
        self.state = state
        self.port = port
        self.peer = state.peer(peer_ip)
        self.parser: RequestParser = request_parser(state.parser, state.settings)
        self.events = self.parser.events
        self.scope = trio.CancelScope()
        self.deadline = math.inf
        self.phase = IDLE
        self.expired: str | None = None
        self.x: Exchange | None = None

    def __repr__(self) -> str:
        return f"<ClientConnection port={self.port} peer={self.peer.ip} phase={self.phase}>"

    def arm(self, phase: str, seconds: float) -> None:
        """Set the deadline for the next wait, never past the exchange's total deadline."""
        deadline = _monotonic() + seconds
        x = self.x
        if x is not None and deadline >= x.total_deadline:
            self.phase = "total"
            self.deadline = x.total_deadline
        else:
            self.phase = phase
            self.deadline = deadline

    def expire(self, phase: str) -> None:
        self.expired = phase
        self.deadline = math.inf
        self.scope.cancel()

    async def run(self) -> None:
        """Serve requests until the client or the proxy closes the connection."""
        state = self.state
        state.live.add(self)
        try:
            with self.scope:
                await self._loop()
            if self.expired is not None:
                await self._expired(self.expired)
        except PeerGone:
            if self.x is not None:
                self._account()
        finally:
            state.live.discard(self)
            netio.close(self.sock)

    async def _loop(self) -> None:
        first = True
        while True:
            head = await self._next_head(first)
            if head is None:
                return
            first = False
            keep = await self._serve(head)
            self._account()
            if not keep:
                return
            self.parser.next_cycle()
            if self.events:
                await trio.lowlevel.checkpoint()  # pipelined: let other connections run

    # ------------------------------------------------------------------ request heads
    async def _next_head(self, first: bool) -> RequestHead | None:
        events = self.events
        state = self.state
        if not events:
            if state.closing:
                return None
            settings = state.settings
            self.arm(IDLE, settings.header_timeout if first else settings.keepalive_timeout)
            data = await recv(self.sock, True)
            if not data:
                return None
            self.x = Exchange()  # a request has begun: its time and any 408 count from here
            self.parser.feed(data)
            if not events:
                self.arm("client-header", settings.header_timeout)
                while not events:
                    data = await recv(self.sock)
                    if not data:
                        self.parser.feed_eof()
                        if not events:
                            self.x = None  # nothing that could be answered
                            return None
                        break
                    self.parser.feed(data)
        event = events.popleft()
        if type(event) is RequestHead:
            return event
        if isinstance(event, ParseFailure):
            if self.x is None:
                self.x = Exchange()
            await self._answer_error(http1.refusal(event))
            self._account()
        return None

    # ------------------------------------------------------------------ one request
    async def _serve(self, head: RequestHead) -> bool:
        """Answer one request; True when the connection stays open for the next."""
        state = self.state
        x = self.x
        if x is None:  # a pipelined request, already parsed
            x = self.x = Exchange()
        req: Request | None = None
        keep_alive = False
        try:
            settings = state.settings
            req = http1.interpret_request(head, settings.merge_slashes,
                                          settings.path_policy == "reject")
            x.method = req.method
            x.target = "*" if req.asterisk else req.path + req.query
            x.request_id = req.request_id or state.request_ids.next()
            keep_alive = req.keep_alive and not state.closing and req.upgrade is None
            if req.path == HEALTH_PATH:
                return await self._health(req, keep_alive)
            match = state.table.resolve(self.port, req.host, req.path, req.query)
            if match is None:
                raise HTTPError(404, "no-route", f"no app serves {req.host or ''}{req.path}")
            x.app = match.app.name
            x.rule = match.rule
            if req.upgrade is not None:
                req.upgrade = allowed_upgrade(req.upgrade, match.app.upgrades)
            max_body = match.app.max_body
            self.parser.limit_body(max_body)
            if max_body and req.content_length is not None and req.content_length > max_body:
                raise HTTPError(413, "body-too-large",
                                f"request body exceeds the app's limit of {max_body} bytes")
            return await self._relay(req, match, keep_alive)
        except HTTPError as exc:
            if x.response_started:
                x.error = exc.code
                return False
            close = exc.close or not keep_alive or req is None or self._body_pending(req)
            await self._answer_error(exc, close=close,
                                     head_only=req is not None and req.method == "HEAD")
            return not close
        except _Aborted:
            return False

    def _body_pending(self, req: Request) -> bool:
        """True when the request's body was not consumed: the connection cannot be reused."""
        assert self.x is not None
        if self.x.body_consumed:
            return False
        if not req.has_body:
            if self.events and self.events[0] is END:
                self.events.popleft()
            return False
        return True

    def _account(self) -> None:
        x = self.x
        if x is None:
            return
        self.x = None
        elapsed = _monotonic() - x.started
        if not x.status:
            x.status = CLIENT_CLOSED
        state = self.state
        state.metrics.observe(x.app, x.status, elapsed)
        log = state.access_log
        if log is not None and state.settings.access_log:
            log.record(x.access_record(elapsed, self.peer.ip))

    async def _health(self, req: Request, keep_alive: bool) -> bool:
        assert self.x is not None
        draining = self.state.node_draining or self.state.closing
        status, body = (503, b"draining\n") if draining else (200, b"ok\n")
        keep_alive = keep_alive and not self._body_pending(req)
        self.x.status = status
        await self._send(http1.plain_response(status, body, close=not keep_alive,
                                              head_only=req.method == "HEAD"))
        return keep_alive

    async def _answer_error(self, exc: HTTPError, *, close: bool = True,
                            head_only: bool = False) -> None:
        x = self.x
        assert x is not None
        x.status = exc.status
        x.error = exc.code
        if x.request_id == b"-":
            x.request_id = self.state.request_ids.next()
        data = http1.error_response(exc.status, exc.code, exc.detail, x.request_id,
                                    close=close, head_only=head_only)
        if isinstance(exc, ColdStartError):
            data = hold.with_retry_after(data, exc.retry_after)
        self.arm("client-send", ERROR_SEND_TIMEOUT)
        await self._send(data)

    async def _expired(self, phase: str) -> None:
        """The scope was cancelled for ``phase``: answer if still possible, then close."""
        x = self.x
        if x is None:
            return
        answer = _EXPIRY_ANSWERS.get(phase)
        if answer is not None and not x.response_started:
            status, code, detail = answer
            with trio.move_on_after(ERROR_SEND_TIMEOUT):
                x.status = status
                x.error = code
                await self._send(http1.error_response(status, code, detail, x.request_id,
                                                      close=True))
        else:
            x.error = x.error or f"{phase}-timeout"
        self._account()

    async def _send(self, data: bytes) -> None:
        assert self.x is not None
        self.x.bytes_out += len(data)
        await send_all(self.sock, data)

    # ------------------------------------------------------------------ relaying
    async def _relay(self, req: Request, match: Match, keep_alive: bool) -> bool:
        state = self.state
        app = match.app
        x = self.x
        assert x is not None
        if app.timeouts.total > 0:
            x.total_deadline = x.started + app.timeouts.total
        head = http1.upstream_head(req, "*" if req.asterisk else match.target, self.peer,
                                   x.request_id, match.stripped)
        if app.rewrite_paths and match.stripped:
            x.rewrite = match.stripped.encode()
        body = self._buffered_body(req, app)
        tried: list[str] = []
        last_error: UpstreamError | None = None
        while True:
            up = state.upstreams.pick(app, tried)
            if up is None:
                if app.cold is not None and not tried and x.cold is None:
                    await self._hold(app)  # an app scaled to zero: wait for its start
                    continue
                if last_error is not None:
                    raise last_error
                raise UpstreamError(503, "no-instance", f"app {app.name!r} has no instance ready")
            x.instance = up.id
            up.outstanding += 1
            try:
                return await self._exchange(up, req, head, body, app, keep_alive)
            except UpstreamError as exc:
                if exc.code.startswith("upstream-connect"):
                    state.metrics.connect_error(up.id)
                if not exc.replayable or len(tried) >= app.retries:
                    raise
                tried.append(up.id)
                last_error = exc
                x.retries += 1
                state.metrics.retry(app.name)
            finally:
                up.outstanding -= 1

    async def _hold(self, app: AppRoute) -> None:
        """Wait (bounded) for the cold start of ``app`` (``hold.py``); raises
        ColdStartError (503) when it overflows, fails or takes too long."""
        x = self.x
        cold = app.cold
        assert x is not None and cold is not None
        holds = self.state.holds
        waiter = holds.admit(app.name, cold, _monotonic())
        self.phase = "cold-start"
        self.deadline = math.inf  # the hold's own bound applies, not the previous phase's
        try:
            with trio.move_on_after(cold.wait):
                await waiter.event.wait()
        finally:
            holds.leave(waiter)
        error = waiter.error(cold.wait)
        if error is not None:
            raise error
        x.cold = _monotonic() - waiter.since

    def _buffered_body(self, req: Request, app: AppRoute) -> list[bytes] | None:
        """The whole body when it is already parsed (or there is none); None to stream it."""
        x = self.x
        assert x is not None
        events = self.events
        if not req.has_body:
            if events and events[0] is END:
                events.popleft()
            x.body_consumed = True
            return []
        if END not in events:
            for event in events:
                if isinstance(event, ParseFailure):  # refuse before anything reaches the app
                    raise http1.refusal(event)
            return None
        parts: list[bytes] = []
        size = 0
        while True:
            event = events.popleft()
            if event is END:
                break
            if type(event) is bytes:
                parts.append(event)
                size += len(event)
            elif isinstance(event, ParseFailure):
                raise http1.refusal(event)
        if app.max_body and size > app.max_body:
            raise HTTPError(413, "body-too-large",
                            f"request body exceeds the app's limit of {app.max_body} bytes",
                            close=True)
        x.bytes_in += size
        x.body_consumed = True
        return parts

    async def _exchange(self, up: Upstream, req: Request, head: bytes, body: list[bytes] | None,
                        app: AppRoute, keep_alive: bool) -> bool:
        """Relay one request to ``up``; True when the client connection stays open."""
        state = self.state
        timeouts = app.timeouts
        replayable = body is not None and req.method in http1.IDEMPOTENT
        conn = up.take_idle(_monotonic(), state.settings.pool_idle_timeout,
                            check=not replayable)
        if conn is not None:
            try:
                return await self._exchange_on(conn, up, req, head, body, timeouts, keep_alive)
            except _Stale:
                conn.close()
                if not replayable:
                    raise UpstreamError(502, "upstream-reset",
                                        "the app closed a kept-alive connection") from None
                assert self.x is not None
                self.x.retries += 1
                state.metrics.retry(app.name)
        self.phase = "connect"
        self.deadline = math.inf  # connect has its own limit, so a timeout can try elsewhere
        conn = await up.connect(timeouts.connect, state.parser)
        try:
            return await self._exchange_on(conn, up, req, head, body, timeouts, keep_alive)
        except _Stale:
            conn.close()
            raise UpstreamError(502, "upstream-reset",
                                "the app closed the connection before answering",
                                replayable=replayable) from None

    async def _exchange_on(self, conn: UpstreamConn, up: Upstream, req: Request, head: bytes,
                           body: list[bytes] | None, timeouts: Timeouts,
                           keep_alive: bool) -> bool:
        conn.parser.start(head_request=req.method == "HEAD", upgrade=req.upgrade)
        pooled = False
        try:
            if body is not None:
                if req.chunked:
                    payload = head + b"".join([http1.chunk(b) for b in body if b]) + (
                        http1.LAST_CHUNK)
                elif body:
                    payload = head + b"".join(body)
                else:
                    payload = head
                self.arm("upstream-idle", timeouts.idle)
                try:
                    await send_all(conn.sock, payload)
                except PeerGone:
                    raise _Stale from None
                self.arm("first-byte", timeouts.first_byte)
                keep, pooled = await self._respond(conn, up, req, timeouts, keep_alive, None)
                return keep
            # The body is still arriving: upload it beside waiting for the response.
            upload = Upload(self, conn, req, timeouts)
            self.arm("total", math.inf)
            try:
                await send_all(conn.sock, head)
            except PeerGone:
                raise _Stale from None
            # Errors are carried out of the nursery by hand: raised inside it they would
            # arrive wrapped in an exception group.
            error: BaseException | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload.run)  # never raises: failures land in upload.error
                try:
                    keep, pooled = await self._respond(conn, up, req, timeouts, keep_alive,
                                                       upload)
                except (_Stale, UpstreamError) as exc:
                    error = upload.error or exc  # the upload's failure explains the upstream's
                except (HTTPError, _Aborted, PeerGone) as exc:
                    error = exc
                if error is not None or not upload.done.is_set():
                    # Failed, or the response is complete while the client is still sending:
                    # stop reading the body (the connection closes).
                    nursery.cancel_scope.cancel()
                    keep = False
            if error is not None:
                raise error
            return keep and upload.error is None
        finally:
            if not pooled:
                conn.close()

    async def _respond(self, conn: UpstreamConn, up: Upstream, req: Request,
                       timeouts: Timeouts, keep_alive: bool, upload: Upload | None
                       ) -> tuple[bool, bool]:
        """Relay the response; (client keep-alive, upstream connection pooled)."""
        x = self.x
        assert x is not None
        parser = conn.parser
        events = parser.events
        sock = conn.sock
        got_bytes = False
        # The response head, skipping interim 1xx answers (the proxy sent its own 100).
        while True:
            while not events:
                if upload is not None and upload.error is not None:
                    raise upload.error
                try:
                    data = await recv(sock, not got_bytes)
                except PeerGone:  # closed under us, e.g. by a failed upload
                    data = b""
                if not data:
                    if not got_bytes:
                        raise _Stale
                    parser.feed_eof()
                else:
                    got_bytes = True
                    parser.feed(data)
            event = events.popleft()
            if type(event) is ResponseHead:
                if 100 <= event.status < 200 and event.status != 101:
                    if events and events[0] is END:
                        events.popleft()
                    continue
                break
            if isinstance(event, ParseFailure):
                raise UpstreamError(502, "upstream-bad-response", event.detail)
        resp = event
        if resp.status == 101:
            await tunnel(self, conn, req, resp, timeouts)
            return False, False
        if req.upgrade is not None:
            keep_alive = False  # the client's parser stopped at the upgrade request
        x.first_byte = _monotonic()
        plan = http1.client_head(resp, req, keep_alive=keep_alive, request_id=x.request_id,
                                 prefix=x.rewrite)
        x.status = resp.status
        x.response_started = True
        mode = plan.body
        out = [plan.head if x.cold is None else hold.cold_head(plan.head, x.cold)]
        client = self.sock
        while True:
            finished = False
            while events:
                event = events.popleft()
                if type(event) is bytes:
                    if mode == BODY_CHUNKED:
                        out.append(http1.chunk(event))
                    elif mode != BODY_NONE:
                        out.append(event)
                elif event is END:
                    finished = True
                    if mode == BODY_CHUNKED:
                        out.append(http1.LAST_CHUNK)
                    break
                else:  # a ParseFailure inside the body: the response is cut short
                    x.error = "upstream-bad-response"
                    raise _Aborted
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            x.bytes_out += len(data)
            self.arm("client-send", timeouts.idle)
            await send_all(client, data)
            if finished:
                break
            self.arm("upstream-idle", timeouts.idle)
            try:
                data = await recv(sock)
            except PeerGone:
                data = b""
            if data:
                parser.feed(data)
            else:
                parser.feed_eof()
        upload_ok = upload is None or (upload.done.is_set() and upload.error is None)
        if parser.reusable and plan.upstream_reusable and upload_ok and not events:
            up.put_idle(conn, _monotonic(), self.state.settings.pool_max_idle)
            return plan.keep_alive, True
        return plan.keep_alive, False
