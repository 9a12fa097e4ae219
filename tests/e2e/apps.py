"""Test app sources for the end-to-end deploy tests, written into a directory and packed.

One stdlib app (``APP``) behaves as the ``MODE`` in its manifest's ``[env]`` says:

- ``ok``: ``/`` answers JSON with its release, instance and ``VERSION``; ``/healthz`` and
  ``/ready`` answer 200; ``/slow?s=N`` answers after N seconds; a GET with ``Upgrade``
  gets a 101 and then every byte sent is echoed back (a websocket-style tunnel);
- ``never_ready``: the same, but ``/ready`` (the readiness path) answers 503 forever;
- ``slow_ready``: ``/ready`` answers 503 for ``READY_AFTER`` seconds after the start, then 200;
- ``crash``: exits with status 3 at once.

On SIGTERM it stops accepting, lets plain requests in flight finish (up to ``GRACE``),
and exits; open tunnels end with the process. The app runs under a ``python3`` every user
may execute (as root the agent runs it as the app's own system user).
"""

from __future__ import annotations

from pathlib import Path

from tests.participant.children import child_python

APP = '''\
import json, os, signal, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MODE = os.environ.get("MODE", "ok")
STARTED = time.monotonic()
GRACE = 20.0  # seconds for plain requests in flight after SIGTERM (the longest /slow: 5)
if MODE == "crash":
    print("e2e app: crashing on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
CRASH_AFTER = float(os.environ.get("CRASH_AFTER", "2"))  # crash_after_ready: when it dies


class Server(ThreadingHTTPServer):
    daemon_threads = True  # open tunnels end with the process

    def __init__(self, address):
        super().__init__(address, Handler)
        self.in_flight = 0
        self.draining = False
        self.cond = threading.Condition()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.headers.get("Upgrade"):
            self.tunnel()
            return
        with self.server.cond:
            self.server.in_flight += 1
        try:
            self.answer()
        finally:
            with self.server.cond:
                self.server.in_flight -= 1
                self.server.cond.notify_all()

    def answer(self):
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self.reply(200, {"ok": True})
        elif url.path == "/ready":
            ready = MODE in ("ok", "crash_after_ready") or (
                MODE == "slow_ready" and time.monotonic() - STARTED
                > float(os.environ.get("READY_AFTER", "0")))
            self.reply(200 if ready else 503, {"ready": ready})
        elif url.path == "/slow":
            seconds = min(float(parse_qs(url.query).get("s", ["1"])[0]), 30.0)
            threading.Event().wait(seconds)
            self.reply(200, {"slept": seconds, "release": os.environ["SUPERAGENT_RELEASE"]})
        else:
            self.reply(200, {"release": os.environ["SUPERAGENT_RELEASE"],
                             "instance": os.environ["SUPERAGENT_INSTANCE"],
                             "version": os.environ.get("VERSION", "")})

    def reply(self, status, doc):
        body = (json.dumps(doc) + "\\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.server.draining:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def tunnel(self):
        self.send_response(101)
        self.send_header("X-Instance", os.environ["SUPERAGENT_INSTANCE"])
        self.send_header("Upgrade", self.headers["Upgrade"])
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        sock = self.connection
        sock.settimeout(60)
        while True:
            data = sock.recv(65536)
            if not data:
                return
            sock.sendall(data)


def main():
    server = Server(("127.0.0.1", int(os.environ["PORT"])))

    def on_term(signum, frame):
        server.draining = True
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    if MODE == "crash_after_ready":  # passes readiness, then dies between two answers
        # (an answer cut in the middle is lost whatever serves it: nothing can replay it)
        def die():
            with server.cond:
                server.cond.wait_for(lambda: server.in_flight == 0)
                print("e2e app: crashing after being ready", file=sys.stderr, flush=True)
                os._exit(3)
        threading.Timer(CRASH_AFTER, die).start()
    print("e2e app: listening", flush=True)
    server.serve_forever()
    with server.cond:
        server.cond.wait_for(lambda: server.in_flight == 0, GRACE)
    server.server_close()
    print("e2e app: stopped", flush=True)


main()
'''

FAILING_TEST = '''\
import sys
print("test_answer ... FAIL: expected 42, got 41 (e2e-failing-test)")
sys.exit(1)
'''


def write_app(dest: Path, *, name: str, version: str, mode: str = "ok", per_node: int = 2,
              ready_deadline: float = 10.0, ready_after: float = 0.0,
              failing_test: bool = False) -> Path:
    """Write the app's source tree into ``dest`` (created) and return ``dest``.

    ``version`` lands in ``[env]``, so two versions are two different artifacts.
    """
    python = child_python()
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "app.py").write_text(APP)
    test = ""
    if failing_test:
        (dest / "check.py").write_text(FAILING_TEST)
        test = f'[test]\ncommand = "{python} check.py"\n'
    (dest / "superagent.toml").write_text(
        f'[app]\nname = "{name}"\n'
        f'{test}'
        f'[run]\ncommand = "{python} app.py"\n'
        f'[health]\npath = "/healthz"\nready_path = "/ready"\n'
        f'ready_deadline = {ready_deadline}\n'
        f'[routes]\nprefix = "/{name}"\nstrip_prefix = true\n'
        f'[scale]\nper_node = {per_node}\n'
        f'[env]\nMODE = "{mode}"\nVERSION = "{version}"\nREADY_AFTER = "{ready_after}"\n')
    for path in (dest, *dest.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest
