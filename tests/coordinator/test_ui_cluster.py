"""The dashboard's session on a 3-member cluster: a follower takes the cookie for reads it
forwards to the leader and for writes it turns into commands, and the leader reports each
member's Raft lag."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.coordinator.cluster import SECRET, Cluster
from tests.support.wait import wait_until


def test_a_session_on_a_follower_reads_and_writes_through_the_leader(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        cluster.start_all()
        leader = cluster.wait_ready()
        follower = next(i for i in range(3) if i != leader)
        registered = cluster.post(leader, "/api/v1/nodes/register",
                                  headers={"authorization": f"Bearer {SECRET}"},
                                  json={"node": "n1", "address": "127.0.0.1:9"})
        assert registered.status_code == 200, registered.text
        with httpx.Client(base_url=cluster.api(follower), timeout=30) as browser:
            login = browser.post("/ui/login", json={"token": cluster.token})
            assert login.status_code == 200, login.text
            csrf = browser.cookies["sa_csrf"]
            # answered by the leader (its heartbeats), the session's token passed on
            traffic = browser.get("/api/v1/traffic")
            assert traffic.status_code == 200, traffic.text
            running = browser.get("/api/v1/nodes/n1/running")
            assert running.status_code == 200 and running.json()["node"] == "n1"
            made = browser.post("/api/v1/apps", headers={"x-csrf-token": csrf},
                                json={"app": {"name": "from-ui"}, "run": {"command": "true"}})
            assert made.status_code == 201, made.text
            assert browser.get("/api/v1/apps/from-ui").status_code == 200
        audit = cluster.get(leader, "/api/v1/audit").json()["audit"]
        assert any(e["target"] == "app:from-ui" and e["actor"] == "admin" for e in audit)

        def lags() -> list[object] | None:
            members = cluster.get(leader, "/api/v1/cluster").json()["members"]
            found = [m["lag"] for m in members]
            return found if all(isinstance(lag, int) and lag <= 1 for lag in found) else None
        assert len(wait_until(lags, "every member's lag known on the leader")) == 3
