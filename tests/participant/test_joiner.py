"""The coordinator link: joining, heartbeats, failover, leader following, artifact fetches.

The pure parts (``Endpoints``, ``Backoff``, ``Reachability``, URL parsing) get synchronous
tests. The link itself talks over real loopback sockets to ``FakeCoordinator``: a small
Starlette app served by ``serve_app`` that records what it is sent and can answer 503,
forget nodes, serve (or corrupt) artifacts and name a leader. It stands in for the
coordinator; it is not what is under test. Waits are on conditions the fake signals, each
under a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from structlog.testing import capture_logs

from superagent.backoff import Backoff
from superagent.cli import main
from superagent.errors import ConfigError
from superagent.httpserver import serve_app
from superagent.participant.errors import (
    ArtifactUnavailable,
    ChecksumMismatch,
    EnrolmentRefused,
)
from superagent.participant.joiner import (
    BACKOFF_MAX,
    BACKOFF_START,
    CoordinatorLink,
    Endpoints,
    Reachability,
    parse_coordinator_urls,
)
from superagent.participant.service import Agent, AgentConfig
from superagent.rpc.credentials import (
    CREDENTIAL_FILE,
    credential_hash,
    read_credential,
    signal_key,
)
from tests.participant.test_agent import tarball
from tests.support.ports import free_port

SECRET = "joiner-test-secret"
DEADLINE = 20.0  # every wait here is for a loopback round trip or an agent's start-up
FAST = 0.02  # heartbeat interval in these tests: many heartbeats per wait


# --- the stand-in coordinator ----------------------------------------------------------------


class FakeCoordinator:
    """Records register/heartbeat calls; ``mode`` "ok" or "no_leader" (503 to everything);
    ``leader`` goes out in X-Superagent-Leader; ``blobs`` are served by sha256 as stored
    (store wrong bytes under a hash to serve a corrupt blob)."""

    def __init__(self) -> None:
        self.url = ""
        self.mode = "ok"
        self.leader: str | None = None
        self.known: set[str] = set()
        self.blobs: dict[str, bytes] = {}
        self.registers: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.refused = 0  # 503s answered
        self.unknown = 0  # heartbeats answered 404 UnknownNode
        self.fetches: list[str] = []
        self.auth: set[str] = set()
        self.enrolments: list[tuple[str, dict[str, Any]]] = []  # (authorization, body)
        self.enrol_answers: list[tuple[int, dict[str, Any]]] = []  # then 200 ok
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return (f"<FakeCoordinator {self.url} mode={self.mode} registers={len(self.registers)}"
                f" heartbeats={len(self.heartbeats)} refused={self.refused}>")

    def _note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        with trio.fail_after(DEADLINE):
            while not predicate():
                await self._changed.wait()

    def _answer(self, body: dict[str, Any], status: int = 200) -> Response:
        headers = {"X-Superagent-Leader": self.leader} if self.leader else {}
        return JSONResponse(body, status_code=status, headers=headers)

    async def register(self, request: Request) -> Response:
        self.auth.add(request.headers.get("authorization", ""))
        if self.mode == "no_leader":
            self.refused += 1
            self._note()
            return self._answer({"error": "NoLeader", "detail": "election"}, 503)
        body = await request.json()
        created = body["node"] not in self.known
        self.known.add(body["node"])
        self.registers.append(body)
        self._note()
        return self._answer({"ok": True, "node": body["node"], "created": created})

    async def heartbeat(self, request: Request) -> Response:
        node = request.path_params["node"]
        if self.mode == "revoked":
            self.refused += 1
            self._note()
            return self._answer({"error": "node_revoked", "detail": "revoked"}, 401)
        if self.mode == "no_leader":
            self.refused += 1
            self._note()
            return self._answer({"error": "NoLeader", "detail": "election"}, 503)
        if node not in self.known:
            self.unknown += 1
            self._note()
            return self._answer({"error": "unknown_node", "detail": node}, 404)
        self.heartbeats.append({"node": node, **await request.json()})
        self._note()
        return self._answer({"ok": True})

    async def artifact(self, request: Request) -> Response:
        sha256 = request.path_params["sha256"]
        self.fetches.append(sha256)
        self._note()
        if sha256 not in self.blobs:
            return self._answer({"error": "UnknownArtifact", "detail": sha256}, 404)
        return Response(self.blobs[sha256], media_type="application/octet-stream")

    async def enrol(self, request: Request) -> Response:
        self.enrolments.append((request.headers.get("authorization", ""),
                                await request.json()))
        self._note()
        status, body = self.enrol_answers.pop(0) if self.enrol_answers else (200, {"ok": True})
        return self._answer(body, status)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/api/v1/nodes/enrol", self.enrol, methods=["POST"]),
            Route("/api/v1/nodes/register", self.register, methods=["POST"]),
            Route("/api/v1/nodes/{node}/heartbeat", self.heartbeat, methods=["POST"]),
            Route("/api/v1/artifacts/{sha256}", self.artifact, methods=["GET"]),
        ])


@asynccontextmanager
async def coordinators(n: int) -> AsyncIterator[list[FakeCoordinator]]:
    """``n`` fake coordinators, each on its own loopback port."""
    fakes = [FakeCoordinator() for _ in range(n)]
    async with trio.open_nursery() as nursery:
        for fake in fakes:
            port = free_port()
            fake.url = f"http://127.0.0.1:{port}"
            await nursery.start(serve_app, fake.app(), ("127.0.0.1", port))
        yield fakes
        nursery.cancel_scope.cancel()


def dead_url() -> str:
    """A loopback URL nothing listens on: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


def make_link(urls: list[str], **overrides: Any) -> CoordinatorLink:
    options: dict[str, Any] = {
        "secret": SECRET, "node": "n1", "address": "10.0.0.5:7001", "groups": ["default", "gpu"],
        "capacity": 7, "status": lambda: {"instances": [], "offline": False},
        "interval": FAST, "request_timeout": 2.0}
    options.update(overrides)
    return CoordinatorLink(urls, **options)


@asynccontextmanager
async def running(link: CoordinatorLink) -> AsyncIterator[CoordinatorLink]:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(DEADLINE):
            await nursery.start(link.run)
        yield link
        nursery.cancel_scope.cancel()


# --- pure parts ------------------------------------------------------------------------------


def test_urls_are_parsed_normalised_and_deduplicated() -> None:
    """Comma-separated and repeated URLs, trailing slashes dropped, duplicates once."""
    assert parse_coordinator_urls(["http://a:7100/,https://b:7100", "http://a:7100"]) == (
        "http://a:7100", "https://b:7100")


@pytest.mark.parametrize("bad", ["ftp://a:1", "a:7100", "http://", "http://a:99999",
                                 "http://a:1/?x=1", "http://u:p@a:1", ","])
def test_bad_urls_are_refused_naming_the_url(bad: str) -> None:
    """Anything but an http(s) URL with a host is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="--coordinator"):
        parse_coordinator_urls([bad])


def test_endpoints_prefer_the_named_leader_then_the_configured_order() -> None:
    """A named leader goes first; when it fails the configured order is back."""
    ends = Endpoints(["http://a", "http://b", "http://c"])
    assert ends.order() == ["http://a", "http://b", "http://c"]
    ends.answered("http://b", None)
    assert ends.order() == ["http://b", "http://a", "http://c"]
    ends.answered("http://b", "http://c/")
    assert ends.first == "http://c"
    ends.failed("http://c")
    assert ends.order() == ["http://a", "http://b", "http://c"]
    ends.answered("http://a", "not a url")
    assert ends.first == "http://a"


def test_a_round_follows_a_leader_named_midway_and_tries_each_url_once() -> None:
    """walk() recomputes the order after each URL, never repeating one."""
    ends = Endpoints(["http://a", "http://b", "http://c"])
    seen = []
    for url in ends.walk():
        seen.append(url)
        if url == "http://a":
            ends.answered(url, "http://c")  # a names c the leader
        else:
            ends.failed(url)
    assert seen == ["http://a", "http://c", "http://b"]


def test_backoff_doubles_to_its_limit_and_resets() -> None:
    """0.2, 0.4, ... capped at 5 s; reset starts over."""
    backoff = Backoff(BACKOFF_START, BACKOFF_MAX)
    assert [backoff.next() for _ in range(7)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    backoff.reset()
    assert backoff.next() == 0.2


def test_reachability_reports_each_outage_once() -> None:
    """One event when an outage starts and one when it ends; none per attempt."""
    state = Reachability()
    assert state.failed() == "no coordinator reachable yet; retrying"
    assert state.failed() is None
    assert state.succeeded() == "joined coordinator"
    assert state.succeeded() is None
    assert state.failed() == "coordinator unreachable; retrying"
    assert [state.failed(), state.failed()] == [None, None]
    assert state.succeeded() == "coordinator reachable again"


# --- membership ------------------------------------------------------------------------------


async def test_registers_then_heartbeats_the_status() -> None:
    """The node registers with its address, groups and capacity, then heartbeats what
    ``status`` returns, with the cluster secret."""
    calls = 0

    def status() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"instances": [{"id": "x", "app": "hello"}], "n": calls}

    async with coordinators(1) as [fake], running(make_link([fake.url], status=status)) as link:
        await fake.wait_until(lambda: len(fake.heartbeats) >= 3)
        assert fake.registers == [{"node": "n1", "address": "10.0.0.5:7001",
                                   "groups": ["default", "gpu"], "capacity": 7}]
        assert fake.heartbeats[0]["node"] == "n1"
        assert fake.heartbeats[0]["status"]["instances"] == [{"id": "x", "app": "hello"}]
        assert fake.auth == {f"Bearer {SECRET}"}
        assert link.reachability.joined and link.leader_url == fake.url


async def test_a_forgotten_node_registers_again_and_carries_on() -> None:
    """A heartbeat answered 404 UnknownNode leads to a new registration, then heartbeats."""
    async with coordinators(1) as [fake], running(make_link([fake.url])) as link:
        await fake.wait_until(lambda: len(fake.heartbeats) >= 1)
        fake.known.clear()  # the cluster lost its node table
        before = len(fake.heartbeats)
        await fake.wait_until(lambda: len(fake.registers) == 2
                              and len(fake.heartbeats) >= before + 2)
        assert fake.unknown >= 1 and link.registrations == 2


async def test_a_dead_url_is_skipped_for_a_live_one() -> None:
    """With the first configured coordinator down, the node joins through the second
    and keeps heartbeating there."""
    async with coordinators(1) as [live], running(make_link([dead_url(), live.url])) as link:
        await live.wait_until(lambda: len(live.heartbeats) >= 3)
        assert link.leader_url == live.url


async def test_the_leader_named_in_the_header_gets_the_next_requests() -> None:
    """A follower answers and names the leader; the heartbeats then go to the leader."""
    async with coordinators(2) as [follower, leader]:
        follower.leader = leader.url
        leader.leader = leader.url
        leader.known.add("n1")  # followers forward registrations to the leader
        async with running(make_link([follower.url])) as link:
            await leader.wait_until(lambda: len(leader.heartbeats) >= 3)
            assert len(follower.registers) == 1 and follower.heartbeats == []
            assert link.leader_url == leader.url


async def test_an_election_is_waited_out_with_one_warning() -> None:
    """The agent starts while the cluster has no leader (503 NoLeader): run() reports
    started at once, retries with backoff, warns once, and joins when a leader exists."""
    async with coordinators(1) as [fake]:
        fake.mode = "no_leader"
        with capture_logs() as logs:
            async with running(make_link([fake.url])):
                await fake.wait_until(lambda: fake.refused >= 3)
                fake.mode = "ok"
                await fake.wait_until(lambda: len(fake.heartbeats) >= 1)
                fake.mode = "no_leader"  # a second outage
                refused = fake.refused
                await fake.wait_until(lambda: fake.refused >= refused + 3)
                fake.mode = "ok"
                beats = len(fake.heartbeats)
                # a link sends a heartbeat only after it handled the previous answer
                await fake.wait_until(lambda: len(fake.heartbeats) > beats + 1)
    events = [(e["log_level"], e["event"]) for e in logs
              if e["log_level"] in ("warning", "info")]
    assert events == [("warning", "no coordinator reachable yet; retrying"),
                      ("info", "joined coordinator"),
                      ("warning", "coordinator unreachable; retrying"),
                      ("info", "coordinator reachable again")]


async def test_no_coordinator_at_all_does_not_block_or_crash() -> None:
    """Every URL dead: run() has started and keeps retrying without raising."""
    link = make_link([dead_url(), dead_url()])
    async with running(link):
        with trio.fail_after(DEADLINE):
            while not link.reachability.down:
                await trio.sleep(FAST)  # polls the link's own flag, bounded above
        assert not link.reachability.joined


# --- artifacts -------------------------------------------------------------------------------


async def test_fetch_streams_the_blob_into_place(data_dir: Path) -> None:
    """A known blob lands at dest with the right bytes and nothing beside it."""
    blob = os.urandom(300_000)
    sha = hashlib.sha256(blob).hexdigest()
    async with coordinators(1) as [fake]:
        fake.blobs[sha] = blob
        dest = data_dir / "a.tar"
        assert await make_link([fake.url]).fetch_artifact(sha, dest) == dest
    assert dest.read_bytes() == blob
    assert [p.name for p in data_dir.iterdir()] == ["a.tar"]


async def test_a_corrupt_blob_is_refused_and_nothing_is_left(data_dir: Path) -> None:
    """Bytes that do not hash to the name are deleted; the error names hash and URL."""
    blob = b"the real archive"
    sha = hashlib.sha256(blob).hexdigest()
    async with coordinators(1) as [fake]:
        fake.blobs[sha] = b"tampered archive"
        with pytest.raises(ArtifactUnavailable) as caught:
            await make_link([fake.url]).fetch_artifact(sha, data_dir / "a.tar")
    assert list(data_dir.iterdir()) == []
    assert sha in str(caught.value) and fake.url in str(caught.value)
    assert "mismatch" in caught.value.tried[fake.url]
    assert caught.value.status_hint == 503


async def test_fetch_asks_the_leader_first_then_the_others(data_dir: Path) -> None:
    """The leader is asked first; a corrupt copy there is skipped for an intact one."""
    blob = b"archive bytes"
    sha = hashlib.sha256(blob).hexdigest()
    async with coordinators(3) as [a, b, c]:
        b.blobs[sha] = b"corrupt"
        c.blobs[sha] = blob
        link = make_link([a.url, c.url, b.url])
        link.endpoints.answered(a.url, b.url)  # as if a had named b the leader
        await link.fetch_artifact(sha, data_dir / "x")
        assert (b.fetches, a.fetches, c.fetches) == ([sha], [sha], [sha])
    assert (data_dir / "x").read_bytes() == blob


async def test_an_unknown_artifact_is_a_404_naming_every_url(data_dir: Path) -> None:
    """When every coordinator answers 404 the error says so (404) and names each URL."""
    sha = "ab" * 32
    async with coordinators(2) as [a, b]:
        with pytest.raises(ArtifactUnavailable) as caught:
            await make_link([a.url, b.url]).fetch_artifact(sha, data_dir / "x")
    assert caught.value.status_hint == 404
    assert set(caught.value.tried) == {a.url, b.url}
    assert list(data_dir.iterdir()) == []
    dead = dead_url()
    with pytest.raises(ArtifactUnavailable) as down:
        await make_link([dead]).fetch_artifact(sha, data_dir / "x")
    assert down.value.status_hint == 503 and dead in str(down.value)


async def test_a_malformed_hash_is_refused_before_any_request(data_dir: Path) -> None:
    """Not 64 hex digits: ChecksumMismatch (400), no request, no file."""
    async with coordinators(1) as [fake]:
        with pytest.raises(ChecksumMismatch):
            await make_link([fake.url]).fetch_artifact("../../etc/passwd", data_dir / "x")
    assert fake.fetches == [] and list(data_dir.iterdir()) == []


# --- the agent -------------------------------------------------------------------------------


def hello_app() -> bytes:
    return tarball({"superagent.toml": '[app]\nname = "hello"\n[run]\ncommand = "true"\n',
                    "app.py": "print('hi')\n"})


@asynccontextmanager
async def agent_running(data_dir: Path, coordinator: tuple[str, ...]
                        ) -> AsyncIterator[tuple[Agent, httpx.AsyncClient]]:
    rpc_port = free_port()
    agent = Agent(AgentConfig(data_dir=data_dir, secret=SECRET, rpc=("127.0.0.1", rpc_port),
                              listen=(f"127.0.0.1:{free_port()}",), proxy_workers=1,
                              coordinator=coordinator, advertise=f"10.1.2.3:{rpc_port}",
                              heartbeat_interval=FAST, node="agent-1", groups=("web",)))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(DEADLINE):
            await nursery.start(agent.run)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{rpc_port}",
                                     headers={"Authorization": f"Bearer {SECRET}"},
                                     timeout=DEADLINE) as rpc:
            try:
                yield agent, rpc
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(DEADLINE):
                    await agent.stop_all()
                nursery.cancel_scope.cancel()


async def test_prepare_signal_fetches_from_the_coordinator(data_dir: Path) -> None:
    """The agent joins, then a prepare signal fetches the tarball from the coordinator,
    builds the release and leaves no download behind; a repeat is answered from the
    ledger, a stale term is refused."""
    data = hello_app()
    sha = hashlib.sha256(data).hexdigest()
    async with coordinators(1) as [fake]:
        fake.blobs[sha] = data
        async with agent_running(data_dir, (fake.url,)) as (agent, rpc):
            await fake.wait_until(lambda: len(fake.heartbeats) >= 1)
            assert fake.registers[0] == {"node": "agent-1", "address": agent.config.advertise,
                                         "groups": ["web"], "capacity": 100}
            status = fake.heartbeats[0]["status"]
            assert {"instances", "routes", "offline", "figures"} <= set(status)
            assert agent.link is not None and agent.link.leader_url == fake.url

            body = {"id": "p1", "term": 2, "app": "hello", "release": "r1", "sha256": sha}
            answer = await rpc.post("/v1/signals/prepare", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["sha256"] == sha and answer.json()["release"] == "r1"
            assert agent.store.get("hello", "r1").sha256 == sha
            assert list((data_dir / "downloads").iterdir()) == []
            again = await rpc.post("/v1/signals/prepare", json=body)
            assert again.json()["repeated"] is True and fake.fetches == [sha]
            # a new id for a release already prepared from that archive: no download
            fresh = await rpc.post("/v1/signals/prepare", json={**body, "id": "p2"})
            assert fresh.status_code == 200 and fake.fetches == [sha]

            missing = await rpc.post("/v1/signals/prepare", json={
                **body, "id": "p3", "release": "r2", "sha256": "cd" * 32})
            assert missing.status_code == 404, missing.text
            assert missing.json()["error"] == "artifact_unavailable"
            assert "cd" * 32 in missing.json()["detail"]
            bad = await rpc.post("/v1/signals/prepare", json={**body, "id": "p4",
                                                                "sha256": "xyz"})
            assert bad.status_code == 400 and "sha256:" in bad.json()["detail"]
            stale = await rpc.post("/v1/signals/prepare", json={**body, "id": "p5",
                                                                  "term": 1})
            assert stale.status_code == 409 and stale.json()["error"] == "stale_term"
            assert list((data_dir / "downloads").iterdir()) == []


async def test_prepare_signal_without_a_coordinator_is_a_clear_409(data_dir: Path) -> None:
    """An agent started without --coordinator refuses to fetch, saying why."""
    async with agent_running(data_dir, ()) as (agent, rpc):
        assert agent.link is None
        answer = await rpc.post("/v1/signals/prepare", json={
            "id": "p1", "term": 1, "app": "hello", "release": "r1", "sha256": "ab" * 32})
    assert answer.status_code == 409
    assert answer.json()["error"] == "no_coordinator"
    assert "--coordinator" in answer.json()["detail"]


# --- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--coordinator", "ftp://x:1"], "'ftp://x:1' is not a coordinator URL"),
    (["--coordinator", "http://a:1,nonsense"], "'nonsense' is not a coordinator URL"),
    (["--coordinator", "http://a:1", "--rpc", "0.0.0.0:7001"], "give --advertise"),
    (["--coordinator", "http://a:1", "--advertise", "0.0.0.0:7001"], "not a wildcard"),
    (["--coordinator", "http://a:1", "--advertise", "host"], "--advertise"),
    (["--group", "web,Web"], "--group: 'Web' is not a valid group name"),
    (["--group", "g" * 41], "1-40 lower-case letters"),
])
def test_cli_refuses_bad_coordinator_options(args: list[str], message: str,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Bad URLs or an unreachable advertised address: one line, exit status 2."""
    monkeypatch.setenv("SUPERAGENT_SECRET", SECRET)
    monkeypatch.setattr("superagent.cli.setup_logging", lambda level: None)
    assert main(["participant", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("args", "message"), [
    ([], "no credential yet: give --join-token"),
    (["--join-token", "sa_admin-token-by-mistake"], "must start with 'sj_'"),
])
def test_cli_needs_a_join_token_until_enrolled(args: list[str], message: str,
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Without a credential, a join token or the legacy secret: one line, exit status 2."""
    monkeypatch.delenv("SUPERAGENT_SECRET", raising=False)
    monkeypatch.delenv("SUPERAGENT_JOIN_TOKEN", raising=False)
    monkeypatch.setattr("superagent.cli.setup_logging", lambda level: None)
    assert main(["participant", "--data-dir", str(tmp_path), "--coordinator",
                 "http://127.0.0.1:1", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_builds_the_agent_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """--coordinator, --group (comma-separated too), --capacity and --advertise reach
    AgentConfig; --advertise defaults to the --rpc address."""
    seen: list[AgentConfig] = []

    class Stop(Exception):
        pass

    def capture(config: AgentConfig) -> None:
        seen.append(config)
        raise Stop

    monkeypatch.setenv("SUPERAGENT_SECRET", SECRET)
    monkeypatch.setattr("superagent.cli.setup_logging", lambda level: None)
    monkeypatch.setattr("superagent.participant.service.Agent", capture)
    with pytest.raises(Stop):
        main(["participant", "--coordinator", "http://a:7100/,http://b:7100",
              "--coordinator", "http://c:7100", "--group", "web,gpu", "--group", "eu",
              "--capacity", "12", "--rpc", "10.0.0.9:7001"])
    with pytest.raises(Stop):
        main(["participant", "--coordinator", "http://a:7100", "--rpc", "0.0.0.0:7001",
              "--advertise", "10.0.0.9:7002"])
    first, second = seen
    assert first.coordinator == ("http://a:7100", "http://b:7100", "http://c:7100")
    assert first.groups == ("web", "gpu", "eu") and first.capacity == 12
    assert first.advertise is None and first.rpc == ("10.0.0.9", 7001)
    assert second.advertise == "10.0.0.9:7002"
    assert json.dumps(second.coordinator) == '["http://a:7100"]'


# --- enrolment -------------------------------------------------------------------------------

JOIN = "sj_" + "j" * 43


async def test_a_new_machine_enrols_once_and_then_uses_its_own_credential(
        data_dir: Path) -> None:
    """The join token is the bearer of the enrolment only; the credential (0600 in the data
    dir) of everything after it; the cluster gets its hash and signal key, never itself."""
    file = data_dir / CREDENTIAL_FILE
    async with coordinators(1) as [fake]:
        link = make_link([fake.url], secret="", join_token=JOIN, credential_file=file)
        with trio.fail_after(DEADLINE):
            await link.enrol()
        credential = read_credential(file)
        assert credential is not None and link.credential == credential
        assert file.stat().st_mode & 0o777 == 0o600
        [(auth, body)] = fake.enrolments
        assert auth == f"Bearer {JOIN}"
        assert body == {"node": "n1", "credential_sha256": credential_hash(credential),
                        "signal_key": signal_key(credential)}
        async with running(link):
            await fake.wait_until(lambda: len(fake.heartbeats) >= 1)
        assert fake.auth == {f"Bearer {credential}"}
        again = make_link([fake.url], secret="", join_token=JOIN, credential_file=file)
        assert not again.needs_enrolment and again.credential == credential


async def test_an_enrolment_retried_after_a_lost_answer_sends_the_same_credential(
        data_dir: Path) -> None:
    """A 503 (no leader) is retried with the same values, so the cluster answers the
    repeat instead of spending the token twice."""
    async with coordinators(1) as [fake]:
        fake.enrol_answers = [(503, {"error": "no_leader", "detail": "election"})]
        link = make_link([fake.url], secret="", join_token=JOIN,
                         credential_file=data_dir / CREDENTIAL_FILE)
        with trio.fail_after(DEADLINE):
            await link.enrol()
        first, second = fake.enrolments
        assert first == second


async def test_a_refused_join_token_is_an_error_naming_why(data_dir: Path) -> None:
    """401 join_refused: EnrolmentRefused with the coordinator's detail; no credential."""
    file = data_dir / CREDENTIAL_FILE
    async with coordinators(1) as [fake]:
        fake.enrol_answers = [(401, {"error": "join_refused",
                                     "detail": "the join token has expired"})]
        link = make_link([fake.url], secret="", join_token=JOIN, credential_file=file)
        with trio.fail_after(DEADLINE), pytest.raises(EnrolmentRefused, match="expired"):
            await link.enrol()
        assert not file.exists() and link.credential is None


def test_a_link_without_any_credential_is_refused() -> None:
    with pytest.raises(ConfigError, match="join token"):
        make_link(["http://127.0.0.1:1"], secret="")


async def test_a_revoked_machine_says_so_once_and_keeps_trying() -> None:
    """Heartbeats answered 401: one warning that names the credential (not an outage),
    retried with backoff; when the cluster accepts it again, it carries on."""
    async with coordinators(1) as [fake]:
        with capture_logs() as logs:
            async with running(make_link([fake.url])):
                await fake.wait_until(lambda: len(fake.heartbeats) >= 1)
                fake.mode = "revoked"
                await fake.wait_until(lambda: fake.refused >= 3)
                fake.mode = "ok"
                beats = len(fake.heartbeats)
                await fake.wait_until(lambda: len(fake.heartbeats) > beats)
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and "refuses this machine's credential" in warnings[0], warnings
