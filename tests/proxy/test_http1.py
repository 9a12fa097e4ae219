"""Tests for superagent/proxy/http1.py: request interpretation and head serialisation.

h11 is the oracle for the bytes the proxy writes: every head produced here must parse
as exactly one valid HTTP/1.1 message with the expected framing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import h11
import pytest

from superagent.proxy import http1
from superagent.proxy.errors import ProtocolError
from superagent.proxy.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    HOP_BY_HOP,
    LAST_CHUNK,
    Peer,
    Request,
    RequestIds,
    chunk,
    client_head,
    error_response,
    interpret_request,
    rewrite_path_header,
    upstream_head,
)
from superagent.proxy.parsers import RequestHead, ResponseHead

Hdrs = Sequence[tuple[bytes, bytes]]
HOST = ((b"Host", b"example.com"),)
RID = b"rid-123"
UNTRUSTED = Peer(ip="203.0.113.9", trusted=False)
TRUSTED = Peer(ip="10.0.0.1", trusted=True)


def request(headers: Hdrs = HOST, *, method: bytes = b"GET", target: bytes = b"/",
            version: str = "1.1") -> Request:
    """interpret_request on a head built directly."""
    return interpret_request(RequestHead(method, target, version, list(headers)))


def refused(headers: Hdrs = HOST, *, method: bytes = b"GET", target: bytes = b"/",
            version: str = "1.1") -> ProtocolError:
    """The ProtocolError interpret_request raises for this head."""
    with pytest.raises(ProtocolError) as info:
        request(headers, method=method, target=target, version=version)
    assert info.value.close is True
    return info.value


def h11_request(data: bytes) -> tuple[h11.Request, bytes]:
    """Parse ``data`` as exactly one request (head and body) with h11; return it and its body."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    body = b""
    while True:
        event2 = conn.next_event()
        if isinstance(event2, h11.Data):
            body += event2.data
        elif isinstance(event2, h11.EndOfMessage):
            break
        else:
            raise AssertionError(f"incomplete request: {event2!r}")
    assert conn.trailing_data == (b"", False), "bytes after the request"
    return event, body


def values(msg: h11.Request | h11.Response, name: bytes) -> list[bytes]:
    """All values of header ``name`` (lower-case) in an h11 message."""
    return [v for n, v in msg.headers if n == name]


def one(msg: h11.Request | h11.Response, name: bytes) -> bytes:
    """The single value of header ``name``."""
    found = values(msg, name)
    assert len(found) == 1, (name, found)
    return found[0]


# ----------------------------------------------------------------------------- interpret_request

@pytest.mark.parametrize("version", ["2.0", "0.9", "1.2", "3"])
def test_unsupported_version_is_505(version: str) -> None:
    """Only HTTP/1.0 and HTTP/1.1 are relayed."""
    err = refused(version=version)
    assert err.status == 505
    assert err.code == "version-not-supported"


def test_connect_is_405() -> None:
    """CONNECT makes no sense for a reverse proxy."""
    err = refused(method=b"CONNECT", target=b"example.com:443")
    assert err.status == 405
    assert err.code == "method-not-allowed"


@pytest.mark.parametrize(
    "headers",
    [
        [*HOST, (b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
        [*HOST, (b"transfer-encoding", b"chunked"), (b"content-length", b"5")],
    ],
)
def test_content_length_with_transfer_encoding_is_400(headers: Hdrs) -> None:
    """CL together with TE is a request-smuggling vector and is refused."""
    assert refused(headers, method=b"POST").status == 400


def test_transfer_encoding_on_http10_is_400() -> None:
    """HTTP/1.0 has no chunked coding."""
    err = refused([*HOST, (b"Transfer-Encoding", b"chunked")], method=b"POST", version="1.0")
    assert err.status == 400


@pytest.mark.parametrize("te", [b"gzip", b"gzip, chunked", b"chunked, gzip", b"identity"])
def test_transfer_encoding_other_than_chunked_is_501(te: bytes) -> None:
    """Only ``Transfer-Encoding: chunked`` is supported."""
    err = refused([*HOST, (b"Transfer-Encoding", te)], method=b"POST")
    assert err.status == 501
    assert err.code == "not-implemented"


def test_two_transfer_encoding_headers_are_400() -> None:
    """Repeated TE headers are refused."""
    headers = [*HOST, (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")]
    assert refused(headers, method=b"POST").status == 400


def test_chunked_is_case_insensitive() -> None:
    """``Transfer-Encoding: Chunked`` marks a chunked body."""
    req = request([*HOST, (b"Transfer-Encoding", b" Chunked ")], method=b"POST")
    assert req.chunked is True
    assert req.content_length is None
    assert req.has_body is True


@pytest.mark.parametrize(
    "lengths", [[b"5", b"6"], [b"abc"], [b"-1"], [b"+5"], [b"5, 5"], [b""], [b"0x10"]],
)
def test_invalid_or_differing_content_length_is_400(lengths: list[bytes]) -> None:
    """Non-numeric or conflicting Content-Length values are refused."""
    headers = [*HOST, *((b"Content-Length", v) for v in lengths)]
    assert refused(headers, method=b"POST").status == 400


def test_equal_duplicate_content_lengths_are_accepted() -> None:
    """Identical repeated Content-Length values are one length."""
    req = request([*HOST, (b"Content-Length", b"5"), (b"content-length", b" 5")], method=b"POST")
    assert req.content_length == 5
    assert req.chunked is False
    assert req.has_body is True


def test_zero_content_length_has_no_body() -> None:
    """``Content-Length: 0`` is a length but no body."""
    req = request([*HOST, (b"Content-Length", b"0")], method=b"POST")
    assert req.content_length == 0
    assert req.has_body is False


def test_multiple_host_headers_are_400() -> None:
    """Two Host headers are refused even if they agree."""
    assert refused([(b"Host", b"a.com"), (b"Host", b"a.com")]).status == 400


def test_missing_host_on_http11_is_400() -> None:
    """HTTP/1.1 requires Host."""
    assert refused([], version="1.1").status == 400


def test_missing_host_on_http10_is_allowed() -> None:
    """HTTP/1.0 may omit Host; the request is then routed by path only."""
    req = request([], version="1.0", target=b"/x")
    assert req.host is None
    assert req.version == "1.0"
    assert req.path == "/x"


def test_http10_absolute_form_without_host_takes_the_target_host() -> None:
    """An absolute-form target gives the host when Host is absent."""
    req = request([], version="1.0", target=b"http://Example.COM:8080/p?q")
    assert req.host == "example.com"
    assert (req.path, req.query) == ("/p", "?q")


def test_absolute_form_must_agree_with_host() -> None:
    """An absolute-form target whose host differs from Host is refused."""
    err = refused([(b"Host", b"other.com")], target=b"http://example.com/x")
    assert err.status == 400


def test_absolute_form_agreeing_with_host_is_accepted() -> None:
    """Host and target hosts are compared after normalisation (case, port, trailing dot)."""
    req = request([(b"Host", b"EXAMPLE.com.:80")], target=b"http://example.com/a/../x?y=1")
    assert req.host == "example.com"
    assert req.host_header == b"EXAMPLE.com.:80"
    assert (req.path, req.query) == ("/x", "?y=1")


@pytest.mark.parametrize("host", [b"exa mple.com", b"example.com:http", b"[::1", b"caf\xc3\xa9",
                                  b""])
def test_malformed_host_is_400(host: bytes) -> None:
    """A malformed or non-ASCII Host header is refused."""
    assert refused([(b"Host", host)]).status == 400


@pytest.mark.parametrize("target", [b"/a#b", b"/a b", b"a/b", b"http://u@example.com/",
                                    b"/%zz", b"/caf\xc3\xa9"])
def test_bad_targets_are_400(target: bytes) -> None:
    """Fragments, userinfo, bad characters, bad escapes and non-ASCII targets are refused."""
    assert refused(target=target).status == 400


def test_normalisation_errors_are_bad_requests_that_close() -> None:
    """A path or Host that superagent.httprules refuses is a 400 that closes, with its reason."""
    for err in (refused(target=b"/%zz"), refused([(b"Host", b"example.com:http")]),
                refused(target=b"http://exa mple.com/")):
        assert (err.status, err.code, err.close) == (400, "bad-request", True)
    assert refused(target=b"/%zz").detail == "invalid percent-escape in request path"
    assert refused([(b"Host", b"example.com:http")]).detail == "malformed port in Host header"


def test_path_is_normalised_and_query_kept() -> None:
    """The request's path is normalise_path's result; the query keeps its '?'."""
    req = request(target=b"/a//b/./%2e%2E/c%2f?x=1&y=%2F")
    assert req.path == "/a//c%2F"  # repeated slashes are kept (merge_slashes is opt-in)
    assert req.query == "?x=1&y=%2F"


def test_options_asterisk_is_accepted() -> None:
    """``OPTIONS * HTTP/1.1`` is valid and routes as "/"."""
    req = request(method=b"OPTIONS", target=b"*")
    assert req.method == "OPTIONS"
    assert req.path == "/"


@pytest.mark.parametrize("value", [b"100-continue", b"100-Continue", b" 100-CONTINUE "])
def test_expect_100_continue_is_accepted(value: bytes) -> None:
    """``Expect: 100-continue`` is understood (case-insensitively) and not forwarded."""
    req = request([*HOST, (b"Expect", value), (b"Content-Length", b"3")], method=b"PUT")
    assert req.expect_continue is True
    assert all(n.lower() != b"expect" for n, _ in req.headers)


@pytest.mark.parametrize("value", [b"something", b"100-continue-ish", b""])
def test_other_expectations_are_417(value: bytes) -> None:
    """Any other expectation fails with 417."""
    err = refused([*HOST, (b"Expect", value)])
    assert err.status == 417
    assert err.code == "expectation-failed"


def test_hop_by_hop_and_owned_headers_are_removed() -> None:
    """Hop-by-hop headers, headers named in Connection and proxy-owned ones leave req.headers."""
    req = request([
        (b"Host", b"example.com"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Checksum"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
        (b"Upgrade", b"h2c"),
        (b"Accept", b"*/*"),
        (b"x-secret", b"1"),
        (b"X-SECRET", b"2"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"Forwarded", b"for=6.6.6.6"),
        (b"Via", b"1.0 fred"),
        (b"X-Request-Id", b"abc"),
        (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        (b"Cookie", b"a=b"),
    ])
    assert req.headers == [
        (b"Accept", b"*/*"),
        (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        (b"Cookie", b"a=b"),
    ]
    assert req.upgrade is None  # Upgrade without "Connection: upgrade"
    assert req.xff == b"6.6.6.6"
    assert req.forwarded == b"for=6.6.6.6"
    assert req.via == b"1.0 fred"
    assert req.request_id == b"abc"


def test_connection_named_headers_across_several_connection_headers() -> None:
    """Tokens of all Connection headers count, case-insensitively."""
    req = request([*HOST, (b"Connection", b"X-A"), (b"connection", b" x-b ,close"),
                   (b"X-a", b"1"), (b"X-B", b"2"), (b"X-C", b"3")])
    assert req.headers == [(b"X-C", b"3")]
    assert req.keep_alive is False
    assert {b"x-a", b"x-b", b"close"} <= req.connection_tokens


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        ("1.1", None, True),
        ("1.1", b"close", False),
        ("1.1", b"Close", False),
        ("1.1", b"keep-alive", True),
        ("1.1", b"foo, CLOSE", False),
        ("1.0", None, False),
        ("1.0", b"keep-alive", True),
        ("1.0", b"Keep-Alive, foo", True),
        ("1.0", b"close", False),
    ],
)
def test_keep_alive_rules(version: str, connection: bytes | None, keep_alive: bool) -> None:
    """1.1 is persistent unless "close"; 1.0 only with "keep-alive"."""
    headers = list(HOST) + ([(b"Connection", connection)] if connection else [])
    assert request(headers, version=version).keep_alive is keep_alive


@pytest.mark.parametrize(
    ("method", "connection", "upgrade", "expected"),
    [
        (b"GET", b"Upgrade", b"websocket", b"websocket"),
        (b"GET", b"keep-alive, upgrade", b" websocket ", b"websocket"),
        (b"GET", None, b"websocket", None),
        (b"GET", b"keep-alive", b"websocket", None),
        (b"GET", b"upgrade", None, None),
        (b"POST", b"upgrade", b"websocket", None),
    ],
)
def test_upgrade_detection(method: bytes, connection: bytes | None, upgrade: bytes | None,
                           expected: bytes | None) -> None:
    """An upgrade needs GET, an Upgrade header and the "upgrade" Connection token."""
    headers = list(HOST)
    if connection is not None:
        headers.append((b"Connection", connection))
    if upgrade is not None:
        headers.append((b"Upgrade", upgrade))
    req = request(headers, method=method)
    assert req.upgrade == expected
    assert all(n.lower() not in (b"upgrade", b"connection") for n, _ in req.headers)


@pytest.mark.parametrize("rid", [b"has space", b"x" * 201, b"a\"b", b""])
def test_invalid_client_request_ids_are_ignored(rid: bytes) -> None:
    """An X-Request-Id outside the safe alphabet or too long is not reused."""
    assert request([*HOST, (b"X-Request-Id", rid)]).request_id is None


# ----------------------------------------------------------------------------- upstream_head

def test_upstream_head_basic_get() -> None:
    """A plain GET gets Host, forwarding headers, Via and the request id, and no framing."""
    req = request([(b"Host", b"example.com:8080"), (b"Accept", b"text/html")],
                  target=b"/a/b?x=1")
    ev, body = h11_request(upstream_head(req, "/b?x=1", UNTRUSTED, RID))
    assert ev.method == b"GET"
    assert ev.target == b"/b?x=1"
    assert ev.http_version == b"1.1"
    assert body == b""
    assert one(ev, b"host") == b"example.com:8080"
    assert one(ev, b"accept") == b"text/html"
    assert one(ev, b"x-forwarded-for") == b"203.0.113.9"
    assert one(ev, b"x-forwarded-proto") == b"http"
    assert one(ev, b"x-forwarded-host") == b"example.com:8080"
    assert one(ev, b"forwarded") == b'for=203.0.113.9;proto=http;host="example.com:8080"'
    assert one(ev, b"via") == b"1.1 superagent"
    assert one(ev, b"x-request-id") == RID
    assert values(ev, b"content-length") == [] and values(ev, b"transfer-encoding") == []
    assert not {n for n, _ in ev.headers} & HOP_BY_HOP


CLIENT_FORWARDING = [
    (b"Host", b"example.com"),
    (b"X-Forwarded-For", b"198.51.100.1"),
    (b"X-Forwarded-For", b"198.51.100.2"),
    (b"X-Forwarded-Proto", b"https"),
    (b"X-Forwarded-Host", b"public.example"),
    (b"Forwarded", b'for=198.51.100.1;proto=https'),
    (b"Via", b"1.0 edge"),
    (b"X-Request-Id", b"client-id"),
]


def test_untrusted_peer_forwarding_headers_are_replaced() -> None:
    """From an untrusted peer, client-supplied X-Forwarded-* and Forwarded are replaced."""
    req = request(CLIENT_FORWARDING)
    ev, _ = h11_request(upstream_head(req, "/", UNTRUSTED, RID))
    assert one(ev, b"x-forwarded-for") == b"203.0.113.9"
    assert one(ev, b"x-forwarded-proto") == b"http"
    assert one(ev, b"x-forwarded-host") == b"example.com"
    assert one(ev, b"forwarded") == b'for=203.0.113.9;proto=http;host="example.com"'
    assert one(ev, b"via") == b"1.0 edge, 1.1 superagent"
    assert one(ev, b"x-request-id") == RID


def test_trusted_peer_forwarding_headers_are_appended() -> None:
    """From a trusted proxy, its forwarding headers are kept and the peer appended."""
    req = request(CLIENT_FORWARDING)
    ev, _ = h11_request(upstream_head(req, "/", TRUSTED, RID))
    assert one(ev, b"x-forwarded-for") == b"198.51.100.1, 198.51.100.2, 10.0.0.1"
    assert one(ev, b"x-forwarded-proto") == b"https"
    assert one(ev, b"x-forwarded-host") == b"public.example"
    assert one(ev, b"forwarded") == (
        b'for=198.51.100.1;proto=https, for=10.0.0.1;proto=http;host="example.com"')
    assert one(ev, b"via") == b"1.0 edge, 1.1 superagent"


def test_stripped_prefix_is_forwarded_and_a_clients_is_not() -> None:
    """X-Forwarded-Prefix names the prefix the route stripped; a client cannot set it,
    and a trusted front proxy's own comes first."""
    req = request([*HOST, (b"X-Forwarded-Prefix", b"/evil")])
    ev, _ = h11_request(upstream_head(req, "/x", UNTRUSTED, RID, "/hello"))
    assert one(ev, b"x-forwarded-prefix") == b"/hello"
    ev, _ = h11_request(upstream_head(req, "/x", UNTRUSTED, RID))
    assert values(ev, b"x-forwarded-prefix") == []
    front = request([*HOST, (b"X-Forwarded-Prefix", b"/edge/")])
    ev, _ = h11_request(upstream_head(front, "/x", TRUSTED, RID, "/hello"))
    assert one(ev, b"x-forwarded-prefix") == b"/edge/hello"


def test_trusted_peer_without_client_headers_gets_its_own() -> None:
    """A trusted peer that sent no forwarding headers is described like any other."""
    ev, _ = h11_request(upstream_head(request(), "/", Peer(ip="10.0.0.1", trusted=True,
                                                             proto=b"https"), RID))
    assert one(ev, b"x-forwarded-for") == b"10.0.0.1"
    assert one(ev, b"x-forwarded-proto") == b"https"
    assert one(ev, b"forwarded") == b'for=10.0.0.1;proto=https;host="example.com"'


def test_ipv6_peer_is_quoted_in_forwarded() -> None:
    """RFC 7239 requires IPv6 node names to be bracketed and quoted."""
    ev, _ = h11_request(upstream_head(request(), "/", Peer(ip="2001:db8::1", trusted=False),
                                      RID))
    assert one(ev, b"x-forwarded-for") == b"2001:db8::1"
    assert one(ev, b"forwarded") == b'for="[2001:db8::1]";proto=http;host="example.com"'


def test_hop_by_hop_never_reach_the_upstream() -> None:
    """Hop-by-hop headers, Connection-named headers and Expect are not forwarded."""
    req = request([
        (b"Host", b"example.com"), (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"), (b"Trailer", b"X-T"),
        (b"Proxy-Authorization", b"secret"), (b"Proxy-Connection", b"keep-alive"),
        (b"Expect", b"100-continue"), (b"Content-Length", b"3"),
        (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        (b"tracestate", b"congo=t61rcWkgMzE"),
    ], method=b"POST")
    ev, body = h11_request(upstream_head(req, "/", UNTRUSTED, RID) + b"abc")
    names = {n for n, _ in ev.headers}
    assert not names & (HOP_BY_HOP | {b"x-hop", b"expect"})
    assert one(ev, b"traceparent") == b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert one(ev, b"tracestate") == b"congo=t61rcWkgMzE"
    assert one(ev, b"content-length") == b"3"
    assert body == b"abc"


def test_content_length_body_framing() -> None:
    """A request with Content-Length goes upstream with exactly that length and no TE."""
    req = request([*HOST, (b"Content-Length", b"5"), (b"Content-Length", b"5")], method=b"POST")
    ev, body = h11_request(upstream_head(req, "/up", UNTRUSTED, RID) + b"hello")
    assert one(ev, b"content-length") == b"5"
    assert values(ev, b"transfer-encoding") == []
    assert body == b"hello"


def test_chunked_body_framing() -> None:
    """A chunked request goes upstream chunked, with no Content-Length."""
    req = request([*HOST, (b"Transfer-Encoding", b"chunked")], method=b"POST")
    data = upstream_head(req, "/up", UNTRUSTED, RID) + chunk(b"hel") + chunk(b"lo") + LAST_CHUNK
    ev, body = h11_request(data)
    assert one(ev, b"transfer-encoding") == b"chunked"
    assert values(ev, b"content-length") == []
    assert body == b"hello"


def test_upgrade_request_keeps_upgrade_headers() -> None:
    """A websocket upgrade is forwarded with "Connection: upgrade" and its Upgrade header."""
    req = request([*HOST, (b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"websocket"),
                   (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ==")])
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(upstream_head(req, "/ws", UNTRUSTED, RID))
    ev = conn.next_event()
    assert isinstance(ev, h11.Request)
    assert one(ev, b"connection") == b"upgrade"
    assert one(ev, b"upgrade") == b"websocket"
    assert one(ev, b"sec-websocket-key") == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    assert conn.next_event() is h11.PAUSED  # h11 waits for the upstream's 101


def test_http10_client_without_host_is_sent_as_http11() -> None:
    """A 1.0 request is forwarded as HTTP/1.1 with the host it was routed by."""
    req = request([], version="1.0", target=b"http://example.com/x")
    ev, _ = h11_request(upstream_head(req, "/x", UNTRUSTED, RID))
    assert ev.http_version == b"1.1"
    assert one(ev, b"host") == b"example.com"


# ----------------------------------------------------------------------------- client_head

def h11_response(plan: http1.ResponsePlan, body: bytes, *, method: bytes = b"GET",
                 eof: bool = False) -> tuple[h11.Response, bytes, h11.Connection]:
    """Parse ``plan.head + body`` as the response to a ``method`` request with h11."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"example.com")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(plan.head + body)
    if eof:
        conn.receive_data(b"")
    ev = conn.next_event()
    assert isinstance(ev, h11.Response), ev
    got = b""
    while True:
        ev2 = conn.next_event()
        if isinstance(ev2, h11.Data):
            got += ev2.data
        elif isinstance(ev2, h11.EndOfMessage):
            break
        else:
            raise AssertionError(f"incomplete response: {ev2!r}")
    return ev, got, conn


def response(status: int = 200, headers: Hdrs = (), version: str = "1.1") -> ResponseHead:
    """A parsed upstream response head."""
    return ResponseHead(status, b"", version, list(headers))


def test_client_head_keeps_content_length() -> None:
    """A response with Content-Length is relayed with that length."""
    resp = response(headers=[(b"Content-Length", b"5"), (b"Content-Type", b"text/plain")])
    plan = client_head(resp, request(), keep_alive=True, request_id=RID)
    assert plan.body == BODY_LENGTH
    assert plan.keep_alive is True
    assert plan.upstream_reusable is True
    ev, body, conn = h11_response(plan, b"hello")
    assert ev.status_code == 200
    assert one(ev, b"content-length") == b"5"
    assert values(ev, b"transfer-encoding") == []
    assert one(ev, b"content-type") == b"text/plain"
    assert one(ev, b"via") == b"1.1 superagent"
    assert one(ev, b"x-request-id") == RID
    assert body == b"hello"
    assert conn.their_state is h11.DONE


def test_client_head_chunked() -> None:
    """A chunked upstream response is relayed chunked without Content-Length."""
    resp = response(headers=[(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"99")])
    plan = client_head(resp, request(), keep_alive=True, request_id=RID)
    assert plan.body == BODY_CHUNKED
    ev, body, _ = h11_response(plan, chunk(b"hello") + LAST_CHUNK)
    assert one(ev, b"transfer-encoding") == b"chunked"
    assert values(ev, b"content-length") == []
    assert body == b"hello"


def test_close_delimited_upstream_becomes_chunked_for_http11() -> None:
    """A response without length is re-framed as chunked for a 1.1 client (keep-alive kept)."""
    plan = client_head(response(), request(), keep_alive=True, request_id=RID)
    assert plan.body == BODY_CHUNKED
    assert plan.keep_alive is True
    ev, body, _ = h11_response(plan, chunk(b"data") + LAST_CHUNK)
    assert one(ev, b"transfer-encoding") == b"chunked"
    assert values(ev, b"connection") == []
    assert body == b"data"


def test_close_delimited_upstream_for_http10_client() -> None:
    """A 1.0 client cannot take chunked: the body is delimited by closing the connection."""
    req = request(version="1.0")
    plan = client_head(response(), req, keep_alive=True, request_id=RID)
    assert plan.body == BODY_UNTIL_CLOSE
    assert plan.keep_alive is False
    ev, body, _ = h11_response(plan, b"until the end", eof=True)
    assert one(ev, b"connection") == b"close"
    assert values(ev, b"transfer-encoding") == [] and values(ev, b"content-length") == []
    assert body == b"until the end"


def test_chunked_upstream_for_http10_client_is_close_delimited() -> None:
    """A chunked upstream response reaches a 1.0 client close-delimited."""
    resp = response(headers=[(b"Transfer-Encoding", b"chunked")])
    plan = client_head(resp, request(version="1.0", headers=[(b"Connection", b"keep-alive")]),
                       keep_alive=True, request_id=RID)
    assert plan.body == BODY_UNTIL_CLOSE
    assert plan.keep_alive is False
    assert b"Transfer-Encoding" not in plan.head
    assert b"Connection: close\r\n" in plan.head


def test_http10_keep_alive_is_announced() -> None:
    """A persistent 1.0 client is told "Connection: keep-alive"."""
    req = request(version="1.0", headers=[(b"Connection", b"keep-alive")])
    plan = client_head(response(headers=[(b"Content-Length", b"2")]), req, keep_alive=True,
                       request_id=RID)
    assert plan.body == BODY_LENGTH
    assert plan.keep_alive is True
    ev, body, _ = h11_response(plan, b"ok")
    assert one(ev, b"connection") == b"keep-alive"
    assert body == b"ok"


@pytest.mark.parametrize(
    "headers", [[(b"Content-Length", b"10")], [(b"Transfer-Encoding", b"chunked")], []],
)
def test_head_response_has_no_body(headers: Hdrs) -> None:
    """The response to HEAD has no body whatever its framing headers say."""
    plan = client_head(response(headers=headers), request(method=b"HEAD"), keep_alive=True,
                       request_id=RID)
    assert plan.body == BODY_NONE
    ev, body, conn = h11_response(plan, b"", method=b"HEAD")
    assert body == b""
    assert conn.their_state is h11.DONE
    if headers and headers[0][0] == b"Content-Length":
        assert one(ev, b"content-length") == b"10"


def test_204_has_no_body_and_no_length() -> None:
    """204 never carries Content-Length or a body."""
    plan = client_head(response(204, [(b"Content-Length", b"0")]), request(), keep_alive=True,
                       request_id=RID)
    assert plan.body == BODY_NONE
    ev, body, conn = h11_response(plan, b"")
    assert body == b""
    assert ev.status_code == 204
    assert values(ev, b"content-length") == [] and values(ev, b"transfer-encoding") == []
    assert conn.their_state is h11.DONE


def test_304_has_no_body() -> None:
    """304 has no body; a Content-Length describing the resource is kept."""
    plan = client_head(response(304, [(b"Content-Length", b"1234"), (b"ETag", b'"v1"')]),
                       request(), keep_alive=True, request_id=RID)
    assert plan.body == BODY_NONE
    ev, body, conn = h11_response(plan, b"")
    assert ev.status_code == 304
    assert one(ev, b"etag") == b'"v1"'
    assert body == b""
    assert conn.their_state is h11.DONE


def test_response_hop_by_hop_headers_are_stripped() -> None:
    """Hop-by-hop headers and those the upstream's Connection names do not reach the client."""
    resp = response(headers=[
        (b"Connection", b"keep-alive, X-Internal"), (b"Keep-Alive", b"timeout=5"),
        (b"X-Internal", b"secret"), (b"Proxy-Authenticate", b"Basic"), (b"Trailer", b"X-T"),
        (b"Upgrade", b"h2c"), (b"Content-Length", b"2"), (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ])
    plan = client_head(resp, request(), keep_alive=True, request_id=RID)
    ev, body, _ = h11_response(plan, b"ok")
    names = {n for n, _ in ev.headers}
    assert not names & (HOP_BY_HOP | {b"x-internal"})
    assert values(ev, b"set-cookie") == [b"a=1", b"b=2"]
    assert body == b"ok"


def test_keep_alive_false_adds_connection_close() -> None:
    """When the proxy will close, the client is told so."""
    plan = client_head(response(headers=[(b"Content-Length", b"0")]), request(),
                       keep_alive=False, request_id=RID)
    assert plan.keep_alive is False
    ev, _, conn = h11_response(plan, b"")
    assert one(ev, b"connection") == b"close"
    assert conn.their_state is h11.MUST_CLOSE


def test_upstream_via_and_request_id_are_kept() -> None:
    """An upstream Via is extended and its X-Request-Id is not duplicated."""
    resp = response(headers=[(b"Via", b"1.1 app"), (b"X-Request-Id", b"up-1"),
                             (b"Content-Length", b"0")])
    ev, _, _ = h11_response(client_head(resp, request(), keep_alive=True, request_id=RID), b"")
    assert one(ev, b"via") == b"1.1 app, 1.1 superagent"
    assert one(ev, b"x-request-id") == b"up-1"


@pytest.mark.parametrize(
    ("version", "connection", "reusable"),
    [("1.1", None, True), ("1.1", b"close", False), ("1.1", b"Keep-Alive", True),
     ("1.0", None, False), ("1.0", b"keep-alive", True), ("1.0", b"close", False)],
)
def test_upstream_reusable(version: str, connection: bytes | None, reusable: bool) -> None:
    """The upstream connection is reusable per its version and Connection header."""
    headers = [(b"Content-Length", b"0")]
    if connection is not None:
        headers.append((b"Connection", connection))
    plan = client_head(response(headers=headers, version=version), request(), keep_alive=True,
                       request_id=RID)
    assert plan.upstream_reusable is reusable


# ----------------------------------------------------------------------------- error_response

def test_error_response_is_valid_json_with_request_id() -> None:
    """The proxy's own error is valid HTTP with a JSON body naming the request id and cause."""
    data = error_response(502, "upstream-refused", "connection refused", RID, close=True)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    ev = conn.next_event()
    assert isinstance(ev, h11.Response)
    assert ev.status_code == 502
    assert one(ev, b"x-superagent-error") == b"upstream-refused"
    assert one(ev, b"x-request-id") == RID
    assert one(ev, b"content-type") == b"application/json"
    assert one(ev, b"connection") == b"close"
    body = conn.next_event()
    assert isinstance(body, h11.Data)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    assert json.loads(bytes(body.data)) == {"error": "upstream-refused", "status": 502,
                                            "detail": "connection refused", "request_id": "rid-123"}


def test_error_response_head_only_and_keep_alive() -> None:
    """``head_only`` omits the body but keeps its length; without close no Connection header."""
    full = error_response(404, "no-route", "no app", RID, close=False)
    head = error_response(404, "no-route", "no app", RID, close=False, head_only=True)
    assert full.startswith(head)
    assert head.endswith(b"\r\n\r\n")
    assert b"Connection" not in head
    body = full[len(head):]
    assert f"Content-Length: {len(body)}\r\n".encode() in head
    assert json.loads(body)["request_id"] == "rid-123"


def test_request_ids_are_unique() -> None:
    """Generated request ids never repeat, within or across generators."""
    a, b = RequestIds(), RequestIds()
    ids = [a.next() for _ in range(5000)] + [b.next() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    # A generated id is one the proxy would accept back from a client.
    assert request([*HOST, (b"X-Request-Id", ids[0])]).request_id == ids[0]


@pytest.mark.parametrize(("name", "value", "expected"), [
    (b"location", b"/relative-redirect/1", b"/web/relative-redirect/1"),
    (b"location", b"/", b"/web/"),
    (b"location", b"http://example.com/x?y=1", b"http://example.com/web/x?y=1"),
    (b"location", b"https://EXAMPLE.com", b"https://EXAMPLE.com/web/"),
    (b"location", b"http://other.example/x", b"http://other.example/x"),
    (b"location", b"http://example.com.evil/x", b"http://example.com.evil/x"),
    (b"location", b"//example.com/x", b"//example.com/x"),
    (b"location", b"x/y", b"x/y"),
    (b"set-cookie", b"sid=1; Path=/; HttpOnly", b"sid=1; Path=/web; HttpOnly"),
    (b"set-cookie", b"sid=1; path=/app; Secure", b"sid=1; Path=/web/app; Secure"),
    (b"set-cookie", b"sid=1; HttpOnly", b"sid=1; HttpOnly"),
])
def test_rewrite_path_header(name: bytes, value: bytes, expected: bytes) -> None:
    """Absolute paths and same-host URLs get the stripped prefix back; nothing else."""
    assert rewrite_path_header(name, value, b"/web", b"example.com") == expected


def test_client_head_rewrites_paths_only_with_a_prefix() -> None:
    """client_head rewrites Location and Set-Cookie for an app with rewrite_paths only."""
    resp = response(302, [(b"Location", b"/next"), (b"Set-Cookie", b"a=b; Path=/"),
                          (b"Content-Length", b"0")])
    plain = client_head(resp, request(), keep_alive=True, request_id=RID).head
    assert b"Location: /next\r\n" in plain and b"Path=/\r\n" in plain
    rewritten = client_head(resp, request(), keep_alive=True, request_id=RID,
                            prefix=b"/web").head
    assert b"Location: /web/next\r\n" in rewritten and b"Path=/web\r\n" in rewritten
