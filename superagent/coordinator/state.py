"""ClusterState: the coordinator's replicated state machine.

Every coordinator holds one ``ClusterState`` and feeds it the same committed Raft
entries in the same order; ``apply`` is pure and deterministic (no clock, no
randomness, no I/O: a command's time is its ``at``), so every node reaches the
same state and ``digest()`` proves it.

``apply(command_json)`` never raises for a bad command (a log entry must always
apply): it decodes, answers a repeated idempotency key with the first result,
validates against the current state, and only then mutates. A rejected command
changes nothing at all (no audit entry, no idempotency record): it is answered
with an error result and the API layer logs it, so retrying it after fixing the
cause works, and a digest taken before and after is equal. An exception out of
``apply`` is a bug.

Bounded history: the audit log keeps the last ``AUDIT_LIMIT`` entries and the
idempotency table the last ``IDEMPOTENCY_LIMIT`` keys, both evicted oldest
first by insertion order, which is the same on every node.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from superagent.codec import canonical_json
from superagent.coordinator import commands as cmd
from superagent.coordinator import state_admin, tenancy
from superagent.coordinator.deploy.model import DeployRecord, Stage, Status, event_from_doc
from superagent.coordinator.deploy.planner import advance
from superagent.coordinator.errors import (
    CommandError,
    Conflict,
    CoordinatorError,
    SnapshotError,
    UnknownApp,
    UnknownDeploy,
    UnknownNode,
    UnknownRelease,
)
from superagent.coordinator.lifecycle import Lifecycle, next_lifecycle
from superagent.coordinator.policy import DEFAULT_TEAM
from superagent.coordinator.trust import Trust
from superagent.errors import ConfigError
from superagent.manifest import describe_scale, spec_from_json, spec_to_json

FORMAT_VERSION = 1  # of the to_json document; from_json refuses others
AUDIT_LIMIT = 1000  # entries kept: enough for "what happened today" without growing the snapshot
IDEMPOTENCY_LIMIT = 10_000  # keys kept: client retries come within minutes, not 10k commands
DEPLOY_LIMIT = 200  # deploy records kept; the oldest finished ones go first
RETAIN_SUCCEEDED = 5  # releases that served kept prepared on each participant for rollbacks
HISTORY_LIMIT = 500  # timeline entries kept per deploy

Result = dict[str, Any]
# Commands the leader derives every round (where instances go): the app views show them,
# and in the bounded audit log they would push out what people and decisions did.
UNAUDITED = (cmd.SetPlacement,)


@dataclass(slots=True)
class App:
    name: str
    spec: dict[str, Any]  # canonical manifest JSON (spec_to_json of the parsed spec)
    created_at: float
    updated_at: float
    current_release: str | None = None  # set by a deploy that succeeded ("r3")
    # the run-time scale (SetScale): {"groups": [...], "per_node": k, "instances": K | None,
    # "auto": {"min", "max", "target", "metric"} (autoscaled; optional)};
    # None: the spec's [scale] applies (see ClusterState.effective_scale)
    scale: dict[str, Any] | None = None
    # the scaling in progress: {"id", "at", "actor", "scale"}; ended by FinishScale
    scaling: dict[str, Any] | None = None
    # the last ended scaling: the one above plus {"outcome", "reason", "finished_at"}
    last_scaling: dict[str, Any] | None = None
    # an autoscaled app's instances as the autoscaler last decided (Autoscale); None: min
    auto_instances: int | None = None
    team: str = DEFAULT_TEAM  # who owns it (policy.py); apps made before teams: the default


@dataclass(slots=True)
class Release:
    number: int
    sha256: str
    size: int
    spec: dict[str, Any]
    env: dict[str, str]
    created_at: float
    actor: str
    served: bool = False  # a deploy of it succeeded: a rollback target that is known good


@dataclass(slots=True)
class Node:
    name: str
    address: str
    groups: list[str]
    capacity: int
    lifecycle: str  # a Lifecycle value
    up: bool
    registered_at: float
    changed_at: float
    labeled: bool = False  # groups set by LabelNode: a re-registration keeps them


@dataclass(slots=True)
class Deploy:
    deploy_id: str
    app: str
    record: dict[str, Any]  # the saga's DeployRecord document
    actor: str
    created_at: float
    updated_at: float
    history: list[list[Any]]  # [at, event type, node]: the deploy's timeline
    finished: bool = False  # the runner has executed its last round (FinishDeploy)

    @property
    def running(self) -> bool:
        return not self.finished


class ClusterState:
    """Apps, releases, nodes, placement, deploys, audit log and idempotency table."""

    def __init__(self) -> None:
        self.apps: dict[str, App] = {}
        self.releases: dict[str, list[Release]] = {}  # app -> releases, ascending numbers
        # survives DeleteApp, so hello@r1 never names two different releases
        self.last_release: dict[str, int] = {}
        self.nodes: dict[str, Node] = {}
        self.placement: dict[str, dict[str, int]] = {}  # app -> node -> instances
        self.placement_reason: dict[str, str] = {}  # app -> why its placement falls short
        self.deploys: dict[str, Deploy] = {}
        self.audit: list[dict[str, Any]] = []
        self.audit_seq = 0
        self.idempotency: dict[str, dict[str, Any]] = {}  # key -> {fingerprint, result}
        self.tokens: dict[str, dict[str, Any]] = {}  # name -> record (see tenancy.py)
        self.quotas: dict[str, dict[str, int | None]] = {}  # team -> {apps, instances, memory}
        self.coordinators: dict[str, str] = {}  # coordinator id -> API base URL
        self.members: dict[str, str] = {}  # coordinator id -> Raft address (added at run time)
        self.trust = Trust()  # join tokens and node credentials (see coordinator.trust)
        self._handlers: dict[type[cmd.Command], Callable[[Any], tuple[Result, str]]] = {
            cmd.CreateApp: self._create_app,
            cmd.UpdateAppSpec: self._update_app_spec,
            cmd.DeleteApp: self._delete_app,
            cmd.AddRelease: self._add_release,
            cmd.RegisterNode: self._register_node,
            cmd.LabelNode: self._label_node,
            cmd.NodeUp: self._node_up,
            cmd.NodeDown: self._node_down,
            cmd.SetNodeLifecycle: self._set_node_lifecycle,
            cmd.SetPlacement: self._set_placement,
            cmd.SetScale: self._set_scale,
            cmd.FinishScale: self._finish_scale,
            cmd.Autoscale: self._autoscale,
            cmd.StartDeploy: self._start_deploy,
            cmd.DeployEvent: self._deploy_event,
            cmd.FinishDeploy: self._finish_deploy,
            cmd.AddToken: lambda c: tenancy.add_token(self.tokens, c),
            cmd.RevokeToken: lambda c: tenancy.revoke_token(self.tokens, c),
            cmd.SetQuota: lambda c: tenancy.set_quota(self.quotas, c),
            cmd.RegisterCoordinator: self._register_coordinator,
            # late-bound: from_json replaces ``trust``
            cmd.AddJoinToken: lambda c: self.trust.add_join_token(c),
            cmd.EnrolNode: lambda c: self.trust.enrol(c),
            cmd.RevokeNode: lambda c: self.trust.revoke(c, self.nodes),
            cmd.AddCoordinator: lambda c: state_admin.add_coordinator(self, c),
            cmd.RemoveCoordinator: lambda c: state_admin.remove_coordinator(self, c),
            cmd.RestoreState: lambda c: state_admin.restore(
                self, c, ClusterState.from_json(c.state)),
        }

    def __repr__(self) -> str:
        up = sum(1 for n in self.nodes.values() if n.up)
        releases = sum(len(r) for r in self.releases.values())
        return (f"<ClusterState apps={len(self.apps)} releases={releases} "
                f"nodes={len(self.nodes)} up={up} deploys={len(self.deploys)} "
                f"audit_seq={self.audit_seq} digest={self.digest()[:12]}>")

    # -- applying -----------------------------------------------------------------

    def apply(self, command_json: str) -> Result:
        """Apply one committed command; returns {"ok": true, ...} or an error result."""
        try:
            command = cmd.decode(command_json)
        except CommandError as exc:
            return error_result(exc)
        fingerprint = _fingerprint(command)
        seen = self.idempotency.get(command.key)
        if seen is not None:
            if seen["fingerprint"] != fingerprint:
                return error_result(Conflict(
                    f"idempotency key {command.key!r} was used for a different command"))
            return {**copy.deepcopy(seen["result"]), "repeated": True}
        team = tenancy.audit_team(self, command)  # before the handler: DeleteApp forgets it
        try:
            tenancy.check_scope(self, command)
            result, outcome = self._handlers[type(command)](command)
        except CoordinatorError as exc:
            return error_result(exc)
        self._remember(command.key, fingerprint, result)
        if not isinstance(command, UNAUDITED):
            self._record_audit(command, outcome, team)
        return copy.deepcopy(result)

    def _remember(self, key: str, fingerprint: str, result: Result) -> None:
        self.idempotency[key] = {"fingerprint": fingerprint, "result": copy.deepcopy(result)}
        while len(self.idempotency) > IDEMPOTENCY_LIMIT:
            del self.idempotency[next(iter(self.idempotency))]

    def _record_audit(self, command: cmd.Command, outcome: str, team: str | None) -> None:
        self.audit_seq += 1
        self.audit.append({"seq": self.audit_seq, "at": command.at, "actor": command.actor,
                           "type": command.type, "target": command.target,
                           "key": command.key, "outcome": outcome, "team": team})
        del self.audit[:-AUDIT_LIMIT]

    # -- handlers: validate everything first, then mutate; return (result, outcome) --

    def _app(self, name: str) -> App:
        app = self.apps.get(name)
        if app is None:
            raise UnknownApp(name)
        return app

    def _node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise UnknownNode(name)
        return node

    def _create_app(self, c: cmd.CreateApp) -> tuple[Result, str]:
        if c.name in self.apps:
            raise Conflict(f"app {c.name!r} already exists", app=c.name)
        spec = _checked_spec(c.spec, c.name, c.type)
        tenancy.check_quota(self, c.team, new_app=True)
        self.apps[c.name] = App(name=c.name, spec=spec, created_at=c.at, updated_at=c.at,
                                team=c.team)
        self.releases[c.name] = []
        return {"ok": True, "app": c.name}, "created"

    def _update_app_spec(self, c: cmd.UpdateAppSpec) -> tuple[Result, str]:
        app = self._app(c.app)
        spec = _checked_spec(c.spec, c.app, c.type)
        changed = spec != app.spec
        app.spec, app.updated_at = spec, c.at
        return {"ok": True, "app": c.app, "changed": changed}, (
            "updated" if changed else "unchanged")

    def _delete_app(self, c: cmd.DeleteApp) -> tuple[Result, str]:
        self._app(c.app)
        running = self._running_deploys(c.app)
        if running:
            raise Conflict(f"deploy {running[0]} of {c.app} is running: cancel it and wait"
                           " for it to finish first", app=c.app)
        del self.apps[c.app]
        self.releases.pop(c.app, None)
        self.placement.pop(c.app, None)
        self.placement_reason.pop(c.app, None)
        for deploy_id in [d.deploy_id for d in self.deploys.values() if d.app == c.app]:
            del self.deploys[deploy_id]
        return {"ok": True, "app": c.app}, "deleted"

    def _add_release(self, c: cmd.AddRelease) -> tuple[Result, str]:
        app = self._app(c.app)
        spec = _checked_spec(c.spec, c.app, c.type)
        tenancy.check_quota(self, app.team, app=c.app, spec=spec)
        number = self.last_release.get(c.app, 0) + 1
        self.releases[c.app].append(Release(
            number=number, sha256=c.sha256, size=c.size, spec=spec,
            env=dict(sorted(c.env.items())), created_at=c.at, actor=c.actor))
        self.last_release[c.app] = number
        return {"ok": True, "app": c.app, "release": number}, f"created r{number}"

    def _register_node(self, c: cmd.RegisterNode) -> tuple[Result, str]:
        self.trust.check_not_revoked(c.node)
        node = self.nodes.get(c.node)
        if node is None:
            self.nodes[c.node] = Node(
                name=c.node, address=c.address, groups=list(c.groups), capacity=c.capacity,
                lifecycle=Lifecycle.ONLINE.value, up=True, registered_at=c.at, changed_at=c.at)
            return {"ok": True, "node": c.node, "created": True}, "registered"
        node.address, node.capacity = c.address, c.capacity
        if not node.labeled:  # the operator's label wins over the node's own --group
            node.groups = list(c.groups)
        node.up, node.changed_at = True, c.at
        return {"ok": True, "node": c.node, "created": False}, "re-registered"

    def _label_node(self, c: cmd.LabelNode) -> tuple[Result, str]:
        node = self._node(c.node)
        groups = list(c.groups)
        changed = groups != node.groups or not node.labeled
        node.groups, node.labeled = groups, True
        if changed:
            node.changed_at = c.at
        return ({"ok": True, "node": c.node, "groups": groups, "changed": changed},
                "groups " + ",".join(groups))

    def _set_up(self, c: cmd.NodeUp | cmd.NodeDown, up: bool) -> tuple[Result, str]:
        node = self._node(c.node)
        if up:
            self.trust.check_not_revoked(c.node)
        changed = node.up != up
        node.up = up
        if changed:
            node.changed_at = c.at
        word = "up" if up else "down"
        return {"ok": True, "node": c.node, "up": up, "changed": changed}, (
            word if changed else f"already {word}")

    def _node_up(self, c: cmd.NodeUp) -> tuple[Result, str]:
        return self._set_up(c, True)

    def _node_down(self, c: cmd.NodeDown) -> tuple[Result, str]:
        return self._set_up(c, False)

    def _set_node_lifecycle(self, c: cmd.SetNodeLifecycle) -> tuple[Result, str]:
        node = self._node(c.node)
        before = node.lifecycle
        after = next_lifecycle(Lifecycle(before), Lifecycle(c.lifecycle), node=c.node)
        node.lifecycle, node.changed_at = after.value, c.at
        return {"ok": True, "node": c.node, "lifecycle": after.value}, f"{before} -> {after.value}"

    def _set_placement(self, c: cmd.SetPlacement) -> tuple[Result, str]:
        self._app(c.app)
        for node in sorted(c.placement):
            self._node(node)
        placement = {node: n for node, n in sorted(c.placement.items()) if n > 0}
        if placement:
            self.placement[c.app] = placement
        else:
            self.placement.pop(c.app, None)
        if c.reason:
            self.placement_reason[c.app] = c.reason
        else:
            self.placement_reason.pop(c.app, None)
        total = sum(placement.values())
        outcome = f"{total} instances on {len(placement)} nodes"
        return ({"ok": True, "app": c.app, "instances": total},
                f"{outcome}: {c.reason}" if c.reason else outcome)

    def _set_scale(self, c: cmd.SetScale) -> tuple[Result, str]:
        app = self._app(c.app)
        running = self._running_deploys(c.app)
        if running:
            raise Conflict(f"deploy {running[0]} of {c.app} is running: scale it once the"
                           " deploy is over (or cancel the deploy)", app=c.app)
        scale_id = c.scale_id or f"s{self.audit_seq + 1}"  # this command's audit seq: unique
        tenancy.check_quota(self, app.team, app=c.app, scale=c.scale())
        if (app.scaling or {}).get("id") == scale_id or (
                (app.last_scaling or {}).get("id") == scale_id):
            raise Conflict(f"scaling {scale_id} of {c.app} already exists", app=c.app)
        replaced = app.scaling
        if replaced is not None:  # the newer scale takes over; the old one ends here
            app.last_scaling = {**replaced, "outcome": "replaced", "finished_at": c.at,
                                "reason": f"replaced by scaling {scale_id}"}
        scale = c.scale()
        app.scale, app.updated_at = scale, c.at
        app.scaling = {"id": scale_id, "at": c.at, "actor": c.actor, "scale": scale}
        return ({"ok": True, "app": c.app, "scale_id": scale_id, "scale": copy.deepcopy(scale)},
                f"scaling {scale_id}: {describe_scale(scale)}")

    def _finish_scale(self, c: cmd.FinishScale) -> tuple[Result, str]:
        app = self._app(c.app)
        scaling = app.scaling
        if scaling is None or scaling["id"] != c.scale_id:
            current = f" (scaling {scaling['id']} is)" if scaling else ""
            raise Conflict(f"scaling {c.scale_id} of {c.app} is not in progress{current}",
                           app=c.app)
        app.last_scaling = {**scaling, "outcome": c.outcome, "reason": c.reason,
                            "finished_at": c.at}
        app.scaling = None
        outcome = c.outcome + (f": {c.reason}" if c.reason else "")
        return ({"ok": True, "app": c.app, "scale_id": c.scale_id, "outcome": c.outcome},
                outcome)

    def _autoscale(self, c: cmd.Autoscale) -> tuple[Result, str]:
        app = self._app(c.app)
        auto = self.effective_scale(c.app).get("auto")
        if auto is None:
            raise Conflict(f"{c.app} is not autoscaled: its scale has no min/max", app=c.app)
        if not auto["min"] <= c.instances <= auto["max"]:
            raise CommandError(f"must be within min {auto['min']} and max {auto['max']}",
                               field="instances", command_type=c.type)
        running = self._running_deploys(c.app)
        if running:
            raise Conflict(f"deploy {running[0]} of {c.app} is running: the autoscaler"
                           " waits for it", app=c.app)
        before = self.effective_scale(c.app)["instances"]
        app.auto_instances = c.instances
        outcome = f"{before} -> {c.instances} instances"
        if c.reason:
            outcome += f": {c.reason}"
        if c.inputs:
            outcome += f" (inputs {canonical_json(c.inputs)})"
        return {"ok": True, "app": c.app, "instances": c.instances}, outcome

    def _running_deploys(self, app: str) -> list[str]:
        return [d.deploy_id for d in self.deploys.values() if d.app == app and d.running]

    def _start_deploy(self, c: cmd.StartDeploy) -> tuple[Result, str]:
        self._app(c.app)
        try:
            record = DeployRecord.from_doc(c.record)
        except ValueError as exc:
            raise CommandError(str(exc), field="record", command_type=c.type) from None
        if (record.deploy_id, record.app) != (c.deploy_id, c.app) or record.stage != Stage.BUILD:
            raise CommandError("must be a fresh record of this deploy and app", field="record",
                               command_type=c.type)
        if record.release not in {f"r{r.number}" for r in self.releases[c.app]}:
            raise UnknownRelease(c.app, int(record.release.lstrip("r") or 0))
        if c.deploy_id in self.deploys:
            raise Conflict(f"deploy {c.deploy_id!r} already exists", app=c.app)
        running = self._running_deploys(c.app)
        if running:
            raise Conflict(f"deploy {running[0]} of {c.app} is still running: wait for it to"
                           " finish or cancel it", app=c.app)
        scaling = self.apps[c.app].scaling
        if scaling is not None:
            raise Conflict(f"scaling {scaling['id']} of {c.app} is in progress: deploy once"
                           " it is over (or scale again to change it)", app=c.app)
        release = next(r for r in self.releases[c.app] if f"r{r.number}" == record.release)
        tenancy.check_quota(self, self.apps[c.app].team, app=c.app, spec=release.spec)
        self.deploys[c.deploy_id] = Deploy(
            deploy_id=c.deploy_id, app=c.app, record=record.to_doc(), actor=c.actor,
            created_at=c.at, updated_at=c.at, history=[[c.at, "started", ""]])
        while len(self.deploys) > DEPLOY_LIMIT:  # oldest finished first
            oldest = next((d for d in self.deploys.values() if not d.running), None)
            if oldest is None:
                break
            del self.deploys[oldest.deploy_id]
        return ({"ok": True, "deploy_id": c.deploy_id, "release": record.release},
                f"deploy {c.deploy_id} of {record.release} started")

    def _deploy_event(self, c: cmd.DeployEvent) -> tuple[Result, str]:
        deploy = self._running_deploy(c.app, c.deploy_id)
        try:
            event = event_from_doc(c.event)
            record = advance(DeployRecord.from_doc(deploy.record), event)
        except ValueError as exc:
            raise CommandError(str(exc), field="event", command_type=c.type) from None
        deploy.record, deploy.updated_at = record.to_doc(), c.at
        node = getattr(event, "node", "")
        deploy.history.append([c.at, event.type, node])
        del deploy.history[:-HISTORY_LIMIT]
        return ({"ok": True, "deploy_id": c.deploy_id, "stage": record.stage.value,
                 "status": record.status.value}, f"{event.type} {node}".strip())

    def _finish_deploy(self, c: cmd.FinishDeploy) -> tuple[Result, str]:
        deploy = self._running_deploy(c.app, c.deploy_id)
        record = DeployRecord.from_doc(deploy.record)
        if record.stage != Stage.DONE:
            raise Conflict(f"deploy {c.deploy_id} is at stage {record.stage.value}, not done",
                           app=c.app)
        deploy.finished, deploy.updated_at = True, c.at
        deploy.history.append([c.at, "finished", ""])
        if record.status == Status.SUCCEEDED:
            # The app is what its serving release says it is (routes, scale...), not what
            # its first upload said.
            app = self.apps[c.app]
            app.current_release, app.updated_at = record.release, c.at
            release = next(r for r in self.releases[c.app] if f"r{r.number}" == record.release)
            app.spec, release.served = release.spec, True
        outcome = record.status.value + (f": {record.reason}" if record.reason else "")
        return {"ok": True, "deploy_id": c.deploy_id, "status": record.status.value}, outcome

    def _running_deploy(self, app: str, deploy_id: str) -> Deploy:
        self._app(app)
        deploy = self.deploys.get(deploy_id)
        if deploy is None or deploy.app != app:
            raise UnknownDeploy(app, deploy_id)
        if deploy.finished:
            raise Conflict(f"deploy {deploy_id} is finished", app=app)
        return deploy

    def _register_coordinator(self, c: cmd.RegisterCoordinator) -> tuple[Result, str]:
        if self.coordinators.get(c.coordinator) == c.api_url:
            # refused, so it changes nothing: a coordinator re-registering after a restart,
            # before it has replayed its log, leaves the state (and its digest) as it was
            raise Conflict(f"coordinator {c.coordinator} is already at {c.api_url}")
        self.coordinators[c.coordinator] = c.api_url
        return {"ok": True, "coordinator": c.coordinator}, c.api_url

    # -- reads ------------------------------------------------------------------------

    def effective_scale(self, app: str) -> dict[str, Any]:
        """The scale ``app`` runs at: the run-time override (SetScale) if there is one,
        else its spec's ``[scale]``: ``{"groups": [...], "per_node": k, "instances": K|None}``.
        Raises UnknownApp."""
        found = self._app(app)
        if found.scale is not None:
            scale = copy.deepcopy(found.scale)
        else:
            spec = found.spec.get("scale", {})
            instances = spec.get("instances")
            scale = {"groups": list(spec.get("groups", ["default"])),
                     "per_node": 1 if instances is not None else spec.get("per_node", 1),
                     "instances": instances}
            if "min" in spec:
                scale["auto"] = {key: spec[key] for key in ("min", "max", "target", "metric")}
        auto = scale.get("auto")
        if auto is not None:  # autoscaled: what the autoscaler decided, within min..max
            decided = auto["min"] if found.auto_instances is None else found.auto_instances
            # min 0 (scale to zero) runs at least 1: the nodes idle the app, not the plan
            scale["instances"] = min(max(decided, auto["min"], 1), auto["max"])
        return scale

    def release_outcomes(self, app: str) -> dict[str, str]:
        """Release name -> the status of its latest kept deploy record (running, succeeded,
        rolled_back, failed); a release with no kept deploy is absent."""
        outcomes: dict[str, str] = {}
        for deploy in sorted((d for d in self.deploys.values() if d.app == app),
                             key=lambda d: d.created_at):
            outcomes[deploy.record["release"]] = deploy.record["status"]
        return outcomes

    def served(self, app: str, release: str) -> bool:
        """Whether a deploy of ``release`` ever succeeded."""
        return any(f"r{r.number}" == release and r.served for r in self.releases.get(app, []))

    def retained(self, app: str, release: str, *, succeeded: int = RETAIN_SUCCEEDED
                 ) -> tuple[str, ...]:
        """The releases a participant keeps prepared while it prepares ``release``: that
        one, the serving one, and the newest ``succeeded`` that served (the previous one
        among them). Failed releases never take the place of good ones."""
        app_state = self.apps.get(app)
        good = [f"r{r.number}" for r in self.releases.get(app, []) if r.served][-succeeded:]
        current = [app_state.current_release] if app_state and app_state.current_release else []
        return tuple(dict.fromkeys([release, *current, *reversed(good)]))

    # -- persistence ----------------------------------------------------------------

    def to_doc(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "apps": [asdict(a) for a in self.apps.values()],
            "releases": {app: [asdict(r) for r in rs] for app, rs in self.releases.items()},
            "last_release": dict(self.last_release),
            "nodes": [asdict(n) for n in self.nodes.values()],
            "placement": copy.deepcopy(self.placement),
            "placement_reason": dict(self.placement_reason),
            "deploys": [asdict(d) for d in self.deploys.values()],
            "audit": copy.deepcopy(self.audit),
            "audit_seq": self.audit_seq,
            # a list, not an object: insertion order decides eviction and must survive
            "idempotency": [[k, copy.deepcopy(v)] for k, v in self.idempotency.items()],
            "tokens": copy.deepcopy(self.tokens),
            "quotas": copy.deepcopy(self.quotas),
            "coordinators": dict(self.coordinators),
            **self.trust.to_doc(),
            # only when set: a state without run-time members keeps its digest
            **({"members": dict(self.members)} if self.members else {}),
        }

    def to_json(self) -> str:
        """The whole state as canonical JSON; ``from_json`` restores it losslessly."""
        return canonical_json(self.to_doc())

    @classmethod
    def from_json(cls, text: str | bytes) -> ClusterState:
        """Restore a state written by ``to_json``; raises SnapshotError if it is not one."""
        try:
            doc = json.loads(text)
            if doc.get("version") != FORMAT_VERSION:
                raise SnapshotError(f"unknown state format version {doc.get('version')!r}")
            state = cls()
            state.apps = {a["name"]: App(**a) for a in doc["apps"]}
            # A state written before releases recorded ``served``: a release served if it
            # serves now or a kept deploy of it succeeded.
            good = {(d["app"], d["record"]["release"]) for d in doc["deploys"]
                    if d["record"]["status"] == "succeeded"}
            good |= {(a["name"], a["current_release"]) for a in doc["apps"]}
            state.releases = {app: [Release(**{"served": (app, f"r{r['number']}") in good, **r})
                                    for r in rs]
                              for app, rs in doc["releases"].items()}
            state.last_release = dict(doc["last_release"])
            state.nodes = {n["name"]: Node(**n) for n in doc["nodes"]}
            state.placement = doc["placement"]
            state.placement_reason = doc.get("placement_reason", {})  # newer than version 1
            state.deploys = {d["deploy_id"]: Deploy(**d) for d in doc["deploys"]}
            state.audit = doc["audit"]
            state.audit_seq = doc["audit_seq"]
            state.idempotency = {k: v for k, v in doc["idempotency"]}
            state.tokens = doc["tokens"]
            state.quotas = doc.get("quotas", {})  # newer than version 1
            state.coordinators = doc["coordinators"]
            state.trust = Trust.from_doc(doc)  # absent from states older than trust
            state.members = dict(doc.get("members", {}))  # absent before membership changes
        except SnapshotError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SnapshotError(f"corrupt state document: {exc!r}") from None
        return state

    def digest(self) -> str:
        """sha256 of the canonical JSON: equal on every node that applied the same log."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def error_result(exc: CoordinatorError) -> Result:
    """The JSON-able answer for a rejected command."""
    return {"ok": False, "error": str(exc), "code": exc.code, "status": exc.status_hint}


def _checked_spec(doc: Mapping[str, Any], app: str, command_type: str) -> dict[str, Any]:
    """Validate a manifest JSON document for ``app``; returns its canonical form."""
    try:
        spec = spec_from_json(doc)
    except ConfigError as exc:
        raise CommandError(str(exc), field="spec", command_type=command_type) from None
    if spec.name != app:
        raise CommandError(f"names app {spec.name!r}, not {app!r}", field="spec",
                           command_type=command_type)
    return spec_to_json(spec)


def _fingerprint(command: cmd.Command) -> str:
    """Identity of a command for idempotency: everything but ``at`` (a retry gets a new one)."""
    doc = command.to_doc()
    del doc["at"]
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()[:32]
