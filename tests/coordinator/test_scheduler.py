"""Tests for superagent.coordinator.scheduler: the pure placement of apps on nodes."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from superagent.coordinator.scheduler import AppScale, NodeInfo, Placement, place

PROPERTY = settings(max_examples=200, deadline=None)


def node(name: str, *groups: str, capacity: int = 100, eligible: bool = True,
         idle: tuple[str, ...] = ()) -> NodeInfo:
    return NodeInfo(name=name, groups=frozenset(groups or ("default",)), capacity=capacity,
                    eligible=eligible, idle=frozenset(idle))


def per_node(app: str, k: int = 1, *groups: str) -> AppScale:
    return AppScale(app=app, groups=groups or ("default",), per_node=k, instances=None)


def spread(app: str, k: int, *groups: str) -> AppScale:
    return AppScale(app=app, groups=groups or ("default",), per_node=1, instances=k)


def nodes_of(*names: str, capacity: int = 100) -> list[NodeInfo]:
    return [node(name, capacity=capacity) for name in names]


def moved(before: Mapping[str, int], after: Mapping[str, int]) -> int:
    """Instances that had to stop somewhere (and start elsewhere)."""
    return sum(max(0, count - after.get(name, 0)) for name, count in before.items())


# -- per_node ----------------------------------------------------------------------------


def test_per_node_puts_k_on_every_eligible_node() -> None:
    """per_node = 2 on three nodes is two on each."""
    result = place([per_node("web", 2)], nodes_of("a", "b", "c"), {})
    assert result.nodes == {"web": {"a": 2, "b": 2, "c": 2}}
    assert result.short == {}


def test_per_node_zero_places_nothing_and_is_not_short() -> None:
    """per_node = 0 is a wish for nothing: an empty placement, met."""
    result = place([per_node("web", 0)], nodes_of("a"), {})
    assert result.nodes == {"web": {}}
    assert result.short == {}


def test_groups_restrict_the_eligible_nodes() -> None:
    """Only nodes in one of the app's groups get it; a node in several groups counts once."""
    nodes = [node("a", "web"), node("b", "batch"), node("c", "web", "batch"), node("d", "gpu")]
    result = place([per_node("site", 1, "web", "batch")], nodes, {})
    assert result.nodes == {"site": {"a": 1, "b": 1, "c": 1}}


def test_no_eligible_node_is_short_with_the_groups() -> None:
    """An app whose groups no eligible node carries is placed nowhere, and says why."""
    result = place([per_node("ml", 1, "gpu")], nodes_of("a"), {})
    assert result.nodes == {"ml": {}}
    assert result.short == {"ml": "no eligible node in groups ['gpu']"}


def test_ineligible_nodes_get_nothing() -> None:
    """A node the caller marks ineligible (down, draining past its wait, offline) gets no
    instance, and what it held is placed on the others."""
    nodes = [node("a"), node("b", eligible=False)]
    result = place([per_node("web", 1), spread("api", 4)], nodes, {"api": {"b": 2}})
    assert result.nodes == {"web": {"a": 1}, "api": {"a": 4}}


# -- instances ---------------------------------------------------------------------------


def test_instances_spread_evenly() -> None:
    """instances = 5 over three nodes is 2, 2, 1: the extra ones go to the first names."""
    result = place([spread("api", 5)], nodes_of("a", "b", "c"), {})
    assert result.nodes == {"api": {"a": 2, "b": 2, "c": 1}}


def test_instances_fewer_than_nodes_is_anti_affine() -> None:
    """Two instances on four nodes never share a node."""
    result = place([spread("api", 2)], nodes_of("a", "b", "c", "d"), {})
    assert result.nodes["api"] == {"a": 1, "b": 1}


def test_instances_ties_go_to_the_least_loaded_node() -> None:
    """Between equal candidates the node with fewest instances in total wins, then the name."""
    apps = [per_node("aaa", 3, "busy"), spread("bbb", 1)]
    nodes = [node("a", "default", "busy"), node("b")]
    assert place(apps, nodes, {}).nodes["bbb"] == {"b": 1}


def test_instances_zero_places_nothing_and_is_not_short() -> None:
    """instances = 0 is met by no instance, even with no eligible node."""
    result = place([spread("api", 0, "gpu")], nodes_of("a"), {})
    assert result.nodes == {"api": {}}
    assert result.short == {}


def test_previous_valid_placement_is_kept() -> None:
    """A balanced previous placement stays as it is, even where the tie-break would differ."""
    previous = {"api": {"b": 2, "c": 1, "a": 2}}
    result = place([spread("api", 5)], nodes_of("a", "b", "c"), previous)
    assert result.nodes["api"] == {"a": 2, "b": 2, "c": 1}
    previous = {"api": {"c": 2, "b": 2, "a": 1}}
    assert place([spread("api", 5)], nodes_of("a", "b", "c"), previous).nodes["api"] == \
        {"a": 1, "b": 2, "c": 2}


def test_node_joining_moves_as_few_as_possible() -> None:
    """{a: 2, b: 2} with a new node c: one instance moves, the spread is even again."""
    result = place([spread("api", 4)], nodes_of("a", "b", "c"), {"api": {"a": 2, "b": 2}})
    assert result.nodes["api"] == {"a": 2, "b": 1, "c": 1}
    assert moved({"a": 2, "b": 2}, result.nodes["api"]) == 1


def test_node_returning_gets_its_share_back_with_minimal_moves() -> None:
    """A node that was away (its instances went elsewhere) gets back only what evens out."""
    away = place([spread("api", 6)], nodes_of("a", "b"), {"api": {"a": 2, "b": 2, "c": 2}})
    assert away.nodes["api"] == {"a": 3, "b": 3}
    back = place([spread("api", 6)], nodes_of("a", "b", "c"), away.nodes)
    assert back.nodes["api"] == {"a": 2, "b": 2, "c": 2}
    assert moved(away.nodes["api"], back.nodes["api"]) == 2


def test_node_leaving_moves_only_its_instances() -> None:
    """When a node goes, only its instances are placed again; the others stay."""
    previous = {"api": {"a": 1, "b": 1, "c": 1}}
    result = place([spread("api", 3)], nodes_of("a", "c", "d"), previous)
    assert result.nodes["api"] == {"a": 1, "c": 1, "d": 1}


def test_shrinking_instances_keeps_previous_nodes() -> None:
    """Fewer instances: the ones left stay where instances were."""
    previous = {"api": {"a": 1, "b": 1, "c": 1, "d": 1}}
    result = place([spread("api", 2)], nodes_of("a", "b", "c", "d"), {"api": {"c": 1, "d": 1}})
    assert result.nodes["api"] == {"c": 1, "d": 1}
    result = place([spread("api", 3)], nodes_of("a", "b", "c", "d"), previous)
    assert moved(previous["api"], result.nodes["api"]) == 1


# -- capacity ----------------------------------------------------------------------------


def test_capacity_is_never_exceeded_and_short_names_the_full_nodes() -> None:
    """per_node beyond a node's room stops at its capacity, and the reason names it."""
    apps = [per_node("a-first", 2), per_node("b-second", 2)]
    result = place(apps, [node("web", capacity=3)], {})
    assert result.nodes == {"a-first": {"web": 2}, "b-second": {"web": 1}}
    assert result.short == {
        "b-second": "1 of 2 instances: no room on eligible nodes (web: 3/3)"}


def test_instances_fill_what_room_there_is() -> None:
    """instances over small nodes fills every room, then reports the shortfall."""
    result = place([spread("api", 7)], [node("a", capacity=2), node("b", capacity=3)], {})
    assert result.nodes["api"] == {"a": 2, "b": 3}
    assert result.short["api"] == "5 of 7 instances: no room on eligible nodes (a: 2/2, b: 3/3)"


def test_instances_go_around_a_full_node() -> None:
    """A full node gets none; the others share the rest evenly."""
    nodes = [node("a", capacity=1), node("b"), node("c")]
    result = place([per_node("aa", 1, "default"), spread("api", 4)], nodes, {})
    assert result.nodes["api"] == {"b": 2, "c": 2}
    assert "api" not in result.short


def test_short_lists_at_most_three_full_nodes() -> None:
    """A reason stays short when many nodes are full."""
    nodes = [node(f"n{i}", capacity=0) for i in range(5)]
    result = place([spread("api", 2)], nodes, {})
    assert result.short["api"] == ("0 of 2 instances: no room on eligible nodes "
                                   "(n0: 0/0, n1: 0/0, n2: 0/0, +2 more)")


def test_apps_are_served_in_name_order() -> None:
    """The first name wins a full node, whatever the input order."""
    apps = [spread("zeta", 1), spread("alpha", 1)]
    result = place(apps, [node("a", capacity=1)], {"zeta": {"a": 1}})
    assert result.nodes == {"alpha": {"a": 1}, "zeta": {}}
    assert "zeta" in result.short


def test_bad_input_raises_value_error() -> None:
    """Duplicate names and negative numbers are the caller's bug, named."""
    with pytest.raises(ValueError, match="node 'a' listed twice"):
        place([], [node("a"), node("a")], {})
    with pytest.raises(ValueError, match="app 'x' listed twice"):
        place([spread("x", 1), spread("x", 2)], [node("a")], {})
    with pytest.raises(ValueError, match="capacity"):
        place([], [node("a", capacity=-1)], {})
    with pytest.raises(ValueError, match="negative scale"):
        place([spread("x", -1)], [node("a")], {})


def test_previous_for_unknown_apps_and_nodes_is_ignored() -> None:
    """Stale previous entries (deleted apps, gone nodes) do not matter."""
    result = place([spread("api", 1)], nodes_of("a"), {"gone": {"a": 5}, "api": {"zz": 1}})
    assert result.nodes == {"api": {"a": 1}}


def test_repr_summarises() -> None:
    """The repr counts apps, instances and short apps."""
    result = place([spread("api", 3), per_node("x", 1, "gpu")], nodes_of("a"), {})
    assert repr(result) == "<Placement 2 apps, 3 instances, 1 short>"


# -- idle apps (scaled to zero) --------------------------------------------------------


def test_idle_apps_take_no_room_but_a_reserve_for_one_cold_start() -> None:
    """Two apps idle on a node of capacity 3 keep one place for a cold start between them,
    so a running app gets the other two (it would get one if they ran); the short reason
    says what is kept."""
    nodes = [node("n", capacity=3, idle=("a1", "a2"))]
    apps = [per_node("a1"), per_node("a2"), spread("web", 5)]
    result = place(apps, nodes, {})
    assert result.nodes == {"a1": {"n": 1}, "a2": {"n": 1}, "web": {"n": 2}}
    assert result.short == {"web": "2 of 5 instances: no room on eligible nodes"
                                    " (n: 3/3 with 1 kept for a cold start)"}
    running = place(apps, [node("n", capacity=3)], {})
    assert running.nodes["web"] == {"n": 1}


def test_the_reserve_is_the_largest_idle_app_s_count() -> None:
    """Idle apps of 3 and 1 instances on a node of 5: 3 are kept, 2 left for the rest."""
    nodes = [node("n", capacity=5, idle=("big", "small"))]
    result = place([per_node("big", 3), per_node("small"), spread("web", 10)], nodes, {})
    assert result.nodes == {"big": {"n": 3}, "small": {"n": 1}, "web": {"n": 2}}


def test_idle_apps_are_served_in_name_order_like_running_ones() -> None:
    """An idle app sorting first keeps its reserve from the apps after it; one sorting
    after a running app gets the room that app left plus the reserve, as it would running:
    being idle never gives an app less room, nor more priority."""
    nodes = [node("n", capacity=4, idle=("aaa",))]
    result = place([per_node("aaa", 2), spread("mid", 9)], nodes, {})
    assert result.nodes == {"aaa": {"n": 2}, "mid": {"n": 2}}
    nodes = [node("n", capacity=4, idle=("zzz",))]
    result = place([spread("mid", 2), per_node("zzz", 2)], nodes, {})
    assert result.nodes == {"mid": {"n": 2}, "zzz": {"n": 2}}
    result = place([spread("mid", 9), per_node("zzz", 2)], nodes, {})
    assert result.nodes == {"mid": {"n": 4}, "zzz": {}}
    assert place([spread("mid", 9), per_node("zzz", 2)], [node("n", capacity=4)],
                 {}).nodes == result.nodes


def test_one_cold_start_fits_without_moving_anything() -> None:
    """The idle app wakes (its node no longer reports it idle): placing again counts it,
    and everything stays where it was, the running app included. With a second app still
    idle there, the reserve is kept again for it: the running app falls short."""
    apps = [per_node("a1"), spread("web", 5)]
    idle = place(apps, [node("n", capacity=3, idle=("a1",))], {})
    assert idle.nodes == {"a1": {"n": 1}, "web": {"n": 2}}
    woken = place(apps, [node("n", capacity=3)], idle.nodes)
    assert woken.nodes == idle.nodes
    apps.append(per_node("a2"))
    idle = place(apps, [node("n", capacity=3, idle=("a1", "a2"))], {})
    assert idle.nodes == {"a1": {"n": 1}, "a2": {"n": 1}, "web": {"n": 2}}
    woken = place(apps, [node("n", capacity=3, idle=("a2",))], idle.nodes)
    assert woken.nodes == {"a1": {"n": 1}, "a2": {"n": 1}, "web": {"n": 1}}
    assert "with 1 kept for a cold start" in woken.short["web"]


def test_an_idle_app_keeps_its_placement() -> None:
    """Being idle never moves the app itself: a spread app idle on b and c stays there
    although a holds nothing, and the room it frees goes to the apps after it."""
    nodes = [node("a", capacity=2), node("b", capacity=2, idle=("api",)),
             node("c", capacity=2, idle=("api",))]
    previous = {"api": {"b": 1, "c": 1}, "web": {"a": 2}}
    result = place([spread("api", 2), spread("web", 4)], nodes, previous)
    assert result.nodes == {"api": {"b": 1, "c": 1}, "web": {"a": 2, "b": 1, "c": 1}}
    assert result.short == {}
    assert place([spread("api", 2), spread("web", 4)], nodes, result.nodes) == result


def test_going_idle_never_moves_an_app_into_the_reserve() -> None:
    """An app that goes idle on a node where another app is idle already gets no more
    room there than it had: the reserve keeps what it had, it does not grow it. Else the
    scheduler would move an instance onto the idle node (a start there, which wakes the
    app), and once it idled again, back: a move every idle timeout."""
    nodes = [node("x", "x", capacity=3), node("y", "y", capacity=10)]
    apps = [spread("a0", 2, "x"), spread("b", 4, "x", "y")]
    running = place(apps, nodes, {})
    assert running.nodes == {"a0": {"x": 2}, "b": {"x": 1, "y": 3}}
    a0_idle = [node("x", "x", capacity=3, idle=("a0",)), nodes[1]]
    assert place(apps, a0_idle, running.nodes) == running
    both_idle = [node("x", "x", capacity=3, idle=("a0", "b")), nodes[1]]
    assert place(apps, both_idle, running.nodes) == running
    # a per_node app short on a node where a bigger app is idle does not grow by idling
    apps = [per_node("big", 3), per_node("small", 2)]
    short = place(apps, [node("n", capacity=4, idle=("big",))], {})
    assert short.nodes == {"big": {"n": 3}, "small": {"n": 1}}
    idle = place(apps, [node("n", capacity=4, idle=("big", "small"))], short.nodes)
    assert idle.nodes == short.nodes
    assert idle.short == {"small": "1 of 2 instances: no room on eligible nodes"
                                   " (n: 3/4 with 3 kept for a cold start)"}


def test_an_idle_app_counts_where_it_runs_and_where_it_is_not_eligible_is_ignored() -> None:
    """Idle on n1 only: it takes room on n2, where it runs; a node naming an app idle that
    is not in the app's groups changes nothing."""
    nodes = [node("n1", capacity=2, idle=("api",)), node("n2", capacity=2),
             node("n3", "gpu", capacity=1, idle=("api", "web"))]
    result = place([per_node("api", 2), spread("web", 3)], nodes, {})
    assert result.nodes == {"api": {"n1": 2, "n2": 2}, "web": {}}
    assert result.short["web"].startswith("0 of 3 instances")


# -- properties --------------------------------------------------------------------------

GROUPS = ("a", "b", "c")


NODE_NAMES = [f"n{i}" for i in range(8)]  # n7 never exists: previous may name it


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[AppScale], list[NodeInfo], dict[str, dict[str, int]]]:
    app_specs = draw(st.lists(st.tuples(st.sets(st.sampled_from((*GROUPS, "d")), min_size=1,
                                                max_size=2),
                                        st.integers(0, 3), st.none() | st.integers(0, 12)),
                              min_size=1, max_size=8))
    apps = [AppScale(app=f"app{i}", groups=tuple(sorted(groups)), per_node=k, instances=total)
            for i, (groups, k, total) in enumerate(app_specs)]
    # a node may report any app idle, one it is not eligible for or an unknown one too
    idle_names = [app.app for app in apps] + ["ghost"]
    node_specs = draw(st.lists(st.tuples(st.frozensets(st.sampled_from(GROUPS), max_size=2),
                                         st.integers(0, 8), st.booleans(),
                                         st.frozensets(st.sampled_from(idle_names),
                                                       max_size=3)),
                               min_size=1, max_size=7))
    nodes = [NodeInfo(name=f"n{i}", groups=groups, capacity=capacity, eligible=eligible,
                      idle=idle)
             for i, (groups, capacity, eligible, idle) in enumerate(node_specs)]
    previous = draw(st.dictionaries(
        st.sampled_from([app.app for app in apps]),
        st.dictionaries(st.sampled_from(NODE_NAMES), st.integers(1, 5), max_size=4),
        max_size=4))
    return apps, nodes, previous


def check_invariants(apps: Sequence[AppScale], nodes: Sequence[NodeInfo],
                     result: Placement) -> None:
    by_name = {n.name: n for n in nodes}
    assert set(result.nodes) == {app.app for app in apps}
    used = dict.fromkeys(by_name, 0)  # the running instances, then the reserve
    reserve = dict.fromkeys(by_name, 0)  # the largest idle app's count
    for app_name, counts in result.nodes.items():
        for name, count in counts.items():
            if app_name in by_name[name].idle:
                reserve[name] = max(reserve[name], count)
            else:
                used[name] += count
    for name in used:
        used[name] += reserve[name]
    for name, total in used.items():
        assert total <= by_name[name].capacity, f"{name} over capacity"
@PROPERTY
@given(clusters())
def test_place_invariants_and_stability(
        cluster: tuple[list[AppScale], list[NodeInfo], dict[str, dict[str, int]]]) -> None:
    """Capacity, eligibility, per_node exactness, even spread and short reasons hold, and
    placing again from its own result changes nothing: place(place(x)) == place(x)."""
    apps, nodes, previous = cluster
    first = place(apps, nodes, previous)
    check_invariants(apps, nodes, first)
    assert place(apps, nodes, first.nodes) == first


@PROPERTY
@given(clusters(), st.data())
def test_an_app_going_idle_where_it_runs_keeps_its_placement(
        cluster: tuple[list[AppScale], list[NodeInfo], dict[str, dict[str, int]]],
        data: st.DataObject) -> None:
    """From a placement, one app going idle on nodes where it is placed (the others' idle
    facts unchanged) keeps exactly its counts: being idle never moves an app itself."""
    apps, nodes, previous = cluster
    first = place(apps, nodes, previous)
    app = data.draw(st.sampled_from([a.app for a in apps]))
    where = data.draw(st.sets(st.sampled_from(sorted(first.nodes[app]) or ["none"])))
    idled = [dataclasses.replace(n, idle=n.idle | {app}) if n.name in where else n
             for n in nodes]
    assert place(apps, idled, first.nodes).nodes[app] == first.nodes[app]


@PROPERTY
@given(clusters(), st.randoms(use_true_random=False))
def test_place_ignores_input_order(
        cluster: tuple[list[AppScale], list[NodeInfo], dict[str, dict[str, int]]],
        rng: random.Random) -> None:
    """The order of apps and nodes in the input does not matter."""
    apps, nodes, previous = cluster
    shuffled_apps, shuffled_nodes = list(apps), list(nodes)
    rng.shuffle(shuffled_apps)
    rng.shuffle(shuffled_nodes)
    assert place(shuffled_apps, shuffled_nodes, previous) == place(apps, nodes, previous)


@PROPERTY
@given(st.integers(1, 20), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**32))
def test_joining_node_moves_the_minimum(instances: int, before: int, joined: int,
                                        seed: int) -> None:
    """With room everywhere, nodes joining move exactly what evening out needs."""
    names = [f"n{i}" for i in range(before + joined)]
    rng = random.Random(seed)
    old = place([spread("api", instances)], nodes_of(*names[:before]), {}).nodes
    rng.shuffle(names)
    new = place([spread("api", instances)], nodes_of(*names), old).nodes["api"]
    # The least any even spread over all nodes can move: every node keeps at most
    # its share (L or L+1), and only `extra` nodes can keep L+1.
    level, extra = divmod(instances, len(names))
    over = sorted((count for count in old["api"].values()), reverse=True)
    kept = sum(min(count, level + 1 if i < extra else level) for i, count in enumerate(over))
    assert moved(old["api"], new) == instances - kept
