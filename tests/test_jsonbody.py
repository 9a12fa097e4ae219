"""Tests of ``superagent.jsonbody``: request bodies parsed with bounds, refused with a 400
naming the problem, never a RecursionError or a value a response could not encode."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from superagent.jsonbody import MAX_DEPTH, nesting_depth, parse_json


class Refused(Exception):
    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)


def refused(raw: bytes) -> str:
    with pytest.raises(Refused) as caught:
        parse_json(raw, error=Refused)
    assert caught.value.status == 400
    return str(caught.value)


@pytest.mark.parametrize(("raw", "says"), [
    (b"[" * 100_000, f"more than {MAX_DEPTH} deep"),
    (b'{"a":' * 50_000, f"more than {MAX_DEPTH} deep"),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "deep"),
    (b'{"x": NaN}', "NaN"),
    (b"[Infinity]", "Infinity"),
    (b'{"max_parallel": 1e999}', "1e999"),
    (b'"\\ud800"', "surrogate"),
    (b"\xff\xfe{}", "not UTF-8"),
    ('{"é": 1}'.encode("utf-16"), "not UTF-8"),
    (b"{nope", "not valid JSON"),
    (b"1" * 10_000, "not valid JSON"),  # over Python's int digit limit
])
def test_refusals_name_the_problem(raw: bytes, says: str) -> None:
    """Each bad body is a 400 whose message says what is wrong."""
    assert says in refused(raw)


def test_depth_counts_brackets_outside_strings_only() -> None:
    """Brackets inside strings, escaped quotes included, do not nest."""
    assert nesting_depth(b'[{"a": "[[[[\\"[[["}, [1, [2]]]') == 3
    assert parse_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, error=Refused) is not None
    assert parse_json(b'"\\ud83d\\ude00"', error=Refused) == "\U0001f600"  # a proper pair


@pytest.mark.parametrize(("raw", "depth"), [(b'"\\"' * 400_000, 0),
                                            (b'"' + b"\\" * 1_000_000, 0),
                                            (b"[]" * 500_000, 1), (b'"a' * 500_000, 0)])
def test_the_depth_scan_of_hostile_bodies(raw: bytes, depth: int) -> None:
    """Megabytes of unterminated strings full of escapes scan to the right depth (the
    token pattern has no nested repetition, so the scan stays linear: a quadratic one
    would not finish here)."""
    assert nesting_depth(raw) == depth


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text()
                    | st.floats(allow_nan=False, allow_infinity=False),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20)


@given(JSON)
@settings(max_examples=200, deadline=None)
def test_every_shallow_json_value_round_trips(value: Any) -> None:
    """What json.dumps writes (within the depth bound) parses back unchanged."""
    raw = json.dumps(value).encode()
    if nesting_depth(raw) <= MAX_DEPTH:
        assert parse_json(raw, error=Refused) == value


@given(st.binary(max_size=200) | st.text(alphabet='[]{}"\\,:0123456789 ', max_size=200)
       .map(str.encode))
@settings(max_examples=300, deadline=None)
def test_any_bytes_parse_or_are_refused(raw: bytes) -> None:
    """Random bytes and bracket soup never raise anything but the caller's error."""
    try:
        parse_json(raw, error=Refused)
    except Refused as exc:
        assert exc.status == 400
