"""Tests for superagent/proxy/parsers.py: both backends must give the same events.

Every test runs against "httptools" and "h11". A request is *refused* when the parser
emits a ParseFailure or emits a head that ``interpret_request`` refuses; the relay
treats both the same way, so the backends may differ in which layer refuses.
"""

from __future__ import annotations

from typing import Any

import pytest

from superagent.proxy.errors import ProtocolError
from superagent.proxy.http1 import interpret_request
from superagent.proxy.parsers import (
    END,
    Event,
    ParseFailure,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    request_parser,
    response_parser,
)
from superagent.proxy.snapshot import ServerSettings

KINDS = ["httptools", "h11"]
LIMITS = ServerSettings(max_header_bytes=1024, max_headers=10, max_request_line=256)

pytestmark = pytest.mark.parametrize("kind", KINDS)


def chunks(data: bytes, step: int | None) -> list[bytes]:
    """``data`` whole (step None) or in pieces of ``step`` bytes."""
    if step is None:
        return [data]
    return [data[i : i + step] for i in range(0, len(data), step)]


def run_requests(kind: str, data: bytes, step: int | None = None,
                 limits: ServerSettings = LIMITS) -> tuple[list[Event], RequestParser]:
    """Feed ``data`` like the connection does: drain events, ``next_cycle()`` after each END."""
    p = request_parser(kind, limits)
    out: list[Event] = []
    for piece in chunks(data, step):
        p.feed(piece)
        while p.events:
            event = p.events.popleft()
            out.append(event)
            if event is END:
                p.next_cycle()
    return out, p


def simplify(events: list[Event]) -> list[Any]:
    """Comparable events: heads as tuples (names lower-cased), adjacent body pieces merged."""
    out: list[Any] = []
    for e in events:
        if isinstance(e, bytes):
            if out and isinstance(out[-1], bytes):
                out[-1] += e
            else:
                out.append(e)
        elif isinstance(e, RequestHead):
            out.append(("req", e.method, e.target, e.version,
                        [(n.lower(), v) for n, v in e.headers]))
        elif isinstance(e, ResponseHead):
            out.append(("resp", e.status, e.version, [(n.lower(), v) for n, v in e.headers]))
        elif isinstance(e, ParseFailure):
            out.append(("fail", e.status))
        else:
            assert e is END
            out.append("END")
    return out


def refusal(events: list[Event]) -> int | None:
    """The status the relay answers with for these events, or None if all is accepted."""
    for e in events:
        if isinstance(e, ParseFailure):
            return e.status
        if isinstance(e, RequestHead):
            try:
                interpret_request(e)
            except ProtocolError as exc:
                return exc.status
    return None


def big_headers(count: int, value_len: int) -> bytes:
    """``count`` header lines with values of ``value_len`` bytes."""
    return b"".join(b"X-H%d: %s\r\n" % (i, b"v" * value_len) for i in range(count))


REFUSED = {
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n", 400),
    "obs-fold-tab": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n\tb\r\n\r\n", 400),
    "cl-and-te": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "differing-cl": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                     b"Content-Length: 4\r\n\r\nabcd", 400),
    "te-on-http10": (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"0\r\n\r\n", 400),
    "bad-chunk-size": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nabc\r\n0\r\n\r\n", 400),
    "space-before-colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "empty-header-name": (b"GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n", 400),
    "ctl-in-value": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x01b\r\n\r\n", 400),
    "nul-in-value": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", 400),
    "del-in-value": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x7fb\r\n\r\n", 400),
    "bare-lf": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "bare-lf-one-header": (b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n", 400),
    "bare-cr": (b"GET / HTTP/1.1\r\nHost: a\rX-A: b\r\n\r\n", 400),
    "request-line-too-long": (b"GET /" + b"a" * 400 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    # 257 bytes: the target alone (248) is under the limit, the whole line is not.
    "request-line-one-over": (b"GET /" + b"a" * 247 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    "headers-too-large": (b"GET / HTTP/1.1\r\nHost: a\r\n" + big_headers(7, 200) + b"\r\n", 431),
    "too-many-headers": (b"GET / HTTP/1.1\r\nHost: a\r\n" + big_headers(12, 1) + b"\r\n", 431),
}


@pytest.mark.parametrize("step", [None, 1], ids=["whole", "bytewise"])
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals(kind: str, case: str, step: int | None) -> None:
    """Both backends refuse the same malformed requests with the same status."""
    data, status = REFUSED[case]
    events, _ = run_requests(kind, data, step)
    assert refusal(events) == status, simplify(events)


def test_failure_stops_parsing(kind: str) -> None:
    """After a ParseFailure nothing more is emitted, even for valid bytes."""
    p = request_parser(kind, LIMITS)
    p.feed(REFUSED["obs-fold"][0])
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    p.feed_eof()
    assert simplify(list(p.events)) == [("fail", 400)]


GOOD_REQUESTS = {
    "get": b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n",
    "post-length": b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world",
    "post-chunked": (b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"),
    "http10": b"GET / HTTP/1.0\r\n\r\n",
    "tab-and-utf8-values": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\tb\r\nX-B: caf\xc3\xa9\r\n\r\n",
}


@pytest.mark.parametrize("step", [None, 1, 7], ids=["whole", "bytewise", "by7"])
@pytest.mark.parametrize("case", sorted(GOOD_REQUESTS))
def test_valid_requests_in_any_segmentation(kind: str, case: str, step: int | None) -> None:
    """A valid request gives the same events however its bytes are split by TCP."""
    data = GOOD_REQUESTS[case]
    expected, _ = run_requests("httptools", data)
    events, _ = run_requests(kind, data, step)
    assert refusal(events) is None, simplify(events)
    assert simplify(events) == simplify(expected)
    assert simplify(events)[-1] == "END"


def test_get_events(kind: str) -> None:
    """A GET gives its head (method, target, version, headers) and END."""
    events, _ = run_requests(kind, GOOD_REQUESTS["get"])
    assert simplify(events) == [
        ("req", b"GET", b"/a?b=1", "1.1", [(b"host", b"example.com"), (b"accept", b"*/*")]),
        "END",
    ]


def test_header_names_keep_their_case(kind: str) -> None:
    """RequestHead holds header names exactly as received."""
    events, _ = run_requests(kind, b"GET / HTTP/1.1\r\nHost: a\r\nX-Mixed-Case: 1\r\n\r\n")
    head = events[0]
    assert isinstance(head, RequestHead)
    assert head.headers == [(b"Host", b"a"), (b"X-Mixed-Case", b"1")]


def test_head_just_under_the_limits_is_accepted_bytewise(kind: str) -> None:
    """A head within max_header_bytes is accepted even when it arrives one byte at a time."""
    data = b"GET / HTTP/1.1\r\nHost: a\r\n" + big_headers(6, 100) + b"\r\n"  # ~650 header bytes
    for step in (None, 1):
        events, _ = run_requests(kind, data, step)
        assert refusal(events) is None, (step, simplify(events))
        assert simplify(events)[-1] == "END"


@pytest.mark.parametrize("step", [None, 1], ids=["whole", "bytewise"])
def test_limits_are_inclusive(kind: str, step: int | None) -> None:
    """A request line of exactly max_request_line bytes and exactly max_headers are accepted."""
    line = b"GET /" + b"a" * 242 + b" HTTP/1.1"
    assert len(line) == LIMITS.max_request_line
    data = line + b"\r\nHost: a\r\n" + big_headers(LIMITS.max_headers - 1, 1) + b"\r\n"
    events, _ = run_requests(kind, data, step)
    assert refusal(events) is None, simplify(events)
    head = events[0]
    assert isinstance(head, RequestHead)
    assert len(head.headers) == LIMITS.max_headers
    assert simplify(events)[-1] == "END"


def test_pipelined_requests_in_order(kind: str) -> None:
    """Pipelined requests in one segment come out in order, bodies attached to the right one."""
    data = (b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n"
            b"PUT /three HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nxy\r\n0\r\n\r\n")
    events, _ = run_requests(kind, data)
    got = [(e[1], e[2]) if isinstance(e, tuple) else e for e in simplify(events)]
    assert got == [(b"POST", b"/one"), b"abc", "END", (b"GET", b"/two"), "END",
                   (b"PUT", b"/three"), b"xy", "END"]


def test_pipelined_requests_bytewise(kind: str) -> None:
    """Pipelined requests split into single bytes give the same events."""
    data = (b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
    whole, _ = run_requests(kind, data)
    events, _ = run_requests(kind, data, 1)
    assert simplify(events) == simplify(whole)
    assert len([e for e in events if e is END]) == 2


def test_chunked_body_is_dechunked_and_trailers_dropped(kind: str) -> None:
    """Chunk framing, extensions and trailers never reach the relay."""
    data = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;name=val\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\nX-Other: o\r\n\r\n")
    events, _ = run_requests(kind, data)
    got = simplify(events)
    assert got == [("req", b"POST", b"/", "1.1", [(b"host", b"a"),
                                                  (b"transfer-encoding", b"chunked")]),
                   b"abc0123456789", "END"]


def test_leading_empty_line_is_ignored(kind: str) -> None:
    """An empty line before a request line (RFC 9112 2.2) is ignored, not refused."""
    events, _ = run_requests(kind, b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert refusal(events) is None, simplify(events)
    assert simplify(events) == [("req", b"GET", b"/", "1.1", [(b"host", b"a")]), "END"]


def test_upgrade_leftover(kind: str) -> None:
    """Bytes after an upgrade request's head are kept for the tunnel, not parsed."""
    p = request_parser(kind, LIMITS)
    p.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
           b"\x81\x05HELLO")
    events = list(p.events)
    assert [type(e) for e in events] == [RequestHead, type(END)]
    head = events[0]
    assert isinstance(head, RequestHead)
    assert interpret_request(head).upgrade == b"websocket"
    assert p.upgrade_leftover() == b"\x81\x05HELLO"


def test_eof_mid_request_is_a_failure(kind: str) -> None:
    """A connection closed inside a head or body is a 400 ParseFailure."""
    for data in (b"GET / HTTP/1.1\r\nHost:", b"POST / HTTP/1.1\r\nHost: a\r\n"):
        p = request_parser(kind, LIMITS)
        p.feed(data)
        p.feed_eof()
        assert refusal(list(p.events)) == 400


def test_eof_between_requests_is_quiet(kind: str) -> None:
    """A client closing an idle keep-alive connection produces no event."""
    events, p = run_requests(kind, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert simplify(events)[-1] == "END"
    p.feed_eof()
    assert list(p.events) == []
    fresh = request_parser(kind, LIMITS)
    fresh.feed_eof()
    assert list(fresh.events) == []


# ----------------------------------------------------------------------------- responses

def exchange(p: ResponseParser, data: bytes, *, head_request: bool = False,
             step: int | None = None) -> list[Any]:
    """Start an exchange on ``p``, feed the response, and return its simplified events."""
    p.start(head_request=head_request, upgrade=None)
    for piece in chunks(data, step):
        p.feed(piece)
    events = list(p.events)
    p.events.clear()
    return simplify(events)


@pytest.mark.parametrize("step", [None, 1], ids=["whole", "bytewise"])
def test_interim_100_then_final(kind: str, step: int | None) -> None:
    """A 100 Continue is its own message, followed by the final response."""
    p = response_parser(kind)
    got = exchange(p, b"HTTP/1.1 100 Continue\r\n\r\n"
                      b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", step=step)
    assert got == [("resp", 100, "1.1", []), "END",
                   ("resp", 200, "1.1", [(b"content-length", b"2")]), b"ok", "END"]
    assert p.reusable is True


def test_head_response_has_no_body(kind: str) -> None:
    """The response to HEAD ends after its head even with a Content-Length."""
    p = response_parser(kind)
    got = exchange(p, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", head_request=True)
    assert got == [("resp", 200, "1.1", [(b"content-length", b"10")]), "END"]
    assert p.reusable is True


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(kind: str, status: int) -> None:
    """204 and 304 responses end after their head."""
    p = response_parser(kind)
    head = b"HTTP/1.1 %d X\r\n" % status
    if status == 304:
        head += b"Content-Length: 50\r\n"
    got = exchange(p, head + b"\r\n")
    assert got[0][:2] == ("resp", status)
    assert got[1:] == ["END"]
    assert p.reusable is True


def test_close_delimited_body_ends_at_eof(kind: str) -> None:
    """A response without length runs until the upstream closes; the connection is spent."""
    p = response_parser(kind)
    got = exchange(p, b"HTTP/1.1 200 OK\r\n\r\nabc")
    assert got == [("resp", 200, "1.1", []), b"abc"]
    p.feed(b"def")
    p.feed_eof()
    assert simplify(list(p.events)) == [b"def", "END"]
    assert p.reusable is False


def test_truncated_body_is_a_failure(kind: str) -> None:
    """EOF before Content-Length bytes arrived is a 502 ParseFailure."""
    p = response_parser(kind)
    got = exchange(p, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    p.feed_eof()
    got += simplify(list(p.events))
    assert got[:2] == [("resp", 200, "1.1", [(b"content-length", b"5")]), b"ab"]
    assert got[2:] == [("fail", 502)]
    assert p.reusable is False


@pytest.mark.parametrize("extra", [b"EXTRA", b"HTTP/1.1 200 OK\r\n"])
def test_bytes_after_response_make_it_unreusable(kind: str, extra: bytes) -> None:
    """An upstream that sends more than one response's bytes cannot be pooled."""
    p = response_parser(kind)
    got = exchange(p, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + extra)
    assert got[:3] == [("resp", 200, "1.1", [(b"content-length", b"2")]), b"ok", "END"]
    assert p.reusable is False


def test_bytes_after_response_in_a_later_segment(kind: str) -> None:
    """Unsolicited bytes arriving after the response also make the connection unreusable."""
    p = response_parser(kind)
    exchange(p, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert p.reusable is True
    p.feed(b"HTTP/1.1 200 OK\r\n")
    assert p.reusable is False


def test_two_keep_alive_responses(kind: str) -> None:
    """A persistent parser handles consecutive exchanges after start() each time."""
    p = response_parser(kind)
    first = exchange(p, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    assert first == [("resp", 200, "1.1", [(b"content-length", b"3")]), b"one", "END"]
    assert p.reusable is True
    second = exchange(p, b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\ntwo\r\n0\r\n\r\n")
    assert second == [("resp", 201, "1.1", [(b"transfer-encoding", b"chunked")]), b"two", "END"]
    assert p.reusable is True
    third = exchange(p, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nthree", step=1)
    assert third == [("resp", 200, "1.1", [(b"content-length", b"5")]), b"three", "END"]
    assert p.reusable is True


def test_head_exchange_then_get_exchange(kind: str) -> None:
    """After a HEAD response announcing a length, the next GET response parses normally."""
    p = response_parser(kind)
    head = exchange(p, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", head_request=True)
    assert head == [("resp", 200, "1.1", [(b"content-length", b"5")]), "END"]
    assert p.reusable is True
    get = exchange(p, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert get == [("resp", 200, "1.1", [(b"content-length", b"3")]), b"abc", "END"]
    assert p.reusable is True
    head2 = exchange(p, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                     head_request=True)
    assert head2[-1] == "END"
    get2 = exchange(p, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert get2[1:] == [b"hi", "END"]
    assert p.reusable is True


def test_response_trailers_are_dropped(kind: str) -> None:
    """Trailer fields of a chunked response never appear among the head's headers."""
    p = response_parser(kind)
    got = exchange(p, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"2\r\nhi\r\n0\r\nSet-Cookie: injected=1\r\n\r\n")
    assert got == [("resp", 200, "1.1", [(b"transfer-encoding", b"chunked")]), b"hi", "END"]
    assert p.reusable is True


def test_response_header_names_keep_their_case(kind: str) -> None:
    """ResponseHead holds header names exactly as received."""
    p = response_parser(kind)
    p.start(head_request=False, upgrade=None)
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-App-Version: 3\r\n\r\n")
    head = p.events[0]
    assert isinstance(head, ResponseHead)
    assert head.headers == [(b"Content-Length", b"0"), (b"X-App-Version", b"3")]


def test_switching_protocols_leftover(kind: str) -> None:
    """After a 101 the bytes that follow belong to the tunnel and the parser is spent."""
    p = response_parser(kind)
    p.start(head_request=False, upgrade=b"websocket")
    p.feed(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
           b"\r\n\x81\x02hi")
    got = simplify(list(p.events))
    assert got[0][:2] == ("resp", 101)
    assert got[1:] == ["END"]
    assert p.upgrade_leftover() == b"\x81\x02hi"
    assert p.reusable is False


def test_malformed_response_is_502(kind: str) -> None:
    """Garbage instead of a status line is a 502 ParseFailure and spends the connection."""
    p = response_parser(kind)
    got = exchange(p, b"HTTP/1.1 abc OK\r\n\r\n")
    assert got == [("fail", 502)]
    assert p.reusable is False
