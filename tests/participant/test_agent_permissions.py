"""[permissions] through a real in-process agent: the instance's own view of its
filesystem and network, and what the status and the heartbeat say.

The app tries, at start, a write into its release, its data directory (HOME) and /tmp,
and a connection to a loopback port (the agent's RPC: another service on loopback),
and serves the outcomes and its primary group at /probe. As root only (permissions are
enforced as root); the nftables table is the test's own, removed afterwards, and so are
the app's user and egress group.
"""

from __future__ import annotations

import grp
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from superagent.participant.isolation import loopback_group_name, remove_app_user
from superagent.participant.nftegress import egress_intact, remove_egress_table
from tests.participant.children import child_python
from tests.participant.test_agent import running_agent, start_and_switch, tarball
from tests.support.ports import free_port
from tests.support.wait import wait_until_async

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: permissions are enforced as root only")

PROBE_APP = '''
import http.server, json, os, socket
def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return f"errno{exc.errno}"
def write(path):
    with open(path, "w") as f:
        f.write("x")
outcomes = {
    "release": attempt(lambda: write("probe-file")),
    "data": attempt(lambda: write(os.path.join(os.environ["HOME"], "probe-file"))),
    "tmp": attempt(lambda: write("/tmp/sa-perm-probe-" + os.environ["SUPERAGENT_INSTANCE"])),
    "loopback": attempt(lambda: socket.create_connection(
        ("127.0.0.1", int(os.environ["LOOPBACK_PORT"])), timeout=5).close()),
    "gid": os.getgid(),
}
body = json.dumps(outcomes).encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''


def probe_app(name: str, loopback_port: int) -> bytes:
    manifest = (f'[app]\nname = "{name}"\n[run]\ncommand = "{child_python()} app.py"\n'
                f'[health]\npath = "/"\n[routes]\nprefix = "/{name}"\nstrip_prefix = true\n'
                f'[env]\nLOOPBACK_PORT = "{loopback_port}"\n'
                '[permissions]\nnetwork = "loopback"\nfilesystem = "release"\n')
    return tarball({"superagent.toml": manifest, "app.py": PROBE_APP})


@pytest.fixture
def names() -> Iterator[dict[str, str]]:
    tag = "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=6))
    found = {"loopback_group": f"sa-lotest-{tag}", "egress_table": f"satest_{tag}"}
    try:
        yield found
    finally:
        remove_egress_table(found["egress_table"])
        subprocess.run(["groupdel", found["loopback_group"]], capture_output=True, check=False)


@pytest.fixture
def app() -> Iterator[str]:
    """The app's name, random-suffixed: it names the system user the agent creates, which
    is deleted afterwards."""
    name = "perm-" + "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=6))
    try:
        yield name
    finally:
        remove_app_user(name)


def instance_status(status: dict[str, Any], app: str) -> dict[str, Any]:
    (found,) = [i for i in status["instances"] if i["app"] == app]
    return found


async def test_permissions_enforced_inside_the_instance(data_dir: Path, app: str,
                                                        names: dict[str, str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("superagent.participant.egress.EGRESS_CHECK_PERIOD", 0.2)
    if shutil.which("nft") is None:
        pytest.skip("needs nft (nftables) to enforce network = 'loopback'")
    async with running_agent(data_dir, **names) as rig:
        rpc_port = rig.agent.config.rpc[1]
        assert (await rig.upload(app, "r1", probe_app(app, rpc_port))).status_code == 200
        await start_and_switch(rig, app)
        answer = await rig.proxy.get(f"/{app}/probe")
        assert answer.status_code == 200, answer.text
        egress_gid = grp.getgrnam(loopback_group_name(app)).gr_gid
        assert answer.json() == {"release": "ok", "data": "ok", "tmp": "errno30",
                                 "loopback": "ok", "gid": egress_gid}
        assert egress_intact(names["egress_table"], [egress_gid])
        status = (await rig.rpc.get("/v1/status")).json()
        permissions = instance_status(status, app)["isolation"]["permissions"]
        assert permissions["network"]["enforced"] is True, permissions
        assert permissions["filesystem"]["enforced"] is True, permissions
        assert status["isolation"]["permissions"] == {"network": "enforced",
                                                      "filesystem": "enforced"}
        (beat,) = rig.agent.coordinator_status()["instances"]
        assert beat["unenforced"] == []
        # A firewall reload (nft flush ruleset) drops the table while the instance runs:
        # the agent loads it again, or the app would reach anything from then on.
        subprocess.run(["nft", "delete", "table", "inet", names["egress_table"]], check=True,
                       capture_output=True)
        await wait_until_async(lambda: egress_intact(names["egress_table"], [egress_gid]),
                               "the egress table loaded again with the app's group")


async def test_an_unenforceable_permission_still_starts_and_is_reported(
        data_dir: Path, app: str, names: dict[str, str]) -> None:
    """nft refuses the table (a name it cannot parse stands for a machine without
    nftables): the instance runs, the network is open, and every status says so."""
    async with running_agent(data_dir, **{**names, "egress_table": "no such table"}) as rig:
        rpc_port = rig.agent.config.rpc[1]
        assert (await rig.upload(app, "r1", probe_app(app, rpc_port))).status_code == 200
        await start_and_switch(rig, app)
        answer = await rig.proxy.get(f"/{app}/probe")
        assert answer.status_code == 200, answer.text
        assert answer.json()["loopback"] == "ok"
        status = (await rig.rpc.get("/v1/status")).json()
        network = instance_status(status, app)["isolation"]["permissions"]["network"]
        assert network["enforced"] is False and network["wanted"] == "loopback"
        assert network["reason"], network
        assert status["isolation"]["permissions"]["network"] != "enforced"
        (beat,) = rig.agent.coordinator_status()["instances"]
        assert "network" in beat["unenforced"]


async def test_an_adopted_instance_is_put_back_in_the_egress_set(
        data_dir: Path, app: str, names: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A firewall reload while no agent runs deletes the table: the agent that adopts the
    instance (still running, with its egress group) loads it again with that group as it
    adopts it, not at its next periodic check (an hour away here)."""
    monkeypatch.setattr("superagent.participant.egress.EGRESS_CHECK_PERIOD", 3600.0)
    if shutil.which("nft") is None:
        pytest.skip("needs nft (nftables) to enforce network = 'loopback'")
    rpc_port, listen_port = free_port(), free_port()
    async with running_agent(data_dir, rpc_port, listen_port, stop_all=False,
                             **names) as rig:
        assert (await rig.upload(app, "r1", probe_app(app, rpc_port))).status_code == 200
        await start_and_switch(rig, app)
        (pid,) = [instance.pid for instance in rig.agent.instances.values()]
    egress_gid = grp.getgrnam(loopback_group_name(app)).gr_gid
    subprocess.run(["nft", "delete", "table", "inet", names["egress_table"]], check=True,
                   capture_output=True)
    async with running_agent(data_dir, rpc_port, listen_port, **names) as rig:
        (adopted,) = rig.agent.instances.values()
        assert adopted.pid == pid  # the same process, adopted, not started again
        await wait_until_async(lambda: egress_intact(names["egress_table"], [egress_gid]),
                               "the adopted instance's egress group back in the set",
                               timeout=5.0)
