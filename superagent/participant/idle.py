"""Scale to zero on one machine: when an app goes idle, and its cold starts (pure).

Theory of operation. An app whose ``[scale] idle_timeout`` is above 0 is watched by the
agent: once a second it reads the proxy's figures (requests answered per app, requests
and tunnels in flight per instance) into ``ActivityWatch.observe``. An app none of whose
instances had a request in flight, and that answered no new request, for
``idle_timeout`` seconds is ``due``. The agent then marks its instances draining in the
proxy and reads their in-flight counts *after* the mark (a worker counts a request in the
same step it picks the instance, so none can slip between): any request or tunnel in
flight aborts the idling (``busy``) and the instances are routed again. Otherwise the app's
route keeps no instance, its instances stop, and it is ``idle``: it keeps its route, its
prepared release and its place in the cluster (the heartbeat reports its stopped
instances as ``idle``, which the coordinator counts as running).

A request for an idle app is held by the proxy, which asks the agent (``wake``) to start
it. The agent decides alone, with no coordinator round trip: ``starting``, then
``serving`` once the new instances are ready and routed, or ``failed`` with the reason
(the held requests get a 503 naming it; a wake within ``FAILED_RETRY`` seconds of a
failure is refused at once rather than starting again).

A cold start must fit the node's ``--capacity`` (instances running at once). The
coordinator's scheduler keeps room for one (an idle app takes none, but each node keeps a
reserve for the largest of them); a second one on a full node is made room for here:
``make_room`` picks the other scale-to-zero apps with nothing in flight to idle first,
least recently used first, just enough of them; when even all of them would not do,
nothing is idled and the start fails with ``node at capacity: N/N running``. The agent
idles the first pick and asks again (with the apps it tried left out), so an app a
request reached meanwhile, which stays up, gives way to the next in line.

``ColdApp`` is one app's record; its ``phase`` changes only through ``ColdApp.on``, a
transition table whose illegal moves raise ``IllegalTransition`` naming phase and event.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from superagent.participant.errors import IllegalTransition

FAILED_RETRY: Final = 5.0  # seconds a failed cold start refuses wakes (the 503's Retry-After)


class Phase(enum.Enum):
    STOPPING = "stopping"  # draining and stopping its instances
    IDLE = "idle"  # nothing runs; a request wakes it
    STARTING = "starting"  # a cold start runs
    FAILED = "failed"  # the last cold start failed; nothing runs
    SERVING = "serving"  # woken: the record is about to be dropped


class Event(enum.Enum):
    STOPPED = "stopped"
    BUSY = "busy"  # a request arrived while it was stopping
    WAKE = "wake"
    READY = "ready"
    FAILED = "failed"


_TRANSITIONS: Final = {
    (Phase.STOPPING, Event.STOPPED): Phase.IDLE,
    (Phase.STOPPING, Event.BUSY): Phase.SERVING,
    (Phase.IDLE, Event.WAKE): Phase.STARTING,
    (Phase.FAILED, Event.WAKE): Phase.STARTING,
    (Phase.STARTING, Event.READY): Phase.SERVING,
    (Phase.STARTING, Event.FAILED): Phase.FAILED,
}


@dataclass(kw_only=True, slots=True)
class ColdApp:
    """An app scaled to zero on this machine (or on its way there)."""

    app: str
    release: str
    ids: tuple[str, ...]  # its stopped instances: reported as idle, started again as many
    phase: Phase = Phase.STOPPING
    reason: str = ""  # why the last cold start failed
    failed_at: float = 0.0
    wanted: bool = False  # woken while stopping: start once stopped
    # its cold start passed the capacity check: until its instances run, the room they
    # will take counts for the other cold starts (one not checked yet takes none)
    fitted: bool = False

    def __repr__(self) -> str:
        return f"<ColdApp {self.app}@{self.release} {self.phase.value} x{len(self.ids)}>"

    def on(self, event: Event, *, now: float = 0.0, reason: str = "") -> Phase:
        """Move to the phase ``event`` leads to; raises IllegalTransition."""
        new = _TRANSITIONS.get((self.phase, event))
        if new is None:
            raise IllegalTransition(f"idle record of {self.app!r}: no transition from"
                                    f" {self.phase.value} on {event.value}", app=self.app)
        self.phase = new
        self.fitted = False  # a new start is checked again
        if new is Phase.FAILED:
            self.reason = reason
            self.failed_at = now
        return new

    def wake(self, now: float) -> tuple[bool, str]:
        """A request waits: (True, "") when it may be served (a start begins or runs, or
        begins once stopped), (False, reason) while a recent failure refuses wakes."""
        if self.phase is Phase.FAILED and now - self.failed_at < FAILED_RETRY:
            return False, self.reason
        if self.phase in (Phase.IDLE, Phase.FAILED):
            self.on(Event.WAKE)
        elif self.phase is Phase.STOPPING:
            self.wanted = True
        return True, ""

    @property
    def state(self) -> str:
        """What status shows: idle, starting or serving."""
        return "starting" if self.phase is Phase.STARTING else (
            "serving" if self.phase is Phase.SERVING else "idle")

    def to_json(self) -> dict[str, Any]:
        return {"app": self.app, "release": self.release, "ids": list(self.ids),
                "reason": self.reason}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ColdApp:
        """A persisted record: idle again (a start or stop under way died with the agent)."""
        return cls(app=str(doc["app"]), release=str(doc["release"]),
                   ids=tuple(str(i) for i in doc["ids"]), phase=Phase.IDLE,
                   reason=str(doc.get("reason", "")))


@dataclass(kw_only=True, slots=True)
class _Seen:
    requests: int
    active_at: float


@dataclass(kw_only=True, slots=True)
class ActivityWatch:
    """When each watched app last had traffic, from the proxy's periodic figures."""

    seen: dict[str, _Seen] = field(default_factory=dict)

    def observe(self, app: str, now: float, *, requests: int, in_flight: int) -> None:
        """``requests``: answered so far (a counter); ``in_flight``: requests and tunnels
        open now. The first observation counts as activity."""
        last = self.seen.get(app)
        if last is None:
            self.seen[app] = _Seen(requests=requests, active_at=now)
        elif in_flight > 0 or requests != last.requests:
            last.requests = requests
            last.active_at = now

    def touch(self, app: str, now: float) -> None:
        """``app`` is active now (woken, or found busy)."""
        last = self.seen.get(app)
        if last is not None:
            last.active_at = now

    def forget(self, app: str) -> None:
        self.seen.pop(app, None)

    def due(self, now: float, timeouts: dict[str, float]) -> list[str]:
        """The apps idle for at least their timeout (> 0), sorted."""
        return sorted(app for app, timeout in timeouts.items()
                      if timeout > 0 and (last := self.seen.get(app)) is not None
                      and now - last.active_at >= timeout)


def app_counts(stats: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    """From merged proxy figures: requests answered per app, in flight per app."""
    requests: dict[str, int] = {}
    for (app, _status), count in stats.get("requests", {}).items():
        requests[app] = requests.get(app, 0) + int(count)
    in_flight: dict[str, int] = {}
    for info in stats.get("instances", {}).values():
        app = info.get("app")
        if isinstance(app, str):
            in_flight[app] = in_flight.get(app, 0) + int(info.get("in_flight", 0))
    return requests, in_flight


@dataclass(frozen=True, kw_only=True, slots=True)
class Evictable:
    """A serving scale-to-zero app that a cold start may idle to make room."""

    app: str
    instances: int  # the running instances idling it stops: the room it frees
    active_at: float  # its last traffic (``ActivityWatch``)
    in_flight: int = 0  # requests and tunnels open now: such an app is never picked


@dataclass(frozen=True, kw_only=True, slots=True)
class Room:
    """``make_room``'s answer: the apps to idle first (in that order), or why the start
    cannot fit (``reason``; then nothing is to be idled)."""

    evict: tuple[str, ...] = ()
    reason: str = ""

    @property
    def fits(self) -> bool:
        return not self.reason


def make_room(*, capacity: int, running: int, wanted: int,
              candidates: Sequence[Evictable]) -> Room:
    """Room for ``wanted`` more instances on a node running ``running`` of ``capacity``:
    nothing to do when they fit; else the least recently used ``candidates`` with nothing
    in flight (ties by name), just enough of them; a reason when even all would not do."""
    need = running + wanted - capacity
    if need <= 0:
        return Room()
    evict: list[str] = []
    for candidate in sorted(candidates, key=lambda c: (c.active_at, c.app)):
        if need <= 0:
            break
        if candidate.in_flight == 0 and candidate.instances > 0:
            evict.append(candidate.app)
            need -= candidate.instances
    if need > 0:
        more = f" ({wanted} to start)" if running < capacity else ""
        return Room(reason=f"node at capacity: {running}/{capacity} running{more}")
    return Room(evict=tuple(evict))
