"""The app toolkit under a real participant: an app's debug events, filed by request id.

A WSGI app (``wsgiref``, the standard library only) carrying a copy of
``superagent.toolkit`` as its own package is deployed to ``superagent up``'s embedded
cluster. A request through the proxy with an ``X-Request-Id`` makes the app ``emit`` an
event and log a record; the participant, which captures the app's stdout, must then
serve both lines from its RPC (``GET /v1/logs?request_id=``) with the event's fields
parsed, its level and request id surfaced, and nothing of any other request; the id is
echoed on the response the proxy relays.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from superagent.toolkit.__main__ import vendor
from tests.e2e.embedded import REQUEST_TIMEOUT, Cluster, running_cluster
from tests.participant.children import child_python
from tests.support.wait import wait_until_async

APP = '''\
import json, logging, os, sys
from wsgiref.simple_server import WSGIRequestHandler, make_server

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from superagent_toolkit import JsonHandler, WSGIRequestIdMiddleware, emit

log = logging.getLogger("orders")
log.addHandler(JsonHandler())
log.setLevel(logging.INFO)


def app(environ, start_response):
    if environ["PATH_INFO"].startswith("/orders/"):
        order = environ["PATH_INFO"].rsplit("/", 1)[1]
        emit("order.lookup", level="warning", order=order, cached=False, tags=["a", "b"])
        log.info("order %s served", order, extra={"order": order})
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


make_server("127.0.0.1", int(os.environ["PORT"]), WSGIRequestIdMiddleware(app),
            handler_class=Quiet).serve_forever()
'''


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with running_cluster() as running:
        yield running


def write_app(dest: Path) -> Path:
    dest.mkdir(parents=True)
    vendor(dest)
    (dest / "app.py").write_text(APP)
    (dest / "superagent.toml").write_text(
        f'[app]\nname = "orders"\n[run]\ncommand = "{child_python()} app.py"\n'
        '[health]\npath = "/healthz"\n'
        '[routes]\nprefix = "/orders"\n[scale]\nper_node = 1\n')
    for path in (dest, *dest.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


async def logs_of(cluster: Cluster, request_id: str) -> list[dict[str, Any]]:
    """The participant's captured lines of one request id, from its RPC."""
    async with httpx.AsyncClient(base_url=cluster.rpc, timeout=REQUEST_TIMEOUT,
                                 headers={"authorization": f"Bearer {cluster.rpc_key}"}) as rpc:
        response = await rpc.get("/v1/logs", params={"app": "orders",
                                                     "request_id": request_id, "n": "50"})
    assert response.status_code == 200, response.text
    lines: list[dict[str, Any]] = response.json()["lines"]
    return lines


@pytest.mark.slow
async def test_emitted_events_are_filed_under_the_request_id(cluster: Cluster) -> None:
    view = await cluster.deploy(write_app(cluster.src / "orders"))
    assert (view["status"], view["finished"]) == ("succeeded", True), view

    for request_id in ("other-request", "trace-me.42"):
        response = await cluster.get(f"/orders/{request_id[-2:]}",
                                     headers={"X-Request-Id": request_id})
        assert response.status_code == 200, response.text
        assert response.headers.get_list("x-request-id") == [request_id]

    # the app's two lines, and the proxy's record of the request, which the participant
    # keeps for a request-id query (it reads the proxy's access log apart, so it may come
    # before or after them)
    found = await wait_until_async(
        lambda: logs_of(cluster, "trace-me.42"),
        "the participant to serve both lines of the request and the proxy's record",
        until=lambda found: len(found) >= 3)
    assert [line["stream"] for line in found].count("proxy") == 1, found
    lines = [line for line in found if line["stream"] != "proxy"]
    assert len(lines) == 2, found
    event, record = lines
    assert all(line["request_id"] == "trace-me.42" and line["app"] == "orders"
               and line["stream"] == "stdout" for line in lines), lines
    assert event["level"] == "warning"
    fields = event["fields"]
    assert (fields["event"], fields["order"], fields["cached"], fields["tags"]) == (
        "order.lookup", "42", False, ["a", "b"]), fields
    assert isinstance(fields["ts"], float)
    assert record["level"] == "info"
    assert (record["fields"]["event"], record["fields"]["logger"],
            record["fields"]["order"]) == ("order 42 served", "orders", "42")
