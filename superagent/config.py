"""Typed reading of TOML tables.

Every role's config is a frozen dataclass built from TOML through ``Table``:
it hands out typed values by key, remembers which keys were read, and
``Table.done()`` refuses any key nobody asked for. Every error names the file
and the dotted key, so "fix the file" is always actionable. ``parse_duration``,
``parse_size`` and ``parse_address`` read one value each, for ``Table`` and for
command-line options alike.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from superagent.errors import ConfigError

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"\s*(\d+)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_duration(value: object) -> float:
    """Seconds from ``"30s"``, ``"250ms"``, ``"5m"``, ``"1h"``, ``"0"`` or a number.

    Raises ValueError naming the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration like '30s', '250ms', '5m'")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a duration must be a finite number of seconds >= 0, got {value}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError(f"expected a duration like '30s', '250ms', '5m', got {value!r}")


def parse_size(value: object) -> int:
    """Bytes from ``"10M"``, ``"512K"``, ``"1GiB"``, ``"100"`` or an integer."""
    if isinstance(value, bool):
        raise ValueError("expected a size like '10M', '512K'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match:
            unit = (match.group(2) or "").upper().rstrip("B").rstrip("I") or ""
            return int(match.group(1)) * _SIZE_UNITS[unit or ""]
    raise ValueError(f"expected a size like '10M', '512K', '1G', got {value!r}")


def parse_address(value: str, *, source: str, key: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) into a tuple; raises ConfigError."""
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"expected 'host:port', got {value!r}", source=source, key=key)
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; unreadable or malformed files raise ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(path)) from exc
    return parse_toml(data, source=str(path))


def parse_toml(data: bytes, *, source: str) -> dict[str, Any]:
    """Parse TOML bytes; malformed input raises ConfigError naming ``source``."""
    path = source
    try:
        return tomllib.loads(data.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not valid TOML: not UTF-8 text (byte {exc.start})",
                          source=str(path)) from exc



_REQUIRED: Any = object()  # marks a key without default


class Table:
    """One TOML table being read into a dataclass; see the module docstring."""

    def __init__(self, data: object, *, source: str, path: str = "") -> None:
        if not isinstance(data, Mapping):
            raise ConfigError("expected a table", source=source, key=path)
        self._data: Mapping[str, Any] = data
        self._used: set[str] = set()
        self.source = source
        self.path = path

    def __repr__(self) -> str:
        return f"<Table {self.source}:{self.path or '<root>'} keys={sorted(self._data)}>"

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(message, source=self.source, key=self.key(name))

    def has(self, name: str) -> bool:
        return name in self._data

    def keys(self) -> list[str]:
        return list(self._data)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def _get(self, name: str, default: Any) -> Any:
        self._used.add(name)
        if name in self._data:
            return self._data[name]
        if default is _REQUIRED:
            near = difflib.get_close_matches(name, [k for k in self._data if k not in self._used],
                                             n=1)
            raise self.error(name, "is required" + (
                f"; found {self.key(near[0])!r}: a typo of {name!r}?" if near else ""))
        return default

    def text(self, name: str, default: Any = _REQUIRED, *, choices: tuple[str, ...] = ()) -> Any:
        value = self._get(name, default)
        if value is None and default is None:
            return None
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {type(value).__name__}")
        if choices and value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {value!r}")
        return value

    def integer(self, name: str, default: Any = _REQUIRED, *, minimum: int | None = None,
            maximum: int | None = None) -> Any:
        value = self._get(name, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(name, f"must be at most {maximum}, got {value}")
        return value

    def duration(self, name: str, default: float) -> float:
        value = self._get(name, default)
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.error(name, str(exc)) from None

    def size(self, name: str, default: int) -> int:
        value = self._get(name, default)
        try:
            return parse_size(value)
        except ValueError as exc:
            raise self.error(name, str(exc)) from None

    def str_list(self, name: str, default: list[str]) -> list[str]:
        value = self._get(name, default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, "expected a list of strings")
        return list(value)

    def table(self, name: str, *, required: bool = False) -> Table:
        value = self._get(name, _REQUIRED if required else {})
        return Table(value, source=self.source, path=self.key(name))

    def raw(self, name: str, default: Any = None) -> Any:
        return self._get(name, default)

    def done(self) -> None:
        """Refuse keys that were never read: they are typos or unsupported settings."""
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            near = difflib.get_close_matches(unknown[0], sorted(self._used - set(self._data)),
                                             n=1)
            raise self.error(unknown[0], "unknown key" + (
                f" (did you mean {self.key(near[0])!r}?)" if near else "") + (
                f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""))

