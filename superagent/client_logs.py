"""The operator's commands that read what apps do: ``logs``, ``debug`` and ``trace``.

``superagent logs APP`` prints the app's last lines merged across its machines
(``GET /api/v1/apps/{app}/logs``), each prefixed with its instance and stream; ``-f``
follows the server-sent events of the same route. When the stream breaks (the
coordinator went away, a leader change) the command connects again, to any coordinator
of ``--server``, with the ``Last-Event-ID`` of the last line it printed: the coordinator
sends only what follows it. ``gap`` events (lines a machine lost: a participant that
restarted, a dropped burst) and ``dropped`` events (lines over the stream's bounds) are
printed to stderr, never hidden.

``superagent debug APP [--ttl 30m]`` opens the app's debug session on every machine
running it (``POST /api/v1/apps/{app}/debug``), keeps it open (posting again at half its
TTL, which also reaches machines the app was scaled onto), and prints each request the
proxy served as one block: its record (route, instance, status, bytes, timings,
retries, the limit or error that fired) followed by the app's own lines carrying the
same request id (kept, bounded, until the record arrives: the proxy writes its records
in batches, after the app wrote). Ctrl-C closes the session (``DELETE``); the
participants close it at the TTL anyway.

``superagent trace REQUEST_ID [--app APP]`` prints one request's lines from every
machine, by time (``GET /api/v1/trace/{id}``).

What an app wrote is shown, not obeyed: control characters and terminal escapes are made
visible (``clean``), and a line longer than ``LINE_MAX`` is cut with a marker. Colour is
used only when stdout is a terminal (and ``NO_COLOR`` is unset).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import quote, urlencode

import httpx

from superagent.client import Client, ClientError
from superagent.client_cli import client_of, command

LINE_MAX = 4000  # characters of one line shown; the rest is cut with a marker
RECONNECTS = 30  # consecutive failed reconnections before `logs -f` gives up
RECONNECT_MAX = 2.0  # seconds between reconnections (doubling from 0.1)
STREAM_TIMEOUT = 60.0  # seconds without a byte (keep-alives come every 15) = stream lost
PENDING_REQUESTS = 1000  # request ids whose app lines `debug` keeps awaiting their record
PENDING_LINES = 50  # app lines kept per pending request id
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# an escape sequence (CSI, OSC, or a two-character one) or any other control character
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]?|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
                      r"|\x1b.?|[\x00-\x08\x0a-\x1f\x7f-\x9f]", re.DOTALL)
_COLOURS = (32, 33, 34, 35, 36, 92, 93, 94, 95, 96)
_STREAM_COLOUR = {"stderr": 31, "proxy": 36}


# ---------------------------------------------------------------------- display
def clean(text: str, limit: int = LINE_MAX) -> str:
    """``text`` safe for a terminal: escapes and control characters shown as ``\\xNN``,
    cut at ``limit`` characters with a marker saying how much was cut."""
    shown = _CONTROL.sub(lambda m: "".join(f"\\x{ord(ch):02x}" for ch in m.group()), text)
    if len(shown) > limit:
        shown = f"{shown[:limit]} [... {len(shown) - limit} characters cut]"
    return shown


def colour(enabled: bool, code: int, text: str) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if enabled else text


def use_colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def render_line(doc: dict[str, Any], *, coloured: bool, node: bool = False) -> str:
    """``instance stream | text`` (``node/instance`` when asked), cleaned."""
    who = clean(str(doc.get("instance", "-")), 80)
    if node and doc.get("node"):
        who = f"{clean(str(doc['node']), 80)}/{who}"
    stream = str(doc.get("stream", "?"))
    head = colour(coloured, _COLOURS[zlib.crc32(who.encode()) % len(_COLOURS)], who)
    kind = colour(coloured, _STREAM_COLOUR.get(stream, 2), stream)
    cut = " [cut by the participant]" if doc.get("cut") else ""
    return f"{head} {kind} | {clean(str(doc.get('text', '')))}{cut}"


def render_record(doc: dict[str, Any], *, coloured: bool) -> str:
    """A proxy record as one line: route, instance, status, bytes, timings, retries."""
    f = doc.get("fields") or {}
    status = f.get("status")
    tone = 31 if isinstance(status, int) and status >= 500 else (
        33 if isinstance(status, int) and status >= 400 else 32)
    parts = [colour(coloured, tone, str(status)),
             clean(f"{f.get('method')} {f.get('path')}", 300),
             f"instance {clean(str(f.get('instance')), 80)}",
             f"rule {clean(str(f.get('rule')), 80)}",
             f"{f.get('duration_ms')} ms (first byte {f.get('first_byte_ms')} ms)",
             f"in {f.get('bytes_in')} B out {f.get('bytes_out')} B",
             f"retries {f.get('retries')}"]
    if f.get("error"):
        parts.append(colour(coloured, 31, f"error {clean(str(f['error']), 300)}"))
    rid = clean(str(doc.get("request_id") or f.get("request_id") or "-"), 200)
    return f"[{rid}] " + "  ".join(parts)


def parse_duration(raw: str, what: str) -> float:
    """``30m``, ``90s``, ``2h``, ``1d`` or plain seconds; raises ClientError."""
    found = _DURATION.fullmatch(raw.strip())
    if not found:
        raise ClientError(f"{what} must be a duration such as 90s, 30m or 2h, not {raw!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


# ---------------------------------------------------------------------- server-sent events
class SseParser:
    """Server-sent events, one line at a time: ``feed`` returns ``(event, data, id)``
    when a line ends an event (comments are skipped)."""

    def __init__(self) -> None:
        self._kind, self._data = "message", list[str]()
        self._id: str | None = None

    def __repr__(self) -> str:
        return f"<SseParser {self._kind} lines={len(self._data)}>"

    def feed(self, line: str) -> tuple[str, dict[str, Any], str | None] | None:
        if not line:
            found = None
            if self._data:
                try:
                    doc = json.loads("\n".join(self._data))
                except ValueError:
                    doc = {"text": "\n".join(self._data)}
                found = (self._kind, doc if isinstance(doc, dict) else {"value": doc},
                         self._id)
            self._kind, self._data, self._id = "message", [], None
            return found
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._kind = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any], str | None]]:
    """``(event, data, id)`` of each event of a ``text/event-stream``."""
    parser = SseParser()
    for line in lines:
        found = parser.feed(line)
        if found is not None:
            yield found


def follow(client: Client, path: str, handle: Callable[[str, dict[str, Any]], None],
           *, tick: Callable[[], None] | None = None) -> None:
    """Follow ``path``'s events for ever, reconnecting with Last-Event-ID when the stream
    breaks; ``handle(event, data)`` for each event, ``tick()`` after each (keep-alives
    included). Raises ClientError after ``RECONNECTS`` failed attempts in a row."""
    last_id: str | None = None
    failures, pause = 0, 0.1
    while True:
        headers = {"last-event-id": last_id} if last_id else {}
        try:
            with client.stream("GET", path, headers=headers, timeout=STREAM_TIMEOUT) as resp:
                failures, pause = 0, 0.1
                parser, rest = SseParser(), b""
                for chunk in resp.iter_bytes():  # all the lines a chunk holds, one flush
                    *complete, rest = (rest + chunk).split(b"\n")
                    for raw in complete:
                        found = parser.feed(raw.decode("utf-8", "replace").rstrip("\r"))
                        if found is not None:
                            kind, doc, event_id = found
                            handle(kind, doc)
                            if event_id:
                                last_id = event_id
                    sys.stdout.flush()
                    if tick is not None:
                        tick()
                problem = "the coordinator ended the stream"
        except ClientError as exc:
            if exc.status and exc.status < 500:
                raise
            problem = str(exc)
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        failures += 1
        if failures > RECONNECTS:
            raise ClientError(f"lost the stream and could not reconnect: {problem}")
        print(f"stream lost ({clean(problem, 300)}); reconnecting", file=sys.stderr,
              flush=True)
        time.sleep(pause)
        pause = min(RECONNECT_MAX, pause * 2)


# ---------------------------------------------------------------------- logs
def logs_path(args: argparse.Namespace, *, follow_: bool) -> str:
    params: dict[str, str] = {}
    for key, value in (("since", args.since), ("instance", args.instance),
                       ("node", args.node), ("stream", args.stream), ("grep", args.grep),
                       ("request_id", args.request_id)):
        if value:
            params[key] = value
    if args.lines is not None:
        if args.lines < 1:
            raise ClientError("-n must be 1 or more")
        params["n"] = str(args.lines)
    if follow_:
        params["follow"] = "1"
    query = f"?{urlencode(params)}" if params else ""
    return f"/api/v1/apps/{quote(args.app, safe='')}/logs{query}"


def _logs(args: argparse.Namespace) -> int:
    client = client_of(args)
    coloured = use_colour() and not args.json
    show_node = bool(args.nodes)
    if not args.follow:
        doc = client.get(logs_path(args, follow_=False))
        for line in doc["lines"]:
            print(json.dumps(line) if args.json else
                  render_line(line, coloured=coloured, node=show_node))
        for node, outcome in doc.get("nodes", {}).items():
            if outcome != "ok":
                print(f"node {node}: no lines ({clean(str(outcome), 300)})", file=sys.stderr)
        return 0

    def handle(kind: str, doc: dict[str, Any]) -> None:
        if kind == "line":
            print(json.dumps(doc) if args.json else
                  render_line(doc, coloured=coloured, node=show_node))  # flushed per chunk
        elif args.json and kind in ("gap", "dropped", "node"):
            print(json.dumps({"event": kind, **doc}), file=sys.stderr, flush=True)
        else:
            notice(kind, doc)

    _pipe_follow(client, logs_path(args, follow_=True), handle)
    return 0


def _pipe_follow(client: Client, path: str, handle: Callable[[str, dict[str, Any]], None],
                 tick: Callable[[], None] | None = None) -> None:
    # a closed pipe ends the command quietly (main handles BrokenPipeError)
    follow(client, path, handle, tick=tick)


def notice(kind: str, doc: dict[str, Any]) -> None:
    """A stream's events other than lines, on stderr."""
    if kind == "gap":
        missing = doc.get("missing")
        count = "some lines" if missing is None else f"{missing} line(s)"
        print(f"-- gap: {count} of {clean(str(doc.get('node')), 80)}/"
              f"{clean(str(doc.get('source')), 80)} missing: "
              f"{clean(str(doc.get('reason')), 300)}", file=sys.stderr, flush=True)
    elif kind == "dropped":
        lost = (f"; {doc['events_lost']} gap or node notice(s) lost too"
                if doc.get("events_lost") else "")
        print(f"-- dropped {doc.get('dropped')} line(s) (reading too slowly or over the"
              f" stream's rate; {doc.get('total')} in all{lost})", file=sys.stderr, flush=True)
    elif kind == "node":
        state = doc.get("state")
        detail = f": {clean(str(doc.get('error')), 300)}" if doc.get("error") else ""
        print(f"-- node {clean(str(doc.get('node')), 80)} {state}{detail}", file=sys.stderr,
              flush=True)


# ---------------------------------------------------------------------- debug
class RequestJoiner:
    """App lines by request id, until the proxy's record of the request arrives."""

    def __init__(self, *, requests: int = PENDING_REQUESTS, lines: int = PENDING_LINES
                 ) -> None:
        self.requests, self.lines = requests, lines
        self._pending: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def __repr__(self) -> str:
        return f"<RequestJoiner pending={len(self._pending)}>"

    def add(self, doc: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Take one line; for a proxy record, the app lines it joins (else None)."""
        rid = doc.get("request_id")
        if not rid:
            return None
        if doc.get("stream") == "proxy":
            return self._pending.pop(rid, [])
        kept = self._pending.setdefault(rid, [])
        self._pending.move_to_end(rid)
        if len(kept) < self.lines:
            kept.append(doc)
        while len(self._pending) > self.requests:
            self._pending.popitem(last=False)
        return None


def _debug(args: argparse.Namespace) -> int:
    client = client_of(args)
    ttl = parse_duration(args.ttl, "--ttl")
    if not 1 <= ttl <= 86400:
        raise ClientError("--ttl must be between 1 second and 1 day")
    app = quote(args.app, safe="")
    opened = client.post(f"/api/v1/apps/{app}/debug", json={"ttl": ttl})
    _say_session(opened, args)
    renew_at = [time.monotonic() + ttl / 2]
    coloured = use_colour() and not args.json
    joiner = RequestJoiner()

    def handle(kind: str, doc: dict[str, Any]) -> None:
        if kind != "line":
            if kind in ("gap", "dropped", "node"):
                notice(kind, doc)
            return
        joined = joiner.add(doc)
        if joined is None:
            return
        if args.json:
            print(json.dumps({"record": doc, "lines": joined}))
            return
        print(render_record(doc, coloured=coloured))
        for line in joined:
            print("    " + render_line(line, coloured=coloured))

    def tick() -> None:
        if time.monotonic() >= renew_at[0]:
            client.post(f"/api/v1/apps/{app}/debug", json={"ttl": ttl})
            renew_at[0] = time.monotonic() + ttl / 2

    try:
        _pipe_follow(client, f"/api/v1/apps/{app}/logs?follow=1&n=1", handle, tick)
    except KeyboardInterrupt:
        closed = client.request("DELETE", f"/api/v1/apps/{app}/debug")
        failed = sorted(n for n, o in closed.get("nodes", {}).items() if not o.get("ok"))
        print(f"debug session of {args.app} closed"
              + (f" (not on {', '.join(failed)}: it ends at its TTL)" if failed else ""),
              file=sys.stderr)
    return 0


def _say_session(doc: dict[str, Any], args: argparse.Namespace) -> None:
    nodes = doc.get("nodes", {})
    good = sorted(n for n, o in nodes.items() if o.get("ok"))
    bad = {n: o.get("error") for n, o in nodes.items() if not o.get("ok")}
    if not good:
        raise ClientError(f"no machine running {args.app} opened a debug session"
                          + (f": {bad}" if bad else " (is it deployed?)"))
    print(f"debug session of {args.app} open on {', '.join(good)} for {doc.get('ttl'):g} s"
          " (Ctrl-C closes it)", file=sys.stderr, flush=True)
    for node, problem in sorted(bad.items()):
        print(f"-- node {node}: not opened ({clean(str(problem), 300)})", file=sys.stderr)


# ---------------------------------------------------------------------- trace
def _trace(args: argparse.Namespace) -> int:
    client = client_of(args)
    query = f"?{urlencode({'app': args.app})}" if args.app else ""
    doc = client.get(f"/api/v1/trace/{quote(args.request_id, safe='')}{query}")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    coloured = use_colour()
    if not doc["lines"]:
        print(f"no line carries request id {clean(args.request_id, 200)} (the proxy's"
              " record is kept while a debug session of the app is open)", file=sys.stderr)
    for line in doc["lines"]:
        when = time.strftime("%H:%M:%S", time.localtime(float(line["ts"])))
        when += f".{int(float(line['ts']) * 1000) % 1000:03d}"
        body = (render_record(line, coloured=coloured) if line.get("stream") == "proxy"
                else render_line(line, coloured=coloured, node=True))
        print(f"{when} {clean(str(line.get('node')), 80)} {body}")
    for node, outcome in doc.get("nodes", {}).items():
        if outcome != "ok":
            print(f"node {node}: not asked ({clean(str(outcome), 300)})", file=sys.stderr)
    return 0 if doc["lines"] else 1


# ---------------------------------------------------------------------- parsers
def add_log_commands(sub: Any) -> None:
    with command(sub, "logs", "an app's output, merged across its machines", _logs) as logs:
        logs.add_argument("app")
        logs.add_argument("-f", "--follow", action="store_true",
                          help="keep printing new lines (reconnects on its own)")
        logs.add_argument("--since", metavar="WHEN",
                          help="only lines from then on: 30s, 10m, 2h, 1d or an epoch")
        logs.add_argument("--instance", metavar="ID", help="only this instance")
        logs.add_argument("--node", metavar="N", help="only this machine")
        logs.add_argument("--stream", choices=("stdout", "stderr", "proxy"),
                          help="only this stream")
        logs.add_argument("--grep", metavar="TEXT", help="only lines containing TEXT")
        logs.add_argument("--request-id", metavar="ID", help="only lines of this request")
        logs.add_argument("-n", dest="lines", type=int, metavar="N",
                          help="how many recent lines (default 100)")
        logs.add_argument("--nodes", action="store_true",
                          help="prefix lines with their machine")

    with command(sub, "debug", "trace an app's requests live (a debug session)",
                 _debug) as debug:
        debug.add_argument("app")
        debug.add_argument("--ttl", default="30m", metavar="DURATION",
                           help="the session ends by itself after this long (default 30m)")

    with command(sub, "trace", "one request's lines across the machines", _trace) as trace:
        trace.add_argument("request_id", metavar="REQUEST_ID")
        trace.add_argument("--app", help="only this app's machines")
