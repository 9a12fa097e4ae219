"""The internal APIs' HTTP server (``superagent.httpserver``), with real sockets."""

from __future__ import annotations

import socket

import httpx
import trio
from starlette.applications import Starlette
from starlette.requests import Request
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


async def _exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send ``request``; the answer up to and including its body ("hi...")."""
    sock.sendall(request)
    reply = b""
    with trio.fail_after(10):
        while b"hi" not in reply:
            chunk = await trio.to_thread.run_sync(sock.recv, 4096)
            assert chunk, f"the server closed the connection: {reply!r}"
            reply += chunk
    return reply


async def test_an_answer_before_the_body_is_read_closes_the_connection() -> None:
    """A route that answers without reading the request's body (here before the body has
    even arrived) says Connection: close, so no client sends its next request on a
    connection the server is closing; a request whose body was read keeps it open."""
    async def ignores(_: object) -> PlainTextResponse:
        return PlainTextResponse("hi")

    async def reads(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"hi {len(await request.body())}")

    app = Starlette(routes=[Route("/", ignores), Route("/read", reads, methods=["POST"])])
    port = free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(httpserver.serve_app, app, ("127.0.0.1", port))
        sock = socket.create_connection(("127.0.0.1", port))
        try:
            head = await _exchange(sock, b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\n")
            assert b"\r\nconnection: close\r\n" in head.lower(), head
        finally:
            sock.close()
        sock = socket.create_connection(("127.0.0.1", port))
        try:
            request = b"POST /read HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nab"
            head = await _exchange(sock, request)
            assert b"connection: close" not in head.lower(), head
            assert b"hi 2" in await _exchange(sock, request)  # the same connection, reused
        finally:
            sock.close()
        nursery.cancel_scope.cancel()
