"""Hostile input against the participant's RPC: deep JSON, unmatched routes and methods,
mistyped query parameters, and random bodies on every route of the real agent.

The explicit cases drive the RPC app through Starlette's TestClient with the recording
fake of ``test_rpc``; the property test runs a real in-process agent (``running_agent``)
and sends it random JSON values, almost-valid signals and random bytes (uploads carry the
right sha256, so random bytes reach the extractor) from a worker thread, while the agent's
structlog events and the stdlib log records are captured: no 5xx, no traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import httpx
import pytest
import structlog
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Route
from starlette.testclient import TestClient

from superagent.names import is_app_name
from superagent.participant.rpc import rpc_app
from superagent.participant.signals import SignalLedger
from superagent.rpc import messages as msg
from tests.participant.test_agent import AUTH as AGENT_AUTH
from tests.participant.test_agent import running_agent
from tests.participant.test_rpc import AUTH, SECRET, FakeService


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(rpc_app(FakeService(), secret=SECRET, ledger=SignalLedger()),
                    backend="trio") as c:
        yield c


def test_deep_json_is_a_400(client: TestClient) -> None:
    """``[`` x 100000 (and a deep object) is refused naming the depth, not a RecursionError."""
    for body in (b"[" * 100_000, b'{"a":' * 50_000):
        response = client.post("/v1/signals/start", content=body, headers=AUTH)
        assert response.status_code == 400
        assert response.json()["error"] == "bad_request"
        assert "deep" in response.json()["detail"]


def test_nan_and_surrogates_are_a_400(client: TestClient) -> None:
    """Bodies whose values no answer could encode are refused up front."""
    for body in (b'{"id": "a", "term": 1, "grace": NaN}', b'{"id": "\\udc00", "term": 1}'):
        response = client.post("/v1/signals/drain", content=body, headers=AUTH)
        assert response.status_code == 400, response.text


def test_unmatched_routes_and_methods_answer_json(client: TestClient) -> None:
    """404 not_found, 405 method_not_allowed with Allow, both as ErrorReply documents."""
    for path in ("/v1/nope", "/", "/v1/signals"):
        response = client.get(path, headers=AUTH)
        assert response.status_code == 404, path
        assert response.json()["error"] == "not_found"
        assert response.json()["status"] == 404
    response = client.post("/v1/status", headers=AUTH)
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD"}
    upload = client.get("/v1/releases/a/r1", headers=AUTH)
    assert upload.status_code == 405 and upload.headers["allow"] == "PUT"


@pytest.mark.parametrize(("query", "param"), [("n=ten", "n"), ("n=0", "n"),
                                              ("follow=maybe", "follow"), ("colour=1", "colour")])
def test_logs_query_parameters_of_the_wrong_type_are_named(client: TestClient, query: str,
                                                           param: str) -> None:
    """A 400 whose detail names the parameter."""
    response = client.get(f"/v1/logs?{query}", headers=AUTH)
    assert response.status_code == 400
    assert param in response.json()["detail"]


def test_an_oversized_term_header_is_a_400(client: TestClient) -> None:
    """A term of 5000 digits is not an integer to convert (Python refuses that many)."""
    data = b"x"
    response = client.put("/v1/releases/a/r1", content=data, headers={
        **AUTH, "X-Superagent-Sha256": hashlib.sha256(data).hexdigest(),
        "X-Superagent-Signal": "s1", "X-Superagent-Term": "9" * 5000})
    assert response.status_code == 400
    assert "term" in response.json()["detail"]


@pytest.mark.parametrize("app", ["Hello", "a_b", "a.b", "sa-\u00e9", " ", "x" * 41])
def test_an_app_name_no_role_accepts_is_a_400_before_the_service(app: str) -> None:
    """The app becomes a Unix user and a cgroup: a name outside ``names.APP_NAME`` is
    refused by the protocol, on the upload path and in signals, before the agent acts."""
    service = FakeService()
    with TestClient(rpc_app(service, secret=SECRET, ledger=SignalLedger()),
                    backend="trio") as client:
        data = b"x"
        upload = client.put(f"/v1/releases/{quote(app, safe='')}/r1", content=data, headers={
            **AUTH, "X-Superagent-Sha256": hashlib.sha256(data).hexdigest(),
            "X-Superagent-Signal": "s1", "X-Superagent-Term": "1"})
        start = client.post("/v1/signals/start", headers=AUTH, content=json.dumps(
            {"id": "s2", "term": 1, "app": app, "release": "r1"}))
    for response in (upload, start):
        assert response.status_code == 400, response.text
        assert "app:" in response.json()["detail"]
    assert service.calls == []


# ---------------------------------------------------------------------- property test
ROUTES = [r for r in rpc_app(cast(Any, None), secret="x", ledger=cast(Any, None)).routes
          if isinstance(r, Route)]
# An upload for a valid app name creates that app's Unix user before the archive is read:
# the fuzz names one app (whose user other agent tests create anyway) or invalid names.
APP = "hello"
NOT_AN_APP = st.text(min_size=1, max_size=12).filter(lambda name: not is_app_name(name))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=16)
                    | st.floats(allow_nan=False, allow_infinity=False),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
PLAUSIBLE: dict[str, Any] = {
    "term": 1, "app": APP, "release": "r1", "sha256": "0" * 64, "keep": [],
    "instances": ["hello@r1.0"], "grace": 0.5, "timeout": 1.0, "count": 1,
    "offline": False, "enabled": False, "ttl": 1.0}
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e),
                      max_size=24)
IDS = st.uuids().map(lambda u: f"fuzz-{u}") | HEADER_TEXT  # fresh ids mostly: they run


@st.composite
def signal_bodies(draw: st.DrawFn, kind: str) -> bytes:
    """A signal's fields, each plausible or random JSON, some missing, maybe one extra."""
    cls = msg.SIGNALS.get(kind)
    if cls is None or draw(st.booleans()):
        return json.dumps(draw(JSON)).encode()
    body: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if draw(st.integers(0, 9)) == 0:
            continue  # missing
        plausible = draw(IDS) if f.name == "id" else PLAUSIBLE.get(f.name)
        body[f.name] = draw(st.just(plausible) | JSON)
    if draw(st.booleans()):
        body[draw(st.text(max_size=8))] = draw(JSON)
    return json.dumps(body).encode()


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], dict[str, str], bytes]:
    """method, path, query, headers, body for one route of the RPC app."""
    route = draw(st.sampled_from(ROUTES))
    method = sorted(route.methods or {"GET"})[0]
    names = re.findall(r"\{([^}]+)\}", route.path)
    values = {name: draw(st.sampled_from({"kind": [*msg.SIGNALS, "nope"], "app": [APP],
                                          "release": ["r1", "r2"]}.get(name, ["x"]))
                         | NOT_AN_APP) for name in names}
    path = route.path
    for name, value in values.items():
        path = path.replace(f"{{{name}}}", quote(value, safe=""))
    query = draw(st.dictionaries(st.sampled_from(["app", "instance", "request_id", "n", "x"]),
                                 st.text(max_size=8), max_size=3))  # never follow: it streams
    headers = dict(AGENT_AUTH)
    body = draw(signal_bodies(values.get("kind", "")) | st.binary(max_size=400))
    if "release" in names:
        headers.update({"X-Superagent-Signal": draw(IDS),
                        "X-Superagent-Term": draw(st.just("1") | HEADER_TEXT),
                        "X-Superagent-Sha256": hashlib.sha256(body).hexdigest()})
    return method, path, query, headers, body


def fuzz(base_url: str, seen: list[int]) -> None:
    """Runs in a worker thread while the agent serves on trio."""
    # a fresh connection per request: a kept-alive one the server closes for idleness
    # just as the next request goes out is a client-side race, not the agent's answer
    with httpx.Client(base_url=base_url, timeout=20.0,
                      limits=httpx.Limits(max_keepalive_connections=0)) as http:
        @given(requests())
        @settings(max_examples=120, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        def one(request: tuple[str, str, dict[str, str], dict[str, str], bytes]) -> None:
            method, path, query, headers, body = request
            response = http.request(method, path, params=query, headers=headers, content=body)
            seen.append(response.status_code)
            assert response.status_code < 500, (method, path, query, body, response.text)
            if response.status_code >= 400:
                assert isinstance(response.json().get("error"), str), response.text

        one()


async def test_random_input_on_every_route_of_a_real_agent_never_gets_a_5xx(
        data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Random and almost-valid input on every RPC route: never a 5xx, never a traceback."""
    seen: list[int] = []
    caplog.set_level(logging.WARNING)
    async with running_agent(data_dir) as rig:
        with structlog.testing.capture_logs() as events:
            await trio.to_thread.run_sync(fuzz, str(rig.rpc.base_url), seen)
    failures = [e for e in events if e.get("exc_info") or e["log_level"] in ("error",
                                                                             "critical")]
    assert failures == []
    assert [r for r in caplog.records if r.exc_info] == []
    assert {200, 400} <= set(seen)  # handlers were reached, not only the gate
