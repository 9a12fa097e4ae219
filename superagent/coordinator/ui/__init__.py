"""The dashboard every coordinator serves at ``/ui``: static files and a cookie session.

Theory of operation: the dashboard is a handful of static files (``static/``: plain
JavaScript modules, no build step, nothing fetched from elsewhere) that call the public
API under ``/api/v1`` like any other client; it shows and does nothing the API and the
CLI cannot. The only server-side part is the session (``sessions``, ``web``): the
browser logs in with an API token, gets an ``HttpOnly`` cookie naming a session that
holds the token in this coordinator's memory, and every API route accepts that cookie
in place of ``Authorization: Bearer`` — with the same token checks, so a revoked or
expired token ends the session's access at once. Writes made with the cookie must also
carry the session's CSRF token in ``X-CSRF-Token`` (double submit: the page reads it
from a second, script-readable cookie; a cross-site form can neither read nor send it).
"""
