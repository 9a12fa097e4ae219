"""A 1 GB upload and a 1 GB download through a real proxy worker in bounded memory.

The proxy runs as its own process (``superagent proxy --workers 1``) so its RSS can be
watched while the bodies stream; upstream and client run in the test's trio loop.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import trio

from tests.support.ports import free_port

GB = 1 << 30
CHUNK = 1 << 16
RSS_GROWTH_LIMIT = 48 << 20  # what streaming may add to a worker: a few buffers, never the body
PATTERN = bytes(range(256)) * (CHUNK // 256)  # one chunk of the body, repeated


async def _read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """(head, bytes read past it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(CHUNK)
        assert data, f"connection closed before a full head: {buf!r}"
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


async def _upstream(listener: trio.SocketListener) -> None:
    """POST: read a Content-Length body, answer its sha256. GET /big: send 1 GB."""
    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            head, rest = await _read_head(stream)
            if head.startswith(b"POST"):
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                digest = hashlib.sha256(rest)
                got = len(rest)
                while got < length:
                    data = await stream.receive_some(CHUNK)
                    assert data
                    digest.update(data)
                    got += len(data)
                body = digest.hexdigest().encode()
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b"
                                      % (len(body), body))
            else:
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % GB)
                for _ in range(GB // CHUNK):
                    await stream.send_all(PATTERN)

    async with trio.open_nursery() as nursery:
        await trio.serve_listeners(serve, [listener], handler_nursery=nursery)


@pytest.mark.slow
async def test_gigabyte_up_and_down_in_bounded_memory(tmp_path: Path) -> None:
    """1 GB each way arrives intact while the worker's RSS grows by less than 48 MB."""
    upstream_sock = trio.socket.socket()
    await upstream_sock.bind(("127.0.0.1", 0))
    upstream_sock.listen(16)
    upstream_port = upstream_sock.getsockname()[1]
    port, admin = free_port(), free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(f"""
[proxy]
listen = ["127.0.0.1:{port}"]
admin = "127.0.0.1:{admin}"
workers = 1
access_log = false
[apps.big]
instances = ["127.0.0.1:{upstream_port}"]
prefix = "/"
max_body = 0
""")
    proc = subprocess.Popen([sys.executable, "-m", "superagent", "proxy", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_upstream, trio.SocketListener(upstream_sock))
            with trio.fail_after(30):
                while True:  # the proxy is ready when its listener answers
                    try:
                        probe = await trio.open_tcp_stream("127.0.0.1", port)
                    except OSError:
                        await trio.sleep(0.1)
                        continue
                    await probe.aclose()
                    break
            worker = psutil.Process(proc.pid).children()[0]
            baseline = worker.memory_info().rss
            peak = [baseline]

            async def watch() -> None:
                while True:
                    peak[0] = max(peak[0], worker.memory_info().rss)
                    await trio.sleep(0.05)

            nursery.start_soon(watch)
            with trio.fail_after(180):
                # Upload.
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                sent = hashlib.sha256()
                await stream.send_all(b"POST /up HTTP/1.1\r\nHost: big\r\n"
                                      b"Content-Length: %d\r\n\r\n" % GB)

                async def reply() -> bytes:
                    head, rest = await _read_head(stream)
                    assert head.startswith(b"HTTP/1.1 200"), head
                    while len(rest) < 64:
                        rest += await stream.receive_some(CHUNK)
                    return rest

                for _ in range(GB // CHUNK):
                    sent.update(PATTERN)
                    await stream.send_all(PATTERN)
                assert (await reply()).decode() == sent.hexdigest()
                # Download, on the same kept-alive connection.
                await stream.send_all(b"GET /big HTTP/1.1\r\nHost: big\r\n\r\n")
                head, rest = await _read_head(stream)
                assert head.startswith(b"HTTP/1.1 200"), head
                received = hashlib.sha256(rest)
                count = len(rest)
                while count < GB:
                    data = await stream.receive_some(CHUNK)
                    assert data, f"download cut at {count} bytes"
                    received.update(data)
                    count += len(data)
                await stream.aclose()
            expected = hashlib.sha256()
            for _ in range(GB // CHUNK):
                expected.update(PATTERN)
            assert count == GB
            assert received.hexdigest() == expected.hexdigest()
            assert peak[0] - baseline < RSS_GROWTH_LIMIT, (baseline, peak[0])
            nursery.cancel_scope.cancel()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
