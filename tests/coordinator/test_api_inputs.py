"""Hostile input against a real 3-coordinator cluster: bad archives, deep JSON, unmatched
routes, wrong query parameters, and random bodies on every route of ``api.ROUTES``.

Every refusal is a 4xx with the JSON error shape naming the problem; no request makes a
coordinator answer 5xx or log a traceback (each member's log is read at the end). A
refused archive leaves nothing anywhere: every member's artifact directory is compared
before and after, and no member's state knows the app.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from superagent.coordinator.api import ROUTES, Endpoint
from tests.coordinator.cluster import COORDINATOR_SECRET, SECRET, Cluster
from tests.participant.tarballs import (
    file,
    link,
    make_tar,
    many_files,
    special,
    zero_bomb,
)

APP = "evil"
MANIFEST = file("superagent.toml", f'[app]\nname = "{APP}"\n[run]\ncommand = "true"\n')
SECRET_AUTH = {"authorization": f"Bearer {SECRET}"}  # participants' (legacy, shared)
PEER_AUTH = {"authorization": f"Bearer {COORDINATOR_SECRET}"}  # coordinators' only
TRACEBACK_MARKERS = ("Traceback", "api handler failed", '"exception"')


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for the module: every test here leaves the state as it found it, except
    the accepted control upload (app ``good``), which no other test looks at."""
    with Cluster(tmp_path_factory.mktemp("inputs")) as c:
        c.start_all()
        c.wait_ready()
        yield c


def stored(cluster: Cluster) -> dict[str, list[str]]:
    """Every file under every member's artifact directory (blobs and temporary files)."""
    return {m.id: sorted(str(p.relative_to(m.data_dir)) for p in
                         (m.data_dir / "artifacts").rglob("*") if not p.is_dir())
            for m in cluster.members}


def no_tracebacks(cluster: Cluster) -> None:
    for m in cluster.members:
        text = m.log_path.read_text(errors="replace")
        for marker in TRACEBACK_MARKERS:
            assert marker not in text, f"{m.id} logged {marker!r}:\n{m.tail()}"


def upload(cluster: Cluster, i: int, data: bytes, app: str = APP) -> httpx.Response:
    return cluster.post(i, f"/api/v1/apps/{app}/releases", content=data,
                        params={"deploy": "false"},  # no participants here
                        headers={"content-type": "application/gzip"}, timeout=30)


# name -> (archive, member named, words of the reason, error code)
BAD_ARCHIVES: dict[str, tuple[bytes, str, str, str]] = {
    "absolute path": (make_tar([MANIFEST, file("/etc/evil", "x")]), "/etc/evil",
                      "absolute path", "unsafe_archive"),
    "absolute path not in UTF-8": (make_tar([MANIFEST, file("/etc/\udcff", "x")]),
                                   "/etc/\\udcff", "absolute path", "unsafe_archive"),
    "dotdot": (make_tar([MANIFEST, file("../escape", "x")]), "../escape", "'..'",
               "unsafe_archive"),
    "symlink out of the tree": (make_tar([MANIFEST, link("up", "../../etc")]), "up",
                                "outside the archive's tree", "unsafe_archive"),
    "symlink to an absolute path": (make_tar([MANIFEST, link("pw", "/etc/passwd")]), "pw",
                                    "absolute path", "unsafe_archive"),
    "hardlink out of the tree": (make_tar([MANIFEST, link("h", "/etc/shadow",
                                                          tarfile.LNKTYPE)]),
                                 "h", "hardlinks are refused", "unsafe_archive"),
    "device node": (make_tar([MANIFEST, special("null", tarfile.CHRTYPE)]), "null",
                    "character device", "unsafe_archive"),
    "100k files": (many_files(100_000, first=(MANIFEST,)), "f19999", "more than 20000 members",
                   "archive_too_large"),
    "2 GiB of zeros in 2 MB": (zero_bomb("zeros.bin", 2 * 1024**3, first=(MANIFEST,)),
                               "zeros.bin", "declares 2147483648", "archive_too_large"),
    "300 MiB of zeros in 300 KB": (zero_bomb("zeros.bin", 300 * 1024**2, first=(MANIFEST,)),
                                   "zeros.bin", "times its compressed size",
                                   "archive_too_large"),
}


@pytest.mark.parametrize("case", list(BAD_ARCHIVES))
def test_a_bad_archive_is_refused_at_upload_and_nothing_is_kept(cluster: Cluster,
                                                                case: str) -> None:
    """A 400 naming the member and why, on the leader or a follower; afterwards no member
    holds a new file in its artifact store and none knows the app."""
    archive, member, reason, code = BAD_ARCHIVES[case]
    leader = cluster.leader()
    target = leader if len(case) % 2 else (leader + 1) % 3  # leaders and followers alike
    before = stored(cluster)
    response = upload(cluster, target, archive)
    assert response.status_code == 400, response.text
    body = response.json()
    assert (body["error"], body["member"]) == (code, member), body
    assert reason in body["detail"], body
    assert stored(cluster) == before
    for i in range(3):
        assert cluster.get(i, f"/api/v1/apps/{APP}").status_code == 404
    audit = cluster.get(leader, "/api/v1/audit?limit=1000").json()["audit"]
    assert not [e for e in audit if APP in json.dumps(e)]


def test_a_good_archive_is_still_stored_on_a_majority(cluster: Cluster) -> None:
    """The control: the same path accepts a clean archive, so the checks above can fail."""
    before = stored(cluster)
    manifest = file("superagent.toml", '[app]\nname = "good"\n[run]\ncommand = "true"\n')
    response = upload(cluster, cluster.leader(), make_tar([manifest, link("l", "app.py"),
                                                           file("app.py", "x")]), app="good")
    assert response.status_code == 201, response.text
    grew = [m for m, files in stored(cluster).items() if files != before[m]]
    assert len(grew) >= 2


@pytest.mark.parametrize("member", [0, 1])
def test_deep_json_is_a_400_not_a_recursion_error(cluster: Cluster, member: int) -> None:
    """``[`` x 100000 on public routes, on the internal propose route (which only the
    leader reads) and on a route a follower forwards to the leader: a 400 naming the depth,
    nothing logged."""
    deep = b"[" * 100_000
    i = (cluster.leader() + member) % 3
    routes = [("/api/v1/apps", {}), ("/api/v1/nodes/register", SECRET_AUTH),
              ("/api/v1/apps/x/scale", {})]
    if member == 0:
        routes.append(("/api/v1/internal/propose", PEER_AUTH))
    for path, headers in routes:
        response = cluster.post(i, path, content=deep, headers=headers)
        assert response.status_code == 400, (path, response.text)
        assert "deep" in response.json()["detail"], (path, response.text)
    no_tracebacks(cluster)


def test_unmatched_routes_and_methods_answer_json(cluster: Cluster) -> None:
    """404 not_found and 405 method_not_allowed (with every allowed method in Allow)."""
    for path in ("/api/v1/nope", "/nope", "/api/v1/apps/a/b/c/d/e"):
        response = cluster.get(0, path)
        assert response.status_code == 404, path
        assert response.json()["error"] == "not_found"
        assert path in response.json()["detail"]
    response = cluster.request("PUT", 0, "/api/v1/apps")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    deleted = cluster.request("PATCH", 0, "/api/v1/apps/hello")
    assert deleted.status_code == 405
    assert set(deleted.headers["allow"].split(", ")) == {"DELETE", "GET", "HEAD"}


@pytest.mark.parametrize(("path", "param"), [
    ("/api/v1/audit?limit=ten", "limit"),
    ("/api/v1/apps/x/releases?sha256=xyz", "sha256"),
    ("/api/v1/apps/x/releases?force=maybe", "force"),
    ("/api/v1/apps/x/releases?deploy=perhaps", "deploy"),
    ("/api/v1/apps/x/releases?max_parallel=many", "max_parallel"),
    ("/api/v1/apps/x/releases?drain_grace=nan", "drain_grace"),
])
def test_query_parameters_of_the_wrong_type_are_named(cluster: Cluster, path: str,
                                                      param: str) -> None:
    """A 400 whose detail names the parameter; nothing is stored."""
    method = "GET" if "audit" in path else "POST"
    before = stored(cluster)
    response = cluster.request(method, 0, path, content=make_tar([MANIFEST]))
    assert response.status_code == 400, response.text
    assert param in response.json()["detail"]
    assert stored(cluster) == before


# ---------------------------------------------------------------------- property test
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20)
                    | st.floats(allow_nan=False, allow_infinity=False),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)
BODIES = JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=300)
PARAMS = st.sampled_from(["hello", "x", "n1", "d1", "drain", "offline", "groups", "0" * 64,
                          "register", "..", "%"]) | st.text(min_size=1, max_size=16)
QUERY = st.dictionaries(st.sampled_from(["limit", "sha256", "force", "deploy", "max_parallel",
                                         "drain_grace"]), st.text(max_size=8), max_size=3)


def _auth(cluster: Cluster, route: Endpoint) -> dict[str, str]:
    if route.auth == "secret":
        return PEER_AUTH
    if route.auth == "node":
        return SECRET_AUTH
    if route.auth == "join":
        return {"authorization": "Bearer sj_not-a-join-token"}
    return cluster.admin() if route.auth != "none" else {"authorization": ""}


@pytest.mark.parametrize("node", ["\x1f", "\u00b2\x1b7dW", "a b", "%"])
def test_a_forwarded_path_keeps_its_encoding(cluster: Cluster, node: str) -> None:
    """A follower forwards a heartbeat for a node name no URL can carry decoded (control
    characters, spaces): the leader answers it (an unknown node), never a 500."""
    follower = (cluster.leader() + 1) % 3
    response = cluster.post(follower, f"/api/v1/nodes/{quote(node, safe='')}/heartbeat",
                            json={"status": {}}, headers=SECRET_AUTH)
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "unknown_node", response.text


@given(route=st.sampled_from(ROUTES), params=st.lists(PARAMS, min_size=3, max_size=3),
       body=BODIES, query=QUERY, member=st.integers(0, 2))
@settings(max_examples=120, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
def test_random_bodies_on_every_route_never_get_a_5xx(cluster: Cluster, route: Endpoint,
                                                      params: list[str], body: bytes,
                                                      query: dict[str, str],
                                                      member: int) -> None:
    """Random JSON values and random bytes, with random path and query parameters, sent to
    every route of the API on any member: never a 5xx, always the JSON error shape."""
    values = iter(params)
    path = re.sub(r"\{[^}]+\}", lambda _: quote(next(values), safe=""), route.path)
    response = cluster.http.request(route.method, cluster.api(member) + path, params=query,
                                    content=body, headers=_auth(cluster, route), timeout=20)
    if route.path == "/healthz" and response.status_code == 503:
        return  # no leader known for a moment is what /healthz is for
    assert response.status_code < 500, (route.method, path, query, body, response.text)
    if response.status_code >= 400 and route.method != "HEAD":
        assert isinstance(response.json().get("error"), str), response.text


def test_nothing_above_was_answered_5xx_or_logged_a_traceback(cluster: Cluster) -> None:
    """Last: every member's log is free of tracebacks and its metrics of 500s."""
    no_tracebacks(cluster)
    for i in range(3):
        metrics = cluster.get(i, "/metrics").text
        assert not re.search(r'status="5\d\d"', metrics.replace('status="503"', "")), metrics

