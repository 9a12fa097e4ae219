"""Roles, teams and tokens on a real coordinator: every route of ``api.ROUTES`` for every
role, filtered lists, token expiry and revocation, and the ``tokens``/``teams`` commands."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import trio

from superagent.cli import main as cli_main
from superagent.coordinator.api import ROUTES, Endpoint
from tests.coordinator import test_api
from tests.coordinator.test_api import MANIFEST, SECRET, Api, tarball
from tests.support.wait import wait_until_async

api = test_api.api  # the fixture: a real single-node coordinator

# What each role may do, written out from the documented table rather than read from
# policy.GRANTS, so a change of the policy must change this too.
READS = {"cluster:read", "apps:read", "nodes:read", "audit:read"}
GRANTS = {
    "admin": READS | {"apps:write", "nodes:write", "artifacts:read", "tokens:admin",
                      "quotas:write", "cluster:admin"},
    "deployer": READS | {"apps:write"},
    "viewer": READS,
    "viewer-all": READS,
}
TEAMS = {"admin": [], "deployer": ["shop"], "viewer": ["shop"], "viewer-all": []}
OTHER_TEAM_OK = {"admin": True, "deployer": False, "viewer": False, "viewer-all": True}


async def make_token(api: Api, name: str, role: str, teams: list[str],
                     **extra: Any) -> str:
    response = await api.call("POST", "/api/v1/tokens",
                              json={"name": name, "role": role, "teams": teams, **extra})
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


async def make_app(api: Api, name: str, team: str) -> None:
    response = await api.call("POST", "/api/v1/apps", json={
        "app": {"name": name}, "run": {"command": "true"}, "team": team})
    assert response.status_code == 201, response.text
    assert response.json()["team"] == team


async def fleet(api: Api) -> None:
    """Apps of two teams (one more of each to delete), a node running one of each."""
    for name, team in (("shop-web", "shop"), ("blog-web", "blog"), ("doomed", "shop"),
                       ("doomed-blog", "blog")):
        await make_app(api, name, team)
    reg = await api.call("POST", "/api/v1/nodes/register", token=SECRET,
                         json={"node": "n1", "address": "127.0.0.1:9"})
    assert reg.status_code == 200, reg.text
    status = {"instances": [
        {"id": "i1", "app": "shop-web", "release": "r1", "state": "ready", "port": 1},
        {"id": "i2", "app": "blog-web", "release": "r1", "state": "ready", "port": 2}],
        "routes": {"shop-web": ["i1"], "blog-web": ["i2"]}}
    beat = await api.call("POST", "/api/v1/nodes/n1/heartbeat", token=SECRET,
                          json={"status": status})
    assert beat.status_code == 200, beat.text


def request_of(e: Endpoint, app: str, role: str) -> tuple[str, dict[str, Any]]:
    """A path and request arguments for route ``e`` about ``app``."""
    if e.method == "DELETE" and "{app}" in e.path:
        app = "doomed" if app == "shop-web" else "doomed-blog"
    path = (e.path.replace("{app}", app).replace("{deploy}", "d-none")
            .replace("{node}", "n1").replace("{action}", "online")
            .replace("{sha256}", "ab" * 32).replace("{name}", "nobody")
            .replace("{team}", "shop"))
    kw: dict[str, Any] = {}
    if e.path == "/api/v1/apps" and e.method == "POST":
        kw["json"] = {"app": {"name": f"new-{role}"}, "run": {"command": "true"},
                      "team": "shop"}
    elif e.path.endswith("/releases") and e.method == "POST":
        manifest = MANIFEST.replace(b'"hello"', f'"{app}"'.encode())
        kw["content"] = tarball({"superagent.toml": manifest})
        path += "?deploy=false"
    elif e.path.endswith("/scale"):
        kw["json"] = {"per_node": 1}
    elif e.path.endswith("/groups"):
        kw["json"] = {"groups": ["default"]}
    elif e.path.endswith("/rollback"):
        kw["json"] = {}
    elif e.path == "/api/v1/tokens" and e.method == "POST":
        kw["json"] = {"name": f"made-by-{role}", "role": "viewer"}
    elif e.path.endswith("/quota"):
        kw["json"] = {"apps": 100}
    return path, kw


@pytest.mark.parametrize("role", sorted(GRANTS))
async def test_every_route_for_every_role(api: Api, role: str) -> None:
    await fleet(api)
    token = await make_token(api, f"t-{role}", role.split("-")[0], TEAMS[role])
    checked = 0
    for e in ROUTES:
        if e.auth not in ("token", "any"):
            continue
        apps = ["shop-web", "blog-web"] if "{app}" in e.path else ["shop-web"]
        for app in apps:
            path, kw = request_of(e, app, role)
            response = await api.call(e.method, path, token=token, **kw)
            allowed = e.permission in GRANTS[role] and (
                app == "shop-web" or OTHER_TEAM_OK[role])
            where = (role, e.method, path, response.status_code, response.text[:300])
            if allowed:
                assert response.status_code not in (401, 403), where
                assert response.status_code < 500, where
            elif app == "blog-web" and not OTHER_TEAM_OK[role]:
                # an app the token may not see does not exist for it (no 403 naming the
                # team: that would tell which apps other teams have)
                assert response.status_code == 404, where
                assert response.json()["error"] == "unknown_app", where
            else:
                assert response.status_code == 403, where
                body = response.json()
                assert body["error"] == "forbidden", where
                assert body["missing"] == e.permission, where
            checked += 1
    assert checked >= 30
    # and the plain reads answer 200
    for path in ("/api/v1/cluster", "/api/v1/apps", "/api/v1/nodes", "/api/v1/audit",
                 "/api/v1/teams", "/api/v1/apps/shop-web", "/api/v1/nodes/n1"):
        response = await api.call("GET", path, token=token)
        assert response.status_code == 200, (role, path, response.text)


async def test_lists_show_only_the_apps_of_the_tokens_teams(api: Api) -> None:
    await fleet(api)
    viewer = await make_token(api, "watch-shop", "viewer", ["shop"])
    everyone = await make_token(api, "watch", "viewer", [])

    async def get(path: str, token: str) -> Any:
        response = await api.call("GET", path, token=token)
        assert response.status_code == 200, response.text
        return response.json()

    assert [a["name"] for a in (await get("/api/v1/apps", viewer))["apps"]] == [
        "doomed", "shop-web"]
    assert len((await get("/api/v1/apps", everyone))["apps"]) == 4
    node = (await get("/api/v1/nodes", viewer))["nodes"][0]
    assert [i["app"] for i in node["instances"]] == ["shop-web"]
    assert [i["app"] for i in node["status"]["instances"]] == ["shop-web"]
    assert node["status"]["routes"] == {"shop-web": ["i1"]}
    assert node["instances_used"] == 2  # how full the node is, not whose
    one = await get("/api/v1/nodes/n1", viewer)
    assert "blog-web" not in json.dumps(one)
    assert len((await get("/api/v1/nodes", api.token))["nodes"][0]["instances"]) == 2
    audit = (await get("/api/v1/audit", viewer))["audit"]
    targets = {e["target"] for e in audit}
    assert "app:shop-web" in targets and "app:blog-web" not in targets
    assert not any(t.startswith("token:") for t in targets)
    assert "node:n1" in targets
    admin_targets = {e["target"] for e in (await get("/api/v1/audit", api.token))["audit"]}
    assert {"app:blog-web", "token:watch-shop"} <= admin_targets
    teams = (await get("/api/v1/teams", viewer))["teams"]
    assert [t["team"] for t in teams] == ["shop"]
    assert teams[0]["apps"] == ["doomed", "shop-web"]
    status = await get("/api/v1/apps/blog-web", everyone)
    assert status["team"] == "blog"


async def test_deployer_creates_in_its_team_and_the_audit_names_it(api: Api) -> None:
    shop = await make_token(api, "ci-shop", "deployer", ["shop"])
    two = await make_token(api, "ci-two", "deployer", ["shop", "blog"])
    manifest = {"app": {"name": "cart"}, "run": {"command": "true"}}
    created = await api.call("POST", "/api/v1/apps", token=shop, json=manifest)
    assert created.status_code == 201 and created.json()["team"] == "shop"
    elsewhere = await api.call("POST", "/api/v1/apps", token=shop,
                               json={**manifest, "app": {"name": "x"}, "team": "blog"})
    assert elsewhere.status_code == 403 and elsewhere.json()["missing"] == "team:blog"
    unsaid = await api.call("POST", "/api/v1/apps", token=two,
                            json={**manifest, "app": {"name": "y"}})
    assert unsaid.status_code == 403 and unsaid.json()["missing"] == "team"
    upload = await api.call("POST", "/api/v1/apps/hello/releases?deploy=false&team=blog",
                            token=two, content=tarball({"superagent.toml": MANIFEST}))
    assert upload.status_code == 201, upload.text
    hello = (await api.call("GET", "/api/v1/apps/hello")).json()
    assert hello["team"] == "blog"
    wrong = await api.call("POST", "/api/v1/apps/hello/releases?deploy=false&team=shop",
                           token=two, content=tarball({"superagent.toml": MANIFEST}))
    assert wrong.status_code == 409 and "team 'blog'" in wrong.json()["detail"]
    default = await api.call("POST", "/api/v1/apps",
                             json={**manifest, "app": {"name": "plain"}})
    assert default.json()["team"] == "default"
    deleted = await api.call("DELETE", "/api/v1/apps/cart", token=shop)
    assert deleted.status_code == 200
    audit = (await api.call("GET", "/api/v1/audit")).json()["audit"]
    actors = {(e["type"], e["target"]): e["actor"] for e in audit}
    assert actors[("create_app", "app:cart")] == "ci-shop"
    assert actors[("delete_app", "app:cart")] == "ci-shop"
    assert actors[("add_release", "app:hello")] == "ci-two"
    assert actors[("add_token", "token:ci-shop")] == "admin"


async def test_expired_and_revoked_tokens_get_401(api: Api) -> None:
    brief = await make_token(api, "brief", "viewer", [], expires_at=time.time() + 1.0)
    assert (await api.call("GET", "/api/v1/apps", token=brief)).status_code == 200

    async def refused() -> Any:
        response = await api.call("GET", "/api/v1/apps", token=brief)
        return response if response.status_code == 401 else None

    response = await wait_until_async(refused, "the token to expire", timeout=10.0)
    assert "expired" in response.json()["detail"]
    kept = await make_token(api, "kept", "deployer", ["shop"])
    assert (await api.call("GET", "/api/v1/apps", token=kept)).status_code == 200
    revoked = await api.call("DELETE", "/api/v1/tokens/kept")
    assert revoked.status_code == 200, revoked.text
    gone = await api.call("GET", "/api/v1/apps", token=kept)
    assert gone.status_code == 401 and gone.json()["error"] == "unauthorized"
    again = await api.call("DELETE", "/api/v1/tokens/kept")
    assert again.status_code == 404 and again.json()["error"] == "unknown_token"
    listed = (await api.call("GET", "/api/v1/tokens")).json()["tokens"]
    assert [t["name"] for t in listed] == ["admin", "brief"]
    assert listed[0]["role"] == "admin" and listed[0]["last_used"] is not None
    assert "sha256" not in json.dumps(listed) and brief not in json.dumps(listed)


@pytest.mark.parametrize(("body", "problem"), [
    ({"name": "x", "role": "root"}, "role"),
    ({"name": "x", "role": "deployer"}, "team"),
    ({"name": "x", "role": "admin", "teams": ["shop"]}, "team"),
    ({"name": "Bad Name", "role": "viewer"}, "name"),
    ({"name": "x", "role": "viewer", "expires_at": 1.0}, "past"),
    ({"name": "x", "role": "viewer", "token": "short"}, "token"),
    ({"name": "x", "role": "viewer", "colour": "red"}, "colour"),
    ({"role": "viewer"}, "name"),
])
async def test_bad_token_requests_are_400s_naming_the_field(api: Api, body: dict[str, Any],
                                                            problem: str) -> None:
    response = await api.call("POST", "/api/v1/tokens", json=body)
    assert response.status_code == 400, response.text
    assert problem in response.json()["detail"]


async def test_a_retried_token_create_applies_once(api: Api) -> None:
    body = {"name": "ci", "role": "viewer", "token": "sa_" + "x" * 40}
    headers = {"idempotency-key": "make-ci"}
    first = await api.call("POST", "/api/v1/tokens", json=body, headers=headers)
    second = await api.call("POST", "/api/v1/tokens", json=body, headers=headers)
    assert (first.status_code, second.status_code) == (201, 201), second.text
    assert second.json()["repeated"] is True
    assert (await api.call("GET", "/api/v1/apps", token=body["token"])).status_code == 200


async def test_quota_refuses_an_app_too_many(api: Api) -> None:
    set_quota = await api.call("PUT", "/api/v1/teams/shop/quota", json={"apps": 1})
    assert set_quota.status_code == 200, set_quota.text
    await make_app(api, "one", "shop")
    refused = await api.call("POST", "/api/v1/apps", json={
        "app": {"name": "two"}, "run": {"command": "true"}, "team": "shop"})
    assert refused.status_code == 409
    assert refused.json()["error"] == "quota_exceeded"
    assert "apps" in refused.json()["detail"] and "'shop'" in refused.json()["detail"]
    teams = (await api.call("GET", "/api/v1/teams")).json()["teams"]
    assert teams == [{"team": "shop", "quota": {"apps": 1, "instances": None, "memory": None},
                      "usage": {"apps": 1, "instances": 0, "memory": 0}, "apps": ["one"]}]
    bad = await api.call("PUT", "/api/v1/teams/shop/quota", json={"apps": -1})
    assert bad.status_code == 400 and "apps" in bad.json()["detail"]


async def test_cli_tokens_and_teams_commands(api: Api, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    common = ["--server", api.url, "--token", api.token]

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli_main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    async def cli(*argv: str) -> tuple[int, str, str]:
        return await trio.to_thread.run_sync(lambda: run(*argv))

    code, out, err = await cli("tokens", "create", "ci-shop", "--role", "deployer",
                               "--team", "shop", "--expires", "30d", *common)
    assert code == 0, err
    token = out.strip().splitlines()[-1]  # the coordinator in this process logs too
    assert token.startswith("sa_") and "shown once" in err
    code, out, _ = await cli("tokens", "list", *common)
    assert code == 0 and "ci-shop" in out and "deployer" in out and "shop" in out
    assert token not in out
    code, out, _ = await cli("tokens", "list", "--json", *common)
    listed = {t["name"]: t for t in json.loads(out)["tokens"]}
    assert listed["ci-shop"]["expires_at"] > time.time() + 29 * 86400
    code, _, err = await cli("tokens", "create", "x", "--role", "deployer", *common)
    assert code == 2 and "team" in err
    code, _, err = await cli("tokens", "create", "x", "--expires", "soon", *common)
    assert code == 2 and "--expires" in err
    code, _, err = await cli("tokens", "list", "--server", api.url, "--token", token)
    assert code == 2 and "tokens:admin" in err
    code, out, _ = await cli("teams", "quota", "shop", "--apps", "3", "--memory", "4G",
                             *common)
    assert code == 0 and "shop" in out
    code, out, _ = await cli("teams", "list", "--json", *common)
    assert json.loads(out)["teams"][0]["quota"] == {"apps": 3, "instances": None,
                                                    "memory": 4 * 1024**3}
    code, out, _ = await cli("teams", "list", *common)
    assert code == 0 and "shop" in out and "3" in out
    code, _, err = await cli("teams", "quota", "shop", "--memory", "lots", *common)
    assert code == 2 and "--memory" in err
    code, out, _ = await cli("tokens", "revoke", "ci-shop", *common)
    assert code == 0 and "revoked" in out
    code, _, err = await cli("apps", "--server", api.url, "--token", token)
    assert code == 2 and "refused" in err


def test_every_token_route_names_a_known_permission() -> None:
    from superagent.coordinator.api_openapi import openapi_document
    from superagent.coordinator.policy import PERMISSIONS

    doc = openapi_document(ROUTES)
    for e in ROUTES:
        op = doc["paths"][e.path][e.method.lower()]
        if e.auth in ("token", "any"):
            assert e.permission in PERMISSIONS, e
            assert op["x-permission"] == e.permission and "403" in op["responses"]
        else:
            assert not e.permission and "x-permission" not in op, e


async def test_a_team_that_is_no_name_is_a_400(api: Api) -> None:
    response = await api.call("POST", "/api/v1/apps", json={
        "app": {"name": "x"}, "run": {"command": "true"}, "team": 7})
    assert response.status_code == 400 and "team" in response.json()["detail"]
    response = await api.call("POST", "/api/v1/apps", json={
        "app": {"name": "x"}, "run": {"command": "true"}, "team": "Not A Team"})
    assert response.status_code == 400 and "team" in response.json()["detail"]
