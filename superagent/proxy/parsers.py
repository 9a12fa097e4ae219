"""Parser-agnostic HTTP/1.1 message parsing: one small event interface, two backends.

The relay never sees a parser library. A parser is fed bytes and appends events
to its ``events`` deque:

  ``RequestHead`` / ``ResponseHead``  a message's start line and headers (raw, as received);
  ``bytes``                           body data, already de-chunked;
  ``END``                             the message is complete;
  ``ParseFailure``                    the peer broke HTTP; nothing after it is valid.

Backends: ``httptools`` (llhttp, the hot-path default, strict by default) and
``h11`` (pure Python, the strict reference). h11 is lax where llhttp is not
(obs-fold, control characters, bare LF), so the h11 backend checks each request
head's raw bytes first; both backends then refuse the same requests. Semantic
checks that do not depend on the parser (framing conflicts, Host, versions) live
in ``http1.validate_request``.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Final, Protocol

import h11
import httptools

Headers = list[tuple[bytes, bytes]]


class _End:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END: Final = _End()


class RequestHead:
    """A request's start line and headers exactly as received (names keep their case)."""

    __slots__ = ("headers", "method", "target", "version")

    def __init__(self, method: bytes, target: bytes, version: str, headers: Headers) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers

    def __repr__(self) -> str:
        return f"<RequestHead {self.method!r} {self.target!r} HTTP/{self.version}>"


class ResponseHead:
    """A response's status line and headers exactly as received."""

    __slots__ = ("headers", "reason", "status", "version")

    def __init__(self, status: int, reason: bytes, version: str, headers: Headers) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status} HTTP/{self.version}>"


class ParseFailure:
    """The peer sent something that is not valid HTTP/1.1; ``status`` is the answer to give."""

    __slots__ = ("detail", "status")

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail

    def __repr__(self) -> str:
        return f"<ParseFailure {self.status} {self.detail}>"


Event = RequestHead | ResponseHead | bytes | _End | ParseFailure


class Limits(Protocol):
    @property
    def max_header_bytes(self) -> int: ...

    @property
    def max_headers(self) -> int: ...

    @property
    def max_request_line(self) -> int: ...


class RequestParser(Protocol):
    events: deque[Event]

    def feed(self, data: bytes) -> None:
        """Parse ``data``; never raises, a protocol violation becomes a ParseFailure event."""

    def feed_eof(self) -> None:
        """The client closed its side; a message cut short becomes a ParseFailure."""

    def next_cycle(self) -> None:
        """The response to the current request is complete: go on with the next one."""

    def upgrade_leftover(self) -> bytes:
        """Bytes after an upgrade request's head: the first bytes of the tunnel."""

    def limit_body(self, max_body: int) -> None:
        """The current request's app takes at most ``max_body`` bytes (0: no limit): a
        chunk announcing more is refused with 413 before any of it is relayed."""


class ResponseParser(Protocol):
    events: deque[Event]
    reusable: bool  # False once the upstream sent bytes past the end of the response

    def start(self, *, head_request: bool, upgrade: bytes | None) -> None:
        """Expect the response to a new request (a HEAD response has no body)."""

    def feed(self, data: bytes) -> None: ...

    def feed_eof(self) -> None: ...

    def upgrade_leftover(self) -> bytes: ...


def _framing(headers: Headers) -> tuple[bool, bool]:
    """(has Content-Length, is chunked) from raw headers, for close-delimited detection."""
    has_length = chunked = False
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            has_length = True
        elif lname == b"transfer-encoding":
            chunked = chunked or value.strip().lower().endswith(b"chunked")
    return has_length, chunked


# --------------------------------------------------------------------------- httptools

class _Stop(Exception):
    """Raised from a callback to abort parsing with ``ParseFailure``."""


class HttptoolsRequestParser:
    """llhttp-backed request parser (see module docstring)."""

    __slots__ = ("_failed", "_feed_len", "_head_bytes", "_headers", "_in_head", "_leftover",
                 "_limits", "_parser", "_url", "events")

    def __init__(self, limits: Limits) -> None:
        self.events: deque[Event] = deque()
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: Headers = []
        self._head_bytes = 0  # bytes of a head that spans several feeds, before this one
        self._feed_len = 0
        self._in_head = False
        self._failed: ParseFailure | None = None
        self._leftover = b""

    def __repr__(self) -> str:
        return f"<HttptoolsRequestParser events={len(self.events)} in_head={self._in_head}>"

    # llhttp callbacks ---------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        # The request line is "METHOD SP target SP HTTP/1.1".
        if len(self._url) + len(self._parser.get_method()) + 10 > self._limits.max_request_line:
            self._failed = ParseFailure(414, "request line too long")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # after the head they are trailers, which are not forwarded
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        headers = self._headers
        limits = self._limits
        if len(headers) > limits.max_headers:
            self._failed = ParseFailure(431, "too many request headers")
            raise _Stop
        # Only a head that may be larger than the limit is measured exactly.
        if self._head_bytes + self._feed_len > limits.max_header_bytes and sum(
                len(n) + len(v) + 4 for n, v in headers) > limits.max_header_bytes:
            self._failed = ParseFailure(431, "request headers too large")
            raise _Stop
        p = self._parser
        self.events.append(RequestHead(p.get_method(), self._url, p.get_http_version(), headers))

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        self.events.append(END)

    # interface -----------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self._failed is not None:
            return
        self._feed_len = len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._leftover = data[exc.args[0]:]
        except httptools.HttpParserError as exc:
            self._report(ParseFailure(400, _describe(exc)))
            return
        if self._in_head:
            self._head_bytes += len(data)
            limit = self._limits.max_header_bytes + self._limits.max_request_line
            if self._head_bytes > limit:
                self._failed = ParseFailure(431, "request headers too large")
                self.events.append(self._failed)

    def _report(self, otherwise: ParseFailure) -> None:
        """Queue the failure a callback recorded, else ``otherwise``. (A method of its own:
        in ``feed`` a type checker, and so mypyc, would take ``_failed`` as still None.)"""
        if self._failed is None:
            self._failed = otherwise
        self.events.append(self._failed)

    def feed_eof(self) -> None:
        if self._failed is None and self._in_head:
            self._failed = ParseFailure(400, "connection closed in the middle of a request")
            self.events.append(self._failed)

    def next_cycle(self) -> None:
        pass  # llhttp parses pipelined requests continuously

    def upgrade_leftover(self) -> bytes:
        return self._leftover

    def limit_body(self, max_body: int) -> None:
        pass  # llhttp refuses chunk sizes past 2^64; max_body is counted as data streams


class HttptoolsResponseParser:
    """llhttp-backed response parser; it lives as long as its upstream connection."""

    __slots__ = ("_done", "_head_request", "_headers", "_in_body", "_leftover", "_parser",
                 "events", "reusable")

    def __init__(self) -> None:
        self.events: deque[Event] = deque()
        self.reusable = True
        self._parser = httptools.HttpResponseParser(self)
        self._headers: Headers = []
        self._head_request = False
        self._done = True
        self._in_body = False  # a final response's head was seen, its end not yet
        self._leftover = b""

    def __repr__(self) -> str:
        return f"<HttptoolsResponseParser done={self._done} reusable={self.reusable}>"

    def start(self, *, head_request: bool, upgrade: bytes | None) -> None:
        if self._head_request:
            # llhttp still expects the body the previous HEAD response announced.
            self._parser = httptools.HttpResponseParser(self)
        self._head_request = head_request
        self._done = False
        self._in_body = False

    def on_message_begin(self) -> None:
        if self._done:
            self.reusable = False
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_body:  # after the head they are trailers, which are not forwarded
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._done:
            return
        p = self._parser
        status = p.get_status_code()
        self.events.append(ResponseHead(status, b"", p.get_http_version(), self._headers))
        if 100 <= status < 200:
            return
        if self._head_request:
            self.events.append(END)
            self._done = True
            return
        self._in_body = True

    def on_body(self, body: bytes) -> None:
        if self._done:
            self.reusable = False
        else:
            self.events.append(body)

    def on_message_complete(self) -> None:
        if self._done:
            return
        last = self.events[-1] if self.events else None
        self.events.append(END)
        if isinstance(last, ResponseHead) and 100 <= last.status < 200 and last.status != 101:
            return  # an interim response; the final one follows
        self._done = True

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._leftover = data[exc.args[0]:]
            self.reusable = False
        except httptools.HttpParserError as exc:
            self.reusable = False
            self.events.append(ParseFailure(502, _describe(exc)))

    def feed_eof(self) -> None:
        self.reusable = False
        if self._done:
            return
        self._done = True
        # End of stream ends a body only when the head announced no length (RFC 9112 6.3).
        if self._in_body and _framing(self._headers) == (False, False):
            self.events.append(END)
        else:
            self.events.append(ParseFailure(502, "upstream closed the connection mid-response"))

    def upgrade_leftover(self) -> bytes:
        return self._leftover


_ECHO_START = re.compile(r"\s*:?\s*(?:b'|b\"|bytearray\(|\{!r\}|'|\")")


def _describe(exc: Exception) -> str:
    """A parser error as a detail for the error body: the library's words without the peer's
    bytes (h11 quotes the offending line as a Python repr; an answer never echoes input)."""
    text = str(exc) or type(exc).__name__
    found = _ECHO_START.search(text)
    if found is not None:
        text = text[:found.start()] or type(exc).__name__
    return "".join(ch for ch in text[:200] if " " <= ch <= "~")


# --------------------------------------------------------------------------- h11

# The largest chunk h11 may announce before routing tells the app's max_body: a size no real
# client sends, far below 2^63, so a front proxy that wraps sizes at 64 bits cannot read
# the framing differently (h11 itself accepts 20 hex digits).
MAX_CHUNK_SIZE: Final = 1 << 40

# What h11 would accept in a head but we refuse: obs-fold, a bare CR or LF, control characters.
# A CR at the very end of what arrived so far may still be followed by its LF.
_STRICT_HEAD = re.compile(rb"\n[ \t]|\r(?!\n|\Z)|(?<!\r)\n|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class H11RequestParser:
    """h11-backed request parser: one ``h11.Connection`` per request cycle.

    A head is collected and checked here first (strictness, sizes) and handed to h11 only
    once complete; each arriving piece is scanned once, so a client sending one byte at a
    time costs linear work.
    """

    __slots__ = ("_conn", "_failed", "_head_buf", "_head_checked", "_limits", "_max_body",
                 "_scanned", "_start", "events")

    def __init__(self, limits: Limits) -> None:
        self.events: deque[Event] = deque()
        self._limits = limits
        self._failed = False
        self._max_body = 0
        self._new_cycle()

    def __repr__(self) -> str:
        return f"<H11RequestParser events={len(self.events)} state={self._conn.their_state}>"

    def _new_cycle(self) -> None:
        self._conn = h11.Connection(h11.SERVER)
        self._max_body = 0
        self._head_buf = bytearray()
        self._head_checked = False
        self._start = 0  # where the request line starts (empty lines before it are skipped)
        self._scanned = 0  # how far the strictness check has looked

    def _fail(self, status: int, detail: str) -> None:
        self._failed = True
        self.events.append(ParseFailure(status, detail))

    def feed(self, data: bytes) -> None:
        if self._failed:
            return
        if self._head_checked:
            self._conn.receive_data(data)
            self._pump()
            return
        if not data:
            return
        limits = self._limits
        buf = self._head_buf
        buf += data
        start = self._start
        while buf.startswith(b"\r\n", start):  # empty lines before a request are allowed
            start += 2
        self._start = start
        end = buf.find(b"\r\n\r\n", max(start, self._scanned - 3))
        region_end = len(buf) if end < 0 else end + 2
        if _STRICT_HEAD.search(buf, max(start, self._scanned - 1), region_end) is not None:
            return self._fail(400, "invalid character, bare line break or obs-fold in head")
        self._scanned = region_end
        line_end = buf.find(b"\r\n", start, region_end)
        # Without its line end yet, a trailing CR may be the start of the request line's CRLF.
        line_length = (line_end if line_end >= 0 else len(buf) - buf.endswith(b"\r")) - start
        if line_length > limits.max_request_line:
            return self._fail(414, "request line too long")
        if end < 0:
            if line_end >= 0 and len(buf) - line_end > limits.max_header_bytes:
                return self._fail(431, "request headers too large")
            return
        if end - line_end > limits.max_header_bytes:
            return self._fail(431, "request headers too large")
        self._head_checked = True
        self._conn.receive_data(bytes(buf[start:]))
        buf.clear()
        self._pump()

    def _pump(self) -> None:
        conn = self._conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                return self._fail(exc.error_status_hint, _describe(exc))
            kind = type(event)
            if kind is h11.Data:
                data = bytes(event.data)  # type: ignore[union-attr]
                if self._chunk_too_big(len(data)):
                    return
                self.events.append(data)
            elif kind is h11.Request:
                req: h11.Request = event  # type: ignore[assignment]
                if len(req.headers) > self._limits.max_headers:
                    return self._fail(431, "too many request headers")
                self.events.append(RequestHead(req.method, req.target,
                                               req.http_version.decode("ascii"),
                                               list(req.headers.raw_items())))
            elif kind is h11.EndOfMessage:
                self.events.append(END)
                return
            else:  # NEED_DATA, PAUSED or ConnectionClosed
                self._chunk_too_big(0)  # a chunk header may have arrived without data
                return

    def _chunk_too_big(self, taken: int) -> bool:
        """Fail when the chunk being read announced more than the limit; ``taken``: its
        bytes h11 just handed over. h11 keeps a chunk's remaining size in its reader,
        which is the only place the announced size can be seen before the data."""
        remaining = getattr(getattr(self._conn, "_reader", None), "_bytes_in_chunk", 0)
        if not isinstance(remaining, int) or not remaining:
            return False
        announced = remaining + taken
        if self._max_body and announced > self._max_body:
            self._fail(413, "a chunk larger than the app's body limit")
            return True
        if announced > MAX_CHUNK_SIZE:
            self._fail(400, "chunk size too large")
            return True
        return False

    def limit_body(self, max_body: int) -> None:
        self._max_body = max_body
        if self._head_checked and not self._failed:
            self._chunk_too_big(0)

    def feed_eof(self) -> None:
        if self._failed:
            return
        if not self._head_checked:
            if self._head_buf[self._start:]:
                self._fail(400, "connection closed in the middle of a request")
            return
        if self._conn.their_state is not h11.DONE:
            self._fail(400, "connection closed in the middle of a request")

    def next_cycle(self) -> None:
        leftover = bytes(self._conn.trailing_data[0]) if self._head_checked else bytes(
            self._head_buf)
        self._new_cycle()
        if leftover:
            self.feed(leftover)

    def upgrade_leftover(self) -> bytes:
        return bytes(self._conn.trailing_data[0])


class H11ResponseParser:
    """h11-backed response parser: a fresh ``h11.Connection`` per exchange."""

    __slots__ = ("_conn", "_done", "events", "reusable")

    def __init__(self) -> None:
        self.events: deque[Event] = deque()
        self.reusable = True
        self._done = True
        self._conn = h11.Connection(h11.CLIENT)

    def __repr__(self) -> str:
        return f"<H11ResponseParser done={self._done} reusable={self.reusable}>"

    def start(self, *, head_request: bool, upgrade: bytes | None) -> None:
        # h11 learns the request's method (HEAD) and upgrade wish from a request it "sent".
        self._done = False
        conn = h11.Connection(h11.CLIENT)
        # An upgrade is always "proposed", so that a 101 nobody offered parses as a 101
        # (the relay refuses it and closes the client connection) rather than as garbage.
        headers = [(b"host", b"upstream"), (b"content-length", b"0"),
                   (b"connection", b"upgrade"), (b"upgrade", upgrade or b"none")]
        conn.send(h11.Request(method=b"HEAD" if head_request else b"GET", target=b"/",
                              headers=headers))
        conn.send(h11.EndOfMessage())
        self._conn = conn

    def feed(self, data: bytes) -> None:
        if self._done:
            if data:
                self.reusable = False
            return
        self._conn.receive_data(data)
        conn = self._conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.reusable = False
                self._done = True
                self.events.append(ParseFailure(502, _describe(exc)))
                return
            kind = type(event)
            if kind is h11.Data:
                self.events.append(bytes(event.data))  # type: ignore[union-attr]
            elif kind is h11.Response or kind is h11.InformationalResponse:
                resp: h11.Response = event  # type: ignore[assignment]
                self.events.append(ResponseHead(resp.status_code, resp.reason,
                                                resp.http_version.decode("ascii"),
                                                list(resp.headers.raw_items())))
                if kind is h11.InformationalResponse:
                    self.events.append(END)
                    if resp.status_code == 101:
                        self._done = True
                        self.reusable = False
                        return
                elif conn.their_state is h11.MUST_CLOSE or conn.our_state is h11.MUST_CLOSE:
                    self.reusable = False
            elif kind is h11.EndOfMessage:
                self.events.append(END)
                self._done = True
                if conn.their_state is not h11.DONE or conn.trailing_data[0]:
                    self.reusable = False
                return
            elif kind is h11.ConnectionClosed:
                self.reusable = False
                self._done = True
                self.events.append(ParseFailure(502, "upstream closed the connection"))
                return
            else:
                if data == b"":
                    self.reusable = False
                return

    def feed_eof(self) -> None:
        self.reusable = False
        if not self._done:
            self.feed(b"")
            if not self._done:
                self._done = True
                self.events.append(ParseFailure(502, "upstream closed the connection"
                                                     " mid-response"))

    def upgrade_leftover(self) -> bytes:
        return bytes(self._conn.trailing_data[0])


def request_parser(kind: str, limits: Limits) -> RequestParser:
    """A new request parser of ``kind`` ("httptools" or "h11")."""
    if kind == "h11":
        return H11RequestParser(limits)
    return HttptoolsRequestParser(limits)


def response_parser(kind: str) -> ResponseParser:
    """A new response parser for one upstream connection; call ``start`` per exchange."""
    if kind == "h11":
        return H11ResponseParser()
    return HttptoolsResponseParser()
