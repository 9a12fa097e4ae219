"""A chatty stdlib app for the logs tests, written into a directory to be packed.

At start each instance prints ``started <instance>`` to stdout and ``warming <instance>``
to stderr. Every request prints one JSON line to stdout carrying the request's
``X-Request-Id`` (``{"level": "info", "request_id": ..., "msg": "handled /path"}``) and
answers ``ok <instance>``; ``/burst?n=N`` prints N more plain lines first (a flood for the
slow-reader test); ``/secret`` prints the value of ``[env] TOKEN``. ``/flood?seconds=S&mb=R``
writes ``R`` MB/s of 1 KiB ``flood N xxx...`` lines to stdout for ``S`` seconds, paced every
10 ms, and answers what it wrote as JSON (``bytes``, ``lines``, ``seconds``): the memory
test's flood. A ``tick`` line is printed every ``TICK`` seconds when set (a steady stream for
the follow tests).
"""

from __future__ import annotations

from pathlib import Path

from tests.e2e.fleet import write_manifest
from tests.participant.children import child_python

APP = '''\
import json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

INSTANCE = os.environ.get("SUPERAGENT_INSTANCE", "?")
TICK = float(os.environ.get("TICK", "0"))
PAD = b"x" * 1000
print(f"started {INSTANCE}", flush=True)
print(f"warming {INSTANCE}", file=sys.stderr, flush=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urlsplit(self.path)
        rid = self.headers.get("X-Request-Id", "")
        if url.path == "/healthz":
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        if url.path == "/burst":
            n = int(parse_qs(url.query).get("n", ["0"])[0])
            out = sys.stdout
            for i in range(n):
                out.write(f"burst {i} {INSTANCE}\\n")
            out.flush()
        if url.path == "/flood":
            self.answer(flood(parse_qs(url.query)))
            return
        if url.path == "/secret":
            print(f"the token is {os.environ.get('TOKEN')}", flush=True)
        print(json.dumps({"level": "info", "request_id": rid, "msg": f"handled {url.path}",
                          "instance": INSTANCE}), flush=True)
        self.answer(f"ok {INSTANCE}\\n".encode())

    def answer(self, body):
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def flood(query):
    seconds, rate = float(query["seconds"][0]), float(query["mb"][0]) * 1e6
    out, written, n, t0 = sys.stdout.buffer, 0, 0, time.monotonic()
    while (elapsed := time.monotonic() - t0) < seconds:
        while written < rate * min(elapsed + 0.01, seconds):  # what is due by now
            block = b"".join(b"flood %d %s\\n" % (n + i, PAD) for i in range(64))
            out.write(block)
            written += len(block)
            n += 64
        out.flush()
        time.sleep(0.01)  # pacing the output, 10 ms at a time
    return json.dumps({"bytes": written, "lines": n,
                       "seconds": time.monotonic() - t0}).encode()


def ticker():
    n = 0
    while True:
        time.sleep(TICK)
        n += 1
        print(f"tick {n} {INSTANCE}", flush=True)


if TICK > 0:
    threading.Thread(target=ticker, daemon=True).start()
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''


def write_log_app(dest: Path, *, name: str, per_node: int = 2, tick: float = 0.0,
                  python: str | None = None, token: str = "s3cr3t-value") -> Path:
    """Write the app into ``dest`` (created); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "app.py").write_text(APP)
    return write_manifest(dest, name=name, python=python or child_python(), per_node=per_node,
                          env={"TICK": str(tick), "TOKEN": token})
