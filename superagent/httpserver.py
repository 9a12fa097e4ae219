"""Serving the internal HTTP APIs (Starlette apps) with hypercorn's trio worker.

The proxy's admin API and the agent's RPC both use this; bind errors surface as
``ConfigError`` naming the address before hypercorn starts, so a taken port is a
one-line startup error rather than a traceback from deep inside the server.
``allowed_methods`` is the ``Allow`` header both apps send with a 405.

A response that starts before the app has read its request's body (a route that ignores
a body, a refusal before the upload) says ``Connection: close`` (``CloseOnUnreadBody``).
hypercorn closes the connection after such a response whenever the body's end had not
reached it yet (the rest would read as the next request), but without telling the
client, whose next request on the kept-alive connection then fails with "Server
disconnected without sending a response". Whether hypercorn has the body's end cannot be
seen from the app, so the rule is conservative: a small body that did arrive in time
costs the client a new connection too (only for answers that ignore a body: errors,
mostly).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

import trio
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from superagent.errors import ConfigError

GRACEFUL_TIMEOUT = 1.0  # internal APIs: open requests get this long when the server stops
# An idle kept-alive connection is closed by the client, never by us: httpx (the CLI, the
# agents, the coordinators) drops a pooled connection after 5 s idle, which is also
# hypercorn's default here. With equal timeouts a client sent its next request on a
# connection at the instant the server closed it, and got "Server disconnected without
# sending a response". 75 s, as nginx and the proxy keep clients' connections.
KEEP_ALIVE_TIMEOUT = 75.0


def allowed_methods(routes: Iterable[BaseRoute], scope: Scope) -> list[str]:
    """Every method some route of ``routes`` takes on the request's path (for ``Allow``)."""
    allowed: set[str] = set()
    for route in routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                allowed |= route.methods
    return sorted(allowed)


def _has_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class CloseOnUnreadBody:
    """ASGI middleware: ``Connection: close`` on a response that starts while its
    request's body is not all read (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not _has_body(scope["headers"]):
            await self.app(scope, receive, send)
            return
        read = False  # the body's last part was received

        async def receiving() -> Any:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                read = True
            return message

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start" and not read:
                headers = [(k, v) for k, v in message.get("headers", ())
                           if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receiving, sending)


def check_bindable(address: tuple[str, int], *, source: str = "", key: str = "") -> None:
    """Raise ConfigError now if ``address`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {address[0]}:{address[1]}: {exc.strerror}",
                              source=source, key=key) from None


async def serve_app(app: Any, address: tuple[str, int], *, source: str = "", key: str = "",
                    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the ASGI ``app`` on ``address`` until cancelled; raises ConfigError if the
    address cannot be bound."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    check_bindable(address, source=source, key=key)
    config = Config()
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    config.bind = [f"{host}:{address[1]}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    wrapped: Any = CloseOnUnreadBody(app)  # an ASGI app, as hypercorn types them
    await serve(wrapped, config, task_status=task_status)
