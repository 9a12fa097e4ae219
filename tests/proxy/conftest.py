"""Socket-level harness for the proxy: an in-process worker, real upstreams, a raw client.

Everything runs in the test's trio loop on loopback:

* ``make_proxy(apps, **proxy_settings)`` starts a ``Worker`` (the parser under
  test comes from the ``parser`` fixture, so every test using it runs against
  both backends) on a free port, applies a routing snapshot built from a
  TOML-like dict, and yields a ``Proxy`` with its port, the captured
  access-log lines and the control messages. The worker module's logger is
  wrapped so an error it logs (a connection task that raised) fails the test,
  traceback included.
* ``upstream(handler)`` serves HTTP/1.1 on a free port; ``handler`` gets one
  ``UpConn`` per accepted connection (h11 server state plus raw-byte access)
  and every parsed request is recorded. Built-in handlers: ``"echo"``,
  ``"never"`` (reads the request, never answers).
* ``Client`` (``await proxy.connect()``) sends arbitrary bytes and parses what
  comes back with ``h11.Connection(h11.CLIENT)``, one fresh connection object
  per response so pipelined answers and raw requests parse alike.

Waits are bounded by ``trio.fail_after``; state changes wake waiters through
``Upstream.wait_for`` instead of sleeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing

from superagent.proxy import worker as worker_module
from superagent.proxy.accesslog import AccessLog
from superagent.proxy.config import config_from_document
from superagent.proxy.worker import Worker

DEADLINE = 5.0  # bound on any single wait in these tests: a hang fails fast, never stalls CI
KEEP_BODY = 1 << 20  # request bodies up to this size are kept whole by upstreams; bigger: digest
RAW_KEEP = 4 << 20  # raw bytes an upstream connection records (big uploads keep only a digest)
HOST = "app.test"
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=\-]{1,200}$")
# Request headers that must never reach an upstream (RFC 9110 7.6.1 plus Proxy-Connection).
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"upgrade", b"proxy-authenticate", b"proxy-authorization"})
# Headers the proxy owns on the way up: exactly one copy each.
PROXY_OWNED = (b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
               b"forwarded", b"via", b"x-request-id", b"x-real-ip")
_TCP_FIN_WAIT2 = 5  # tcpi_state once the peer acknowledged our FIN


@pytest.fixture(params=["httptools", "h11"])
def parser(request: pytest.FixtureRequest) -> str:
    """The request/response parser backend of the worker under test."""
    return str(request.param)


# --------------------------------------------------------------------------- ports

@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A loopback port held bound (not listening) with SO_REUSEPORT, so only the worker,
    which sets the same option, can listen on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening) for the test."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def unresponsive_port() -> Iterator[int]:
    """A loopback port where connect() hangs: a listener whose accept queue is full, so the
    kernel drops new SYNs."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    try:
        yield port
    finally:
        filler.close()
        listener.close()


# --------------------------------------------------------------------------- upstreams

class Received:
    """One request as an upstream parsed it (h11, strict)."""

    def __init__(self, server: str, conn: int, req: h11.Request) -> None:
        self.server = server
        self.conn = conn
        self.method = req.method.decode()
        self.target = req.target.decode()
        self.version = req.http_version.decode()
        self.headers: list[tuple[bytes, bytes]] = [(bytes(n), bytes(v))
                                                   for n, v in req.headers.raw_items()]
        self.body = bytearray()
        self.body_len = 0
        self._digest = hashlib.sha256()
        self.complete = False

    def __repr__(self) -> str:
        return (f"<Received {self.method} {self.target} server={self.server} conn={self.conn}"
                f" body={self.body_len} complete={self.complete}>")

    def add_body(self, data: bytes) -> None:
        self.body_len += len(data)
        self._digest.update(data)
        if self.body_len <= KEEP_BODY:
            self.body += data

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def values(self, name: str) -> list[str]:
        lname = name.lower().encode()
        return [v.decode("latin-1") for n, v in self.headers if n.lower() == lname]

    def header(self, name: str) -> str | None:
        found = self.values(name)
        assert len(found) <= 1, f"{name} received {len(found)} times: {found}"
        return found[0] if found else None

    def names(self) -> set[str]:
        return {n.decode("latin-1").lower() for n, _ in self.headers}

    def describe(self) -> dict[str, Any]:
        return {"server": self.server, "conn": self.conn, "method": self.method,
                "target": self.target, "version": self.version,
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
                "body_len": self.body_len, "sha256": self.sha256,
                "body": bytes(self.body).decode("latin-1") if self.body_len <= 65536 else None}

    def assert_canonical(self) -> None:
        """The request is one the proxy may send: unambiguous framing, no hop-by-hop headers
        (bar an upgrade's own pair), exactly one copy of every header the proxy owns."""
        names = [n.lower() for n, _ in self.headers]
        lengths = names.count(b"content-length")
        encodings = self.values("transfer-encoding")
        assert not (lengths and encodings), f"Content-Length with Transfer-Encoding: {self!r}"
        assert lengths <= 1, f"{lengths} Content-Length headers: {self.headers}"
        assert encodings in ([], ["chunked"]), f"unexpected Transfer-Encoding {encodings}"
        upgrade = self.values("connection") == ["upgrade"] and len(self.values("upgrade")) == 1
        for name in names:
            if upgrade and name in (b"connection", b"upgrade"):
                continue
            assert name not in HOP_BY_HOP, f"hop-by-hop header {name!r} reached the upstream"
        for name in PROXY_OWNED:
            assert names.count(name) == 1, f"{name!r} appears {names.count(name)} times"
        assert REQUEST_ID.match(self.header("x-request-id") or ""), self.headers
        assert self.version == "1.1"


class UpConn:
    """One accepted upstream connection: an h11 server plus the raw bytes received."""

    def __init__(self, server: Upstream, stream: trio.SocketStream, index: int) -> None:
        self.server = server
        self.stream = stream
        self.index = index
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        self.raw = bytearray()
        self.eof = False
        self.closed = False
        self.requests: list[Received] = []

    def __repr__(self) -> str:
        return (f"<UpConn {self.server.name}#{self.index} requests={len(self.requests)}"
                f" raw={len(self.raw)} eof={self.eof}>")

    async def receive(self) -> bytes:
        """The next bytes (``b""`` at end of stream, a reset counts as one)."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.eof = True
        elif len(self.raw) < RAW_KEEP:
            self.raw += data
        self.server.notify()
        return data

    async def next_event(self) -> Any:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                if self.eof:  # the proxy cut a message short: an end, not a framing error
                    return h11.ConnectionClosed()
                self.server.errors.append(f"conn {self.index}: {exc}")
                self.server.notify()
                raise
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.receive())
                continue
            return event

    async def read_head(self) -> Received | None:
        """The next request's head, or None when the proxy closed the connection."""
        event = await self.next_event()
        if not isinstance(event, h11.Request):
            return None
        req = Received(self.server.name, self.index, event)
        self.requests.append(req)
        self.server.requests.append(req)
        self.server.notify()
        return req

    async def read_body(self, req: Received) -> bool:
        """Read ``req``'s body to its end; False when the connection ended first."""
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                req.add_body(event.data)
                self.server.notify()
            elif isinstance(event, h11.EndOfMessage):
                req.complete = True
                self.server.notify()
                return True
            else:
                return False

    async def read_request(self) -> Received | None:
        """The next whole request, or None when the connection ended."""
        req = await self.read_head()
        if req is None or not await self.read_body(req):
            return None
        return req

    async def send_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self.stream.send_all(self.h11.send(h11.Response(status_code=status,
                                                              headers=headers)) or b"")

    async def send_data(self, data: bytes) -> None:
        await self.stream.send_all(self.h11.send(h11.Data(data=data)) or b"")

    async def send_end(self) -> None:
        await self.stream.send_all(self.h11.send(h11.EndOfMessage()) or b"")

    async def respond(self, req: Received, status: int = 200, body: bytes = b"",
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """A whole response with Content-Length (no body bytes for HEAD)."""
        hdrs = list(headers or [])
        if not any(n.lower() == b"transfer-encoding" for n, _ in hdrs):
            hdrs.append((b"content-length", b"%d" % len(body)))
        await self.send_head(status, hdrs)
        if body and req.method != "HEAD":
            await self.send_data(body)
        await self.send_end()

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    def next_cycle(self) -> bool:
        """Get ready for the next request on this connection; False if it must close."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    async def close_and_confirm(self) -> None:
        """Close after the proxy's kernel has acknowledged our FIN, so the proxy cannot
        pick this connection from its pool without seeing the close."""
        sock = self.stream.socket
        sock.shutdown(trio.socket.SHUT_WR)
        with trio.fail_after(DEADLINE):
            while sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != _TCP_FIN_WAIT2:
                await trio.sleep(0.001)  # polling a kernel state, bounded by the deadline
        await self.stream.aclose()
        self.closed = True
        self.server.notify()

    async def echo(self) -> None:
        """Answer each request with JSON describing it, keeping the connection alive."""
        while True:
            req = await self.read_request()
            if req is None:
                return
            await self.respond(req, 200, json.dumps(req.describe()).encode(),
                               [(b"content-type", b"application/json"),
                                (b"x-upstream", self.server.name.encode())])
            if not self.next_cycle():
                return


Handler = Callable[[UpConn], Awaitable[None]]


async def _never(conn: UpConn) -> None:
    """Read requests, never answer."""
    while await conn.read_request() is not None:
        pass
    await trio.sleep_forever()


BUILTIN_HANDLERS: dict[str, Handler] = {"echo": UpConn.echo, "never": _never}


class Upstream:
    """A real HTTP/1.1 server on loopback that records what it was sent."""

    def __init__(self, handler: Handler, name: str) -> None:
        self.handler = handler
        self.name = name
        self.port = 0
        self.conns: list[UpConn] = []
        self.requests: list[Received] = []
        self.errors: list[str] = []
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return (f"<Upstream {self.name} port={self.port} conns={len(self.conns)}"
                f" requests={len(self.requests)}>")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def raw_bytes(self) -> int:
        return sum(len(c.raw) for c in self.conns)

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
        """Return once ``predicate()`` holds; it is re-checked on every change here."""
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = UpConn(self, stream, len(self.conns))
        self.conns.append(conn)
        self.notify()
        try:
            await self.handler(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            conn.closed = True
            self.notify()
            await stream.aclose()


@pytest.fixture
def upstream() -> Callable[..., contextlib.AbstractAsyncContextManager[Upstream]]:
    """Factory: ``async with upstream(handler_or_name, name=...) as up``."""

    @contextlib.asynccontextmanager
    async def start(handler: Handler | str = "echo", name: str = "up") -> AsyncIterator[Upstream]:
        server = Upstream(BUILTIN_HANDLERS[handler] if isinstance(handler, str) else handler,
                          name)
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            server.port = listeners[0].socket.getsockname()[1]
            await nursery.start(trio.serve_listeners, server._serve, listeners)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()

    return start


# --------------------------------------------------------------------------- client

class Response:
    """A response as the client parsed it."""

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        self.version = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.informational: list[int] = []
        self.body = b""
        self.wire_bytes = 0  # bytes this response took on the wire, informational ones included

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers} body={self.body[:200]!r}>"

    def values(self, name: str) -> list[str]:
        lname = name.lower().encode()
        return [v.decode("latin-1") for n, v in self.headers if n == lname]

    def header(self, name: str) -> str | None:
        found = self.values(name)
        assert len(found) <= 1, f"{name} sent {len(found)} times: {found}"
        return found[0] if found else None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str | None:
        return self.header("x-superagent-error")


class ResponseReader:
    """Parses one response from the client's byte stream, event by event."""

    def __init__(self, client: Client, method: str, upgrade: bytes | None) -> None:
        self.client = client
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
        headers = [(b"host", b"proxy.test")]
        if upgrade is not None:
            headers += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
        # h11 learns what it is reading the answer to (HEAD, upgrade) from a request it "sent".
        self.conn.send(h11.Request(method=method.encode(), target=b"/", headers=headers))
        self.conn.send(h11.EndOfMessage())
        self.fed = 0
        self._started = False

    async def next_event(self) -> Any:
        """The next h11 event (Response, Data, EndOfMessage, PAUSED on a 101)."""
        client = self.client
        if not self._started:
            self._started = True
            if client.buffer:  # (feeding b"" would tell h11 the connection ended)
                self._feed(bytes(client.buffer))
                client.buffer.clear()
            elif client.eof:
                self._feed(b"")
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                if client.eof:
                    raise EOFError(f"connection closed after {self.fed} bytes of a response"
                                   ) from None
                raise
            if event is h11.NEED_DATA:
                if self.conn.their_state is h11.CLOSED or client.eof:
                    raise EOFError(f"connection closed before a whole response ({client!r})")
                self._feed(await client.receive())
                continue
            if isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                leftover = bytes(self.conn.trailing_data[0])
                client.buffer[:0] = leftover
                self.fed -= len(leftover)
            if isinstance(event, h11.ConnectionClosed):
                raise EOFError("connection closed instead of a response")
            return event

    def _feed(self, data: bytes) -> None:
        self.fed += len(data)
        self.conn.receive_data(data)

    async def rest(self, response: Response | None = None) -> Response:
        """Read to the end of the response (or the 101 that switches protocols)."""
        resp = response or Response()
        body = bytearray(resp.body)
        while True:
            event = await self.next_event()
            if isinstance(event, h11.InformationalResponse):
                resp.informational.append(event.status_code)
                if event.status_code == 101:
                    resp.status = 101
                    resp.headers = [(n.lower(), v) for n, v in event.headers.raw_items()]
            elif isinstance(event, h11.Response):
                resp.status = event.status_code
                resp.reason = bytes(event.reason)
                resp.version = event.http_version.decode()
                resp.headers = [(bytes(n).lower(), bytes(v)) for n, v in event.headers.raw_items()]
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                resp.body = bytes(body)
                resp.wire_bytes = self.fed
                return resp


class Client:
    """A raw TCP client of the proxy that parses responses with h11."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.eof = False

    def __repr__(self) -> str:
        return f"<Client buffered={len(self.buffer)} eof={self.eof}>"

    @classmethod
    async def connect(cls, port: int) -> Client:
        with trio.fail_after(DEADLINE):
            return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.eof = True
        return data

    async def send(self, data: bytes) -> None:
        with trio.fail_after(DEADLINE):
            await self.stream.send_all(data)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    def reader(self, method: str = "GET", *, upgrade: bytes | None = None) -> ResponseReader:
        return ResponseReader(self, method, upgrade)

    async def read_response(self, method: str = "GET", *, upgrade: bytes | None = None,
                            timeout: float = DEADLINE) -> Response:
        with trio.fail_after(timeout):
            return await self.reader(method, upgrade=upgrade).rest()

    async def request(self, method: str = "GET", target: str = "/", headers: Any = (),
                      body: bytes = b"", *, host: str | None = HOST,
                      timeout: float = DEADLINE) -> Response:
        await self.send(build_request(method, target, headers, body, host=host))
        return await self.read_response(method, timeout=timeout)

    async def receive_exactly(self, size: int, timeout: float = DEADLINE) -> bytes:
        """``size`` bytes of a tunnel (after a 101)."""
        with trio.fail_after(timeout):
            while len(self.buffer) < size:
                data = await self.receive()
                if not data:
                    raise EOFError(f"closed after {len(self.buffer)} of {size} bytes")
                self.buffer += data
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out

    async def wait_closed(self, timeout: float = DEADLINE) -> None:
        """The proxy closes the connection without sending anything more."""
        with trio.fail_after(timeout):
            while not self.eof:
                self.buffer += await self.receive()
        assert not self.buffer, f"unexpected bytes before close: {bytes(self.buffer)[:300]!r}"

    async def read_until_closed(self, method: str = "GET",
                                timeout: float = DEADLINE) -> list[Response]:
        """Every response until the proxy closes; each must parse as well-formed HTTP/1.1."""
        responses: list[Response] = []
        with trio.fail_after(timeout):
            while True:
                while not self.buffer and not self.eof:
                    self.buffer += await self.receive()
                if not self.buffer:
                    return responses
                responses.append(await self.reader(method).rest())

    async def aclose(self) -> None:
        await self.stream.aclose()


def build_request(method: str = "GET", target: str = "/", headers: Any = (), body: bytes = b"",
                  *, host: str | None = HOST, version: str = "1.1") -> bytes:
    """Request bytes; Content-Length is added for a body unless framing headers are given."""
    hdrs = [(k.encode() if isinstance(k, str) else k, v.encode() if isinstance(v, str) else v)
            for k, v in (headers.items() if isinstance(headers, dict) else headers)]
    if host is not None:
        hdrs.insert(0, (b"Host", host.encode()))
    framed = any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in hdrs)
    if body and not framed:
        hdrs.append((b"Content-Length", b"%d" % len(body)))
    head = b"%s %s HTTP/%s\r\n" % (method.encode(), target.encode(), version.encode())
    head += b"".join(k + b": " + v + b"\r\n" for k, v in hdrs)
    return head + b"\r\n" + body


# --------------------------------------------------------------------------- proxy

class FailureLog:
    """Stands in for the worker module's logger: forwards everything, and remembers each
    error it is asked to log (with the traceback being handled), so a connection task that
    died of an unexpected exception fails the test instead of passing silently."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failures: list[str] = []

    def __repr__(self) -> str:
        return f"<FailureLog failures={len(self.failures)}>"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _record(self, event: str, fields: dict[str, Any]) -> None:
        self.failures.append(f"{event} {fields}\n{traceback.format_exc()}")

    def error(self, event: str, **fields: Any) -> None:
        self._record(event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._record(event, fields)

    critical = error


class Proxy:
    """A running worker: its port, control messages, snapshots and access log."""

    _sockets = itertools.count()

    def __init__(self, worker: Worker, port: int, log_chunks: list[bytes],
                 access: AccessLog, failure_log: FailureLog) -> None:
        self.worker = worker
        self.port = port
        self.version = 0
        self._log_chunks = log_chunks
        self._access = access
        self.failure_log = failure_log

    def __repr__(self) -> str:
        return f"<Proxy port={self.port} v{self.version} {self.worker!r}>"

    @property
    def failures(self) -> list[str]:
        """Errors the worker logged so far (a connection task that raised, for example)."""
        return self.failure_log.failures

    def document(self, apps: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        proxy = {"listen": [f"127.0.0.1:{self.port}"], "admin": "off"}
        proxy.update(settings)
        return {"proxy": proxy, "apps": apps}

    def apply(self, apps: dict[str, Any], **settings: Any) -> None:
        """Swap in a new snapshot (next version) built from ``apps`` and ``[proxy]`` settings."""
        _, snapshot = config_from_document(self.document(apps, settings), source="test",
                                           version=self.version + 1)
        self.worker.apply(snapshot)
        self.version = snapshot.version

    async def control(self, message: dict[str, Any]) -> dict[str, Any]:
        return await self.worker.handle(message)

    async def connect(self) -> Client:
        return await Client.connect(self.port)

    async def request(self, method: str = "GET", target: str = "/", headers: Any = (),
                      body: bytes = b"", **kwargs: Any) -> Response:
        """One request on a fresh connection."""
        client = await self.connect()
        try:
            return await client.request(method, target, headers, body, **kwargs)
        finally:
            await client.aclose()

    def access_lines(self) -> list[dict[str, Any]]:
        self._access.flush()
        data = b"".join(self._log_chunks)
        return [json.loads(line) for line in data.splitlines() if line]

    async def access_log(self, count: int, timeout: float = DEADLINE) -> list[dict[str, Any]]:
        """The access-log entries once there are at least ``count``, after every task settled
        (so a surplus line would show too)."""
        with trio.fail_after(timeout):
            while True:
                await trio.testing.wait_all_tasks_blocked()
                lines = self.access_lines()
                if len(lines) >= count:
                    return lines
                await trio.sleep(0.01)  # an exchange still finishing: poll, bounded above

    async def stats(self) -> dict[str, Any]:
        reply = await self.control({"type": "stats"})
        return dict(reply["stats"])


@pytest.fixture
def make_proxy(parser: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
               ) -> Callable[..., contextlib.AbstractAsyncContextManager[Proxy]]:
    """Factory: ``async with make_proxy(apps, **proxy_settings) as proxy``; on a clean exit it
    also checks that the worker logged no error (a connection task that raised)."""
    failure_log = FailureLog(worker_module.log)
    monkeypatch.setattr(worker_module, "log", failure_log)

    @contextlib.asynccontextmanager
    async def start(apps: dict[str, Any], **settings: Any) -> AsyncIterator[Proxy]:
        chunks: list[bytes] = []
        access = AccessLog(chunks.append)
        worker = Worker(parser=parser, grace=0.5, access_log=access)
        control_path = str(tmp_path / f"w{next(Proxy._sockets)}.sock")
        with reserved_port() as port:
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run, control_path)
                proxy = Proxy(worker, port, chunks, access, failure_log)
                try:
                    proxy.apply(apps, **settings)
                    yield proxy
                    await trio.testing.wait_all_tasks_blocked()  # let failing tasks log
                finally:
                    nursery.cancel_scope.cancel()
            worker.state.upstreams.close_all()  # the cancelled worker skipped its own cleanup
        assert not failure_log.failures, "the worker logged errors:\n" + "\n".join(
            failure_log.failures)

    return start
