"""Dashboard sessions: a cookie's random id -> the API token it stands for (sans-IO).

Theory of operation: a session is made at login from a token the API already accepted;
it keeps the token itself (every request is checked again with it, exactly as a bearer
request is) and a CSRF token for the double-submit check on writes. Sessions live in
this coordinator's memory only: a restart, or another coordinator, does not know them
and the page asks to log in again. They end at logout, after ``IDLE`` seconds unused or
``LIFETIME`` seconds after login; at most ``MAX_SESSIONS`` are kept (the least recently
used goes first), so a flood of logins cannot grow memory. The clock is the caller's.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass

IDLE = 8 * 3600.0  # seconds a session may go unused
LIFETIME = 24 * 3600.0  # seconds a session lasts at most after login
MAX_SESSIONS = 10_000


@dataclass(frozen=True, kw_only=True)
class Session:
    id: str
    token: str  # the API token, checked again on every request
    csrf: str
    created: float


class SessionStore:
    """Live sessions by id, least recently used first."""

    def __init__(self, *, idle: float = IDLE, lifetime: float = LIFETIME,
                 limit: int = MAX_SESSIONS) -> None:
        self.idle, self.lifetime, self.limit = idle, lifetime, limit
        self._sessions: OrderedDict[str, tuple[Session, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, token: str, now: float) -> Session:
        session = Session(id=secrets.token_urlsafe(32), token=token,
                          csrf=secrets.token_urlsafe(32), created=now)
        self._sessions[session.id] = (session, now)
        while len(self._sessions) > self.limit:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None, now: float) -> Session | None:
        """The live session of this id (marked used now), or None."""
        if not session_id:
            return None
        found = self._sessions.get(session_id)
        if found is None:
            return None
        session, used = found
        if now - used > self.idle or now - session.created > self.lifetime:
            del self._sessions[session_id]
            return None
        self._sessions[session_id] = (session, now)
        self._sessions.move_to_end(session_id)
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)


def csrf_ok(session: Session, header: str | None) -> bool:
    """Whether a write's ``X-CSRF-Token`` header is the session's (compared in constant
    time)."""
    return header is not None and hmac.compare_digest(session.csrf.encode(), header.encode())
