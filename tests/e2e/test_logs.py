"""``superagent logs``, ``debug`` and ``trace`` on ``superagent up``'s embedded cluster.

A real coordinator, participant and proxy (``tests.e2e.embedded``) run the chatty app of
``tests.e2e.logapp`` (two instances); requests go through the proxy with an
``X-Request-Id``. What is checked: the merged query and its filters (instance, stream,
grep, since, request id, n) and their 400s, the app's ``[env]`` value hidden, a debug
session opened and closed through the coordinator (and ended by its TTL on the
participant), the trace of a request (the app's line and the proxy's record) through the
API and the CLI, also of a request made outside any session, 404s for a token of another
team (its apps do not exist for it) and a 403 for a viewer opening a session, a follow
resumed with ``Last-Event-ID`` without duplicates, and a reader that does not read: the
app and the proxy keep their pace and the stream reports what it dropped.

Every wait polls a condition under a deadline; the CLI runs as a real subprocess.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from superagent.coordinator import api_logs
from tests.e2e.embedded import Cluster, running_cluster
from tests.e2e.logapp import write_log_app
from tests.support.wait import wait_until_async

APP = "chatty"


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with running_cluster() as running:
        yield running


async def deploy(cluster: Cluster, **options: Any) -> None:
    view = await cluster.deploy(write_log_app(cluster.src / APP, name=APP, **options))
    assert view["status"] == "succeeded", view


async def logs(cluster: Cluster, **params: str) -> dict[str, Any]:
    response = await cluster.api.get(f"/api/v1/apps/{APP}/logs", params=params)
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


async def cli(cluster: Cluster, *argv: str, token: str | None = None) -> tuple[int, str, str]:
    """Run ``superagent ARGV`` against the cluster; (exit status, stdout, stderr)."""
    auth = token or cluster.api.headers["authorization"].split(" ", 1)[1]
    done = await trio.run_process(
        [sys.executable, "-m", "superagent", *argv, "--server",
         cluster.embedded.coordinator.config.url, "--token", auth],
        capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def token_of(cluster: Cluster, name: str, role: str, teams: list[str]) -> str:
    response = await cluster.api.post("/api/v1/tokens",
                                      json={"name": name, "role": role, "teams": teams})
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


async def test_logs_filters_debug_trace_and_permissions(cluster: Cluster) -> None:
    await deploy(cluster)
    instances = sorted(i["instance"] for i in cluster.instances(APP))
    assert len(instances) == 2

    async def both_started() -> dict[str, Any] | None:
        doc = await logs(cluster)
        texts = {line["text"] for line in doc["lines"]}
        return doc if all(f"started {i}" in texts and f"warming {i}" in texts
                          for i in instances) else None

    doc = await wait_until_async(both_started, "both instances' first lines")
    node = cluster.embedded.agent.config.node
    assert doc["nodes"] == {node: "ok"}
    for line in doc["lines"]:
        assert {"node", "instance", "stream", "ts", "text", "seq"} <= set(line), line
        assert line["node"] == node and line["app"] == APP
    # filters
    errs = await logs(cluster, stream="stderr")
    assert errs["lines"] and {x["stream"] for x in errs["lines"]} == {"stderr"}
    one = await logs(cluster, instance=instances[0])
    assert {x["instance"] for x in one["lines"]} == {instances[0]}
    grepped = await logs(cluster, grep=f"warming {instances[1]}")
    assert [x["text"] for x in grepped["lines"]] == [f"warming {instances[1]}"]
    assert len((await logs(cluster, n="1"))["lines"]) == 1
    assert (await logs(cluster, since=str(time.time() + 3600)))["lines"] == []
    assert len((await logs(cluster, since="10m"))["lines"]) >= 4
    assert (await logs(cluster, node="elsewhere"))["lines"] == []
    for bad, named in ((dict(stream="stdin"), "stream"), (dict(since="yesterday"), "since"),
                       (dict(n="0"), "'n'"), (dict(colour="red"), "colour"),
                       (dict(follow="maybe"), "follow")):
        response = await cluster.api.get(f"/api/v1/apps/{APP}/logs", params=bad)
        assert response.status_code == 400, (bad, response.text)
        assert named in response.json()["detail"], (bad, response.text)
    missing = await cluster.api.get("/api/v1/apps/nope/logs")
    assert missing.status_code == 404

    # the app's [env] value never shown
    assert (await cluster.get(f"/{APP}/secret")).status_code == 200

    async def secret_line() -> list[str]:
        return [x["text"] for x in (await logs(cluster, grep="the token is"))["lines"]]
    shown = await wait_until_async(secret_line, "the secret line")
    assert shown == ["the token is [env TOKEN]"], shown

    # a request's lines by request id: the app's structured line
    assert (await cluster.get(f"/{APP}/hello", headers={"x-request-id": "rid-plain"})
            ).status_code == 200

    async def by_rid() -> list[dict[str, Any]] | None:
        # the proxy's kept record of the request may come before the app's line
        lines = list((await logs(cluster, request_id="rid-plain"))["lines"])
        return lines if any(x["stream"] == "stdout" for x in lines) else None
    found = await wait_until_async(by_rid, "the line of rid-plain")
    assert [x["fields"]["msg"] for x in found if x["stream"] == "stdout"] == [
        "handled /hello"], found

    # outside any debug session the proxy's record is kept too (the participant's recent
    # records): the trace shows it, route, instance, status and timings, beside the app's
    # line; the app's stream without a request id gets no proxy lines for it
    assert APP not in cluster.embedded.agent.status().debug_sessions

    async def plain_trace() -> dict[str, Any] | None:
        response = await cluster.api.get("/api/v1/trace/rid-plain")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body if {x["stream"] for x in body["lines"]} == {"stdout", "proxy"} else None
    plain = await wait_until_async(plain_trace, "the proxy's record of rid-plain")
    assert len(plain["proxy"]) == 1, plain
    kept = plain["proxy"][0]
    assert kept["instance"] in instances and kept["node"] == node, kept
    assert kept["fields"]["status"] == 200 and kept["fields"]["path"] == f"/{APP}/hello"
    assert kept["fields"]["rule"] and kept["fields"]["duration_ms"] >= 0
    assert kept["fields"]["first_byte_ms"] is not None, kept
    assert [x["fields"]["msg"] for x in plain["lines"] if x["stream"] == "stdout"] == [
        "handled /hello"], plain
    assert not [x for x in (await logs(cluster))["lines"] if x["stream"] == "proxy"]

    # a debug session through the coordinator: the proxy's record joins the app's line
    opened = await cluster.api.post(f"/api/v1/apps/{APP}/debug", json={"ttl": 120})
    assert opened.status_code == 200, opened.text
    assert opened.json()["nodes"][node]["ok"] is True
    assert APP in cluster.embedded.agent.status().debug_sessions
    assert (await cluster.get(f"/{APP}/traced", headers={"x-request-id": "rid-traced"})
            ).status_code == 200

    async def traced() -> dict[str, Any] | None:
        response = await cluster.api.get("/api/v1/trace/rid-traced")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body if {x["stream"] for x in body["lines"]} == {"stdout", "proxy"} else None
    trace = await wait_until_async(traced, "the trace of rid-traced")
    record = trace["proxy"][0]
    assert record["fields"]["status"] == 200 and record["fields"]["path"] == f"/{APP}/traced"
    assert record["instance"] in instances and record["node"] == node
    assert [x["ts"] for x in trace["lines"]] == sorted(x["ts"] for x in trace["lines"])
    code, out, err = await cli(cluster, "trace", "rid-traced", "--app", APP)
    assert code == 0, err
    assert f"GET /{APP}/traced" in out and "handled /traced" in out, out
    code, out, err = await cli(cluster, "logs", APP, "--stream", "stderr", "-n", "5")
    assert code == 0, err
    assert f"{instances[0]} stderr | warming {instances[0]}" in out, out
    closed = await cluster.api.delete(f"/api/v1/apps/{APP}/debug")
    assert closed.status_code == 200 and closed.json()["ok"], closed.text
    assert APP not in cluster.embedded.agent.status().debug_sessions

    # a session's TTL closes it on the participant by itself
    short = await cluster.api.post(f"/api/v1/apps/{APP}/debug", json={"ttl": 1})
    assert short.status_code == 200, short.text
    await wait_until_async(lambda: APP not in cluster.embedded.agent.status().debug_sessions,
                           "the session's end at its TTL", timeout=10.0)
    bad_ttl = await cluster.api.post(f"/api/v1/apps/{APP}/debug", json={"ttl": 0})
    assert bad_ttl.status_code == 400 and "ttl" in bad_ttl.json()["detail"]

    # a token of another team sees none of it (its apps do not exist for it: 404), and a
    # viewer of the app's team may read but not open a session (403)
    other = await token_of(cluster, "other-viewer", "viewer", ["other"])
    deployer = await token_of(cluster, "other-deployer", "deployer", ["other"])
    viewer = await token_of(cluster, "own-viewer", "viewer", ["default"])
    headers = {"authorization": f"Bearer {other}"}
    for method, path in (("GET", f"/api/v1/apps/{APP}/logs"),
                         ("GET", f"/api/v1/apps/{APP}/logs?follow=1"),
                         ("GET", f"/api/v1/trace/rid-traced?app={APP}")):
        response = await cluster.api.request(method, path, headers=headers)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"] == "unknown_app", response.text
    response = await cluster.api.post(f"/api/v1/apps/{APP}/debug", json={"ttl": 60},
                                      headers={"authorization": f"Bearer {deployer}"})
    assert response.status_code == 404, response.text
    response = await cluster.api.post(f"/api/v1/apps/{APP}/debug", json={"ttl": 60},
                                      headers={"authorization": f"Bearer {viewer}"})
    assert response.status_code == 403 and response.json()["missing"] == "apps:write"
    own = await cluster.api.get(f"/api/v1/apps/{APP}/logs",
                                headers={"authorization": f"Bearer {viewer}"})
    assert own.status_code == 200 and own.json()["lines"], own.text
    response = await cluster.api.get("/api/v1/trace/rid-traced", headers=headers)
    assert response.status_code == 200 and response.json()["lines"] == [], response.text
    code, _, err = await cli(cluster, "logs", APP, token=other)
    assert code != 0 and "does not exist" in err, err


async def read_events(response: httpx.Response, into: list[tuple[str, dict[str, Any],
                                                                 str | None]]) -> None:
    kind, data, event_id = "message", "", None
    async for line in response.aiter_lines():
        if not line:
            if data:
                into.append((kind, json.loads(data), event_id))
            kind, data, event_id = "message", "", None
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line.startswith("id: "):
            event_id = line[4:]


def keys(events: list[tuple[str, dict[str, Any], str | None]]) -> list[tuple[str, str, int]]:
    return [(d["node"], d["instance"], d["seq"]) for k, d, _ in events if k == "line"
            and d["stream"] != "proxy"]


async def test_follow_resumes_without_duplicates_and_survives_a_slow_reader(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_logs, "KEEPALIVE", 0.3)  # the embedded coordinator is in-process
    await deploy(cluster, per_node=1)
    url = f"/api/v1/apps/{APP}/logs"
    async with cluster.api.stream("GET", url, params={"follow": "1", "n": "1",
                                                      "grep": "nothing matches this"},
                                  timeout=None) as response:
        with trio.fail_after(10.0):  # a quiet stream still says it is alive
            async for raw in response.aiter_lines():
                if raw == ": keep-alive":
                    break
    first: list[tuple[str, dict[str, Any], str | None]] = []
    async with trio.open_nursery() as nursery, cluster.api.stream(
            "GET", url, params={"follow": "1", "n": "5"}, timeout=None) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        nursery.start_soon(read_events, response, first)
        await wait_until_async(lambda: any(k == "open" for k, _, _ in first), "open event")
        for i in range(5):
            await cluster.get(f"/{APP}/one", headers={"x-request-id": f"a{i}"})
        await wait_until_async(lambda: sum(d.get("request_id") == "a4" for _, d, _ in first),
                               "the line of a4 streamed")
        nursery.cancel_scope.cancel()
    last_id = [i for k, _, i in first if k == "line"][-1]
    assert last_id
    # more lines while nobody follows; then resume
    for i in range(5):
        await cluster.get(f"/{APP}/two", headers={"x-request-id": f"b{i}"})
    second: list[tuple[str, dict[str, Any], str | None]] = []
    async with trio.open_nursery() as nursery, cluster.api.stream(
            "GET", url, params={"follow": "1"}, headers={"last-event-id": last_id},
            timeout=None) as response:
        assert response.status_code == 200
        nursery.start_soon(read_events, response, second)
        await wait_until_async(lambda: [(k, d.get("request_id"), d.get("seq"), d.get("missing"))
                                        for k, d, _ in second],
                               "the line of b4 streamed after the resumption",
                               until=lambda got: any(rid == "b4" for _, rid, _, _ in got))
        nursery.cancel_scope.cancel()
    assert ("open", {"app": APP, "nodes": [cluster.embedded.agent.config.node],
                     "resumed": True}, None) in second
    before, after = keys(first), keys(second)
    assert not set(before) & set(after), "a line was sent twice"
    assert len(after) == len(set(after))
    rids = [d.get("request_id") for k, d, _ in second if k == "line"]
    assert [r for r in rids if r] == [f"b{i}" for i in range(5)], rids
    bad = await cluster.api.get(url, params={"follow": "1"},
                                headers={"last-event-id": "garbage"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["detail"]

    # a reader that does not read: the app and the proxy keep their pace, drops are told
    third: list[tuple[str, dict[str, Any], str | None]] = []
    async with cluster.api.stream("GET", url, params={"follow": "1", "n": "1"},
                                  timeout=None) as response:
        lines = response.aiter_lines()
        assert (await lines.__anext__()).startswith("event: open")
        started = time.monotonic()
        for _ in range(4):
            burst = await cluster.get(f"/{APP}/burst", params={"n": "20000"})
            assert burst.status_code == 200
        for _ in range(20):
            assert (await cluster.get(f"/{APP}/quick")).status_code == 200
        busy = time.monotonic() - started
        assert busy < 30.0, f"the app and proxy slowed down: {busy:.1f} s"
        with trio.move_on_after(60.0):
            kind, data = "", ""
            async for line in lines:
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif not line and kind:
                    third.append((kind, json.loads(data), None))
                    if kind in ("dropped", "gap"):
                        break
                    kind = ""
    told = [d for k, d, _ in third if k in ("dropped", "gap")]
    assert told, f"no drop reported after {len(third)} events"
