"""Errors shared by every role.

The hierarchy is shallow and grouped by what the caller does next: a
``ConfigError`` means "fix the file and try again" (the CLI prints it and
exits non-zero); other packages add their own in their ``errors.py``.
"""

from __future__ import annotations


class SuperagentError(Exception):
    """Base of every error superagent raises on purpose."""


class ConfigError(SuperagentError):
    """A configuration file or value is invalid.

    ``source`` names the file (or "snapshot"), ``key`` the dotted key that is wrong.
    """

    def __init__(self, message: str, *, source: str = "", key: str = "") -> None:
        self.source = source
        self.key = key
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class HTTPSyntaxError(SuperagentError):
    """A request path or host name breaks HTTP syntax; ``str(exc)`` says how.

    Raised by ``superagent.httprules``. The proxy answers it with 400 and closes the
    connection; config and manifest readers report it as a ConfigError naming the key.
    No ``__init__`` of its own: the proxy's compiled hot path raises it, and constructing
    it must not run interpreted code.
    """


class CodecError(SuperagentError, ValueError):
    """A document does not decode into its class (``superagent.codec``).

    ``field`` is the path of the bad field (``steps[1].node``; empty for the document
    itself), ``reason`` what is wrong with it ("expected int, got str", "unknown field").
    """

    def __init__(self, reason: str, *, field: str = "") -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)

    @property
    def top(self) -> str:
        """The top-level field the error is in (``steps`` for ``steps[1].node``)."""
        return self.field.split(".", 1)[0].split("[", 1)[0]


class ArchiveRefused(SuperagentError):
    """A release archive breaks a rule of ``superagent.tarcheck``.

    ``member`` names the offending entry ("" when the archive as a whole is at fault),
    ``reason`` says what is wrong with it. The coordinator answers it at upload with a 400
    and the participant at prepare; each translates it into its own error class.
    """

    def __init__(self, reason: str, *, member: str = "") -> None:
        self.reason = reason
        self.member = member
        super().__init__(f"archive member {member!r}: {reason}" if member
                         else f"archive: {reason}")


class ArchiveOverLimit(ArchiveRefused):
    """The archive is over the member-count, unpacked-size or compression-ratio limit."""
