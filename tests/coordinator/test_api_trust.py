"""The API of machine trust on a real single-node coordinator, in a migrating cluster:
its own secret, plus the legacy participant secret that enrolled nodes may not use."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from superagent.coordinator.service import Coordinator, CoordinatorConfig
from superagent.rpc.credentials import credential_hash, new_credential, signal_key
from tests.coordinator.helpers import FAST_ELECTION
from tests.coordinator.test_api import Api
from tests.support.ports import free_port
from tests.support.wait import wait_until_async

OWN = "coordinators-only-secret"
SHARED = "legacy-participant-secret"


@pytest.fixture
async def api(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Api]:
    config = CoordinatorConfig(
        id="c1", peers={"c1": f"127.0.0.1:{free_port()}"}, api=("127.0.0.1", free_port()),
        data_dir=tmp_path / "c1", secret=OWN, participant_secret=SHARED,
        admin_token_file=tmp_path / "token", node_timeout=1.0, election_timeout=FAST_ELECTION)
    coordinator = Coordinator(config)
    await nursery.start(coordinator.run)
    token_file = tmp_path / "token"
    await wait_until_async(token_file.exists, "the admin token file", timeout=10.0)
    async with httpx.AsyncClient(timeout=10.0) as http:
        yield Api(coordinator, http, token_file.read_text().strip())
    nursery.cancel_scope.cancel()


async def enrol(api: Api, node: str, token: str, credential: str) -> httpx.Response:
    return await api.call("POST", "/api/v1/nodes/enrol", token=token, json={
        "node": node, "credential_sha256": credential_hash(credential),
        "signal_key": signal_key(credential)})


async def join_token(api: Api, **body: Any) -> str:
    made = await api.call("POST", "/api/v1/nodes/join-tokens", json=body)
    assert made.status_code == 201, made.text
    token: str = made.json()["token"]
    return token


async def test_a_made_up_join_token_never_reaches_the_raft_log(api: Api) -> None:
    """401 join_refused, and the commit index did not move."""
    before = api.coordinator.raft.status()["commit_index"]
    refused = await enrol(api, "n1", "sj_made-up", new_credential())
    assert refused.status_code == 401 and refused.json()["error"] == "join_refused"
    assert api.coordinator.raft.status()["commit_index"] == before


async def test_the_shared_secret_no_longer_speaks_for_an_enrolled_node(api: Api) -> None:
    """Before enrolment the legacy secret registers the node; after it, 403 for that node
    (register and heartbeat), while another node not enrolled yet still may."""
    register = {"node": "n1", "address": "127.0.0.1:9", "groups": ["default"]}
    assert (await api.call("POST", "/api/v1/nodes/register", token=SHARED,
                           json=register)).status_code == 200
    view = await api.call("GET", "/api/v1/nodes/n1")
    assert view.json()["credential"] == "shared secret"
    credential = new_credential()
    assert (await enrol(api, "n1", await join_token(api, node="n1"), credential)
            ).status_code == 200
    for path, body in (("/api/v1/nodes/register", register),
                       ("/api/v1/nodes/n1/heartbeat", {})):
        refused = await api.call("POST", path, token=SHARED, json=body)
        assert refused.status_code == 403, refused.text
        own = await api.call("POST", path, token=credential, json=body)
        assert own.status_code == 200, own.text
    assert (await api.call("GET", "/api/v1/nodes/n1")).json()["credential"] == "enrolled"
    other = {"node": "n2", "address": "127.0.0.1:10", "groups": ["default"]}
    assert (await api.call("POST", "/api/v1/nodes/register", token=SHARED,
                           json=other)).status_code == 200


async def test_neither_shared_secret_nor_credential_reaches_peer_endpoints(api: Api) -> None:
    """/api/v1/internal/* takes the coordinators' secret only."""
    credential = new_credential()
    await enrol(api, "n1", await join_token(api), credential)
    for token, status in ((SHARED, 401), (credential, 403), (api.token, 401)):
        r = await api.call("POST", "/api/v1/internal/propose", token=token, content=b"{}")
        assert r.status_code == status, (token, r.text)
    ok = await api.call("POST", "/api/v1/internal/propose", token=OWN, content=b"{}")
    assert ok.status_code == 400  # past the gate: the command itself is refused


async def test_join_token_options_are_checked(api: Api) -> None:
    for body, word in (({"expires": "forever"}, "expires"), ({"expires": "1000h"}, "at most"),
                       ({"uses": -1}, "uses"), ({"node": "bad name"}, "node")):
        r = await api.call("POST", "/api/v1/nodes/join-tokens", json=body)
        assert r.status_code == 400 and word in r.text, (body, r.text)
    r = await api.call("POST", "/api/v1/nodes/join-tokens", token=SHARED, json={})
    assert r.status_code == 401


async def test_revoke_an_unknown_node_is_a_404(api: Api) -> None:
    r = await api.call("POST", "/api/v1/nodes/ghost/revoke", json={})
    assert r.status_code == 404 and r.json()["error"] == "unknown_node"
