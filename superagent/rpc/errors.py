"""What a caller of the participant RPC can run into, grouped by what it does next.

    RpcError
    ├── Refused           the participant answered with an ``ErrorReply`` (``reply``,
    │                     ``code``): act on the code (e.g. a stop of an UNKNOWN_INSTANCE is done)
    ├── Unreachable       no answer (connection refused, timeout, reset): retry, the same
    │                     signal id makes that safe
    ├── VersionMismatch   the peers speak different major versions: upgrade one of them
    └── BadReply          an answer that is not the protocol (a wrong document, not JSON)

The server side never raises these; it answers an ``ErrorReply``.
"""

from __future__ import annotations

from superagent.errors import SuperagentError
from superagent.rpc.messages import ErrorCode, ErrorReply


class RpcError(SuperagentError):
    """Base of the RPC client's errors."""


class Refused(RpcError):
    """The participant refused the request; ``reply`` says why."""

    def __init__(self, reply: ErrorReply) -> None:
        self.reply = reply
        super().__init__(f"{reply.error.value} ({reply.status}): {reply.detail}")

    @property
    def code(self) -> ErrorCode:
        return self.reply.error


class Unreachable(RpcError):
    """No answer from the participant (``address``)."""

    def __init__(self, message: str, *, address: str = "") -> None:
        self.address = address
        super().__init__(message)


class VersionMismatch(RpcError):
    """The peer speaks another major version of the protocol (``peer`` vs ``ours``)."""

    def __init__(self, message: str, *, peer: str = "", ours: str = "") -> None:
        self.peer = peer
        self.ours = ours
        super().__init__(message)


class BadReply(RpcError):
    """The answer is not what the protocol says it must be."""
