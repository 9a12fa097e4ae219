"""Random and malformed request bytes against a running proxy, against both parsers.

One in-process proxy (in front of a recording echo upstream) serves every
example: Hypothesis runs in a worker thread and hands each example back to the
test's trio loop with ``trio.from_thread.run``. Each example opens a
connection, sends its bytes, half-closes, and reads until the proxy closes.
Whatever the input, the proxy must answer with well-formed HTTP/1.1 (or just
close), log no failure, go on serving, and send the upstream only canonical
requests. The upstream answers every request at once, so a 502/503/504 from
the proxy means it mangled the exchange.
"""

from __future__ import annotations

import contextlib
import string
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLE_DEADLINE = 3.0  # one example: connect, send, read until closed
TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
HOP_NAMES = ["Connection", "Keep-Alive", "TE", "Trailer", "Upgrade", "Proxy-Connection",
             "Proxy-Authorization", "X-Forwarded-For", "X-Forwarded-Host", "Forwarded",
             "X-Request-Id", "Via", "Expect", "X-Named"]
NAMES = st.one_of(
    st.sampled_from([*HOP_NAMES, "Host", "Content-Length", "Transfer-Encoding",
                     "content-length", "transfer-encoding", "Transfer-Encoding ", " Host",
                     "Content-Length:"]),
    st.text(alphabet=TOKEN, min_size=1, max_size=12),
    st.binary(max_size=8).map(lambda b: b.decode("latin-1")),
)
TOKEN_VALUES = st.one_of(
    st.sampled_from(["close", "keep-alive", "upgrade", "Upgrade, X-Named", "X-Named, TE",
                     "trailers", "h2c", "websocket", "1.0 other", "for=1.2.3.4", "req-1",
                     "bad id", "100-continue", "app.test"]),
    st.text(alphabet=TOKEN + " ,;=", max_size=20),
)
VALUES = st.one_of(
    TOKEN_VALUES,
    st.sampled_from(["chunked", "Chunked", "chunked, identity", "identity", "gzip, chunked",
                     "0", "5", "-1", "+5", "5, 5", "5,6", " 7 ", "0x10",
                     "99999999999999999999", "", "a\tb"]),
    st.text(alphabet=string.printable, max_size=20),
    st.binary(max_size=12).map(lambda b: b.decode("latin-1")),
)
UPSTREAM_FAILURES = {502, 503, 504}  # the echo upstream answers at once: these mean a mangled relay
FRAMINGS = ["length", "chunked", "none", "both", "double-length", "short-length",
            "long-length", "bad-chunk", "chunk-ext-trailer"]


@st.composite
def requests(draw: st.DrawFn, *, plausible: bool = False) -> bytes:
    """A request that is valid or nearly so: random headers and framing combinations.

    ``plausible`` keeps the request line, the Host and the header syntax valid, so the
    request usually reaches the upstream and the canonical-form checks have work to do.
    """
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]))
    targets = ["/", "/a", "/a/b?c=d", "/%2e%2e/x", "//x//y", "http://app.test/abs", "/a%2Fb"]
    if not plausible:
        targets += ["*", "x", "/a b", "/\x00"]
    target = draw(st.sampled_from(targets))
    version = draw(st.sampled_from(["1.1"] * 5 + ["1.0"] + ([] if plausible else
                                                             ["2.0", "0.9"])))
    headers: list[tuple[str, str]] = []
    if plausible or draw(st.integers(0, 9)):
        headers.append(("Host", "app.test"))
    names = st.sampled_from(HOP_NAMES) | st.text(alphabet=TOKEN, min_size=1, max_size=12)
    headers += draw(st.lists(st.tuples(names, TOKEN_VALUES) if plausible
                             else st.tuples(NAMES, VALUES), max_size=6))
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(FRAMINGS[:3] if plausible else FRAMINGS))
    if framing in ("length", "double-length"):
        headers += [("Content-Length", str(len(body)))] * (2 if framing == "double-length" else 1)
    elif framing in ("short-length", "long-length"):
        headers.append(("Content-Length", str(max(0, len(body) + (-3 if framing[0] == "s"
                                                                  else 7)))))
    elif framing == "both":
        headers += [("Content-Length", str(len(body))), ("Transfer-Encoding", "chunked")]
    elif framing != "none":
        headers.append(("Transfer-Encoding", "chunked"))
    if framing in ("chunked", "both"):
        payload = (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    elif framing == "bad-chunk":
        payload = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body) + 1, body)
    elif framing == "chunk-ext-trailer":
        payload = b"%x;a=b\r\n%b\r\n0\r\nX-Trailer: t\r\n\r\n" % (len(body) + 1, body + b"!")
    elif framing == "none":
        payload = b""
    else:
        payload = body
    head = f"{method} {target} HTTP/{version}\r\n".encode()
    head += b"".join(n.encode("latin-1") + b": " + v.encode("latin-1") + b"\r\n"
                     for n, v in headers)
    return head + b"\r\n" + payload


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A request with its line breaks and bytes tampered with."""
    data = bytearray(draw(requests()))
    for op in draw(st.lists(st.sampled_from(["drop-crlf", "dup-crlf", "bare-lf", "bare-cr",
                                             "insert", "truncate", "flip"]),
                            min_size=1, max_size=3)):
        breaks = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\r\n"]
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op in ("drop-crlf", "dup-crlf", "bare-lf", "bare-cr") and breaks:
            i = breaks[draw(st.integers(0, len(breaks) - 1))]
            data[i:i + 2] = {"drop-crlf": b"", "dup-crlf": b"\r\n\r\n", "bare-lf": b"\n",
                             "bare-cr": b"\r"}[op]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif op == "truncate":
            del data[at:]
        elif op == "flip" and data:
            data[at % len(data)] = draw(st.integers(0, 255))
    return bytes(data)


PAYLOADS = st.one_of(
    requests(plausible=True),
    requests(plausible=True),
    requests(),
    mutated(),
    st.lists(st.one_of(requests(plausible=True), requests(), mutated()),
             min_size=2, max_size=3).map(b"".join),
    st.binary(max_size=200),
)


async def test_random_bytes_never_break_the_proxy(make_proxy, upstream):
    """Random and malformed requests get well-formed answers, never crash the proxy, and
    reach the upstream only as canonical requests."""
    async with upstream() as up, make_proxy(
            {"web": {"prefix": "/", "instances": [up.address], "max_body": "1K",
                     "timeouts": {"first_byte": "0.5s"}}},
            max_headers=20, max_header_bytes="4K", max_request_line="1K") as proxy:
        checked = 0

        async def check_one(data: bytes) -> None:
            nonlocal checked
            with trio.fail_after(EXAMPLE_DEADLINE):
                client = await proxy.connect()
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await client.send(data)
                    await client.send_eof()
                responses = await client.read_until_closed()
                await client.aclose()
                for resp in responses:
                    assert 100 <= resp.status <= 599, resp
                    assert resp.status not in UPSTREAM_FAILURES, resp
                    code = resp.error_code
                    if code is not None:
                        doc = resp.json()
                        assert doc["error"] == code and doc["status"] == resp.status, resp
                alive = await proxy.request("GET", "/alive")
                assert alive.status == 200, alive
                await trio.testing.wait_all_tasks_blocked()
            assert not proxy.failures, "the worker logged errors:\n" + "\n".join(
                proxy.failures)
            assert not up.errors, up.errors
            for got in up.requests[checked:]:
                got.assert_canonical()
            checked = len(up.requests)

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(PAYLOADS)
        def run_example(data: bytes) -> None:
            trio.from_thread.run(check_one, data)

        await trio.to_thread.run_sync(run_example)
        final: Any = await proxy.request("GET", "/final")
        assert final.status == 200
