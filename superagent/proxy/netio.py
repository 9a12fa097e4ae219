"""Socket I/O for the data plane: try the syscall first, park only when it would block.

The proxy's hot path moves small messages over loopback, where most receives
and nearly all sends complete at once. Calling the non-blocking syscall first
and waiting only on ``EAGAIN`` skips trio's socket wrappers, which cost more
than the proxy's own HTTP logic. Every socket here is a non-blocking stdlib
socket owned by exactly one connection object, which closes it with ``close``.

Waiting. Trio's ``wait_readable`` re-arms a one-shot epoll registration on
every call (an ``epoll_ctl`` and some bookkeeping, twice per proxied request).
Data sockets are instead registered once, edge-triggered, in a ``Poller`` of
the run's own: one system task waits for that epoll to become readable (a
trio wait, shared by all sockets ready at once) and reschedules the tasks
parked on the sockets that got an edge. An edge nobody waits for is kept as a
flag, and a receive that filled its whole buffer sets the flag itself (more
may be queued, and no new edge would come), so a waiter never misses data.
Parked tasks stay cancellable, and ``close`` wakes them with ``PeerGone``. A task
parks through ``park.py``, which yields trio's own message built once per socket.

Errors are translated at this boundary: a peer reset or a closed socket raises
``PeerGone`` (a ``trio.BrokenResourceError``); end of stream is ``b""``.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import threading
from typing import Final

import outcome
import trio
from trio.lowlevel import (
    Abort,
    RaiseCancelT,
    RunVar,
    Task,
    current_task,
    reschedule,
    spawn_system_task,
    wait_task_rescheduled,
)

from superagent.proxy import park

RECV_SIZE: Final = 65536  # one read; also bounds what a pipelining client can make us buffer
MAX_EVENTS: Final = 512  # edges taken from the poller's epoll per wake-up

_EOF_ERRNOS: Final = frozenset({errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE})
_WATCHED: Final = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_WAKES_READER: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WAKES_WRITER: Final = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class PeerGone(trio.BrokenResourceError):
    """The peer reset the connection, or the socket was closed under us."""


class _Side:
    """One direction of a watched socket: the task parked on it, or an edge kept for it."""

    __slots__ = ("edge", "message", "task")

    def __init__(self) -> None:
        self.task: Task | None = None
        self.edge = False  # an edge came while no task waited
        self.message = park.message(self.abort)  # what a parked task yields (park.py)

    def __repr__(self) -> str:
        return f"<_Side task={self.task is not None} edge={self.edge}>"

    def abort(self, _: RaiseCancelT) -> Abort:
        self.task = None
        return Abort.SUCCEEDED

    def wake(self) -> None:
        task = self.task
        if task is None:
            self.edge = True
        else:
            self.task = None
            reschedule(task)

    def fail(self) -> None:
        """The socket is closed: the parked task sees ClosedResourceError."""
        if self.task is not None:
            reschedule(self.task, outcome.Error(trio.ClosedResourceError("socket closed")))
            self.task = None
        self.message = None  # it holds a bound method of self: no cycle left

    async def wait(self, doing: str) -> None:
        """Park until the next edge (at once if one was kept); raises PeerGone."""
        if self.edge:
            self.edge = False
            return
        if self.task is not None:
            raise trio.BusyResourceError(f"another task is already {doing} on this socket")
        self.task = current_task()
        try:
            if self.message is not None:
                (await park.park(self.message)).unwrap()
            else:
                await wait_task_rescheduled(self.abort)
        except trio.ClosedResourceError:
            raise PeerGone("socket closed") from None


class _Watch:
    """One registered socket and its two directions."""

    __slots__ = ("read", "sock", "write")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock  # held, so its fd cannot be reused while registered
        self.read = _Side()
        self.write = _Side()

    def __repr__(self) -> str:
        return f"<_Watch fd={self.sock.fileno()} read={self.read!r} write={self.write!r}>"


class Poller:
    """The run's edge-triggered epoll for data sockets (see the module docstring)."""

    __slots__ = ("_by_fd", "_epoll", "_watches", "running")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watches: dict[socket.socket, _Watch] = {}
        self._by_fd: dict[int, _Watch] = {}
        self.running = True  # until its run ends (its system task is cancelled then)

    def __repr__(self) -> str:
        return f"<Poller watched={len(self._watches)}>"

    def watch(self, sock: socket.socket) -> _Watch:
        w = self._watches.get(sock)
        if w is None:
            fd = sock.fileno()
            if fd < 0:
                raise PeerGone("socket closed")
            stale = self._by_fd.get(fd)
            if stale is not None:  # its socket was closed without ``close``: the fd is reused
                self._drop(stale, fd)
            w = _Watch(sock)
            # Registering reports the current state as an edge: nothing before it is missed.
            self._epoll.register(fd, _WATCHED)
            self._watches[sock] = w
            self._by_fd[fd] = w
        return w

    def close(self, sock: socket.socket) -> bool:
        """Forget ``sock`` and wake its waiters; False when it was never watched."""
        w = self._watches.get(sock)
        if w is None:
            return False
        fd = sock.fileno()
        with contextlib.suppress(OSError):  # closing would drop it too, unless the fd was dup()ed
            self._epoll.unregister(fd)
        self._drop(w, fd)
        return True

    def _drop(self, w: _Watch, fd: int) -> None:
        del self._watches[w.sock]
        del self._by_fd[fd]
        w.read.fail()
        w.write.fail()

    async def run(self) -> None:
        epoll = self._epoll
        by_fd = self._by_fd
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, flags in epoll.poll(0, MAX_EVENTS):
                    w = by_fd.get(fd)
                    if w is None:
                        continue
                    if flags & _WAKES_READER:
                        w.read.wake()
                    if flags & _WAKES_WRITER:
                        w.write.wake()
        finally:
            self.running = False
            epoll.close()


_POLLER: Final[RunVar[Poller]] = RunVar("superagent.proxy.netio.poller")


class _Latest(threading.local):
    """The poller of the trio run this thread runs: a faster path than the RunVar."""

    poller: Poller | None = None


_latest: Final = _Latest()


def poller() -> Poller:
    """This run's poller, started on first use."""
    # A thread runs one trio run at a time, and a run's poller stops running with it.
    p = _latest.poller
    if p is not None and p.running:
        return p
    try:
        p = _POLLER.get()
    except LookupError:
        p = Poller()
        _POLLER.set(p)
        spawn_system_task(p.run, name="superagent.proxy.netio.poller")
    _latest.poller = p
    return p


async def recv(sock: socket.socket, wait_first: bool = False) -> bytes:
    """The next bytes from ``sock`` (``b""`` at end of stream); raises PeerGone.

    ``wait_first`` is for when the peer cannot have answered yet (a reply to what was
    just sent): it saves the receive that would fail with ``EAGAIN``.
    """
    while True:
        if wait_first:
            await poller().watch(sock).read.wait("receiving")
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            wait_first = True
            continue
        except OSError as exc:
            if exc.errno in _EOF_ERRNOS:
                return b""
            raise PeerGone(str(exc)) from None
        if len(data) == RECV_SIZE:
            poller().watch(sock).read.edge = True  # more may be queued, and no new edge would come
        return data


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
        await poller().watch(sock).write.wait("sending")
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
            await poller().watch(sock).write.wait("sending")
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, errno.errorcode.get(code, str(code)))
    except BaseException:
        close(sock)
        raise
    return sock


def close(sock: socket.socket) -> None:
    """Close ``sock`` and wake any task waiting on it (it sees PeerGone).

    Also for a listening socket, which the worker waits on with trio's own
    ``wait_readable`` (its waiter sees ``trio.ClosedResourceError``).
    """
    if sock.fileno() < 0:
        return
    try:
        watched = _POLLER.get().close(sock)
    except LookupError:
        watched = False
    except RuntimeError:  # outside a trio run: nobody can be waiting
        sock.close()
        return
    if not watched:
        trio.lowlevel.notify_closing(sock)
    sock.close()


def shutdown_write(sock: socket.socket) -> None:
    """Half-close: the peer reads end of stream, and may go on sending."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def prepare_accepted(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
