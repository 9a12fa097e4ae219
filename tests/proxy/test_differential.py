"""Differential fuzzing: the proxy against h11 as the oracle, over real loopback sockets.

Each example is one raw request, generated (valid or nearly so) or mutated (line breaks,
bytes, truncation), plus the hostile details the conformance run used: underscore
look-alikes of forwarding and framing headers, Upgrade offers, odd targets. It is sent to
a running proxy (both parsers, see conftest.py) in front of an upstream that records
what it receives; the client half-closes and reads until the proxy closes.

The oracle is h11 reading the same bytes as a server would. Whatever the input, the
upstream receives exactly one complete canonical request or none:

* a complete request reaches it only if h11 read one complete request from the bytes,
  with the same method and body, the target the proxy documents (h11's target,
  normalised by an independent RFC 3986 reference), and no header the client did not
  send apart from those the proxy owns;
* it never carries an underscore look-alike of a forwarding or framing header, an upgrade
  other than websocket, or a hop-by-hop header;
* the proxy may refuse more than h11 does (it is stricter), never less.

The CI run is bounded (``SUPERAGENT_FUZZ_EXAMPLES``, default 60 per parser, a few
seconds); a long run is the same test with more examples, e.g.
``SUPERAGENT_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/proxy/test_differential.py``
(docs/proxy-config.md, "Fuzzing").
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import h11
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.proxy.conftest import HOP_BY_HOP, PROXY_OWNED
from tests.proxy.test_fuzz import TOKEN, mutated, requests
from tests.proxy.test_routes import reference_normalize

EXAMPLES = int(os.environ.get("SUPERAGENT_FUZZ_EXAMPLES", "60"))
EXAMPLE_DEADLINE = 3.0
# Names the proxy sets itself or re-derives: they may differ from what the client sent.
PROXY_SET = {n.decode() for n in PROXY_OWNED} | {"content-length", "transfer-encoding",
                                                 "connection", "upgrade", "x-forwarded-prefix"}
SHADOWED = {"x-real-ip", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
            "forwarded", "transfer-encoding", "content-length", "host", "connection"}
HOSTILE_HEADERS = st.sampled_from([
    ("X_Forwarded_For", "6.6.6.6"), ("X_Real_IP", "6.6.6.6"), ("X-Real-IP", "6.6.6.6"),
    ("Transfer_Encoding", "chunked"), ("Content_Length", "3"), ("x_forwarded-host", "evil"),
    ("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("Upgrade", "foo"),
    ("HTTP2-Settings", "AAMAAABk"), ("Upgrade", "websocket"), ("Connection", "upgrade"),
    ("X_Custom", "ok"), ("Forwarded", "for=6.6.6.6"),
])
TARGETS = st.sampled_from(["/", "/a//b", "/a/./b/../c", "/%2e%2e/x", "/a%2fb", "/a%41",
                           "*", "http://app.test/abs?q=1", "/q?x=/../y", "//", "/a/..%2f"])


@st.composite
def hostile(draw: st.DrawFn) -> bytes:
    """A plausible request with hostile headers and targets mixed in."""
    method = draw(st.sampled_from(["GET", "POST", "OPTIONS", "PUT"]))
    target = draw(TARGETS)
    if target == "*":
        method = "OPTIONS"
    headers = [("Host", "app.test"), *draw(st.lists(HOSTILE_HEADERS, max_size=4))]
    headers += draw(st.lists(st.tuples(st.text(alphabet=TOKEN, min_size=1, max_size=8),
                                       st.text(alphabet=TOKEN + " ", max_size=10)),
                             max_size=2))
    body = draw(st.binary(max_size=20))
    if body or draw(st.booleans()):
        headers.append(("Content-Length", str(len(body))))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    return head.encode("latin-1") + b"\r\n" + body


PAYLOADS = st.one_of(hostile(), hostile(), requests(plausible=True), requests(), mutated())


class Oracle:
    """What h11 reads from ``data`` as a server: the first request, complete or not."""

    def __init__(self, data: bytes) -> None:
        self.request: h11.Request | None = None
        self.body = b""
        self.complete = False
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(data)
        conn.receive_data(b"")
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Request):
                    self.request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self.complete = True
                    break
                else:
                    break
        except h11.RemoteProtocolError:
            self.complete = False
        self.body = bytes(body)

    def __repr__(self) -> str:
        return f"<Oracle {self.request!r} complete={self.complete} body={self.body!r}>"

    def expected_target(self) -> str:
        assert self.request is not None
        target = self.request.target.decode("latin-1")
        if target == "*":
            return "*"
        if not target.startswith("/"):
            rest = target.partition("://")[2]
            cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0),
                      default=len(rest))
            target = rest[cut:] or "/"
            if target.startswith("?"):
                target = "/" + target
        path, sep, query = target.partition("?")
        return reference_normalize(path) + sep + query

    def sent(self) -> set[tuple[str, bytes]]:
        assert self.request is not None
        return {(bytes(n).decode("latin-1").lower(), bytes(v))
                for n, v in self.request.headers.raw_items()}


def check_received(got: Any, oracle: Oracle, data: bytes) -> None:
    """``got`` (a complete request the upstream read) is the canonical form of ``oracle``."""
    assert oracle.request is not None and oracle.complete, (
        f"the proxy relayed a request h11 does not read as one: {data!r} -> {got!r}")
    got.assert_canonical()
    assert got.method == oracle.request.method.decode(), (data, got)
    assert got.target == oracle.expected_target(), (data, got.target)
    assert bytes(got.body) == oracle.body, (data, bytes(got.body), oracle.body)
    sent = oracle.sent()
    for name, value in got.headers:
        lname = name.decode("latin-1").lower()
        if "_" in lname:
            assert lname.replace("_", "-") not in SHADOWED, (data, got.headers)
        if lname == "upgrade":
            assert value.lower() == b"websocket", (data, got.headers)
        assert lname.encode() not in HOP_BY_HOP or lname in ("connection", "upgrade")
        if lname not in PROXY_SET:
            assert (lname, value) in sent, f"{lname}: {value!r} was not sent ({data!r})"


async def test_each_request_reaches_the_upstream_as_h11_reads_it_or_not_at_all(make_proxy,
                                                                              upstream):
    """Differential run against the h11 oracle (see the module docstring)."""
    async with upstream() as up, make_proxy(
            {"web": {"prefix": "/", "instances": [up.address], "max_body": "1K",
                     "timeouts": {"first_byte": "0.5s"}}},
            max_headers=20, max_header_bytes="4K", max_request_line="1K") as proxy:
        seen = 0

        async def check_one(data: bytes) -> None:
            nonlocal seen
            with trio.fail_after(EXAMPLE_DEADLINE):
                client = await proxy.connect()
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await client.send(data)
                    await client.send_eof()
                for resp in await client.read_until_closed():
                    assert 100 <= resp.status <= 599, resp
                await client.aclose()
                await trio.testing.wait_all_tasks_blocked()
            assert not proxy.failures, "the worker logged errors:\n" + "\n".join(
                proxy.failures)
            assert not up.errors, up.errors
            new = up.requests[seen:]
            seen = len(up.requests)
            complete = [r for r in new if r.complete]
            assert len(complete) <= 1, (data, new)
            oracle = Oracle(data)
            for got in complete:
                check_received(got, oracle, data)

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        @given(PAYLOADS)
        def run_example(data: bytes) -> None:
            trio.from_thread.run(check_one, data)

        await trio.to_thread.run_sync(run_example)
