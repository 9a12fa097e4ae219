"""superagent's app toolkit: debug events bound to the request id the proxy gave.

Theory of operation
-------------------
The proxy gives every request an ``X-Request-Id`` and, while a debug session is open,
records each request under that id; the participant captures each app's stdout and
stderr and files every line that is a JSON object under its ``request_id``. This package
is the app's side of that join:

- ``context``: the current request id, a context variable (``current_request_id``,
  ``bound``);
- ``middleware``: ASGI (``RequestIdMiddleware``) and WSGI (``WSGIRequestIdMiddleware``)
  middleware that bind each request's id while it runs and echo it on the response;
- ``lines``: ``emit(event, **fields)``, one bounded JSON line on stdout;
- ``logs``: a ``logging`` handler and formatter writing the same lines.

It imports nothing but the standard library and keeps to Python 3.8 syntax, and its
modules import each other relatively, so an app whose environment lacks superagent can
carry a copy as a package of its own (``python -m superagent.toolkit APP_DIR`` writes
``APP_DIR/superagent_toolkit/``) and import it from there. docs/toolkit.md has the
examples and the wire format.
"""

from __future__ import annotations

from .context import HEADER, bound, current_request_id, new_request_id, well_formed
from .lines import MAX_LINE, emit, encode, write_line
from .logs import JsonFormatter, JsonHandler, RequestIdFilter
from .middleware import RequestIdMiddleware, WSGIRequestIdMiddleware

__all__ = [
    "HEADER",
    "MAX_LINE",
    "JsonFormatter",
    "JsonHandler",
    "RequestIdFilter",
    "RequestIdMiddleware",
    "WSGIRequestIdMiddleware",
    "bound",
    "current_request_id",
    "emit",
    "encode",
    "new_request_id",
    "well_formed",
    "write_line",
]
