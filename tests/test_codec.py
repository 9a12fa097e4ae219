"""Tests for superagent.codec: round trips, strict decoding, errors that name the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Literal

import pytest

from superagent import codec
from superagent.errors import CodecError


class Colour(Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True, kw_only=True)
class Inner:
    name: str
    weight: float = 1.0


@dataclass(frozen=True, kw_only=True)
class Outer:
    type: ClassVar[str] = "outer"
    term: int
    ok: bool
    colour: Colour
    mode: Literal["a", "b"]
    names: tuple[str, ...]
    pair: tuple[str, int]
    inners: tuple[Inner, ...]
    counts: dict[str, int]
    extra: dict[str, Any]
    maybe: Inner | None = None
    items: list[int] = field(default_factory=list)


def example() -> Outer:
    return Outer(term=3, ok=True, colour=Colour.BLUE, mode="b", names=("x", "y"),
                 pair=("k", 2), inners=(Inner(name="i", weight=2.5),), counts={"n1": 1},
                 extra={"deep": [1, {"a": None}]}, maybe=Inner(name="m"), items=[4])


def test_round_trip_and_shape() -> None:
    """encode gives plain JSON types with the tag first; decode gives an equal value."""
    value = example()
    doc = codec.encode(value)
    assert next(iter(doc)) == "type" and doc["type"] == "outer"
    assert doc["colour"] == "blue" and doc["names"] == ["x", "y"]
    assert doc["inners"] == [{"name": "i", "weight": 2.5}]
    assert codec.decode(Outer, doc) == value
    assert codec.decode(Outer, {**doc, "maybe": None}).maybe is None


@pytest.mark.parametrize(("change", "message"), [
    ({"term": "3"}, "term: expected int, got str"),
    ({"term": True}, "term: expected int, got bool"),
    ({"ok": 1}, "ok: expected bool, got int"),
    ({"colour": "green"}, "colour: expected one of ['red', 'blue'], got 'green'"),
    ({"mode": "c"}, "mode: expected one of ['a', 'b'], got 'c'"),
    ({"names": "x"}, "names: expected list, got str"),
    ({"names": ["x", 1]}, "names[1]: expected str, got int"),
    ({"pair": ["k"]}, "pair: expected 2 items, got 1"),
    ({"inners": [{"name": 1}]}, "inners[0].name: expected str, got int"),
    ({"inners": [{"name": "i", "colour": "x"}]}, "inners[0].colour: unknown field"),
    ({"counts": {"n1": "1"}}, "counts['n1']: expected int, got str"),
    ({"maybe": 3}, "maybe: expected an object, got int"),
    ({"surprise": 1}, "surprise: unknown field"),
    ({"type": "other"}, "type: expected 'outer', got 'other'"),
])
def test_bad_documents_name_the_field(change: dict[str, object], message: str) -> None:
    """Wrong types, unknown fields and a wrong tag raise CodecError naming the field."""
    with pytest.raises(CodecError) as info:
        codec.decode(Outer, {**codec.encode(example()), **change})
    assert str(info.value) == message


def test_missing_and_ignored_fields() -> None:
    """A missing required field is named; unknown ones may be ignored on request."""
    doc = codec.encode(example())
    del doc["term"]
    with pytest.raises(CodecError, match="term: missing"):
        codec.decode(Outer, doc)
    inner = codec.decode(Inner, {"name": "n", "later": 1}, ignore_unknown=True)
    assert inner == Inner(name="n")


def test_int_is_taken_for_float() -> None:
    """JSON has one number type: an int decodes into a float field as a float."""
    assert codec.decode(Inner, {"name": "n", "weight": 2}).weight == 2.0


def test_unsupported_annotation_is_a_programming_error() -> None:
    """An annotation the codec does not know is a TypeError, not a data error."""
    @dataclass(frozen=True, kw_only=True)
    class Odd:
        when: set[int]

    with pytest.raises(TypeError, match="when"):
        codec.decode(Odd, {"when": [1]})
