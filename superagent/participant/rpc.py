"""The agent's internal RPC: ``superagent.rpc.server`` mounted with this agent's pieces.

The protocol (paths, messages, fencing, versions) is ``superagent.rpc``'s; what belongs to
the participant is handed in here: the ``Agent`` as the service, its ``SignalLedger`` and
the keys a caller must present, and ``error_reply``, the one place where the
participant's error classes become the protocol's ``ErrorCode`` (a ``ParticipantError``'s
``status_hint`` stays the HTTP status, its ``app``, ``release`` and log tail travel along).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from starlette.applications import Starlette

from superagent.participant import errors as e
from superagent.rpc.messages import ErrorCode, ErrorReply
from superagent.rpc.server import AgentService, Ledger
from superagent.rpc.server import rpc_app as _server_app

# The most specific class wins (the lookup walks each error's MRO).
CODES: dict[type[e.ParticipantError], ErrorCode] = {
    e.SignalError: ErrorCode.BAD_REQUEST,
    e.StaleTerm: ErrorCode.STALE_TERM,
    e.UnknownInstance: ErrorCode.UNKNOWN_INSTANCE,
    e.InstanceNotReady: ErrorCode.INSTANCE_NOT_READY,
    e.UnknownRelease: ErrorCode.UNKNOWN_RELEASE,
    e.InvalidName: ErrorCode.INVALID_NAME,
    e.ChecksumMismatch: ErrorCode.CHECKSUM_MISMATCH,
    e.UnsafeArchive: ErrorCode.UNSAFE_ARCHIVE,
    e.ArchiveTooLarge: ErrorCode.ARCHIVE_TOO_LARGE,
    e.BadManifest: ErrorCode.BAD_MANIFEST,
    e.BuildFailed: ErrorCode.BUILD_FAILED,
    e.StartFailed: ErrorCode.START_FAILED,
    e.CoordinatorError: ErrorCode.NO_COORDINATOR,
    e.ArtifactUnavailable: ErrorCode.ARTIFACT_UNAVAILABLE,
    e.ProxyDriverError: ErrorCode.PROXY_FAILED,
    e.IsolationError: ErrorCode.ISOLATION_FAILED,
    e.PortsExhaustedError: ErrorCode.PORTS_EXHAUSTED,
}


def error_reply(exc: Exception) -> ErrorReply | None:
    """The protocol's answer to one of the participant's errors (None: not one of ours,
    the RPC answers an internal error and logs it)."""
    if not isinstance(exc, e.ParticipantError):
        return None
    code = next((CODES[cls] for cls in type(exc).__mro__ if cls in CODES), ErrorCode.INTERNAL)
    return ErrorReply(error=code, status=exc.status_hint, detail=str(exc), app=exc.app,
                      release=exc.release, log=getattr(exc, "tail", "") or "")


def rpc_app(service: AgentService, *, secret: str = "", ledger: Ledger,
            keys: Callable[[], Iterable[str]] | None = None) -> Starlette:
    """The RPC application; a caller presents ``secret`` (legacy) or one of ``keys()``."""
    return _server_app(service, secret=secret, ledger=ledger, translate=error_reply,
                       keys=keys)
