"""Tests for superagent.coordinator.state: applying commands to ClusterState."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from superagent.coordinator import commands as cmd
from superagent.coordinator import state as state_mod
from superagent.coordinator.errors import SnapshotError, UnknownApp
from superagent.coordinator.state import ClusterState
from tests.coordinator.helpers import (
    add_release,
    all_commands,
    base,
    create_app,
    lifecycle,
    register,
    spec,
    start_deploy,
)


def run(state: ClusterState, *commands: cmd.Command) -> list[dict[str, Any]]:
    return [state.apply(c.to_json()) for c in commands]


def ok(state: ClusterState, command: cmd.Command) -> dict[str, Any]:
    result = state.apply(command.to_json())
    assert result["ok"] is True, result
    return result


def assert_rejected(state: ClusterState, command_json: str, status: int, code: str) -> None:
    before = state.digest()
    result = state.apply(command_json)
    assert result["ok"] is False
    assert (result["status"], result["code"]) == (status, code), result
    assert state.digest() == before
    json.dumps(result)  # JSON-able


def test_every_command_applies() -> None:
    """One of each command type applies ok and leaves one audit entry each, except the
    placements the leader derives every round."""
    state = ClusterState()
    results = run(state, *all_commands())
    assert all(r["ok"] for r in results), results
    assert [e["type"] for e in state.audit] == [c.type for c in all_commands()
                                                if c.type != "set_placement"]
    entry = state.audit[1]  # the first is the restore of an empty state
    assert entry["actor"] == "tester" and entry["at"] == 1000.0
    assert entry["target"] == "app:hello" and entry["outcome"] == "created"


def test_state_contents_after_commands() -> None:
    """Apps, releases, nodes, placement and deploys hold what the commands said."""
    state = ClusterState()
    run(state, create_app(), add_release(), register(), lifecycle("n1", "draining"),
        cmd.SetPlacement(**base(), app="hello", placement={"n1": 2, "n2": 0}))
    ok(state, register("n2"))
    ok(state, cmd.SetPlacement(**base(), app="hello", placement={"n1": 2, "n2": 0}))
    ok(state, start_deploy(at=5.0))
    ok(state, cmd.DeployEvent(**base(at=6.0), app="hello", deploy_id="d1",
                              event={"type": "cancel", "reason": "not wanted"}))
    assert state.apps["hello"].spec == spec()
    assert [r.number for r in state.releases["hello"]] == [1]
    assert state.nodes["n1"].lifecycle == "draining" and state.nodes["n2"].up
    assert state.placement == {"hello": {"n1": 2}}
    d = state.deploys["d1"]
    assert (d.record["status"], d.record["reason"], d.created_at, d.updated_at) == (
        "failed", "cancelled: not wanted", 5, 6)
    assert [h[1] for h in d.history] == ["started", "cancel"]
    assert state.apps["hello"].current_release is None
    assert "apps=1" in repr(state) and "nodes=2" in repr(state)


def test_release_numbering() -> None:
    """Releases are numbered r1, r2, ... per app, and numbers are not reused after delete."""
    state = ClusterState()
    run(state, create_app("a"), create_app("b"))
    assert [ok(state, add_release("a"))["release"] for _ in range(3)] == [1, 2, 3]
    assert ok(state, add_release("b"))["release"] == 1
    ok(state, cmd.DeleteApp(**base(), app="a"))
    ok(state, create_app("a"))
    assert ok(state, add_release("a"))["release"] == 4
    assert state.audit[-1]["outcome"] == "created r4"


def test_idempotent_repeat() -> None:
    """The same key twice returns the first result marked repeated, with one audit entry."""
    state = ClusterState()
    first = create_app(key="same")
    r1 = state.apply(first.to_json())
    digest = state.digest()
    retry = create_app(key="same", at=2000.0)  # a retry through the API gets a new `at`
    r2 = state.apply(retry.to_json())
    assert r2 == {**r1, "repeated": True}
    assert state.digest() == digest
    assert len(state.audit) == 1


def test_idempotent_release_is_not_renumbered() -> None:
    """A retried AddRelease returns the first release number and adds nothing."""
    state = ClusterState()
    ok(state, create_app())
    command = add_release(key="upload-1")
    assert [state.apply(command.to_json())["release"] for _ in range(3)] == [1, 1, 1]
    assert len(state.releases["hello"]) == 1


def test_key_reused_for_other_command() -> None:
    """A key reused for a different command is a 409 and changes nothing."""
    state = ClusterState()
    ok(state, create_app(key="k-x"))
    assert_rejected(state, create_app("other", key="k-x").to_json(), 409, "conflict")


@pytest.mark.parametrize(
    ("command", "status", "code"),
    [
        (lambda: create_app(), 409, "conflict"),
        (lambda: cmd.DeleteApp(**base(), app="nope"), 404, "unknown_app"),
        (lambda: cmd.UpdateAppSpec(**base(), app="nope", spec=spec("nope")), 404,
         "unknown_app"),
        (lambda: cmd.UpdateAppSpec(**base(), app="hello", spec=spec("other")), 400,
         "bad_command"),
        (lambda: cmd.UpdateAppSpec(**base(), app="hello", spec={"app": {"name": "hello"}}),
         400, "bad_command"),
        (lambda: add_release("nope"), 404, "unknown_app"),
        (lambda: cmd.NodeUp(**base(), node="ghost"), 404, "unknown_node"),
        (lambda: lifecycle("ghost", "draining"), 404, "unknown_node"),
        (lambda: lifecycle("n1", "offline"), 409, "illegal_transition"),
        (lambda: lifecycle("n1", "online"), 409, "illegal_transition"),
        (lambda: cmd.SetPlacement(**base(), app="hello", placement={"ghost": 1}), 404,
         "unknown_node"),
        (lambda: cmd.SetPlacement(**base(), app="nope", placement={}), 404, "unknown_app"),
        (lambda: start_deploy(deploy_id="d9", release="r7"), 404, "unknown_release"),
        (lambda: start_deploy(deploy_id="d2", release="r2"), 409, "conflict"),  # d1 runs
        (lambda: start_deploy(deploy_id="d1", release="r2"), 409, "conflict"),
        (lambda: cmd.DeployEvent(**base(), app="hello", deploy_id="d9",
                                 event={"type": "prepared", "node": "n1"}), 404,
         "unknown_deploy"),
        (lambda: cmd.DeployEvent(**base(), app="hello", deploy_id="d1",
                                 event={"type": "switched", "node": "n1"}), 400, "bad_command"),
        (lambda: cmd.DeployEvent(**base(), app="hello", deploy_id="d1",
                                 event={"type": "prepared", "node": "n7"}), 400, "bad_command"),
        (lambda: cmd.StartDeploy(**base(), app="hello", deploy_id="d3", record={"x": 1}), 400,
         "bad_command"),
    ],
)
def test_invalid_commands_change_nothing(command: Any, status: int, code: str) -> None:
    """A command invalid for the current state gives an error result; digest is unchanged."""
    state = ClusterState()
    run(state, create_app(), add_release(), add_release(), register())
    ok(state, start_deploy())
    audit = len(state.audit)
    assert_rejected(state, command().to_json(), status, code)
    assert len(state.audit) == audit


@pytest.mark.parametrize("text", ["{", '{"type":"nope"}', '{"type":"node_up","node":"n1"}'])
def test_malformed_json_is_a_400(text: str) -> None:
    """Undecodable commands give a 400 result, never an exception."""
    assert_rejected(ClusterState(), text, 400, "unknown_command" if "nope" in text
                    else "bad_command")


def test_illegal_transition_names_state_and_event() -> None:
    """The error result of an illegal lifecycle change names the state and the event."""
    state = ClusterState()
    ok(state, register())
    result = state.apply(lifecycle("n1", "offline").to_json())
    assert "online" in result["error"] and "offline" in result["error"]
    ok(state, lifecycle("n1", "draining"))
    ok(state, lifecycle("n1", "offline"))
    ok(state, lifecycle("n1", "online"))
    assert state.audit[-1]["outcome"] == "offline -> online"


def test_node_down_then_reregister() -> None:
    """NodeDown marks a node down; re-registering updates it and marks it up again."""
    state = ClusterState()
    ok(state, register())
    assert ok(state, cmd.NodeDown(**base(), node="n1"))["changed"] is True
    assert ok(state, cmd.NodeDown(**base(), node="n1"))["changed"] is False
    assert ok(state, register(address="10.0.0.2:7000", groups=("gpu",)))["created"] is False
    node = state.nodes["n1"]
    assert (node.up, node.address, node.groups) == (True, "10.0.0.2:7000", ["gpu"])


def test_bounded_audit_and_idempotency(monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit log and idempotency table keep only the newest entries."""
    monkeypatch.setattr(state_mod, "AUDIT_LIMIT", 3)
    monkeypatch.setattr(state_mod, "IDEMPOTENCY_LIMIT", 2)
    state = ClusterState()
    ok(state, register(key="r0"))
    for i in range(1, 5):
        ok(state, cmd.NodeDown(**base(key=f"r{i}"), node="n1"))
    assert [e["seq"] for e in state.audit] == [3, 4, 5]
    assert list(state.idempotency) == ["r3", "r4"]


def test_json_round_trip_is_lossless() -> None:
    """from_json(to_json()) restores an equal state that keeps applying identically."""
    state = ClusterState()
    run(state, *all_commands()[:-1])
    copy = ClusterState.from_json(state.to_json())
    assert copy.to_json() == state.to_json() and copy.digest() == state.digest()
    assert repr(copy) == repr(state)
    nxt = add_release()
    assert copy.apply(nxt.to_json()) == state.apply(nxt.to_json())
    assert copy.digest() == state.digest()


@pytest.mark.parametrize("text", ["{", '{"version": 99}', '{"version": 1}'])
def test_corrupt_snapshot(text: str) -> None:
    """A document that is not a state raises SnapshotError."""
    with pytest.raises(SnapshotError):
        ClusterState.from_json(text)


# -- determinism property ------------------------------------------------------

APPS = st.sampled_from(["a", "b"])
NODES = st.sampled_from(["n1", "n2", "n3"])
KEYS = st.text(alphabet="abcdef", min_size=1, max_size=3)  # small: repeats happen
AT = st.floats(min_value=0, max_value=2e9, allow_nan=False)


def _cmd(cls: type[cmd.Command], **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    return st.builds(cls, key=KEYS, at=AT, actor=st.just("prop"), **fields).map(
        lambda c: c.to_json())


COMMAND_JSON = st.one_of(
    APPS.flatmap(lambda a: _cmd(cmd.CreateApp, name=st.just(a), spec=st.just(spec(a)))),
    APPS.flatmap(lambda a: _cmd(cmd.UpdateAppSpec, app=st.just(a),
                                spec=st.sampled_from([spec(a), spec(a, "run2"), spec("b")]))),
    _cmd(cmd.DeleteApp, app=APPS),
    APPS.flatmap(lambda a: _cmd(cmd.AddRelease, app=st.just(a), sha256=st.just("0" * 64),
                                size=st.integers(0, 99), spec=st.just(spec(a)),
                                env=st.dictionaries(st.sampled_from(["X", "Y"]),
                                                    st.text(max_size=3)))),
    _cmd(cmd.RegisterNode, node=NODES, address=st.just("h:1"),
         groups=st.sampled_from([("default",), ("gpu", "default")]),
         capacity=st.integers(1, 9)),
    _cmd(cmd.NodeUp, node=NODES),
    _cmd(cmd.NodeDown, node=NODES),
    _cmd(cmd.SetNodeLifecycle, node=NODES,
         lifecycle=st.sampled_from(["online", "draining", "offline"])),
    _cmd(cmd.SetPlacement, app=APPS,
         placement=st.dictionaries(NODES, st.integers(0, 3), max_size=3),
         reason=st.sampled_from(["", "no room"])),
    _cmd(cmd.LabelNode, node=NODES, groups=st.sampled_from([("web",), ("gpu", "web")])),
    _cmd(cmd.SetScale, app=APPS, groups=st.just(("web",)), per_node=st.integers(0, 3),
         instances=st.one_of(st.none(), st.integers(1, 5)),
         scale_id=st.sampled_from(["", "s1", "s2"])),
    _cmd(cmd.FinishScale, app=APPS, scale_id=st.sampled_from(["s1", "s2", "s5"]),
         outcome=st.sampled_from(["converged", "short"])),
    st.builds(lambda app, d, r: start_deploy(app, d, r).to_json(), APPS,
              st.sampled_from(["d1", "d2"]), st.sampled_from(["r1", "r2"])),
    st.builds(lambda app, d, n: cmd.DeployEvent(**base(), app=app, deploy_id=d,
                                                event={"type": "prepared", "node": n}).to_json(),
              APPS, st.sampled_from(["d1", "d2"]), NODES),
    st.sampled_from(["{", '{"type":"x"}']),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(COMMAND_JSON, max_size=30), st.integers(min_value=0, max_value=34))
def test_determinism(commands: list[str], cut: int) -> None:
    """Two fresh states fed the same log agree; a snapshot mid-log changes nothing."""
    setup = [create_app("a"), add_release("a"), register("n1"), register("n2")]
    commands = [c.to_json() for c in setup] + commands  # a populated start: more commands apply
    one, two = ClusterState(), ClusterState()
    results_one = [one.apply(c) for c in commands]
    results_two = []
    for i, c in enumerate(commands):
        if i == cut:
            two = ClusterState.from_json(two.to_json())
        results_two.append(two.apply(c))
    assert results_one == results_two
    assert one.digest() == two.digest()


def test_a_succeeded_deploy_makes_its_release_the_apps_spec() -> None:
    """The app's spec is its serving release's (routes, scale), not its first upload's."""
    from dataclasses import replace

    from superagent.coordinator.deploy.model import DeployRecord, Stage, Status

    state = ClusterState()
    run(state, create_app(), add_release(), register())
    newer = spec(command="python app2.py")
    ok(state, add_release(spec=newer))
    ok(state, start_deploy(release="r2"))
    deploy = state.deploys["d1"]
    done = replace(DeployRecord.from_doc(deploy.record), stage=Stage.DONE,
                   status=Status.SUCCEEDED)
    deploy.record = done.to_doc()  # as the planner leaves a deploy whose every step went well
    ok(state, cmd.FinishDeploy(**base(at=7.0), app="hello", deploy_id="d1"))
    app = state.apps["hello"]
    assert (app.current_release, app.spec, app.updated_at) == ("r2", newer, 7.0)


def _served_via_deploy(state: ClusterState, release: str, deploy_id: str) -> None:
    """Mark ``release`` deployed successfully, as the planner leaves such a deploy."""
    from dataclasses import replace

    from superagent.coordinator.deploy.model import DeployRecord, Stage, Status

    ok(state, start_deploy(release=release, deploy_id=deploy_id))
    deploy = state.deploys[deploy_id]
    deploy.record = replace(DeployRecord.from_doc(deploy.record), stage=Stage.DONE,
                            status=Status.SUCCEEDED).to_doc()
    ok(state, cmd.FinishDeploy(**base(), app="hello", deploy_id=deploy_id))


def test_retained_releases_are_the_serving_and_the_last_that_served() -> None:
    """A prepare keeps the release it prepares, the serving one and the newest releases
    that served; releases that never served take no good one's place."""
    state = ClusterState()
    run(state, create_app(), register())
    for _ in range(9):
        ok(state, add_release())
    for number in (1, 2, 3, 4, 5, 6):
        _served_via_deploy(state, f"r{number}", f"d{number}")
    # r7, r8 and r9 never served (failed or rolled back)
    assert [state.served("hello", f"r{n}") for n in range(1, 10)] == [True] * 6 + [False] * 3
    assert state.retained("hello", "r9") == ("r9", "r6", "r5", "r4", "r3", "r2")
    assert state.retained("hello", "r9", succeeded=2) == ("r9", "r6", "r5")
    assert state.release_outcomes("hello")["r6"] == "succeeded"
    # a state written before releases recorded `served` infers it on load
    doc = json.loads(state.to_json())
    for release in doc["releases"]["hello"]:
        del release["served"]
    again = ClusterState.from_json(json.dumps(doc))
    assert [again.served("hello", f"r{n}") for n in range(1, 10)] == [True] * 6 + [False] * 3


# -- scale, labels, placement reasons -------------------------------------------


def _scale(app: str = "hello", **kw: Any) -> cmd.SetScale:
    return cmd.SetScale(**{**base(), "app": app, "groups": ("default",), **kw})


def _finish(scale_id: str, outcome: str = "converged", reason: str = "") -> cmd.FinishScale:
    return cmd.FinishScale(**base(at=9.0), app="hello", scale_id=scale_id, outcome=outcome,
                           reason=reason)


def _spec_with_scale(**scale: Any) -> dict[str, Any]:
    from superagent.manifest import parse_manifest, spec_to_json

    return spec_to_json(parse_manifest({"app": {"name": "hello"},
                                        "run": {"command": "python app.py"},
                                        "scale": scale}, source="test"))


def test_effective_scale_is_the_override_else_the_spec() -> None:
    """Without SetScale the spec's [scale] applies; SetScale overrides it."""
    state = ClusterState()
    ok(state, create_app(spec=_spec_with_scale(groups=["web"], per_node=2)))
    assert state.effective_scale("hello") == {"groups": ["web"], "per_node": 2,
                                              "instances": None}
    ok(state, cmd.UpdateAppSpec(**base(), app="hello", spec=_spec_with_scale(instances=5)))
    assert state.effective_scale("hello") == {"groups": ["default"], "per_node": 1,
                                              "instances": 5}
    result = ok(state, _scale(groups=("web", "api"), instances=3, scale_id="s1"))
    assert result["scale"] == {"groups": ["web", "api"], "per_node": 1, "instances": 3}
    assert state.effective_scale("hello") == result["scale"]
    assert state.audit[-1]["outcome"] == "scaling s1: 3 instances in web,api"
    state.effective_scale("hello")["groups"].append("x")  # a copy: the state is untouched
    assert state.apps["hello"].scale == result["scale"]
    with pytest.raises(UnknownApp):
        state.effective_scale("nope")


def test_scaling_runs_until_finish_scale() -> None:
    """SetScale starts a scaling record; FinishScale ends it with its outcome and reason."""
    state = ClusterState()
    ok(state, create_app())
    result = ok(state, _scale(per_node=3))
    scale_id = result["scale_id"]
    assert scale_id == f"s{state.audit_seq}"  # unnamed: the state names it after its seq
    app = state.apps["hello"]
    assert app.scaling == {"id": scale_id, "at": 1000.0, "actor": "tester",
                           "scale": {"groups": ["default"], "per_node": 3, "instances": None}}
    assert_rejected(state, _finish("other").to_json(), 409, "conflict")
    ok(state, _finish(scale_id, "short", "2 of 3 instances: no room"))
    assert app.scaling is None
    assert app.last_scaling is not None
    assert (app.last_scaling["id"], app.last_scaling["outcome"], app.last_scaling["reason"],
            app.last_scaling["finished_at"]) == (scale_id, "short", "2 of 3 instances: no room",
                                                 9.0)
    assert state.audit[-1]["outcome"] == "short: 2 of 3 instances: no room"
    result = state.apply(_finish(scale_id).to_json())  # over: a late finish is refused
    assert result["ok"] is False and f"scaling {scale_id}" in result["error"]
    assert state.apps["hello"].scale == {"groups": ["default"], "per_node": 3,
                                         "instances": None}  # the override stays


def test_a_newer_scale_replaces_the_running_one() -> None:
    """Scaling again while a scaling runs ends the first as replaced."""
    state = ClusterState()
    ok(state, create_app())
    ok(state, _scale(per_node=2, scale_id="s-a"))
    ok(state, _scale(per_node=4, scale_id="s-b"))
    app = state.apps["hello"]
    assert app.scaling is not None and app.scaling["id"] == "s-b"
    assert app.last_scaling is not None
    assert (app.last_scaling["id"], app.last_scaling["outcome"]) == ("s-a", "replaced")
    assert "s-b" in app.last_scaling["reason"]
    for scale_id in ("s-a", "s-b"):  # ids are never reused
        assert_rejected(state, _scale(scale_id=scale_id).to_json(), 409, "conflict")


def test_scale_and_deploy_exclude_each_other() -> None:
    """SetScale is refused while a deploy runs, StartDeploy while a scaling runs; each
    error names what runs."""
    state = ClusterState()
    run(state, create_app(), add_release(), register())
    ok(state, start_deploy())
    result = state.apply(_scale(per_node=2).to_json())
    assert (result["status"], result["code"]) == (409, "conflict")
    assert "deploy d1 of hello is running" in result["error"]
    assert state.apps["hello"].scaling is None and state.apps["hello"].scale is None

    state = ClusterState()
    run(state, create_app(), add_release(), register())
    ok(state, _scale(per_node=2, scale_id="s7"))
    result = state.apply(start_deploy().to_json())
    assert (result["status"], result["code"]) == (409, "conflict")
    assert "scaling s7 of hello is in progress" in result["error"]
    ok(state, _finish("s7"))
    ok(state, start_deploy())


def test_an_autoscaled_app_runs_what_the_autoscaler_decided_within_its_bounds() -> None:
    """[scale] min/max/target (spec or override): instances start at min; Autoscale moves
    them within min..max, says why in the audit log and never blocks a deploy."""
    state = ClusterState()
    run(state, create_app(spec=_spec_with_scale(groups=["web"], min=2, max=6, target=4)),
        add_release(), register())
    auto = {"min": 2, "max": 6, "target": 4.0, "metric": "in_flight"}
    assert state.effective_scale("hello") == {"groups": ["web"], "per_node": 1,
                                              "instances": 2, "auto": auto}
    ok(state, cmd.Autoscale(**base(), app="hello", instances=5,
                            reason="scale up: in_flight 9.0 per instance", inputs={"load": 18}))
    assert state.effective_scale("hello")["instances"] == 5
    assert state.audit[-1]["outcome"] == ("2 -> 5 instances: scale up: in_flight 9.0 per"
                                          ' instance (inputs {"load":18})')
    assert state.apps["hello"].scaling is None  # not a scaling: deploys go on
    assert_rejected(state, cmd.Autoscale(**base(), app="hello", instances=7).to_json(),
                    400, "bad_command")
    ok(state, start_deploy())
    result = state.apply(cmd.Autoscale(**base(), app="hello", instances=3).to_json())
    assert (result["status"], "deploy d1" in result["error"]) == (409, True)

    state = ClusterState()
    ok(state, create_app())
    assert_rejected(state, cmd.Autoscale(**base(), app="hello", instances=1).to_json(),
                    409, "conflict")  # not autoscaled
    result = ok(state, _scale(auto={"min": 1, "max": 3, "target": 0.5, "metric": "cpu"}))
    assert result["scale"]["auto"] == {"min": 1, "max": 3, "target": 0.5, "metric": "cpu"}
    assert state.effective_scale("hello")["instances"] == 1
    assert "1-3 instances in default, autoscaled to 0.5 cpu per instance" in (
        state.audit[-1]["outcome"])
    ok(state, cmd.Autoscale(**base(), app="hello", instances=3))
    ok(state, _scale(auto={"min": 1, "max": 2, "target": 0.5}))  # a lower max clamps
    assert state.effective_scale("hello")["instances"] == 2


@pytest.mark.parametrize("auto", [
    {"min": 3, "max": 2, "target": 1}, {"min": 1, "max": 2}, {"min": 1, "max": 2, "target": 0},
    {"min": 1, "max": 2, "target": 1, "metric": "rps"}, {"min": "1", "max": 2, "target": 1},
    {"min": 1, "max": 2, "target": 1, "extra": 1},
])
def test_a_bad_autoscaling_policy_is_a_400_naming_auto(auto: dict[str, Any]) -> None:
    state = ClusterState()
    ok(state, create_app())
    result = state.apply(json.dumps({**_scale().to_doc(), "auto": auto}))
    assert (result["status"], result["code"]) == (400, "bad_command"), result
    assert result["error"].startswith("set_scale.auto: "), result


def test_scale_of_unknown_app_is_a_404() -> None:
    state = ClusterState()
    assert_rejected(state, _scale("nope").to_json(), 404, "unknown_app")
    assert_rejected(state, cmd.FinishScale(**base(), app="nope", scale_id="s1",
                                           outcome="converged").to_json(), 404, "unknown_app")


def test_label_wins_over_reregistration() -> None:
    """LabelNode sets the groups and marks the node labeled; a re-registration then keeps
    the label's groups (but updates address and capacity)."""
    state = ClusterState()
    ok(state, register(groups=("default",)))
    assert state.nodes["n1"].labeled is False
    result = ok(state, cmd.LabelNode(**base(at=5.0), node="n1", groups=("web", "api")))
    assert result == {"ok": True, "node": "n1", "groups": ["web", "api"], "changed": True}
    assert state.audit[-1]["outcome"] == "groups web,api"
    ok(state, register(groups=("gpu",), capacity=3, address="10.0.0.9:7000"))
    node = state.nodes["n1"]
    assert (node.groups, node.labeled, node.capacity, node.address) == (
        ["web", "api"], True, 3, "10.0.0.9:7000")
    assert ok(state, cmd.LabelNode(**base(), node="n1", groups=("web", "api")))[
        "changed"] is False
    assert_rejected(state, cmd.LabelNode(**base(), node="ghost", groups=("web",)).to_json(),
                    404, "unknown_node")


def test_placement_reason_is_kept_and_cleared() -> None:
    """SetPlacement's reason is state.placement_reason[app]; an empty one clears it, and
    deleting the app drops it."""
    state = ClusterState()
    run(state, create_app(), register())
    ok(state, cmd.SetPlacement(**base(), app="hello", placement={"n1": 2},
                               reason="2 of 3 instances: no room"))
    assert state.placement_reason == {"hello": "2 of 3 instances: no room"}
    assert state.audit[-1]["type"] != "set_placement"  # derived every round: not audited
    ok(state, cmd.SetPlacement(**base(), app="hello", placement={"n1": 3}))
    assert state.placement_reason == {}
    ok(state, cmd.SetPlacement(**base(), app="hello", placement={}, reason="no eligible node"))
    ok(state, cmd.DeleteApp(**base(), app="hello"))
    assert state.placement_reason == {}


def test_an_older_snapshot_loads_with_defaults() -> None:
    """A state written before scale, scaling, labels and placement reasons loads."""
    state = ClusterState()
    run(state, create_app(), register(), cmd.SetPlacement(**base(), app="hello",
                                                          placement={"n1": 1}))
    doc = json.loads(state.to_json())
    del doc["placement_reason"]
    for app in doc["apps"]:
        for key in ("scale", "scaling", "last_scaling"):
            del app[key]
    for node in doc["nodes"]:
        del node["labeled"]
    old = ClusterState.from_json(json.dumps(doc))
    assert old.to_json() == state.to_json()
    assert old.nodes["n1"].labeled is False and old.apps["hello"].scaling is None
    assert old.effective_scale("hello") == {"groups": ["default"], "per_node": 1,
                                            "instances": None}
