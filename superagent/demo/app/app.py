"""hello: the superagent demo app, a stdlib-only HTTP/1.1 server on 127.0.0.1:$PORT.

    GET /           a greeting (JSON, or HTML for browsers) with SUPERAGENT_APP, _RELEASE,
                    _INSTANCE, $GREETING, a greeting counter and the X-Request-Id received
    GET /healthz    200 "ok" (the manifest's liveness and readiness path)
    GET /slow?s=N   answers after N seconds (at most 30): an in-flight request for
                    zero-downtime tests

Keep-alive works because every response carries Content-Length. On SIGTERM (or SIGINT)
the server stops accepting, lets the requests in flight finish (up to GRACE seconds),
and exits 0; idle keep-alive connections are simply closed by the exit.
"""

from __future__ import annotations

import html
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_SLOW = 30.0  # seconds; /slow is for tests, not for holding workers forever
GRACE = 35.0  # seconds to finish in-flight requests on SIGTERM: the longest /slow, plus margin
IDLE_TIMEOUT = 75.0  # seconds an idle keep-alive connection is kept (longer than the proxy's)


class HelloServer(ThreadingHTTPServer):
    """Counts greetings and requests in flight, so SIGTERM can wait for the latter."""

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, Handler)
        self.greetings = 0
        self.in_flight = 0
        self.draining = False
        self.cond = threading.Condition()

    def begin_drain(self) -> None:
        """Stop accepting; serve_forever() returns. Call from a thread other than its own."""
        with self.cond:
            self.draining = True
        self.shutdown()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if some still were after ``timeout``."""
        with self.cond:
            return self.cond.wait_for(lambda: self.in_flight == 0, timeout)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hello/1"
    timeout = IDLE_TIMEOUT
    server: HelloServer
    _counted = False

    def parse_request(self) -> bool:
        # Called once a request line has arrived: from here until the response is
        # flushed the request is in flight.
        with self.server.cond:
            self.server.in_flight += 1
        self._counted = True
        return super().parse_request()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        finally:
            if self._counted:
                self._counted = False
                with self.server.cond:
                    self.server.in_flight -= 1
                    self.server.cond.notify_all()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self.reply(200, b"ok\n", "text/plain; charset=utf-8")
        elif url.path == "/slow":
            self.slow(parse_qs(url.query).get("s", ["1"])[0])
        elif url.path == "/":
            self.greet()
        else:
            self.reply(404, b"not found\n", "text/plain; charset=utf-8")

    def greet(self) -> None:
        with self.server.cond:
            self.server.greetings += 1
            count = self.server.greetings
        info = {
            "greeting": os.environ.get("GREETING", "Hello"),
            "app": os.environ.get("SUPERAGENT_APP", ""),
            "release": os.environ.get("SUPERAGENT_RELEASE", ""),
            "instance": os.environ.get("SUPERAGENT_INSTANCE", ""),
            "count": count,
            "request_id": self.headers.get("X-Request-Id", ""),
        }
        if "text/html" in self.headers.get("Accept", ""):
            rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                           for k, v in info.items() if k != "greeting")
            page = (f"<!doctype html><title>hello</title>"
                    f"<h1>{html.escape(str(info['greeting']))}</h1><table>{rows}</table>\n")
            self.reply(200, page.encode(), "text/html; charset=utf-8")
        else:
            self.reply(200, (json.dumps(info) + "\n").encode(), "application/json")

    def slow(self, value: str) -> None:
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds <= MAX_SLOW:
            self.reply(400, f"s must be 0 to {MAX_SLOW:g} seconds\n".encode(),
                       "text/plain; charset=utf-8")
            return
        self.log_message("slow request: sleeping %.3fs", seconds)
        time.sleep(seconds)
        self.reply(200, (json.dumps({"slept": seconds}) + "\n").encode(), "application/json")

    def reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.server.draining:  # shutting down: do not invite another request on this one
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


def make_server(port: int, host: str = "127.0.0.1") -> HelloServer:
    return HelloServer((host, port))


def main() -> int:
    port = int(os.environ.get("PORT", "8000"))
    server = make_server(port)

    def on_signal(signum: int, frame: object) -> None:
        # serve_forever() runs in this (the main) thread and shutdown() waits for it to
        # return, so shutdown() must run in another thread.
        threading.Thread(target=server.begin_drain, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"hello: listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.05)  # shutdown() waits up to one interval
        if not server.wait_idle(GRACE):
            print("hello: requests still in flight after the grace period", file=sys.stderr)
    finally:
        server.server_close()
    print("hello: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
