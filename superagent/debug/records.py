"""Log records: one line of captured output (or one debug event), its JSON shape, its order.

Theory of operation
-------------------
A ``LogLine`` is what every consumer of captured output sees, whatever carried it: a
participant's ring buffer, its RPC (``/v1/logs``), or a coordinator merging the streams
of several machines. It is a frozen value with a stable JSON shape (``to_json`` /
``from_json``, ``"type": "log_line"``); optional keys appear only when set, so the shape a
participant has always served is unchanged.

- **Lines.** ``make_line`` decodes one raw line of an app's stdout or stderr (UTF-8,
  ``errors="replace"``, a trailing ``\\r`` dropped). A line that is a JSON object is kept
  as a structured event: its object is ``fields``, and its ``level`` and ``request_id``
  (a string or an integer) are surfaced for filtering. A ``cut`` line (longer than its
  reader's limit) is never parsed: half an object is not one.
- **Sources and sequence numbers.** Each line comes from one *source*: the reader that
  numbered it (``seq``, 1, 2, 3... with no gaps) on one machine (``node``; ``None`` on
  the machine itself, set by whoever gathers lines from several). The source of an app
  line is its instance; the proxy's debug events of all apps share the source
  ``PROXY_SOURCE`` (they are numbered by one reader), whatever instance they name.
- **Order.** ``merge_key`` orders lines by the time they were read, then source, then
  sequence number: within one source that is the order they were numbered in (a
  source's ``ts`` never decreases while the wall clock does not step back), so
  ``merge`` can interleave the already-ordered streams of many sources lazily.
- **Resumption.** A ``Cursor`` remembers, per source, the last line a consumer has
  (``seq`` and ``ts``); ``Cursor.unseen`` keeps only the lines after it. A source's
  numbering starts again at 1 when its reader is replaced (an agent restart, an
  instance followed afresh); such lines have a lower ``seq`` but a later ``ts`` than the
  cursor's position, which is how the cursor tells them from lines already seen.

Pure: no I/O, no trio.
"""

from __future__ import annotations

import contextlib
import heapq
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from superagent.debug.errors import BadRecord

Stream = Literal["stdout", "stderr", "proxy"]
STREAMS: tuple[Stream, ...] = ("stdout", "stderr", "proxy")
PROXY_SOURCE = "proxy-events"  # the source name of the proxy's debug events on one node
LINE_TYPE = "log_line"
CURSOR_TYPE = "log_cursor"


@dataclass(frozen=True, kw_only=True, slots=True, order=True)
class Source:
    """Who numbered a line: one reader on one node (``node`` empty: this machine)."""

    node: str
    name: str

    def __str__(self) -> str:
        return f"{self.node}/{self.name}" if self.node else self.name


@dataclass(frozen=True, kw_only=True, slots=True)
class LogLine:
    """One line of one instance's output (or one debug event), as read at ``ts``."""

    ts: float
    app: str
    release: str
    instance: str
    stream: Stream
    text: str
    seq: int
    fields: dict[str, Any] | None = None
    level: str | None = None
    request_id: str | None = None
    cut: bool = False
    node: str | None = None

    @property
    def source(self) -> Source:
        name = PROXY_SOURCE if self.stream == "proxy" else self.instance
        return Source(node=self.node or "", name=name)

    def on_node(self, node: str) -> LogLine:
        """This line labelled with the machine it came from (for a merged stream)."""
        return replace(self, node=node)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``fields`` and optional keys only when present)."""
        doc: dict[str, Any] = {"type": LINE_TYPE, "ts": self.ts, "app": self.app,
                               "release": self.release, "instance": self.instance,
                               "stream": self.stream, "seq": self.seq, "text": self.text}
        if self.fields is not None:
            doc["fields"] = self.fields
        if self.level is not None:
            doc["level"] = self.level
        if self.request_id is not None:
            doc["request_id"] = self.request_id
        if self.cut:
            doc["cut"] = True
        if self.node is not None:
            doc["node"] = self.node
        return doc

    @classmethod
    def from_json(cls, doc: object) -> LogLine:
        """The inverse of ``to_json``; raises ``BadRecord`` on a malformed document."""
        if not isinstance(doc, dict):
            raise BadRecord("not a JSON object", kind=LINE_TYPE)
        stream = doc.get("stream")
        if stream not in STREAMS:
            raise BadRecord(f"bad stream {stream!r}", kind=LINE_TYPE, field="stream")
        fields = doc.get("fields")
        if fields is not None and not isinstance(fields, dict):
            raise BadRecord("not a JSON object", kind=LINE_TYPE, field="fields")
        return cls(ts=_number(doc, "ts", LINE_TYPE), app=_text(doc, "app"),
                   release=_text(doc, "release"), instance=_text(doc, "instance"),
                   stream=cast(Stream, stream), text=_text(doc, "text"),
                   seq=_integer(doc, "seq", LINE_TYPE), fields=fields,
                   level=_optional_text(doc, "level"),
                   request_id=_optional_text(doc, "request_id"),
                   cut=bool(doc.get("cut", False)), node=_optional_text(doc, "node"))


@dataclass(frozen=True, kw_only=True, slots=True)
class Origin:
    """Who wrote a line: the labels every line of one instance carries."""

    app: str
    release: str
    instance: str


def make_line(raw: bytes, *, cut: bool, origin: Origin, stream: Stream, ts: float,
              seq: int) -> LogLine:
    """Decode one raw line (no newline) and parse it as a JSON object when it is one."""
    text = raw.decode("utf-8", errors="replace")
    if text.endswith("\r"):
        text = text[:-1]
    fields: dict[str, Any] | None = None
    level: str | None = None
    request_id: str | None = None
    if not cut and text.lstrip().startswith("{"):
        with contextlib.suppress(ValueError, RecursionError):
            parsed = json.loads(text)
            if isinstance(parsed, dict):
                fields = parsed
    if fields is not None:
        if isinstance(fields.get("level"), str):
            level = fields["level"]
        if isinstance(fields.get("request_id"), str | int):
            request_id = str(fields["request_id"])
    return LogLine(ts=ts, app=origin.app, release=origin.release, instance=origin.instance,
                   stream=stream, text=text, seq=seq, fields=fields, level=level,
                   request_id=request_id, cut=cut)


def merge_key(line: LogLine) -> tuple[float, str, str, int]:
    """Time read, then source, then sequence number: a total order of lines."""
    return (line.ts, line.node or "", line.source.name, line.seq)


def merge(*streams: Iterable[LogLine]) -> Iterator[LogLine]:
    """Interleave streams already in ``merge_key`` order (each source's own order is)."""
    return heapq.merge(*streams, key=merge_key)


@dataclass(frozen=True, kw_only=True, slots=True)
class Position:
    """The last line a consumer has from one source."""

    seq: int
    ts: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Cursor:
    """Where a consumer is in every source: resume a stream with ``unseen``.

    ``positions`` is sorted by source, so equal cursors compare and hash equal.
    """

    positions: tuple[tuple[Source, Position], ...] = ()

    def __repr__(self) -> str:
        return "<Cursor " + " ".join(f"{source}@{pos.seq}" for source, pos in self.positions) + ">"

    def position(self, source: Source) -> Position | None:
        for known, pos in self.positions:
            if known == source:
                return pos
        return None

    def seen(self, line: LogLine) -> bool:
        """True when the consumer already has ``line`` (see the module doc on restarts)."""
        pos = self.position(line.source)
        return pos is not None and line.seq <= pos.seq and line.ts <= pos.ts

    def unseen(self, lines: Iterable[LogLine]) -> list[LogLine]:
        return [line for line in lines if not self.seen(line)]

    def advance(self, lines: Iterable[LogLine]) -> Cursor:
        """This cursor moved past ``lines`` (the consumer now has them)."""
        positions = dict(self.positions)
        for line in lines:
            pos = positions.get(line.source)
            if pos is None or line.ts > pos.ts or (line.ts == pos.ts and line.seq > pos.seq):
                positions[line.source] = Position(seq=line.seq, ts=line.ts)
        return Cursor(positions=tuple(sorted(positions.items(), key=lambda item: item[0])))

    def to_json(self) -> dict[str, Any]:
        return {"type": CURSOR_TYPE, "positions": [
            {"node": source.node, "source": source.name, "seq": pos.seq, "ts": pos.ts}
            for source, pos in self.positions]}

    @classmethod
    def from_json(cls, doc: object) -> Cursor:
        """The inverse of ``to_json``; raises ``BadRecord`` on a malformed document."""
        if not isinstance(doc, dict) or not isinstance(doc.get("positions"), list):
            raise BadRecord("not an object with a list of positions", kind=CURSOR_TYPE)
        positions: dict[Source, Position] = {}
        for item in doc["positions"]:
            if not isinstance(item, dict) or not isinstance(item.get("node"), str) \
                    or not isinstance(item.get("source"), str):
                raise BadRecord("a position needs string node and source", kind=CURSOR_TYPE,
                                field="positions")
            positions[Source(node=item["node"], name=item["source"])] = Position(
                seq=_integer(item, "seq", CURSOR_TYPE), ts=_number(item, "ts", CURSOR_TYPE))
        return cls(positions=tuple(sorted(positions.items(), key=lambda item: item[0])))


def _text(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise BadRecord(f"must be a string, not {value!r}", kind=LINE_TYPE, field=key)
    return value


def _optional_text(doc: dict[str, Any], key: str) -> str | None:
    return None if doc.get(key) is None else _text(doc, key)


def _number(doc: dict[str, Any], key: str, kind: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRecord(f"must be a number, not {value!r}", kind=kind, field=key)
    return float(value)


def _integer(doc: dict[str, Any], key: str, kind: str) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRecord(f"must be an integer, not {value!r}", kind=kind, field=key)
    return value
