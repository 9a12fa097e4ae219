"""The coordinator's merged log stream, without I/O: queries, resumption ids, gaps, limits.

Theory of operation
-------------------
``superagent logs APP`` reads the lines of every machine running the app: the coordinator
asks each participant (``/v1/logs``, one call per machine) and merges what they answer.
This module is the part of that which decides, so it can be tested without a cluster:

- **Query.** ``parse_query`` turns the API's query string into a ``LogQuery`` (instance,
  node, stream, ``since`` as ``10m``/``2h``/an epoch, ``grep``, request id, ``n``,
  ``follow``), refusing a bad parameter with a ``BadRequest`` naming it. What a
  participant can filter itself (app, instance, request id) is passed on
  (``participant_query``); the rest is applied here (``LogQuery.matches``).
- **Resumption ids.** A line is known by its *source* (node + instance, or node + the
  proxy's event reader) and the source's sequence number (``debug.records``). The id of
  every line event of a followed stream is the whole ``Cursor`` after it, written as
  ``node/source=seq@ts`` items joined by commas (``encode_id``; names percent-escaped,
  ``ts`` as Python's exact float ``repr``). A client that lost the stream reconnects to any
  coordinator with ``Last-Event-ID`` and gets only what comes after (``decode_id``).
- **Tracker.** ``Tracker.admit`` sees every line a participant sends, in order per
  source, and says whether it is new (lines already seen — the tail a participant repeats
  when followed again — are suppressed) and whether something is missing before it: a
  jump of the sequence number (``missing`` lines the participant dropped or its ring no
  longer had), or a source numbered afresh (the participant restarted; what its instances
  wrote meanwhile may be lost). Both are reported to the client as ``gap`` events. Every
  line examined moves the cursor, delivered or filtered out, so the cursor never makes a
  participant's old lines look new.
- **Limits.** ``RateLimit`` is a token bucket of lines per second per subscriber; lines
  over it are dropped and counted, as are lines that find the subscriber's queue full. The
  counts reach the client as ``dropped`` events: never a silent gap.

Pure: no trio, no sockets; times come from the caller.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from superagent.coordinator.errors import BadRequest
from superagent.debug import PROXY_SOURCE, BadRecord, Cursor, LogLine, Position, Source, Stream
from superagent.debug.records import STREAMS
from superagent.rpc import messages as msg

DEFAULT_LINES = 100  # lines of a query (and of a follow's backlog) unless ``n`` says
MAX_LINES = msg.MAX_LOG_LINES  # the most one query may ask for
TAIL_FETCH = 1000  # lines asked of each participant when filters apply here (its ring)
TEXT_MAX = 200  # characters of a grep pattern or a request id
ID_MAX = 64 * 1024  # characters of a Last-Event-ID (a cursor of a few hundred sources)
RATE = 5000.0  # lines per second one subscriber may receive...
BURST = 10000.0  # ...after a burst of this many
_SINCE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PARAMS = {"instance", "node", "stream", "since", "grep", "request_id", "n", "follow"}
_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


@dataclass(frozen=True, kw_only=True)
class LogQuery:
    """What one logs request asks for (``None``: any)."""

    app: str | None = None
    instance: str | None = None
    node: str | None = None
    stream: Stream | None = None
    since: float | None = None  # epoch seconds
    grep: str | None = None
    request_id: str | None = None
    n: int = DEFAULT_LINES
    follow: bool = False

    @property
    def filters_here(self) -> bool:
        """Whether lines are filtered here, past what the participants filter."""
        return any(v is not None for v in (self.node, self.stream, self.since, self.grep))

    def matches(self, line: LogLine) -> bool:
        return ((self.instance is None or line.instance == self.instance)
                and (self.node is None or line.node == self.node)
                and (self.stream is None or line.stream == self.stream)
                and (self.since is None or line.ts >= self.since)
                and (self.request_id is None or line.request_id == self.request_id)
                and (self.grep is None or self.grep in line.text))

    def participant_query(self, *, n: int | None = None) -> msg.LogsQuery:
        """The part a participant filters itself; ``n`` lines (default: what is needed)."""
        wanted = n if n is not None else (max(self.n, TAIL_FETCH) if self.filters_here
                                          else self.n)
        return msg.LogsQuery(app=self.app, instance=self.instance,
                             request_id=self.request_id, n=min(wanted, MAX_LINES))


def parse_since(raw: str, *, now: float) -> float:
    """``10m`` (s, m, h, d: that long ago) or an epoch in seconds; raises BadRequest."""
    text = raw.strip()
    found = _SINCE.fullmatch(text)
    if found:
        return now - float(found.group(1)) * _UNITS[found.group(2)]
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"query parameter 'since' must be a duration (30s, 10m, 2h, 1d)"
                         f" or an epoch in seconds, not {raw[:40]!r}") from None
    if not 0 <= value < 1e11:
        raise BadRequest(f"query parameter 'since' is no epoch in seconds: {raw[:40]!r}")
    return value


def parse_query(params: Mapping[str, str], *, app: str | None,
                now: float | None = None, allowed: frozenset[str] | None = None) -> LogQuery:
    """The ``LogQuery`` of a query string; a ``BadRequest`` names the first bad parameter."""
    known = _PARAMS if allowed is None else allowed
    unknown = sorted(set(params) - known)
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r}: expected one of"
                         f" {sorted(known)}")
    texts: dict[str, str | None] = {}
    for key in ("instance", "node", "grep", "request_id"):
        value = params.get(key)
        if value is not None and not 1 <= len(value) <= TEXT_MAX:
            raise BadRequest(f"query parameter {key!r} must be 1-{TEXT_MAX} characters")
        texts[key] = value or None
    raw_stream = params.get("stream")
    stream: Stream | None = None
    if raw_stream is not None and raw_stream not in STREAMS:
        raise BadRequest(f"query parameter 'stream' must be one of {list(STREAMS)},"
                         f" not {raw_stream[:40]!r}")
    if raw_stream is not None:
        stream = raw_stream
    n = DEFAULT_LINES
    if "n" in params:
        try:
            n = int(params["n"])
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_LINES:
            raise BadRequest(f"query parameter 'n' must be an integer 1-{MAX_LINES},"
                             f" not {params['n'][:40]!r}")
    follow = _FLAGS.get(params.get("follow", "0").strip().lower())
    if follow is None:
        raise BadRequest("query parameter 'follow' must be true or false")
    since = None
    if params.get("since"):
        since = parse_since(params["since"], now=time.time() if now is None else now)
    return LogQuery(app=app, instance=texts["instance"], node=texts["node"],
                    stream=stream, since=since, grep=texts["grep"],
                    request_id=texts["request_id"], n=n, follow=follow)


# ---------------------------------------------------------------------- resumption ids
def encode_id(cursor: Cursor) -> str:
    """The cursor as an SSE id: ``node/source=seq@ts,...`` (see the module docstring)."""
    return ",".join(f"{quote(s.node, safe='')}/{quote(s.name, safe='')}={p.seq}@{p.ts!r}"
                    for s, p in cursor.positions)


def decode_id(text: str) -> Cursor:
    """The cursor of ``encode_id``; raises BadRequest naming what is malformed."""
    if len(text) > ID_MAX:
        raise BadRequest(f"Last-Event-ID is longer than {ID_MAX} characters")
    positions: dict[Source, Position] = {}
    for item in filter(None, text.strip().split(",")):
        where, _, at = item.partition("=")
        node, slash, name = where.partition("/")
        seq, _, ts = at.partition("@")
        try:
            position = Position(seq=int(seq), ts=float(ts))
        except ValueError:
            position = None
        if not slash or not name or position is None or position.seq < 0:
            raise BadRequest(f"Last-Event-ID: malformed item {item[:80]!r} (expected"
                             " node/source=seq@ts)")
        positions[Source(node=unquote(node), name=unquote(name))] = position
    return Cursor(positions=tuple(sorted(positions.items(), key=lambda kv: kv[0])))


# ---------------------------------------------------------------------- the tracker
@dataclass(frozen=True, kw_only=True)
class Gap:
    """Lines of one source the client will not get: ``missing`` of them (None: unknown,
    the source was numbered afresh)."""

    node: str
    source: str
    missing: int | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "source": self.source, "missing": self.missing,
                "reason": self.reason}


class Tracker:
    """Which lines a client has, per source (see the module docstring).

    ``contiguous``: whether each source's lines reach us without holes by design (false
    when a participant filters by request id: then a jump of the sequence is no gap).
    """

    def __init__(self, cursor: Cursor | None = None, *, contiguous: bool = True) -> None:
        self.contiguous = contiguous
        self._positions: dict[Source, Position] = dict(cursor.positions) if cursor else {}
        self.duplicates = 0

    def __repr__(self) -> str:
        return f"<Tracker sources={len(self._positions)} duplicates={self.duplicates}>"

    def cursor(self) -> Cursor:
        return Cursor(positions=tuple(sorted(self._positions.items(), key=lambda kv: kv[0])))

    def seed(self, lines: list[LogLine]) -> None:
        """Mark ``lines`` as seen without judging them (a fresh follow's backlog)."""
        for line in lines:
            self.admit(line)

    def admit(self, line: LogLine) -> tuple[bool, Gap | None]:
        """``(new, gap)``: whether ``line`` is new to the client, and what is missing
        before it. Moves the cursor past every new line."""
        source = line.source
        pos = self._positions.get(source)
        if pos is not None and line.seq <= pos.seq and line.ts <= pos.ts:
            self.duplicates += 1
            return False, None
        gap = None
        if pos is not None:
            if line.seq <= pos.seq or (line.seq == 1 and pos.seq >= 1):
                gap = Gap(node=source.node, source=source.name, missing=None,
                          reason="numbered afresh (the participant restarted or followed"
                                 " the instance again): lines written meanwhile may be"
                                 " missing")
            elif (line.seq > pos.seq + 1 and self.contiguous
                  and source.name != PROXY_SOURCE):  # the proxy's events of other apps
                gap = Gap(node=source.node, source=source.name,
                          missing=line.seq - pos.seq - 1,
                          reason="dropped by the participant or gone from its buffer")
        self._positions[source] = Position(seq=line.seq, ts=line.ts)
        return True, gap


class RateLimit:
    """A token bucket: ``take(now)`` is False for a line over ``rate`` per second."""

    def __init__(self, rate: float = RATE, burst: float = BURST) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a rate limit needs rate > 0 and burst >= 1, not {rate}/{burst}")
        self.rate, self.burst = rate, burst
        self._tokens = burst
        self._at: float | None = None

    def __repr__(self) -> str:
        return f"<RateLimit {self.rate:g}/s burst={self.burst:g} tokens={self._tokens:.0f}>"

    def take(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


# ---------------------------------------------------------------------- lines out
def line_doc(line: LogLine) -> dict[str, Any]:
    """A merged line as the API shows it: node, instance, stream, ts, text (fields when
    the line was JSON), and what else it carries."""
    return line.to_json()


def from_participant(doc: Mapping[str, Any], node: str) -> LogLine | None:
    """A participant's line document labelled with its node; None when malformed (a
    participant of another version: skipped, never a failed stream)."""
    try:
        return LogLine.from_json({**doc, "node": node})
    except BadRecord:
        return None


# ---------------------------------------------------------------------- the app's secrets
SECRET_MIN = 6  # characters of an [env] value worth hiding (shorter ones are words: "ok")


class Redactor:
    """Hides an app's ``[env]`` values in its lines: an app that prints its database
    password does not make ``superagent logs`` show it. Values shorter than
    ``SECRET_MIN`` are left alone (they are flags and words, found everywhere)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        kept = {name: value for name, value in env.items()
                if isinstance(value, str) and len(value) >= SECRET_MIN}
        found = {json.dumps(value)[1:-1]: name for name, value in kept.items()}
        self._pairs = sorted(found.items(), key=lambda kv: -len(kv[0]))  # longest first
        self._raw = tuple(kept.values())

    def __repr__(self) -> str:
        return f"<Redactor values={len(self._pairs)}>"

    def __call__(self, doc: dict[str, Any]) -> dict[str, Any]:
        if not self._pairs:
            return doc
        text = doc.get("text")
        if isinstance(text, str) and not any(value in text for value in self._raw):
            return doc  # the common case, without encoding the line (fields come from text)
        raw = json.dumps(doc)
        if not any(value in raw for value, _ in self._pairs):
            return doc
        for value, name in self._pairs:
            raw = raw.replace(value, f"[env {name}]")
        try:
            hidden: dict[str, Any] = json.loads(raw)
        except ValueError:  # a value that was a number in the document: keep the text only
            text = doc.get("text", "")
            for value, name in self._pairs:
                text = str(text).replace(value, f"[env {name}]")
            hidden = {k: v for k, v in doc.items() if k != "fields"} | {"text": text}
        return hidden


def env_of(spec: object) -> dict[str, str]:
    """The ``[env]`` table of a stored manifest document (a table or a list of pairs)."""
    env = spec.get("env") if isinstance(spec, dict) else None
    if isinstance(env, dict):
        return {str(k): v for k, v in env.items() if isinstance(v, str)}
    if isinstance(env, list):
        return {str(p[0]): p[1] for p in env
                if isinstance(p, list | tuple) and len(p) == 2 and isinstance(p[1], str)}
    return {}
