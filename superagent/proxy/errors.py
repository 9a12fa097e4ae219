"""Errors of the data plane.

``HTTPError`` is what the proxy answers itself: it carries the status, a short
stable ``code`` (sent as ``X-Superagent-Error`` and logged) and whether the
client connection must be closed afterwards. The connection shell turns it into
a small JSON response; nothing here does I/O.
"""

from __future__ import annotations

from typing import Final

from superagent.errors import SuperagentError


class HTTPError(SuperagentError):
    """A request the proxy answers with an error status instead of relaying it."""

    def __init__(self, status: int, code: str, detail: str = "", *, close: bool = False) -> None:
        self.status = status
        self.code = code
        self.detail = detail or code.replace("-", " ")
        self.close = close
        super().__init__(f"{status} {code}: {self.detail}")


class ProtocolError(HTTPError):
    """The client broke HTTP/1.1 framing or syntax; the connection is closed after the answer."""

    def __init__(self, status: int, detail: str, code: str = "bad-request") -> None:
        super().__init__(status, code, detail, close=True)


class UpstreamError(HTTPError):
    """The upstream instance failed before any response byte reached the client."""

    def __init__(self, status: int, code: str, detail: str = "", *, replayable: bool = False
                 ) -> None:
        # replayable: nothing of the request reached the upstream (or it is safe to resend),
        # so the exchange may be retried on a fresh connection or another instance.
        self.replayable = replayable
        super().__init__(status, code, detail)


RETRY_AFTER: Final = 5  # seconds a client is told to wait after a refused cold start


class ColdStartError(HTTPError):
    """A request held for an app's cold start (``hold.py``) that the proxy answers 503
    (``code``: queue-full, start-failed or start-timeout), with ``Retry-After``. Defined
    here, in the compiled group, because an interpreted class cannot extend a compiled one."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(503, code, detail)
        self.retry_after = RETRY_AFTER


class WorkerStartError(SuperagentError):
    """A proxy worker process exited or did not become ready in time."""

