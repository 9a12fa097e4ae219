"""The one JSON codec: frozen keyword-only dataclasses to and from JSON-able documents.

Theory of operation. Everything that crosses a process boundary — Raft commands, the
deploy saga's records and events, the coordinator-participant RPC messages — is a frozen
keyword-only dataclass, encoded field by field into a plain ``dict`` and decoded back by
reading each field's annotation (``typing.get_type_hints``, so the string annotations of
``from __future__ import annotations`` work). A class that declares a non-empty
``type: ClassVar[str]`` is *tagged*: its documents carry ``"type": <tag>`` first.

Encoding is mechanical: enums become their values, tuples become lists, nested dataclasses
become documents (tagged if their class is), dict values are encoded in turn; anything
else must already be JSON-able. Field order follows the class, so the text produced for
Raft commands and deploy records is the same as before this module existed (the journals
of running clusters must still apply).

Decoding is strict: a document that is not an object, a field the class does not have, a
missing required field, or a value of the wrong type raises ``CodecError`` naming the field
by its path (``steps[1].node: expected str, got int``). Validation beyond types is the
class's own ``__post_init__``; whatever it raises goes through untouched. ``bool`` is never
taken for ``int``; an ``int`` is taken for ``float`` (JSON has one number type).

Supported annotations: ``str``, ``int``, ``float``, ``bool``, ``Any``, enums, ``Literal``,
``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``dict[str, X]`` and nested
dataclasses; anything else is a programming error (``TypeError`` at first use).

This module is the shared core: it imports no role package.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, TypeVar

from superagent.errors import CodecError

T = TypeVar("T")

TAG = "type"  # the key of a tagged class's documents


def canonical_json(doc: object) -> str:
    """Sorted, compact, NaN-free JSON: equal documents give equal text on every node."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def tag_of(cls: type) -> str:
    """The ``type`` tag a class declares (``""`` for an untagged class)."""
    tag = getattr(cls, TAG, "")
    return tag if isinstance(tag, str) and TAG not in _field_names(cls) else ""


# -- encoding --------------------------------------------------------------------------------

def encode(obj: Any, *, tagged: bool = True) -> dict[str, Any]:
    """``obj`` (a dataclass instance) as a JSON-able document, its tag first if it has one."""
    doc: dict[str, Any] = {}
    tag = tag_of(type(obj))
    if tagged and tag:
        doc[TAG] = tag
    for f in dataclasses.fields(obj):
        doc[f.name] = encode_value(getattr(obj, f.name))
    return doc


def encode_value(value: Any) -> Any:
    """One field's value in JSON-able form (see the module docstring)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [encode_value(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return encode(value)
    if isinstance(value, dict):
        return {k: encode_value(v) for k, v in value.items()}
    return value


# -- decoding --------------------------------------------------------------------------------

def decode(cls: type[T], doc: object, *, ignore_unknown: bool = False, path: str = "") -> T:
    """An instance of ``cls`` from ``doc``.

    Raises CodecError naming the field (with ``path`` as prefix) for a wrong shape, an
    unknown field (unless ``ignore_unknown``: a newer peer's optional additions), a missing
    required field or a wrong type; a ``type`` key must match the class's tag. Errors of
    the class's own ``__post_init__`` propagate unchanged.
    """
    if not isinstance(doc, Mapping):
        raise CodecError(f"expected an object, got {_json_type(doc)}", field=path)
    hints = _hints(cls)
    tag = tag_of(cls)
    for name in doc:
        if name == TAG and tag:
            if doc[name] != tag:
                raise CodecError(f"expected {tag!r}, got {doc[name]!r}", field=_at(path, TAG))
        elif name not in hints and not ignore_unknown:
            raise CodecError("unknown field", field=_at(path, str(name)))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        where = _at(path, f.name)
        if f.name in doc:
            values[f.name] = _convert(doc[f.name], hints[f.name], where, ignore_unknown)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise CodecError("missing", field=where)
    return cls(**values)


_HINTS: dict[type, dict[str, Any]] = {}  # resolved annotations, per class (they never change)


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        every = typing.get_type_hints(cls)
        hints = _HINTS[cls] = {f.name: every[f.name] for f in dataclasses.fields(cls)}
    return hints


@cache
def _field_names(cls: type) -> frozenset[str]:
    if not dataclasses.is_dataclass(cls):
        return frozenset()
    return frozenset(f.name for f in dataclasses.fields(cls))


def _at(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


_JSON_NAMES = {str: "str", int: "int", float: "float", bool: "bool", list: "list",
               tuple: "list", dict: "object", type(None): "null"}


def _json_type(value: object) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _convert(value: object, kind: Any, where: str, ignore_unknown: bool) -> Any:
    """``value`` checked (and converted) against the annotation ``kind``."""

    def bad(expected: str) -> CodecError:
        return CodecError(f"expected {expected}, got {_json_type(value)}", field=where)

    if kind is Any:
        return value
    if kind is str or kind is bool:
        if type(value) is not kind:
            raise bad(kind.__name__)
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("int")
        return value
    if kind is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise bad("float")
        return float(value)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            raise CodecError(f"expected one of {[m.value for m in kind]}, got {value!r}",
                             field=where) from None
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return decode(kind, value, ignore_unknown=ignore_unknown, path=where)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        if value not in args:
            raise CodecError(f"expected one of {list(args)}, got {value!r}", field=where)
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _convert(value, rest[0], where, ignore_unknown)
        raise TypeError(f"{where}: the codec takes only X | None unions, not {kind!r}")
    if origin is tuple or origin is list:
        if not isinstance(value, list | tuple):
            raise bad("list")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise CodecError(f"expected {len(args)} items, got {len(value)}", field=where)
            items = [_convert(v, a, f"{where}[{i}]", ignore_unknown)
                     for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            items = [_convert(v, args[0], f"{where}[{i}]", ignore_unknown)
                     for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("object")
        if args[0] is not str:
            raise TypeError(f"{where}: the codec takes only dict[str, X], not {kind!r}")
        return {k: _convert(v, args[1], f"{where}[{k!r}]", ignore_unknown)
                for k, v in value.items()}
    raise TypeError(f"{where}: no codec for the annotation {kind!r}")
