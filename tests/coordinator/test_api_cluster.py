"""The membership routes on real coordinators: bad input is a 400 naming it, and a
removal that is refused changes nothing (not even who leads)."""

from __future__ import annotations

from pathlib import Path

from tests.coordinator import test_api
from tests.coordinator.cluster import Cluster
from tests.coordinator.test_api import MANIFEST, Api, tarball
from tests.coordinator.test_backup import META, tar_of
from tests.support.wait import wait_until

api = test_api.api  # the fixture: a real single-node coordinator


async def test_adding_a_coordinator_at_an_impossible_port_is_a_400(api: Api) -> None:
    """A Raft address whose port no socket can have is bad input, named as such (not a
    refusal for want of a majority, nor a member no one can ever reach)."""
    answer = await api.call("POST", "/api/v1/cluster/members",
                            json={"id": "c9", "raft": "127.0.0.1:99999"})
    assert answer.status_code == 400, answer.text
    assert "99999" in answer.json()["detail"]


def test_a_refused_removal_of_the_leader_keeps_it_leading(tmp_path: Path) -> None:
    """Removing the leader of three while another member is down would leave 1 live of 2:
    the leader refuses at once (409), without first handing its leadership over to the
    one follower left (an election for nothing, and a cluster briefly without a leader)."""
    with Cluster(tmp_path) as cluster:
        cluster.start_all()
        leader = cluster.wait_ready()
        down, other = (i for i in range(3) if i != leader)
        cluster.kill9(down)
        gone = cluster.members[down].id
        wait_until(lambda: not next(m["connected"] for m in cluster.cluster_view(leader)
                                    ["members"] if m["id"] == gone),
                   f"the leader sees {gone} gone", timeout=10.0)
        refused = cluster.request("DELETE", leader,
                                  f"/api/v1/cluster/members/{cluster.members[leader].id}")
        assert refused.status_code == 409, refused.text
        assert "1 live of 2" in refused.json()["detail"]
        assert cluster.health(leader) is not None
        assert cluster.leader(among=[leader, other]) == leader


async def test_adding_a_coordinator_at_an_impossible_host_is_a_400(api: Api) -> None:
    """A host name no resolver takes (a label over 63 characters) is named as bad input,
    not an internal error from probing it."""
    answer = await api.call("POST", "/api/v1/cluster/members",
                            json={"id": "c9", "raft": "a" * 70 + ":7110"})
    assert answer.status_code == 400, answer.text
    assert "not an IP address or" in answer.json()["detail"]


async def test_a_backup_nested_past_the_parsers_limit_is_a_400(api: Api) -> None:
    """A state.json of nested brackets is a bad backup (400 naming the member), not a
    500 from the JSON parser's recursion limit."""
    body = tar_of({"backup.json": META, "state.json": b"[" * 200_000})
    answer = await api.call("POST", "/api/v1/restore", content=body,
                            headers={"content-type": "application/x-tar"})
    assert answer.status_code == 400, answer.text
    assert "state.json" in answer.json()["detail"]


async def test_a_backup_missing_a_blob_everywhere_is_a_503_naming_it(api: Api) -> None:
    """A release whose blob no coordinator holds (lost disk, peers down) makes the backup
    impossible for now: 503 naming the artifact, not a 404 as if the route were unknown."""
    body = tarball({"superagent.toml": MANIFEST, "app.py": b"print('hi')\n"})
    uploaded = await api.call("POST", "/api/v1/apps/hello/releases?deploy=false", content=body)
    assert uploaded.status_code == 201, uploaded.text
    sha256 = uploaded.json()["sha256"]
    api.coordinator.store.path(sha256).unlink()
    answer = await api.call("GET", "/api/v1/backup")
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"] == "artifact_unavailable"
    assert sha256 in answer.json()["detail"]
