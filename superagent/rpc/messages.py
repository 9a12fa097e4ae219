"""The coordinator-participant protocol: every signal, query and reply as a typed value.

Signals change a participant's state. Each is a frozen keyword-only dataclass with a
``type`` tag (the last part of its wire path, ``POST /v1/signals/<type>``), the signal
``id`` (idempotency: a repeat gets the first result) and the sender's Raft ``term``
(fencing: an older term is refused). ``REPLY`` names the reply's class. ``Upload`` is the
one signal whose body is not JSON: its fields travel in headers and the body is the
release tarball (``PUT /v1/releases/<app>/<release>``).

Queries (``GET /v1/status``, ``LogsQuery``) read and are neither fenced nor remembered.

Replies are untagged: the request says which class to expect. A signal's reply has
``repeated`` set when it is the remembered answer to a repeated id. An error is an
``ErrorReply`` whose ``code`` is an ``ErrorCode`` (never a class name), with the HTTP
status, a human ``detail`` and, where known, the app, release and a log tail.

Field rules beyond types live in ``__post_init__`` and raise ``CodecError`` naming the
field, so a malformed message cannot be built on either side. Everything goes through
``superagent.codec``; the JSON field names are those the protocol had as plain dicts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Generic, TypeAlias, TypeVar

from superagent.errors import CodecError
from superagent.manifest import MAX_PER_NODE, TEST_TIMEOUT
from superagent.names import APP_NAME, SHA256, is_app_name

SIGNAL_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,200}")
MAX_COUNT = MAX_PER_NODE  # instances one start signal may ask for
DEBUG_TTL = 3600.0  # a debug session left open ends by itself after an hour
MAX_DEBUG_TTL = 86400.0
MAX_TEST_TIMEOUT = 86400.0  # a test signal's own timeout, at most a day
MAX_LOG_LINES = 10_000  # lines one logs query may ask for


def _want_app(app: str) -> None:
    """An app name as every role spells it: it becomes a Unix user and a cgroup name on
    the participant, so nothing else may reach the agent."""
    _want(is_app_name(app), "app", f"must match {APP_NAME.pattern}")


def _want(ok: bool, name: str, reason: str) -> None:
    if not ok:
        raise CodecError(reason, field=name)


def _instances(name: str, ids: tuple[str, ...], *, allow_empty: bool = False) -> None:
    _want(allow_empty or len(ids) > 0, name, "must name at least one instance")
    _want(all(ids), name, "instance ids must not be empty")


# -- replies ---------------------------------------------------------------------------------

class ErrorCode(StrEnum):
    """Why a participant refused: what the caller does next depends on it."""

    BAD_REQUEST = "bad_request"  # a malformed message: fix the sender
    UNAUTHORIZED = "unauthorized"  # no or a wrong key (the signal key only coordinators hold)
    UNKNOWN_SIGNAL = "unknown_signal"  # no such signal on this path
    NOT_FOUND = "not_found"  # no route for the path at all
    METHOD_NOT_ALLOWED = "method_not_allowed"  # the path takes other methods (see Allow)
    VERSION_MISMATCH = "version_mismatch"  # the peers speak different major versions
    STALE_TERM = "stale_term"  # a newer leader exists: the sender must stop acting
    SIGNAL_FAILED = "signal_failed"  # the original of a repeated id failed: send a new id
    UNKNOWN_INSTANCE = "unknown_instance"
    INSTANCE_NOT_READY = "instance_not_ready"
    UNKNOWN_RELEASE = "unknown_release"
    INVALID_NAME = "invalid_name"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    UNSAFE_ARCHIVE = "unsafe_archive"
    ARCHIVE_TOO_LARGE = "archive_too_large"
    BAD_MANIFEST = "bad_manifest"
    BUILD_FAILED = "build_failed"
    START_FAILED = "start_failed"
    NO_COORDINATOR = "no_coordinator"  # the agent runs without coordinators to fetch from
    ARTIFACT_UNAVAILABLE = "artifact_unavailable"
    PROXY_FAILED = "proxy_failed"
    ISOLATION_FAILED = "isolation_failed"
    PORTS_EXHAUSTED = "ports_exhausted"
    INTERNAL = "internal"  # anything else: the participant's bug or its machine's trouble


_FLAGS = {"": False, "0": False, "false": False, "no": False,
          "1": True, "true": True, "yes": True}  # a boolean in a query string


@dataclass(frozen=True, kw_only=True)
class ErrorReply:
    """A refusal. On the wire: ``{"error": <code>, "status", "detail", ...}``."""

    error: ErrorCode
    status: int
    detail: str
    app: str = ""
    release: str = ""
    log: str = ""  # a build's or a test's output tail

    @property
    def code(self) -> ErrorCode:
        return self.error


@dataclass(frozen=True, kw_only=True)
class Reply:
    """Base of a signal's answer."""

    repeated: bool = False  # the remembered answer to a repeated signal id


@dataclass(frozen=True, kw_only=True)
class PrepareReply(Reply):
    app: str
    release: str
    sha256: str
    build_log: str
    removed_releases: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class TestReply(Reply):
    """A test's outcome; a failing test is a reply with ``ok`` false, not an error."""

    __test__: ClassVar[bool] = False  # not a pytest class
    app: str
    release: str
    ok: bool
    exit_code: int | None
    timed_out: bool
    log: str
    skipped: bool
    seconds: float


@dataclass(frozen=True, kw_only=True)
class StartedInstance:
    id: str
    port: int
    state: str


@dataclass(frozen=True, kw_only=True)
class StartReply(Reply):
    app: str
    release: str
    instances: tuple[StartedInstance, ...]


@dataclass(frozen=True, kw_only=True)
class StopReply(Reply):
    stopped: tuple[str, ...]
    in_flight_cut: dict[str, int]  # requests still in flight per instance when cut


@dataclass(frozen=True, kw_only=True)
class SwitchReply(Reply):
    app: str
    instances: tuple[str, ...]
    version: int  # the routing snapshot every proxy worker acknowledged


@dataclass(frozen=True, kw_only=True)
class DrainReply(Reply):
    remaining: dict[str, int]  # still in flight per instance after the grace (0: clean)


@dataclass(frozen=True, kw_only=True)
class OfflineReply(Reply):
    offline: bool


@dataclass(frozen=True, kw_only=True)
class DebugReply(Reply):
    app: str
    debug: bool
    until: float | None


@dataclass(frozen=True, kw_only=True)
class InstanceStatus:
    """One instance as ``GET /v1/status`` reports it."""

    app: str
    release: str
    instance: str
    state: str
    pid: int | None
    port: int
    restarts: int
    last_exit_code: int | None
    isolation: dict[str, Any] | None
    started_at: float | None
    ready_at: float | None
    create_time: float | None
    figures: dict[str, Any] | None  # None once the process is gone


@dataclass(frozen=True, kw_only=True)
class StatusReply:
    node: str
    groups: tuple[str, ...]
    offline: bool
    isolation: dict[str, Any]
    proxy: dict[str, Any]
    routes: dict[str, tuple[str, ...]]
    debug_sessions: dict[str, float]
    instances: tuple[InstanceStatus, ...]
    releases: dict[str, tuple[str, ...]]
    figures: dict[str, Any]
    # app -> {"state": idle|starting|serving, ...} (scale to zero); older agents send none
    apps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def routed(self, app: str) -> tuple[str, ...]:
        return self.routes.get(app, ())


@dataclass(frozen=True, kw_only=True)
class LogsReply:
    lines: tuple[dict[str, Any], ...]  # the log hub's line documents


# -- signals ---------------------------------------------------------------------------------

R = TypeVar("R", bound=Reply)
# ``type`` is a field name in the classes below, so their annotations name it by alias
ReplyClass: TypeAlias = type[Reply]


@dataclass(frozen=True, kw_only=True)
class Signal(Generic[R]):
    """Fields every signal has; subclasses set ``type`` and ``REPLY``."""

    type: ClassVar[str] = ""
    REPLY: ClassVar[ReplyClass] = Reply
    id: str
    term: int

    def __post_init__(self) -> None:
        _want(SIGNAL_ID.fullmatch(self.id) is not None, "id",
              "must be 1-200 letters, digits or ._:@/+=-")
        _want(self.term >= 0, "term", "must be a non-negative integer")


_RELEASE_NAME = re.compile(r"r[1-9][0-9]{0,8}")


@dataclass(frozen=True, kw_only=True)
class _Release(Signal[R]):
    app: str
    release: str

    def __post_init__(self) -> None:
        super().__post_init__()
        _want_app(self.app)
        _want(len(self.release) > 0, "release", "must not be empty")


@dataclass(frozen=True, kw_only=True)
class Upload(_Release[PrepareReply]):
    """Prepare a release from the tarball in the request body (whose sha256 this is)."""

    type: ClassVar[str] = "upload"
    REPLY: ClassVar[ReplyClass] = PrepareReply
    sha256: str

    def __post_init__(self) -> None:
        super().__post_init__()
        _want(SHA256.fullmatch(self.sha256) is not None, "sha256",
              "must be a lower-case sha256 hex digest")


@dataclass(frozen=True, kw_only=True)
class Prepare(Upload):
    """Fetch the artifact ``sha256`` from the coordinators, then prepare the release.

    ``keep`` (since 1.1) names the app's releases the coordinator wants kept prepared
    (the serving one, the last ones that served): the participant then removes the
    others not in use. Empty: the participant keeps its newest few.
    """

    type: ClassVar[str] = "prepare"
    keep: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        _want(all(_RELEASE_NAME.fullmatch(name) for name in self.keep), "keep",
              "must be release names such as r7")


@dataclass(frozen=True, kw_only=True)
class Test(_Release[TestReply]):
    """Run the prepared release's ``[test]`` command; a failure is a reply, not an error."""

    __test__: ClassVar[bool] = False  # not a pytest class
    type: ClassVar[str] = "test"
    REPLY: ClassVar[ReplyClass] = TestReply
    timeout: float = TEST_TIMEOUT

    def __post_init__(self) -> None:
        super().__post_init__()
        _want(0 < self.timeout <= MAX_TEST_TIMEOUT, "timeout",
              f"must be 0..{MAX_TEST_TIMEOUT:g} seconds")


@dataclass(frozen=True, kw_only=True)
class Start(_Release[StartReply]):
    """Start ``count`` new instances and wait until they are ready."""

    type: ClassVar[str] = "start"
    REPLY: ClassVar[ReplyClass] = StartReply
    count: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _want(1 <= self.count <= MAX_COUNT, "count", f"must be between 1 and {MAX_COUNT}")


@dataclass(frozen=True, kw_only=True)
class Stop(Signal[StopReply]):
    """Drain, unroute and stop instances (``grace`` None: the agent's default)."""

    type: ClassVar[str] = "stop"
    REPLY: ClassVar[ReplyClass] = StopReply
    instances: tuple[str, ...]
    grace: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _instances("instances", self.instances)
        _want(self.grace is None or self.grace >= 0, "grace", "must be >= 0 seconds")


@dataclass(frozen=True, kw_only=True)
class Switch(Signal[SwitchReply]):
    """Route ``app`` to exactly ``instances`` (none: the app gets no traffic here)."""

    type: ClassVar[str] = "switch"
    REPLY: ClassVar[ReplyClass] = SwitchReply
    app: str
    instances: tuple[str, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        _want_app(self.app)
        _instances("instances", self.instances, allow_empty=True)


@dataclass(frozen=True, kw_only=True)
class Drain(Signal[DrainReply]):
    """No new requests to ``instances``; wait up to ``grace`` for in-flight ones."""

    type: ClassVar[str] = "drain"
    REPLY: ClassVar[ReplyClass] = DrainReply
    instances: tuple[str, ...]
    grace: float

    def __post_init__(self) -> None:
        super().__post_init__()
        _instances("instances", self.instances)
        _want(self.grace >= 0, "grace", "must be >= 0 seconds")


@dataclass(frozen=True, kw_only=True)
class Offline(Signal[OfflineReply]):
    """Take the node out of (or back into) the load balancers' rotation."""

    type: ClassVar[str] = "offline"
    REPLY: ClassVar[ReplyClass] = OfflineReply
    offline: bool


@dataclass(frozen=True, kw_only=True)
class Debug(Signal[DebugReply]):
    """Open (for ``ttl`` seconds) or close the debug session of ``app``."""

    type: ClassVar[str] = "debug"
    REPLY: ClassVar[ReplyClass] = DebugReply
    app: str
    enabled: bool
    ttl: float = DEBUG_TTL

    def __post_init__(self) -> None:
        super().__post_init__()
        _want_app(self.app)
        _want(1 <= self.ttl <= MAX_DEBUG_TTL, "ttl", f"must be 1..{MAX_DEBUG_TTL:g} seconds")


# The JSON signals by wire name (``Upload`` has its own path).
SIGNALS: dict[str, type[Signal[Any]]] = {cls.type: cls for cls in (
    Prepare, Test, Start, Stop, Switch, Drain, Offline, Debug)}


# -- queries ---------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class LogsQuery:
    """``GET /v1/logs``: the newest ``n`` lines (of an app, an instance, a request);
    ``follow`` streams them and then new ones as NDJSON."""

    type: ClassVar[str] = "logs"
    app: str | None = None
    instance: str | None = None
    request_id: str | None = None
    n: int = 100
    follow: bool = False

    def __post_init__(self) -> None:
        _want(1 <= self.n <= MAX_LOG_LINES, "n", f"must be 1..{MAX_LOG_LINES}")

    def params(self) -> dict[str, str]:
        """The query string's parameters (empty ones left out)."""
        found = {"app": self.app, "instance": self.instance, "request_id": self.request_id}
        params = {k: v for k, v in found.items() if v}
        params["n"] = str(self.n)
        if self.follow:
            params["follow"] = "1"
        return params

    @classmethod
    def from_params(cls, params: dict[str, str]) -> LogsQuery:
        """The query of a query string; raises CodecError naming a bad parameter."""
        unknown = set(params) - {"app", "instance", "request_id", "n", "follow"}
        _want(not unknown, min(unknown, default=""), "unknown parameter")
        try:
            n = int(params.get("n", "100"))
        except ValueError:
            raise CodecError("must be an integer", field="n") from None
        follow = _FLAGS.get(params.get("follow", "0").lower())
        _want(follow is not None, "follow", "must be 1 or 0 (true or false)")
        return cls(app=params.get("app") or None, instance=params.get("instance") or None,
                   request_id=params.get("request_id") or None, n=n, follow=bool(follow))
