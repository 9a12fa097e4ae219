"""The Python toolkit in real apps: Starlette under hypercorn (ASGI) and a threaded
wsgiref server (WSGI, with a copy of the toolkit as the app's own package).

Each app runs as a process of its own (``servers.served``); requests with and without an
``X-Request-Id`` must come back with the id echoed and leave lines (``emit`` and
``logging``) carrying the same id; requests held together (``/together``) must never see
each other's id. The WSGI app also streams a body whose generator emits while it is
iterated, after the app returned. In-process tests cover the middlewares' edge cases.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from superagent import toolkit
from superagent.toolkit.__main__ import vendor
from tests.toolkit.servers import Served, check_together, served

ASGI_APP = '''\
import asyncio, logging, os

from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from superagent.toolkit import JsonHandler, RequestIdMiddleware, current_request_id, emit

log = logging.getLogger("asgi-app")
log.addHandler(JsonHandler())
log.setLevel(logging.INFO)
log.propagate = False
TOGETHER = int(os.environ["TOGETHER"])
arrived = 0
everyone = None


async def healthz(request):
    return PlainTextResponse("ok")


async def hello(request):
    who = request.query_params["who"]
    emit("hello", who=who, thing=object())
    log.info("logged %s", who, extra={"who": who})
    return JSONResponse({"who": who, "request_id": current_request_id(),
                         "state": request.state.request_id})


async def together(request):
    global arrived
    who = request.query_params["who"]
    emit("arrived", who=who)
    arrived += 1
    if arrived == TOGETHER:
        everyone.set()
    await asyncio.wait_for(everyone.wait(), 30)
    emit("leaving", who=who)
    return JSONResponse({"who": who, "request_id": current_request_id()})


app = Starlette(routes=[Route("/healthz", healthz), Route("/hello", hello),
                        Route("/together", together)])
app.add_middleware(RequestIdMiddleware)


async def main():
    global everyone
    everyone = asyncio.Event()
    config = Config()
    config.bind = ["127.0.0.1:" + os.environ["PORT"]]
    await serve(app, config)


asyncio.run(main())
'''

WSGI_APP = '''\
import json, logging, os, sys, threading
from socketserver import ThreadingMixIn
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from superagent_toolkit import JsonHandler, WSGIRequestIdMiddleware, current_request_id, emit

log = logging.getLogger("wsgi-app")
log.addHandler(JsonHandler())
log.setLevel(logging.INFO)
log.propagate = False
everyone = threading.Barrier(int(os.environ["TOGETHER"]))


def answer(start_response, doc):
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(doc).encode()]


def app(environ, start_response):
    path = environ["PATH_INFO"]
    who = parse_qs(environ.get("QUERY_STRING", "")).get("who", [""])[0]
    if path == "/healthz":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    if path == "/hello":
        emit("hello", who=who, loaded=sorted(m for m in sys.modules if m == "superagent"))
        log.info("logged %s", who, extra={"who": who})
        return answer(start_response, {"who": who, "request_id": current_request_id(),
                                       "environ": environ["superagent.request_id"]})
    if path == "/together":
        emit("arrived", who=who)
        everyone.wait(timeout=30)
        emit("leaving", who=who)
        return answer(start_response, {"who": who, "request_id": current_request_id()})
    if path == "/stream":
        def body():
            for i in range(3):
                emit("chunk", who=who, i=i)
                yield b"chunk %d\\n" % i
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body()
    if path == "/own":
        start_response("200 OK", [("X-Request-Id", "app-chosen")])
        return [b"own"]
    start_response("404 Not Found", [])
    return [b""]


class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


make_server("127.0.0.1", int(os.environ["PORT"]), WSGIRequestIdMiddleware(app),
            server_class=Server, handler_class=Quiet).serve_forever()
'''


@pytest.fixture
def asgi_app(tmp_path: Path) -> Any:
    script = tmp_path / "asgi_app.py"
    script.write_text(ASGI_APP)
    with served("asgi-app", tmp_path / "asgi.log", [sys.executable, str(script)]) as app:
        yield app


@pytest.fixture
def wsgi_app(tmp_path: Path) -> Any:
    script = tmp_path / "app" / "wsgi_app.py"
    script.parent.mkdir()
    vendor(script.parent)
    script.write_text(WSGI_APP)
    with served("wsgi-app", tmp_path / "wsgi.log",
                [sys.executable, "-I", str(script)]) as app:
        yield app


def check_hello(app: Served, extra_key: str) -> None:
    """With an id: echoed and on both lines; without: a fresh one, echoed and on both."""
    with_id = app.get("/hello?who=given", "client-id.1")
    assert with_id.headers["x-request-id"] == "client-id.1"
    without = app.get("/hello?who=fresh")
    fresh = without.headers["x-request-id"]
    assert toolkit.well_formed(fresh) and fresh != "client-id.1"
    malformed = app.get("/hello?who=malformed", "not ok")
    replaced = malformed.headers["x-request-id"]
    assert toolkit.well_formed(replaced) and replaced not in (fresh, "not ok")
    ids = {"given": "client-id.1", "fresh": fresh, "malformed": replaced}
    for who, response in (("given", with_id), ("fresh", without), ("malformed", malformed)):
        assert response.json()["request_id"] == ids[who]
        assert response.json()[extra_key] == ids[who]

    def both(events: list[dict[str, Any]]) -> bool:
        return all(sum(1 for e in events if e.get("who") == who) == 2 for who in ids)

    events = app.wait_events(both, "the hello and logged lines of three requests")
    for who, request_id in ids.items():
        mine = [e for e in events if e.get("who") == who]
        assert [e["event"] for e in mine] == ["hello", f"logged {who}"]
        assert all(e["request_id"] == request_id for e in mine), mine
        assert mine[1]["logger"].endswith("-app") and mine[1]["level"] == "info"


@pytest.mark.slow
def test_asgi_starlette_under_hypercorn(asgi_app: Served) -> None:
    check_hello(asgi_app, "state")
    hello = next(e for e in asgi_app.events() if e["event"] == "hello")
    assert hello["thing"].startswith("<object object at")
    check_together(asgi_app, asgi_app.together())


@pytest.mark.slow
def test_wsgi_on_a_threaded_wsgiref_server(wsgi_app: Served) -> None:
    check_hello(wsgi_app, "environ")
    hello = next(e for e in wsgi_app.events() if e["event"] == "hello")
    assert hello["loaded"] == []  # the copied toolkit runs without superagent
    check_together(wsgi_app, wsgi_app.together())

    streamed = wsgi_app.get("/stream?who=streamer", "stream-1")
    assert streamed.text == "chunk 0\nchunk 1\nchunk 2\n"
    chunks = wsgi_app.wait_events(
        lambda events: len([e for e in events if e["event"] == "chunk"]) == 3,
        "the three chunk lines")
    assert [(e["i"], e["request_id"]) for e in chunks if e["event"] == "chunk"] == [
        (0, "stream-1"), (1, "stream-1"), (2, "stream-1")]

    own = wsgi_app.get("/own", "sent-id")
    assert own.headers.get_list("x-request-id") == ["app-chosen"]
    assert own.headers.get("content-length") == "3"  # a list body is passed on unwrapped


# --- in process: the middlewares' edge cases -------------------------------------------------


async def test_asgi_passes_other_scopes_and_keeps_an_apps_own_header() -> None:
    seen: list[Any] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["type"], toolkit.current_request_id()))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"X-Request-Id", b"mine")]})

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {}

    middleware = toolkit.RequestIdMiddleware(inner)
    await middleware({"type": "lifespan"}, receive, send)
    await middleware({"type": "websocket", "headers": [(b"x-request-id", b"ws-1")]},
                     receive, send)
    await middleware({"type": "http", "headers": [(b"X-REQUEST-ID", b"h-1")]}, receive, send)
    assert seen == [("lifespan", None), ("websocket", "ws-1"), ("http", "h-1")]
    assert sent[0]["headers"] == [(b"X-Request-Id", b"mine")]
    assert toolkit.current_request_id() is None


def test_wsgi_passes_exc_info_and_closes_the_body_in_the_request() -> None:
    closed: list[str | None] = []

    class Body:
        def __iter__(self) -> Any:
            yield b"x"

        def close(self) -> None:
            closed.append(toolkit.current_request_id())

    def inner(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("500 Internal Server Error", [], (ValueError, ValueError(), None))
        return Body()

    started: list[Any] = []
    body = toolkit.WSGIRequestIdMiddleware(inner)(
        {"HTTP_X_REQUEST_ID": "w-1"}, lambda *args: started.append(args))
    assert list(body) == [b"x"]
    body.close()  # type: ignore[attr-defined]
    assert started[0][1] == [("X-Request-Id", "w-1")] and started[0][2][0] is ValueError
    assert closed == ["w-1"] and toolkit.current_request_id() is None


def test_wsgi_returns_lists_and_file_wrappers_as_they_are() -> None:
    class FileWrapper:
        def __init__(self, f: Any) -> None:
            self.f = f

    listed, wrapped = [b"a"], FileWrapper(None)
    for body in (listed, wrapped):
        def inner(environ: dict[str, Any], start_response: Any, body: Any = body) -> Any:
            start_response("200 OK", [])
            return body

        got = toolkit.WSGIRequestIdMiddleware(inner)({"wsgi.file_wrapper": FileWrapper},
                                                     lambda *args: None)
        assert got is body
