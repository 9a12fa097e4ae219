"""The scale and node-label API, and the app and node views, on a real coordinator."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from superagent.coordinator import commands as cmd
from tests.coordinator import test_api
from tests.coordinator.helpers import SHA, deploy_record, spec
from tests.coordinator.test_api import SECRET, Api

api = test_api.api  # the fixture: a real single-node coordinator


async def create(api: Api, name: str = "hello", **scale: Any) -> None:
    manifest: dict[str, Any] = {"app": {"name": name}, "run": {"command": "true"}}
    if scale:
        manifest["scale"] = scale
    response = await api.call("POST", "/api/v1/apps", json=manifest)
    assert response.status_code == 201, response.text


async def commit(api: Api, cls: type[cmd.Command], **fields: Any) -> dict[str, Any]:
    c = api.coordinator
    result = await c.submit(c.command(cls, actor="test", **fields))
    assert result["ok"], result
    return result


async def app(api: Api, name: str = "hello") -> dict[str, Any]:
    response = await api.call("GET", f"/api/v1/apps/{name}")
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


async def test_scale_starts_a_scaling_that_finish_scale_ends(api: Api) -> None:
    await create(api, groups=["web"], per_node=2)
    before = await app(api)
    assert before["scale"] == {"groups": ["web"], "per_node": 2, "instances": None}
    assert (before["scale_override"], before["scaling"], before["placement_reason"]) == (
        False, None, "")
    response = await api.call("POST", "/api/v1/apps/hello/scale", json={"instances": 5})
    assert response.status_code == 202, response.text
    doc = response.json()
    scale_id = doc["scale_id"]
    assert doc["scale"] == {"groups": ["web"], "per_node": 1, "instances": 5}  # groups kept
    assert doc["scaling"]["id"] == scale_id and doc["scaling"]["actor"] == "admin"
    after = await app(api)
    assert after["scale"] == doc["scale"] and after["scale_override"] is True
    assert after["scaling"] == doc["scaling"]
    listed = (await api.call("GET", "/api/v1/apps")).json()
    assert listed["apps"][0]["scaling"] == doc["scaling"] and listed["live"] is True

    await commit(api, cmd.FinishScale, app="hello", scale_id=scale_id, outcome="short",
                 reason="4 of 5 instances: no room")
    done = await app(api)
    assert done["scaling"] is None
    assert (done["last_scaling"]["id"], done["last_scaling"]["outcome"],
            done["last_scaling"]["reason"]) == (scale_id, "short", "4 of 5 instances: no room")
    again = await api.call("POST", "/api/v1/apps/hello/scale",
                           json={"per_node": 3, "groups": ["web", "api"]})
    assert again.status_code == 202
    assert again.json()["scale"] == {"groups": ["web", "api"], "per_node": 3,
                                     "instances": None}


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({}, 400, "exactly one of 'per_node'"),
    ({"per_node": 1, "instances": 2}, 400, "exactly one of 'per_node'"),
    ({"per_node": "2"}, 400, "'per_node' must be an integer"),
    ({"per_node": True}, 400, "'per_node' must be an integer"),
    ({"per_node": 65}, 400, "'per_node' must be 0-64"),
    ({"instances": 0}, 400, "'instances' must be 1-10000"),
    ({"instances": 2, "groups": "web"}, 400, "'groups' must be a list"),
    ({"instances": 2, "groups": []}, 400, "at least one group"),
    ({"instances": 2, "groups": ["Web"]}, 400, "'Web' is not a valid group name"),
    ({"instances": 2, "groups": ["a", "a"]}, 400, "twice"),
    ({"instances": 2, "replicas": 3}, 400, "unknown field 'replicas'"),
    ({"instances": 2, "auto": {"min": 1, "max": 2, "target": 1}}, 400, "exactly one of"),
    ({"auto": [1, 2]}, 400, "'auto' must be an object"),
    ({"auto": {"min": 1, "max": 2}}, 400, "'auto' needs 'target'"),
    ({"auto": {"min": 3, "max": 2, "target": 1}}, 400, "min <= max"),
    ({"auto": {"min": 1, "max": 2, "target": 1, "metric": "rps"}}, 400, "'rps'"),
    ({"auto": {"min": 1, "max": 2, "target": 1, "step": 2}}, 400, "unknown field 'step'"),
])
async def test_bad_scale_requests_name_the_field(api: Api, body: dict[str, Any],
                                                 status: int, fragment: str) -> None:
    await create(api)
    response = await api.call("POST", "/api/v1/apps/hello/scale", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]
    assert (await app(api))["scaling"] is None


async def test_scale_to_autoscaling(api: Api) -> None:
    """{"auto": {...}} makes the app autoscaled: it runs min instances until decided."""
    await create(api)
    response = await api.call("POST", "/api/v1/apps/hello/scale",
                              json={"auto": {"min": 2, "max": 5, "target": 8}})
    assert response.status_code == 202, response.text
    assert response.json()["scale"]["auto"] == {"min": 2, "max": 5, "target": 8.0,
                                                "metric": "in_flight"}
    assert (await app(api))["scale"]["instances"] == 2


async def test_scale_of_unknown_app_and_during_a_deploy(api: Api,
                                                       nursery: trio.Nursery) -> None:
    missing = await api.call("POST", "/api/v1/apps/nope/scale", json={"per_node": 1})
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_app"
    await create(api)
    await commit(api, cmd.AddRelease, app="hello", sha256=SHA, size=1, spec=spec())
    # n1 beats, so the deploy runner keeps retrying its unreachable address (for
    # NODE_LOST_AFTER, 30 s) instead of failing the deploy at once: it stays running
    registered = await api.call("POST", "/api/v1/nodes/register", token=SECRET,
                                json={"node": "n1", "address": "127.0.0.1:9"})
    assert registered.status_code == 200, registered.text

    async def beat() -> None:
        while True:
            await api.call("POST", "/api/v1/nodes/n1/heartbeat", token=SECRET,
                           json={"status": {"instances": [], "routes": {}}})
            await trio.sleep(0.2)  # a heartbeat period, not a synchronisation
    nursery.start_soon(beat)
    await commit(api, cmd.StartDeploy, app="hello", deploy_id="d1",
                 record=deploy_record(deploy_id="d1"))
    busy = await api.call("POST", "/api/v1/apps/hello/scale", json={"per_node": 2})
    assert busy.status_code == 409, busy.text
    assert "deploy d1 of hello is running" in busy.json()["detail"]


async def test_app_view_shows_placement_and_reported_instances(api: Api) -> None:
    await create(api)
    await create(api, "other")
    for node in ("n1", "n2"):
        registered = await api.call("POST", "/api/v1/nodes/register", token=SECRET,
                                    json={"node": node, "address": "127.0.0.1:9",
                                          "capacity": 4})
        assert registered.status_code == 200, registered.text
    # mine: a permission its node cannot enforce; theirs: from a participant that
    # predates permissions (no "unenforced"), shown with none
    mine = {"id": "hello-1", "app": "hello", "release": "r1", "state": "ready", "port": 5000,
            "unenforced": ["network"]}
    theirs_beat = {"id": "other-1", "app": "other", "release": "r2", "state": "stopped",
                   "port": 5001}
    theirs = {**theirs_beat, "unenforced": []}
    beat = await api.call("POST", "/api/v1/nodes/n1/heartbeat", token=SECRET,
                          json={"status": {"instances": [mine, {**theirs_beat, "extra": 1}],
                                           "routes": {}}})
    assert beat.status_code == 200
    await commit(api, cmd.SetPlacement, app="hello", placement={"n1": 1, "n2": 2},
                 reason="3 of 4 instances: no room")
    doc = await app(api)
    assert doc["placement"] == {"n1": 1, "n2": 2}
    assert doc["placement_reason"] == "3 of 4 instances: no room"
    assert doc["instances"] == {"n1": [mine], "n2": []}
    assert (await app(api, "other"))["instances"] == {"n1": [theirs]}

    nodes = (await api.call("GET", "/api/v1/nodes")).json()["nodes"]
    n1, n2 = nodes
    assert (n1["name"], n1["groups"], n1["labeled"], n1["lifecycle"], n1["capacity"]) == (
        "n1", ["default"], False, "online", 4)  # (up: see the CLI test, which keeps beating)
    assert n1["instances"] == [mine, theirs] and n1["instances_used"] == 1  # stopped: free
    assert n2["instances"] == [] and n2["instances_used"] == 0  # registered, no status yet
    garbage = await api.call("POST", "/api/v1/nodes/n2/heartbeat", token=SECRET,
                             json={"status": {"instances": "many"}})
    assert garbage.status_code == 200  # the participant's word, shown as far as it makes sense
    n2 = (await api.call("GET", "/api/v1/nodes/n2")).json()
    assert n2["instances"] == [] and n2["status"] == {"instances": "many"}
    assert (await app(api))["instances"] == {"n1": [mine], "n2": []}


async def test_label_node_groups_win_over_registration(api: Api) -> None:
    register = {"node": "n1", "address": "127.0.0.1:9", "groups": ["default"]}
    await api.call("POST", "/api/v1/nodes/register", token=SECRET, json=register)
    labeled = await api.call("POST", "/api/v1/nodes/n1/groups", json={"groups": ["web", "eu"]})
    assert labeled.status_code == 200, labeled.text
    assert labeled.json()["groups"] == ["web", "eu"]
    again = await api.call("POST", "/api/v1/nodes/register", token=SECRET,
                           json={**register, "groups": ["gpu"]})
    assert again.status_code == 200
    node = (await api.call("GET", "/api/v1/nodes/n1")).json()
    assert (node["groups"], node["labeled"]) == (["web", "eu"], True)
    for body, fragment in (({}, "missing field 'groups'"),
                           ({"groups": ["no_underscores"]}, "not a valid group name"),
                           ({"groups": ["web"], "x": 1}, "unknown field 'x'")):
        bad = await api.call("POST", "/api/v1/nodes/n1/groups", json=body)
        assert bad.status_code == 400 and fragment in bad.json()["detail"], bad.text
    unknown = await api.call("POST", "/api/v1/nodes/ghost/groups", json={"groups": ["web"]})
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_node"
    secret = await api.call("POST", "/api/v1/nodes/n1/groups", token=SECRET,
                            json={"groups": ["web"]})
    assert secret.status_code == 401  # an operator's write, not a participant's


async def test_openapi_documents_the_scale_and_label_routes(api: Api) -> None:
    doc = (await api.call("GET", "/api/v1/openapi.json", token="")).json()
    scale = doc["paths"]["/api/v1/apps/{app}/scale"]["post"]
    assert "202" in scale["responses"]
    schema = scale["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"per_node", "instances", "auto", "groups"}
    label = doc["paths"]["/api/v1/nodes/{node}/groups"]["post"]
    assert label["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "groups"]
