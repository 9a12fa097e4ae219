"""The dashboard's server side on a real coordinator: its files, login and logout, the
session cookie in place of a bearer (same checks), CSRF on writes, whoami, traffic."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator

import httpx

from superagent.coordinator.api_traffic import merge_traffic
from superagent.coordinator.ui.sessions import SessionStore, csrf_ok
from tests.coordinator import test_api
from tests.coordinator.test_api import SECRET, Api
from tests.coordinator.test_api_access import make_app, make_token
from tests.support.wait import wait_until_async

api = test_api.api  # the fixture: a real single-node coordinator


@contextlib.asynccontextmanager
async def login(api: Api, token: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client holding the session cookies of a login with ``token``."""
    async with httpx.AsyncClient(base_url=api.url, timeout=10.0) as client:
        response = await client.post("/ui/login", json={"token": token})
        assert response.status_code == 200, response.text
        yield client


async def test_pages_are_served_with_a_strict_policy(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        moved = await client.get("/ui")
        assert moved.status_code == 308 and moved.headers["location"] == "/ui/"
        page = await client.get("/ui/")
        assert page.status_code == 200 and "app.js" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        script = await client.get("/ui/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        missing = await client.get("/ui/..%2Fweb.py")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"


async def test_login_sets_strict_cookies_and_whoami_follows_the_role(api: Api) -> None:
    viewer = await make_token(api, "watcher", "viewer", ["shop"])
    async with httpx.AsyncClient(base_url=api.url) as client:
        response = await client.post("/ui/login", json={"token": viewer})
        assert response.status_code == 200, response.text
        assert response.json() == {"name": "watcher", "role": "viewer", "teams": ["shop"],
                                   "expires_at": None, "permissions": [
                                       "apps:read", "audit:read", "cluster:read", "nodes:read"]}
        cookies = response.headers.get_list("set-cookie")
        session = next(c for c in cookies if c.startswith("sa_session="))
        csrf = next(c for c in cookies if c.startswith("sa_csrf="))
        assert "HttpOnly" in session and "SameSite=strict" in session
        assert "HttpOnly" not in csrf and "SameSite=strict" in csrf
        assert "Secure" not in session  # plain HTTP here; Secure over HTTPS
        who = await client.get("/api/v1/whoami")
        assert who.status_code == 200 and who.json()["name"] == "watcher"
        # the session is the token: a viewer's write is refused as the API refuses it
        refused = await client.post("/api/v1/nodes/n1/drain",
                                    headers={"x-csrf-token": client.cookies["sa_csrf"]})
        assert refused.status_code == 403 and refused.json()["missing"] == "nodes:write"


async def test_over_https_the_session_cookie_is_secure(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        response = await client.post("/ui/login", json={"token": api.token},
                                     headers={"x-forwarded-proto": "https"})
        assert all("Secure" in c for c in response.headers.get_list("set-cookie"))


async def test_a_wrong_token_gets_a_clear_refusal(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        for body, status, detail in (
                ({"token": "sa_" + "x" * 40}, 401, "unknown or revoked token"),
                ({"token": ""}, 400, "field 'token'"), ({}, 400, "field 'token'")):
            response = await client.post("/ui/login", json=body)
            assert response.status_code == status
            assert detail in response.json()["detail"]
            assert "set-cookie" not in response.headers
        # a cross-site HTML form cannot send JSON: it cannot log a browser in either
        form = await client.post("/ui/login", data={"token": api.token})
        assert form.status_code == 415 and "set-cookie" not in form.headers


async def test_an_expired_token_is_named(api: Api) -> None:
    token = await make_token(api, "brief", "viewer", [], expires_at=time.time() + 0.5)
    async with httpx.AsyncClient(base_url=api.url) as client:
        async def refused() -> httpx.Response | None:
            response = await client.post("/ui/login", json={"token": token})
            return response if response.status_code == 401 else None
        response = await wait_until_async(refused, "the token to expire", timeout=10.0)
        assert "expired" in response.json()["detail"]


async def test_writes_need_the_csrf_header(api: Api) -> None:
    await make_app(api, "shop-web", "shop")
    async with login(api, api.token) as client:
        body = {"per_node": 1}
        missing = await client.post("/api/v1/apps/shop-web/scale", json=body)
        assert missing.status_code == 403 and missing.json()["error"] == "csrf"
        wrong = await client.post("/api/v1/apps/shop-web/scale", json=body,
                                  headers={"x-csrf-token": "not-it"})
        assert wrong.status_code == 403
        ok = await client.post("/api/v1/apps/shop-web/scale", json=body,
                               headers={"x-csrf-token": client.cookies["sa_csrf"]})
        assert ok.status_code == 202, ok.text


async def test_a_revoked_token_ends_the_session_and_logout_ends_it_too(api: Api) -> None:
    token = await make_token(api, "ops", "admin", [])
    async with login(api, token) as client:
        assert (await client.get("/api/v1/apps")).status_code == 200
        revoked = await api.call("DELETE", "/api/v1/tokens/ops")
        assert revoked.status_code == 200, revoked.text
        assert (await client.get("/api/v1/apps")).status_code == 401
    async with login(api, api.token) as client:
        csrf = client.cookies["sa_csrf"]
        assert (await client.post("/ui/logout")).status_code == 403  # no CSRF header
        out = await client.post("/ui/logout", headers={"x-csrf-token": csrf})
        assert out.status_code == 200
        assert 'sa_session=""' in out.headers.get_list("set-cookie")[0]
        client.cookies.clear()
        client.cookies.set("sa_session", "gone")
        stale = await client.get("/api/v1/apps")
        assert stale.status_code == 401 and stale.json()["error"] == "session_expired"


async def test_a_team_session_sees_its_team_only(api: Api) -> None:
    await make_app(api, "shop-web", "shop")
    await make_app(api, "blog-web", "blog")
    async with login(api, await make_token(api, "shopper", "deployer", ["shop"])) as client:
        apps = (await client.get("/api/v1/apps")).json()["apps"]
        assert [a["name"] for a in apps] == ["shop-web"]


async def test_traffic_sums_heartbeats_for_the_apps_the_token_sees(api: Api) -> None:
    await make_app(api, "shop-web", "shop")
    await make_app(api, "blog-web", "blog")
    for node in ("n1", "n2"):
        reg = await api.call("POST", "/api/v1/nodes/register", token=SECRET,
                             json={"node": node, "address": "127.0.0.1:9"})
        assert reg.status_code == 200, reg.text
        traffic = {"le": [0.1, 1.0], "apps": {
            "shop-web": {"statuses": {"200": 8, "503": 2}, "latency": [6, 3, 1, 2.5, 10]},
            "blog-web": {"statuses": {"200": 1}, "latency": [1, 0, 0, 0.01, 1]}}}
        beat = await api.call("POST", f"/api/v1/nodes/{node}/heartbeat", token=SECRET,
                              json={"status": {"instances": [], "traffic": traffic}})
        assert beat.status_code == 200, beat.text
    shopper = await make_token(api, "shopper", "viewer", ["shop"])
    doc = (await api.call("GET", "/api/v1/traffic", token=shopper)).json()
    assert doc["le"] == [0.1, 1.0]
    assert doc["apps"] == {"shop-web": {"requests": 20, "errors": 4,
                                        "statuses": {"200": 16, "503": 4},
                                        "latency": [12.0, 6.0, 2.0, 5.0, 20.0],
                                        "nodes": ["n1", "n2"]}}


def test_traffic_skips_what_is_not_of_the_expected_shape() -> None:
    statuses = {"n1": {"traffic": {"le": "x", "apps": {"a": {"statuses": {"x": 1, "200": "2"},
                                                             "latency": ["no"]}}}},
                "n2": {"traffic": []}, "n3": "garbage"}
    assert merge_traffic(statuses, {"a"}) == {"le": [], "apps": {"a": {
        "requests": 0, "errors": 0, "statuses": {}, "latency": [], "nodes": ["n1"]}}}


def test_sessions_end_when_idle_at_their_lifetime_and_beyond_the_limit() -> None:
    store = SessionStore(idle=10.0, lifetime=30.0, limit=2)
    a = store.create("t", now=0.0)
    assert store.get(a.id, 9.0) == a
    assert store.get(a.id, 18.0) == a  # used at 9: not idle yet
    assert store.get(a.id, 29.0) is None  # idle 11 s
    b = store.create("t", now=0.0)
    for at in (8.0, 16.0, 24.0):
        assert store.get(b.id, at) == b
    assert store.get(b.id, 31.0) is None  # past its lifetime, however used
    first, second, third = (store.create("t", now=40.0) for _ in range(3))
    assert store.get(first.id, 41.0) is None and len(store) == 2
    assert store.get(third.id, 41.0) == third
    store.end(third.id)
    assert store.get(third.id, 41.0) is None
    assert csrf_ok(second, second.csrf) and not csrf_ok(second, None)
    assert not csrf_ok(second, second.csrf + "x")


def test_a_flood_of_logins_with_one_token_ends_only_its_own_sessions() -> None:
    """Beyond ``per_token`` sessions a token's own least recently used session ends; the
    sessions of other tokens stay, however many logins the one token makes."""
    store = SessionStore(limit=10, per_token=3)
    admin = store.create("admin", now=0.0)
    viewer = [store.create("viewer", now=1.0) for _ in range(100)]
    assert store.get(admin.id, 2.0) == admin
    assert [store.get(v.id, 2.0) is not None for v in viewer[-4:]] == [False, True, True, True]
    assert len(store) == 4


def test_traffic_survives_any_heartbeat_document() -> None:
    """A participant's figures are summed into a JSON answer: a number that cannot be a
    float, sums past the float range, a digit that int() refuses, or statuses that are
    not an object must be skipped, not fail the view (or its JSON encoding)."""
    huge = {"statuses": {"200": 1}, "latency": [1e308, 1.0]}
    statuses = {"n1": {"traffic": {"le": [10**400, 0.5], "apps": {"a": huge}}},
                "n2": {"traffic": {"le": [], "apps": {"a": huge}}},
                "n3": {"traffic": {"apps": {"a": {"statuses": {"²": 3, "201": 2},
                                                  "latency": [10**400]}}}},
                "n4": {"traffic": {"apps": {"a": {"statuses": ["200"]}}}},
                "n5": {"traffic": {"apps": {"a": {"statuses": {"200": True, "500": -4}}}}}}
    doc = merge_traffic(statuses, {"a"})
    json.dumps(doc, allow_nan=False)  # what JSONResponse does
    assert doc["le"] == [0.5]
    assert doc["apps"]["a"]["statuses"] == {"200": 2, "201": 2}
    assert doc["apps"]["a"]["requests"] == 4 and doc["apps"]["a"]["errors"] == 0


async def test_a_malformed_heartbeat_does_not_break_traffic(api: Api) -> None:
    await make_app(api, "shop-web", "shop")
    reg = await api.call("POST", "/api/v1/nodes/register", token=SECRET,
                         json={"node": "n1", "address": "127.0.0.1:9"})
    assert reg.status_code == 200, reg.text
    traffic = {"le": [10**400], "apps": {"shop-web": {"statuses": {"²": 1},
                                                      "latency": [1e308, 1e308]}}}
    for node in ("n1", "n1"):  # twice: the sums of two readings stay finite too
        beat = await api.call("POST", f"/api/v1/nodes/{node}/heartbeat", token=SECRET,
                              json={"status": {"instances": [], "traffic": traffic}})
        assert beat.status_code == 200, beat.text
    answer = await api.call("GET", "/api/v1/traffic")
    assert answer.status_code == 200, answer.text
    assert answer.json()["apps"]["shop-web"]["requests"] == 0

