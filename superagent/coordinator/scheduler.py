"""Where each app's instances run: a pure function from scales and nodes to a placement.

Theory of operation
-------------------
The leader's reconciler calls ``place(apps, nodes, previous)`` every period with every
app's effective scale, every known node and the placement it committed last time, and
commits the result (``SetPlacement``) where it changed. This module only decides: no
clock, no I/O, and the same input always gives the same output.

Rules:

- A node is **eligible** for an app when ``NodeInfo.eligible`` (up, online, not past a
  drain's wait: the caller decides) and its groups intersect the app's groups.
- ``per_node = k`` (``instances`` is None): k instances on every eligible node.
- ``instances = K``: K instances in total, spread as evenly as possible over the eligible
  nodes: no node holds two more than an eligible node that still has room (max - min <= 1
  among the nodes with room). The spread is computed by water-filling: every eligible
  node gets ``min(room, L)`` for the highest level L that fits, and the R instances left
  over go one each to nodes with room for ``L + 1``.
- **Sticky**: only the choice of those R nodes is free, and it goes first to the nodes
  that held more than L of the app in ``previous``; so a valid previous placement is kept
  as it is, and when a node joins or returns, the fewest instances move that make the
  spread even again (``{a: 2, b: 2}`` with a third node c becomes ``{a: 2, b: 1, c: 1}``:
  one instance moves). Remaining ties go to the node with the fewest instances in total,
  then to the first name.
- **Capacity**: a node's total over all apps (idle ones aside: below) never exceeds its
  ``capacity``. Apps are served one after another in name order, each from the room the
  apps before it left; so when a cluster is full, the app whose name sorts first wins,
  and what does not fit is reported in ``Placement.short`` (``"2 of 3 instances: no room
  on eligible nodes (web1: 100/100)"``), as is an app with no eligible node (``"no
  eligible node in groups ['gpu']"``). An app whose desired count is 0 is never short.
- **Idle apps** (scaled to zero: ``NodeInfo.idle`` names the apps all of whose reported
  instances on that node are idle) take no room on that node, but the node keeps a
  **reserve** as large as the largest of their counts there, so one cold start fits
  without stopping anything: a node's running instances (those of the apps not idle
  there) plus its reserve never exceed its ``capacity`` (in the placement: a short app
  the reconciler leaves running beyond it may still take the reserve, and the
  participant then makes room). In name order, an idle app sees
  on the nodes where it is idle the room left, or, when it had more there, what it had
  up to the room left plus the reserve so far (which it shares with the other idle apps
  there), and raises the reserve to its own count; so being idle never gives an app
  less room than running would, nor more than it had (more would start it there, waking
  it, and move it back once it idled again), and a valid previous placement of an idle
  app is kept (sticky), while the apps after it get the room it frees. Once
  it wakes, the next placement counts it again, and an app after it may get less there
  (moved elsewhere, or short: the reconciler keeps what a short app runs). A second cold
  start on a full node is the participant's to fit (it idles others first).
- **Stable**: ``place(apps, nodes, place(apps, nodes, p).nodes)`` equals
  ``place(apps, nodes, p)``: each app's result depends only on the room (and reserve) the
  apps before it left and on its own previous counts, and its own result is a fixed point
  of both.

Cost: one pass over the apps, each over its eligible nodes (a sort of them for
``instances`` apps): about O(apps x nodes log nodes). ``bench/planner`` times it.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SHORT_NODES_SHOWN = 3  # full nodes named in a short reason; more would drown the message


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeInfo:
    """A participant machine as the scheduler sees it."""

    name: str
    groups: frozenset[str]
    capacity: int  # instances of all apps this node takes
    eligible: bool  # up and online (and not past a drain's wait)
    # apps scaled to zero here (every instance the node reports of them is idle): they
    # take no room, only a share of the node's reserve for one cold start
    idle: frozenset[str] = frozenset()


@dataclass(frozen=True, kw_only=True, slots=True)
class AppScale:
    """An app's effective scale: ``per_node`` on every eligible node, or ``instances`` in
    total."""

    app: str
    groups: tuple[str, ...]
    per_node: int  # used when instances is None
    instances: int | None  # K in total


@dataclass(frozen=True, kw_only=True, slots=True)
class Placement:
    """The scheduler's answer: where every app's instances go, and why some do not."""

    nodes: dict[str, dict[str, int]]  # app -> node -> count (> 0 only); every app present
    short: dict[str, str]  # app -> why its desired count is not met (absent: met)

    def __repr__(self) -> str:
        total = sum(sum(counts.values()) for counts in self.nodes.values())
        return f"<Placement {len(self.nodes)} apps, {total} instances, {len(self.short)} short>"


def place(apps: Sequence[AppScale], nodes: Sequence[NodeInfo],
          previous: Mapping[str, Mapping[str, int]]) -> Placement:
    """Place every app of ``apps`` on ``nodes`` (rules in the module docstring).

    ``previous`` is app -> node -> count from the last placement; entries for unknown
    apps or nodes are ignored. Raises ``ValueError`` for a duplicate app or node name or
    a negative count or capacity: the caller built its input wrongly.
    """
    by_name: dict[str, NodeInfo] = {}
    idle_on: dict[str, list[str]] = {}  # app -> the eligible nodes where it is idle
    for node in nodes:
        if node.name in by_name:
            raise ValueError(f"node {node.name!r} listed twice")
        if node.capacity < 0:
            raise ValueError(f"node {node.name!r}: capacity {node.capacity} is negative")
        by_name[node.name] = node
        if node.eligible:
            for app_name in node.idle:
                idle_on.setdefault(app_name, []).append(node.name)
    used = dict.fromkeys(by_name, 0)  # room taken so far (running + reserve), per node
    free = {node.name: node.capacity for node in nodes}  # room left, per node
    reserve = dict.fromkeys(by_name, 0)  # kept for the largest idle app's cold start
    # group -> eligible node names: many apps share their groups, so index once.
    by_group: dict[str, list[str]] = {}
    for node in nodes:
        if node.eligible:
            for group in node.groups:
                by_group.setdefault(group, []).append(node.name)
    eligible_cache: dict[tuple[str, ...], tuple[list[str], frozenset[str]]] = {}

    result: dict[str, dict[str, int]] = {}
    short: dict[str, str] = {}
    seen: set[str] = set()
    for app in sorted(apps, key=lambda scale: scale.app):
        if app.app in seen:
            raise ValueError(f"app {app.app!r} listed twice")
        seen.add(app.app)
        if app.per_node < 0 or (app.instances is not None and app.instances < 0):
            raise ValueError(f"app {app.app!r}: negative scale")
        cached = eligible_cache.get(app.groups)
        if cached is None:
            names: set[str] = set()
            for group in app.groups:
                names.update(by_group.get(group, ()))
            cached = eligible_cache[app.groups] = (sorted(names), frozenset(names))
        eligible, eligible_set = cached
        idle_here = [name for name in idle_on.get(app.app, ()) if name in eligible_set]
        # where the app is idle, the reserve (which it shares) lets it keep what it had
        # there, but never grow into it: an idle app placed more instances than it had
        # would be started there (woken), and moved back once it idled again
        had = previous.get(app.app, {})
        room = free if not idle_here else {
            **free, **{name: max(free[name], min(free[name] + reserve[name], had.get(name, 0)))
                       for name in idle_here}}
        if app.instances is None:
            counts = _per_node(app.per_node, eligible, room)
            wanted = app.per_node * len(eligible)
        else:
            counts = _spread(app.instances, eligible, eligible_set, room, used, had)
            wanted = app.instances
        idle_set = set(idle_here)
        took: dict[str, int] = {}
        for name, count in counts.items():
            if name in idle_set:  # takes no room: only what it adds to the reserve
                count, reserve[name] = max(0, count - reserve[name]), max(reserve[name], count)
            used[name] += count
            free[name] -= count
            took[name] = count
        result[app.app] = counts
        placed = sum(counts.values())
        if not eligible and (app.per_node if app.instances is None else app.instances) > 0:
            short[app.app] = f"no eligible node in groups {sorted(app.groups)!r}"
        elif placed < wanted:
            short[app.app] = _why_short(placed, wanted, eligible, by_name, used, reserve,
                                        free, took, counts)
    return Placement(nodes=result, short=short)


def _per_node(per_node: int, eligible: list[str], free: Mapping[str, int]) -> dict[str, int]:
    """k on every eligible node, as far as its room goes."""
    counts: dict[str, int] = {}
    if per_node == 0:
        return counts
    for name in eligible:
        room = free[name]
        if room >= per_node:
            counts[name] = per_node
        elif room > 0:
            counts[name] = room
    return counts


def _spread(instances: int, eligible: list[str], eligible_set: frozenset[str],
            free: Mapping[str, int], used: Mapping[str, int],
            previous: Mapping[str, int]) -> dict[str, int]:
    """K over the eligible nodes by water-filling, sticky to ``previous``."""
    if instances == 0 or not eligible:
        return {}
    rooms = list(map(free.__getitem__, eligible))
    total = min(instances, sum(rooms))
    sharing = len(eligible)
    level, left = divmod(total, sharing)
    if min(rooms) < level + (left > 0):
        # Some node has less room than the even share: fill the smallest first, and the
        # rest share what is left (the common case, room everywhere, skips the sort).
        remaining = total
        for name in sorted(eligible, key=free.__getitem__):
            if free[name] * sharing > remaining:
                break
            remaining -= free[name]
            sharing -= 1
        if sharing:
            level, left = divmod(remaining, sharing)
        else:  # every node filled to its room
            level, left = total, 0
    extra: list[str] = []
    if left:
        # Who gets one more than L: nodes that had more than L (sticky), then the least
        # loaded, then the first name (`eligible` is sorted by name and sorts are stable).
        sticky = sorted((name for name, count in previous.items()
                         if count > level and name in eligible_set and free[name] > level),
                        key=lambda name: (used[name], name))
        extra = sticky[:left]
        if len(extra) < left:
            taken = set(extra)
            extra += heapq.nsmallest(
                left - len(extra),
                (name for name in eligible if free[name] > level and name not in taken),
                key=used.__getitem__)
    counts: dict[str, int] = {}
    if level:
        for name in eligible:
            room = free[name]
            counts[name] = level if room >= level else room
    for name in extra:
        counts[name] = level + 1
    return {name: count for name, count in counts.items() if count > 0}


def _why_short(placed: int, wanted: int, eligible: list[str],
               by_name: Mapping[str, NodeInfo], used: Mapping[str, int],
               reserve: Mapping[str, int], free: Mapping[str, int],
               took: Mapping[str, int], counts: Mapping[str, int]) -> str:
    """The short reason of an app with eligible nodes: which of them are full for it (it
    got at least the room the apps before it left there; how much is kept for an idle
    app's cold start is said: an app idle there may use that to keep what it had, not
    to grow). Its own previous counts play no part, so the reason is stable too."""
    full = [name for name in eligible
            if counts.get(name, 0) >= free[name] + took.get(name, 0)]
    shown = ", ".join(f"{name}: {used[name]}/{by_name[name].capacity}"
                      + (f" with {reserve[name]} kept for a cold start" if reserve[name] else "")
                      for name in full[:SHORT_NODES_SHOWN])
    if len(full) > SHORT_NODES_SHOWN:
        shown += f", +{len(full) - SHORT_NODES_SHOWN} more"
    return f"{placed} of {wanted} instances: no room on eligible nodes ({shown})"
