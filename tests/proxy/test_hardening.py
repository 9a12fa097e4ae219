"""Data-plane hardening, one test per defect an outside conformance run found.

Upgrades other than the app's allowed ones are stripped (and a 101 nobody offered is
refused), ``OPTIONS *`` keeps its asterisk form, client address headers are the proxy's
own (underscore look-alikes dropped), a dripping request body is cut with 408, the h11
backend refuses absurd chunk sizes and never echoes client bytes, and repeated slashes
are kept unless ``merge_slashes`` (with ``path_policy = "reject"`` as an opt-in). Each
runs against both parsers over real loopback sockets (see conftest.py).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
import trio
import trio.testing

from tests.proxy.conftest import build_request
from tests.proxy.test_connection import app, assert_error, nothing_reached


async def switch_on_any_upgrade(conn: Any) -> None:
    """An app that answers 101 to whatever Upgrade it is offered, then swallows the tunnel
    (what made an h2c offer a way past the proxy); plain requests get JSON."""
    while True:
        req = await conn.read_request()
        if req is None:
            return
        offer = req.header("upgrade")
        if offer is None:
            await conn.respond(req, 200, json.dumps(req.describe()).encode())
            if not conn.next_cycle():
                return
            continue
        await conn.send_raw(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                            b"Upgrade: " + offer.encode() + b"\r\n\r\n")
        while await conn.receive():
            pass
        return


async def always_switch(conn: Any) -> None:
    """A broken app: every request is answered 101 to h2c, offered or not."""
    req = await conn.read_request()
    if req is None:
        return
    await conn.send_raw(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                        b"Upgrade: h2c\r\n\r\n")
    while await conn.receive():
        pass


# --------------------------------------------------------------------------- upgrades

@pytest.mark.parametrize("offer", [
    {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABk"},
    {"Connection": "Upgrade", "Upgrade": "foo"},
])
async def test_an_upgrade_the_app_does_not_allow_is_stripped(make_proxy, upstream, offer):
    """h2c (and any protocol but websocket) is not offered upstream, so no tunnel opens; the
    connection closes after the answer, and a request sent behind it reaches no app."""
    async with upstream(switch_on_any_upgrade, name="a") as a, \
            upstream(name="b") as b, \
            make_proxy({"a": app(a, prefix="/a"), "b": app(b, prefix="/b")}) as proxy:
        client = await proxy.connect()
        await client.send(build_request("GET", "/a/x", offer)
                          + build_request("GET", "/b/secret", {"X-Forwarded-For": "1.2.3.4"}))
        responses = await client.read_until_closed()
        assert [r.status for r in responses] == [200], responses
        assert responses[0].header("connection") == "close"
        got = a.requests[0]
        got.assert_canonical()
        assert got.header("upgrade") is None and got.header("http2-settings") is None
        assert got.target == "/a/x"
        await trio.testing.wait_all_tasks_blocked()
        assert len(a.requests) == 1 and not bytes(a.conns[0].raw).count(b"/b/secret")
        assert not b.requests


async def test_an_allowed_upgrade_is_tunnelled(make_proxy, upstream):
    """``upgrades = ["foo"]`` lets the app take a foo upgrade, as websocket is by default."""
    async with upstream(switch_on_any_upgrade) as up, \
            make_proxy({"web": app(up, upgrades=["foo"])}) as proxy:
        client = await proxy.connect()
        await client.send(build_request("GET", "/x", {"Connection": "upgrade",
                                                      "Upgrade": "foo, h2c"}))
        resp = await client.read_response(upgrade=b"foo")
        assert resp.status == 101, resp
        assert up.requests[0].header("upgrade") == "foo"


@pytest.mark.parametrize("offer", [None, {"Connection": "Upgrade", "Upgrade": "websocket"}])
async def test_a_101_the_proxy_did_not_allow_is_refused_and_closes(make_proxy, upstream,
                                                                   offer):
    """A 101 without an offer, or to another protocol than offered, opens no tunnel: 502
    and the client connection closes (a kept one would carry bytes past routing)."""
    async with upstream(always_switch) as up, make_proxy({"web": app(up)}) as proxy:
        client = await proxy.connect()
        await client.send(build_request("GET", "/x", offer or {}))
        responses = await client.read_until_closed()
        assert len(responses) == 1, responses
        assert_error(responses[0], 502, "upstream-bad-response")
        assert responses[0].header("connection") == "close"
        assert len(up.requests) == 1


# --------------------------------------------------------------------------- OPTIONS *

async def test_options_asterisk_reaches_the_app_in_asterisk_form(make_proxy, upstream):
    """``OPTIONS *`` asks about the server, not its root: the app gets ``*``."""
    async with upstream() as up, make_proxy({"web": app(up)}) as proxy:
        resp = await proxy.request("OPTIONS", "*")
        assert resp.status == 200, resp
        assert up.requests[0].target == "*"
        assert up.requests[0].method == "OPTIONS"
        lines = await proxy.access_log(1)
        assert lines[-1]["path"] == "*"


# --------------------------------------------------------------------------- client address

SPOOFED = [("X-Real-IP", "6.6.6.6"), ("X_Real_IP", "6.6.6.7"), ("X_Forwarded_For", "6.6.6.8"),
           ("x_forwarded-proto", "https"), ("X_Forwarded_Host", "evil.example"),
           ("Transfer_Encoding", "chunked"), ("Content_Length", "5"),
           ("X_Forwarded_Prefix", "/evil"), ("X-Forwarded_Port", "1"), ("Keep_Alive", "1"),
           ("X_Custom", "kept")]


@pytest.mark.parametrize("trusted", [False, True])
async def test_client_address_headers_are_the_proxys_own(make_proxy, upstream, trusted):
    """X-Real-IP is set by the proxy (a trusted front proxy's is kept); a header that
    differs from a forwarding or framing header only by '_' for '-' never reaches the app."""
    settings = {"trusted_proxies": ["127.0.0.0/8"]} if trusted else {}
    async with upstream() as up, make_proxy({"web": app(up)}, **settings) as proxy:
        resp = await proxy.request("GET", "/ip", SPOOFED)
        assert resp.status == 200, resp
        got = up.requests[0]
        got.assert_canonical()
        assert got.header("x-real-ip") == ("6.6.6.6" if trusted else "127.0.0.1")
        names = got.names()
        assert not {n for n in names if "_" in n} - {"x_custom"}, names
        assert got.header("x_custom") == "kept"
        assert got.body_len == 0


# --------------------------------------------------------------------------- slow bodies

async def drip(client: Any, data: bytes, pause: float) -> None:
    """Send ``data`` a byte at a time (the attack's pace, not a synchronisation)."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        for byte in data:
            await client.stream.send_all(bytes([byte]))
            await trio.sleep(pause)


@pytest.mark.parametrize("limits", [
    {"min_body_rate": 200, "timeouts": {"body_window": "0.3s"}},
    {"min_body_rate": 0, "timeouts": {"body": "0.3s"}},
])
async def test_a_dripping_body_gets_408_and_the_upstream_request_is_aborted(make_proxy,
                                                                          upstream, limits):
    """A body far below the app's minimum rate (or past its body timeout) is answered 408
    client-body-timeout although every byte comes within ``idle``; the app sees its
    connection end before the body did."""
    async with upstream("never") as up, make_proxy({"web": app(up, **limits)}) as proxy:
        client = await proxy.connect()
        await client.send(build_request("POST", "/upload", {"Content-Length": "100"}))
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip, client, b"x" * 100, 0.05)
            try:
                resp = await client.read_response(timeout=3)
            finally:
                nursery.cancel_scope.cancel()
        assert_error(resp, 408, "client-body-timeout")
        assert trio.current_time() - start < 2
        await up.wait_for(lambda: bool(up.conns) and up.conns[0].eof)
        assert up.requests and not up.requests[0].complete
        assert up.requests[0].body_len < 100


# --------------------------------------------------------------------------- h11 framing

async def test_an_absurd_chunk_size_is_refused_before_anything_is_relayed(make_proxy, upstream):
    """A chunk size of 2^64+5 (a front proxy that wraps would read 5) is refused up front."""
    async with upstream() as up, make_proxy({"web": app(up, max_body=0)}) as proxy:
        client = await proxy.connect()
        await client.send(build_request("POST", "/c", {"Transfer-Encoding": "chunked"})
                          + b"%x\r\nhello\r\n0\r\n\r\n" % (2**64 + 5))
        responses = await client.read_until_closed()
        assert len(responses) == 1 and responses[0].status == 400, responses
        await nothing_reached(up)


@pytest.mark.parametrize("parser", ["h11"])
async def test_h11_refuses_a_chunk_over_max_body_up_front(make_proxy, upstream, parser):
    """With h11, a chunk announcing more than ``max_body`` is 413 before any of it is sent,
    and so is one past the absolute limit when the app sets none."""
    async with upstream() as up, make_proxy({"web": app(up, max_body="1K"),
                                             "free": app(up, prefix="/free", max_body=0)}
                                            ) as proxy:
        client = await proxy.connect()
        await client.send(build_request("POST", "/c", {"Transfer-Encoding": "chunked"})
                          + b"800\r\n" + b"x" * 10)
        assert_error(await client.read_response(), 413, "body-too-large")
        client = await proxy.connect()
        await client.send(build_request("POST", "/free", {"Transfer-Encoding": "chunked"})
                          + b"%x\r\nabc" % (2**40 + 1))
        assert_error(await client.read_response(), 400, "bad-request")
        await nothing_reached(up)


@pytest.mark.parametrize("raw", [
    b"POST /c HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zzSECRET\r\n",
    b"POST /c HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabcSECRET\r\n",
    b"GET /c HTTP/1.1\r\nHost: app.test\r\nX-SECRET\r\n\r\n",
    b"GET /c HTTP/1.1 SECRET\r\nHost: app.test\r\n\r\n",
])
async def test_error_bodies_never_echo_client_bytes(make_proxy, upstream, raw):
    """A refusal names what is wrong in the proxy's words, never with the client's bytes."""
    async with upstream() as up, make_proxy({"web": app(up)}) as proxy:
        client = await proxy.connect()
        await client.send(raw)
        responses = await client.read_until_closed()
        assert responses and responses[-1].status == 400, responses
        for resp in responses:
            assert b"SECRET" not in resp.body and b"secret" not in resp.body.lower(), resp


async def test_a_501_carries_its_documented_code(make_proxy, upstream):
    """An unsupported transfer coding is 501 not-implemented, with either parser."""
    async with upstream() as up, make_proxy({"web": app(up)}) as proxy:
        client = await proxy.connect()
        await client.send(build_request("POST", "/c", {"Transfer-Encoding": "gzip"}, b"x"))
        assert_error(await client.read_response(), 501, "not-implemented")
        await nothing_reached(up)


# --------------------------------------------------------------------------- paths

async def test_repeated_slashes_are_kept_and_route_as_written(make_proxy, upstream):
    """``/a//b/x`` is not ``/a/b/x``: it goes to the app at /a, unchanged; with
    ``merge_slashes = true`` the slashes fold and the app at /a/b gets it."""
    async with upstream(name="a") as a, upstream(name="ab") as ab, \
            make_proxy({"a": app(a, prefix="/a"), "ab": app(ab, prefix="/a/b")}) as proxy:
        resp = await proxy.request("GET", "/a//b/x/../y")
        assert resp.status == 200 and resp.json()["server"] == "a", resp
        assert a.requests[-1].target == "/a//b/y"
        proxy.apply({"a": app(a, prefix="/a"), "ab": app(ab, prefix="/a/b")},
                    merge_slashes=True)
        resp = await proxy.request("GET", "/a//b/x")
        assert resp.status == 200 and resp.json()["server"] == "ab", resp
        assert ab.requests[-1].target == "/a/b/x"


@pytest.mark.parametrize(("target", "refused"), [
    ("/a/../b", True), ("/a/./b", True), ("/a/%2e%2E/b", True), ("/a%2Fb", True),
    ("/a%5cb", True), ("/a/%2E", True), ("/a/.b/c.d", False), ("/a%41?x=/../", False),
])
async def test_path_policy_reject_refuses_dot_segments_and_encoded_separators(
        make_proxy, upstream, target, refused):
    """``path_policy = "reject"``: 400 path-rejected instead of normalising."""
    async with upstream() as up, make_proxy({"web": app(up)}, path_policy="reject") as proxy:
        resp = await proxy.request("GET", target)
        if refused:
            assert_error(resp, 400, "path-rejected")
            await nothing_reached(up)
        else:
            assert resp.status == 200, resp
