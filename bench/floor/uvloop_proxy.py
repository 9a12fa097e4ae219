"""An asyncio + uvloop + llhttp proxy with superagent's per-request header work, for
``bench/proxy --with-floor``: what a non-trio data plane could reach on this machine.

Per request it parses both directions with httptools, routes by path prefix, drops
hop-by-hop and client-supplied forwarding headers, adds X-Forwarded-For/-Proto,
X-Request-Id and Via, and reuses pooled keep-alive upstream connections. It has none of
the rest (timeouts, limits, streaming back-pressure, upgrades, retries, metrics): a
measuring stick, not a proxy. Needs ``pip install uvloop``.

    python uvloop_proxy.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any

import httptools
import uvloop

DROPPED = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                     b"transfer-encoding", b"upgrade", b"x-forwarded-for",
                     b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"via"})
ROUTES = ((b"/api/", "api"), (b"/", "root"))
UPSTREAM_PORT = 0
POOL: list[Upstream] = []


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.client: Client | None = None
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self in POOL:
            POOL.remove(self)
        if self.client is not None:
            self.client.transport.close()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in DROPPED:
            self.headers += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        assert self.client is not None
        head = b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code()
        self.client.transport.write(b"".join((head, *self.headers,
                                              b"Via: 1.1 superagent\r\n\r\n")))
        self.headers = []

    def on_body(self, body: bytes) -> None:
        assert self.client is not None
        self.client.transport.write(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        POOL.append(self)
        assert client is not None
        client.done()


class Client(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.peer = transport.get_extra_info("peername")[0].encode()
        self.queue: list[bytes] = []
        self.busy = False
        self.url = b""
        self.headers: list[bytes] = []
        self.request_id: bytes | None = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.request_id = b"", [], None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"x-request-id":
            self.request_id = value
        elif lower not in DROPPED:
            self.headers += (name, b": ", value, b"\r\n")

    def on_message_complete(self) -> None:
        path = httptools.parse_url(self.url).path
        self.app = next(app for prefix, app in ROUTES if path.startswith(prefix))
        request_id = self.request_id or uuid.uuid4().hex.encode()
        self.queue.append(b"".join((
            self.parser.get_method(), b" ", self.url, b" HTTP/1.1\r\n", *self.headers,
            b"X-Forwarded-For: ", self.peer, b"\r\nX-Forwarded-Proto: http\r\n",
            b"X-Request-Id: ", request_id, b"\r\nVia: 1.1 superagent\r\n\r\n")))
        self.pump()

    def pump(self) -> None:
        if self.busy or not self.queue:
            return
        self.busy = True
        request = self.queue.pop(0)
        if POOL:
            upstream = POOL.pop()
            upstream.client = self
            upstream.transport.write(request)
        else:
            self.connecting = asyncio.ensure_future(self.connect(request))

    async def connect(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        transport, upstream = await loop.create_connection(Upstream, "127.0.0.1", UPSTREAM_PORT)
        upstream.client = self
        transport.write(request)

    def done(self) -> None:
        self.busy = False
        self.pump()


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    UPSTREAM_PORT = int(sys.argv[2])
    uvloop.run(main(int(sys.argv[1])))
