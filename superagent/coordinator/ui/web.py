"""The dashboard's HTTP side: its static files, login and logout, and the session check
every API route makes when a request carries the session cookie instead of a bearer.

Theory of operation: ``GET /ui/`` answers ``static/index.html`` and ``GET /ui/<file>``
the other files of ``static/`` (a fixed list read at start: nothing else of the disk is
reachable), with a Content-Security-Policy that allows only this origin's scripts,
styles and connections. ``POST /ui/login`` takes ``{"token": ...}`` (JSON only, so a
cross-site form cannot log a browser in), checks it as the API would and sets two
cookies: ``sa_session`` (``HttpOnly``, ``SameSite=Strict``, ``Secure`` over HTTPS) and
``sa_csrf`` (readable by the page, which echoes it in ``X-CSRF-Token``). ``POST
/ui/logout`` ends the session. ``session_credential`` is what ``api._endpoint`` calls
when a request has no ``Authorization``: the session's token, or a 401 (the session is
gone) or 403 (a write without the CSRF token).
"""

from __future__ import annotations

import time
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from superagent.coordinator.api_access import token_access, whoami_doc
from superagent.coordinator.api_common import error, read_json
from superagent.coordinator.errors import CoordinatorError
from superagent.coordinator.host import ApiHost
from superagent.coordinator.policy import CLUSTER_READ
from superagent.coordinator.ui.sessions import LIFETIME, SessionStore, csrf_ok

SESSION_COOKIE, CSRF_COOKIE, CSRF_HEADER = "sa_session", "sa_csrf", "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD"})
STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain"}
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self';"
                               " img-src 'self' data:; connect-src 'self';"
                               " frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
    "x-frame-options": "DENY", "cache-control": "no-cache"}


def clock() -> float:
    return time.monotonic()


def _files() -> dict[str, tuple[bytes, str]]:
    return {p.name: (p.read_bytes(), TYPES[p.suffix]) for p in sorted(STATIC.iterdir())
            if p.is_file() and p.suffix in TYPES}


class Dashboard:
    """The dashboard of one coordinator: its files and its sessions."""

    def __init__(self, coordinator: ApiHost) -> None:
        self.coordinator = coordinator
        self.sessions = SessionStore()
        self.files = _files()

    # ------------------------------------------------------------------ pages
    async def root(self, request: Request) -> Response:
        return RedirectResponse("/ui/", status_code=308)

    async def page(self, request: Request) -> Response:
        name = request.path_params.get("name") or "index.html"
        found = self.files.get(name)
        if found is None:
            return error(404, "not_found", f"no dashboard file {name!r}")
        body, media = found
        return Response(body, media_type=media, headers=HEADERS)

    # ------------------------------------------------------------------ login, logout
    async def login(self, request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return error(415, "bad_request", "login takes a JSON body {\"token\": ...}")
        try:
            body = await read_json(request)
        except CoordinatorError as exc:
            return error(exc.status_hint, exc.code, str(exc))
        token = body.get("token")
        if not isinstance(token, str) or not token.strip():
            return error(400, "bad_request", "field 'token' must be an API token")
        token = token.strip()
        found = token_access(self.coordinator, token, CLUSTER_READ, {})
        if found is None:
            return error(401, "unauthorized", "unknown or revoked token")
        if isinstance(found, Response):  # expired
            return found
        session = self.sessions.create(token, clock())
        response = JSONResponse(whoami_doc(found), headers=HEADERS)
        secure = _https(request)
        response.set_cookie(SESSION_COOKIE, session.id, max_age=int(LIFETIME), path="/",
                            secure=secure, httponly=True, samesite="strict")
        response.set_cookie(CSRF_COOKIE, session.csrf, max_age=int(LIFETIME), path="/",
                            secure=secure, httponly=False, samesite="strict")
        return response

    async def logout(self, request: Request) -> Response:
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE), clock())
        if session is not None and not csrf_ok(session, request.headers.get(CSRF_HEADER)):
            return error(403, "csrf", "logout needs the session's X-CSRF-Token header")
        if session is not None:
            self.sessions.end(session.id)
        response = JSONResponse({"ok": True}, headers=HEADERS)
        for name in (SESSION_COOKIE, CSRF_COOKIE):
            response.delete_cookie(name, path="/", secure=_https(request),
                                   httponly=name == SESSION_COOKIE, samesite="strict")
        return response

    # ------------------------------------------------------------------ the API's check
    def session_credential(self, request: Request) -> str | Response | None:
        """The API token of the request's session; None without a session cookie; a 401
        when the session is unknown or over, a 403 for a write without its CSRF token."""
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id is None:
            return None
        session = self.sessions.get(session_id, clock())
        if session is None:
            return error(401, "session_expired", "the dashboard session is over (logged"
                         " out, expired, or unknown to this coordinator): log in again")
        if request.method not in SAFE_METHODS and not csrf_ok(
                session, request.headers.get(CSRF_HEADER)):
            return error(403, "csrf", "a write made with the session cookie needs the"
                         " session's X-CSRF-Token header")
        return session.token


def _https(request: Request) -> bool:
    return (request.url.scheme == "https"
            or request.headers.get("x-forwarded-proto", "").lower() == "https")
