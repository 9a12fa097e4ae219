"""Errors of the coordinator, grouped by what the caller does next.

``CoordinatorError.status_hint`` is the HTTP status the API answers with; the
replicated state machine never raises these out of ``ClusterState.apply`` (a
Raft log entry must always apply) but turns them into error results carrying
the same status, code and message.

- ``CommandError`` (400): the command itself is malformed; fix it, do not retry.
- ``UnknownApp`` / ``UnknownNode`` / ``UnknownRelease`` (404): the command names
  something the cluster does not have.
- ``Forbidden`` (403): the API token may not do this (role or team); ask an admin.
- ``Conflict`` (409): the command is well formed but the current state forbids it
  (app exists, illegal lifecycle transition, idempotency key reused); look at the
  state and decide again.
- ``SnapshotError`` (500): a persisted state document cannot be read.
"""

from __future__ import annotations

from superagent.errors import SuperagentError


class CoordinatorError(SuperagentError):
    """Base of the coordinator's errors; ``code`` is a stable machine-readable name."""

    status_hint = 500
    code = "coordinator_error"

    def __init__(self, message: str, *, app: str = "", node: str = "") -> None:
        self.app = app
        self.node = node
        super().__init__(message)


class CommandError(CoordinatorError):
    """A command is malformed: unknown ``type``, missing or bad ``field``."""

    status_hint = 400
    code = "bad_command"

    def __init__(self, message: str, *, field: str = "", command_type: str = "") -> None:
        self.field = field
        self.command_type = command_type
        where = ".".join(part for part in (command_type, field) if part)
        super().__init__(f"{where}: {message}" if where else message)


class BadRequest(CoordinatorError):
    """A request the API cannot read (body too large, not JSON, a bad field)."""

    code = "bad_request"

    def __init__(self, message: str, status: int = 400) -> None:
        self.status_hint = status
        super().__init__(message)


class UnknownCommand(CommandError):
    """The command's ``type`` tag names no command."""

    code = "unknown_command"


class UnknownApp(CoordinatorError):
    status_hint = 404
    code = "unknown_app"

    def __init__(self, app: str) -> None:
        super().__init__(f"app {app!r} does not exist", app=app)


class UnknownNode(CoordinatorError):
    status_hint = 404
    code = "unknown_node"

    def __init__(self, node: str) -> None:
        super().__init__(f"node {node!r} is not registered", node=node)


class UnknownCoordinator(CoordinatorError):
    status_hint = 404
    code = "unknown_coordinator"

    def __init__(self, coordinator: str) -> None:
        super().__init__(f"coordinator {coordinator!r} is not a member", node=coordinator)


class JoinRefused(CoordinatorError):
    """A join token that is unknown, spent, expired or bound to another node; or a node
    name already enrolled with another credential."""

    status_hint = 401
    code = "join_refused"


class NodeRevoked(CoordinatorError):
    """The node's credential was revoked: it may not register or come up again."""

    status_hint = 401
    code = "node_revoked"


class UnknownRelease(CoordinatorError):
    status_hint = 404
    code = "unknown_release"

    def __init__(self, app: str, release: int) -> None:
        self.release = release
        super().__init__(f"release {app}@r{release} does not exist", app=app)


class UnknownDeploy(CoordinatorError):
    status_hint = 404
    code = "unknown_deploy"

    def __init__(self, app: str, deploy_id: str) -> None:
        super().__init__(f"app {app!r} has no deploy {deploy_id!r}", app=app)


class UnknownToken(CoordinatorError):
    status_hint = 404
    code = "unknown_token"

    def __init__(self, name: str) -> None:
        super().__init__(f"token {name!r} does not exist")


class Forbidden(CoordinatorError):
    """The token is valid but its role or teams do not allow this (``policy.decide``);
    ``missing`` names the permission (``apps:write``) or scope (``team:shop``) it lacks."""

    status_hint = 403
    code = "forbidden"

    def __init__(self, message: str, *, missing: str = "") -> None:
        self.missing = missing
        super().__init__(message)


class Conflict(CoordinatorError):
    """The command is valid but the current state forbids it."""

    status_hint = 409
    code = "conflict"


class MembershipRefused(Conflict):
    """A change of the coordinators' membership is refused: it would leave no majority of
    live members, another change is under way, or it is void."""

    code = "membership_refused"


class QuotaExceeded(Conflict):
    """A create, release, deploy or scale would take a team past one of its quotas."""

    code = "quota_exceeded"

    def __init__(self, team: str, quota: str, wanted: int, limit: int) -> None:
        self.team, self.quota, self.wanted, self.limit = team, quota, wanted, limit
        super().__init__(f"team {team!r} would use {wanted} {quota}, over its quota of"
                         f" {limit} (superagent teams quota {team})")


class NoTargets(Conflict):
    """No participant can take a deploy (none online and up in the app's groups)."""

    code = "no_targets"


class IllegalTransition(Conflict):
    """A lifecycle ``event`` is not allowed in ``state`` (see ``lifecycle.TRANSITIONS``)."""

    code = "illegal_transition"

    def __init__(self, *, state: str, event: str, node: str = "") -> None:
        self.state = state
        self.event = event
        who = f"node {node!r} " if node else ""
        super().__init__(f"{who}is {state}: event {event!r} is not allowed", node=node)


class SnapshotError(CoordinatorError):
    """A persisted ``ClusterState`` document is corrupt or of an unknown version."""

    code = "bad_snapshot"


class BadBackup(CoordinatorError):
    """A backup file that cannot be restored: the message names the member or release."""

    status_hint = 400
    code = "bad_backup"


class RaftError(CoordinatorError):
    """Raft could not commit a command (raised by ``raft.RaftNode``, never by ``apply``).

    ``reason`` is pysyncobj's failure as a short tag; ``may_have_committed`` says whether the
    command might still have been applied: retry only with the same idempotency key.
    """

    status_hint = 503
    code = "raft_error"

    def __init__(
        self, message: str, *, reason: str = "", may_have_committed: bool = False, node: str = ""
    ) -> None:
        self.reason = reason
        self.may_have_committed = may_have_committed
        super().__init__(message, node=node)


class NotLeader(RaftError):
    """This node is not the Raft leader: send the write to ``leader`` (None while unknown)."""

    status_hint = 421
    code = "not_leader"

    def __init__(self, leader: str | None, *, node: str = "") -> None:
        self.leader = leader
        super().__init__(
            f"{node or 'this node'} is not the Raft leader (leader: {leader or 'unknown'})",
            reason="not_leader",
            node=node,
        )


class RaftTimeout(RaftError):
    """No result within ``timeout`` seconds: the command may or may not have committed."""

    status_hint = 504
    code = "raft_timeout"

    def __init__(self, timeout: float, *, node: str = "") -> None:
        self.timeout = timeout
        super().__init__(
            f"no Raft result within {timeout:g}s; the command may or may not have committed",
            reason="timeout",
            may_have_committed=True,
            node=node,
        )


class ArtifactError(CoordinatorError):
    """Base of the artifact store's errors; ``sha256`` names the blob (may be empty)."""

    code = "artifact_error"

    def __init__(self, message: str, *, sha256: str = "", node: str = "") -> None:
        self.sha256 = sha256
        super().__init__(message, node=node)


class BadArtifactName(ArtifactError):
    """A blob name is not 64 lowercase hex digits; fix the request, do not retry."""

    status_hint = 400
    code = "bad_artifact_name"

    def __init__(self, name: str) -> None:
        super().__init__(f"artifact name {name!r} is not 64 lowercase hex digits")


class ChecksumMismatch(ArtifactError):
    """An upload's content does not hash to the sha256 the caller announced; nothing was kept."""

    status_hint = 400
    code = "checksum_mismatch"

    def __init__(self, *, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"upload hashes to {actual}, expected {expected}", sha256=expected)


class ArtifactTooLarge(ArtifactError):
    """An upload passed ``max_bytes``; it was refused mid-stream and nothing was kept."""

    status_hint = 413
    code = "artifact_too_large"

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        super().__init__(f"upload exceeds the limit of {max_bytes} bytes")


class BadArchive(ArtifactError):
    """An uploaded release archive breaks a rule of ``superagent.tarcheck`` (the rules the
    participant unpacks with); ``member`` names the entry ("" for the whole archive). The
    upload was refused before anything was stored, recorded or replicated."""

    status_hint = 400
    code = "unsafe_archive"

    def __init__(self, message: str, *, member: str, over_limit: bool = False) -> None:
        self.member = member
        if over_limit:
            self.code = "archive_too_large"
        super().__init__(message)


class UnknownArtifact(ArtifactError):
    status_hint = 404
    code = "unknown_artifact"

    def __init__(self, sha256: str) -> None:
        super().__init__(f"artifact {sha256} is not in this store", sha256=sha256)


class ArtifactUnavailable(ArtifactError):
    """A blob the state names is held by no coordinator that answered: retry once the
    peers are back (a backup cannot be taken without it)."""

    status_hint = 503
    code = "artifact_unavailable"

    def __init__(self, sha256: str, *, why: str) -> None:
        super().__init__(f"artifact {sha256} is on no coordinator that answered ({why})",
                         sha256=sha256)


class CorruptArtifact(ArtifactError):
    """A stored blob no longer hashes to its name; it has been removed (fetch it again)."""

    status_hint = 500
    code = "corrupt_artifact"

    def __init__(self, sha256: str, *, actual: str) -> None:
        self.actual = actual
        super().__init__(f"artifact {sha256} hashes to {actual} on disk; removed", sha256=sha256)


class NoQuorum(ArtifactError):
    """A blob reached ``succeeded`` of ``cluster`` nodes, fewer than the majority ``needed``.

    Retry later; the release must not be committed until a majority holds its blob.
    """

    status_hint = 503
    code = "no_quorum"

    def __init__(
        self, sha256: str, *, succeeded: int, needed: int, cluster: int, timed_out: bool
    ) -> None:
        self.succeeded = succeeded
        self.needed = needed
        self.cluster = cluster
        self.timed_out = timed_out
        why = "timed out" if timed_out else "too many peers failed"
        super().__init__(
            f"artifact {sha256} is on {succeeded} of {cluster} nodes, needs {needed}: {why}",
            sha256=sha256,
        )


class ForwardRefused(CoordinatorError):
    """The leader refused a command this follower forwarded (e.g. the coordinators'
    secrets differ); ``status`` is its answer's."""

    code = "forward_refused"

    def __init__(self, message: str, *, status: int) -> None:
        self.status_hint = status if 400 <= status < 600 else 502
        super().__init__(message)


class NoLeader(RaftError):
    """No leader is known (an election is under way or there is no quorum): retry shortly."""

    status_hint = 503
    code = "no_leader"

    def __init__(self, *, node: str = "", waited: float = 0.0) -> None:
        super().__init__(f"no Raft leader reachable after {waited:g}s (election or no quorum);"
                         " retry shortly", reason="no_leader", node=node)
