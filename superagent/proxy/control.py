"""The local control channel between a proxy worker and whoever drives it.

Each worker listens on its own Unix socket. The driver (the standalone proxy's
master today, the participant agent later) connects, writes one JSON object per
line and reads one JSON line back. Because the socket has a path, a restarted
driver can reconnect to workers that kept serving while it was away.

Requests: ``snapshot`` (apply a routing snapshot; the answer is the ack of its
version), ``drain`` (mark an instance draining or not), ``node`` (mark the whole
node draining: ``/-/healthz`` answers 503), ``stats`` and ``ping``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from superagent.errors import SuperagentError

MAX_LINE = 16 * 1024 * 1024  # a snapshot of thousands of apps still fits in one message
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(SuperagentError):
    """A worker could not be reached or refused a control request."""


async def _read_line(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    while True:
        end = buffer.find(b"\n")
        if end >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            return line
        if len(buffer) > MAX_LINE:
            raise ControlError("control message too large")
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data


async def serve_control(path: str, handler: Handler, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve JSON-line requests on the Unix socket ``path`` until cancelled."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        import os

        if os.path.exists(path):
            os.unlink(path)
        await sock.bind(path)
        os.chmod(path, 0o600)  # only the owner may drive the proxy
        sock.listen(16)
        listener = trio.SocketListener(sock)
    except BaseException:
        sock.close()
        raise
    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        while True:
            stream = await listener.accept()
            nursery.start_soon(_serve_one, stream, handler)


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    buffer = bytearray()
    async with stream:
        try:
            while True:
                line = await _read_line(stream, buffer)
                if line is None:
                    return
                try:
                    message = json.loads(line)
                    if not isinstance(message, dict):
                        raise ValueError("a control message is a JSON object")
                    reply = await handler(message)
                except (ValueError, SuperagentError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, ControlError):
            return


async def call(path: str, message: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the worker at ``path``; raises ControlError."""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(path)
            async with stream:
                await stream.send_all(json.dumps(message).encode() + b"\n")
                line = await _read_line(stream, bytearray())
    except trio.TooSlowError:
        raise ControlError(f"worker at {path} did not answer within {timeout}s") from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise ControlError(f"cannot reach worker at {path}: {exc}") from None
    if line is None:
        raise ControlError(f"worker at {path} closed the control connection")
    reply: dict[str, Any] = json.loads(line)
    return reply
