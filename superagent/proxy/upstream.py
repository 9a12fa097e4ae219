"""Upstream instances: keep-alive pools, in-flight counts, draining, balancing.

An ``Upstream`` outlives routing snapshots (it is keyed by instance id), so its
pool and its in-flight count survive a reload and a drain mark set through the
admin interface stays in force. Pooled connections are checked before reuse:
one idle longer than ``pool_idle_timeout`` is dropped (a server such as Node
closes idle keep-alive connections after 5 s, and reusing one in that race is
what turns into a client-visible error), and one that became readable while
idle (the upstream closed it or sent stray bytes) is dropped too.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable
from typing import Final

import trio

from superagent.proxy import netio
from superagent.proxy.errors import UpstreamError
from superagent.proxy.parsers import ResponseParser, response_parser
from superagent.proxy.snapshot import AppRoute, Instance, RoutingSnapshot

_PEEK: Final = socket.MSG_PEEK | socket.MSG_DONTWAIT
# Idle age after which a pooled connection is always peeked at: servers time idle
# connections out after seconds (gunicorn 2 s, Node 5 s), never within a busy second.
PEEK_AFTER: Final = 1.0


class UpstreamConn:
    """One TCP connection to an instance with its response parser; owned by the exchange
    using it or by the pool."""

    __slots__ = ("idle_since", "parser", "sock")

    def __init__(self, sock: socket.socket, parser: ResponseParser) -> None:
        self.sock = sock
        self.parser = parser
        self.idle_since = 0.0

    def __repr__(self) -> str:
        return f"<UpstreamConn fd={self.sock.fileno()} {self.parser!r}>"

    def close(self) -> None:
        netio.close(self.sock)

    def looks_alive(self) -> bool:
        """False when the idle connection has pending EOF or bytes: it cannot carry a request."""
        try:
            self.sock.recv(1, _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False


class Upstream:
    """An app instance as this worker sees it."""

    __slots__ = ("address", "app", "draining", "id", "idle", "outstanding", "removed",
                 "standby")

    def __init__(self, instance: Instance, app: str) -> None:
        self.id = instance.id
        self.app = app
        self.address = (instance.host, instance.port)
        self.standby = instance.standby
        self.draining = False
        self.removed = False
        self.outstanding = 0
        self.idle: list[UpstreamConn] = []

    def __repr__(self) -> str:
        flags = "".join((" draining" if self.draining else "", " removed" if self.removed else "",
                         " standby" if self.standby else ""))
        return (f"<Upstream {self.id} {self.address[0]}:{self.address[1]} app={self.app}"
                f" outstanding={self.outstanding} idle={len(self.idle)}{flags}>")

    def take_idle(self, now: float, max_idle_age: float, *, check: bool) -> UpstreamConn | None:
        """A pooled connection, or None; stale ones are closed on the way.

        ``check`` peeks at the socket (one syscall) to catch a connection the upstream
        closed (or sent a stray answer on) while it sat idle. The caller skips it for
        requests it may replay on a fresh connection when the pooled one yields no response
        byte — unless the connection sat idle long enough for a server to time it out.
        """
        idle = self.idle
        while idle:
            conn = idle.pop()
            age = now - conn.idle_since
            if age < max_idle_age and (
                    (not check and age < PEEK_AFTER) or conn.looks_alive()):
                return conn
            conn.close()
        return None

    def put_idle(self, conn: UpstreamConn, now: float, max_idle: int) -> None:
        if self.draining or self.removed or len(self.idle) >= max_idle:
            conn.close()
            return
        conn.idle_since = now
        self.idle.append(conn)

    def close_idle(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    async def connect(self, timeout: float, parser: str) -> UpstreamConn:
        """A new connection; raises UpstreamError (replayable: nothing was sent)."""
        try:
            with trio.fail_after(timeout):
                sock = await netio.connect(self.address)
        except trio.TooSlowError:
            raise UpstreamError(504, "upstream-connect-timeout",
                                f"connecting to instance {self.id} timed out",
                                replayable=True) from None
        except OSError as exc:
            raise UpstreamError(502, "upstream-connect-failed",
                                f"cannot connect to instance {self.id}: {exc.strerror}",
                                replayable=True) from None
        return UpstreamConn(sock, response_parser(parser))


class Upstreams:
    """Every instance of the current snapshot, by id; picks one per request."""

    __slots__ = ("_by_app", "_turn", "by_id", "retiring")

    def __init__(self) -> None:
        self.by_id: dict[str, Upstream] = {}
        # Instances a snapshot removed while requests to them were still in flight: kept
        # (for the in-flight counts a drain waits on) until those requests end.
        self.retiring: dict[str, Upstream] = {}
        self._by_app: dict[str, list[Upstream]] = {}
        # Each worker starts its tie-breaking rotation elsewhere: with several workers and
        # light traffic, equal starts would send every worker's first picks to one instance.
        self._turn = random.randrange(1 << 16)

    def __repr__(self) -> str:
        return f"<Upstreams {len(self.by_id)} instances>"

    def update(self, snapshot: RoutingSnapshot) -> None:
        """Adopt a new snapshot: keep known instances (pools, counts, drain marks)."""
        seen: dict[str, Upstream] = {}
        by_app: dict[str, list[Upstream]] = {}
        for app in snapshot.apps:
            members = by_app.setdefault(app.name, [])
            for inst in app.instances:
                up = self.by_id.get(inst.id) or self.retiring.pop(inst.id, None)
                if up is not None and up.removed and up.address == (inst.host, inst.port) \
                        and up.app == app.name:
                    up.removed = False  # routed again while its last requests were running
                elif up is None or up.address != (inst.host, inst.port) or up.app != app.name:
                    if up is not None:
                        up.removed = True
                        up.close_idle()
                    up = Upstream(inst, app.name)
                up.standby = inst.standby
                seen[inst.id] = up
                members.append(up)
        for inst_id, up in self.by_id.items():
            if seen.get(inst_id) is not up:
                up.removed = True
                up.close_idle()
                if up.outstanding:
                    self.retiring[inst_id] = up
        self.by_id = seen
        self._by_app = by_app
        self.prune_retiring()

    def prune_retiring(self) -> None:
        for inst_id in [i for i, up in self.retiring.items() if not up.outstanding]:
            del self.retiring[inst_id]

    def all(self) -> list[Upstream]:
        """Every instance the worker knows: routed ones, then retiring ones."""
        self.prune_retiring()
        return [*self.by_id.values(),
                *(up for i, up in self.retiring.items() if i not in self.by_id)]

    def pick(self, app: AppRoute, exclude: Iterable[str] = ()) -> Upstream | None:
        """The routed, non-draining instance with the fewest requests in flight (ties
        rotate); when there is none (or all are in ``exclude``), a standby (the warm
        instances a switch replaced, draining or not) rather than a refusal. Draining
        instances that are no standby never get a new request."""
        members = self._by_app.get(app.name)
        if not members:
            return None
        n = len(members)
        self._turn += 1
        best: Upstream | None = None
        fallback: Upstream | None = None
        for i in range(n):
            up = members[(self._turn + i) % n]
            if up.id in exclude:
                continue
            if up.standby:
                if fallback is None or up.outstanding < fallback.outstanding:
                    fallback = up
            elif up.draining:
                continue
            elif best is None or up.outstanding < best.outstanding:
                best = up
        return best if best is not None else fallback

    def set_draining(self, instance_id: str, draining: bool) -> Upstream | None:
        up = self.by_id.get(instance_id) or self.retiring.get(instance_id)
        if up is not None:
            up.draining = draining
            if draining:
                up.close_idle()  # stop reusing a draining instance's connections at once
        return up

    def close_all(self) -> None:
        for up in self.by_id.values():
            up.close_idle()
