"""API tokens and the cluster secret.

An API token is 32 random bytes, URL-safe base64, prefixed ``sa_`` so it is recognisable in
a leaked file. The cluster stores only its sha256 (a token is high-entropy, so a fast hash
is enough; a slow password hash would only slow every request). Comparisons are constant
time. Participants and peer coordinators authenticate with the cluster secret instead.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TOKEN_PREFIX = "sa_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(header: str) -> str | None:
    """The credential of an ``Authorization: Bearer X`` header value, or None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def token_name(credential: str | None, tokens: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The name of the token ``credential`` is, or None."""
    if credential is None:
        return None
    digest = token_hash(credential)
    found = None
    for name, record in tokens.items():  # no early exit: timing says nothing about which
        if hmac.compare_digest(digest, str(record["sha256"])):
            found = name
    return found


def is_secret(credential: str | None, secret: str) -> bool:
    return credential is not None and hmac.compare_digest(credential.encode(), secret.encode())


def write_private(path: Path, text: str) -> None:
    """Write a credential readable by its owner only, whatever the file's mode was before
    (written beside it and renamed into place, so a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

