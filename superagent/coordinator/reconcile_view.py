"""What the reconciler reads, pure: the state's view, the heartbeats' reports, convergence.

The reconciler (``reconciler.py``) reads the replicated state once per round into a
``ClusterView`` (``view_of``, under the state's read lock, so it copies only plain data),
turns the participants' last heartbeats into the planner's ``NodeReport``s
(``reports_from``; a heartbeat is a participant's word, so anything malformed in it is
skipped rather than trusted), tells the scheduler which apps each node runs scaled to zero
(``with_idle``: they take no room there), finds ready instances no route reaches (``unrouted``), and
tells when an app runs as placed (``converged``). No clock (the caller passes the wall
time), no I/O.

A node is eligible for placement when it is up and online, or draining for less than
``drain_wait`` seconds since its lifecycle changed (``changed_at``, a committed time): a
node being drained keeps its work until the front load balancer, which sees its
``/-/healthz`` answer 503 at once, has stopped sending to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from superagent.coordinator import reconcile as rc
from superagent.coordinator import scheduler as sch
from superagent.coordinator.membership import Liveness
from superagent.coordinator.state import ClusterState, Node

READY = "ready"


@dataclass(frozen=True, kw_only=True)
class ClusterView:
    """The part of the state one reconcile round uses."""

    apps: tuple[str, ...]
    scales: tuple[sch.AppScale, ...]  # of the apps that have a serving release
    nodes: tuple[sch.NodeInfo, ...]
    addresses: dict[str, str]  # node -> RPC address
    placement: dict[str, dict[str, int]]  # the committed placement
    reasons: dict[str, str]  # the committed placement reasons
    releases: dict[str, str | None]  # app -> serving release
    busy: frozenset[str]  # apps a deploy runs for
    scaling: dict[str, str]  # app -> the id of its scaling in progress
    deploys: frozenset[tuple[str, str]] = frozenset()  # (id, app) of every deploy on record


def eligible(node: Node, *, wall: float, drain_wait: float) -> bool:
    """Whether ``node`` may hold instances now (see the module docstring)."""
    if not node.up:
        return False
    if node.lifecycle == "online":
        return True
    return node.lifecycle == "draining" and wall - node.changed_at < drain_wait


def view_of(state: ClusterState, *, wall: float, drain_wait: float) -> ClusterView:
    """The view of ``state`` at wall-clock time ``wall``."""
    apps = tuple(sorted(state.apps))
    scales = []
    for app in apps:
        if state.apps[app].current_release is None:
            continue  # never deployed: it runs nothing, so it takes no room anywhere
        scale = state.effective_scale(app)
        instances = scale.get("instances")
        scales.append(sch.AppScale(app=app, groups=tuple(scale.get("groups", ("default",))),
                                   per_node=int(scale.get("per_node", 1)),
                                   instances=None if instances is None else int(instances)))
    # a draining node only keeps what it holds: one that holds nothing (its work already
    # moved, and its drain wait begun again by a re-registration) gets nothing back
    holding = {node for nodes in state.placement.values() for node in nodes}
    nodes = tuple(sch.NodeInfo(name=n.name, groups=frozenset(n.groups), capacity=n.capacity,
                               eligible=eligible(n, wall=wall, drain_wait=drain_wait)
                               and (n.lifecycle == "online" or n.name in holding))
                  for _, n in sorted(state.nodes.items()))
    return ClusterView(
        apps=apps, scales=tuple(scales), nodes=nodes,
        addresses={n.name: n.address for n in state.nodes.values()},
        placement={app: dict(p) for app, p in state.placement.items()},
        reasons=dict(state.placement_reason),
        releases={app: state.apps[app].current_release for app in apps},
        busy=frozenset(d.app for d in state.deploys.values() if d.running),
        deploys=frozenset((deploy_id, d.app) for deploy_id, d in state.deploys.items()),
        scaling={app: str(a.scaling["id"]) for app, a in state.apps.items()
                 if a.scaling is not None})


def reports_from(statuses: Mapping[str, Mapping[str, Any]]) -> dict[str, rc.NodeReport]:
    """Node -> its report, from each node's last heartbeat status (``instances``: [{id,
    app, release, state}], ``routes``: {app: [ids]}); malformed entries are skipped."""
    reports = {}
    for node, status in sorted(statuses.items()):
        instances = []
        for item in status.get("instances") or ():
            if not isinstance(item, Mapping):
                continue
            fields = [item.get(k) for k in ("id", "app", "release", "state")]
            texts = [f for f in fields if isinstance(f, str) and f]
            if len(texts) == len(fields):
                instances.append(rc.Reported(id=texts[0], app=texts[1], release=texts[2],
                                             state=texts[3]))
        routes: dict[str, tuple[str, ...]] = {}
        raw_routes = status.get("routes")
        if isinstance(raw_routes, Mapping):
            for app, ids in raw_routes.items():
                if isinstance(app, str) and isinstance(ids, list | tuple):
                    routes[app] = tuple(i for i in ids if isinstance(i, str))
        reports[node] = rc.NodeReport(node=node, instances=tuple(instances), routes=routes)
    return reports


def idle_apps(report: rc.NodeReport) -> frozenset[str]:
    """The apps scaled to zero on the reporting node: it reports instances of them, and
    every one not being stopped is ``idle``."""
    states: dict[str, set[str]] = {}
    for instance in report.instances:
        if instance.state not in rc.IGNORED:
            states.setdefault(instance.app, set()).add(instance.state)
    return frozenset(app for app, seen in states.items() if seen == {rc.IDLE})


def with_idle(nodes: Sequence[sch.NodeInfo], reports: Mapping[str, rc.NodeReport]
              ) -> tuple[sch.NodeInfo, ...]:
    """``nodes`` with each one's idle apps from its report (the scheduler keeps no room
    for them, only a reserve for one cold start); a node not heard from has none."""
    return tuple(dataclasses.replace(node, idle=idle_apps(reports[node.name]))
                 if node.name in reports else node for node in nodes)


def _ready(report: rc.NodeReport, app: str, release: str) -> list[str]:
    return [i.id for i in report.instances
            if i.app == app and i.release == release and i.state in rc.AS_READY]


def unrouted(targets: Mapping[str, rc.AppTarget], reports: Mapping[str, rc.NodeReport]
             ) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """(node, app, the ready instances to route) where a node runs ready instances of the
    app's serving release that its routes do not reach (a grow whose switch failed after
    its start), for apps the node should serve and no deploy holds."""
    for node, report in sorted(reports.items()):
        ready: dict[str, list[str]] = {}  # app -> its ready serving instances here
        for i in report.instances:
            target = targets.get(i.app)
            if target is not None and i.release == target.release and i.state == READY:
                ready.setdefault(i.app, []).append(i.id)
        for app, ids in sorted(ready.items()):
            target = targets[app]
            if (not target.busy and target.placement.get(node)
                    and set(ids) - set(report.routes.get(app, ()))):
                yield node, app, tuple(sorted(ids))


def converged(target: rc.AppTarget, reports: Mapping[str, rc.NodeReport]) -> bool:
    """Every node of the app's placement reports at least its count of ready instances of
    the serving release (an app never deployed runs nothing: converged). The caller also
    checks that nothing is left to do (no surplus to stop)."""
    if target.release is None:
        return True
    for node, count in target.placement.items():
        report = reports.get(node)
        if count > 0 and (report is None or len(_ready(report, target.app,
                                                       target.release)) < count):
            return False
    return True


def still_on(state: ClusterState, node: str, liveness: Liveness, now: float
             ) -> dict[str, Any] | None:
    """What keeps ``node`` from going offline: the instances its last heartbeat reports
    (if heard within the liveness timeout) that have not stopped, and the apps the
    placement still puts there. ``{"node", "lifecycle", "instances": [...], "placed":
    {app: count}}``; None for an unknown node."""
    found = state.nodes.get(node)
    if found is None:
        return None
    liveness.observe(now)  # a stall of the leader is not the node's silence
    status = liveness.status.get(node) if liveness.fresh(node, now) else None
    report = reports_from({node: status})[node] if status is not None else None
    instances = [f"{i.id} ({i.state})" for i in (report.instances if report else ())
                 if i.state != "stopped"]
    placed = {app: nodes[node] for app, nodes in sorted(state.placement.items())
              if nodes.get(node)}
    return {"node": node, "lifecycle": found.lifecycle, "instances": sorted(instances),
            "placed": placed}
