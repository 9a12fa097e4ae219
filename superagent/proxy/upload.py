"""A request body streamed from the client to the upstream, beside the response wait.

Theory of operation. A body that is not in hand when the request goes out (the common
small body is, and goes out with the head) is uploaded by ``Upload.run``, a second task
of the exchange, while ``ClientConnection`` waits for the response; each piece is read
from the client only after the previous one was written upstream (back-pressure).

The upload has its own timeouts (the connection's deadline belongs to the response side) and
never raises: a failure is kept in ``error`` and the upstream connection is closed, so
the app can never take a truncated body for a whole one.

A client that drips its body would otherwise hold a connection and an upstream for as
long as each byte comes within ``idle``. So the time spent waiting for the client is
cut into windows of ``timeouts.body_window``: each must bring ``app.min_body_rate``
bytes per second on average, and the whole body must arrive within ``timeouts.body``
(when set). Waiting for the app to read does not count against the client. Each
failure is the client's: 408 ``client-body-timeout``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import trio

from superagent.proxy import http1
from superagent.proxy.errors import HTTPError, UpstreamError
from superagent.proxy.netio import PeerGone, recv, send_all
from superagent.proxy.parsers import END, ParseFailure

if TYPE_CHECKING:
    from superagent.proxy.connection import ClientConnection
    from superagent.proxy.http1 import Request
    from superagent.proxy.snapshot import Timeouts
    from superagent.proxy.upstream import UpstreamConn


class Upload:
    """The upload of one request body (see the module docstring)."""

    __slots__ = ("client", "conn", "done", "error", "req", "timeouts")

    def __init__(self, client: ClientConnection, conn: UpstreamConn, req: Request,
                 timeouts: Timeouts) -> None:
        self.client = client
        self.conn = conn
        self.req = req
        self.timeouts = timeouts
        self.done = trio.Event()
        self.error: HTTPError | None = None

    def __repr__(self) -> str:
        return f"<Upload done={self.done.is_set()} error={self.error!r}>"

    async def run(self) -> None:
        client = self.client
        x = client.x
        assert x is not None
        events = client.events
        app = client.state.table.apps.get(x.app)
        max_body = app.max_body if app is not None else 0
        rate = app.min_body_rate if app is not None else 0
        chunked = self.req.chunked
        upstream = self.conn.sock
        timeouts = self.timeouts
        idle = timeouts.idle
        window = timeouts.body_window
        deadline = trio.current_time() + timeouts.body if timeouts.body > 0 else math.inf
        waited = 0.0  # time spent waiting for the client in the current window
        arrived = 0  # bytes the client sent in it
        size = 0
        try:
            if self.req.expect_continue:
                await send_all(client.sock, http1.CONTINUE)
            while True:
                while not events:
                    began = trio.current_time()
                    wait = min(idle, deadline - began, window - waited if rate else idle)
                    data = b""
                    with trio.move_on_after(max(wait, 0.0)) as slow:
                        data = await recv(client.sock)
                    now = trio.current_time()
                    waited += now - began
                    arrived += len(data)
                    if now >= deadline:
                        raise HTTPError(408, "client-body-timeout",
                                        "request body not received within the body timeout",
                                        close=True)
                    if rate and waited >= window:
                        if arrived < rate * waited:
                            raise HTTPError(408, "client-body-timeout",
                                            f"request body slower than {rate} bytes/s",
                                            close=True)
                        waited = 0.0
                        arrived = 0
                    elif slow.cancelled_caught:
                        raise HTTPError(408, "client-body-timeout",
                                        "request body not received in time", close=True)
                    if slow.cancelled_caught:
                        continue
                    if not data:
                        client.parser.feed_eof()
                        if not events:
                            raise HTTPError(400, "bad-request", "client closed mid-body",
                                            close=True)
                    else:
                        client.parser.feed(data)
                event = events.popleft()
                if event is END:
                    break
                if type(event) is bytes:
                    size += len(event)
                    if max_body and size > max_body:
                        raise HTTPError(413, "body-too-large",
                                        f"request body exceeds the app's limit of {max_body}"
                                        " bytes", close=True)
                    with trio.move_on_after(idle) as stuck:
                        await send_all(upstream, http1.chunk(event) if chunked else event)
                    if stuck.cancelled_caught:
                        raise UpstreamError(504, "upstream-idle-timeout",
                                            "the app stopped reading the request body")
                elif isinstance(event, ParseFailure):
                    raise http1.refusal(event)
            if chunked:
                await send_all(upstream, http1.LAST_CHUNK)
            x.bytes_in += size
            x.body_consumed = True
            client.arm("first-byte", self.timeouts.first_byte)
        except HTTPError as exc:
            self.error = exc
            self.conn.close()
        except PeerGone:
            self.error = HTTPError(502, "upload-failed", "a peer closed the connection during"
                                   " the request body upload", close=True)
            self.conn.close()
        finally:
            self.done.set()
