"""Tests for superagent.coordinator.reconcile: the pure planner of Grow and Shrink actions."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from superagent.coordinator.reconcile import (
    Action,
    AppTarget,
    Grow,
    NodeReport,
    Reported,
    Shrink,
    plan,
)

PROPERTY = settings(max_examples=200, deadline=None)


def target(app: str = "web", release: str | None = "r2", busy: bool = False,
           **placement: int) -> AppTarget:
    return AppTarget(app=app, release=release, placement=placement, busy=busy)


def inst(spec: str, state: str = "ready") -> Reported:
    """``inst("web@r2.3")``: an instance of app web, release r2, sequence 3."""
    app, rest = spec.split("@")
    release = rest.split(".")[0]
    return Reported(id=spec, app=app, release=release, state=state)


def report(node: str, *instances: Reported,
           routes: Mapping[str, tuple[str, ...]] | None = None) -> NodeReport:
    if routes is None:  # by default the proxy routes to every ready instance
        by_app: dict[str, list[str]] = {}
        for i in instances:
            if i.state == "ready":
                by_app.setdefault(i.app, []).append(i.id)
        routes = {app: tuple(ids) for app, ids in by_app.items()}
    return NodeReport(node=node, instances=instances, routes=routes)


def reports(*node_reports: NodeReport) -> dict[str, NodeReport]:
    return {r.node: r for r in node_reports}


# -- growing -----------------------------------------------------------------------------


def test_deficit_becomes_grow() -> None:
    """A node with fewer live instances than desired gets a Grow for the difference."""
    actions = plan({"web": target(a=3)}, reports(report("a", inst("web@r2.1"))))
    assert actions == [Grow(node="a", app="web", release="r2", count=2)]


def test_starting_and_unhealthy_count_as_live() -> None:
    """Instances on their way up (or wobbling) are not replaced."""
    node = report("a", inst("web@r2.1", "starting"), inst("web@r2.2", "unhealthy"))
    assert plan({"web": target(a=2)}, reports(node)) == []


def test_nothing_to_do_when_converged() -> None:
    """Every node runs exactly its desired ready instances: no action."""
    node_reports = reports(report("a", inst("web@r2.1"), inst("web@r2.2")),
                           report("b", inst("web@r2.3")))
    assert plan({"web": target(a=2, b=1)}, node_reports) == []


def test_unreachable_node_gets_nothing() -> None:
    """A desired node missing from the reports gets no action (it cannot be reached)."""
    assert plan({"web": target(a=1, gone=1)}, reports(report("a", inst("web@r2.1")))) == []


# -- shrinking ---------------------------------------------------------------------------


def test_surplus_stops_the_newest_and_keeps_routed_ready_ones() -> None:
    """Extra instances: the not-ready ones go first, then the newest; routed ready stay."""
    node = report("a", inst("web@r2.9"), inst("web@r2.10"), inst("web@r2.11", "starting"),
                  inst("web@r2.12"), routes={"web": ("web@r2.10", "web@r2.12")})
    actions = plan({"web": target(a=2)}, reports(node))
    assert actions == [Shrink(node="a", app="web", stop=("web@r2.11", "web@r2.9"),
                              keep=("web@r2.10", "web@r2.12"))]


def test_surplus_keeps_ready_before_routed() -> None:
    """A routed instance that is not ready goes before an unrouted ready one."""
    node = report("a", inst("web@r2.1", "unhealthy"), inst("web@r2.2"),
                  routes={"web": ("web@r2.1",)})
    actions = plan({"web": target(a=1)}, reports(node))
    assert actions == [Shrink(node="a", app="web", stop=("web@r2.1",), keep=("web@r2.2",))]


def test_surplus_by_sequence_number_not_text() -> None:
    """web@r2.10 is newer than web@r2.9 although it sorts before it as text."""
    node = report("a", inst("web@r2.9"), inst("web@r2.10"), routes={})
    actions = plan({"web": target(a=1)}, reports(node))
    assert actions == [Shrink(node="a", app="web", stop=("web@r2.10",), keep=("web@r2.9",))]


def test_surplus_waits_while_a_deficit_is_pending() -> None:
    """No Shrink anywhere for an app while one of its nodes still lacks ready instances."""
    node_reports = reports(report("a", inst("web@r2.1"), inst("web@r2.2")), report("b"))
    actions = plan({"web": target(a=1, b=1)}, node_reports)
    assert actions == [Grow(node="b", app="web", release="r2", count=1)]


def test_not_ready_replacement_counts_as_pending() -> None:
    """Live but not yet ready instances keep the old ones running."""
    node = report("a", inst("web@r1.1"), inst("web@r2.2", "starting"))
    assert plan({"web": target(a=1)}, reports(node)) == []


def test_unreachable_desired_node_blocks_shrinks() -> None:
    """Nothing is known of a desired node that is not reporting: no stop elsewhere."""
    node_reports = reports(report("a", inst("web@r2.1"), inst("web@r1.2")))
    assert plan({"web": target(a=1, gone=1)}, node_reports) == []


def test_other_release_stopped_once_the_serving_one_is_ready_everywhere() -> None:
    """Instances of an older release are stopped when the serving release is ready."""
    node_reports = reports(report("a", inst("web@r1.1"), inst("web@r2.2")),
                           report("b", inst("web@r1.3")))
    actions = plan({"web": target(a=1)}, node_reports)
    assert actions == [
        Shrink(node="a", app="web", stop=("web@r1.1",), keep=("web@r2.2",)),
        Shrink(node="b", app="web", stop=("web@r1.3",), keep=()),
    ]


def test_keep_adds_ready_unrouted_instances() -> None:
    """A Shrink routes to the ready instances it keeps, routed before or not."""
    node = report("a", inst("web@r1.1"), inst("web@r2.2"), routes={"web": ("web@r1.1",)})
    actions = plan({"web": target(a=1)}, reports(node))
    assert actions == [Shrink(node="a", app="web", stop=("web@r1.1",), keep=("web@r2.2",))]


def test_scaled_to_zero_stops_everything() -> None:
    """An empty placement stops every instance of the app."""
    node = report("a", inst("web@r2.1"), inst("web@r2.2", "backoff"))
    actions = plan({"web": target()}, reports(node))
    assert actions == [Shrink(node="a", app="web", stop=("web@r2.1", "web@r2.2"), keep=())]


def test_deleted_app_is_stopped_everywhere() -> None:
    """Instances of an app that is not in the targets are stopped on every node."""
    node_reports = reports(report("a", inst("old@r1.1"), inst("web@r2.2")),
                           report("b", inst("old@r4.3", "crash_loop")))
    actions = plan({"web": target(a=1)}, node_reports)
    assert actions == [
        Shrink(node="a", app="old", stop=("old@r1.1",), keep=()),
        Shrink(node="b", app="old", stop=("old@r4.3",), keep=()),
    ]


def test_app_without_release_runs_nothing() -> None:
    """An app never deployed (release None) has its stray instances stopped, none started."""
    node = report("a", inst("web@r1.1"))
    actions = plan({"web": target(release=None, a=2)}, reports(node))
    assert actions == [Shrink(node="a", app="web", stop=("web@r1.1",), keep=())]


def test_busy_app_is_left_alone() -> None:
    """While a deploy of the app runs, neither deficits nor surpluses produce actions."""
    node_reports = reports(report("a", inst("web@r1.1"), inst("web@r2.2"), inst("web@r3.3")),
                           report("b"))
    assert plan({"web": target(busy=True, a=1, b=2)}, node_reports) == []


def test_stopping_and_stopped_are_ignored() -> None:
    """Instances on their way out neither count as live nor get stopped again."""
    node = report("a", inst("web@r2.1"), inst("web@r2.2", "stopping"),
                  inst("web@r1.3", "stopped"))
    assert plan({"web": target(a=1)}, reports(node)) == []
    node = report("a", inst("web@r2.2", "stopping"))
    assert plan({"web": target(a=1)}, reports(node)) == [
        Grow(node="a", app="web", release="r2", count=1)]


def test_crash_loop_is_replaced_then_removed() -> None:
    """A crash-looping instance gets a replacement first, and is stopped once it is ready."""
    before = reports(report("a", inst("web@r2.1", "crash_loop")))
    assert plan({"web": target(a=1)}, before) == [
        Grow(node="a", app="web", release="r2", count=1)]
    after = reports(report("a", inst("web@r2.1", "crash_loop"), inst("web@r2.2")))
    assert plan({"web": target(a=1)}, after) == [
        Shrink(node="a", app="web", stop=("web@r2.1",), keep=("web@r2.2",))]


def test_last_ready_instance_outlives_a_release_that_never_gets_ready() -> None:
    """The old release keeps serving while the new one crash-loops: Grow, never Shrink."""
    node_reports = reports(report("a", inst("web@r1.1"), inst("web@r2.2", "crash_loop")))
    assert plan({"web": target(a=1)}, node_reports) == [
        Grow(node="a", app="web", release="r2", count=1)]


def test_moving_to_another_node_starts_there_first() -> None:
    """A placement that moved: Grow on the new node, the old one stopped only afterwards."""
    targets = {"web": target(b=1)}
    assert plan(targets, reports(report("a", inst("web@r2.1")), report("b"))) == [
        Grow(node="b", app="web", release="r2", count=1)]
    done = reports(report("a", inst("web@r2.1")), report("b", inst("web@r2.2")))
    assert plan(targets, done) == [Shrink(node="a", app="web", stop=("web@r2.1",), keep=())]


def test_actions_are_ordered_by_node_then_app() -> None:
    """The output order is deterministic: node name, then app name."""
    targets = {"x": target("x", a=1, b=1), "w": target("w", a=1, b=1)}
    actions = plan(targets, reports(report("b"), report("a")))
    assert [(a.node, a.app) for a in actions] == [("a", "w"), ("a", "x"), ("b", "w"),
                                                  ("b", "x")]


# -- a simulated cluster -----------------------------------------------------------------

STATES = ("starting", "ready", "unhealthy", "backoff", "crash_loop", "stopping", "stopped")
RELEASES = ("r1", "r2", "r3")
ROUNDS = 3  # Grow; Shrink once ready (starting ones settle meanwhile); nothing left


@dataclass
class Cluster:
    """Nodes as the planner's actions leave them: Grows start ready instances."""

    instances: dict[str, list[Reported]]
    routes: dict[str, dict[str, tuple[str, ...]]]
    sequence: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))

    def reports(self) -> dict[str, NodeReport]:
        return {node: NodeReport(node=node, instances=tuple(self.instances[node]),
                                 routes=dict(self.routes[node])) for node in self.instances}

    def apply(self, action: Action) -> None:
        node = action.node
        routes = self.routes[node]
        if isinstance(action, Grow):
            new = [Reported(id=f"{action.app}@{action.release}.{next(self.sequence)}",
                            app=action.app, release=action.release, state="ready")
                   for _ in range(action.count)]
            ready = {i.id for i in self.instances[node]
                     if i.app == action.app and i.release == action.release
                     and i.state == "ready"}
            routed = [i for i in routes.get(action.app, ()) if i in ready]
            self.instances[node].extend(new)
            routes[action.app] = (*routed, *(i.id for i in new))
        else:
            stop = set(action.stop)
            self.instances[node] = [i for i in self.instances[node] if i.id not in stop]
            routes[action.app] = action.keep

    def settle(self) -> None:
        """A period passes: starting and unhealthy instances get ready, backoff gives up,
        stops complete."""
        after = {"starting": "ready", "unhealthy": "ready", "backoff": "crash_loop"}
        for node, instances in self.instances.items():
            self.instances[node] = [
                Reported(id=i.id, app=i.app, release=i.release,
                         state=after.get(i.state, i.state))
                for i in instances if i.state not in ("stopping", "stopped")]

    def ready(self, app: str) -> int:
        return sum(1 for instances in self.instances.values() for i in instances
                   if i.app == app and i.state == "ready")


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, AppTarget], Cluster]:
    nodes = [f"n{i}" for i in range(draw(st.integers(1, 4)))]
    apps = ["a0", "a1", "a2"]
    targets = {}
    for app in apps:
        if draw(st.integers(0, 4)) == 0:
            continue  # deleted
        release = draw(st.sampled_from((*RELEASES, None)))
        placement = draw(st.dictionaries(st.sampled_from(nodes), st.integers(0, 3)))
        targets[app] = AppTarget(app=app, release=release, placement=placement,
                                 busy=draw(st.integers(0, 6)) == 0)
    sequence = itertools.count(1)
    instances: dict[str, list[Reported]] = {}
    routes: dict[str, dict[str, tuple[str, ...]]] = {}
    for node in nodes:
        specs = draw(st.lists(st.tuples(st.sampled_from(apps), st.sampled_from(RELEASES),
                                        st.sampled_from(STATES)), max_size=6))
        instances[node] = [Reported(id=f"{app}@{release}.{next(sequence)}", app=app,
                                    release=release, state=state)
                           for app, release, state in specs]
        routes[node] = {}
        for app in apps:
            ids = [i.id for i in instances[node] if i.app == app]
            routed = draw(st.lists(st.sampled_from(ids), unique=True)) if ids else []
            if routed:
                routes[node][app] = tuple(routed)
    return targets, Cluster(instances=instances, routes=routes)


def desired_total(targets: Mapping[str, AppTarget], app: str) -> int:
    t = targets.get(app)
    if t is None or t.release is None:
        return 0
    return sum(t.placement.values())


@PROPERTY
@given(scenarios())
def test_simulated_cluster_converges_and_never_loses_the_last_ready_instance(
        scenario: tuple[dict[str, AppTarget], Cluster]) -> None:
    """Applying the plan round after round reaches the placement within ROUNDS rounds, with
    at most one action per (node, app) per round, none for busy apps, and no round takes
    an app that should run from some ready instances to none."""
    targets, cluster = scenario
    busy = {app for app, t in targets.items() if t.busy}
    for _ in range(ROUNDS):
        actions = plan(targets, cluster.reports())
        pairs = [(a.node, a.app) for a in actions]
        assert pairs == sorted(set(pairs)), "one action per (node, app), in order"
        assert not {a.app for a in actions} & busy
        ready_before = {app: cluster.ready(app) for app in targets}
        for action in actions:
            if isinstance(action, Grow):
                assert action.count > 0
            else:
                assert action.stop and not set(action.stop) & set(action.keep)
            cluster.apply(action)
        for app, before in ready_before.items():
            if desired_total(targets, app) > 0 and before > 0:
                assert cluster.ready(app) > 0, f"{app} lost its last ready instance"
        cluster.settle()

    assert plan(targets, cluster.reports()) == []
    for node, instances in cluster.instances.items():
        running = Counter((i.app, i.release, i.state) for i in instances)
        for app in {i.app for i in instances} | set(targets):
            t = targets.get(app)
            if t is not None and t.busy:
                continue
            mine = {key: n for key, n in running.items() if key[0] == app}
            if t is None or t.release is None or not t.placement.get(node, 0):
                assert not mine, f"{app} still runs on {node}: {mine}"
            else:
                assert mine == {(app, t.release, "ready"): t.placement[node]}


# -- scale to zero -----------------------------------------------------------------------


def test_idle_instances_count_as_running_and_ready() -> None:
    """An app its node idled (instances reported ``idle``, no route) needs nothing: no Grow
    wakes it, and another app's Shrink is not held back by it."""
    idle = report("a", inst("web@r2.1", "idle"), inst("web@r2.2", "idle"), routes={})
    assert plan({"web": target(a=2)}, reports(idle)) == []


def test_scaling_an_idle_app_out_starts_instances_and_in_keeps_idle_ones() -> None:
    """More wanted than idle: a Grow (which wakes the app there); fewer: the surplus idle
    instances are stopped and the kept ones named, so the app stays routed and idle."""
    idle = report("a", inst("web@r2.1", "idle"), inst("web@r2.2", "idle"), routes={})
    assert plan({"web": target(a=3)}, reports(idle)) == [
        Grow(node="a", app="web", release="r2", count=1)]
    assert plan({"web": target(a=1)}, reports(idle)) == [
        Shrink(node="a", app="web", stop=("web@r2.2",), keep=("web@r2.1",))]


def test_a_node_drained_of_an_idle_app_stops_it_without_waking_it() -> None:
    """The placement moved elsewhere: the idle instances are stopped (a no-op on the
    node), once the new node reports the app ready or idle."""
    old = report("a", inst("web@r2.1", "idle"), routes={})
    new = report("b", inst("web@r2.5", "idle"), routes={})
    assert plan({"web": target(b=1)}, reports(old, new)) == [
        Shrink(node="a", app="web", stop=("web@r2.1",), keep=())]
