"""What to start and stop so every node runs what the placement says: a pure planner.

Theory of operation
-------------------
The leader's reconciler reads, every period, each app's target (its serving release, the
scheduler's placement, whether a deploy of it runs) and the last heartbeat of every node
it heard from recently (the instances it runs and the instances its proxy routes to), and
calls ``plan(targets, reports)``. The answer is a list of actions, at most one per (node,
app), in (node, app) order; the reconciler carries them out and calls ``plan`` again next
period with fresh reports. This module only decides: no clock, no I/O, deterministic.

Per node and app:

- **live** instances are those of the serving release in state ``starting``, ``ready`` or
  ``unhealthy``; **deficit** = desired - live, and a deficit becomes a ``Grow`` (prepare
  the release, start that many, wait until ready, route to them too).
- To stop: live instances beyond the desired count, the serving release's instances that
  are not live (``backoff``, ``crash_loop``: the node gets a ``Grow`` for them first),
  instances of any other release, and every instance of an app that is not in ``targets``
  (deleted) or has no release (never deployed: run nothing). They are stopped by one
  ``Shrink`` per node, which also sets the app's routes there to the instances it keeps.
- Instances in ``stopping`` or ``stopped`` are ignored: a stop is under way or done.
- An ``idle`` instance (its node stopped it for idleness: scale to zero) counts as live
  and ready: the app is where its placement wants it, and its node starts it again on the
  next request. So neither the reconciler nor a node's drain wakes an idle app; scaling an
  app out (a Grow on a node where it is idle) starts instances there, which wakes it.
- An app whose deploy runs (``busy``) gets no action at all: the deploy owns it.

**Safety.** Stopping waits for replacements: an app's ``Shrink`` actions are planned only
when no node of its placement is **pending**, i.e. every desired node reports at least its
desired count of *ready* serving-release instances (a desired node missing from
``reports`` is pending: nothing is known of it). A deleted app, an app with no release and
an app whose placement is empty are never pending. So while an app has a desired count
> 0, every Shrink leaves each desired node with that many ready instances: the app's last
ready instance is never stopped before a ready replacement exists, and a release that
never gets ready leaves the old instances running. Among the live instances of one node,
the ones kept are ready before not ready, routed before unrouted, then the oldest (the
smallest sequence number at the end of the id, as participants number them); so the
extra instances that are not ready go first, then the newest.

Convergence: from any reports, with Grows that get ready, the plan is empty after at most
three rounds (Grow; Shrink once ready; nothing) plus the rounds instances already
``starting`` need to settle. ``tests/coordinator/test_reconcile.py`` checks this on a
simulated cluster.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# "idle": stopped by its node for idleness (scale to zero); a request starts it there
LIVE = frozenset({"starting", "ready", "unhealthy", "idle"})  # serving or about to
IGNORED = frozenset({"stopping", "stopped"})  # a stop is under way or done
READY = "ready"
IDLE = "idle"
AS_READY = frozenset({READY, IDLE})  # what counts as a ready instance
_SEQUENCE = re.compile(r"(\d+)$")  # "web@r3.12" -> 12: participants number instances


@dataclass(frozen=True, kw_only=True, slots=True)
class Reported:
    """One instance as its node's heartbeat reports it."""

    id: str
    app: str
    release: str
    state: str  # participant supervisor State value: starting, ready, unhealthy,
    # backoff, crash_loop, stopping, stopped


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeReport:
    """A node's last heartbeat: what it runs and what its proxy routes to."""

    node: str
    instances: tuple[Reported, ...]
    routes: Mapping[str, tuple[str, ...]]  # app -> instance ids the node's proxy routes to


@dataclass(frozen=True, kw_only=True, slots=True)
class AppTarget:
    """What an app should run: its serving release on its placement."""

    app: str
    release: str | None  # the serving release ("r3"); None: never deployed, run nothing
    placement: Mapping[str, int]  # node -> desired count
    busy: bool  # a deploy of it runs: the reconciler keeps its hands off


@dataclass(frozen=True, kw_only=True, slots=True)
class Grow:
    """On node: prepare release, start count instances, wait ready, then route to (routed
    ready instances of release + the new ones)."""

    node: str
    app: str
    release: str
    count: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Shrink:
    """On node: route app to ``keep``, drain ``stop``, stop them."""

    node: str
    app: str
    stop: tuple[str, ...]
    keep: tuple[str, ...]  # the instances the node's routes keep for the app (may be empty)


Action = Grow | Shrink


def plan(targets: Mapping[str, AppTarget], reports: Mapping[str, NodeReport]) -> list[Action]:
    """The actions that bring the reported nodes towards ``targets`` (rules above).

    ``reports`` maps node name -> its last report and holds only nodes heard from
    recently. Returns actions sorted by (node, app), at most one per pair.
    """
    # app -> node -> its instances there that still count (not stopping or stopped)
    by_app: dict[str, dict[str, list[Reported]]] = {}
    for name, report in reports.items():
        for instance in report.instances:
            if instance.state not in IGNORED:
                by_app.setdefault(instance.app, {}).setdefault(name, []).append(instance)

    actions: list[Action] = []
    for app in set(targets) | set(by_app):
        target = targets.get(app)
        if target is not None and target.busy:
            continue
        actions.extend(_plan_app(app, target, by_app.get(app, {}), reports))
    actions.sort(key=lambda action: (action.node, action.app))
    return actions


def _plan_app(app: str, target: AppTarget | None, on_nodes: Mapping[str, list[Reported]],
              reports: Mapping[str, NodeReport]) -> list[Action]:
    """One app's Grows, and its Shrinks when nothing of it is pending."""
    release = target.release if target is not None else None
    placement = target.placement if target is not None and release is not None else {}
    grows: list[Action] = []
    shrinks: list[Action] = []
    pending = False
    for node in set(placement) | set(on_nodes):
        desired = max(0, placement.get(node, 0))
        report = reports.get(node)
        if report is None:  # unreachable: nothing to do there, and nothing known
            pending = pending or desired > 0
            continue
        instances = on_nodes.get(node, [])
        live: list[Reported] = []
        ready = 0
        for instance in instances:
            if instance.release == release and instance.state in LIVE:
                live.append(instance)
                ready += instance.state in AS_READY
        if desired > len(live) and release is not None:  # desired > 0 implies a release
            grows.append(Grow(node=node, app=app, release=release,
                              count=desired - len(live)))
        if ready < desired:
            pending = True
        if len(instances) == len(live) <= desired:
            continue  # nothing to stop here (the common case: skip the sort)
        routed = frozenset(report.routes.get(app, ()))
        live.sort(key=lambda i: (i.state not in AS_READY, i.id not in routed, _age(i.id)))
        kept = live[:desired]
        kept_ids = {i.id for i in kept}
        stop = sorted(i.id for i in instances if i.id not in kept_ids)
        # an idle instance is kept as the node's record of the idle app (routed, empty)
        keep = sorted(i.id for i in kept if i.state in AS_READY or i.id in routed)
        shrinks.append(Shrink(node=node, app=app, stop=tuple(stop), keep=tuple(keep)))
    return grows if pending else grows + shrinks


def _age(instance_id: str) -> tuple[int, str]:
    """Sort key, oldest first: the participant's sequence number ending the id, then the
    id (an id without one sorts first)."""
    match = _SEQUENCE.search(instance_id)
    return (int(match.group(1)) if match else -1, instance_id)
