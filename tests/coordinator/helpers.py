"""Scenario helpers for coordinator tests: valid specs and commands with defaults."""

from __future__ import annotations

import itertools
from typing import Any

from superagent.coordinator import commands as cmd
from superagent.coordinator.deploy.model import new_record
from superagent.coordinator.raft import APPEND_ENTRIES_PERIOD
from superagent.coordinator.state import ClusterState
from superagent.manifest import parse_manifest, spec_to_json

SHA = "ab" * 32
# The election timeout of the suite's single-node coordinators run in-process
# (``CoordinatorConfig.election_timeout``): pysyncobj's least, just over three heartbeats,
# instead of the product's 0.4-1.4 s, which every start would wait out before it leads. A
# single node has nobody to split a vote with, so a short timeout only makes it lead sooner.
FAST_ELECTION = (APPEND_ENTRIES_PERIOD * 3 + 0.01, APPEND_ENTRIES_PERIOD * 3 + 0.1)
# The deploy watch window (``--watch-window``) of test clusters whose tests deploy but are
# not about the window (no release of theirs dies after it got ready): each deploy would
# wait out the product's 3 s after its last switch. The window's own tests keep 3 s.
TEST_WATCH_WINDOW = 0.5
_keys = itertools.count(1)


def spec(name: str = "hello", command: str = "python app.py") -> dict[str, Any]:
    return spec_to_json(parse_manifest({"app": {"name": name}, "run": {"command": command}},
                                       source="test"))


def base(key: str | None = None, at: float = 1000.0) -> dict[str, Any]:
    return {"key": key or f"k{next(_keys)}", "at": at, "actor": "tester"}


def create_app(name: str = "hello", **kw: Any) -> cmd.CreateApp:
    return cmd.CreateApp(**{**base(), "name": name, "spec": spec(name), **kw})


def add_release(app: str = "hello", **kw: Any) -> cmd.AddRelease:
    return cmd.AddRelease(**{**base(), "app": app, "sha256": SHA, "size": 10,
                             "spec": spec(app), "env": {"A": "1"}, **kw})


def register(node: str = "n1", **kw: Any) -> cmd.RegisterNode:
    return cmd.RegisterNode(**{**base(), "node": node, "address": "10.0.0.1:7000",
                               "groups": ("default",), "capacity": 8, **kw})


def lifecycle(node: str, to: str, **kw: Any) -> cmd.SetNodeLifecycle:
    return cmd.SetNodeLifecycle(**{**base(), "node": node, "lifecycle": to, **kw})


def deploy_record(app: str = "hello", deploy_id: str = "d1", release: str = "r1",
                  nodes: tuple[str, ...] = ("n1",)) -> dict[str, Any]:
    return new_record(deploy_id=deploy_id, app=app, release=release, sha256=SHA, nodes=nodes,
                      per_node=1, max_parallel=1, drain_grace=5.0).to_doc()


def start_deploy(app: str = "hello", deploy_id: str = "d1", release: str = "r1",
                 **kw: Any) -> cmd.StartDeploy:
    return cmd.StartDeploy(**{**base(), "app": app, "deploy_id": deploy_id,
                              "record": deploy_record(app, deploy_id, release), **kw})


EMPTY_STATE = ClusterState().to_json()


def all_commands() -> list[cmd.Command]:
    """One valid instance of every command type, in an order that applies cleanly."""
    return [
        cmd.RestoreState(**base(), state=EMPTY_STATE, source="test"),  # onto an empty one
        create_app(),
        cmd.UpdateAppSpec(**base(), app="hello", spec=spec(command="python app2.py")),
        add_release(),
        register(),
        cmd.LabelNode(**base(), node="n1", groups=("web", "default")),
        cmd.NodeDown(**base(), node="n1"),
        cmd.NodeUp(**base(), node="n1"),
        lifecycle("n1", "draining"),
        cmd.SetPlacement(**base(), app="hello", placement={"n1": 2}, reason="no room"),
        cmd.SetScale(**base(), app="hello", scale_id="s1", groups=("web",), instances=3),
        cmd.FinishScale(**base(), app="hello", scale_id="s1", outcome="short",
                        reason="2 of 3 instances: no room"),
        cmd.SetScale(**base(), app="hello", scale_id="s2", groups=("web",),
                     auto={"min": 1, "max": 4, "target": 5.0, "metric": "in_flight"}),
        cmd.Autoscale(**base(), app="hello", instances=2, reason="scale up",
                      inputs={"load": 12.0}),
        cmd.FinishScale(**base(), app="hello", scale_id="s2", outcome="converged"),
        start_deploy(),
        cmd.DeployEvent(**base(), app="hello", deploy_id="d1",
                        event={"type": "cancel", "reason": "operator"}),
        cmd.FinishDeploy(**base(), app="hello", deploy_id="d1"),
        cmd.AddToken(**base(), name="admin", sha256=SHA),
        cmd.AddToken(**base(), name="ci", sha256=SHA, role="deployer", teams=("shop",),
                     expires_at=2000.0),
        cmd.RevokeToken(**base(), name="ci"),
        cmd.SetQuota(**base(), team="default", apps=5, memory=2**30),
        cmd.RegisterCoordinator(**base(), coordinator="c1", api_url="http://127.0.0.1:7100"),
        cmd.AddJoinToken(**base(), sha256=SHA, expires_at=5000.0),
        cmd.EnrolNode(**base(), node="n2", join_sha256=SHA,
                      credential_sha256="b" * 64, signal_key="c" * 64),
        cmd.RevokeNode(**base(), node="n2"),
        cmd.AddCoordinator(**base(), coordinator="c4", raft_address="127.0.0.1:7114"),
        cmd.RemoveCoordinator(**base(), coordinator="c4"),
        cmd.DeleteApp(**base(), app="hello"),
    ]
