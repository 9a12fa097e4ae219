"""Tests for superagent/proxy/routes.py: target splitting, route precedence, and routing
of normalised paths (the normalisation itself: tests/test_httprules.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from superagent.httprules import normalize_path
from superagent.proxy.errors import ProtocolError
from superagent.proxy.routes import RouteTable, split_target
from superagent.proxy.snapshot import AppRoute, Instance, Listener, RoutingSnapshot

SHARED_PORT = 8080


def app(name: str, *, prefix: str | None = None, hosts: tuple[str, ...] = (),
        port: int | None = None, strip: bool = False) -> AppRoute:
    """An app with one instance and the given rules."""
    return AppRoute(name=name, instances=(Instance(id=f"{name}-1", host="127.0.0.1", port=9000),),
                    prefix=prefix, hosts=hosts, port=port, strip_prefix=strip)


def table(*apps: AppRoute) -> RouteTable:
    """A RouteTable with one shared listener plus the apps' dedicated ports."""
    listeners = [Listener(host="0.0.0.0", port=SHARED_PORT)]
    listeners += [Listener(host="0.0.0.0", port=a.port, app=a.name) for a in apps if a.port]
    return RouteTable(RoutingSnapshot(version=3, listeners=tuple(listeners), apps=apps))


def routed(rt: RouteTable, path: str, *, host: str | None = None, port: int = SHARED_PORT,
           query: str = "") -> tuple[str, str] | None:
    """(app name, upstream target) for a request, or None."""
    m = rt.resolve(port, host, path, query)
    return None if m is None else (m.app.name, m.target)


# ----------------------------------------------------------------------------- split_target

@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/", (None, "/", "")),
        ("/a/b?x=1&y=2", (None, "/a/b", "?x=1&y=2")),
        ("/a?", (None, "/a", "?")),
        ("/a?b?c", (None, "/a", "?b?c")),
        ("http://Example.com/x?y=1", ("example.com", "/x", "?y=1")),
        ("HTTP://example.com:8080/x", ("example.com", "/x", "")),
        ("https://example.com", ("example.com", "/", "")),
        ("http://example.com?q=1", ("example.com", "/", "?q=1")),
        ("http://[::1]:8080/p", ("[::1]", "/p", "")),
        ("http://example.com/a/@b", ("example.com", "/a/@b", "")),
    ],
)
def test_split_target_forms(target: str, expected: tuple[str | None, str, str]) -> None:
    """Origin-form and absolute-form targets split into host, path and query."""
    assert split_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "http://user@example.com/",
        "http://user:pw@example.com/a",
        "http://example.com@evil.com/",
        "/a#frag",
        "/a?b#frag",
        "http://example.com/a#f",
        "ftp://example.com/",
        "example.com/a",
        "*",
        "http:///a",
        "http://exa mple.com/",
    ],
)
def test_split_target_refusals(target: str) -> None:
    """Userinfo, fragments, other schemes and other forms are a 400 protocol error."""
    with pytest.raises(ProtocolError) as info:
        split_target(target)
    assert info.value.status == 400


def test_split_target_userinfo_message() -> None:
    """The userinfo refusal says why."""
    with pytest.raises(ProtocolError, match="userinfo"):
        split_target("http://a@b/")


def test_split_target_fragment_message() -> None:
    """The fragment refusal says why."""
    with pytest.raises(ProtocolError, match="fragment"):
        split_target("/x#y")


# ----------------------------------------------------------------------------- RouteTable

def test_dedicated_port_beats_host_and_prefix() -> None:
    """A request on an app's dedicated port goes to that app whatever its host and path."""
    rt = table(app("ded", port=9001), app("byhost", hosts=("example.com",)),
               app("byprefix", prefix="/x"))
    assert routed(rt, "/x/y", host="example.com", port=9001, query="?q") == ("ded", "/x/y?q")
    assert rt.dedicated_app(9001) is not None
    assert rt.dedicated_app(SHARED_PORT) is None


def test_host_rule_beats_prefix() -> None:
    """A host rule wins over a matching prefix and the path goes upstream untouched."""
    rt = table(app("byhost", hosts=("example.com",)), app("byprefix", prefix="/x", strip=True))
    assert routed(rt, "/x/y", host="example.com", query="?a=1") == ("byhost", "/x/y?a=1")
    assert routed(rt, "/x/y", host="other.com") == ("byprefix", "/y")
    assert routed(rt, "/x/y") == ("byprefix", "/y")


def test_wildcard_hosts_longest_suffix_wins() -> None:
    """"*.example.com" matches subdomains only; the longest wildcard suffix wins."""
    rt = table(app("wide", hosts=("*.example.com",)), app("narrow", hosts=("*.a.example.com",)),
               app("exact", hosts=("b.a.example.com",)), app("root", prefix="/"))
    assert routed(rt, "/p", host="x.example.com") == ("wide", "/p")
    assert routed(rt, "/p", host="x.y.example.com") == ("wide", "/p")
    assert routed(rt, "/p", host="x.a.example.com") == ("narrow", "/p")
    assert routed(rt, "/p", host="a.example.com") == ("wide", "/p")
    assert routed(rt, "/p", host="b.a.example.com") == ("exact", "/p")
    # The bare domain and look-alike domains are not covered by the wildcard.
    assert routed(rt, "/p", host="example.com") == ("root", "/p")
    assert routed(rt, "/p", host="evilexample.com") == ("root", "/p")
    assert routed(rt, "/p", host="example.com.evil") == ("root", "/p")


def test_wildcard_order_does_not_depend_on_app_order() -> None:
    """The longest wildcard wins whichever app is declared first."""
    rt = table(app("narrow", hosts=("*.a.example.com",)), app("wide", hosts=("*.example.com",)))
    assert routed(rt, "/", host="x.a.example.com") == ("narrow", "/")
    assert routed(rt, "/", host="x.b.example.com") == ("wide", "/")


def test_longest_prefix_on_segment_boundaries() -> None:
    """The longest prefix matching whole segments wins; "/hello" never matches "/helloworld"."""
    rt = table(app("hello", prefix="/hello"), app("hw", prefix="/hello/world"),
               app("api", prefix="/api/v1"))
    assert routed(rt, "/hello") == ("hello", "/hello")
    assert routed(rt, "/hello/") == ("hello", "/hello/")
    assert routed(rt, "/hello/x") == ("hello", "/hello/x")
    assert routed(rt, "/hello/world") == ("hw", "/hello/world")
    assert routed(rt, "/hello/world/x/y") == ("hw", "/hello/world/x/y")
    assert routed(rt, "/hello/worldwide") == ("hello", "/hello/worldwide")
    assert routed(rt, "/helloworld") is None
    assert routed(rt, "/hell") is None
    assert routed(rt, "/api") is None
    assert routed(rt, "/api/v10") is None
    assert routed(rt, "/api/v1/users", query="?page=2") == ("api", "/api/v1/users?page=2")
    assert routed(rt, "/") is None


def test_root_prefix_catches_the_rest() -> None:
    """A "/" prefix matches everything that no longer prefix matches."""
    rt = table(app("root", prefix="/", strip=True), app("hello", prefix="/hello"))
    assert routed(rt, "/helloworld") == ("root", "/helloworld")
    assert routed(rt, "/") == ("root", "/")
    assert routed(rt, "/hello/a") == ("hello", "/hello/a")


@pytest.mark.parametrize(
    ("path", "query", "target"),
    [
        ("/hello", "", "/"),
        ("/hello/", "", "/"),
        ("/hello/x/y", "?q=1", "/x/y?q=1"),
        ("/hello", "?q", "/?q"),
        ("/hello/x/", "", "/x/"),
    ],
)
def test_strip_prefix(path: str, query: str, target: str) -> None:
    """With strip_prefix the matched prefix is removed and the rest keeps a leading slash."""
    rt = table(app("hello", prefix="/hello", strip=True))
    assert routed(rt, path, query=query) == ("hello", target)


def test_only_a_stripped_prefix_is_reported() -> None:
    """The match names the prefix it stripped (for X-Forwarded-Prefix), and only that."""
    rt = table(app("hello", prefix="/hello", strip=True), app("kept", prefix="/kept"),
               app("root", prefix="/", strip=True), app("h", hosts=("h.example.com",)))
    resolve = rt.resolve
    assert resolve(80, None, "/hello/x", "").stripped == "/hello"
    assert resolve(80, None, "/kept/x", "").stripped == ""
    assert resolve(80, None, "/other", "").stripped == ""
    assert resolve(80, "h.example.com", "/hello/x", "").stripped == ""


def test_unknown_requests_route_nowhere() -> None:
    """Unknown hosts, ports and paths give None (the proxy answers 404)."""
    rt = table(app("a", prefix="/a"), app("h", hosts=("h.example.com",)), app("p", port=9005))
    assert routed(rt, "/b", host="nope.example.com") is None
    assert routed(rt, "/b", port=1234) is None
    assert table().resolve(SHARED_PORT, "x", "/", "") is None


def test_route_table_repr_and_version() -> None:
    """The repr summarises the table for logs."""
    rt = table(app("a", prefix="/a"), app("b", hosts=("b.com", "*.c.com")), app("p", port=9005))
    assert rt.version == 3
    assert set(rt.apps) == {"a", "b", "p"}
    assert repr(rt) == "<RouteTable v3 apps=3 ports=[9005] hosts=2 prefixes=['/a']>"


# ----------------------------------------------------------------------------- properties

PREFIX_APPS = {"/": "root", "/a": "a", "/b": "b", "/a/b": "ab", "/hello": "hello"}
PROP_TABLE = table(*(app(name, prefix=prefix) for prefix, name in PREFIX_APPS.items()))
UNRESERVED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
SEGMENTS = ["", ".", "..", "%2e", "%2E", "%2e%2E", "%2E%2e", ".%2e", "%2e.", "%2F", "%2f",
            "%5c", "%5C", "a", "b", "A", "hello", "helloworld", "a%2Fb", "..%2F", "%2F..",
            "%5c..", "%2e%2e%2f", "%61", "%62", "h%65llo", "x"]


def reference_normalize(path: str, merge: bool = False) -> str:
    """RFC 3986 remove_dot_segments after decoding unreserved escapes (``merge``: empty
    segments folded too)."""
    def decode(m: re.Match[str]) -> str:
        ch = chr(int(m.group(1), 16))
        return ch if ch in UNRESERVED else "%" + m.group(1).upper()

    parts = re.sub(r"%([0-9A-Fa-f]{2})", decode, path).split("/")[1:]
    out: list[str] = []
    for i, seg in enumerate(parts):
        if seg == "..":
            if out:
                out.pop()
        elif seg != "." and (seg or not merge):
            out.append(seg)
            continue
        if i == len(parts) - 1:
            out.append("")
    return "/" + "/".join(out)


def expected_app(normalized: str) -> str:
    """The app whose prefix is the longest segment-wise prefix of ``normalized``."""
    segs = normalized.split("/")[1:]  # an empty segment is a segment (no merge_slashes)
    best, best_len = PREFIX_APPS["/"], 0
    for prefix, name in PREFIX_APPS.items():
        psegs = [s for s in prefix.split("/") if s]
        if len(psegs) > best_len and segs[: len(psegs)] == psegs:
            best, best_len = name, len(psegs)
    return best


paths = st.builds(
    lambda segs, trailing: "/" + "/".join(segs) + ("/" if trailing else ""),
    st.lists(st.sampled_from(SEGMENTS), max_size=8),
    st.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(paths, st.booleans())
def test_normalize_path_properties(path: str, merge: bool) -> None:
    """Normalisation is idempotent, matches RFC 3986 dot removal, and leaves no dot segments
    (nor, with merge_slashes, empty ones)."""
    n = normalize_path(path, merge)
    assert normalize_path(n, merge) == n
    assert n == reference_normalize(path, merge)
    segs = n.split("/")[1:]
    assert all(s not in (".", "..") for s in segs)
    if merge:
        assert all(segs[:-1]), f"empty segment inside {n!r}"
    assert re.search(r"%2[eE]|%2f|%5c", n) is None  # dots decoded, other escapes upper-case


@settings(max_examples=400, deadline=None)
@given(paths)
def test_routing_follows_the_normalised_path_segment_wise(path: str) -> None:
    """The route is the longest prefix that the normalised path really starts with."""
    n = normalize_path(path)
    m = PROP_TABLE.resolve(SHARED_PORT, None, n, "")
    assert m is not None
    assert m.app.name == expected_app(n), (path, n)
    assert m.target == n


@settings(max_examples=400, deadline=None)
@given(paths)
def test_encoded_separators_never_change_the_route(path: str) -> None:
    """An encoded '/' or '\\' routes like any ordinary character: it is never a separator."""
    plain = re.sub(r"%(2[fF]|5[cC])", "Q", path)
    routed_encoded = PROP_TABLE.resolve(SHARED_PORT, None, normalize_path(path), "")
    routed_plain = PROP_TABLE.resolve(SHARED_PORT, None, normalize_path(plain), "")
    assert routed_encoded is not None and routed_plain is not None
    assert routed_encoded.app.name == routed_plain.app.name, (path, plain)


@pytest.mark.parametrize(
    ("raw", "app_name", "target"),
    [
        ("/a%2Fb/x", "root", "/a%2Fb/x"),  # "a%2Fb" is one segment: neither "a" nor "a/b"
        ("/a/..%2Fb/x", "a", "/a/..%2Fb/x"),
        ("/a/%2e%2e/b/x", "b", "/b/x"),
        ("/hello/%2e%2e%2fa/b", "hello", "/hello/..%2Fa/b"),
        ("/hello%5c..%5cb", "root", "/hello%5C..%5Cb"),
        ("/b/%2E%2E/a/%2e/b", "ab", "/a/b"),
    ],
)
def test_encoded_traversal_examples(raw: str, app_name: str, target: str) -> None:
    """Worked examples: the app is chosen by, and receives, the same normalised path."""
    n = normalize_path(raw)
    m = PROP_TABLE.resolve(SHARED_PORT, None, n, "")
    assert m is not None
    assert m.target == target
    assert m.app.name == app_name
