"""Disaster recovery: a running cluster backed up, then restored onto new machines.

Cluster A (one coordinator, one participant, real processes) serves the demo app; a
second release is uploaded and, while its deploy runs, ``superagent backup FILE`` copies
the state and every artifact. A is then destroyed. Cluster B has new coordinators, new
ports and new data dirs: a restore is refused with A's token (a new cluster knows only
its own) and for a file that is no backup (400), then ``superagent restore FILE`` with
B's token restores it; A's token works on B from then on. A second restore is refused
(409: the cluster is not empty). A new participant joins B, and the restored app runs
there and answers through its proxy with the release the backup says it served, with no
upload.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import httpx

from tests.coordinator.cluster import Cluster
from tests.e2e.fleet import (
    REQUEST_TIMEOUT,
    Fleet,
    kept_on_failure,
    leftovers,
    upload,
    wait_deploy_done,
    write_demo_app,
)
from tests.support.wait import wait_until

APP = "keepsake"
CLI_TIMEOUT = 60.0


def cli(url: str, token: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "superagent", *argv, "--server", url, "--token", token],
        capture_output=True, text=True, timeout=CLI_TIMEOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("SUPERAGENT_")})


def answer(url: str) -> str | None:
    """The release the app answered from at ``url``, or None."""
    try:
        r = httpx.get(url, timeout=REQUEST_TIMEOUT, trust_env=False)
    except httpx.HTTPError:
        return None
    return str(r.json()["release"]) if r.status_code == 200 else None


def test_a_backup_of_a_running_cluster_restores_onto_new_machines() -> None:
    """backup while a deploy runs, destroy, restore onto new coordinators and a new
    participant: the same app serves the same release; old tokens work."""
    with kept_on_failure("sa-backup-") as root:
        backup = root / "cluster.backup"
        old = Cluster(root / "old", size=1)
        fleet = Fleet(root / "old", [m.url for m in old.members], size=1)
        try:
            old.start_all()
            old.wait_ready()
            fleet.start_all()
            fleet.wait_joined(old, 0)
            app_dir = write_demo_app(root / "src" / APP, name=APP, version="1", per_node=1)
            wait_deploy_done(old, [0], APP, upload(old, 0, app_dir)["deploy_id"])
            second = upload(old, 0, write_demo_app(app_dir, name=APP, version="2",
                                                   per_node=1))
            assert second["deploy_id"]
            taken = cli(old.api(0), old.token, "backup", str(backup))  # while r2 deploys
            assert taken.returncode == 0, taken.stderr
            old_token = old.token
        finally:
            fleet.close()
            old.close()
        with tarfile.open(backup) as tar:
            names = tar.getnames()
            state_file = tar.extractfile("state.json")
            assert state_file is not None
            state = json.load(state_file)
        assert names[:2] == ["backup.json", "state.json"]
        assert len([n for n in names if n.startswith("artifacts/")]) == 2  # r1 and r2
        serving = next(a["current_release"] for a in state["apps"] if a["name"] == APP)

        new = Cluster(root / "new", size=1)
        fleet = Fleet(root / "new", [m.url for m in new.members], size=1)
        try:
            new.start_all()
            new.wait_ready()
            body = backup.read_bytes()
            refused = new.post(0, "/api/v1/restore", content=body,
                               headers={"authorization": f"Bearer {old_token}"})
            assert refused.status_code == 401, refused.text
            garbage = new.post(0, "/api/v1/restore", content=b"not a tar")
            assert garbage.status_code == 400, garbage.text
            assert garbage.json()["error"] == "bad_backup", garbage.text
            restored = cli(new.api(0), new.token, "restore", str(backup), "--json")
            assert restored.returncode == 0, restored.stderr
            assert json.loads(restored.stdout)["apps"] == 1, restored.stdout
            again = new.post(0, "/api/v1/restore", content=body, timeout=30.0)
            assert again.status_code == 409 and "not empty" in again.text, again.text
            new.token = old_token  # the backup's tokens came with it
            apps = new.get(0, "/api/v1/apps")
            assert apps.status_code == 200, apps.text
            assert [a["name"] for a in apps.json()["apps"]] == [APP]
            fleet.start_all()
            fleet.wait_joined(new, 0)
            # r2's deploy, under way at the backup, is resumed or compensated as after a
            # leader change: the app then serves what that deploy ended with
            wait_deploy_done(new, [0], APP, second["deploy_id"])
            apps = new.get(0, "/api/v1/apps").json()["apps"]
            current = next(a["current_release"] for a in apps if a["name"] == APP)
            assert current in (serving, "r2"), (serving, current)
            url = fleet.members[0].proxy + f"/{APP}/"
            assert wait_until(lambda: answer(url) == current, f"the restored app serving {current}")
        finally:
            fleet.close()
            new.close()
        assert leftovers(root) == []
