"""Dashboard sessions: a cookie's random id -> the API token it stands for (sans-IO).

Theory of operation: a session is made at login from a token the API already accepted;
it keeps the token itself (every request is checked again with it, exactly as a bearer
request is) and a CSRF token for the double-submit check on writes. Sessions live in
this coordinator's memory only: a restart, or another coordinator, does not know them
and the page asks to log in again. They end at logout, after ``IDLE`` seconds unused or
``LIFETIME`` seconds after login; at most ``MAX_SESSIONS`` are kept (the least recently
used goes first), so a flood of logins cannot grow memory, and at most ``PER_TOKEN`` for
one token (its own least recently used goes first), so a flood of logins with one token
(a viewer's, say) cannot push out everyone else's sessions. The clock is the caller's.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass

IDLE = 8 * 3600.0  # seconds a session may go unused
LIFETIME = 24 * 3600.0  # seconds a session lasts at most after login
MAX_SESSIONS = 10_000
PER_TOKEN = 50  # browsers of one token: people sharing a team's token, several tabs


@dataclass(frozen=True, kw_only=True)
class Session:
    id: str
    token: str  # the API token, checked again on every request
    csrf: str
    created: float


class SessionStore:
    """Live sessions by id, least recently used first."""

    def __init__(self, *, idle: float = IDLE, lifetime: float = LIFETIME,
                 limit: int = MAX_SESSIONS, per_token: int = PER_TOKEN) -> None:
        self.idle, self.lifetime, self.limit, self.per_token = idle, lifetime, limit, per_token
        self._sessions: OrderedDict[str, tuple[Session, float]] = OrderedDict()
        self._by_token: dict[str, OrderedDict[str, None]] = {}  # token -> its session ids

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, token: str, now: float) -> Session:
        session = Session(id=secrets.token_urlsafe(32), token=token,
                          csrf=secrets.token_urlsafe(32), created=now)
        self._sessions[session.id] = (session, now)
        mine = self._by_token.setdefault(token, OrderedDict())
        mine[session.id] = None
        while len(mine) > self.per_token:
            self.end(next(iter(mine)))
        while len(self._sessions) > self.limit:
            self.end(next(iter(self._sessions)))
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
            self.end(session_id)
            return None
        self._sessions[session_id] = (session, now)
        self._sessions.move_to_end(session_id)
        self._by_token[session.token].move_to_end(session_id)
        return session

    def end(self, session_id: str | None) -> None:
        found = self._sessions.pop(session_id, None) if session_id else None
        if found is not None:
            mine = self._by_token[found[0].token]
            del mine[found[0].id]
            if not mine:
                del self._by_token[found[0].token]


def csrf_ok(session: Session, header: str | None) -> bool:
    """Whether a write's ``X-CSRF-Token`` header is the session's (compared in constant
    time)."""
    return header is not None and hmac.compare_digest(session.csrf.encode(), header.encode())
