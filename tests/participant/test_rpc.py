"""The agent's RPC layer: authentication, validation, fencing, idempotency, errors.

The service behind it is a recording fake: the thing under test here is the HTTP
layer, driven through Starlette's TestClient on trio, and the coordinator's
``ParticipantClient`` talking to the same app in memory (no sockets).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from superagent import codec
from superagent.participant.errors import BuildFailed, StateWriteError, UnknownInstance
from superagent.participant.rpc import rpc_app
from superagent.participant.signals import SignalLedger
from superagent.rpc import messages as msg
from superagent.rpc import version
from superagent.rpc.client import ParticipantClient
from superagent.rpc.errors import Refused, Unreachable, VersionMismatch

SECRET = "s3cret-cluster-key"
AUTH = {"Authorization": f"Bearer {SECRET}"}


class FakeService:
    """Records calls; ``fail`` makes the next prepare raise a build failure."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.asked = 0  # persist() calls
        self.flushed = 0  # of them, covered by a persisted() before an answer
        self.disk_full = False  # persisted() raises
        self.fail = False

    async def prepare(self, app: str, release: str, archive: Path, sha256: str
                      ) -> msg.PrepareReply:
        data = archive.read_bytes()
        self.calls.append(("prepare", (app, release, data, sha256)))
        if self.fail:
            self.fail = False
            raise BuildFailed("build command failed", app=app, release=release,
                              log_path=Path("/x/build.log"), tail="boom", returncode=1)
        return msg.PrepareReply(app=app, release=release, sha256=sha256, build_log="b.log")

    async def prepare_artifact(self, app: str, release: str, sha256: str,
                               keep: tuple[str, ...] = ()) -> msg.PrepareReply:
        self.calls.append(("prepare_artifact", (app, release, sha256, *keep)))
        return msg.PrepareReply(app=app, release=release, sha256=sha256, build_log="b.log")

    async def test(self, app: str, release: str, timeout: float) -> msg.TestReply:
        self.calls.append(("test", (app, release, timeout)))
        return msg.TestReply(app=app, release=release, ok=True, exit_code=0, timed_out=False,
                             log="", skipped=False, seconds=0.1)

    async def start(self, app: str, release: str, count: int) -> msg.StartReply:
        self.calls.append(("start", (app, release, count)))
        return msg.StartReply(app=app, release=release, instances=tuple(
            msg.StartedInstance(id=f"{app}@{release}.{i}", port=41000 + i, state="ready")
            for i in range(count)))

    async def stop(self, instances: list[str], grace: float | None) -> msg.StopReply:
        self.calls.append(("stop", (instances, grace)))
        if "gone" in instances:
            raise UnknownInstance("no instance 'gone' on this node")
        return msg.StopReply(stopped=tuple(instances), in_flight_cut={})

    async def switch(self, app: str, instances: list[str]) -> msg.SwitchReply:
        self.calls.append(("switch", (app, instances)))
        return msg.SwitchReply(app=app, instances=tuple(instances), version=2)

    async def drain(self, instances: list[str], grace: float) -> msg.DrainReply:
        self.calls.append(("drain", (instances, grace)))
        return msg.DrainReply(remaining={i: 0 for i in instances})

    async def offline(self, offline: bool) -> msg.OfflineReply:
        self.calls.append(("offline", offline))
        return msg.OfflineReply(offline=offline)

    def status(self) -> msg.StatusReply:
        return STATUS

    async def debug(self, app: str, enabled: bool, ttl: float) -> msg.DebugReply:
        self.calls.append(("debug", (app, enabled, ttl)))
        return msg.DebugReply(app=app, debug=enabled, until=None)

    def logs(self, *, app: str | None, instance: str | None, n: int,
             request_id: str | None = None) -> list[dict[str, Any]]:
        return [{"text": f"line {i}", "app": app, "request_id": request_id}
                for i in range(min(n, 2))]

    async def follow(self, *, app: str | None, instance: str | None, n: int,
                     request_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        for line in self.logs(app=app, instance=instance, n=n, request_id=request_id):
            yield line
        yield {"text": "live 1"}
        yield {"text": "live 2"}

    def persist(self) -> None:
        self.asked += 1

    async def persisted(self) -> None:
        if self.disk_full:
            raise StateWriteError("cannot write state.json: No space left on device",
                                  path="state.json")
        self.flushed = self.asked


STATUS = msg.StatusReply(node="n1", groups=("default",), offline=False, isolation={},
                         proxy={}, routes={}, debug_sessions={}, instances=(), releases={},
                         figures={})


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
        assert response.json()["error"] == "unauthorized"
    assert service.calls == []


def test_only_the_current_signal_key_is_accepted(service: FakeService) -> None:
    """Keys are asked on every request: none before enrolment (all refused), then the
    machine's signal key only; the credential itself is no key."""
    keys: list[str] = []
    app = rpc_app(service, keys=lambda: keys, ledger=SignalLedger())
    with TestClient(app, backend="trio") as c:
        assert c.get("/v1/status", headers={"Authorization": "Bearer "}).status_code == 401
        keys.append("the-signal-key")
        assert c.get("/v1/status",
                     headers={"Authorization": "Bearer the-signal-key"}).status_code == 200
        for wrong in ("Bearer the-credential", "Bearer the-signal-ke", "the-signal-key"):
            assert c.get("/v1/status", headers={"Authorization": wrong}).status_code == 401


def test_start_runs_once_and_a_retry_gets_the_same_result(client: TestClient,
                                                          service: FakeService) -> None:
    """A retried signal id returns the first result; the service acted once."""
    body = {"id": "sig-1", "term": 3, "app": "hello", "release": "r7", "count": 2}
    first = signal(client, "start", body)
    assert first.status_code == 200
    second = signal(client, "start", body)
    assert second.json() == {**first.json(), "repeated": True}
    assert service.calls == [("start", ("hello", "r7", 2))]
    assert service.asked == service.flushed == 1


def test_stale_term_is_refused_with_409(client: TestClient, service: FakeService) -> None:
    """After a signal at term 5, a signal at term 4 (a deposed leader) is refused."""
    assert signal(client, "offline", {"id": "a", "term": 5, "offline": True}).status_code == 200
    stale = signal(client, "offline", {"id": "b", "term": 4, "offline": False})
    assert stale.status_code == 409 and stale.json()["error"] == "stale_term"
    assert "term 4" in stale.json()["detail"]
    assert service.calls == [("offline", True)]


@pytest.mark.parametrize(("kind", "body", "names"), [
    ("start", {"id": "a", "term": 1, "release": "r1"}, "start: app: missing"),
    ("start", {"id": "a", "term": 1, "app": "x", "release": "r1", "count": 0}, "count:"),
    ("start", {"id": "a", "term": 1, "app": 5, "release": "r1"},
     "app: expected str, got int"),
    ("start", {"id": "a", "term": 1, "app": "x", "release": "r1", "colour": 1},
     "colour: unknown field"),
    ("stop", {"id": "a", "term": 1, "instances": []}, "instances:"),
    ("drain", {"id": "a", "term": 1, "instances": ["i"]}, "grace: missing"),
    ("drain", {"id": "a", "term": 1, "instances": ["i"], "grace": -1}, "grace:"),
    ("offline", {"id": "a", "term": 1, "offline": "yes"}, "offline: expected bool"),
    ("offline", {"term": 1, "offline": True}, "id: missing"),
    ("offline", {"id": "a", "offline": True}, "term: missing"),
    ("offline", {"id": "a", "term": "1", "offline": True}, "term: expected int, got str"),
    ("debug", {"id": "a", "term": 1, "app": "x"}, "enabled: missing"),
    ("debug", {"id": "a", "term": 1, "app": "x", "enabled": True, "ttl": 0}, "ttl:"),
    ("test", {"id": "a", "term": 1, "app": "x", "release": "r1", "timeout": 0}, "timeout:"),
    ("prepare", {"id": "a", "term": 1, "app": "x", "release": "r1", "sha256": "x"},
     "sha256:"),
])
def test_bad_signal_fields_are_a_400_naming_the_field(client: TestClient, service: FakeService,
                                                      kind: str, body: dict[str, Any],
                                                      names: str) -> None:
    """Missing, mistyped or out-of-range fields are refused and named."""
    response = signal(client, kind, body)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
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
    assert first.status_code == 200
    assert first.json() == {"app": "hello", "release": "r1", "build_log": "b.log",
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "removed_releases": [], "repeated": False}
    assert upload(client, data).json()["repeated"] is True
    assert service.calls == [("prepare", ("hello", "r1", data,
                                          hashlib.sha256(data).hexdigest()))]


def test_upload_checksum_mismatch_is_refused(client: TestClient, service: FakeService) -> None:
    """An archive that does not hash to the announced sha256 never reaches prepare."""
    response = upload(client, b"abc", sha="0" * 64)
    assert response.status_code == 400
    assert response.json()["error"] == "checksum_mismatch"
    assert upload(client, b"abc", sha="xyz").status_code == 400
    assert service.calls == []


def test_service_errors_keep_their_status_and_the_id_can_be_retried(
        client: TestClient, service: FakeService) -> None:
    """A build failure is a 422 naming app and release; the same id may be sent again."""
    service.fail = True
    failed = upload(client, b"data")
    assert failed.status_code == 422
    assert failed.json()["error"] == "build_failed"
    assert failed.json()["log"] == "boom"
    assert failed.json()["app"] == "hello" and failed.json()["release"] == "r1"
    retried = upload(client, b"data")
    assert retried.status_code == 200
    assert len(service.calls) == 2


def test_a_signal_whose_state_is_not_on_disk_is_answered_with_the_error(
        client: TestClient, service: FakeService) -> None:
    """The state a signal changed could not be written: a 500 saying so, not the result
    (the coordinator must not act on what a restarted agent would not know); a retry of
    the same id gets the result once the disk is back."""
    service.disk_full = True
    body = {"id": "sig-9", "term": 1, "app": "hello", "release": "r7", "count": 1}
    failed = signal(client, "start", body)
    assert failed.status_code == 500
    assert "No space left on device" in failed.json()["detail"]
    service.disk_full = False
    retried = signal(client, "start", body)
    assert retried.status_code == 200 and retried.json()["repeated"] is True


def test_status_and_logs(client: TestClient) -> None:
    """Status passes through; logs answer recent lines, and follow streams NDJSON."""
    assert client.get("/v1/status", headers=AUTH).json() == codec.encode(STATUS)
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



def test_every_answer_carries_the_protocol_version(client: TestClient) -> None:
    """Answers (errors included) name the participant's protocol version."""
    for response in (client.get("/v1/status", headers=AUTH),
                     signal(client, "reboot", {"id": "a", "term": 1})):
        assert response.headers[version.HEADER] == str(version.CURRENT)


def test_another_major_version_is_refused(client: TestClient, service: FakeService) -> None:
    """A request of protocol 2.x is refused naming both versions; nothing runs."""
    body = {"id": "a", "term": 1, "offline": True}
    response = signal(client, "offline", body, {**AUTH, version.HEADER: "2.0"})
    assert response.status_code == 400
    assert response.json()["error"] == "version_mismatch"
    assert "2.0" in response.json()["detail"]
    assert str(version.CURRENT) in response.json()["detail"]
    assert signal(client, "offline", body, {**AUTH, version.HEADER: "x"}).status_code == 400
    assert service.calls == []


def test_a_newer_minor_may_add_fields(client: TestClient, service: FakeService) -> None:
    """Fields unknown here are ignored from a newer minor version, refused otherwise."""
    body = {"id": "a", "term": 1, "offline": True, "reason": "maintenance"}
    newer = f"{version.CURRENT.major}.{version.CURRENT.minor + 1}"
    assert signal(client, "offline", body, {**AUTH, version.HEADER: newer}).status_code == 200
    same = {**AUTH, version.HEADER: str(version.CURRENT)}
    assert signal(client, "offline", {**body, "id": "b"}, same).status_code == 400
    assert service.calls == [("offline", True)]


def test_unknown_instance_is_a_code_not_a_class_name(client: TestClient) -> None:
    """The participant's UnknownInstance travels as the error code unknown_instance."""
    response = signal(client, "stop", {"id": "s", "term": 1, "instances": ["gone"]})
    assert response.status_code == 404
    assert response.json()["error"] == "unknown_instance"


# -- the coordinator's client against the same app, in memory ----------------------------

def in_memory(app: Any) -> ParticipantClient:
    transport = httpx.ASGITransport(app=app)
    return ParticipantClient(httpx.AsyncClient(transport=transport, headers=AUTH))


SIGNALS: list[msg.Signal[Any]] = [
    msg.Prepare(id="p", term=1, app="hello", release="r1", sha256="ab" * 32),
    msg.Test(id="t", term=1, app="hello", release="r1"),
    msg.Start(id="s", term=1, app="hello", release="r1", count=2),
    msg.Stop(id="x", term=1, instances=("hello@r1.0",)),
    msg.Switch(id="w", term=1, app="hello", instances=("hello@r1.1",)),
    msg.Drain(id="d", term=1, instances=("hello@r1.1",), grace=1.0),
    msg.Offline(id="o", term=1, offline=True),
    msg.Debug(id="g", term=1, app="hello", enabled=False),
]


async def test_client_round_trip_of_every_signal(service: FakeService) -> None:
    """Each JSON signal reaches its service call and comes back as its typed reply."""
    assert {type(s) for s in SIGNALS} == set(msg.SIGNALS.values())
    client = in_memory(rpc_app(service, secret=SECRET, ledger=SignalLedger()))
    for message in SIGNALS:
        reply = await client.signal("participant", message, timeout=5)
        assert isinstance(reply, message.REPLY) and not reply.repeated
        again = await client.signal("participant", message, timeout=5)
        assert again == dataclasses.replace(reply, repeated=True)
    assert [name for name, _ in service.calls] == [
        "prepare_artifact", "test", "start", "stop", "switch", "drain", "offline", "debug"]
    assert await client.status("participant") == STATUS
    logs = await client.logs("participant", msg.LogsQuery(app="hello", n=1))
    assert logs.lines == ({"text": "line 0", "app": "hello", "request_id": None},)
    data = b"tarball"
    upload_reply = await client.upload("participant", msg.Upload(
        id="u", term=1, app="hello", release="r2", sha256=hashlib.sha256(data).hexdigest()),
        data, timeout=5)
    assert upload_reply.release == "r2" and service.calls[-1][0] == "prepare"


async def test_client_raises_typed_refusals(service: FakeService) -> None:
    """Refusals come back as Refused with the error code; a stale term is STALE_TERM."""
    client = in_memory(rpc_app(service, secret=SECRET, ledger=SignalLedger()))
    with pytest.raises(Refused) as gone:
        await client.signal("participant", msg.Stop(id="a", term=5, instances=("gone",)),
                            timeout=5)
    assert gone.value.code is msg.ErrorCode.UNKNOWN_INSTANCE
    with pytest.raises(Refused) as stale:
        await client.signal("participant", msg.Offline(id="b", term=4, offline=True),
                            timeout=5)
    assert stale.value.code is msg.ErrorCode.STALE_TERM and stale.value.reply.status == 409


async def test_client_refuses_a_participant_of_another_major_version() -> None:
    """An answer stating protocol 2.0 raises VersionMismatch naming both versions."""
    async def newer(request: Any) -> Any:
        return JSONResponse(codec.encode(msg.OfflineReply(offline=True)),
                            headers={version.HEADER: "2.0"})

    client = in_memory(Starlette(routes=[Route("/v1/signals/offline", newer,
                                               methods=["POST"])]))
    with pytest.raises(VersionMismatch, match=rf"2\.0.*{version.CURRENT}"):
        await client.signal("participant", msg.Offline(id="o", term=1, offline=True),
                            timeout=5)


async def test_client_unreachable_participant() -> None:
    """A transport failure is Unreachable, naming the address."""
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = ParticipantClient(httpx.AsyncClient(transport=httpx.MockTransport(refuse)))
    with pytest.raises(Unreachable, match="n9:7000"):
        await client.status("n9:7000")


def test_error_codes_come_from_one_table() -> None:
    """The most specific class decides the code; the status hint and details travel along;
    an error that is not the participant's is left to the internal-error handler."""
    from superagent.participant import errors as e
    from superagent.participant.rpc import error_reply

    stale = error_reply(e.StaleTerm(4, 5))
    assert stale is not None and (stale.error, stale.status) == (msg.ErrorCode.STALE_TERM, 409)
    too_large = error_reply(e.ArchiveTooLarge("over budget", app="a", release="r1"))
    assert too_large is not None and too_large.error is msg.ErrorCode.ARCHIVE_TOO_LARGE
    assert (too_large.app, too_large.release, too_large.status) == ("a", "r1", 413)
    missing = error_reply(e.ArtifactUnavailable("ab" * 32, {"http://c1": "404 not found"}))
    assert missing is not None and missing.error is msg.ErrorCode.ARTIFACT_UNAVAILABLE
    assert missing.status == 404
    failed = error_reply(e.BuildFailed("build failed", log_path=None, tail="boom",
                                       returncode=1))
    assert failed is not None and failed.log == "boom"
    plain = error_reply(e.ParticipantError("something"))
    assert plain is not None and plain.error is msg.ErrorCode.INTERNAL
    assert error_reply(RuntimeError("bug")) is None
