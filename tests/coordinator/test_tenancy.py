"""Tests for the replicated side of teams: app teams, token records, quotas
(superagent.coordinator.tenancy through ClusterState.apply)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from superagent.coordinator import commands as cmd
from superagent.coordinator.errors import CommandError
from superagent.coordinator.state import ClusterState
from superagent.manifest import parse_manifest, spec_to_json
from tests.coordinator.helpers import SHA, base, create_app, register, start_deploy


def ok(state: ClusterState, command: cmd.Command) -> dict[str, Any]:
    result = state.apply(command.to_json())
    assert result["ok"] is True, result
    return result


def refused(state: ClusterState, command: cmd.Command, code: str) -> dict[str, Any]:
    before = state.digest()
    result = state.apply(command.to_json())
    assert (result["ok"], result["code"]) == (False, code), result
    assert state.digest() == before
    return result


def test_apps_belong_to_a_team_and_older_entries_to_the_default_one() -> None:
    state = ClusterState()
    ok(state, create_app("shop-web", team="shop"))
    old = create_app("legacy").to_doc()
    del old["team"]  # a log entry written before teams
    assert state.apply(json.dumps(old))["ok"]
    assert state.apps["shop-web"].team == "shop"
    assert state.apps["legacy"].team == "default"
    assert [e["team"] for e in state.audit] == ["shop", "default"]
    ok(state, cmd.DeleteApp(**base(), app="shop-web"))
    assert state.audit[-1]["team"] == "shop"  # the audit entry keeps the team it was of


def test_older_snapshot_loads_with_default_teams_and_no_quotas() -> None:
    state = ClusterState()
    ok(state, create_app("hello"))
    doc = state.to_doc()
    for app in doc["apps"]:
        del app["team"]
    del doc["quotas"]
    loaded = ClusterState.from_json(json.dumps(doc))
    assert loaded.apps["hello"].team == "default"
    assert loaded.quotas == {}


def test_token_records_roles_and_revoke() -> None:
    state = ClusterState()
    ok(state, cmd.AddToken(**base(), name="ci", sha256=SHA, role="deployer",
                           teams=("shop",), expires_at=5000.0))
    assert state.tokens["ci"] == {"sha256": SHA, "created_at": 1000.0, "role": "deployer",
                                  "teams": ["shop"], "expires_at": 5000.0, "actor": "tester"}
    assert state.audit[-1]["outcome"] == "created deployer of shop"
    refused(state, cmd.AddToken(**base(), name="ci", sha256=SHA), "conflict")
    ok(state, cmd.RevokeToken(**base(), name="ci"))
    assert state.tokens == {}
    assert state.audit[-1]["target"] == "token:ci"
    refused(state, cmd.RevokeToken(**base(), name="ci"), "unknown_token")


def test_the_last_admin_token_is_not_revoked() -> None:
    state = ClusterState()
    old = cmd.AddToken(**base(), name="admin", sha256=SHA).to_doc()
    for key in ("role", "teams", "expires_at"):
        del old[key]  # the admin token of a cluster made before roles
    assert state.apply(json.dumps(old))["ok"]
    ok(state, cmd.AddToken(**base(), name="watch", sha256=SHA, role="viewer"))
    result = refused(state, cmd.RevokeToken(**base(), name="admin"), "conflict")
    assert "last admin token" in result["error"]
    ok(state, cmd.AddToken(**base(), name="root", sha256=SHA))
    ok(state, cmd.RevokeToken(**base(), name="admin"))
    refused(state, cmd.RevokeToken(**base(), name="root"), "conflict")


@pytest.mark.parametrize(("fields", "problem"), [
    ({"role": "root"}, "role"),
    ({"role": "deployer"}, "teams"),
    ({"role": "admin", "teams": ("shop",)}, "teams"),
    ({"role": "viewer", "teams": ("Shop",)}, "teams"),
    ({"role": "viewer", "teams": ("a", "a")}, "teams"),
    ({"expires_at": float("inf")}, "expires_at"),
])
def test_bad_token_commands_name_the_field(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(CommandError, match=problem):
        cmd.AddToken(**base(), name="t", sha256=SHA, **fields)


def sized(name: str, memory: str = "256M", per_node: int = 1) -> dict[str, Any]:
    return spec_to_json(parse_manifest({"app": {"name": name}, "run": {"command": "x"},
                                        "limits": {"memory": memory},
                                        "scale": {"per_node": per_node}}, source="test"))


def test_quota_on_apps_refuses_one_more() -> None:
    state = ClusterState()
    ok(state, cmd.SetQuota(**base(), team="shop", apps=1))
    ok(state, create_app("a", team="shop"))
    result = refused(state, create_app("b", team="shop"), "quota_exceeded")
    assert "'shop'" in result["error"] and "apps" in result["error"]
    assert result["status"] == 409
    ok(state, create_app("b", team="blog"))  # another team's apps do not count
    ok(state, cmd.SetQuota(**base(), team="shop"))  # all None: no quota
    assert "shop" not in state.quotas
    ok(state, create_app("b2", team="shop"))


def test_quota_on_instances_and_memory_refuses_scale_and_release() -> None:
    state = ClusterState()
    for node in ("n1", "n2"):
        ok(state, register(node))
    ok(state, create_app("a", team="shop", spec=sized("a")))
    ok(state, cmd.SetQuota(**base(), team="shop", instances=4, memory=3 * 256 * 1024**2))
    ok(state, cmd.SetScale(**base(), app="a", groups=("default",), instances=3))
    result = refused(state, cmd.SetScale(**base(), app="a", groups=("default",),
                                         instances=4), "quota_exceeded")
    assert "memory" in result["error"]
    ok(state, cmd.SetQuota(**base(), team="shop", instances=4))
    refused(state, cmd.SetScale(**base(), app="a", groups=("default",), per_node=3),
            "quota_exceeded")  # 3 on each of 2 nodes
    ok(state, cmd.SetScale(**base(), app="a", groups=("default",), per_node=2))
    ok(state, cmd.FinishScale(**base(), app="a", scale_id=state.apps["a"].scaling["id"],
                              outcome="converged"))
    ok(state, cmd.AddRelease(**base(), app="a", sha256=SHA, size=1, spec=sized("a")))
    ok(state, start_deploy("a"))


def test_quota_counts_the_release_a_deploy_makes_current() -> None:
    state = ClusterState()
    ok(state, register("n1"))
    ok(state, create_app("a", team="shop", spec=sized("a")))
    ok(state, cmd.AddRelease(**base(), app="a", sha256=SHA, size=1, spec=sized("a")))
    ok(state, cmd.SetQuota(**base(), team="shop", memory=512 * 1024**2))
    refused(state, cmd.AddRelease(**base(), app="a", sha256=SHA, size=1,
                                  spec=sized("a", memory="1G")), "quota_exceeded")
    ok(state, cmd.SetQuota(**base(), team="shop"))
    ok(state, cmd.AddRelease(**base(), app="a", sha256=SHA, size=1,
                             spec=sized("a", per_node=2)))
    ok(state, cmd.SetQuota(**base(), team="shop", instances=1))  # r2 made before the quota
    refused(state, start_deploy("a", release="r2"), "quota_exceeded")
    ok(state, start_deploy("a", release="r1"))


def test_an_autoscaled_app_counts_at_its_max() -> None:
    state = ClusterState()
    ok(state, create_app("a", team="shop", spec=sized("a")))
    ok(state, cmd.SetQuota(**base(), team="shop", instances=4))
    refused(state, cmd.SetScale(**base(), app="a", groups=("default",),
                                auto={"min": 1, "max": 5, "target": 2.0}), "quota_exceeded")
    ok(state, cmd.SetScale(**base(), app="a", groups=("default",),
                           auto={"min": 1, "max": 4, "target": 2.0}))


def test_a_tokens_write_is_checked_again_where_it_applies() -> None:
    """The API checks an app's team when a request comes in; the state checks it again
    when the command applies, so a write by a deployer of team blog never lands on an
    app that team shop made in between. The leader's own work is not scoped."""
    state = ClusterState()
    ok(state, cmd.AddToken(**base(), name="blogdep", sha256=SHA, role="deployer",
                           teams=("blog",)))
    ok(state, cmd.AddToken(**base(), name="root", sha256=SHA))
    ok(state, create_app("shopapp", team="shop"))
    scale = {"app": "shopapp", "groups": ("default",), "per_node": 0}
    result = refused(state, cmd.SetScale(**{**base(), "actor": "blogdep"}, **scale),
                     "forbidden")
    assert "not of team 'shop'" in result["error"], result
    assert state.apps["shopapp"].scale is None
    ok(state, cmd.SetScale(**{**base(), "actor": "root"}, **scale))
    ok(state, cmd.SetScale(**{**base(), "actor": "coordinator:c1"}, **scale))
    ok(state, create_app("blogapp", team="blog"))
    ok(state, cmd.SetScale(**{**base(), "actor": "blogdep"},
                           **{**scale, "app": "blogapp"}))
