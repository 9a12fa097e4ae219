"""The coordinator API's OpenAPI 3.1 document, built from the route table (``api.ROUTES``).

Each route's ``auth`` becomes its security requirement (an API token, the coordinators'
secret, a participant's machine credential, a token or a credential, a join token, or
none) and its ``permission`` an ``x-permission`` extension with the 403 a
token without it gets, so a client can tell what a token needs before it calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from superagent import __version__


def openapi_document(routes: Sequence[Any]) -> dict[str, Any]:
    """The document of ``routes`` (``api.ROUTES``: method, path, auth, permission,
    summary, handler, success status, body schema)."""
    paths: dict[str, dict[str, Any]] = {}
    for e in routes:
        op: dict[str, Any] = {
            "summary": e.summary, "operationId": e.handler.__name__,
            "responses": {str(e.status): {"description": "OK" if e.status == 200
                                          else "Accepted" if e.status == 202 else "Created"},
                          "default": {"description": "Error: {error, detail}"}},
        }
        if e.body is not None:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": e.body}}}
        params = [p.strip("{}") for p in e.path.split("/") if p.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True,
                                 "schema": {"type": "string"}} for p in params]
        if e.auth != "none":
            op["security"] = ([{"token": []}, {"node": []}] if e.auth == "any"
                              else [{e.auth: []}])
            op["responses"]["401"] = {"description": "Missing or invalid credentials"}
        if e.permission:
            op["x-permission"] = e.permission
            op["responses"]["403"] = {"description": f"The token lacks {e.permission}"
                                                     " (role or team)"}
        paths.setdefault(e.path, {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "superagent coordinator API", "version": __version__},
        "paths": paths,
        "components": {"securitySchemes": {
            "token": {"type": "http", "scheme": "bearer",
                      "description": "An API token (the admin token is shown at cluster init)"},
            "secret": {"type": "http", "scheme": "bearer",
                       "description": "The coordinators' secret (peer coordinators only)"},
            "node": {"type": "http", "scheme": "bearer",
                     "description": "A participant's machine credential"},
            "join": {"type": "http", "scheme": "bearer",
                     "description": "A join token (superagent nodes join-token)"}}},
    }
