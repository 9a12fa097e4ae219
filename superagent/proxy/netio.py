"""Socket I/O for the data plane: try the syscall first, park in trio only when it would block.

The proxy's hot path moves small messages over loopback, where most receives
and nearly all sends complete at once. Calling the non-blocking syscall first
and waiting with ``trio.lowlevel.wait_readable``/``wait_writable`` only on
``EAGAIN`` skips trio's socket wrappers, which cost more than the proxy's own
HTTP logic. Every socket here is a non-blocking stdlib socket owned by exactly
one connection object, which closes it.

Errors are translated at this boundary: a peer reset or a closed socket raises
``PeerGone`` (a ``trio.BrokenResourceError``); end of stream is ``b""``.
"""

from __future__ import annotations

import contextlib
import errno
import socket

import trio
from trio.lowlevel import wait_readable, wait_writable

RECV_SIZE = 65536  # one read; also bounds what a pipelining client can make us buffer


_EOF_ERRNOS = frozenset({errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE})


class PeerGone(trio.BrokenResourceError):
    """The peer reset the connection, or the socket was closed under us."""


async def recv(sock: socket.socket, wait_first: bool = False) -> bytes:
    """The next bytes from ``sock`` (``b""`` at end of stream); raises PeerGone.

    ``wait_first`` is for when the peer cannot have answered yet (a reply to what was
    just sent): it saves the receive that would fail with ``EAGAIN``.
    """
    while True:
        if wait_first:
            try:
                await wait_readable(sock)
            except trio.ClosedResourceError:
                raise PeerGone("socket closed") from None
        try:
            return sock.recv(RECV_SIZE)
        except BlockingIOError:
            wait_first = True
        except OSError as exc:
            if exc.errno in _EOF_ERRNOS:
                return b""
            raise PeerGone(str(exc)) from None


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Write all of ``data``, waiting while the peer's window is full; raises PeerGone."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise PeerGone(str(exc)) from None
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    while view:
        try:
            await wait_writable(sock)
        except trio.ClosedResourceError:
            raise PeerGone("socket closed") from None
        try:
            sent = sock.send(view)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise PeerGone(str(exc)) from None
        view = view[sent:]


async def connect(address: tuple[str, int]) -> socket.socket:
    """A connected non-blocking TCP socket; raises OSError (the caller bounds the time)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(address)
        if code == errno.EINPROGRESS:
            await wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, errno.errorcode.get(code, str(code)))
    except BaseException:
        close(sock)
        raise
    return sock


def close(sock: socket.socket) -> None:
    """Close ``sock`` and wake any task waiting on it (it sees PeerGone)."""
    if sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)
        sock.close()


def shutdown_write(sock: socket.socket) -> None:
    """Half-close: the peer reads end of stream, and may go on sending."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def prepare_accepted(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
