"""A cluster that shared one secret moves to machine credentials in place (real processes).

Three coordinators in the migration's middle step (their own secret, plus the old shared
one accepted from participants) and a participant still on the shared secret: it joins and
takes a deploy (signals bear the shared secret). It is then restarted with a join token
issued for its node (and without the shared secret): it enrols, the node view says so, the
shared secret no longer speaks for it (403 from the coordinators, 401 from its RPC), and
the next deploy reaches it, so the coordinators' signals bore its own signal key.
"""

from __future__ import annotations

import pytest

from tests.coordinator.cluster import SECRET, Cluster
from tests.coordinator.helpers import TEST_WATCH_WINDOW
from tests.e2e.fleet import (
    Fleet,
    kept_on_failure,
    leftovers,
    upload,
    wait_deploy_done,
    write_demo_app,
)
from tests.support.wait import wait_until

APP = "migrating"


@pytest.mark.slow
def test_a_shared_secret_participant_enrols_in_place() -> None:
    """Legacy join and deploy, then enrolment with a node-bound token and a deploy again."""
    with kept_on_failure("sa-e2e-migrate-") as root:
        with Cluster(root / "coordinators", participant_secret=SECRET,
                     watch_window=TEST_WATCH_WINDOW) as cluster, \
                Fleet(root, [m.url for m in cluster.members], size=1) as fleet:
            cluster.start_all()
            leader = cluster.wait_ready()
            fleet.start_all()
            fleet.wait_joined(cluster, leader)
            node = fleet.members[0].node
            view = cluster.get(leader, f"/api/v1/nodes/{node}").json()
            assert view["credential"] == "shared secret", view
            first = upload(cluster, leader, write_demo_app(root / "v1", name=APP, version="1",
                                                           per_node=1))
            done = wait_deploy_done(cluster, [leader], APP, first["deploy_id"])
            assert done["status"] == "succeeded", done

            fleet.members[0].stop()
            fleet.join_token = cluster.join_token(leader, node=node)
            fleet.secret = None  # so a signal it accepts can only bear its signal key
            fleet.start(0)
            wait_until(lambda: fleet.credential(0), f"{node} enrolled")
            wait_until(lambda: fleet.status(0), f"{node}'s RPC serving again")
            fleet.wait_joined(cluster, leader)
            view = cluster.get(leader, f"/api/v1/nodes/{node}").json()
            assert view["credential"] == "enrolled", view
            shared = cluster.post(leader, f"/api/v1/nodes/{node}/heartbeat", json={},
                                  headers={"authorization": f"Bearer {SECRET}"})
            assert shared.status_code == 403, shared.text
            old_key = fleet.http.get(fleet.members[0].rpc + "/v1/status",
                                     headers={"authorization": f"Bearer {SECRET}"})
            assert old_key.status_code == 401, old_key.text

            second = upload(cluster, leader, write_demo_app(root / "v2", name=APP,
                                                            version="2", per_node=1))
            done = wait_deploy_done(cluster, [leader], APP, second["deploy_id"])
            assert done["status"] == "succeeded", done
            releases, _ = fleet.serving(0, APP)
            assert releases == {second["release"]}, releases
        assert leftovers(root) == []
