"""Pure routing: split a request target, and map a normalised request to an app.

Precedence (one table per snapshot, never mutated):
  1. the listener's dedicated port -> its app, path untouched;
  2. the Host (or absolute-form target host) -> an app's host rule, path untouched;
  3. the longest path prefix, matched on whole segments, optionally stripped.
Anything else is ``None`` and the proxy answers 404 itself.

Normalisation (``superagent.httprules``) runs before matching and its result is what
goes upstream, so the app sees exactly the path the proxy routed, and a request cannot
climb out of the prefix it matched.
"""

from __future__ import annotations

from superagent.errors import HTTPSyntaxError
from superagent.httprules import normalize_host
from superagent.proxy.errors import ProtocolError
from superagent.proxy.snapshot import AppRoute, RoutingSnapshot


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
        try:
            host = normalize_host(authority)
        except HTTPSyntaxError as exc:
            raise ProtocolError(400, str(exc)) from None
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
