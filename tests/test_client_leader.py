"""The CLI's client reads live views from the leader: a follower's ``"live": false`` list
is asked again of the leader it names, once, and the leader goes first afterwards."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from superagent.client import Client


class Coordinator(ThreadingHTTPServer):
    """Answers every GET with ``doc`` and ``X-Superagent-Leader: leader``; counts them."""

    def __init__(self, doc: dict[str, Any]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.doc = doc
        self.leader = ""
        self.hits = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Coordinator

    def do_GET(self) -> None:
        self.server.hits += 1
        body = json.dumps(self.server.doc).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        if self.server.leader:
            self.send_header("x-superagent-leader", self.server.leader)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def cluster() -> Iterator[tuple[Coordinator, Coordinator]]:
    follower = Coordinator({"nodes": [{"name": "n1", "status": None}], "live": False})
    leader = Coordinator({"nodes": [{"name": "n1", "status": {"listen": []}}], "live": True})
    follower.leader = leader.leader = leader.url
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (follower, leader)]
    for t in threads:
        t.start()
    yield follower, leader
    for s in (follower, leader):
        s.shutdown()
        s.server_close()


def test_a_followers_stale_view_is_asked_of_the_leader(
        cluster: tuple[Coordinator, Coordinator]) -> None:
    follower, leader = cluster
    client = Client([follower.url, leader.url], "t")
    assert client.get("/api/v1/nodes")["live"] is True
    assert (follower.hits, leader.hits) == (1, 1)
    assert client.servers[0] == leader.url  # later requests go to the leader first
    assert client.get("/api/v1/nodes")["live"] is True
    assert (follower.hits, leader.hits) == (1, 2)


def test_without_a_known_leader_the_followers_answer_stands(
        cluster: tuple[Coordinator, Coordinator]) -> None:
    follower, leader = cluster
    follower.leader = ""  # an election: no leader named
    client = Client([follower.url, leader.url], "t")
    assert client.get("/api/v1/nodes")["live"] is False
    assert (follower.hits, leader.hits) == (1, 0)


def test_an_unreachable_leader_leaves_the_followers_answer(
        cluster: tuple[Coordinator, Coordinator]) -> None:
    follower, _ = cluster
    follower.leader = "http://127.0.0.1:9"  # named, but gone
    client = Client([follower.url], "t", timeout=5.0)
    assert client.get("/api/v1/nodes")["live"] is False
    # nor does it go first afterwards: every later request would try it before the
    # coordinators that answer (a connect timeout each when the address is unreachable)
    assert client.servers == [follower.url]
