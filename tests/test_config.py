"""Tests for superagent/config.py: durations, sizes, addresses, typed TOML tables, file reading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from superagent.config import Table, parse_address, parse_duration, parse_size, read_toml
from superagent.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("250ms", 0.25),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("0", 0.0),
        ("12", 12.0),
        (" 2 s ", 2.0),
        (0, 0.0),
        (7, 7.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_valid(value: object, seconds: float) -> None:
    """Every documented duration form converts to seconds."""
    result = parse_duration(value)
    assert isinstance(result, float)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", ["", "s", "-1s", "1d", "1 sec", "1.s", "ten", "1e3", -1, -0.5, True, False, None,
              [1], {"s": 1}],
)
def test_parse_duration_invalid(value: object) -> None:
    """Malformed, negative and non-numeric durations raise ValueError."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_parse_duration_refuses_nan() -> None:
    """A NaN duration (TOML allows ``nan``) is refused rather than becoming a timeout."""
    with pytest.raises(ValueError):
        parse_duration(math.nan)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("100", 100),
        ("0", 0),
        ("1B", 1),
        ("512K", 512 * 1024),
        ("512k", 512 * 1024),
        ("1KB", 1024),
        ("1KiB", 1024),
        ("10M", 10 * 1024**2),
        ("10mb", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("2G", 2 * 1024**3),
        ("1T", 1024**4),
        (" 3 M ", 3 * 1024**2),
        (0, 0),
        (4096, 4096),
    ],
)
def test_parse_size_valid(value: object, size: int) -> None:
    """Every documented size form converts to bytes."""
    result = parse_size(value)
    assert isinstance(result, int)
    assert result == size


@pytest.mark.parametrize(
    "value", ["", "M", "1.5M", "-1", "10X", "1iB", "10 megabytes", -1, 1.5, True, None, ["1M"]],
)
def test_parse_size_invalid(value: object) -> None:
    """Malformed, fractional, negative and non-integer sizes raise ValueError."""
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


def test_table_reads_typed_values() -> None:
    """Typed getters return the file's values, or the defaults when keys are absent."""
    t = Table({"name": "x", "on": True, "n": 3, "d": "2s", "sz": "1K", "l": ["a", "b"]},
              source="f.toml")
    assert t.text("name") == "x"
    assert t.flag("on", False) is True
    assert t.integer("n", minimum=1, maximum=5) == 3
    assert t.duration("d", 1.0) == 2.0
    assert t.size("sz", 0) == 1024
    assert t.str_list("l", []) == ["a", "b"]
    assert t.text("missing", "dflt") == "dflt"
    assert t.integer("missing2", None) is None
    assert t.duration("missing3", 4.0) == 4.0
    t.done()


def test_table_str_list_accepts_single_string() -> None:
    """A single string where a list is expected becomes a one-element list."""
    t = Table({"l": "a"}, source="f.toml")
    assert t.str_list("l", []) == ["a"]


def test_unknown_key_is_rejected_with_dotted_key_and_file() -> None:
    """``done()`` names the file and the dotted path of a key nobody read."""
    root = Table({"proxy": {"listen": ["x"], "lisen": 1}}, source="/etc/sa/proxy.toml")
    proxy = root.table("proxy")
    proxy.str_list("listen", [])
    with pytest.raises(ConfigError) as info:
        proxy.done()
    assert info.value.source == "/etc/sa/proxy.toml"
    assert info.value.key == "proxy.lisen"
    assert "/etc/sa/proxy.toml" in str(info.value)
    assert "proxy.lisen" in str(info.value)
    assert "unknown key" in str(info.value)


def test_several_unknown_keys_are_all_listed() -> None:
    """With several unknown keys the first is the error's key and the others are mentioned."""
    t = Table({"b": 1, "a": 2, "c": 3}, source="f.toml", path="apps.x")
    with pytest.raises(ConfigError) as info:
        t.done()
    assert info.value.key == "apps.x.a"
    assert str(info.value) == "f.toml: apps.x.a: unknown key (also unknown: b, c)"


@pytest.mark.parametrize(
    ("getter", "value"),
    [
        (lambda t: t.text("k"), 5),
        (lambda t: t.flag("k", False), "yes"),
        (lambda t: t.integer("k"), "3"),
        (lambda t: t.integer("k"), True),
        (lambda t: t.integer("k"), 1.5),
        (lambda t: t.duration("k", 1.0), "soon"),
        (lambda t: t.size("k", 1), "huge"),
        (lambda t: t.str_list("k", []), [1, 2]),
        (lambda t: t.table("k"), [1]),
    ],
)
def test_type_errors_name_the_key(getter: object, value: object) -> None:
    """A value of the wrong type raises ConfigError naming file and dotted key."""
    t = Table({"k": value}, source="f.toml", path="sect")
    with pytest.raises(ConfigError) as info:
        getter(t)  # type: ignore[operator]
    assert info.value.key == "sect.k"
    assert info.value.source == "f.toml"
    assert str(info.value).startswith("f.toml: sect.k: ")


def test_integer_bounds_are_enforced() -> None:
    """Integers outside ``minimum``/``maximum`` are refused with the key named."""
    t = Table({"lo": 0, "hi": 11}, source="f.toml")
    with pytest.raises(ConfigError, match=r"lo: must be at least 1"):
        t.integer("lo", minimum=1)
    with pytest.raises(ConfigError, match="hi: must be at most 10"):
        t.integer("hi", maximum=10)


def test_text_choices_are_enforced() -> None:
    """A string outside ``choices`` is refused and the choices are listed."""
    t = Table({"parser": "fast"}, source="f.toml", path="proxy")
    with pytest.raises(ConfigError, match=r"proxy\.parser: must be one of httptools, h11"):
        t.text("parser", "httptools", choices=("httptools", "h11"))


@pytest.mark.parametrize(
    "getter",
    [lambda t: t.text("req"), lambda t: t.integer("req"), lambda t: t.table("req", required=True)],
)
def test_required_keys(getter: object) -> None:
    """A getter without a default raises ConfigError "is required" naming the key."""
    t = Table({}, source="f.toml", path="apps.web")
    with pytest.raises(ConfigError) as info:
        getter(t)  # type: ignore[operator]
    assert info.value.key == "apps.web.req"
    assert "is required" in str(info.value)


def test_nested_tables_build_dotted_keys() -> None:
    """Sub-tables extend the dotted path used in error messages."""
    root = Table({"apps": {"web": {"timeouts": {"connect": "x"}}}}, source="f.toml")
    timeouts = root.table("apps").table("web").table("timeouts")
    with pytest.raises(ConfigError) as info:
        timeouts.duration("connect", 5.0)
    assert info.value.key == "apps.web.timeouts.connect"


def test_non_mapping_table_is_refused() -> None:
    """Building a Table from something that is not a mapping raises ConfigError."""
    with pytest.raises(ConfigError) as info:
        Table([1, 2], source="f.toml", path="apps")
    assert info.value.key == "apps"
    assert "expected a table" in str(info.value)


def test_read_toml_reads_a_file(tmp_path: Path) -> None:
    """A valid file parses into a dict."""
    path = tmp_path / "ok.toml"
    path.write_text('[proxy]\nlisten = ["127.0.0.1:8080"]\n')
    assert read_toml(path) == {"proxy": {"listen": ["127.0.0.1:8080"]}}


def test_read_toml_missing_file_names_the_file(tmp_path: Path) -> None:
    """A missing file raises ConfigError naming the file."""
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        read_toml(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)


def test_read_toml_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """Malformed TOML raises ConfigError naming the file."""
    path = tmp_path / "bad.toml"
    path.write_text("[proxy\nlisten = \n")
    with pytest.raises(ConfigError) as info:
        read_toml(str(path))
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    assert "not valid TOML" in str(info.value)


def test_table_repr_names_source_and_path() -> None:
    """The repr shows file, path and keys for logs and assertions."""
    assert repr(Table({"b": 1, "a": 2}, source="f.toml", path="proxy")) == (
        "<Table f.toml:proxy keys=['a', 'b']>")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        (":8080", ("0.0.0.0", 8080)),
        ("[::1]:443", ("::1", 443)),
        ("[::]:1", ("::", 1)),
        ("example.com:65535", ("example.com", 65535)),
    ],
)
def test_parse_address_valid(value: str, expected: tuple[str, int]) -> None:
    """host:port and [v6]:port parse; an empty host means all interfaces."""
    assert parse_address(value, source="f", key="k") == expected


@pytest.mark.parametrize("value", ["", "host", "host:", "host:0", "host:65536", "host:x",
                                   "[::1]", "host:-1", "host: 80"])
def test_parse_address_invalid(value: str) -> None:
    """Addresses without a valid port raise ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        parse_address(value, source="f", key="proxy.listen")
    assert info.value.key == "proxy.listen"


def test_a_missing_key_names_its_near_miss() -> None:
    """`[run] comand = ...` says run.command is required and names run.comand as a typo."""
    run = Table({"comand": "python app.py"}, source="superagent.toml", path="run")
    with pytest.raises(ConfigError, match=r"run\.command: is required; found 'run\.comand': "
                                          r"a typo of 'command'"):
        run.text("command")
    far = Table({"x": 1}, source="superagent.toml", path="run")
    with pytest.raises(ConfigError) as caught:
        far.text("command")
    assert "typo" not in str(caught.value)


def test_an_unknown_key_names_the_known_key_it_resembles() -> None:
    """A misspelt optional key is refused with the key it was probably meant to be."""
    health = Table({"pathh": "/"}, source="superagent.toml", path="health")
    assert health.text("path", None) is None
    with pytest.raises(ConfigError, match=r"health.pathh: unknown key \(did you mean "
                                          r"'health.path'\?\)"):
        health.done()
