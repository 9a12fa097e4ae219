"""HTTP request rules the proxy enforces and the manifest is checked against.

The proxy normalises every request's path and host before it routes, and sends the
normalised path upstream, so the app sees exactly the path the proxy routed:
unreserved percent-escapes are decoded (``%2E`` is a dot, so ``%2E%2E`` is a dot
segment and is removed), other escapes are upper-cased but stay encoded (``%2F`` and
``%5C`` never act as separators), and dot segments are removed. These are RFC 3986
equivalences, so proxy and app agree on what the path names. Repeated slashes are not
one (``/a//b`` is another resource than ``/a/b``, and folding them would move a
request from the app at ``/a`` to the app at ``/a/b``): they are kept unless the caller
asks for ``merge_slashes``. A request cannot climb out of the prefix it matched.
``suspicious_path`` finds what ``path_policy = "reject"`` refuses: dot segments and
encoded ``.``, ``/`` or backslash, which browsers never send. Route rules
(a manifest's ``[routes]``, the standalone proxy's config) go through the same
functions, so a rule is written in the form requests are compared in.

``DEFAULT_MAX_BODY`` is the request body limit of an app that sets none, in the
manifest and in the proxy alike; ``DEFAULT_MIN_BODY_RATE`` the slowest a streamed
request body may arrive, and ``DEFAULT_UPGRADES`` the Upgrade protocols tunnelled to an
app.

Upgrades. A tunnel carries the client's later bytes past routing and the forwarding
headers, so what may be tunnelled is decided here, once for the manifest, the proxy's
config and every request: ``upgrade_protocol`` checks a name an app allows (never h2c:
HTTP/2 over cleartext would carry requests the proxy never sees, and the proxy speaks
HTTP/1.1, so ``H2C_HEADERS`` are never forwarded either); ``allowed_upgrade`` keeps
the part of a request's ``Upgrade`` offer its app allows, and ``switch_allowed`` accepts
an upstream's 101 only for a protocol that was offered. Anything else is refused
rather than tunnelled.

This module is part of the proxy's hot path (``normalize_path`` runs per request):
``scripts/compile-proxy`` compiles it with mypyc in the proxy's group, so it imports
nothing but the core errors, and the error it raises has no interpreted ``__init__``.
"""

from __future__ import annotations

import re
from typing import Final

from superagent.errors import HTTPSyntaxError

DEFAULT_MAX_BODY: Final = 10 * 1024 * 1024  # a request body limit that fits APIs and form uploads
DEFAULT_MIN_BODY_RATE: Final = 1024  # bytes/s: far below any real client, far above a drip
DEFAULT_UPGRADES: Final = ("websocket",)
NEVER_TUNNELLED: Final = "h2c"
H2C_HEADERS: Final = frozenset({b"http2-settings"})  # the h2c upgrade's own request header
_PROTOCOL_OK = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+(?:/[a-z0-9!#$%&'*+.^_`|~-]+)?")

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Characters a path may hold as they are (RFC 3986 pchar plus "/"); anything else is refused.
_PATH_OK = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
_HOST_OK = re.compile(r"(?:[a-z0-9\-._~!$&'()*+,;=%]+|\[[0-9a-f:.]+\])")


def normalize_path(path: str, merge_slashes: bool = False) -> str:
    """The canonical form of an origin-form path (no query); raises HTTPSyntaxError if invalid.

    ``merge_slashes`` also folds repeated slashes (``/a//b`` -> ``/a/b``)."""
    if not path.startswith("/"):
        raise HTTPSyntaxError("request target must start with '/'")
    if "%" not in path and "/." not in path and not (merge_slashes and "//" in path):
        if _PATH_OK.fullmatch(path) is None:
            raise HTTPSyntaxError("invalid character in request path")
        return path
    if _PATH_OK.fullmatch(path) is None:
        raise HTTPSyntaxError("invalid character in request path")
    if "%" in path:
        path = _decode_unreserved(path)
    segments: list[str] = []
    parts = path.split("/")
    for part in parts[1:-1]:
        if part == "." or (merge_slashes and not part):
            continue
        if part == "..":
            if segments:
                segments.pop()
            continue
        segments.append(part)
    last = parts[-1]
    if last == "..":
        if segments:
            segments.pop()
        last = ""
    elif last == ".":
        last = ""
    segments.append(last)
    return "/" + "/".join(segments)


_SUSPICIOUS_ESCAPES: Final = ("%2e", "%2f", "%5c")


def suspicious_path(path: str) -> bool:
    """True when the raw ``path`` holds a dot segment or an encoded ``.``, ``/`` or ``\\``."""
    if "%" in path:
        lowered = path.lower()
        for escape in _SUSPICIOUS_ESCAPES:
            if escape in lowered:
                return True
    if "/." not in path:
        return False
    return any(part == "." or part == ".." for part in path.split("/"))


def upgrade_protocol(value: str) -> str:
    """The lower-case form of an Upgrade protocol an app allows; raises HTTPSyntaxError."""
    name = value.strip().lower()
    if _PROTOCOL_OK.fullmatch(name) is None:
        raise HTTPSyntaxError(f"not a protocol name: {value!r}")
    if name.split("/")[0] == NEVER_TUNNELLED:
        raise HTTPSyntaxError("h2c cannot be tunnelled (the proxy speaks HTTP/1.1)")
    return name


def allowed_upgrade(offer: bytes, allowed: tuple[str, ...]) -> bytes | None:
    """The part of a request's ``Upgrade`` offer the app allows (protocol names,
    case-insensitive, a ``/version`` kept), or None when nothing is left."""
    kept = []
    for item in offer.split(b","):
        protocol = item.strip()
        name = protocol.split(b"/")[0].lower().decode("latin-1")
        if name and name != NEVER_TUNNELLED and name in allowed:
            kept.append(protocol)
    return b", ".join(kept) if kept else None


def switch_allowed(headers: list[tuple[bytes, bytes]], offer: bytes | None) -> bool:
    """True when a 101 with these response ``headers`` switches to a protocol that was
    offered (``offer``: what ``allowed_upgrade`` left of the request's)."""
    if offer is None:
        return False
    offered = {item.strip().split(b"/")[0].lower() for item in offer.split(b",")}
    chosen = [v for n, v in headers if n.lower() == b"upgrade"]
    if len(chosen) != 1:
        return False
    return chosen[0].strip().split(b"/")[0].lower() in offered


def _decode_unreserved(path: str) -> str:
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        ch = path[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        pair = path[i + 1 : i + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise HTTPSyntaxError("invalid percent-escape in request path")
        decoded = chr(int(pair, 16))
        out.append(decoded if decoded in _UNRESERVED else "%" + pair.upper())
        i += 3
    return "".join(out)


def normalize_host(value: str) -> str:
    """Lower-case host without port or trailing dot; raises HTTPSyntaxError if malformed."""
    host = value.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise HTTPSyntaxError("malformed Host header")
        rest = host[end + 1 :]
        host = host[: end + 1]
    else:
        host, sep, rest = host.partition(":")
        rest = sep + rest
    if rest and (not rest.startswith(":") or not rest[1:].isdigit()) and rest != ":":
        raise HTTPSyntaxError("malformed port in Host header")
    host = host.rstrip(".")
    if not host or _HOST_OK.fullmatch(host) is None:
        raise HTTPSyntaxError("malformed Host header")
    return host
