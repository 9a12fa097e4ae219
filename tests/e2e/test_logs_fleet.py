"""``superagent logs -f`` across machines, a participant restart and a leader kill.

A real 3-coordinator cluster (tests/coordinator/cluster.py) and two real participants
(tests/e2e/fleet.py) run the chatty app of ``tests.e2e.logapp``, one instance per node,
each printing a ``tick`` line every ``TICK`` seconds. A follower's query merges the lines
of both machines. Then ``superagent logs -f --json`` runs as a real process, given every
coordinator's URL with the leader first; while it runs

0. ``superagent debug`` opens a session on both machines, shows a request served by
   node 2 with the app's line of it, and closes the session on Ctrl-C; one opened with a
   2 s TTL ends on both by itself; the trace of the request through a follower names the
   node that served it;
1. participant 1's agent is SIGKILLed and started again on its data dir (its instance
   outlives it and keeps ticking): the stream goes on with that node's lines and reports
   the gap as an event (its lines are numbered afresh);
2. the coordinator leader is SIGKILLed: the CLI reconnects to another coordinator with
   Last-Event-ID and the lines of both nodes keep coming.

No line is printed twice (node, instance, sequence number, time), and within each run of
a source the sequence numbers only grow. Every wait polls a condition under a deadline;
processes are cleaned up even on failure.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import httpx
import pytest

from tests.coordinator.cluster import Cluster
from tests.coordinator.helpers import TEST_WATCH_WINDOW
from tests.e2e.fleet import Fleet, app_python, kept_on_failure, leftovers, upload, wait_deploy_done
from tests.e2e.logapp import write_log_app
from tests.support.piped import PipedProcess
from tests.support.wait import wait_until

APP = "ticker"
TICK = 0.2  # seconds between an instance's tick lines
STREAM_TIMEOUT = 45.0  # a reconnection after a kill (election, backoff) on a busy machine


class Follower(PipedProcess):
    """``superagent logs -f --json`` (or ``debug --json``) as a process: its documents,
    the events it reports on stderr and its other stderr lines."""

    def __init__(self, argv: list[str]) -> None:
        self.lines: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        super().__init__(argv)

    def on_out(self, raw: str) -> None:
        self.lines.append(json.loads(raw))  # --json: one document a line

    def on_err(self, raw: str) -> None:
        try:
            self.events.append(json.loads(raw))
        except ValueError:
            self.errors.append(raw.rstrip())

    def ticks_after(self, node: str, since: float) -> list[dict[str, Any]]:
        with self.lock:
            return [x for x in self.lines if x["node"] == node and x["ts"] > since
                    and x["text"].startswith("tick ")]


@pytest.mark.slow
def test_follow_across_two_machines_a_participant_restart_and_a_leader_kill() -> None:
    with kept_on_failure("sa-e2e-logs-") as root:
        with Cluster(root / "coordinators", watch_window=TEST_WATCH_WINDOW) as cluster, \
                Fleet(root, [m.url for m in cluster.members]) as fleet:
            cluster.start_all()
            leader = cluster.wait_ready()
            fleet.start_all()
            fleet.wait_joined(cluster, leader)
            nodes = [p.node for p in fleet.members]
            app_dir = write_log_app(root / "src" / APP, name=APP, per_node=1, tick=TICK,
                                    python=app_python())
            started = upload(cluster, leader, app_dir)
            record = wait_deploy_done(cluster, [leader], APP, started["deploy_id"])
            assert record["status"] == "succeeded", record
            follower = next(i for i in range(3) if i != leader)

            def merged() -> dict[str, Any]:
                r = cluster.get(follower, f"/api/v1/apps/{APP}/logs", params={"n": "50"})
                assert r.status_code == 200, r.text
                found: dict[str, Any] = r.json()
                return found
            doc = wait_until(merged, "lines of both machines through a follower",
                             until=lambda d: {x["node"] for x in d["lines"]} == set(nodes))
            assert set(doc["nodes"]) == set(nodes), doc["nodes"]
            assert [x["ts"] for x in doc["lines"]] == sorted(x["ts"] for x in doc["lines"])

            # a debug session through the CLI: opened on both machines, each request's
            # record joined with the app's line, closed on Ctrl-C
            debug = Follower([sys.executable, "-m", "superagent", "debug", APP, "--ttl", "5m",
                              "--json", "--server", cluster.members[follower].url,
                              "--token", cluster.token])
            try:
                wait_until(lambda: all(APP in fleet.status(i)["debug_sessions"]
                                       for i in range(2)), "the session open on both nodes")
                rid = "fleet-debug-1"

                def joined() -> list[dict[str, Any]]:
                    r = httpx.get(f"{fleet.members[1].proxy}/{APP}/hi",
                                  headers={"x-request-id": rid}, timeout=10.0)
                    assert r.status_code == 200, r.text
                    with debug.lock:
                        return [x for x in debug.lines
                                if x["record"]["request_id"] == rid and x["lines"]]
                shown = wait_until(joined, "the request's record and line from `debug`")
                record = shown[0]["record"]
                assert record["node"] == nodes[1] and record["fields"]["status"] == 200
                assert shown[0]["lines"][0]["fields"]["msg"] == "handled /hi", shown
                trace = cluster.get(follower, f"/api/v1/trace/{rid}").json()
                assert {x["node"] for x in trace["proxy"]} == {nodes[1]}, trace
                debug.proc.send_signal(signal.SIGINT)
                assert debug.proc.wait(timeout=30) == 0, debug.errors
                assert any("closed" in e for e in debug.errors), debug.errors
                assert all(APP not in fleet.status(i)["debug_sessions"] for i in range(2))
            finally:
                debug.close()
            # a session's TTL ends it on every machine
            r = cluster.post(follower, f"/api/v1/apps/{APP}/debug", json={"ttl": 2})
            assert r.status_code == 200 and r.json()["ok"], r.text
            assert set(r.json()["nodes"]) == set(nodes), r.text
            wait_until(lambda: not any(APP in fleet.status(i)["debug_sessions"]
                                       for i in range(2)), "the sessions' end at the TTL")

            urls = [cluster.members[leader].url,
                    *(m.url for m in cluster.members if m.index != leader)]
            follow = Follower([sys.executable, "-m", "superagent", "logs", APP, "-f", "--json",
                               "-n", "5", "--server", ",".join(urls),
                               "--token", cluster.token])
            try:
                wait_until(lambda: all(follow.ticks_after(n, 0) for n in nodes),
                           "ticks of both nodes followed", timeout=STREAM_TIMEOUT)
                # 1. the agent of node 1 killed and started again on its data dir
                fleet.members[0].kill9()
                restarted = time.time()
                fleet.start(0)
                wait_until(lambda: follow.ticks_after(nodes[0], restarted + 1.0),
                           "node 1's ticks after its agent's restart", timeout=STREAM_TIMEOUT)
                gaps = [e for e in follow.events if e.get("event") == "gap"
                        and e.get("node") == nodes[0]]
                assert gaps, (follow.events, follow.errors)
                # 2. the leader killed: the CLI goes on through another coordinator
                cluster.kill9(leader)
                killed = time.time()
                cluster.leader(among=[m.index for m in cluster.members if m.index != leader])
                for node in nodes:
                    wait_until(lambda n=node: follow.ticks_after(n, killed + 1.0),  # type: ignore[misc]
                               f"{node}'s ticks after the leader kill", timeout=STREAM_TIMEOUT)
            finally:
                follow.close()
            with follow.lock:
                lines = list(follow.lines)
            seen = [(x["node"], x["instance"], x["seq"], x["ts"]) for x in lines]
            assert len(seen) == len(set(seen)), "a line was printed twice"
            last: dict[tuple[str, str], tuple[int, float]] = {}
            for node, instance, seq, ts in seen:
                before = last.get((node, instance))
                if before is not None and seq <= before[0]:
                    assert node == nodes[0], (node, instance, seq, before)  # the restart
                elif before is not None:
                    assert seq > before[0], (node, instance, seq, before)
                last[(node, instance)] = (seq, ts)
            print(f"\n{len(lines)} lines followed; events {follow.events};"
                  f" reconnections {[e for e in follow.errors if 'reconnecting' in e]}")
        assert leftovers(root) == []

