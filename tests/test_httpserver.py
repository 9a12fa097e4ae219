"""The internal APIs' HTTP server (``superagent.httpserver``), with real sockets."""

from __future__ import annotations

import socket

import httpx
import trio
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from superagent import httpserver
from tests.support.ports import free_port


async def test_a_connection_idle_past_the_clients_expiry_still_answers() -> None:
    """A kept-alive connection, idle for longer than httpx's pool expiry, is still open."""
    async def hello(_: object) -> PlainTextResponse:
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/", hello)])
    port = free_port()
    request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"
    async with trio.open_nursery() as nursery:
        await nursery.start(httpserver.serve_app, app, ("127.0.0.1", port))
        sock = socket.create_connection(("127.0.0.1", port))
        try:
            await _exchange(sock, request)
            # idle past the clients' pool expiry: the thing under test, not a wait
            await trio.sleep((httpx.Limits().keepalive_expiry or 5.0) + 0.5)
            await _exchange(sock, request)
        finally:
            sock.close()
        nursery.cancel_scope.cancel()


async def _exchange(sock: socket.socket, request: bytes) -> None:
    sock.sendall(request)
    reply = b""
    with trio.fail_after(10):
        while b"hi" not in reply:
            chunk = await trio.to_thread.run_sync(sock.recv, 4096)
            assert chunk, f"the server closed the connection: {reply!r}"
            reply += chunk
