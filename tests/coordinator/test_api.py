"""The coordinator API on a real single-node coordinator (Raft, store, hypercorn) in-process."""

from __future__ import annotations

import io
import json
import math
import tarfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from superagent.cli import main as cli_main
from superagent.coordinator import commands as cmd
from superagent.coordinator.deploy.outcomes import WATCH_WINDOW
from superagent.coordinator.reconciler import Reconciler
from superagent.coordinator.service import Coordinator, CoordinatorConfig
from tests.coordinator.helpers import FAST_ELECTION, spec
from tests.support.ports import free_port
from tests.support.wait import wait_until_async

SECRET = "test-secret"
STALL = 2.0  # seconds the coordinator's loop is blocked: twice its node_timeout


def tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MANIFEST = b'[app]\nname = "hello"\n[run]\ncommand = "python3 app.py"\n'


class Api:
    def __init__(self, coordinator: Coordinator, http: httpx.AsyncClient, token: str) -> None:
        self.coordinator, self.http, self.token = coordinator, http, token
        self.url = coordinator.config.url

    def auth(self, token: str | None = None) -> dict[str, str]:
        token = self.token if token is None else token
        return {"authorization": f"Bearer {token}"} if token else {}

    async def call(self, method: str, path: str, *, token: str | None = None,
                   **kw: Any) -> httpx.Response:
        headers = {**self.auth(token), **kw.pop("headers", {})}
        return await self.http.request(method, f"{self.url}{path}", headers=headers, **kw)


@pytest.fixture
async def api(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Api]:
    config = CoordinatorConfig(
        id="c1", peers={"c1": f"127.0.0.1:{free_port()}"}, api=("127.0.0.1", free_port()),
        data_dir=tmp_path / "c1", secret=SECRET, admin_token_file=tmp_path / "token",
        node_timeout=1.0, max_upload=64 * 1024, election_timeout=FAST_ELECTION)
    coordinator = Coordinator(config)
    # the API alone: tests play the reconciler's part (placements, FinishScale) themselves
    coordinator.reconciler = Reconciler(coordinator, period=math.inf)
    await nursery.start(coordinator.run)
    token_file = tmp_path / "token"
    await wait_until_async(token_file.exists, "the admin token file", timeout=10.0)
    async with httpx.AsyncClient(timeout=10.0) as http:
        yield Api(coordinator, http, token_file.read_text().strip())
    nursery.cancel_scope.cancel()


async def test_admin_token_is_shown_once_and_stored_hashed(api: Api, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    tokens = api.coordinator.read(lambda s: dict(s.tokens))
    assert list(tokens) == ["admin"]
    assert api.token not in json.dumps(tokens)
    assert api.token not in api.coordinator.read(lambda s: s.to_json())


@pytest.mark.parametrize("path", ["/api/v1/apps", "/api/v1/cluster", "/api/v1/nodes",
                                  "/api/v1/audit"])
async def test_admin_endpoints_refuse_missing_wrong_and_secret_credentials(
        api: Api, path: str) -> None:
    for token in ("", "sa_wrong", SECRET):
        response = await api.call("GET", path, token=token)
        assert response.status_code == 401, (token, response.text)
        assert response.json()["error"] == "unauthorized"


async def test_internal_endpoints_refuse_the_admin_token(api: Api) -> None:
    response = await api.call("POST", "/api/v1/nodes/register",
                              json={"node": "n1", "address": "127.0.0.1:1"})
    assert response.status_code == 401


async def test_health_metrics_and_openapi_need_no_token(api: Api) -> None:
    health = await api.call("GET", "/healthz", token="")
    assert health.status_code == 200
    assert health.json()["role"] == "leader"
    assert health.headers["x-superagent-leader"] == api.url
    metrics = (await api.call("GET", "/metrics", token="")).text
    assert "superagent_coordinator_is_leader 1" in metrics
    doc = (await api.call("GET", "/api/v1/openapi.json", token="")).json()
    assert doc["openapi"].startswith("3.")
    assert "post" in doc["paths"]["/api/v1/apps/{app}/releases"]
    assert doc["paths"]["/api/v1/apps"]["get"]["security"] == [{"token": []}]


async def test_app_lifecycle_with_clear_errors(api: Api) -> None:
    manifest = {"app": {"name": "hello"}, "run": {"command": "python3 app.py"}}
    created = await api.call("POST", "/api/v1/apps", json=manifest)
    assert created.status_code == 201, created.text
    assert created.json()["spec"]["run"]["command"] == "python3 app.py"
    again = await api.call("POST", "/api/v1/apps", json=manifest)
    assert again.status_code == 409
    assert "already exists" in again.json()["detail"]

    bad = await api.call("POST", "/api/v1/apps",
                         json={"app": {"name": "x"}, "run": {"comand": "y"}})
    assert bad.status_code == 400
    assert "run" in bad.json()["detail"]
    not_json = await api.call("POST", "/api/v1/apps", content=b"{nope")
    assert not_json.status_code == 400
    assert not_json.json()["detail"] == "request body is not valid JSON"

    listed = (await api.call("GET", "/api/v1/apps")).json()["apps"]
    assert [a["name"] for a in listed] == ["hello"]
    assert (await api.call("GET", "/api/v1/apps/nope")).status_code == 404
    assert (await api.call("DELETE", "/api/v1/apps/hello")).status_code == 200
    assert (await api.call("GET", "/api/v1/apps/hello")).status_code == 404
    audit = (await api.call("GET", "/api/v1/audit?limit=5")).json()["audit"]
    audit = [e for e in audit if e["target"] == "app:hello"]
    assert [(e["type"], e["actor"]) for e in audit[:2]] == [
        ("delete_app", "admin"), ("create_app", "admin")]
    assert (await api.call("GET", "/api/v1/audit?limit=0")).status_code == 400


async def test_idempotency_key_applies_a_retried_write_once(api: Api) -> None:
    manifest = {"app": {"name": "once"}, "run": {"command": "true"}}
    headers = {"idempotency-key": "ci-job-17"}
    first = await api.call("POST", "/api/v1/apps", json=manifest, headers=headers)
    second = await api.call("POST", "/api/v1/apps", json=manifest, headers=headers)
    assert (first.status_code, second.status_code) == (201, 201)
    creates = [e for e in api.coordinator.read(lambda s: list(s.audit))
               if e["type"] == "create_app"]
    assert len(creates) == 1


async def test_release_upload_stores_blob_then_records_release(api: Api) -> None:
    body = tarball({"superagent.toml": MANIFEST, "app.py": b"print('hi')\n"})
    response = await api.call("POST", "/api/v1/apps/hello/releases?deploy=false", content=body)
    assert response.status_code == 201, response.text
    doc = response.json()
    assert (doc["release"], doc["deploy_id"]) == ("r1", None)
    # the app was created from the manifest in the tarball
    assert (await api.call("GET", "/api/v1/apps/hello")).json()["latest_release"] == "r1"
    blob = await api.call("GET", f"/api/v1/artifacts/{doc['sha256']}")
    assert blob.content == body
    by_secret = await api.call("GET", f"/api/v1/artifacts/{doc['sha256']}", token=SECRET)
    assert by_secret.status_code == 200
    releases = (await api.call("GET", "/api/v1/apps/hello/releases")).json()["releases"]
    assert [(r["name"], r["sha256"], r["size"]) for r in releases] == [
        ("r1", doc["sha256"], len(body))]


async def test_release_without_participants_is_recorded_not_deployed(api: Api) -> None:
    body = tarball({"superagent.toml": MANIFEST})
    response = await api.call("POST", "/api/v1/apps/hello/releases", content=body)
    assert response.status_code == 409
    doc = response.json()
    assert doc["error"] == "no_targets" and doc["release"] == "r1"
    assert "no participant is online" in doc["detail"] and "default" in doc["detail"]
    rollback = await api.call("POST", "/api/v1/apps/hello/rollback", json={})
    assert rollback.status_code == 409
    assert "no release before" in rollback.json()["detail"]
    never = await api.call("POST", "/api/v1/apps/hello/rollback", json={"to": "r1"})
    assert never.status_code == 409 and never.json()["error"] == "never_succeeded", never.text
    forced = await api.call("POST", "/api/v1/apps/hello/rollback", json={"to": "r1",
                                                                        "force": True})
    assert forced.json()["error"] == "no_targets"  # past the check, nowhere to run it
    unknown = await api.call("POST", "/api/v1/apps/hello/rollback", json={"to": "r9"})
    assert unknown.status_code == 404
    bad = await api.call("POST", "/api/v1/apps/hello/releases?max_parallel=0", content=body)
    assert bad.status_code == 400 and "max_parallel" in bad.json()["detail"]
    releases = (await api.call("GET", "/api/v1/apps/hello/releases")).json()["releases"]
    assert len(releases) == 1  # refused before it was stored or recorded
    assert (releases[0]["outcome"], releases[0]["current"]) == (None, False)  # never deployed
    missing = await api.call("GET", "/api/v1/apps/hello/deploys/nope")
    assert missing.status_code == 404


async def test_release_upload_errors(api: Api) -> None:
    too_big = await api.call("POST", "/api/v1/apps/hello/releases",
                             content=b"x" * (64 * 1024 + 1))
    assert too_big.status_code == 413
    assert "limit" in too_big.json()["detail"]
    no_manifest = await api.call("POST", "/api/v1/apps/hello/releases",
                                 content=tarball({"app.py": b""}))
    assert no_manifest.status_code == 400
    assert "no app manifest" in no_manifest.json()["detail"]
    garbage = await api.call("POST", "/api/v1/apps/hello/releases", content=b"not a tarball")
    assert garbage.status_code == 400
    other_name = await api.call("POST", "/api/v1/apps/other/releases",
                                content=tarball({"superagent.toml": MANIFEST}))
    assert other_name.status_code == 400
    assert "'hello'" in other_name.json()["detail"]
    mismatch = await api.call("POST", f"/api/v1/apps/hello/releases?sha256={'0' * 64}",
                              content=tarball({"superagent.toml": MANIFEST}))
    assert mismatch.status_code == 400
    assert (await api.call("GET", "/api/v1/apps")).json()["apps"] == []
    unknown = await api.call("GET", f"/api/v1/artifacts/{'1' * 64}")
    assert unknown.status_code == 404
    bad_name = await api.call("GET", "/api/v1/artifacts/xyz")
    assert bad_name.status_code == 400


async def test_node_registers_heartbeats_goes_down_and_up(api: Api) -> None:
    secret = {"token": SECRET}
    reg = await api.call("POST", "/api/v1/nodes/register", **secret,
                         json={"node": "n1", "address": "127.0.0.1:9", "groups": ["web"],
                               "capacity": 4})
    assert reg.status_code == 200, reg.text

    async def node() -> dict[str, Any]:
        doc: dict[str, Any] = (await api.call("GET", "/api/v1/nodes/n1")).json()
        return doc

    assert (await node())["up"] is True
    beat = await api.call("POST", "/api/v1/nodes/n1/heartbeat", **secret,
                          json={"status": {"instances": []}})
    assert beat.status_code == 200
    assert (await node())["status"] == {"instances": []}
    # silent for longer than node_timeout (1 s): marked down, committed
    with trio.fail_after(5):
        while (await node())["up"]:
            await trio.sleep(0.1)
    assert api.coordinator.read(lambda s: s.nodes["n1"].up) is False
    await api.call("POST", "/api/v1/nodes/n1/heartbeat", **secret, json={})
    with trio.fail_after(5):
        while not (await node())["up"]:
            await trio.sleep(0.1)
    unknown = await api.call("POST", "/api/v1/nodes/n2/heartbeat", **secret, json={})
    assert unknown.status_code == 404
    bad = await api.call("POST", "/api/v1/nodes/register", **secret,
                         json={"node": "bad name", "address": "x:1"})
    assert bad.status_code == 400
    assert "node" in bad.json()["detail"]


async def test_a_stall_of_the_leader_does_not_mark_its_nodes_down(
        api: Api, monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery) -> None:
    """The coordinator's event loop is blocked for longer than node_timeout (1 s), as by a
    paused VM or a starved CPU, while n1 keeps beating: the beat waits in the socket and is
    read after the watch loop wakes. The silence was the leader's, so no NodeDown."""
    coordinator = api.coordinator
    submitted: list[cmd.Command] = []
    submit = coordinator.submit

    async def recording(command: cmd.Command) -> Any:
        submitted.append(command)
        return await submit(command)

    async def beat() -> None:
        while True:
            await api.call("POST", "/api/v1/nodes/n1/heartbeat", token=SECRET, json={})
            await trio.sleep(0.2)  # a heartbeat period, not a synchronisation

    monkeypatch.setattr(coordinator, "submit", recording)
    reg = await api.call("POST", "/api/v1/nodes/register", token=SECRET,
                         json={"node": "n1", "address": "127.0.0.1:9"})
    assert reg.status_code == 200, reg.text
    await wait_until_async(lambda: coordinator.liveness.checked is not None, "leading")
    first = await api.call("POST", "/api/v1/nodes/n1/heartbeat", token=SECRET, json={})
    assert first.status_code == 200, first.text
    url, headers = f"{api.url}/api/v1/nodes/n1/heartbeat", api.auth(SECRET)
    sender = threading.Thread(target=lambda: httpx.post(url, headers=headers, json={}))
    with trio.fail_after(30):
        # the fault itself, not a synchronisation: nothing of the loop runs meanwhile, and
        # the sender's beat (sent as soon as it can connect) waits unread in the socket
        sender.start()
        time.sleep(STALL)
        over = trio.current_time()
        nursery.start_soon(beat)  # n1 beats on as before
        await wait_until_async(lambda: coordinator.liveness.last.get("n1", 0) >= over,
                               "the beat sent during the stall is read")
        # two watch rounds after the stall: a commit the first one started has begun
        await wait_until_async(lambda: (coordinator.liveness.checked or 0) > over + 0.5,
                               "two watch rounds after the stall")
        await trio.to_thread.run_sync(sender.join)
    assert coordinator.liveness.blind >= STALL - 0.5  # less one watch period
    assert [c for c in submitted if isinstance(c, cmd.NodeDown)] == []
    assert coordinator.read(lambda s: s.nodes["n1"].up) is True


async def test_node_lifecycle_drain_offline_online(api: Api) -> None:
    await api.call("POST", "/api/v1/nodes/register", token=SECRET,
                   json={"node": "n1", "address": f"127.0.0.1:{free_port()}"})
    offline_first = await api.call("POST", "/api/v1/nodes/n1/offline")
    assert offline_first.status_code == 409
    assert "online" in offline_first.json()["detail"]
    drained = await api.call("POST", "/api/v1/nodes/n1/drain")
    assert drained.json()["lifecycle"] == "draining"
    assert drained.json()["signalled"] is False  # nothing listens at its address
    assert (await api.call("POST", "/api/v1/nodes/n1/offline")).json()["lifecycle"] == "offline"
    assert (await api.call("POST", "/api/v1/nodes/n1/reboot")).status_code == 404
    assert (await api.call("POST", "/api/v1/nodes/zz/drain")).status_code == 404


async def test_offline_is_refused_while_the_node_still_runs_instances(api: Api) -> None:
    """A draining node whose heartbeat reports a live instance cannot go offline (409 naming
    it); once nothing runs there, it can. ``running`` says what is left."""
    await api.call("POST", "/api/v1/nodes/register", token=SECRET,
                   json={"node": "n1", "address": f"127.0.0.1:{free_port()}"})
    instance = {"id": "web@r1.1", "app": "web", "release": "r1", "state": "ready", "port": 1}
    await api.call("POST", "/api/v1/nodes/n1/heartbeat", token=SECRET,
                   json={"status": {"instances": [instance], "routes": {}}})
    assert (await api.call("POST", "/api/v1/nodes/n1/drain")).status_code == 200
    left = await api.call("GET", "/api/v1/nodes/n1/running")
    assert left.json() == {"node": "n1", "lifecycle": "draining",
                           "instances": ["web@r1.1 (ready)"], "placed": {}}
    refused = await api.call("POST", "/api/v1/nodes/n1/offline")
    assert refused.status_code == 409, refused.text
    assert "web@r1.1" in refused.json()["detail"]
    await api.call("POST", "/api/v1/nodes/n1/heartbeat", token=SECRET,
                   json={"status": {"instances": [{**instance, "state": "stopped"}]}})
    assert (await api.call("GET", "/api/v1/nodes/n1/running")).json()["instances"] == []
    offline = await api.call("POST", "/api/v1/nodes/n1/offline")
    assert offline.status_code == 200 and offline.json()["lifecycle"] == "offline"
    assert (await api.call("GET", "/api/v1/nodes/zz/running")).status_code == 404


async def test_cli_drain_follows_until_nothing_runs(
        api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    """``superagent drain`` shows what still runs and ends once the node runs nothing."""
    await api.call("POST", "/api/v1/nodes/register", token=SECRET,
                   json={"node": "n1", "address": f"127.0.0.1:{free_port()}"})
    instance = {"id": "web@r1.1", "app": "web", "release": "r1", "state": "ready", "port": 1}
    codes: list[int] = []

    async def beat(instances: list[dict[str, Any]]) -> None:
        await api.call("POST", "/api/v1/nodes/n1/heartbeat", token=SECRET,
                       json={"status": {"instances": instances, "routes": {}}})

    def polls() -> int:  # the CLI's looks at what still runs
        return api.coordinator.requests.get(("GET", 200), 0)

    async def drain() -> None:
        codes.append(await trio.to_thread.run_sync(lambda: cli_main(
            ["drain", "n1", "--server", api.url, "--token", api.token])))

    await beat([instance])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        with trio.fail_after(10):
            while api.coordinator.read(lambda s: s.nodes["n1"].lifecycle) != "draining":
                await beat([instance])  # within the 1 s node timeout
                await trio.sleep(0.1)
            seen = polls()
            while polls() < seen + 2:  # the CLI has seen the instance still running
                await beat([instance])
                await trio.sleep(0.1)
        await beat([])
    out = capsys.readouterr().out
    assert codes == [0], out
    assert "still running web@r1.1 (ready)" in out and "n1: drained" in out


async def test_cli_queries_against_the_api(api: Api, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    await api.call("POST", "/api/v1/apps", json={"app": {"name": "web"},
                                                 "run": {"command": "true"}})
    common = ["--server", api.url, "--token", api.token]

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli_main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = await trio.to_thread.run_sync(lambda: run("apps", *common))
    assert code == 0 and "web" in out and "APP" in out
    code, out, _ = await trio.to_thread.run_sync(lambda: run("cluster", "--json", *common))
    assert code == 0 and json.loads(out)["leader"] == "c1"
    code, out, _ = await trio.to_thread.run_sync(lambda: run("status", *common))
    assert code == 0 and "leader c1" in out and "no participants" in out
    code, _, err = await trio.to_thread.run_sync(
        lambda: run("apps", "--server", api.url, "--token", "sa_bad"))
    assert code == 2 and "the token from --token was refused" in err
    code, out, err = await trio.to_thread.run_sync(
        lambda: run("apps", "--json", "--server", api.url, "--token", "sa_bad"))
    assert code == 2 and out == ""
    assert json.loads(err)["error"] == "unauthorized" and "refused" in json.loads(err)["detail"]
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, _ = await trio.to_thread.run_sync(
        lambda: run("apps", "--server", f"{dead},{api.url}", "--token", api.token))
    assert code == 0 and "web" in out  # the dead server is skipped
    code, _, err = await trio.to_thread.run_sync(lambda: run("nodes", "--server", "ftp://x"))
    assert code == 2 and "must start with http" in err


def test_bad_coordinator_arguments_are_one_line_errors(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")
    cases = [
        (["--id", "c9", "--peers", "c1=127.0.0.1:1"], "own id"),
        (["--peers", "c1:127.0.0.1:1"], "ID=HOST:PORT"),
        (["--id", "bad id"], "--id"),
        (["--api-url", "localhost:1"], "http://"),
    ]
    for argv, expected in cases:
        code = cli_main(["coordinator", "--data-dir", str(tmp_path / "d"),
                         "--secret-file", str(secret), *argv])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "Traceback" not in err, (argv, err)
    code = cli_main(["coordinator", "--data-dir", str(tmp_path / "d")])
    assert code == 2 and "secret" in capsys.readouterr().err


def test_the_coordinators_secret_and_the_legacy_participant_secret(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--coordinator-secret-file is the coordinators' own; --secret-file beside it is only a
    participant secret; alone, it is both (as before); the two may not be equal."""
    seen: list[CoordinatorConfig] = []

    class Stop(Exception):
        pass

    def capture(config: CoordinatorConfig) -> None:
        seen.append(config)
        raise Stop

    monkeypatch.setattr("superagent.coordinator.service.Coordinator", capture)
    monkeypatch.delenv("SUPERAGENT_SECRET", raising=False)
    monkeypatch.delenv("SUPERAGENT_COORDINATOR_SECRET", raising=False)
    own, shared = tmp_path / "own", tmp_path / "shared"
    own.write_text("coordinators-only\n")
    shared.write_text("shared\n")
    base = ["coordinator", "--data-dir", str(tmp_path / "d")]
    for extra in (["--coordinator-secret-file", str(own), "--secret-file", str(shared)],
                  ["--coordinator-secret-file", str(own)], ["--secret-file", str(shared)]):
        with pytest.raises(Stop):
            cli_main([*base, *extra])
    assert [(c.secret, c.participant_secret) for c in seen] == [
        ("coordinators-only", "shared"), ("coordinators-only", ""), ("shared", "shared")]
    code = cli_main([*base, "--coordinator-secret-file", str(shared), "--secret-file",
                     str(shared)])
    assert code == 2 and "must differ" in capsys.readouterr().err


def test_the_watch_window_option_reaches_the_config_and_bad_values_are_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--watch-window: given, the coordinator's deploy runner gets it; absent, the 3 s
    default; outside 0..3600 s (or NaN) one line naming the option, exit 2."""
    seen: list[CoordinatorConfig] = []

    class Stop(Exception):
        pass

    def capture(config: CoordinatorConfig) -> None:
        seen.append(config)
        raise Stop

    monkeypatch.setattr("superagent.coordinator.service.Coordinator", capture)
    monkeypatch.setenv("SUPERAGENT_COORDINATOR_SECRET", "coordinators-only")
    base = ["coordinator", "--data-dir", str(tmp_path / "d")]
    for extra in (["--watch-window", "0.25"], []):
        with pytest.raises(Stop):
            cli_main([*base, *extra])
    assert [c.watch_window for c in seen] == [0.25, WATCH_WINDOW]
    assert Coordinator(replace(seen[0], data_dir=tmp_path / "c")).deploys.watch_window == 0.25
    for bad in ("-1", "3601", "nan"):
        assert cli_main([*base, "--watch-window", bad]) == 2
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1, err
        assert "--watch-window must be 0..3600 seconds" in lines[0], err


def test_config_url_defaults_to_api_address(tmp_path: Path) -> None:
    config = CoordinatorConfig(id="c1", peers={"c1": "127.0.0.1:1"}, api=("::1", 80),
                               data_dir=tmp_path, secret="s")
    assert config.url == "http://[::1]:80"
    assert replace(config, api_url="https://x:1/").url == "https://x:1"


async def test_cli_deploys_a_procfile_app_under_its_directory_name(
        api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`superagent deploy DIR` of a Procfile-only app names it after the directory."""
    source = tmp_path / "Proc_App"
    source.mkdir()
    (source / "Procfile").write_text("web: python3 -m http.server $PORT\n")
    code = await trio.to_thread.run_sync(lambda: cli_main(
        ["deploy", str(source), "--server", api.url, "--token", api.token]))
    _, err = capsys.readouterr()
    assert "deploying the Procfile app as 'proc-app'" in err
    assert code == 2 and "no participant is online" in err  # recorded, nowhere to run
    releases = (await api.call("GET", "/api/v1/apps/proc-app/releases")).json()["releases"]
    assert [r["name"] for r in releases] == ["r1"]


async def test_a_deploy_committed_here_wakes_the_runner(api: Api,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A StartDeploy committed on the leader, submitted there or forwarded by a follower
    to /internal/propose, wakes the deploy runner (whatever the state answered); other
    commands do not."""
    woken: list[int] = []
    monkeypatch.setattr(api.coordinator.deploys, "wake", lambda: woken.append(1))
    c = api.coordinator
    start = c.command(cmd.StartDeploy, actor="tester", app="ghost", deploy_id="ghost-r1-abc",
                      record={})
    assert not (await c.submit(start))["ok"]  # no such app: refused, committed all the same
    assert woken == [1]
    forwarded = c.command(cmd.StartDeploy, actor="tester", app="ghost",
                          deploy_id="ghost-r1-abd", record={})
    response = await api.call("POST", "/api/v1/internal/propose", token=SECRET,
                              content=forwarded.to_json(),
                              headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert woken == [1, 1]
    # another command (a fresh app: it always applies; the coordinator's own
    # RegisterCoordinator may already be in, and a repeat of it is refused)
    other = c.command(cmd.CreateApp, actor="tester", name="waker", spec=spec("waker"))
    created = await c.submit(other)
    assert created["ok"], created
    assert woken == [1, 1]
