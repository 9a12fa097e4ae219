"""TLS on the proxy's listeners: certificates that follow their files, and the terminator.

A listener marked ``tls`` in the routing snapshot (``tls_listen`` in docs/proxy-config.md)
hands each accepted socket to ``serve_tls`` instead of straight to a ``ClientConnection``.
``serve_tls`` does the handshake with trio's ``SSLStream`` (bounded by the
``header_timeout``), then opens a Unix socket pair: the ordinary ``ClientConnection``
serves one end exactly as it serves a TCP client, while two pump tasks move bytes
between the TLS stream and the other end. The per-request hot path therefore knows
nothing of TLS and runs the same code, compiled or not; TLS costs one extra copy per
direction on top of the cipher, which is small beside the cipher itself. End of stream
travels both ways: a client's close (close_notify or FIN) half-closes the pair, so the
connection sees end of stream as from a TCP client; the connection closing its end
makes the terminator send close_notify and close the TCP socket.

Certificates. ``CertStore.context`` returns the ``ssl.SSLContext`` of a certificate and
key file pair and loads it again when either file changed (inode, size, mtime, ctime).
It is asked at every TLS accept, so a renewed certificate serves from the next
connection on: two ``stat`` calls beside a handshake's cost, no timer, and the
listening socket is never touched (connections in flight keep the context they were
accepted with). A pair that does not load, say a new certificate written before its
new key, leaves the last good context serving; the failure is logged once per state of
the files, and the pair is loaded again as soon as they change once more.

A pair that has never loaded (the files are not there yet at boot, a mount comes late,
a renewal is half-written) is the environment's state, not a wrong setting: the worker
serves its plain listeners anyway and each TLS connection is closed before its
handshake, until an accept finds the files loadable. ``CertStore.errors`` says why for
``stats``; the failure is logged once per state of the files, as above.

``listener_problem`` holds the checks that are usage errors (a TLS listener without a
certificate, a key without one, a port listed twice), shared by the proxy's config file
and the participant's flags, which only spell the settings differently.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog
import trio

from superagent.errors import ConfigError

PUMP_SIZE = 65536  # bytes moved per read, either direction
CLOSE_TIMEOUT = 1.0  # seconds the close_notify may take before the socket is just closed

log = structlog.get_logger("superagent.proxy.tls")

# A file's identity and contents as stat() sees them; None when it cannot be read.
_Signature = tuple[int, int, int, int] | None


@dataclass(frozen=True, kw_only=True, slots=True)
class CertFiles:
    """A PEM certificate chain and its private key (``key`` None: in the same file)."""

    cert: str
    key: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ListenerProblem:
    """What is wrong with a set of listener settings: ``setting`` ("listen", "tls_listen"
    or "tls_key") is at fault; ``address`` is the listener at fault, if one is."""

    setting: str
    message: str
    address: tuple[str, int] | None = None


def listener_problem(listen: Sequence[tuple[str, int]], tls_listen: Sequence[tuple[str, int]],
                     *, cert: bool, key: bool, name: Callable[[str], str] = str
                     ) -> ListenerProblem | None:
    """The first usage error in these listeners and certificate settings, or None.

    ``name`` spells a setting as its user writes it ("tls_cert", "--tls-cert"). Whether
    the files load is not checked here: that is the environment's state (see above).
    """
    ports: set[int] = set()
    for setting, addresses in (("listen", listen), ("tls_listen", tls_listen)):
        for host, port in addresses:
            if port in ports:
                return ListenerProblem(setting=setting, address=(host, port),
                                       message=f"port {port} is listed twice")
            ports.add(port)
    if tls_listen and not cert:
        return ListenerProblem(setting="tls_listen", message=f"{name('tls_listen')} needs "
                               f"{name('tls_cert')} (a PEM certificate file)")
    if key and not cert:
        return ListenerProblem(setting="tls_key",
                               message=f"{name('tls_key')} needs {name('tls_cert')}")
    return None


def load_context(files: CertFiles) -> ssl.SSLContext:
    """A server context for ``files``; raises ConfigError naming the file and the cause."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    for path in (files.cert, files.key):
        if path is not None and "\0" in path:  # os.access would raise ValueError
            raise ConfigError(f"TLS file path {path!r} contains a NUL byte")
        if path is not None and not os.access(path, os.R_OK):
            reason = "does not exist" if not os.path.exists(path) else "is not readable"
            raise ConfigError(f"TLS file {path} {reason}")
    def no_passphrase() -> bytes:
        # Without a callback OpenSSL prompts on the controlling terminal: the agent, or a
        # worker reloading a renewed certificate, would wait there for nobody.
        raise ConfigError(f"TLS key {files.key or files.cert} is protected by a passphrase;"
                          " give an unencrypted key (openssl pkey -in KEY -out PLAIN)")

    try:
        context.load_cert_chain(files.cert, files.key, password=no_passphrase)
    except ssl.SSLError as exc:
        where = files.cert if files.key is None else f"{files.cert} and {files.key}"
        raise ConfigError(f"TLS files {where} are not a PEM certificate chain and its "
                          f"private key ({exc.reason or exc})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read TLS files: {exc}") from None
    return context


def _signature(path: str | None) -> _Signature:
    if path is None:
        return (0, 0, 0, 0)
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class CertStore:
    """The loaded context of every certificate pair in use, reloaded when its files change."""

    def __init__(self) -> None:
        self._loaded: dict[CertFiles, tuple[tuple[_Signature, _Signature], ssl.SSLContext]] = {}
        # The state of the files last refused, and why (for a pair with no context yet).
        self._refused: dict[CertFiles, tuple[tuple[_Signature, _Signature], str]] = {}

    def __repr__(self) -> str:
        return f"<CertStore pairs={len(self._loaded)} refused={len(self._refused)}>"

    def context(self, files: CertFiles) -> ssl.SSLContext:
        """The context for ``files`` as they are now, or the last good one.

        Raises ConfigError only when the pair never loaded.
        """
        seen = (_signature(files.cert), _signature(files.key))
        current = self._loaded.get(files)
        if current is not None and current[0] == seen:
            return current[1]
        refused = self._refused.get(files)
        if refused is not None and refused[0] == seen:  # refused before, and logged then
            if current is None:
                raise ConfigError(refused[1])
            return current[1]
        try:
            context = load_context(files)
        except ConfigError as exc:
            self._refused[files] = (seen, str(exc))
            if current is None:
                log.warning("TLS certificate does not load; its listeners refuse handshakes"
                            " until it does", cert=files.cert, error=str(exc))
                raise
            log.warning("TLS certificate not reloaded; the previous one keeps serving",
                        cert=files.cert, error=str(exc))
            return current[1]
        if current is not None or refused is not None:
            log.info("TLS certificate reloaded", cert=files.cert)
        self._loaded[files] = (seen, context)
        self._refused.pop(files, None)
        return context

    def errors(self) -> list[str]:
        """Why each pair with no context to serve does not load."""
        return [why for files, (_, why) in self._refused.items() if files not in self._loaded]

    def keep_only(self, wanted: set[CertFiles]) -> None:
        """Forget the pairs no listener uses any more."""
        for files in [f for f in (*self._loaded, *self._refused) if f not in wanted]:
            self._loaded.pop(files, None)
            self._refused.pop(files, None)


async def serve_tls(sock: socket.socket, context: ssl.SSLContext, handshake_timeout: float,
                    serve: Callable[[socket.socket], Awaitable[None]]) -> None:
    """Terminate TLS on the accepted ``sock`` and ``serve`` the plain end of a socket pair."""
    transport = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    # Not https_compatible: closing sends close_notify, which strict clients expect; a
    # client's EOF without one is a BrokenResourceError, taken as its end of stream.
    stream = trio.SSLStream(transport, context, server_side=True)
    done = False
    try:
        with trio.move_on_after(handshake_timeout):
            await stream.do_handshake()
            done = True
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # a scanner, a client that does not trust us, a reset: nothing to answer
    if not done:
        await trio.aclose_forcefully(transport)
        return
    inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    inner.setblocking(False)
    plain = trio.SocketStream(trio.socket.from_stdlib_socket(outer))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump, stream, plain)
        await serve(inner)  # closes ``inner`` when the connection ends


async def _pump(stream: trio.SSLStream[trio.SocketStream], plain: trio.SocketStream) -> None:
    """Move bytes both ways until the connection closes its end, then close the TLS side."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_client_to_proxy, stream, plain)
        try:
            while data := await plain.receive_some(PUMP_SIZE):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away: closing ``outer`` below tells the connection
        nursery.cancel_scope.cancel()
    with trio.move_on_after(CLOSE_TIMEOUT) as scope:
        scope.shield = True
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()  # close_notify, then the TCP socket
    await trio.aclose_forcefully(stream)
    await trio.aclose_forcefully(plain)


async def _client_to_proxy(stream: trio.SSLStream[trio.SocketStream],
                           plain: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(PUMP_SIZE):
            await plain.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    # The client is done sending: the connection reads end of stream, as from TCP.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await plain.send_eof()
