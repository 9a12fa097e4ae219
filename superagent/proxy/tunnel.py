"""Tunnels: an upgrade the upstream accepted (websocket), relayed byte for byte.

Theory of operation. What a request may offer is decided before it goes out (the
app's ``upgrades``, never h2c: ``superagent.httprules.allowed_upgrade``); when the
upstream answers 101, ``ClientConnection`` hands the exchange to ``tunnel``. The
switch is checked first (``httprules.switch_allowed``): one to a protocol that was not
offered is refused with a 502 and the connection ends, because a tunnel nobody allowed
would carry the client's later requests past routing and the forwarding headers. An
accepted one is answered to the client (``http1.switching_head``, with the cold-start
header when the request was held) together with whatever the upstream sent past its
head, the bytes the client sent early follow to the upstream, and two pumps then copy
each direction until both sides finished, passing on each half-close. Activity either
way re-arms the connection's ``websocket-idle`` deadline, which the worker's reaper
enforces like any other phase.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import trio

from superagent.httprules import switch_allowed
from superagent.proxy import hold, http1, netio
from superagent.proxy.errors import HTTPError
from superagent.proxy.netio import PeerGone, recv, send_all
from superagent.proxy.parsers import END

if TYPE_CHECKING:
    from superagent.proxy.connection import ClientConnection
    from superagent.proxy.http1 import Request
    from superagent.proxy.parsers import ResponseHead
    from superagent.proxy.snapshot import Timeouts
    from superagent.proxy.upstream import UpstreamConn


async def tunnel(client: ClientConnection, conn: UpstreamConn, req: Request,
                 resp: ResponseHead, timeouts: Timeouts) -> None:
    """Check the upstream's 101 and relay the tunnel until both sides finish; raises
    HTTPError (502, closing) for a switch that was not offered."""
    if not switch_allowed(resp.headers, req.upgrade):
        raise HTTPError(502, "upstream-bad-response",
                        "the app switched to a protocol that was not offered", close=True)
    events = conn.parser.events
    if events and events[0] is END:
        events.popleft()
    x = client.x
    assert x is not None
    x.status = 101
    x.response_started = True
    idle = timeouts.websocket_idle
    client.arm("websocket-idle", idle)
    switching = http1.switching_head(resp)
    if x.cold is not None:
        switching = hold.cold_head(switching, x.cold)
    await send_all(client.sock, switching + conn.parser.upgrade_leftover())
    early = client.parser.upgrade_leftover()
    if early:
        await send_all(conn.sock, early)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump, client, client.sock, conn.sock, idle, True)
        nursery.start_soon(_pump, client, conn.sock, client.sock, idle, False)


async def _pump(client: ClientConnection, src: socket.socket, dst: socket.socket, idle: float,
                inbound: bool) -> None:
    """Copy one direction of a tunnel; activity either way pushes the idle deadline."""
    x = client.x
    assert x is not None
    try:
        while True:
            data = await recv(src)
            if not data:
                netio.shutdown_write(dst)
                return
            client.arm("websocket-idle", idle)
            if inbound:
                x.bytes_in += len(data)
            else:
                x.bytes_out += len(data)
            await send_all(dst, data)
    except PeerGone:
        netio.shutdown_write(dst)
