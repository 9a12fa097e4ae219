"""A tiny demo app: answers every request with its instance name and the path it saw.

Run: PORT=5001 NAME=hello-1 python3 examples/hello.py
"""

from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({
            "instance": os.environ.get("NAME", "hello"),
            "path": self.path,
            "request_id": self.headers.get("X-Request-Id"),
            "forwarded_for": self.headers.get("X-Forwarded-For"),
        }).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
