"""The agent's RPC layer: authentication, validation, fencing, idempotency, errors.

The service behind it is a recording fake: the thing under test here is the HTTP
layer, driven through Starlette's TestClient on trio.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from superagent.participant.errors import BuildFailed
from superagent.participant.rpc import rpc_app
from superagent.participant.signals import SignalLedger

SECRET = "s3cret-cluster-key"
AUTH = {"Authorization": f"Bearer {SECRET}"}


class FakeService:
    """Records calls; ``fail`` makes the next prepare raise a build failure."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.persisted = 0
        self.fail = False

    async def prepare(self, app: str, release: str, archive: Path, sha256: str
                      ) -> dict[str, Any]:
        data = archive.read_bytes()
        self.calls.append(("prepare", (app, release, data, sha256)))
        if self.fail:
            self.fail = False
            raise BuildFailed("build command failed", app=app, release=release,
                              log_path=Path("/x/build.log"), tail="boom", returncode=1)
        return {"prepared": f"{app}@{release}"}

    async def start(self, app: str, release: str, count: int) -> dict[str, Any]:
        self.calls.append(("start", (app, release, count)))
        return {"instances": [{"id": f"{app}@{release}#{i}", "port": 41000 + i}
                              for i in range(count)]}

    async def stop(self, instances: list[str], grace: float | None) -> dict[str, Any]:
        self.calls.append(("stop", (instances, grace)))
        return {"stopped": instances}

    async def switch(self, app: str, instances: list[str]) -> dict[str, Any]:
        self.calls.append(("switch", (app, instances)))
        return {"version": 2}

    async def drain(self, instances: list[str], grace: float) -> dict[str, Any]:
        self.calls.append(("drain", (instances, grace)))
        return {"remaining": {i: 0 for i in instances}}

    async def offline(self, offline: bool) -> dict[str, Any]:
        self.calls.append(("offline", offline))
        return {"offline": offline}

    def status(self) -> dict[str, Any]:
        return {"instances": [], "node": "n1"}

    async def debug(self, app: str, enabled: bool, ttl: float) -> dict[str, Any]:
        self.calls.append(("debug", (app, enabled, ttl)))
        return {"app": app, "debug": enabled}

    def logs(self, *, app: str | None, instance: str | None, n: int,
             request_id: str | None = None) -> list[dict[str, Any]]:
        return [{"text": f"line {i}", "app": app, "request_id": request_id}
                for i in range(min(n, 2))]

    async def follow(self, *, app: str | None, instance: str | None,
                     request_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        yield {"text": "live 1"}
        yield {"text": "live 2"}

    def persist(self) -> None:
        self.persisted += 1


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def client(service: FakeService) -> Iterator[TestClient]:
    with TestClient(rpc_app(service, secret=SECRET, ledger=SignalLedger()),
                    backend="trio") as c:
        yield c


def signal(client: TestClient, kind: str, body: Any, headers: dict[str, str] = AUTH) -> Any:
    return client.post(f"/v1/signals/{kind}", content=json.dumps(body), headers=headers)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": SECRET}])
def test_requests_without_the_secret_get_401(client: TestClient, service: FakeService,
                                             headers: dict[str, str]) -> None:
    """Missing or wrong credentials are refused before anything runs."""
    for response in (signal(client, "start", {"id": "a", "term": 1, "app": "x",
                                               "release": "r1"}, headers),
                     client.get("/v1/status", headers=headers),
                     client.get("/v1/logs", headers=headers)):
        assert response.status_code == 401
        assert response.json()["error"] == "Unauthorized"
    assert service.calls == []


def test_start_runs_once_and_a_retry_gets_the_same_result(client: TestClient,
                                                          service: FakeService) -> None:
    """A retried signal id returns the first result; the service acted once."""
    body = {"id": "sig-1", "term": 3, "app": "hello", "release": "r7", "count": 2}
    first = signal(client, "start", body)
    assert first.status_code == 200
    second = signal(client, "start", body)
    assert second.json() == {**first.json(), "repeated": True}
    assert service.calls == [("start", ("hello", "r7", 2))]
    assert service.persisted == 1


def test_stale_term_is_refused_with_409(client: TestClient, service: FakeService) -> None:
    """After a signal at term 5, a signal at term 4 (a deposed leader) is refused."""
    assert signal(client, "offline", {"id": "a", "term": 5, "offline": True}).status_code == 200
    stale = signal(client, "offline", {"id": "b", "term": 4, "offline": False})
    assert stale.status_code == 409
    assert "term 4" in stale.json()["detail"]
    assert service.calls == [("offline", True)]


@pytest.mark.parametrize(("kind", "body", "names"), [
    ("start", {"id": "a", "term": 1, "release": "r1"}, "'app'"),
    ("start", {"id": "a", "term": 1, "app": "x", "release": "r1", "count": 0}, "'count'"),
    ("start", {"id": "a", "term": 1, "app": 5, "release": "r1"}, "'app'"),
    ("stop", {"id": "a", "term": 1, "instances": []}, "'instances'"),
    ("drain", {"id": "a", "term": 1, "instances": ["i"]}, "'grace'"),
    ("drain", {"id": "a", "term": 1, "instances": ["i"], "grace": -1}, "'grace'"),
    ("offline", {"id": "a", "term": 1, "offline": "yes"}, "'offline'"),
    ("offline", {"term": 1, "offline": True}, "'id'"),
    ("offline", {"id": "a", "offline": True}, "'term'"),
    ("debug", {"id": "a", "term": 1, "app": "x"}, "'enabled'"),
    ("debug", {"id": "a", "term": 1, "app": "x", "enabled": True, "ttl": 0}, "'ttl'"),
])
def test_bad_signal_fields_are_a_400_naming_the_field(client: TestClient, service: FakeService,
                                                      kind: str, body: dict[str, Any],
                                                      names: str) -> None:
    """Missing, mistyped or out-of-range fields are refused and named."""
    response = signal(client, kind, body)
    assert response.status_code == 400
    assert names in response.json()["detail"]
    assert service.calls == []


def test_malformed_json_and_unknown_signal(client: TestClient) -> None:
    """A body that is not a JSON object is a 400; an unknown signal a 404."""
    bad = client.post("/v1/signals/start", content=b"{nope", headers=AUTH)
    assert bad.status_code == 400 and "JSON" in bad.json()["detail"]
    listed = client.post("/v1/signals/start", content=b"[1]", headers=AUTH)
    assert listed.status_code == 400
    unknown = signal(client, "reboot", {"id": "a", "term": 1})
    assert unknown.status_code == 404 and "reboot" in unknown.json()["detail"]


def upload(client: TestClient, data: bytes, *, sha: str | None = None, signal_id: str = "u1",
           term: int = 1) -> Any:
    return client.put("/v1/releases/hello/r1", content=data, headers={
        **AUTH, "X-Superagent-Sha256": sha or hashlib.sha256(data).hexdigest(),
        "X-Superagent-Signal": signal_id, "X-Superagent-Term": str(term)})


def test_upload_prepares_with_the_exact_bytes(client: TestClient, service: FakeService) -> None:
    """The uploaded archive reaches prepare intact; a repeat is answered from the ledger."""
    data = b"pretend tarball " * 1000
    first = upload(client, data)
    assert first.status_code == 200 and first.json() == {"prepared": "hello@r1"}
    assert upload(client, data).json()["repeated"] is True
    assert service.calls == [("prepare", ("hello", "r1", data,
                                          hashlib.sha256(data).hexdigest()))]


def test_upload_checksum_mismatch_is_refused(client: TestClient, service: FakeService) -> None:
    """An archive that does not hash to the announced sha256 never reaches prepare."""
    response = upload(client, b"abc", sha="0" * 64)
    assert response.status_code == 400
    assert response.json()["error"] == "ChecksumMismatch"
    assert upload(client, b"abc", sha="xyz").status_code == 400
    assert service.calls == []


def test_service_errors_keep_their_status_and_the_id_can_be_retried(
        client: TestClient, service: FakeService) -> None:
    """A build failure is a 422 naming app and release; the same id may be sent again."""
    service.fail = True
    failed = upload(client, b"data")
    assert failed.status_code == 422
    assert failed.json()["error"] == "BuildFailed"
    assert failed.json()["app"] == "hello" and failed.json()["release"] == "r1"
    retried = upload(client, b"data")
    assert retried.status_code == 200
    assert len(service.calls) == 2


def test_status_and_logs(client: TestClient) -> None:
    """Status passes through; logs answer recent lines, and follow streams NDJSON."""
    assert client.get("/v1/status", headers=AUTH).json() == {"instances": [], "node": "n1"}
    recent = client.get("/v1/logs?app=hello&n=5&request_id=r-9", headers=AUTH).json()
    assert recent == {"lines": [{"text": "line 0", "app": "hello", "request_id": "r-9"},
                                {"text": "line 1", "app": "hello", "request_id": "r-9"}]}
    assert client.get("/v1/logs?n=0", headers=AUTH).status_code == 400
    streamed = client.get("/v1/logs?follow=1&n=1", headers=AUTH)
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert [line["text"] for line in lines] == ["line 0", "live 1", "live 2"]


def test_debug_signal_reaches_the_service(client: TestClient, service: FakeService) -> None:
    """A debug signal opens a session with the default one-hour ttl."""
    answer = signal(client, "debug", {"id": "d1", "term": 1, "app": "hello", "enabled": True})
    assert answer.status_code == 200
    assert service.calls == [("debug", ("hello", True, 3600.0))]

