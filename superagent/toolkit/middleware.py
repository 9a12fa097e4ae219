"""ASGI and WSGI middleware: bind each request's ``X-Request-Id`` while it runs, echo it.

Theory of operation
-------------------
Both wrap an app, framework or not, and do three things per HTTP request:

1. **Read** the id from the request's ``X-Request-Id`` header (the proxy always sets one)
   with ``context.request_id_from``: kept when well formed, else a fresh id, so a request
   that reached the app directly still gets lines that join up.
2. **Bind** it to ``context.REQUEST_ID`` for everything the request runs, so ``emit`` and
   the logging handler pick it up.
3. **Echo** it as the response's ``X-Request-Id`` unless the app set that header itself
   (the proxy keeps an app's own header and otherwise adds its id, which is the same).

ASGI: the id is set in the request's own task (servers run each request in one) and
reset when the app returns; the echo is added to ``http.response.start``. WebSocket
connections get the id bound too (there is no response header to echo it in); lifespan
and other scopes pass through untouched. The id is also put in ``scope["state"]`` as
``request_id``, where Starlette's ``request.state.request_id`` finds it.

WSGI: a WSGI response may be an iterable produced lazily after the app returned (a
streaming generator), so the app call and every step of the iteration run inside one
``contextvars.Context`` of the request, where the id is set: lines written while a
streamed body is generated carry the id too. ``close()`` runs there as well. A list or
tuple body, or the server's ``wsgi.file_wrapper``, is returned as it is: sending it runs
no app code, and the server may use what it is (a one-item list's length, sendfile). The id is
also in ``environ["superagent.request_id"]``.

Standard library only, Python 3.8 syntax: this package runs inside apps.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from .context import HEADER, HEADER_LOWER, REQUEST_ID, WSGI_KEY, request_id_from

if TYPE_CHECKING:  # aliases for annotations only: subscripted at run time they need 3.9+
    from collections.abc import Awaitable, Callable

    Scope = MutableMapping[str, Any]
    Message = MutableMapping[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
    StartResponse = Callable[..., Any]
    WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_HEADER_BYTES = HEADER_LOWER.encode("ascii")


class RequestIdMiddleware:
    """ASGI middleware (Starlette, FastAPI, Quart, any ASGI 3 app).

    ``app = RequestIdMiddleware(app)``, or with Starlette/FastAPI
    ``app.add_middleware(RequestIdMiddleware)``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers") or ():
            if name.lower() == _HEADER_BYTES:
                header = value
                break
        request_id = request_id_from(header)
        state = scope.setdefault("state", {})
        if isinstance(state, MutableMapping):
            state["request_id"] = request_id
        echo = request_id.encode("ascii")

        async def send_with_id(message: Message) -> None:
            if message.get("type") == "http.response.start":
                headers = list(message.get("headers") or ())
                if not any(name.lower() == _HEADER_BYTES for name, _ in headers):
                    headers.append((_HEADER_BYTES, echo))
                    message = {**message, "headers": headers}
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class WSGIRequestIdMiddleware:
    """WSGI middleware (Flask, Django, Bottle, any WSGI app; gunicorn, waitress, wsgiref).

    ``app.wsgi_app = WSGIRequestIdMiddleware(app.wsgi_app)`` for Flask, or wrap the WSGI
    callable the server is given."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        request_id = request_id_from(environ.get(WSGI_KEY))
        environ["superagent.request_id"] = request_id
        ctx = contextvars.copy_context()
        ctx.run(REQUEST_ID.set, request_id)

        def start_with_id(status: str, headers: list[tuple[str, str]],
                          exc_info: Any = None) -> Any:
            if not any(name.lower() == HEADER_LOWER for name, _ in headers):
                headers = [*headers, (HEADER, request_id)]
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        body = ctx.run(self.app, environ, start_with_id)
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(body, (list, tuple)) or (
                isinstance(file_wrapper, type) and isinstance(body, file_wrapper)):
            # Sending these runs no app code, and wrapped they would lose what servers
            # use them for: the length of a one-item list, sendfile for a file.
            return body
        return _BoundBody(body, ctx)


class _BoundBody:
    """A WSGI response body whose iteration and ``close`` run in the request's context."""

    def __init__(self, body: Iterable[bytes], ctx: contextvars.Context) -> None:
        self._body = body
        self._ctx = ctx
        self._iter: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._iter is None:
            self._iter = self._ctx.run(iter, self._body)
        return self._ctx.run(next, self._iter)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            self._ctx.run(close)
