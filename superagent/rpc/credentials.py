"""Per-machine credentials, shared by the coordinator and the participant.

Theory of operation. A participant is enrolled once with a join token an admin issued
(``sj_`` + 32 random bytes). At enrolment it makes its own machine credential (``sn_`` +
32 random bytes), keeps it in its data dir (0600) and sends the coordinators two values
derived from it, never the credential itself:

- ``credential_hash`` (sha256): what the coordinators compare the bearer of the
  participant's own requests with (register, heartbeat, artifact fetches);
- ``signal_key`` (HMAC-SHA256 of a fixed label, keyed with the credential): what the
  coordinators bear on the signals they send it. The participant derives the same key
  from its credential and accepts no other bearer, so a signal it accepts comes from a
  holder of the replicated state, i.e. a coordinator (other participants never see it).

Both are one-way: a copy of the replicated state does not give the credential, and the
signal key does not let anyone call the coordinators as the participant. The participant
makes the credential itself so that an enrolment whose answer was lost can be retried
with the same values (the coordinators answer the repeat, the one-use token is spent once).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

CREDENTIAL_PREFIX = "sn_"
JOIN_TOKEN_PREFIX = "sj_"
CREDENTIAL_FILE = "credential"  # in the participant's data dir, 0600
_SIGNAL_LABEL = b"superagent/signal-key/v1"  # domain separation from the credential hash


def new_credential() -> str:
    return CREDENTIAL_PREFIX + secrets.token_urlsafe(32)


def new_join_token() -> str:
    return JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)


def credential_hash(credential: str) -> str:
    """sha256 hex of a high-entropy credential or join token (a fast hash is enough)."""
    return hashlib.sha256(credential.encode()).hexdigest()


def signal_key(credential: str) -> str:
    """The key the coordinators bear on signals to the holder of ``credential``."""
    return hmac.new(credential.encode(), _SIGNAL_LABEL, hashlib.sha256).hexdigest()


def equal(given: str | None, expected: str) -> bool:
    """Constant-time comparison; an empty ``expected`` never matches."""
    return bool(expected) and given is not None and hmac.compare_digest(
        given.encode(), expected.encode())


def read_credential(path: Path) -> str | None:
    """The credential kept at ``path``, or None when there is none (yet)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return text if text.startswith(CREDENTIAL_PREFIX) else None


def write_credential(path: Path, credential: str) -> None:
    """Keep ``credential`` at ``path``, readable by its owner only (written beside it and
    renamed into place, so a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(credential + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
