"""``GET /api/v1/apps/{app}/logs``: an app's output merged across every machine running it.

Theory of operation
-------------------
The lines live on the participants (each one's log hub keeps the last lines of every
instance and streams new ones, ``/v1/logs``); the coordinator holds none. A request is
answered by asking every machine that runs the app — the nodes of its placement (in the
replicated state, so any coordinator knows them) and, on the leader, the nodes whose
heartbeats report an instance of it — through the coordinator's own participant client
(``host.participants``; the caller presents an API token, never the cluster secret).

- **A query** asks each node once, concurrently and under ``QUERY_TIMEOUT``, merges the
  answers by time (``debug.merge_key``), applies the filters the participants do not
  (node, stream, since, grep: ``logstream.LogQuery``) and keeps the last ``n``. A node
  that does not answer is named in ``nodes`` with its error; the others' lines are still
  served.
- **A follow** (``follow=1``) is a stream of server-sent events: ``open`` (the nodes
  followed), then ``line`` events, each with an ``id`` that is the client's whole cursor
  (``logstream.encode_id``), ``gap`` and ``dropped`` events, ``node`` events when a
  machine is lost or followed again, and ``: keep-alive`` comments every ``KEEPALIVE``
  seconds of quiet. One task per node follows that node's NDJSON stream, and follows it
  again (with backoff) when it ends: a participant restart is a reconnection, and the
  tail the participant repeats is suppressed by the ``logstream.Tracker``. ``SETTLE``
  seconds after each (re)connection the node's buffered lines are read once more
  through the tracker: a participant takes the tail it sends before it subscribes to
  new lines, and a line read in between would otherwise be in neither. A client
  that reconnects with ``Last-Event-ID`` (to this or any other coordinator, e.g. after a
  leader change) gets no backlog, only what follows its cursor. The node tasks never
  wait for the client: they put events in a bounded queue (``QUEUE``) with
  ``send_nowait``, and a line over the subscriber's rate (``logstream.RateLimit``) or
  finding the queue full is dropped and counted; the writer reports the counts as
  ``dropped`` events. A slow reader thus never slows a participant, an app or the proxy.
  The set of nodes is looked at again every ``NODES_REFRESH`` seconds, so a node the app
  is scaled onto is followed too.

``EventStream`` is the ASGI response that runs a follow: it owns a nursery for the node
tasks and ends them all when the client disconnects.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import structlog
import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from superagent.coordinator.api_common import Context, error
from superagent.coordinator.api_fleet import reported
from superagent.coordinator.host import ApiHost
from superagent.coordinator.logstream import (
    TAIL_FETCH,
    LogQuery,
    RateLimit,
    Redactor,
    Tracker,
    decode_id,
    encode_id,
    env_of,
    from_participant,
    line_doc,
    parse_query,
)
from superagent.debug import DROPPED_NOTE, Cursor, LogLine, merge_key
from superagent.rpc import messages as msg
from superagent.rpc.errors import RpcError

log = structlog.get_logger(__name__)

QUERY_TIMEOUT = 10.0  # seconds one participant has to answer a query
KEEPALIVE = 15.0  # seconds of quiet before a keep-alive comment (proxies close idle streams)
QUEUE = 1000  # events queued for one subscriber before new lines are dropped
WRITE_BATCH = 200  # queued events sent in one write (one chunk, one syscall)
NODES_REFRESH = 2.0  # seconds between looks at which nodes run the app
RETRY_MIN, RETRY_MAX = 0.2, 2.0  # seconds before following a lost node again (doubling)
SETTLE = 0.5  # seconds after a node's stream starts before its buffers are read once more
RECENT_DEPLOYS = 3  # an app's deploys whose nodes are asked too (see app_nodes)
KEEP_RELEASES = 5  # recent releases whose [env] values are hidden too (older lines)
Write = Callable[[bytes], Awaitable[None]]


class LogReader(Protocol):
    """What the logs API uses of the participant client (``rpc.client.ParticipantClient``)."""

    async def logs(self, address: str, query: msg.LogsQuery, *,
                   timeout: float = ...) -> msg.LogsReply: ...

    def follow(self, address: str, query: msg.LogsQuery) -> Any: ...


def reader(c: ApiHost) -> LogReader:
    return cast(LogReader, c.participants)


def redactor(c: ApiHost, apps: list[str] | None = None) -> Redactor:
    """Hides the ``[env]`` values of ``apps`` (None: of every app) and of their releases."""
    def find(s: Any) -> dict[str, str]:
        env: dict[str, str] = {}
        for app in (s.apps if apps is None else apps):
            if app in s.apps:
                for release in s.releases.get(app, [])[-KEEP_RELEASES:]:
                    env.update(env_of(getattr(release, "spec", None)))
                env.update(env_of(s.apps[app].spec))
        return env
    found: dict[str, str] = c.read(find)
    return Redactor(found)


# ---------------------------------------------------------------------- which machines
def app_nodes(c: ApiHost, app: str) -> dict[str, str]:
    """Node -> RPC address of every registered node running ``app``, placed to run it or
    reached by one of its recent deploys."""
    instances = reported(c) or {}
    running = {node for node, found in instances.items()
               if any(i.get("app") == app for i in found)}

    def find(s: Any) -> dict[str, str]:
        names = set(s.placement.get(app, {})) | running
        # a follower has no heartbeats, and an app scaled per node has no placement: the
        # nodes its recent deploys went to are in the replicated state all the same
        recent = sorted((d for d in s.deploys.values() if d.app == app),
                        key=lambda d: d.created_at)[-RECENT_DEPLOYS:]
        for deploy in recent:
            names |= {str(step.get("node")) for step in deploy.record.get("steps", ())
                      if isinstance(step, dict)}
        return {n: s.nodes[n].address for n in sorted(names) if n in s.nodes}
    found: dict[str, str] = c.read(find)
    return found


def up_nodes(c: ApiHost) -> dict[str, str]:
    """Node -> RPC address of every node that is up (a trace of no named app asks all)."""
    found: dict[str, str] = c.read(lambda s: {n: node.address for n, node in
                                              sorted(s.nodes.items()) if node.up})
    return found


async def gather(c: ApiHost, nodes: dict[str, str], query: msg.LogsQuery
                 ) -> tuple[list[LogLine], dict[str, str]]:
    """Every node's lines for ``query`` (labelled with their node, merged by time) and
    each node's outcome: ``"ok"`` or the error that kept its lines away."""
    found: dict[str, list[LogLine]] = {}
    outcome: dict[str, str] = {}

    async def one(node: str, address: str) -> None:
        try:
            with trio.fail_after(QUERY_TIMEOUT):
                reply = await reader(c).logs(address, query, timeout=QUERY_TIMEOUT)
        except (RpcError, trio.TooSlowError) as exc:
            outcome[node] = str(exc) or type(exc).__name__
            return
        lines = [line for doc in reply.lines if (line := from_participant(doc, node))]
        found[node] = sorted(lines, key=merge_key)
        outcome[node] = "ok"

    async with trio.open_nursery() as nursery:
        for node, address in nodes.items():
            nursery.start_soon(one, node, address)
    merged = sorted((line for lines in found.values() for line in lines), key=merge_key)
    return merged, dict(sorted(outcome.items()))


# ---------------------------------------------------------------------- the handler
async def app_logs(request: Request, ctx: Context) -> Response:
    """The app's last lines (``follow=1``: and then new ones, as server-sent events)."""
    c = ctx.coordinator
    app = request.path_params["app"]
    if not c.read(lambda s: app in s.apps):
        return error(404, "unknown_app", f"app {app!r} does not exist")
    query = parse_query(dict(request.query_params), app=app)
    if query.follow:
        raw_id = request.headers.get("last-event-id")
        cursor = decode_id(raw_id) if raw_id else None  # a 400 before the stream starts
        return EventStream(lambda write: follow(c, query, cursor, write))
    lines, nodes = await gather(c, app_nodes(c, app), query.participant_query())
    kept = [line for line in lines if query.matches(line)][-query.n:]
    hide = redactor(c, [app])
    return JSONResponse({"app": app, "lines": [hide(line_doc(line)) for line in kept],
                         "nodes": nodes})


def event(kind: str, doc: dict[str, Any], *, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(doc)}\n\n".encode()


class _Drops:
    """Lines dropped for one subscriber, by reason; ``news`` says what was not reported."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {"rate": 0, "queue": 0}
        self.events = 0  # gap and node events lost to a full queue
        self._reported = dict(self.counts)
        self._events_reported = 0

    def news(self) -> dict[str, Any] | None:
        fresh = {k: v - self._reported[k] for k, v in self.counts.items()
                 if v > self._reported[k]}
        events = self.events - self._events_reported
        if not fresh and not events:
            return None
        self._reported, self._events_reported = dict(self.counts), self.events
        return {"dropped": sum(fresh.values()), "by_reason": fresh,
                "total": sum(self.counts.values()), "events_lost": events}


async def follow(c: ApiHost, query: LogQuery, cursor: Cursor | None, write: Write) -> None:
    """Run one follow until the client goes away (see the module docstring)."""
    tracker = Tracker(cursor, contiguous=query.request_id is None)
    limit = RateLimit()
    drops = _Drops()
    hide = redactor(c, [query.app or ""])
    send, receive = trio.open_memory_channel[bytes](QUEUE)
    app = query.app or ""
    nodes = app_nodes(c, app)
    if cursor is None:  # a fresh follow: the last lines first, in time order
        lines, _ = await gather(c, nodes, query.participant_query(
            n=max(query.n, TAIL_FETCH)))
        shown = {id(line) for line in [x for x in lines if query.matches(x)][-query.n:]}
        backlog = []
        for line in lines:
            tracker.admit(line)
            if id(line) in shown:
                backlog.append(event("line", hide(line_doc(line)), event_id=encode_id(
                    tracker.cursor())))
    else:
        backlog = []
    await write(event("open", {"app": app, "nodes": sorted(nodes),
                               "resumed": cursor is not None}))
    for chunk in backlog:
        await write(chunk)

    def offer(chunk: bytes, *, line: bool) -> None:
        try:
            send.send_nowait(chunk)
        except trio.WouldBlock:
            if line:
                drops.counts["queue"] += 1
            else:
                drops.events += 1

    def take(line: LogLine) -> None:
        new, gap = tracker.admit(line)
        if gap is not None:
            offer(event("gap", gap.to_json()), line=False)
        if not new or not query.matches(line):
            return
        if not limit.take(time.monotonic()):
            drops.counts["rate"] += 1
            return
        offer(event("line", hide(line_doc(line)), event_id=encode_id(tracker.cursor())),
              line=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_nodes, c, query, nodes, take, offer)
        while True:
            item: bytes | None = None
            with trio.move_on_after(KEEPALIVE):  # only the wait: a write is never cut
                item = await receive.receive()
            chunks = [item] if item is not None else [b": keep-alive\n\n"]
            while len(chunks) < WRITE_BATCH:  # what else is queued goes in the same write
                try:
                    chunks.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            news = drops.news()
            if news is not None:
                chunks.insert(0, event("dropped", news))
            await write(b"".join(chunks))


async def _watch_nodes(c: ApiHost, query: LogQuery, nodes: dict[str, str],
                       take: Callable[[LogLine], None],
                       offer: Callable[..., None]) -> None:
    """Follow every node running the app, starting on nodes that come (and again on
    a node whose address changed)."""
    followed: dict[str, tuple[str, trio.CancelScope]] = {}
    async with trio.open_nursery() as nursery:
        while True:
            for node, address in nodes.items():
                known = followed.get(node)
                if known is not None and known[0] == address:
                    continue
                if known is not None:
                    known[1].cancel()
                scope = trio.CancelScope()
                followed[node] = (address, scope)
                nursery.start_soon(_follow_node, c, query, node, address, scope, take, offer)
            await trio.sleep(NODES_REFRESH)
            nodes = app_nodes(c, query.app or "")


async def _follow_node(c: ApiHost, query: LogQuery, node: str, address: str,
                       scope: trio.CancelScope, take: Callable[[LogLine], None],
                       offer: Callable[..., None]) -> None:
    """One node's stream, followed again whenever it ends, until cancelled."""
    wanted = query.participant_query(n=TAIL_FETCH)
    backoff, lost = RETRY_MIN, False
    with scope:
        async with trio.open_nursery() as nursery:
            while True:
                nursery.start_soon(_settle, c, query, node, address, take)
                try:
                    async for doc in reader(c).follow(address, wanted):
                        if lost:
                            offer(event("node", {"node": node, "state": "following"}),
                                  line=False)
                            lost, backoff = False, RETRY_MIN
                        if doc.get("type") == DROPPED_NOTE:
                            # the participant's queue for us overflowed (a burst): what
                            # its buffers still hold is fetched now, the rest is a gap
                            await _catch_up(c, query, node, address, take)
                            continue
                        line = from_participant(doc, node)
                        if line is not None:
                            take(line)
                    problem = "the participant ended the stream"
                except RpcError as exc:
                    problem = str(exc)
                if not lost:
                    lost = True
                    offer(event("node", {"node": node, "state": "lost", "error": problem}),
                          line=False)
                    log.info("log stream of a node lost", node=node, error=problem)
                await trio.sleep(backoff)
                backoff = min(RETRY_MAX, backoff * 2)


async def _settle(c: ApiHost, query: LogQuery, node: str, address: str,
                  take: Callable[[LogLine], None]) -> None:
    """Shortly after a node's stream (re)started, read its buffered lines through the
    tracker: a participant takes the tail it sends before it subscribes to new lines, so
    a line read in between would be in neither (what the stream sent is dropped as seen)."""
    await trio.sleep(SETTLE)
    await _catch_up(c, query, node, address, take)


async def _catch_up(c: ApiHost, query: LogQuery, node: str, address: str,
                    take: Callable[[LogLine], None]) -> None:
    """Read ``node``'s buffered lines through the tracker: those the client lacks are
    sent (after a gap event for what the buffers no longer have)."""
    try:
        with trio.fail_after(QUERY_TIMEOUT):
            reply = await reader(c).logs(address, query.participant_query(n=TAIL_FETCH),
                                         timeout=QUERY_TIMEOUT)
    except (RpcError, trio.TooSlowError):
        return  # the next lines' sequence numbers tell the gap
    lines = [line for doc in reply.lines if (line := from_participant(doc, node))]
    for line in sorted(lines, key=merge_key):
        take(line)


class EventStream(Response):
    """An ASGI response running ``run(write)`` as a ``text/event-stream`` body until it
    returns or the client disconnects (which cancels it)."""

    media_type = "text/event-stream"

    def __init__(self, run: Callable[[Write], Awaitable[None]]) -> None:
        self.run = run
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": self.raw_headers})

        async def write(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        async with trio.open_nursery() as nursery:
            async def disconnected() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(disconnected)
            with contextlib.suppress(OSError):  # the client's socket went away mid-write
                await self.run(write)
            nursery.cancel_scope.cancel()
        with trio.move_on_after(1.0):
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
