"""The upload's and the tunnel's own failure answers and access-log records, on the wire.

A body still arriving when the request goes out is streamed by ``upload.Upload``; an
accepted 101 is relayed by ``tunnel.tunnel``. Their other paths are covered elsewhere
(slow bodies in test_hardening, relaying in test_connection); these pin the answers
nothing else checked: a client that ends its body early gets 400, an app that stops
reading the body 504 ``upstream-idle-timeout``, and a tunnel's access record counts the
bytes each way after the switch. Each runs against both parsers over real loopback
sockets (see conftest.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

import trio

from tests.proxy.conftest import DEADLINE, build_request
from tests.proxy.test_connection import (
    SERVER_HELLO,
    WS_HEADERS,
    app,
    assert_error,
    websocket_or_echo,
)

BIG_BODY = 32 * 1024 * 1024  # more than loopback's socket buffers hold between proxy and app


async def reads_the_head_only(conn: Any) -> None:
    """An app that takes a request's head and then never reads again (nor answers)."""
    if await conn.read_head() is not None:
        await trio.sleep_forever()


async def send_quietly(client: Any, data: bytes) -> None:
    """Send ``data`` until the proxy closes the connection under it."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await client.stream.send_all(data)


async def test_a_client_that_ends_its_body_early_gets_400(make_proxy, upstream):
    """The client half-closes after 10 of 100 announced bytes: the upload refuses the
    request with 400 ``bad-request`` (logged so), and the app never sees a whole body."""
    async with upstream("never") as up, make_proxy({"web": app(up)}) as proxy:
        client = await proxy.connect()
        await client.send(build_request("POST", "/upload", {"Content-Length": "100"}))
        await up.wait_for(lambda: bool(up.requests))  # the body is now the upload's
        await client.send(b"x" * 10)
        await client.send_eof()
        resp = await client.read_response()
        assert_error(resp, 400, "bad-request")
        assert resp.header("connection") == "close"
        entries = await proxy.access_log(1)
        assert entries[0]["status"] == 400 and entries[0]["error"] == "bad-request", entries
        await up.wait_for(lambda: bool(up.conns) and up.conns[0].eof)
        assert not up.requests[0].complete


async def test_an_app_that_stops_reading_the_body_gets_504(make_proxy, upstream):
    """Once the app's socket buffers are full and it reads no more for ``idle``, the
    upload gives up: 504 ``upstream-idle-timeout``, and the access log says so."""
    async with upstream(reads_the_head_only) as up, make_proxy(
            {"web": app(up, max_body=0, timeouts={"idle": "0.3s"})}) as proxy:
        client = await proxy.connect()
        await client.send(build_request("POST", "/upload", {"Content-Length": str(BIG_BODY)}))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_quietly, client, b"x" * BIG_BODY)
            try:
                resp = await client.read_response(timeout=DEADLINE)
            finally:
                nursery.cancel_scope.cancel()
        assert_error(resp, 504, "upstream-idle-timeout")
        entries = await proxy.access_log(1)
        assert entries[0]["status"] == 504, entries
        assert entries[0]["error"] == "upstream-idle-timeout", entries


async def test_a_tunnels_access_record_counts_the_bytes_after_the_switch(make_proxy,
                                                                          upstream):
    """A websocket tunnel is logged once it ends: status 101, no error, ``bytes_in`` what
    the client sent through it, ``bytes_out`` what came back (the app's hello may arrive
    with the 101 head, which is not counted)."""
    async with upstream(websocket_or_echo) as up, make_proxy({"web": app(up)}) as proxy:
        client = await proxy.connect()
        await client.send(build_request("GET", "/ws", WS_HEADERS))
        resp = await client.read_response(upgrade=b"websocket")
        assert resp.status == 101, resp
        assert await client.receive_exactly(len(SERVER_HELLO)) == SERVER_HELLO
        sent = 0
        for piece in (b"\x81\x05hello", bytes(range(256)) * 40):
            await client.send(piece)
            assert await client.receive_exactly(len(piece)) == piece
            sent += len(piece)
        await client.send_eof()
        await client.wait_closed()
        [entry] = await proxy.access_log(1)
        assert entry["status"] == 101 and entry["error"] is None, entry
        assert entry["method"] == "GET" and entry["path"] == "/ws", entry
        assert entry["bytes_in"] == sent, entry
        assert sent <= entry["bytes_out"] <= sent + len(SERVER_HELLO), entry
        assert entry["first_byte_ms"] is None and "cold_start_ms" not in entry, entry
