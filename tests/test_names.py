"""Tests for superagent/names.py: the name rules every role shares."""

from __future__ import annotations

import pytest

from superagent.names import ENV_KEY, is_app_name, is_sha256


@pytest.mark.parametrize("name", ["a", "hello", "shop-2", "0x", "a" * 40])
def test_app_names_accepted(name: str) -> None:
    """Lower-case letters, digits and '-', starting with a letter or digit, up to 40."""
    assert is_app_name(name)


@pytest.mark.parametrize("name", ["", "-a", "Hello", "a_b", "a.b", "a" * 41, "a\n", "caf\u00e9"])
def test_app_names_refused(name: str) -> None:
    """Anything that would not fit a Unix user or cgroup name is refused, even with a newline."""
    assert not is_app_name(name)


def test_sha256_is_64_lowercase_hex() -> None:
    """Digests are written lowercase; upper case, short and padded forms are refused."""
    digest = "0123456789abcdef" * 4
    assert is_sha256(digest)
    for bad in (digest.upper(), digest[:-1], digest + "0", digest + "\n", ""):
        assert not is_sha256(bad)


def test_env_key_is_a_shell_variable_name() -> None:
    """Letters, digits and '_', not starting with a digit."""
    assert ENV_KEY.fullmatch("GREETING_2")
    assert not ENV_KEY.fullmatch("2X")
    assert not ENV_KEY.fullmatch("A-B")
