"""A coordinator replaced, the agent upgraded, all while the app serves and deploys run.

A real 3-coordinator cluster and one real participant (its agent run without
``--stop-on-exit``, as an agent that is upgraded runs). The demo app serves r1 behind the
participant's proxy, under light load for the whole test. Then:

1. a fourth coordinator is started and added with ``superagent cluster add`` while r2
   deploys; the CLI returns once the new member has applied the log and holds every
   artifact (fetched from its peers);
2. the current *leader* is removed through the API while r3 deploys (it hands the
   leadership over first), then stopped; the three members left agree on one state;
3. the safety checks: a malformed request is a 400, an id already there a 409, and with
   one of the three members stopped, removing another is a 409 (it would leave 1 live of
   2); the stopped member restarts from its data dir with its old ``--peers`` (which still
   name the removed member) and rejoins the new membership it recorded;
4. the participant's agent is upgraded: SIGTERM, then a new agent process on the same
   data dir; the instances and proxy workers are adopted, not restarted.

The load through the proxy sees no failed request from start to end. Every wait polls a
condition under a deadline; the only sleep paces the load. Everything started under the
test's root is killed at the end, adopted processes included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from tests.coordinator.cluster import Cluster
from tests.e2e.fleet import (
    Fleet,
    Load,
    kept_on_failure,
    leftovers,
    upload,
    wait_deploy_done,
    write_demo_app,
)
from tests.support.wait import wait_until

APP = "steady"
WARMUP = 20  # load answers seen before anything changes
AFTER_RESTART = 30  # load answers counted after the new agent took over
CLI_TIMEOUT = 60.0  # `cluster add` waits for the member to catch up (about a second)


def kill_under(root: Path) -> None:
    """SIGKILL every process whose command line or cwd lies under ``root`` (instances and
    proxy workers an adopting agent does not count as its children)."""
    procs = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        with contextlib.suppress(psutil.Error):
            if str(root) in " ".join(proc.info["cmdline"] or []) or \
                    (proc.info["cwd"] or "").startswith(str(root)):
                proc.kill()
                procs.append(proc)
    psutil.wait_procs(procs, timeout=10)


def cli(cluster: Cluster, member: int, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "superagent", *argv, "--server", cluster.api(member),
         "--token", cluster.token], capture_output=True, text=True, timeout=CLI_TIMEOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("SUPERAGENT_")})


def view(cluster: Cluster, i: int) -> dict[str, Any]:
    return cluster.cluster_view(i)


def serving(fleet: Fleet, release: str) -> bool:
    """Whether the participant routes the app to instances of ``release`` only."""
    releases, _ = fleet.serving(0, APP)
    return releases == {release}


def pids_of(fleet: Fleet) -> set[int]:
    """The pids of the participant's app instances."""
    return {inst["pid"] for inst in fleet.status(0)["instances"] if inst["app"] == APP}


def test_replace_a_coordinator_and_upgrade_the_agent_while_apps_serve() -> None:
    """Add c4 and remove the leader during deploys, refuse unsafe changes, restart a
    member on its recorded membership, restart the agent: 0 failed requests."""
    with kept_on_failure("sa-coordops-") as root:
        cluster = Cluster(root / "coordinators")
        fleet = Fleet(root, [m.url for m in cluster.members], size=1, stop_on_exit=False)
        load: Load | None = None
        try:
            cluster.start_all()
            cluster.wait_ready()
            fleet.start_all()
            fleet.wait_joined(cluster, 0)
            app_dir = write_demo_app(root / "src" / APP, name=APP, version="1", per_node=1)
            first = upload(cluster, 0, app_dir)
            wait_deploy_done(cluster, [0, 1, 2], APP, first["deploy_id"])
            load = Load([fleet.members[0].proxy + f"/{APP}/"])
            load.start()
            wait_until(lambda: load is not None and load.snapshot()[0] >= WARMUP, "warm-up")

            # 1. add c4 while r2 deploys
            c4 = cluster.add_member()
            cluster.start(c4)
            second = upload(cluster, 1, write_demo_app(app_dir, name=APP, version="2",
                                                       per_node=1))
            added = cli(cluster, 1, "cluster", "add", "c4",
                        f"127.0.0.1:{cluster.members[c4].raft_port}")
            assert added.returncode == 0, added.stderr + added.stdout
            assert "caught up" in added.stdout, added.stdout
            assert wait_deploy_done(cluster, [1, 2], APP, second["deploy_id"])["status"] \
                == "succeeded"
            assert view(cluster, c4)["artifacts_missing"] == 0
            assert {m["id"] for m in view(cluster, c4)["members"]} == {"c1", "c2", "c3", "c4"}

            # 2. remove the leader while r3 deploys; it hands over first
            leader = cluster.leader()
            third = upload(cluster, c4, write_demo_app(app_dir, name=APP, version="3",
                                                       per_node=1))
            gone = cluster.members[leader].id
            removed = cluster.request("DELETE", c4, f"/api/v1/cluster/members/{gone}",
                                      timeout=30.0)
            assert removed.status_code == 200, removed.text
            assert {m["id"] for m in removed.json()["members"]} == \
                {"c1", "c2", "c3", "c4"} - {gone}
            cluster.stop(leader)
            rest = [i for i in range(4) if i != leader]
            assert wait_deploy_done(cluster, rest, APP, third["deploy_id"])["status"] \
                == "succeeded"
            cluster.wait_converged(rest)
            wait_until(lambda: serving(fleet, "r3"), "r3 served")

            # 3. refusals
            bad = cluster.post(rest[0], "/api/v1/cluster/members",
                               json={"id": "c9", "raft": "no port"})
            assert bad.status_code == 400 and "host:port" in bad.json()["detail"], bad.text
            again = cluster.post(rest[0], "/api/v1/cluster/members",
                                 json={"id": "c4", "raft": "127.0.0.1:1"})
            assert again.status_code == 409, again.text
            victim = next(i for i in rest if i != cluster.leader(rest))
            cluster.stop(victim)
            alive = [i for i in rest if i != victim]
            other = next(i for i in alive if i != cluster.leader(alive))
            refused = cluster.request(
                "DELETE", alive[0], f"/api/v1/cluster/members/{cluster.members[other].id}")
            assert refused.status_code == 409, refused.text
            assert "not a majority" in refused.json()["detail"], refused.text
            cluster.start(victim)  # its --peers still name the removed member
            cluster.wait_ready()
            cluster.wait_converged(rest)
            assert {m["id"] for m in view(cluster, victim)["members"]} == \
                {"c1", "c2", "c3", "c4"} - {gone}

            # 4. upgrade the agent: stop it, start a new one on the same data dir
            before = pids_of(fleet)
            agent = fleet.members[0]
            assert agent.proc is not None
            started = time.monotonic()
            agent.proc.send_signal(signal.SIGTERM)
            agent.proc.wait(timeout=30)
            fleet.start(0)
            wait_until(lambda: fleet.status(0)["instances"], "the new agent answers",
                       timeout=30)
            gap = time.monotonic() - started
            assert pids_of(fleet) == before  # adopted, not restarted
            print(f"agent upgrade: {gap:.2f} s from SIGTERM to the new agent answering")
            count = load.snapshot()[0]
            wait_until(lambda: load is not None and load.snapshot()[0] >= count + AFTER_RESTART,
                       "traffic after the agent restart")
            load.stop()
            assert load.failed == {}, (load.samples, f"agent gap {gap:.2f} s")
            assert {"r1", "r3"} <= set(load.ok), load.ok
        finally:
            if load is not None:
                load.stop()
            fleet.close()
            cluster.close()
            kill_under(root)
        assert leftovers(root) == []
