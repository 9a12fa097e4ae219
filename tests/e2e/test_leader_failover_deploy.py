"""A deploy survives the kill -9 of the coordinator leader that runs it.

A real 3-coordinator cluster (tests/coordinator/cluster.py) and two real participants
(tests/e2e/fleet.py), each with its proxy. Release r1 of the demo app (two instances per
node) is deployed; then r2 is uploaded through a follower, and as soon as that follower's
view of the deploy shows a node past ``prepared`` (instances being started, routes being
switched) the leader is SIGKILLed. The new leader must resume the saga from its Raft record
and either finish it (``succeeded``: every node serves r2) or compensate it
(``rolled_back``: every node serves r1 again). Either way each participant routes the app to
the instances of exactly one release, the proxies answer from that release, nothing of the
other release keeps running, and light traffic through both proxies during the whole
failover saw no failed request. Finally each participant refuses a signal carrying term 0,
and, when it has seen the new leader's term, one carrying the killed leader's (the fencing
of a deposed leader), and the instance that signal named keeps serving.

Every wait polls a condition under a deadline; the only sleep paces the load clients.
Processes are cleaned up (SIGTERM, then SIGKILL of groups and trees) even on failure, and
psutil confirms nothing started here is left.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.coordinator.cluster import Cluster
from tests.coordinator.helpers import TEST_WATCH_WINDOW
from tests.e2e.fleet import (
    DEPLOY_TIMEOUT,
    REQUEST_TIMEOUT,
    Fleet,
    Load,
    deploy_record,
    kept_on_failure,
    leftovers,
    upload,
    wait_deploy_done,
    write_demo_app,
)
from tests.support.wait import wait_until

APP = "failover"
PER_NODE = 2
PAST_PREPARED = {"started", "switched", "drained", "committed", "start_failed",
                 "switched_back", "rolled_back"}  # a node whose traffic is moving or moved
WARMUP_REQUESTS = 20  # load requests seen before the r2 deploy starts (both clients running)
GONE_TIMEOUT = 5.0  # a stopped instance's processes gone after its stop was acknowledged
CHECK_REQUESTS = 10  # fresh requests per proxy checked for the winning release at the end


def midway(record: dict[str, Any]) -> bool:
    """The deploy is rolling: some node is past ``prepared``."""
    return any(s["step"] in PAST_PREPARED for s in record["steps"])


def processes_of(root: Path, app: str, release: str) -> list[str]:
    """Live processes under ``root`` (their working directory: the release's source dir)
    whose environment says they are an instance of ``app`` ``release``. Scoped by ``root``
    because another run of this test may use the same app name at the same time."""
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        with contextlib.suppress(psutil.Error):
            env = proc.environ()
            if (env.get("SUPERAGENT_APP") == app and env.get("SUPERAGENT_RELEASE") == release
                    and proc.cwd().startswith(str(root))
                    and proc.status() != psutil.STATUS_ZOMBIE):
                found.append(f"pid {proc.pid} {proc.info['name']} {proc.cmdline()}")
    return found


def check_serves_one_release(root: Path, fleet: Fleet, winner: str, loser: str) -> None:
    """Every participant routes the app to exactly its ready instances of ``winner``, runs
    nothing of ``loser``, and its proxy answers from ``winner``."""
    for i, p in enumerate(fleet.members):
        releases, instances = fleet.serving(i, APP)
        routed = fleet.status(i)["routes"].get(APP, [])
        assert releases == {winner}, f"{p.node} routes {APP} to {releases}: {instances}"
        assert len(routed) == PER_NODE, f"{p.node} routes {routed}"
        assert all(instances[iid]["state"] == "ready" for iid in routed), instances
        live = {iid for iid, inst in instances.items() if inst["state"] != "stopped"}
        assert live == set(routed), f"{p.node}: live {live} but routed {routed}"
        for inst in instances.values():
            if inst["release"] == loser and inst["pid"]:
                assert not psutil.pid_exists(inst["pid"]) or psutil.Process(
                    inst["pid"]).status() == psutil.STATUS_ZOMBIE, f"{p.node}: {inst}"
    # The agent reaps the instance's shell (its process group leader); the app process it
    # SIGKILLed with the group may take a moment more to be gone. Still there after
    # GONE_TIMEOUT is "keeps running".
    wait_until(lambda: not processes_of(root, APP, loser), f"no process of {loser} left",
               timeout=GONE_TIMEOUT)
    with httpx.Client(trust_env=False, timeout=REQUEST_TIMEOUT) as http:
        for p in fleet.members:
            for _ in range(CHECK_REQUESTS):
                r = http.get(f"{p.proxy}/{APP}/")
                assert r.status_code == 200, f"{p.node}: {r.status_code} {r.text[:200]}"
                assert r.json()["release"] == winner, f"{p.node}: {r.text[:200]}"


@pytest.mark.slow
def test_leader_killed_mid_deploy_is_finished_or_compensated_by_the_new_leader() -> None:
    """kill -9 of the leader mid-roll: the new leader ends the deploy, one release serves."""
    with kept_on_failure("sa-e2e-failover-") as root:
        with Cluster(root / "coordinators", log_level="info",
                     participant_secret=None, watch_window=TEST_WATCH_WINDOW) as cluster, \
                Fleet(root, [m.url for m in cluster.members], secret=None) as fleet:
            cluster.start_all()
            leader = cluster.wait_ready()
            fleet.join_token = cluster.join_token(leader, uses=len(fleet.members))
            fleet.start_all()
            fleet.wait_joined(cluster, leader)

            first = upload(cluster, leader, write_demo_app(root / "src-1", name=APP,
                                                           version="1", per_node=PER_NODE))
            r1 = first["release"]
            record = wait_deploy_done(cluster, [leader], APP, first["deploy_id"])
            assert record["status"] == "succeeded", record
            check_serves_one_release(root, fleet, r1, "none")

            urls = [f"{p.proxy}/{APP}/" for p in fleet.members]
            with Load(urls) as load:
                wait_until(lambda: load.snapshot()[0] >= WARMUP_REQUESTS, "load warmed up")
                survivors = [i for i in range(len(cluster.members)) if i != leader]
                old_term = cluster.cluster_view(leader)["term"]
                second = upload(cluster, survivors[0],
                                write_demo_app(root / "src-2", name=APP, version="2",
                                               per_node=PER_NODE))
                r2, deploy_id = second["release"], second["deploy_id"]
                seen = wait_until(
                    lambda: (rec if midway(rec := deploy_record(cluster, survivors[0], APP,
                                                                deploy_id)) else None),
                    f"deploy {deploy_id} rolling", timeout=DEPLOY_TIMEOUT)
                assert seen is not None and seen["stage"] != "done", seen
                cluster.kill9(leader)
                new_leader = cluster.leader(among=survivors)
                record = wait_deploy_done(cluster, [new_leader, *survivors], APP, deploy_id)
                print(f"\nkilled c{leader + 1} at stage {seen['stage']} steps "
                      f"{[(s['node'], s['step']) for s in seen['steps']]};"
                      f" new leader c{new_leader + 1}; deploy {record['status']}"
                      f" ({record.get('reason', '')})")
                assert record["status"] in ("succeeded", "rolled_back"), record
                winner, loser = (r2, r1) if record["status"] == "succeeded" else (r1, r2)
                check_serves_one_release(root, fleet, winner, loser)
            requests, failures = load.snapshot()
            print(f"load: {requests} requests, {failures} failed; by release {dict(load.ok)};"
                  f" failures {dict(load.failed)}")
            assert failures == 0, f"{load!r}: {load.samples}"
            assert load.ok[winner] > 0, load

            new_term = cluster.cluster_view(new_leader)["term"]
            assert new_term > old_term
            for i, p in enumerate(fleet.members):  # a deposed leader's stop is refused
                serving = fleet.status(i)["routes"][APP]
                seen_term = json.loads((p.data_dir / "state.json").read_text())["ledger"][
                    "newest_term"]
                stale = [0] + ([old_term] if seen_term > old_term else [])
                for term in stale:
                    r = fleet.signal(i, "stop", {"id": f"stale-{term}-{p.node}", "term": term,
                                                 "instances": serving[:1]})
                    assert r.status_code == 409, f"{p.node}: {r.status_code} {r.text}"
                    assert r.json()["error"] == "stale_term", r.text
                print(f"{p.node}: newest term {seen_term}, refused stale terms {stale}")
                _, instances = fleet.serving(i, APP)
                assert instances[serving[0]]["state"] == "ready", instances
        assert leftovers(root) == []
