"""Separate trust domains on real processes: 3 coordinators, 2 enrolled participants.

The coordinators run with their own secret only (no shared participant secret); the two
participants enrol with a join token made through the API and from then on use their own
credentials. The test checks, on every coordinator:

- a participant's credential is refused (403) on every endpoint but its own register,
  heartbeat and the artifacts of apps deployed to it, and refused (403) for an artifact of
  an app placed only on the other node;
- the Raft port drops a frame encrypted with anything a participant holds, and nothing of
  it is unpickled (``tests.support.raftport``);
- ``superagent nodes revoke`` makes its calls 401 everywhere, marks it down, and the next
  deploy leaves it out;
- enrolling with a bad, a used or an expired join token exits non-zero with a message
  that says which.

Every wait polls a condition under a deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from superagent.coordinator.api import ROUTES
from superagent.coordinator.raft import derive_password
from superagent.rpc.credentials import credential_hash, signal_key
from tests.coordinator.cluster import Cluster
from tests.coordinator.helpers import TEST_WATCH_WINDOW
from tests.e2e.fleet import (
    REQUEST_TIMEOUT,
    Fleet,
    kept_on_failure,
    leftovers,
    upload,
    wait_deploy_done,
    write_demo_app,
)
from tests.support.ports import free_ports
from tests.support.raftport import HANG_UP_WAIT, probe
from tests.support.wait import wait_until

REFUSED_ENROLMENT_TIMEOUT = 60.0  # the agent starts, asks, is refused and exits


def params_for(path: str, *, app: str, node: str, sha256: str) -> str:
    return (path.replace("{app}", app).replace("{deploy}", "no-such-deploy")
            .replace("{node}", node).replace("{action}", "drain")
            .replace("{sha256}", sha256))


def call(url: str, method: str, path: str, credential: str, **kw: Any) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=REQUEST_TIMEOUT) as http:
        return http.request(method, url + path,
                            headers={"authorization": f"Bearer {credential}"}, **kw)


def check_scope(cluster: Cluster, fleet: Fleet, credential: str, *, other: str,
                foreign_sha: str) -> None:
    """Every endpoint but the node's own refuses its credential with 403, on every member."""
    for member in cluster.members:
        for e in ROUTES:
            if e.auth == "none":
                continue
            path = params_for(e.path, app="trust-both", node=other, sha256=foreign_sha)
            body: dict[str, Any] = {"json": {"node": other, "address": "127.0.0.1:9"}}
            if e.method == "PUT":
                body = {"content": b"x"}
            elif e.method in ("GET", "DELETE", "HEAD"):
                body = {}
            r = call(member.url, e.method, path, credential, **body)
            assert r.status_code == 403, (member.id, e.method, path, r.status_code, r.text)


def enrol_fails(root: Path, coordinators: list[str], token: str, node: str) -> str:
    """Run a participant that enrols with ``token``; it must exit non-zero. Its stderr."""
    rpc, listen = free_ports(2)
    data = root / f"refused-{node}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERAGENT_")}
    done = subprocess.run(
        [sys.executable, "-m", "superagent", "participant", "--data-dir", str(data),
         "--rpc", f"127.0.0.1:{rpc}", "--listen", f"127.0.0.1:{listen}", "--node", node,
         "--proxy-workers", "1", "--coordinator", ",".join(coordinators),
         "--join-token", token, "--stop-on-exit"],
        capture_output=True, text=True, timeout=REFUSED_ENROLMENT_TIMEOUT, env=env)
    assert done.returncode != 0, done.stderr
    assert not (data / "credential").exists()
    return done.stderr


def cli(cluster: Cluster, *argv: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERAGENT_")}
    done = subprocess.run(
        [sys.executable, "-m", "superagent", *argv, "--server", cluster.members[0].url,
         "--token", cluster.token], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_participants_hold_their_own_credentials_and_nothing_more() -> None:
    """Scope, Raft port, artifact placement, revocation and bad join tokens (see above)."""
    with kept_on_failure("sa-e2e-trust-") as root:
        with Cluster(root / "coordinators", participant_secret=None,
                     watch_window=TEST_WATCH_WINDOW) as cluster, \
                Fleet(root, [m.url for m in cluster.members], secret=None) as fleet:
            cluster.start_all()
            leader = cluster.wait_ready()
            fleet.join_token = cluster.join_token(leader, uses=2)
            fleet.start_all()
            fleet.wait_joined(cluster, leader)
            urls = [m.url for m in cluster.members]
            n1, n2 = fleet.members
            cred1, cred2 = fleet.credential(0), fleet.credential(1)
            assert cred1 and cred2 and cred1 != cred2
            assert (n1.data_dir / "credential").stat().st_mode & 0o777 == 0o600

            # an app on both nodes, and one only on n2 (its group)
            r = cluster.post(leader, f"/api/v1/nodes/{n2.node}/groups",
                             json={"groups": ["default", "only2"]})
            assert r.status_code == 200, r.text
            both = upload(cluster, leader, write_demo_app(root / "both-1", name="trust-both",
                                                          version="1", per_node=1))
            assert wait_deploy_done(cluster, [leader], "trust-both",
                                    both["deploy_id"])["status"] == "succeeded"
            app2 = write_demo_app(root / "only2-1", name="trust-only2", version="1",
                                  per_node=1)
            toml = app2 / "superagent.toml"
            toml.write_text(toml.read_text().replace("[scale]\n",
                                                     '[scale]\ngroups = ["only2"]\n'))
            only2 = upload(cluster, leader, app2)
            record = wait_deploy_done(cluster, [leader], "trust-only2", only2["deploy_id"])
            assert record["status"] == "succeeded" and nodes_of(record) == [n2.node], record
            foreign_sha = only2["sha256"]

            # scope: own calls pass, everything else is 403, on every coordinator
            for url in urls:
                beat = call(url, "POST", f"/api/v1/nodes/{n1.node}/heartbeat", cred1,
                            json={"status": {}})
                assert beat.status_code == 200, beat.text
                reg = call(url, "POST", "/api/v1/nodes/register", cred1, json={
                    "node": n1.node, "address": f"127.0.0.1:{n1.rpc_port}",
                    "groups": ["default"]})
                assert reg.status_code == 200, reg.text
                own = call(url, "GET", f"/api/v1/artifacts/{both_sha(cluster, leader)}",
                           cred1)
                assert own.status_code == 200, own.text
                theirs = call(url, "GET", f"/api/v1/artifacts/{foreign_sha}", cred2)
                assert theirs.status_code == 200, theirs.text
                foreign = call(url, "GET", f"/api/v1/artifacts/{foreign_sha}", cred1)
                assert foreign.status_code == 403, foreign.text
            check_scope(cluster, fleet, cred1, other=n2.node, foreign_sha=foreign_sha)

            # the Raft port: nothing a participant holds gets a frame unpickled
            keys = [cred1, signal_key(cred1), credential_hash(cred1), fleet.join_token]
            for member in cluster.members:
                for index, key in enumerate(keys + [derive_password(k) for k in keys]):
                    marker = root / f"unpickled-{member.id}-{index}"
                    outcome = probe(f"127.0.0.1:{member.raft_port}", key, marker,
                                    kept_open=HANG_UP_WAIT)
                    assert outcome == "closed" and not marker.exists(), (member.id, index)

            # revoke n1 (the CLI): 401 everywhere, down, left out of the next deploy
            assert "revoked" in cli(cluster, "nodes", "revoke", n1.node)
            for url in urls:
                for method, path in (("POST", f"/api/v1/nodes/{n1.node}/heartbeat"),
                                     ("POST", "/api/v1/nodes/register"),
                                     ("GET", f"/api/v1/artifacts/{both_sha(cluster, 0)}"),
                                     ("GET", "/api/v1/apps")):
                    r = call(url, method, path, cred1, json={"node": n1.node})
                    assert r.status_code == 401, (url, path, r.text)
            for i in range(len(cluster.members)):
                wait_until(lambda i=i: not node_view(cluster, i, n1.node)["up"],
                           f"{n1.node} down on c{i + 1}")
            again = upload(cluster, leader, write_demo_app(root / "both-2", name="trust-both",
                                                           version="2", per_node=1))
            record = wait_deploy_done(cluster, [leader], "trust-both", again["deploy_id"])
            assert record["status"] == "succeeded" and nodes_of(record) == [n2.node], record
            assert "trust-both" in {i["app"] for i in fleet.status(1)["instances"]}
            assert fleet.rpc_headers(0)  # n1 still runs, but nothing was asked of it:
            n1_releases = {i["release"] for i in fleet.status(0)["instances"]
                           if i["app"] == "trust-both"}
            assert n1_releases == {"r1"}, n1_releases

            # bad, used and expired join tokens: a clear refusal and a non-zero exit
            assert "unknown or already used" in enrol_fails(root, urls, "sj_" + "x" * 43,
                                                            "bad-token-node")
            assert "unknown or already used" in enrol_fails(root, urls, fleet.join_token,
                                                            "used-token-node")
            out = cli(cluster, "nodes", "join-token", "--expires", "1s", "--json")

            doc = json.loads(out)
            wait_until(lambda: time.time() > doc["expires_at"] + 0.5, "the token expired")
            assert "expired" in enrol_fails(root, urls, doc["token"], "late-node")
        assert leftovers(root) == []


def nodes_of(record: dict[str, Any]) -> list[str]:
    return [step["node"] for step in record["steps"]]


def both_sha(cluster: Cluster, member: int) -> str:
    releases = cluster.get(member, "/api/v1/apps/trust-both/releases").json()["releases"]
    sha: str = releases[0]["sha256"]
    return sha


def node_view(cluster: Cluster, member: int, node: str) -> dict[str, Any]:
    doc: dict[str, Any] = cluster.get(member, f"/api/v1/nodes/{node}").json()
    return doc


