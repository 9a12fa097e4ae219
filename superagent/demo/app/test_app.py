"""The demo app's own test, the manifest's [test] command: ``python3 -m unittest -q test_app``.

Runs the server in a thread on a free loopback port and talks to it with http.client.
"""

from __future__ import annotations

import http.client
import importlib
import json
import threading
import unittest

# Imported by name at run time: app.py is a script beside this file, not a package module.
app = importlib.import_module("app")


class HelloTest(unittest.TestCase):
    def setUp(self) -> None:
        self.server = app.make_server(0)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.server.server_address[1],
                                               timeout=10)

    def tearDown(self) -> None:
        self.conn.close()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def get(self, path: str, headers: dict[str, str] | None = None
            ) -> tuple[int, bytes, http.client.HTTPResponse]:
        self.conn.request("GET", path, headers=headers or {})
        response = self.conn.getresponse()
        return response.status, response.read(), response

    def test_greeting_counts_and_echoes_request_id(self) -> None:
        """/ greets in JSON, counts greetings and shows the X-Request-Id it got."""
        status, body, _ = self.get("/", {"X-Request-Id": "req-1"})
        self.assertEqual(status, 200)
        first = json.loads(body)
        self.assertEqual(first["request_id"], "req-1")
        status, body, _ = self.get("/")
        self.assertEqual(json.loads(body)["count"], first["count"] + 1)

    def test_html_for_browsers(self) -> None:
        """A browser gets an HTML page."""
        status, body, response = self.get("/", {"Accept": "text/html"})
        self.assertEqual(status, 200)
        self.assertIn("text/html", response.headers["Content-Type"])
        self.assertIn(b"<h1>", body)

    def test_healthz(self) -> None:
        """/healthz answers ok."""
        self.assertEqual(self.get("/healthz")[:2], (200, b"ok\n"))

    def test_slow_and_bad_input(self) -> None:
        """/slow answers after the delay; a bad delay is a 400, an unknown path a 404."""
        self.assertEqual(self.get("/slow?s=0")[0], 200)
        self.assertEqual(self.get("/slow?s=31")[0], 400)
        self.assertEqual(self.get("/slow?s=x")[0], 400)
        self.assertEqual(self.get("/nope")[0], 404)


if __name__ == "__main__":
    unittest.main()
