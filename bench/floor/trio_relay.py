"""The trio floor: a relay with no HTTP logic at all, for ``bench/proxy --with-floor``.

Each client connection gets its own upstream connection; bytes are forwarded blindly,
one read each way per request (wrk sends one request and waits for its small answer).
It is what a trio data plane waiting with ``trio.lowlevel.wait_readable`` pays before
parsing a byte: two waits per request, each an ``epoll_ctl`` and a scheduler round trip
(superagent's proxy waits on its own edge-triggered poller instead, which costs less). Not a proxy: never use it for anything else.

    python trio_relay.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import socket
import sys

import trio

BUF = 65536


async def recv(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(BUF)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def send(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def relay(client: socket.socket, upstream_port: int) -> None:
    upstream = socket.socket()
    upstream.setblocking(False)
    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        try:
            upstream.connect(("127.0.0.1", upstream_port))
        except BlockingIOError:
            await trio.lowlevel.wait_writable(upstream)
        while data := await recv(client):
            await send(upstream, data)
            answer = await recv(upstream)
            if not answer:
                return
            await send(client, answer)
    except OSError:
        return
    finally:
        client.close()
        upstream.close()


async def main(port: int, upstream_port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(relay, client, upstream_port)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]))
