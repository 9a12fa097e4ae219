"""Following one output file: the pure line splitter (the files themselves: test_logs.py)."""

from __future__ import annotations

import pytest

from superagent.participant.logfiles import FileLimits, LineSplitter, dropped_marker


def test_splitter_byte_by_byte() -> None:
    """The pure splitter gives the same lines whatever the chunking."""
    data = b"a\n\nbcd\n" + b"z" * 10 + b"\nend\npart"
    whole = LineSplitter(max_line=8).feed(data)
    splitter = LineSplitter(max_line=8)
    pieces = [line for i in range(len(data)) for line in splitter.feed(data[i:i + 1])]
    assert pieces == whole == [(b"a", False), (b"", False), (b"bcd", False),
                               (b"z" * 8, True), (b"end", False)]
    assert splitter.pending == 4


def test_flush_ends_a_partial_line_as_cut() -> None:
    """At a gap in the input the partial line comes out flagged cut, and the splitter resets."""
    splitter = LineSplitter(max_line=8)
    assert splitter.feed(b"abc") == [] and not splitter.at_line_start
    assert splitter.flush() == [(b"abc", True)]
    assert splitter.at_line_start and splitter.flush() == []
    assert dropped_marker(12).startswith(b"[... 12 bytes of output dropped")


def test_limits_are_validated() -> None:
    """Limits that cannot bound anything are refused, naming the limit."""
    with pytest.raises(ValueError, match="hard_bytes"):
        FileLimits(max_bytes=1000, hard_bytes=999)
    with pytest.raises(ValueError, match="max_line"):
        FileLimits(max_line=0)
