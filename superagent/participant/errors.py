"""Errors of the participant agent, grouped by what the caller does next.

Every error carries ``app`` and ``release`` (empty when unknown) and a
``status_hint``: the HTTP status the RPC server answers with. 4xx means the
caller sent something wrong (a bad archive, a wrong checksum, an unknown
release) and retrying the same request cannot help; 422 means the app's own
source failed (its manifest or its build) and the fix is a new release; 5xx is
the agent's problem (disk, permissions, ports) and a retry may succeed.

    ParticipantError
    ├── ReleaseError              storage failure (500) and base of the below
    │   ├── InvalidName           400  app or release name unusable as a directory name
    │   ├── ChecksumMismatch      400  (409 when the release exists with another sha256)
    │   ├── UnsafeArchive         400  a member the extractor refuses; ``member`` names it
    │   │   └── ArchiveTooLarge   413  over the size or file-count limit
    │   ├── UnknownRelease        404
    │   ├── BadManifest           422  superagent.toml / Procfile invalid (wraps ConfigError)
    │   └── BuildFailed           422  ``log_path``, ``tail``, ``returncode``, ``timed_out``
    ├── IsolationError            500  cgroup, user or rlimits cannot be set up; ``path``
    ├── PortError                 500  a port cannot be handed out or adopted; ``port``
    │   └── PortsExhaustedError   503  no free port in ``low``-``high``
    ├── SupervisorError           500  an instance failed to start or was misused; ``instance``
    │   ├── StartFailed           503  exited or not ready by its deadline on first start
    │   ├── AdoptionFailed        410  the recorded process is gone or is another one; ``pid``
    │   └── InvalidTransition     500  a state-machine event not allowed in the current state
    ├── NoRoom                    503  a cold start that does not fit the node's capacity
    ├── UnknownInstance           404  a signal names an instance this agent does not run
    ├── InstanceNotReady          409  traffic to be switched to an instance not ready
    ├── SignalError               400  a malformed signal
    │   └── StaleTerm             409  the sender's term is older than one already seen
    ├── ProxyDriverError          503  a proxy worker refused or missed a request; ``worker``
    ├── StateWriteError           500  state.json could not be written; ``path``
    └── CoordinatorError          409  the agent was started without ``--coordinator``
        └── ArtifactUnavailable   503  no coordinator served the blob (404 when every one
                                       answered 404); ``sha256``, ``tried``
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from superagent.errors import SuperagentError


class ParticipantError(SuperagentError):
    """Base of the participant's errors; see the module docstring for the fields."""

    status_hint: int = 500

    def __init__(self, message: str, *, app: str = "", release: str = "",
                 status_hint: int | None = None) -> None:
        self.message = message
        self.app = app
        self.release = release
        if status_hint is not None:
            self.status_hint = status_hint
        super().__init__(message)

    def bind(self, *, app: str, release: str) -> Self:
        """Fill in ``app`` and ``release`` where the raiser did not know them; returns self."""
        self.app = self.app or app
        self.release = self.release or release
        return self

    def __str__(self) -> str:
        where = f"{self.app}@{self.release}" if self.app and self.release else self.app
        return f"{where}: {self.message}" if where else self.message


class ReleaseError(ParticipantError):
    """A release could not be stored, prepared or found; as such, a storage failure (500)."""


class InvalidName(ReleaseError):
    """An app or release name that cannot safely be a directory name."""

    status_hint = 400


class ChecksumMismatch(ReleaseError):
    """The archive is not the one the caller named: ``expected`` vs ``actual`` sha256."""

    status_hint = 400

    def __init__(self, message: str, *, expected: str, actual: str, app: str = "",
                 release: str = "", status_hint: int | None = None) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(message, app=app, release=release, status_hint=status_hint)


class UnsafeArchive(ReleaseError):
    """The extractor refused the archive; ``member`` names the offending entry ("" if none)."""

    status_hint = 400

    def __init__(self, reason: str, *, member: str = "", app: str = "",
                 release: str = "") -> None:
        self.reason = reason
        self.member = member
        message = f"archive member {member!r}: {reason}" if member else f"archive: {reason}"
        super().__init__(message, app=app, release=release)


class ArchiveTooLarge(UnsafeArchive):
    """The archive is over the total size or member-count limit."""

    status_hint = 413


class UnknownRelease(ReleaseError):
    """No prepared release of that name."""

    status_hint = 404


class BadManifest(ReleaseError):
    """The release's manifest is missing or invalid; the message names the file and key."""

    status_hint = 422


class Uncacheable(ReleaseError):
    """A dependency tree the cache does not keep or give (``depcache``); the message says
    why. Never answered: the build runs npm instead."""


class BuildFailed(ReleaseError):
    """The build command failed or timed out.

    ``log_path`` is the kept build log, ``tail`` its last lines (for the deploy
    record and the CLI), ``returncode`` the exit status (None after a timeout).
    """

    status_hint = 422

    def __init__(self, message: str, *, log_path: Path | None, tail: str,
                 returncode: int | None, timed_out: bool = False, app: str = "",
                 release: str = "") -> None:
        self.log_path = log_path
        self.tail = tail
        self.returncode = returncode
        self.timed_out = timed_out
        super().__init__(message, app=app, release=release)


class IsolationError(ParticipantError):
    """An instance cannot be isolated as asked: the supervisor does not start it.

    ``app`` names the app (when known), ``path`` the file, directory or tool involved.
    """

    status_hint = 500

    def __init__(self, message: str, *, app: str = "", path: str = "") -> None:
        self.path = path
        super().__init__(message, app=app)


class PortError(ParticipantError):
    """A port cannot be handed out or adopted; ``port`` names it when there is one."""

    status_hint = 500

    def __init__(self, message: str, *, port: int | None = None) -> None:
        self.port = port
        super().__init__(message)


class PortsExhaustedError(PortError):
    """Every port of the range is reserved, handed out or bound by someone else."""

    status_hint = 503

    def __init__(self, low: int, high: int, in_use: int) -> None:
        self.low = low
        self.high = high
        super().__init__(f"no free port in {low}-{high}: {in_use} handed out, the rest reserved "
                         "or bound by other processes")


class SupervisorError(ParticipantError):
    """An app instance could not be run as asked; ``instance`` names it."""

    status_hint = 500

    def __init__(self, message: str, *, app: str = "", release: str = "",
                 instance: str = "") -> None:
        self.instance = instance
        super().__init__(message, app=app, release=release)


class StartFailed(SupervisorError):
    """The first start failed: the process exited, or was not ready by its deadline.

    ``returncode`` is the exit status (None when it was killed for missing the deadline or
    for listening on another port than $PORT); the message ends with the last lines of the
    instance's stdout and stderr.
    """

    status_hint = 503

    def __init__(self, message: str, *, returncode: int | None, app: str = "",
                 release: str = "", instance: str = "") -> None:
        self.returncode = returncode
        super().__init__(message, app=app, release=release, instance=instance)


class AdoptionFailed(SupervisorError):
    """The process a state file recorded cannot be re-adopted: it is gone, or its pid now
    belongs to another process. The caller starts a fresh instance. ``pid`` names it."""

    status_hint = 410

    def __init__(self, reason: str, *, pid: int, app: str = "", release: str = "",
                 instance: str = "") -> None:
        self.pid = pid
        self.reason = reason
        super().__init__(f"cannot adopt pid {pid}: {reason}", app=app, release=release,
                         instance=instance)


class InvalidTransition(SupervisorError):
    """An event the instance state machine does not allow in its state (a bug, not input)."""

    def __init__(self, state: str, event: str, *, instance: str = "") -> None:
        self.state = state
        self.event = event
        super().__init__(f"event {event} is not allowed in state {state}", instance=instance)


class NoRoom(ParticipantError):
    """A cold start would take the node past its ``--capacity``, and idling the other
    scale-to-zero apps with nothing in flight would not make room."""

    status_hint = 503


class UnknownInstance(ParticipantError):
    """A signal names an instance this agent does not run."""

    status_hint = 404


class InstanceNotReady(ParticipantError):
    """Traffic was to be switched to an instance that is not ready."""

    status_hint = 409


class SignalError(ParticipantError):
    """A signal the agent refuses as a whole: malformed, fenced off, or unauthorised."""

    status_hint = 400


class StaleTerm(SignalError):
    """The signal's term is older than the newest the agent has seen: a deposed leader."""

    status_hint = 409

    def __init__(self, term: int, newest: int) -> None:
        self.term = term
        self.newest = newest
        super().__init__(f"term {term} is older than term {newest} already seen;"
                         " the sender is no longer the leader")


class ProxyDriverError(ParticipantError):
    """The local proxy workers could not be driven as asked: a worker refused a routing
    snapshot, did not answer, or could not be started. ``worker`` is its index (None when
    the error is not about one worker), ``reason`` what it said. The previous routing stays
    in force, so a retry may succeed (503)."""

    status_hint = 503

    def __init__(self, message: str, *, worker: int | None = None, reason: str = "",
                 app: str = "") -> None:
        self.worker = worker
        self.reason = reason
        super().__init__(message, app=app)


class StateWriteError(ParticipantError):
    """The agent's state.json could not be written (a full or failing disk): what it was
    asked to keep may be lost to a restarted agent. ``path`` names the file."""

    status_hint = 500

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(message)


class CoordinatorError(ParticipantError):
    """Something that needs the coordinator link was asked of an agent without one (409:
    the sender must upload the archive itself, or the agent be restarted with
    ``--coordinator``)."""

    status_hint = 409


class EnrolmentRefused(CoordinatorError):
    """The coordinators refused this machine's join token (unknown, used, expired, issued
    for another node) or its node name (already enrolled): the agent cannot join."""

    status_hint = 401


class ArtifactUnavailable(CoordinatorError):
    """No coordinator served the artifact ``sha256`` intact.

    ``tried`` maps each coordinator URL asked to what went wrong there ("404 not found",
    "connection refused", "sha256 mismatch: got ..."). 404 when every coordinator answered
    that it does not have the blob (retrying cannot help); 503 otherwise (one may have been
    down or in an election, and a retry may succeed).
    """

    status_hint = 503

    def __init__(self, sha256: str, tried: dict[str, str], *, app: str = "",
                 release: str = "") -> None:
        self.sha256 = sha256
        self.tried = dict(tried)
        reasons = "; ".join(f"{url}: {why}" for url, why in tried.items()) or "no URL to try"
        missing = bool(tried) and all(why.startswith("404") for why in tried.values())
        super().__init__(f"artifact {sha256} is not available from any coordinator"
                         f" ({reasons})", app=app, release=release,
                         status_hint=404 if missing else None)


class IllegalTransition(ParticipantError):
    """An app's scale-to-zero record was asked to make a move its table does not allow
    (``participant/idle.py``); the message names the phase and the event."""
