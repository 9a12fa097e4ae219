"""A proxy worker process: listeners, connections, and its control socket.

Several workers bind the same ports with SO_REUSEPORT and the kernel spreads
connections over them. A worker starts with no listeners and waits for its
first routing snapshot on the control socket; each snapshot may add or remove
listeners (bound before the swap, so a port that cannot be bound refuses the
snapshot and the old one stays in force).

SIGTERM (or SIGINT) stops accepting, lets connections finish their current
exchange within the grace period, closes idle keep-alive connections, then
exits. Run as ``python -m superagent.proxy.worker --control PATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import time
from typing import Any

import structlog
import trio

from superagent.compiled import status as compiled_status
from superagent.errors import ConfigError
from superagent.log import setup_logging
from superagent.proxy import control, http1, netio, tls
from superagent.proxy.accesslog import AccessLog
from superagent.proxy.config import PARSERS, snapshot_from_wire
from superagent.proxy.connection import ClientConnection
from superagent.proxy.http1 import Peer
from superagent.proxy.snapshot import Listener, RoutingSnapshot
from superagent.proxy.state import WorkerState

BACKLOG = 4096  # connections the kernel queues per listener while the worker is busy
ACCESS_LOG_FLUSH = 0.5  # seconds between access-log batch writes when traffic is light
REAP_TICK = 0.05  # timeout precision: deadlines are checked this often
ACCEPT_BACKOFF = 0.1  # pause after accept() fails for lack of descriptors
# Answered, best effort, to a connection beyond max_connections before it is closed.
OVERLOAD_RESPONSE = http1.error_response(503, "too-many-connections",
                                         "the proxy worker is at its connection limit", b"-",
                                         close=True)

log = structlog.get_logger("superagent.proxy.worker")


def bind_listener(listener: Listener) -> socket.socket:
    """A non-blocking listening socket shared with the other workers (SO_REUSEPORT);
    raises OSError."""
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((listener.host, listener.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Worker:
    """State and tasks of one worker process."""

    def __init__(self, *, parser: str, grace: float, access_log: AccessLog | None) -> None:
        empty = RoutingSnapshot(version=0, listeners=(), apps=())
        self.state = WorkerState(parser=parser, snapshot=empty, access_log=access_log)
        self.grace = grace
        self._listeners: dict[tuple[str, int], tuple[socket.socket, trio.CancelScope]] = {}
        self._tls: dict[tuple[str, int], tls.CertFiles] = {}  # the TLS listeners' files
        self.certs = tls.CertStore()
        self._connections: trio.Nursery | None = None
        self._listen_nursery: trio.Nursery | None = None
        self._all_closed = trio.Event()

    def __repr__(self) -> str:
        return f"<Worker pid={os.getpid()} {self.state!r} listeners={sorted(self._listeners)}>"

    async def run(self, control_path: str, lifeline: int | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until SIGTERM/SIGINT (or EOF on the ``lifeline`` fd: the driver died), then
        drain connections within the grace period."""
        stop = trio.Event()
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as connections:
                self._connections = connections
                async with trio.open_nursery() as listeners:
                    self._listen_nursery = listeners
                    await outer.start(control.serve_control, control_path, self.handle)
                    await outer.start(self._watch_signals, stop)
                    if lifeline is not None:
                        outer.start_soon(self._watch_lifeline, lifeline, stop)
                    outer.start_soon(self._reap)
                    await outer.start(self.state.holds.run_wakes)  # cold starts' wakes
                    if self.state.access_log is not None:
                        outer.start_soon(self._flush_access_log)
                    task_status.started()
                    log.info("worker ready", control=control_path,
                             compiled=all(compiled_status().values()))
                    await stop.wait()
                    self._stop_listening()
                    listeners.cancel_scope.cancel()
                self.state.begin_shutdown()
                if not self.state.live:
                    self._all_closed.set()
                with trio.move_on_after(self.grace):
                    await self._all_closed.wait()
                connections.cancel_scope.cancel()
            outer.cancel_scope.cancel()
        if self.state.access_log is not None:
            self.state.access_log.flush()
        self.state.upstreams.close_all()
        log.info("worker stopped")

    async def _watch_signals(self, stop: trio.Event,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                log.info("worker stopping", signal=signal.Signals(signum).name,
                         connections=self.state.connections, grace=self.grace)
                stop.set()
                return

    async def _watch_lifeline(self, fd: int, stop: trio.Event) -> None:
        """The driver holds the other end of this pipe: EOF means it is gone."""
        await trio.lowlevel.wait_readable(fd)
        log.info("worker stopping", reason="its driver exited",
                 connections=self.state.connections, grace=self.grace)
        stop.set()

    async def _reap(self) -> None:
        while True:
            await trio.sleep(REAP_TICK)
            self.state.reap(time.monotonic())

    async def _flush_access_log(self) -> None:
        assert self.state.access_log is not None
        while True:
            await trio.sleep(ACCESS_LOG_FLUSH)
            self.state.access_log.flush()

    # ------------------------------------------------------------------ control
    async def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        kind = message.get("type")
        state = self.state
        if kind == "snapshot":
            snapshot = snapshot_from_wire(message.get("snapshot") or {})
            self.apply(snapshot)
            return {"ok": True, "version": snapshot.version}
        if kind == "drain":
            instance = message.get("instance")
            if not isinstance(instance, str):
                raise ValueError("drain needs an 'instance' id")
            up = state.upstreams.set_draining(instance, bool(message.get("draining", True)))
            if up is None:
                return {"ok": False, "error": f"unknown instance {instance!r}"}
            if not up.draining:
                state.settle_holds()  # an idling called off: what it held may go now
            return {"ok": True, "in_flight": up.outstanding, "draining": up.draining}
        if kind == "node":
            state.node_draining = bool(message.get("draining", True))
            return {"ok": True, "draining": state.node_draining}
        if kind == "stats":
            return {"ok": True, "pid": os.getpid(),
                    "stats": {**state.stats(), "tls_errors": self.certs.errors()}}
        if kind == "ping":
            return {"ok": True, "pid": os.getpid(), "version": state.table.version}
        raise ValueError(f"unknown control message type {kind!r}")

    def apply(self, snapshot: RoutingSnapshot) -> None:
        """Bind new listeners, swap the table, then close listeners no longer wanted.

        Raises ConfigError (nothing changed) when a new port cannot be bound.
        """
        assert self._listen_nursery is not None
        wanted = {(lst.host, lst.port): lst for lst in snapshot.listeners}
        secure = self._tls_files(snapshot)
        fresh: dict[tuple[str, int], socket.socket] = {}
        for key, lst in wanted.items():
            if key in self._listeners:
                continue
            try:
                fresh[key] = bind_listener(lst)
            except OSError as exc:
                for sock in fresh.values():
                    sock.close()
                raise ConfigError(f"cannot listen on {lst.host}:{lst.port}: {exc.strerror}"
                                  ) from None
        self.state.apply(snapshot)
        self._tls = secure
        self.certs.keep_only(set(secure.values()))
        for key, sock in fresh.items():
            scope = trio.CancelScope()
            self._listeners[key] = (sock, scope)
            self._listen_nursery.start_soon(self._accept, sock, key, scope)
        for key in [k for k in self._listeners if k not in wanted]:
            sock, scope = self._listeners.pop(key)
            scope.cancel()
            netio.close(sock)
        log.info("snapshot applied", version=snapshot.version, apps=len(snapshot.apps),
                 listeners=[f"{h}:{p}" for h, p in wanted])

    def _tls_files(self, snapshot: RoutingSnapshot) -> dict[tuple[str, int], tls.CertFiles]:
        """The TLS listeners of ``snapshot`` and their files, loaded once now so a pair that
        does not load is logged when the snapshot arrives. Such a pair does not refuse the
        snapshot: the plain listeners serve, and the TLS ones close each connection until
        the files load (tls.py)."""
        s = snapshot.settings
        if s.tls_cert is None:
            return {}
        files = tls.CertFiles(cert=s.tls_cert, key=s.tls_key)
        with contextlib.suppress(ConfigError):  # CertStore logged it
            self.certs.context(files)
        return {(lst.host, lst.port): files for lst in snapshot.listeners if lst.tls}

    def _stop_listening(self) -> None:
        for sock, scope in self._listeners.values():
            scope.cancel()
            netio.close(sock)
        self._listeners.clear()

    async def _accept(self, listener: socket.socket, key: tuple[str, int],
                      scope: trio.CancelScope) -> None:
        assert self._connections is not None
        nursery = self._connections
        port = key[1]
        with scope:
            while True:
                try:
                    sock, address = listener.accept()
                except BlockingIOError:
                    try:
                        await trio.lowlevel.wait_readable(listener)
                    except trio.ClosedResourceError:
                        return
                    continue
                except OSError as exc:  # EMFILE and friends: back off instead of spinning
                    if listener.fileno() < 0:
                        return
                    log.warning("accept failed", error=str(exc), port=port)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                netio.prepare_accepted(sock)
                # Looked up per accept: a snapshot may have switched the listener's TLS.
                nursery.start_soon(self._serve, sock, port, address[0], self._tls.get(key))

    async def _serve(self, sock: socket.socket, port: int, peer_ip: str,
                     tls_files: tls.CertFiles | None = None) -> None:
        """Serve one accepted connection; ``tls_files``: it arrived on a TLS listener."""
        state = self.state
        if len(state.live) >= state.settings.max_connections:
            with contextlib.suppress(OSError):  # best effort: the socket buffer takes it or not
                sock.send(OVERLOAD_RESPONSE)
            netio.close(sock)
            return
        try:
            if tls_files is None:
                await ClientConnection(sock, state, port, peer_ip).run()
            else:
                await tls.serve_tls(sock, self.certs.context(tls_files),
                                    state.settings.header_timeout,
                                    lambda plain: self._serve_https(plain, port, peer_ip))
        except ConfigError:  # the pair never loaded yet: no handshake (CertStore logged it)
            netio.close(sock)
        except Exception:
            log.exception("connection failed", port=port)
        finally:
            if state.closing and not state.live:
                self._all_closed.set()

    async def _serve_https(self, plain: socket.socket, port: int, peer_ip: str) -> None:
        """A ``ClientConnection`` on the plain end of a TLS connection (tls.py)."""
        conn = ClientConnection(plain, self.state, port, peer_ip)
        conn.peer = Peer(ip=conn.peer.ip, trusted=conn.peer.trusted, proto=b"https")
        await conn.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="superagent-proxy-worker")
    parser.add_argument("--control", required=True, help="Unix socket path for the driver")
    parser.add_argument("--parser", choices=PARSERS, default="httptools")
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("--lifeline-fd", type=int,
                        help="stop when this pipe reports EOF (its writer, the driver, exited)")
    parser.add_argument("--ready-fd", type=int, help="write one line here once serving control")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, json=True)
    out = sys.stdout.buffer
    access_log = AccessLog(lambda data: (out.write(data), out.flush()))
    worker = Worker(parser=args.parser, grace=args.grace, access_log=access_log)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run, args.control, args.lifeline_fd)
            if args.ready_fd is not None:
                os.write(args.ready_fd, b"ready\n")
                os.close(args.ready_fd)

    trio.run(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
