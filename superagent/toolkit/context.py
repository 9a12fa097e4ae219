"""The current request id: one context variable, bound for the length of a request.

Theory of operation
-------------------
The proxy gives every request an ``X-Request-Id`` (the client's own when it sent a
well-formed one, else one it makes) and passes it to the app. The app's middleware
(``superagent.toolkit.middleware``) binds that id to ``REQUEST_ID`` for as long as the
request runs; everything that writes a line (``emit``, the logging handler) reads it
from there, so a line written anywhere below the handler carries the id without the id
being passed down by hand.

A ``contextvars.ContextVar`` is what keeps concurrent requests apart: asyncio tasks, trio
tasks and threads each see their own value, and a value set inside one request's task
never leaks into another's. ``bound(id)`` sets it and restores the previous value on the
way out.

An id that arrives in a header is used only when it has the proxy's shape (1 to 200
characters of ``A-Z a-z 0-9 . _ : @ / + = -``): anything else (a header injected by a
client that bypassed the proxy, say) is replaced by a fresh id, so a line never carries
text an attacker chose beyond that alphabet.

Standard library only, Python 3.8 syntax: this package runs inside apps.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar

HEADER = "X-Request-Id"
HEADER_LOWER = HEADER.lower()
WSGI_KEY = "HTTP_X_REQUEST_ID"  # how WSGI servers name the header in ``environ``
_WELL_FORMED = re.compile(r"[A-Za-z0-9._:@/+=\-]{1,200}")  # the proxy's own check

REQUEST_ID: ContextVar[str | None] = ContextVar("superagent_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being handled here, or None outside any request."""
    return REQUEST_ID.get()


def well_formed(value: object) -> bool:
    """True when ``value`` is a request id the proxy would pass on unchanged."""
    return isinstance(value, str) and _WELL_FORMED.fullmatch(value) is not None


def new_request_id() -> str:
    """A fresh id for a request that came without one (it did not pass the proxy)."""
    return os.urandom(10).hex()


def request_id_from(header: str | bytes | None) -> str:
    """The id a request carries in ``header`` when well formed, else a fresh one."""
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    if header is not None:
        header = header.strip()
    return header if header is not None and well_formed(header) else new_request_id()


@contextlib.contextmanager
def bound(request_id: str | None) -> Iterator[str | None]:
    """``request_id`` as the current id inside the block (for work outside a request
    that belongs to one: a background job, a message consumer)."""
    token = REQUEST_ID.set(request_id)
    try:
        yield request_id
    finally:
        REQUEST_ID.reset(token)
