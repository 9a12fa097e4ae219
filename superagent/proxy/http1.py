"""Sans-IO HTTP/1.1 relay logic: what a request means, and what goes on the wire.

``interpret_request`` turns a parsed head into a ``Request`` after the checks
every parser shares (version, framing conflicts, Host, target form). The
``*_head`` functions serialise the one canonical message that crosses the proxy
in each direction: hop-by-hop headers and every header named in ``Connection``
removed, framing re-derived (``Content-Length`` or ``chunked``, never both),
forwarding headers (``X-Forwarded-*``, ``Forwarded``, ``X-Real-IP``) set by the proxy
itself. A header whose name differs from one of those, or from a framing header, only by
``_`` for ``-`` is dropped: WSGI and CGI servers fold both spellings into one environ
name, so ``X_Real_IP`` would otherwise stand in for the proxy's own.

Upgrades: a GET's ``Upgrade`` offer is kept on the ``Request`` (what the app allows of it
is ``superagent.httprules.allowed_upgrade``), ``upstream_head`` forwards what is left
of it and never the h2c headers, and ``switching_head`` relays an accepted 101. A
connection that carried an offer is not reused, as the parsers stop at it. Nothing here
does I/O.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Final

from superagent.errors import HTTPSyntaxError
from superagent.httprules import H2C_HEADERS, normalize_host, normalize_path, suspicious_path
from superagent.proxy.errors import HTTPError, ProtocolError, UpstreamError
from superagent.proxy.parsers import Headers, ParseFailure, RequestHead, ResponseHead
from superagent.proxy.routes import split_target

# Removed in both directions (RFC 9110 7.6.1, plus the de-facto Proxy-Connection).
HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
# Request headers the proxy sets itself (client-supplied copies are dropped or merged),
# and those of the h2c upgrade, which is never tunnelled.
_REQUEST_OWNED: Final = HOP_BY_HOP | H2C_HEADERS | {
    b"host", b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-host", b"x-forwarded-prefix", b"forwarded", b"via", b"x-request-id",
    b"x-real-ip",
}
# Names whose "_" spelling is dropped (see the module docstring): everything the proxy
# owns plus the forwarding headers other proxies set.
_UNDERSCORE_SHADOWED: Final = _REQUEST_OWNED | {
    b"x-forwarded-port", b"x-forwarded-server", b"x-forwarded-scheme", b"x-forwarded-ssl",
    b"x-client-ip", b"x-original-forwarded-for", b"client-ip", b"true-client-ip",
}
_RESPONSE_OWNED: Final = HOP_BY_HOP | {b"content-length", b"via", b"x-request-id"}
_REQUEST_ID_OK: Final = re.compile(rb"[A-Za-z0-9._:@/+=\-]{1,200}")
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
VIA: Final = b"1.1 superagent"

BODY_NONE: Final = 0
BODY_LENGTH: Final = 1
BODY_CHUNKED: Final = 2
BODY_UNTIL_CLOSE: Final = 3
HOST_CACHE_SIZE: Final = 4096  # normalised Host values: a proxy sees few distinct ones
_host_cache: Final[dict[bytes, str]] = {}


class Request:
    """A validated request: raw head plus what the relay needs to know about it.

    Defaults live on the class so that building one per request sets only what differs.
    """

    method = "GET"
    version = "1.1"
    path = "/"
    query = ""
    host: str | None = None
    host_header = b""
    headers: Headers = []
    content_length: int | None = None
    chunked = False
    keep_alive = True
    upgrade: bytes | None = None
    expect_continue = False
    request_id: bytes | None = None
    connection_tokens: frozenset[bytes] = frozenset()
    forwarded: bytes | None = None
    asterisk = False  # "OPTIONS *": routed as "/", sent upstream in asterisk form
    real_ip: bytes | None = None
    xff: bytes | None = None
    xfproto: bytes | None = None
    xfhost: bytes | None = None
    xfprefix: bytes | None = None
    via: bytes | None = None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path}{self.query} host={self.host}>"

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


def interpret_request(head: RequestHead, merge_slashes: bool = False,
                      reject_paths: bool = False) -> Request:
    """Validate ``head`` and return the ``Request``; raises ProtocolError (connection closes).

    ``merge_slashes`` folds repeated slashes in the path; ``reject_paths`` refuses a path
    with dot segments or encoded ``.``, ``/``, backslash (``path_policy = "reject"``)."""
    req = Request()
    version = head.version
    if version != "1.1" and version != "1.0":
        raise ProtocolError(505, f"HTTP/{version} is not supported", code="version-not-supported")
    req.version = version
    try:
        method = head.method.decode("ascii")
        target = head.target.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(400, "non-ASCII bytes in the request line") from None
    if method == "CONNECT":
        raise ProtocolError(405, "CONNECT is not supported by a reverse proxy",
                            code="method-not-allowed")
    req.method = method

    hosts: list[bytes] = []
    lengths: list[bytes] = []
    transfer_encoding: bytes | None = None
    connection = b""
    upgrade: bytes | None = None
    kept: Headers = []
    owned = _REQUEST_OWNED
    for item in head.headers:
        name, value = item
        lname = name.lower()
        if lname not in owned:
            if b"_" in lname and lname.replace(b"_", b"-") in _UNDERSCORE_SHADOWED:
                continue
            kept.append(item)
            continue
        if lname == b"host":
            hosts.append(value)
        elif lname == b"content-length":
            lengths.append(value)
        elif lname == b"transfer-encoding":
            if transfer_encoding is not None:
                raise ProtocolError(400, "more than one Transfer-Encoding header")
            transfer_encoding = value
        elif lname == b"connection":
            connection = connection + b"," + value if connection else value
        elif lname == b"upgrade":
            upgrade = value
        elif lname == b"expect":
            if value.strip().lower() == b"100-continue":
                req.expect_continue = True
            else:
                raise ProtocolError(417, "only 'Expect: 100-continue' is supported",
                                    code="expectation-failed")
        elif lname == b"x-request-id":
            if _REQUEST_ID_OK.fullmatch(value):
                req.request_id = value
        elif lname == b"x-forwarded-for":
            req.xff = value if req.xff is None else req.xff + b", " + value
        elif lname == b"forwarded":
            req.forwarded = value if req.forwarded is None else req.forwarded + b", " + value
        elif lname == b"x-real-ip":
            req.real_ip = value
        elif lname == b"x-forwarded-proto":
            req.xfproto = value
        elif lname == b"x-forwarded-host":
            req.xfhost = value
        elif lname == b"x-forwarded-prefix":
            req.xfprefix = value
        elif lname == b"via":
            req.via = value if req.via is None else req.via + b", " + value
        # te, trailer, keep-alive, proxy-*: dropped

    if connection:
        tokens = frozenset(t.strip().lower() for t in connection.split(b",") if t.strip())
        req.connection_tokens = tokens
        named = tokens - {b"close", b"keep-alive", b"upgrade"}
        if named:
            kept = [(n, v) for n, v in kept if n.lower() not in named]
    req.headers = kept
    tokens = req.connection_tokens
    req.keep_alive = (b"close" not in tokens) if version == "1.1" else (b"keep-alive" in tokens)

    if transfer_encoding is not None:
        if lengths:
            raise ProtocolError(400, "Content-Length together with Transfer-Encoding")
        if version == "1.0":
            raise ProtocolError(400, "Transfer-Encoding is not allowed in HTTP/1.0")
        if transfer_encoding.strip().lower() != b"chunked":
            raise ProtocolError(501, "only Transfer-Encoding: chunked is supported",
                                code="not-implemented")
        req.chunked = True
    elif lengths:
        first = lengths[0].strip()
        if not first.isdigit() or any(v.strip() != first for v in lengths[1:]):
            raise ProtocolError(400, "invalid or differing Content-Length")
        req.content_length = int(first)

    if len(hosts) > 1:
        raise ProtocolError(400, "more than one Host header")
    if target == "*" and method == "OPTIONS":
        target = "/"  # asterisk-form: routed as the root, relayed as "*"
        req.asterisk = True
    if target[:1] == "/" and "#" not in target:  # origin-form, the common case
        target_host = None
        path, sep, query = target.partition("?")
        query = sep + query
    else:
        target_host, path, query = split_target(target)
    if hosts:
        req.host_header = hosts[0].strip()
        header_host = _host_cache.get(req.host_header)
        if header_host is None:
            try:
                header_host = normalize_host(req.host_header.decode("ascii"))
            except UnicodeDecodeError:
                raise ProtocolError(400, "malformed Host header") from None
            except HTTPSyntaxError as exc:
                raise ProtocolError(400, str(exc)) from None
            if len(_host_cache) >= HOST_CACHE_SIZE:
                _host_cache.clear()
            _host_cache[req.host_header] = header_host
        if target_host is not None and target_host != header_host:
            raise ProtocolError(400, "absolute-form target and Host header disagree")
        req.host = header_host
    elif version == "1.1":
        raise ProtocolError(400, "missing Host header")
    else:
        req.host = target_host
    if reject_paths and suspicious_path(path):
        raise HTTPError(400, "path-rejected", "dot segments and encoded '.', '/' or '\\'"
                        " are refused here (path_policy)", close=True)
    try:
        req.path = normalize_path(path, merge_slashes)
    except HTTPSyntaxError as exc:
        raise ProtocolError(400, str(exc)) from None
    req.query = query
    if upgrade is not None and b"upgrade" in tokens:
        # The parsers stop at an upgrade offer, whatever comes of it: no reuse.
        req.keep_alive = False
        if method == "GET":
            req.upgrade = upgrade.strip()
    return req


@dataclass(frozen=True, slots=True)
class Peer:
    """The client side of a connection as the forwarding headers describe it."""

    ip: str
    trusted: bool  # the peer is a configured trusted proxy: its forwarding headers are kept
    proto: bytes = b"http"

    @property
    def forwarded_for(self) -> bytes:
        return (f'"[{self.ip}]"' if ":" in self.ip else self.ip).encode()


def upstream_head(req: Request, target: str, peer: Peer, request_id: bytes,
                  stripped: str = "") -> bytes:
    """The canonical request head sent to the upstream instance.

    ``stripped`` is the path prefix the route removed: the app gets it as
    ``X-Forwarded-Prefix`` (after a trusted front proxy's own, which it may have
    stripped before), so it can build links and cookie paths that work from outside.
    A client's own ``X-Forwarded-Prefix`` never reaches the app.
    """
    ip = peer.ip.encode()
    host = req.host_header or (req.host or "").encode()
    own = b"for=" + peer.forwarded_for + b";proto=" + peer.proto + b';host="' + host + b'"'
    real_ip = ip
    if peer.trusted:
        real_ip = req.real_ip or ip  # the front proxy's view of the client, when it sent one
        xff = req.xff + b", " + ip if req.xff else ip
        proto = req.xfproto or peer.proto
        xfhost = req.xfhost or host
        forwarded = req.forwarded + b", " + own if req.forwarded else own
    else:
        xff, proto, xfhost, forwarded = ip, peer.proto, host, own
    parts = [req.method.encode(), b" ", target.encode(), b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    for name, value in req.headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (b"X-Forwarded-For: ", xff, b"\r\nX-Forwarded-Proto: ", proto,
              b"\r\nX-Forwarded-Host: ", xfhost, b"\r\nForwarded: ", forwarded,
              b"\r\nX-Real-IP: ", real_ip,
              b"\r\nVia: ", req.via + b", " + VIA if req.via else VIA,
              b"\r\nX-Request-Id: ", request_id, b"\r\n")
    outer = req.xfprefix.rstrip(b"/") if peer.trusted and req.xfprefix else b""
    if stripped or outer:
        parts += (b"X-Forwarded-Prefix: ", outer + stripped.encode(), b"\r\n")
    if req.upgrade is not None:
        parts += (b"Connection: upgrade\r\nUpgrade: ", req.upgrade, b"\r\n")
    if req.chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif req.content_length is not None:
        parts += (b"Content-Length: ", str(req.content_length).encode(), b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class ResponsePlan:
    """How a response is relayed: the client head, the body mode, and connection reuse."""

    __slots__ = ("body", "head", "keep_alive", "upstream_reusable")

    def __init__(self, head: bytes, body: int, keep_alive: bool, upstream_reusable: bool) -> None:
        self.head = head
        self.body = body
        self.keep_alive = keep_alive
        self.upstream_reusable = upstream_reusable


def client_head(resp: ResponseHead, req: Request, *, keep_alive: bool, request_id: bytes,
                prefix: bytes = b"") -> ResponsePlan:
    """Plan the relay of ``resp`` (a final, non-101 response) to the client of ``req``.

    ``prefix``: the stripped prefix to put back into ``Location`` and ``Set-Cookie`` paths
    (an app's ``rewrite_paths``; see ``rewrite_path_header``)."""
    status = resp.status
    out = [_status_line(status)]
    length: bytes | None = None
    chunked = False
    connection: bytes | None = None
    has_request_id = has_via = False
    owned = _RESPONSE_OWNED
    for name, value in resp.headers:
        lname = name.lower()
        if lname not in owned:
            if prefix and (lname == b"location" or lname == b"set-cookie"):
                value = rewrite_path_header(lname, value, prefix, req.host_header)
            out += (name, b": ", value, b"\r\n")
        elif lname == b"content-length":
            length = value.strip()
        elif lname == b"connection":
            connection = connection + b"," + value if connection else value
        elif lname == b"transfer-encoding":
            coding = value.strip().lower()
            if coding != b"chunked":  # the body would reach the client with its coding unnamed
                raise UpstreamError(502, "upstream-bad-response",
                                    f"unsupported transfer coding {coding.decode('latin-1')!r}")
            chunked = True
        elif lname == b"x-request-id":
            has_request_id = True
            out += (name, b": ", value, b"\r\n")
        elif lname == b"via":
            has_via = True
            out += (name, b": ", value, b", ", VIA, b"\r\n")
    upstream_reusable = resp.version == "1.1"
    if connection is not None:
        tokens = {t.strip().lower() for t in connection.split(b",")}
        upstream_reusable = (b"close" not in tokens) if upstream_reusable else (
            b"keep-alive" in tokens)
        named = tokens - {b"close", b"keep-alive", b""}
        if named:  # rare: drop the headers the upstream's Connection header names
            out = [_status_line(status)]
            for name, value in resp.headers:
                lname = name.lower()
                if (lname not in owned and lname not in named) or lname == b"x-request-id":
                    out += (name, b": ", value, b"\r\n")
                elif lname == b"via":
                    out += (name, b": ", value, b", ", VIA, b"\r\n")

    if req.method == "HEAD" or status == 204 or status == 304 or status < 200:
        body = BODY_NONE
        if status == 204:
            length = None
    elif chunked:
        body = BODY_CHUNKED
        length = None
    elif length is not None:
        body = BODY_LENGTH
    else:
        body = BODY_CHUNKED
    if body == BODY_CHUNKED and req.version == "1.0":
        body = BODY_UNTIL_CLOSE
        keep_alive = False

    if not has_via:
        out.append(b"Via: 1.1 superagent\r\n")
    if not has_request_id:
        out += (b"X-Request-Id: ", request_id, b"\r\n")
    if length is not None:
        out += (b"Content-Length: ", length, b"\r\n")
    elif body == BODY_CHUNKED:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        out.append(b"Connection: close\r\n\r\n")
    elif req.version == "1.0":
        out.append(b"Connection: keep-alive\r\n\r\n")
    else:
        out.append(b"\r\n")
    return ResponsePlan(b"".join(out), body, keep_alive, upstream_reusable)


_STATUS_LINES: Final[dict[int, bytes]] = {}


def rewrite_path_header(lname: bytes, value: bytes, prefix: bytes, host: bytes) -> bytes:
    """``Location`` or ``Set-Cookie`` of an app behind the stripped ``prefix``, as the
    client must see it: an absolute-path Location (or an absolute URL on the request's own
    ``host``) and a cookie's ``Path`` get the prefix in front. Anything else (another
    host, a relative reference, a cookie without Path) is left as the app wrote it."""
    if lname == b"location":
        if value.startswith(b"/") and not value.startswith(b"//"):
            return prefix + value
        for scheme in (b"http://", b"https://"):
            if host and value.lower().startswith(scheme + host.lower()):
                rest = value[len(scheme) + len(host):]
                if rest[:1] in (b"/", b"") :
                    return value[:len(scheme) + len(host)] + prefix + (rest or b"/")
        return value
    parts = value.split(b";")
    for index, part in enumerate(parts[1:], 1):
        key, eq, path = part.strip().partition(b"=")
        if eq and key.lower() == b"path" and path.startswith(b"/"):
            parts[index] = b" Path=" + prefix + (b"" if path == b"/" else path)
    return b";".join(parts)


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %b\r\n" % (status, _reason(status))
        if len(_STATUS_LINES) < 1000:
            _STATUS_LINES[status] = line
    return line


def switching_head(resp: ResponseHead) -> bytes:
    """The 101 response relayed to the client when the upstream accepts an upgrade."""
    parts = [b"HTTP/1.1 101 ", resp.reason or b"Switching Protocols", b"\r\n"]
    for name, value in resp.headers:
        lname = name.lower()
        if lname in (b"connection", b"upgrade") or lname not in HOP_BY_HOP:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


_REFUSAL_CODES: Final = {400: "bad-request", 408: "client-header-timeout",
                         413: "body-too-large", 414: "request-line-too-long",
                         431: "headers-too-large", 501: "not-implemented",
                         505: "version-not-supported"}


def refusal(failure: ParseFailure) -> ProtocolError:
    """The answer to a request the parser refused (the code its status documents)."""
    return ProtocolError(failure.status, failure.detail,
                         _REFUSAL_CODES.get(failure.status, "bad-request"))


def error_response(status: int, code: str, detail: str, request_id: bytes, *,
                   close: bool, head_only: bool = False) -> bytes:
    """A small JSON error the proxy answers itself; ``X-Superagent-Error`` names the cause."""
    body = json.dumps({"error": code, "status": status, "detail": detail,
                       "request_id": request_id.decode("ascii", "replace")}).encode() + b"\n"
    head = (b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"X-Superagent-Error: %b\r\nX-Request-Id: %b\r\nVia: %b\r\n%b\r\n") % (
        status, _reason(status), len(body), code.encode(), request_id, VIA,
        b"Connection: close\r\n" if close else b"")
    return head if head_only else head + body


def plain_response(status: int, body: bytes, *, close: bool, head_only: bool = False) -> bytes:
    """A small text response (health checks)."""
    head = (b"HTTP/1.1 %d %b\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%b\r\n") % (
        status, _reason(status), len(body), b"Connection: close\r\n" if close else b"")
    return head if head_only else head + body


_REASONS: Final = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 201: b"Created",
    202: b"Accepted", 204: b"No Content", 206: b"Partial Content", 301: b"Moved Permanently",
    302: b"Found", 303: b"See Other", 304: b"Not Modified", 307: b"Temporary Redirect",
    308: b"Permanent Redirect", 401: b"Unauthorized", 403: b"Forbidden", 409: b"Conflict",
    429: b"Too Many Requests", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Content Too Large", 414: b"URI Too Long",
    417: b"Expectation Failed", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}


def _reason(status: int) -> bytes:
    # The proxy sends standard reason phrases: they carry no meaning (RFC 9112 4).
    return _REASONS.get(status, b"Status")


class RequestIds:
    """Request ids for requests that arrive without one: a random per-process prefix
    and a counter, unique without a syscall per request."""

    __slots__ = ("_count", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex().encode()
        self._count = 0

    def __repr__(self) -> str:
        return f"<RequestIds prefix={self._prefix.decode()} issued={self._count}>"

    def next(self) -> bytes:
        self._count += 1
        return self._prefix + b"%010x" % self._count
