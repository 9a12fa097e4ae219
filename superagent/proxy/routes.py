"""Pure routing: normalise a request's host and path, and map it to an app.

Precedence (one table per snapshot, never mutated):
  1. the listener's dedicated port -> its app, path untouched;
  2. the Host (or absolute-form target host) -> an app's host rule, path untouched;
  3. the longest path prefix, matched on whole segments, optionally stripped.
Anything else is ``None`` and the proxy answers 404 itself.

Normalisation runs before matching and its result is what goes upstream, so the
app sees exactly the path the proxy routed: unreserved percent-escapes are
decoded (``%2E`` is a dot, so ``%2E%2E`` is a dot segment and is removed), other
escapes are upper-cased but stay encoded (``%2F`` and ``%5C`` never act as
separators), dot segments are removed and duplicate slashes folded. A request
therefore cannot climb out of the prefix it matched.
"""

from __future__ import annotations

import re

from superagent.proxy.errors import ProtocolError
from superagent.proxy.snapshot import AppRoute, RoutingSnapshot

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Characters a path may hold as they are (RFC 3986 pchar plus "/"); anything else is refused.
_PATH_OK = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
_HOST_OK = re.compile(r"(?:[a-z0-9\-._~!$&'()*+,;=%]+|\[[0-9a-f:.]+\])")


def normalize_path(path: str) -> str:
    """The canonical form of an origin-form path (no query); raises ProtocolError if invalid."""
    if not path.startswith("/"):
        raise ProtocolError(400, "request target must start with '/'")
    if "%" not in path and "//" not in path and "/." not in path:
        if _PATH_OK.fullmatch(path) is None:
            raise ProtocolError(400, "invalid character in request path")
        return path
    if _PATH_OK.fullmatch(path) is None:
        raise ProtocolError(400, "invalid character in request path")
    if "%" in path:
        path = _decode_unreserved(path)
    segments: list[str] = []
    parts = path.split("/")
    for part in parts[1:-1]:
        if part in ("", "."):
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
            raise ProtocolError(400, "invalid percent-escape in request path")
        decoded = chr(int(pair, 16))
        out.append(decoded if decoded in _UNRESERVED else "%" + pair.upper())
        i += 3
    return "".join(out)


def normalize_host(value: str) -> str:
    """Lower-case host without port or trailing dot; raises ProtocolError if malformed."""
    host = value.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise ProtocolError(400, "malformed Host header")
        rest = host[end + 1 :]
        host = host[: end + 1]
    else:
        host, sep, rest = host.partition(":")
        rest = sep + rest
    if rest and (not rest.startswith(":") or not rest[1:].isdigit()) and rest != ":":
        raise ProtocolError(400, "malformed port in Host header")
    host = host.rstrip(".")
    if not host or _HOST_OK.fullmatch(host) is None:
        raise ProtocolError(400, "malformed Host header")
    return host


def split_target(target: str) -> tuple[str | None, str, str]:
    """``(host_or_None, path, query)`` of an origin-form or absolute-form request target.

    The query keeps its leading ``?``. Raises ProtocolError for other forms.
    """
    host: str | None = None
    if not target.startswith("/"):
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            raise ProtocolError(400, "request target must be origin-form or absolute-form")
        authority_end = len(rest)
        for stop in "/?":
            pos = rest.find(stop)
            if 0 <= pos < authority_end:
                authority_end = pos
        authority = rest[:authority_end]
        if "@" in authority:
            raise ProtocolError(400, "userinfo is not allowed in the request target")
        host = normalize_host(authority)
        target = rest[authority_end:] or "/"
        if target.startswith("?"):
            target = "/" + target
    path, sep, query = target.partition("?")
    if "#" in path or "#" in query:
        raise ProtocolError(400, "fragment is not allowed in the request target")
    return host, path, sep + query


class Match:
    """Where a request goes: the app, the path (with query) to send upstream, and which
    rule matched ("port", "host" or "prefix"). Built once per request and never changed.

    A plain class rather than a frozen dataclass: the compiled hot path builds one per
    request, and a frozen dataclass's ``__init__`` stays interpreted.
    """

    __slots__ = ("app", "rule", "target")

    def __init__(self, app: AppRoute, target: str, rule: str) -> None:
        self.app = app
        self.target = target
        self.rule = rule

    def __repr__(self) -> str:
        return f"<Match {self.app.name} {self.target!r} by {self.rule}>"


class RouteTable:
    """An immutable lookup structure built from one ``RoutingSnapshot``."""

    __slots__ = ("_by_host", "_by_port", "_by_prefix", "_wildcards", "apps", "snapshot",
                 "version")

    def __init__(self, snapshot: RoutingSnapshot) -> None:
        self.snapshot = snapshot
        self.version = snapshot.version
        self.apps = {app.name: app for app in snapshot.apps}
        self._by_port: dict[int, AppRoute] = {}
        self._by_host: dict[str, AppRoute] = {}
        self._wildcards: list[tuple[str, AppRoute]] = []
        self._by_prefix: dict[str, AppRoute] = {}
        for app in snapshot.apps:
            if app.port is not None:
                self._by_port[app.port] = app
            for host in app.hosts:
                if host.startswith("*."):
                    self._wildcards.append((host[1:], app))
                else:
                    self._by_host[host] = app
            if app.prefix is not None:
                self._by_prefix[app.prefix] = app
        # Longest suffix first so "*.a.example.com" wins over "*.example.com".
        self._wildcards.sort(key=lambda item: -len(item[0]))

    def __repr__(self) -> str:
        return (f"<RouteTable v{self.version} apps={len(self.apps)} ports={sorted(self._by_port)}"
                f" hosts={len(self._by_host) + len(self._wildcards)}"
                f" prefixes={sorted(self._by_prefix)}>")

    def resolve(self, port: int, host: str | None, path: str, query: str) -> Match | None:
        """Route a request that arrived on ``port``; ``host`` and ``path`` already normalised."""
        app = self._by_port.get(port)
        if app is not None:
            return Match(app, path + query, "port")
        if host is not None:
            app = self._by_host.get(host)
            if app is None and self._wildcards:
                for suffix, candidate in self._wildcards:
                    if host.endswith(suffix):
                        app = candidate
                        break
            if app is not None:
                return Match(app, path + query, "host")
        prefixes = self._by_prefix
        if not prefixes:
            return None
        candidate_path = path
        while True:
            app = prefixes.get(candidate_path)
            if app is not None:
                return Match(app, _strip(app, candidate_path, path) + query, "prefix")
            if candidate_path == "/":
                return None
            cut = candidate_path.rfind("/")
            candidate_path = candidate_path[:cut] if cut > 0 else "/"

    def dedicated_app(self, port: int) -> AppRoute | None:
        return self._by_port.get(port)


def _strip(app: AppRoute, prefix: str, path: str) -> str:
    if not app.strip_prefix or prefix == "/":
        return path
    rest = path[len(prefix) :]
    return rest if rest.startswith("/") else "/" + rest
