"""Raft commands: the only way ``ClusterState`` changes.

Each command is a frozen, keyword-only dataclass with a ``type`` tag, encoded by the
shared ``superagent.codec`` (STYLE 10; nothing that crosses a process boundary is
pickled); the text is canonical JSON (sorted keys), so every node logs the same
bytes. Every command carries:

- ``key``: an idempotency key (1-200 chars) chosen by the client, so a retry
  after a timeout applies once;
- ``at``: the epoch time set by the proposer, so applying is deterministic
  (no node reads its own clock inside ``apply``);
- ``actor``: who asked, for the audit log.

``decode`` checks shape and field-level rules (types, lengths, name syntax) and
raises ``CommandError`` naming the type and field; rules that depend on the
cluster (app exists, node registered, lifecycle transition) are checked by
``ClusterState.apply``. Mapping fields (``spec``, ``env``, ``placement``) are
plain dicts: treat them as read-only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from superagent import codec
from superagent.codec import canonical_json
from superagent.coordinator.autoscale import auto_spec
from superagent.coordinator.errors import CommandError, UnknownCommand
from superagent.coordinator.lifecycle import Lifecycle
from superagent.coordinator.policy import ADMIN, DEFAULT_TEAM, DEPLOYER, ROLES
from superagent.errors import CodecError
from superagent.manifest import MAX_INSTANCES, MAX_PER_NODE
from superagent.names import APP_NAME, ENV_KEY, GROUP_NAME, SHA256

KEY_MAX = 200  # idempotency keys are client-made (uuid, CI job id + step); 200 fits any sane one
ACTOR_MAX = 200  # a token name or "user@host"; the audit log stores it verbatim
REASON_MAX = 2000  # a deploy failure reason is a summary, the full log lives elsewhere
ADDRESS_MAX = 255  # host:port of a participant's RPC server
MAX_CAPACITY = 10_000  # instances one node may run; more is a typo
MAX_RELEASE_SIZE = 4 * 1024**3  # bytes of a source tarball; the artifact store refuses more
MAX_JOIN_USES = 10_000  # machines one join token may enrol; more is a typo

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # a hostname label or FQDN
TOKEN_NAME = GROUP_NAME  # a short label, like a group's
TEAM_NAME = GROUP_NAME  # likewise
QUOTA_MAX = 2**62  # a quota is a count or a byte size; more is a typo
SCALE_OUTCOMES = ("converged", "short", "replaced")  # how a scaling ends (FinishScale)
DEPLOY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RAFT_ADDRESS = re.compile(r"[A-Za-z0-9.\[\]:_-]{1,250}:[0-9]{1,5}")  # host:port
API_URL = re.compile(r"https?://[A-Za-z0-9.\[\]:_-]{1,250}")  # scheme://host:port, no path


@dataclass(frozen=True, kw_only=True)
class Command:
    """Fields every command has; subclasses set ``type`` and add their own."""

    type: ClassVar[str] = ""
    key: str
    at: float
    actor: str

    def __post_init__(self) -> None:
        self._check("key", 1 <= len(self.key) <= KEY_MAX, f"must be 1-{KEY_MAX} characters")
        self._check("at", math.isfinite(self.at) and self.at >= 0, "must be a finite epoch time")
        self._check("actor", 1 <= len(self.actor) <= ACTOR_MAX,
                    f"must be 1-{ACTOR_MAX} characters")

    def _check(self, name: str, ok: bool, message: str) -> None:
        if not ok:
            raise CommandError(message, field=name, command_type=self.type)

    def _match(self, name: str, pattern: re.Pattern[str], value: str) -> None:
        self._check(name, pattern.fullmatch(value) is not None,
                    f"{value!r} does not match {pattern.pattern}")

    def _groups(self, name: str, groups: tuple[str, ...]) -> None:
        """A non-empty list of distinct group names (superagent.names.GROUP_NAME)."""
        self._check(name, len(groups) > 0, "must name at least one group")
        self._check(name, len(set(groups)) == len(groups), "has duplicates")
        for group in groups:
            self._match(name, GROUP_NAME, group)

    def to_doc(self) -> dict[str, Any]:
        """The JSON-safe document ``decode_doc`` turns back into an equal command."""
        return codec.encode(self)

    def to_json(self) -> str:
        return canonical_json(self.to_doc())

    @property
    def target(self) -> str:
        """What the command is about, for the audit log ("app:hello", "node:n1")."""
        return ""


@dataclass(frozen=True, kw_only=True)
class CreateApp(Command):
    type: ClassVar[str] = "create_app"
    name: str
    spec: dict[str, Any]  # the manifest's JSON form (superagent.manifest.spec_to_json)
    team: str = DEFAULT_TEAM  # the team that owns the app (older entries: the default one)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("name", APP_NAME, self.name)
        self._match("team", TEAM_NAME, self.team)

    @property
    def target(self) -> str:
        return f"app:{self.name}"


@dataclass(frozen=True, kw_only=True)
class _AppCommand(Command):
    app: str

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("app", APP_NAME, self.app)

    @property
    def target(self) -> str:
        return f"app:{self.app}"


@dataclass(frozen=True, kw_only=True)
class UpdateAppSpec(_AppCommand):
    type: ClassVar[str] = "update_app_spec"
    spec: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class DeleteApp(_AppCommand):
    type: ClassVar[str] = "delete_app"


@dataclass(frozen=True, kw_only=True)
class AddRelease(_AppCommand):
    """A new immutable release; the state assigns its number (r1, r2, ...)."""

    type: ClassVar[str] = "add_release"
    sha256: str
    size: int
    spec: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("sha256", SHA256, self.sha256)
        self._check("size", 0 <= self.size <= MAX_RELEASE_SIZE,
                    f"must be 0-{MAX_RELEASE_SIZE} bytes")
        for name in self.env:
            self._match("env", ENV_KEY, name)


@dataclass(frozen=True, kw_only=True)
class _NodeCommand(Command):
    node: str

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("node", NODE_NAME, self.node)

    @property
    def target(self) -> str:
        return f"node:{self.node}"


@dataclass(frozen=True, kw_only=True)
class RegisterNode(_NodeCommand):
    """A participant joins, or re-registers with a new address, groups or capacity."""

    type: ClassVar[str] = "register_node"
    address: str
    groups: tuple[str, ...]
    capacity: int

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check("address", 1 <= len(self.address) <= ADDRESS_MAX
                    and not any(c.isspace() for c in self.address),
                    f"must be 1-{ADDRESS_MAX} characters without spaces")
        self._groups("groups", self.groups)
        self._check("capacity", 1 <= self.capacity <= MAX_CAPACITY,
                    f"must be 1-{MAX_CAPACITY}")


@dataclass(frozen=True, kw_only=True)
class LabelNode(_NodeCommand):
    """The operator sets a node's groups; they win over the groups the node registers with
    later (the node is then ``labeled``)."""

    type: ClassVar[str] = "label_node"
    groups: tuple[str, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        self._groups("groups", self.groups)


@dataclass(frozen=True, kw_only=True)
class NodeUp(_NodeCommand):
    type: ClassVar[str] = "node_up"


@dataclass(frozen=True, kw_only=True)
class NodeDown(_NodeCommand):
    type: ClassVar[str] = "node_down"


@dataclass(frozen=True, kw_only=True)
class SetNodeLifecycle(_NodeCommand):
    type: ClassVar[str] = "set_node_lifecycle"
    lifecycle: str  # a Lifecycle value: online, draining, offline

    def __post_init__(self) -> None:
        super().__post_init__()
        allowed = [lc.value for lc in Lifecycle]
        self._check("lifecycle", self.lifecycle in allowed, f"must be one of {allowed}")


@dataclass(frozen=True, kw_only=True)
class SetPlacement(_AppCommand):
    """Desired instances per node for ``app``, as computed by the scheduler.

    Replaces the app's whole placement; zero entries are dropped.
    """

    type: ClassVar[str] = "set_placement"
    placement: dict[str, int]
    reason: str = ""  # why the desired count is not met ("" when it is), for the operator

    def __post_init__(self) -> None:
        super().__post_init__()
        for node, count in self.placement.items():
            self._match("placement", NODE_NAME, node)
            self._check("placement", 0 <= count <= MAX_PER_NODE,
                        f"{node}: must be 0-{MAX_PER_NODE} instances")
        self._check("reason", len(self.reason) <= REASON_MAX,
                    f"must be at most {REASON_MAX} characters")


@dataclass(frozen=True, kw_only=True)
class SetScale(_AppCommand):
    """The run-time scale of ``app``, overriding its manifest's ``[scale]``.

    ``per_node`` instances on every eligible node of ``groups``, or, when ``instances``
    is set, that many in total (``per_node`` then does not apply). Starts a scaling
    (``App.scaling``, named ``scale_id``; "" lets the state name it ``s<audit seq>``)
    that the leader ends with ``FinishScale``.
    """

    type: ClassVar[str] = "set_scale"
    groups: tuple[str, ...]
    per_node: int = 1
    instances: int | None = None
    scale_id: str = ""
    # autoscaling {"min", "max", "target", "metric"}: instances then follow the load
    auto: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_id:
            self._match("scale_id", DEPLOY_ID, self.scale_id)
        self._groups("groups", self.groups)
        self._check("per_node", 0 <= self.per_node <= MAX_PER_NODE,
                    f"must be 0-{MAX_PER_NODE}")
        self._check("instances", self.instances is None
                    or 1 <= self.instances <= MAX_INSTANCES, f"must be 1-{MAX_INSTANCES}")
        if self.auto is not None:
            self._check("auto", self.instances is None, "excludes instances")
            self._check("auto", set(self.auto) <= {"min", "max", "target", "metric"},
                        "takes min, max, target and metric")
            try:
                policy = auto_spec(self.auto)
            except (ValueError, TypeError, KeyError) as exc:
                raise CommandError(f"not an autoscaling policy: {exc}", field="auto",
                                   command_type=self.type) from None
            self._check("auto", policy.max <= MAX_INSTANCES, f"max must be at most"
                                                             f" {MAX_INSTANCES}")

    def scale(self) -> dict[str, Any]:
        """The override as ``App.scale`` stores it."""
        doc: dict[str, Any] = {"groups": list(self.groups),
                               "per_node": self.per_node if self.instances is None else 1,
                               "instances": self.instances}
        if self.auto is not None:
            doc["auto"] = auto_spec(self.auto).to_doc()
        return doc


@dataclass(frozen=True, kw_only=True)
class Autoscale(_AppCommand):
    """The autoscaler's decision: an autoscaled app runs ``instances`` now.

    Not a scaling (``App.scaling``): it never blocks a deploy; ``reason`` and ``inputs``
    (what the decision was made of) go to the audit log.
    """

    type: ClassVar[str] = "autoscale"
    instances: int
    reason: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check("instances", 0 <= self.instances <= MAX_INSTANCES,
                    f"must be 0-{MAX_INSTANCES}")
        self._check("reason", len(self.reason) <= REASON_MAX,
                    f"must be at most {REASON_MAX} characters")


@dataclass(frozen=True, kw_only=True)
class FinishScale(_AppCommand):
    """The leader is done with scaling ``scale_id`` of ``app``: its placement runs
    (``converged``), cannot be met (``short``, ``reason`` says why), or a newer scale or
    a deploy took its place (``replaced``)."""

    type: ClassVar[str] = "finish_scale"
    scale_id: str
    outcome: str
    reason: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("scale_id", DEPLOY_ID, self.scale_id)
        self._check("outcome", self.outcome in SCALE_OUTCOMES,
                    f"must be one of {list(SCALE_OUTCOMES)}")
        self._check("reason", len(self.reason) <= REASON_MAX,
                    f"must be at most {REASON_MAX} characters")


@dataclass(frozen=True, kw_only=True)
class StartDeploy(_AppCommand):
    """Begin a deploy: ``record`` is the saga's fresh ``DeployRecord`` document."""

    type: ClassVar[str] = "start_deploy"
    deploy_id: str
    record: dict[str, Any]

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("deploy_id", DEPLOY_ID, self.deploy_id)


@dataclass(frozen=True, kw_only=True)
class DeployEvent(_AppCommand):
    """One outcome of a deploy's action (the saga's ``Event`` document)."""

    type: ClassVar[str] = "deploy_event"
    deploy_id: str
    event: dict[str, Any]

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("deploy_id", DEPLOY_ID, self.deploy_id)


@dataclass(frozen=True, kw_only=True)
class FinishDeploy(_AppCommand):
    """The runner has executed the deploy's last round: it is over (and, if it succeeded,
    its release is the app's serving one). Only then may another deploy of the app start."""

    type: ClassVar[str] = "finish_deploy"
    deploy_id: str

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("deploy_id", DEPLOY_ID, self.deploy_id)


@dataclass(frozen=True, kw_only=True)
class AddToken(Command):
    """An API token: only its sha256 is replicated, the token itself is shown once.

    ``role`` is one of ``policy.ROLES``; ``teams`` scope a deployer (at least one) or a
    viewer (none: every team); an admin has none. ``expires_at`` (epoch) ends it. An
    entry written before roles is the admin token's, which the defaults make it."""

    type: ClassVar[str] = "add_token"
    name: str
    sha256: str
    role: str = ADMIN
    teams: tuple[str, ...] = ()
    expires_at: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("name", TOKEN_NAME, self.name)
        self._match("sha256", SHA256, self.sha256)
        self._check("role", self.role in ROLES, f"must be one of {list(ROLES)}")
        for team in self.teams:
            self._match("teams", TEAM_NAME, team)
        self._check("teams", len(set(self.teams)) == len(self.teams), "has duplicates")
        self._check("teams", self.role != ADMIN or not self.teams,
                    "an admin token is not limited to teams")
        self._check("teams", self.role != DEPLOYER or bool(self.teams),
                    "a deployer token needs at least one team")
        self._check("expires_at", self.expires_at is None or (
            math.isfinite(self.expires_at) and self.expires_at > 0),
            "must be a finite epoch time")

    @property
    def target(self) -> str:
        return f"token:{self.name}"


@dataclass(frozen=True, kw_only=True)
class RevokeToken(Command):
    """Forget an API token: from this entry on, it authenticates nobody."""

    type: ClassVar[str] = "revoke_token"
    name: str

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("name", TOKEN_NAME, self.name)

    @property
    def target(self) -> str:
        return f"token:{self.name}"


@dataclass(frozen=True, kw_only=True)
class SetQuota(Command):
    """A team's limits: apps, planned instances and their memory (bytes, from the apps'
    ``[limits] memory``); None lifts one. All None removes the team's quota."""

    type: ClassVar[str] = "set_quota"
    team: str
    apps: int | None = None
    instances: int | None = None
    memory: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("team", TEAM_NAME, self.team)
        for name in ("apps", "instances", "memory"):
            value = getattr(self, name)
            self._check(name, value is None or 0 <= value <= QUOTA_MAX,
                        f"must be 0-{QUOTA_MAX}")

    @property
    def target(self) -> str:
        return f"team:{self.team}"


@dataclass(frozen=True, kw_only=True)
class RegisterCoordinator(Command):
    """Where coordinator ``coordinator`` serves its API, so its peers can forward to it."""

    type: ClassVar[str] = "register_coordinator"
    coordinator: str
    api_url: str

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("coordinator", NODE_NAME, self.coordinator)
        self._match("api_url", API_URL, self.api_url)

    @property
    def target(self) -> str:
        return f"coordinator:{self.coordinator}"


@dataclass(frozen=True, kw_only=True)
class AddJoinToken(Command):
    """A join token: only its sha256 is replicated. It enrols up to ``uses`` machines (0:
    any number) until ``expires_at``; with ``node`` set, only that node, whose credential
    it may replace (a reinstalled machine)."""

    type: ClassVar[str] = "add_join_token"
    sha256: str
    expires_at: float
    uses: int = 1
    node: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("sha256", SHA256, self.sha256)
        self._check("expires_at", math.isfinite(self.expires_at) and self.expires_at > self.at,
                    "must be a finite epoch time after the command's")
        self._check("uses", 0 <= self.uses <= MAX_JOIN_USES, f"must be 0-{MAX_JOIN_USES}")
        if self.node:
            self._match("node", NODE_NAME, self.node)

    @property
    def target(self) -> str:
        return f"join-token:{self.sha256[:12]}"


@dataclass(frozen=True, kw_only=True)
class EnrolNode(_NodeCommand):
    """A machine exchanges a join token (by its sha256) for its own credential (by its
    sha256, plus the key coordinators sign their signals to it with)."""

    type: ClassVar[str] = "enrol_node"
    join_sha256: str
    credential_sha256: str
    signal_key: str

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("join_sha256", SHA256, self.join_sha256)
        self._match("credential_sha256", SHA256, self.credential_sha256)
        self._match("signal_key", SHA256, self.signal_key)


@dataclass(frozen=True, kw_only=True)
class RevokeNode(_NodeCommand):
    """The node's credential is refused from now on and the node gets no work."""

    type: ClassVar[str] = "revoke_node"


@dataclass(frozen=True, kw_only=True)
class AddCoordinator(Command):
    """Coordinator ``coordinator`` joins the Raft members at ``raft_address`` (committed
    before pysyncobj's own membership entry, so every member can name it at once)."""

    type: ClassVar[str] = "add_coordinator"
    coordinator: str
    raft_address: str

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("coordinator", NODE_NAME, self.coordinator)
        self._match("raft_address", RAFT_ADDRESS, self.raft_address)

    @property
    def target(self) -> str:
        return f"coordinator:{self.coordinator}"


@dataclass(frozen=True, kw_only=True)
class RemoveCoordinator(Command):
    """Coordinator ``coordinator`` left the Raft members: forget its addresses."""

    type: ClassVar[str] = "remove_coordinator"
    coordinator: str

    def __post_init__(self) -> None:
        super().__post_init__()
        self._match("coordinator", NODE_NAME, self.coordinator)

    @property
    def target(self) -> str:
        return f"coordinator:{self.coordinator}"


@dataclass(frozen=True, kw_only=True)
class RestoreState(Command):
    """Replace an empty cluster's state with a backup's (``state``: its JSON; see
    ``coordinator.backup``). ``source`` names the backup for the audit log."""

    type: ClassVar[str] = "restore_state"
    state: str
    source: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check("state", self.state.startswith("{"), "must be a state's JSON document")
        self._check("source", len(self.source) <= REASON_MAX, f"at most {REASON_MAX} characters")

    @property
    def target(self) -> str:
        return "cluster"


COMMANDS: dict[str, type[Command]] = {
    cls.type: cls
    for cls in (CreateApp, UpdateAppSpec, DeleteApp, AddRelease, RegisterNode, LabelNode,
                NodeUp, NodeDown, SetNodeLifecycle, SetPlacement, SetScale, FinishScale,
                Autoscale, StartDeploy, DeployEvent, FinishDeploy, AddToken, RevokeToken,
                SetQuota, RegisterCoordinator, AddJoinToken, EnrolNode, RevokeNode,
                AddCoordinator, RemoveCoordinator, RestoreState)
}


def decode(text: str | bytes) -> Command:
    """Parse a command's JSON; raises CommandError naming the type and the bad field."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise CommandError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CommandError("a command is a JSON object")
    return decode_doc(doc)


def decode_doc(doc: Mapping[str, Any]) -> Command:
    """Like ``decode`` for an already parsed document."""
    tag = doc.get("type")
    if not isinstance(tag, str):
        raise CommandError("missing or not a string", field="type")
    cls = COMMANDS.get(tag)
    if cls is None:
        raise UnknownCommand(f"unknown command type {tag!r}", field="type")
    try:
        return codec.decode(cls, doc)
    except CodecError as exc:
        raise CommandError(exc.reason if exc.field == exc.top else str(exc),
                           field=exc.top, command_type=tag) from None
