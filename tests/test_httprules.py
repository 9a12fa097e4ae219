"""Tests for superagent/httprules.py: the normal form of request paths and hosts.

How the proxy answers a malformed one (400, connection closed) is in tests/proxy/test_http1.py.
"""

from __future__ import annotations

import pytest

from superagent.errors import HTTPSyntaxError
from superagent.httprules import normalize_host, normalize_path, suspicious_path

# ----------------------------------------------------------------------------- normalize_path

@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a/b/", "/a/b/"),
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/../a", "/a"),
        ("/../../", "/"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a/..", "/"),
        ("/.", "/"),
        ("/..", "/"),
        ("/a//b", "/a//b"),
        ("//a///b//", "//a///b//"),
        ("//", "//"),
        ("/a//../b", "/a/b"),
        ("/a/.../b", "/a/.../b"),
        ("/a/..b/c.", "/a/..b/c."),
    ],
)
def test_normalize_path_dot_segments_and_slashes(raw: str, expected: str) -> None:
    """Dot segments are removed (RFC 3986 5.2.4), repeated slashes kept, a trailing slash
    kept."""
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("/a//b", "/a/b"), ("//a///b//", "/a/b/"), ("//", "/"), ("/a//./b", "/a/b")],
)
def test_normalize_path_merges_slashes_on_request(raw: str, expected: str) -> None:
    """``merge_slashes`` folds repeated slashes as well."""
    assert normalize_path(raw, merge_slashes=True) == expected


@pytest.mark.parametrize(
    ("raw", "suspicious"),
    [("/a/b", False), ("/a/.b/c.", False), ("/a%41", False), ("/a/./b", True),
     ("/a/../b", True), ("/..", True), ("/a/%2e/b", True), ("/a%2Fb", True),
     ("/a%5cb", True), ("/x.%2E", True)],
)
def test_suspicious_path(raw: str, suspicious: bool) -> None:
    """What ``path_policy = "reject"`` refuses: dot segments, encoded '.', '/', '\\'."""
    assert suspicious_path(raw) is suspicious


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/%41%62c", "/Abc"),
        ("/%7e%2D%5f", "/~-_"),
        ("/a/%2E/b", "/a/b"),
        ("/a/%2e%2E/b", "/b"),
        ("/a/.%2e/b", "/b"),
        ("/a/%2E%2E", "/"),
        ("/a/b/%2e%2e/", "/a/"),
        ("/a%2fb", "/a%2Fb"),
        ("/a%2Fb", "/a%2Fb"),
        ("/a%5cb", "/a%5Cb"),
        ("/a/%2f../b", "/a/%2F../b"),
        ("/a/..%2f..%2Fb", "/a/..%2F..%2Fb"),
        ("/%20x%3f", "/%20x%3F"),
        ("/%25", "/%25"),
        ("/%2541", "/%2541"),
    ],
)
def test_normalize_path_percent_escapes(raw: str, expected: str) -> None:
    """Unreserved escapes are decoded (so %2E%2E is ".."), others upper-cased and kept."""
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("raw", ["/%", "/a%2", "/%zz", "/%g1", "/%2", "/a/%%41", "/%2x/"])
def test_normalize_path_invalid_escape_is_refused(raw: str) -> None:
    """A truncated or non-hex percent-escape is an HTTPSyntaxError."""
    with pytest.raises(HTTPSyntaxError, match="percent-escape"):
        normalize_path(raw)


@pytest.mark.parametrize("raw", ["", "a/b", "*", "/a b", "/a\x00", "/caf\u00e9", "/a\"b",
                                 "/a<b>", "/a\\b", "/a/./b c"])
def test_normalize_path_invalid_characters_are_refused(raw: str) -> None:
    """Targets not starting with '/' or holding characters outside pchar are refused."""
    with pytest.raises(HTTPSyntaxError):
        normalize_path(raw)


# ----------------------------------------------------------------------------- normalize_host

@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("example.com:8080", "example.com"),
        ("EXAMPLE.com.:443", "example.com"),
        ("example.com:", "example.com"),
        ("[::1]:", "[::1]"),
        (" example.com ", "example.com"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]", "[::1]"),
        ("[::1]:8443", "[::1]"),
        ("[2001:DB8::1]", "[2001:db8::1]"),
        ("localhost", "localhost"),
    ],
)
def test_normalize_host_valid(raw: str, expected: str) -> None:
    """Hosts are lower-cased, lose their port and trailing dot; IPv6 literals keep brackets."""
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", ".", ":80", "exa mple.com", "example.com:http", "example.com:80:81", "a:b:c", "[::1",
     "[::1]x", "[::1]:8o", "[zz::1]", "ex/ample", "ex@ample", "[]", "example.com:-1"],
)
def test_normalize_host_malformed_is_refused(raw: str) -> None:
    """Malformed hosts and ports are an HTTPSyntaxError."""
    with pytest.raises(HTTPSyntaxError):
        normalize_host(raw)
