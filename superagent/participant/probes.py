"""What the supervisor asks of a running app: its health answer and its listening ports.

``probe`` sends one ``GET`` over HTTP/1.1 (h11) to 127.0.0.1:port: a 2xx answer to the
health path is healthy; with no health path, any HTTP answer below 500 to ``GET /`` is
(an accepted TCP connection alone is not). The caller bounds it with a timeout; network
and protocol errors are a failed probe, never raised. ``listening_ports`` reads, through
psutil, the TCP ports an app's process tree listens on, so that an app listening
elsewhere than on $PORT fails its start at once rather than at its ready deadline.
"""

from __future__ import annotations

import contextlib

import h11
import psutil
import trio

MAX_RESPONSE_HEAD = 16 * 1024  # a health answer's status line and headers fit in this


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process ``pid`` and its descendants listen on (empty when gone)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return set()
    ports: set[int] = set()
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            ports.update(conn.laddr.port for conn in proc.net_connections(kind="tcp")
                         if conn.status == psutil.CONN_LISTEN and conn.laddr)
    return ports


async def probe(port: int, path: str | None) -> bool:
    """True when ``GET path`` on 127.0.0.1:port answers 2xx; with no ``path``, when
    ``GET /`` gets any HTTP answer below 500 (the app serves HTTP; an accepted TCP
    connection alone is not enough).

    The caller bounds it with a timeout. Never raises for network or protocol errors.
    """
    # a plain socket, not ``open_tcp_stream`` (a happy-eyeballs nursery): a booting app's
    # refused connect costs the agent about 50 us of CPU instead of 180
    try:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    except OSError:  # out of file descriptors: a failed probe too
        return False
    try:
        await sock.connect(("127.0.0.1", port))
    except BaseException as exc:  # refused, or cancelled mid-connect
        sock.close()
        if isinstance(exc, OSError):
            return False
        raise
    async with trio.SocketStream(sock) as stream:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        request = h11.Request(method="GET", target=path or "/",
                              headers=[("Host", f"127.0.0.1:{port}"), ("Connection", "close"),
                                       ("User-Agent", "superagent-health")])
        try:
            await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(4096)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    return (200 <= event.status_code < 300 if path
                            else event.status_code < 500)
                if isinstance(event, h11.ConnectionClosed):
                    return False
        except (OSError, trio.BrokenResourceError, h11.ProtocolError):
            return False
