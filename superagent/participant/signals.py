"""Fencing and idempotency for the signals the agent takes.

Every signal carries the sender's Raft ``term`` and a signal ``id``. The ledger

- refuses a term older than the newest it has seen (``StaleTerm``): a leader
  deposed while its signal was in flight must not act after its successor;
- remembers each signal's result by id, so a sender that retries after a
  timeout gets the first result and nothing is done twice. Results are kept for
  the newest ``capacity`` signals; ids older than that are forgotten (a retry
  comes seconds after the original, not thousands of signals later);
- knows which ids are in progress, so a retry that arrives while the original
  still runs waits for it (``wait``) instead of starting the work again.

The caller persists ``to_json()`` with the rest of the agent's state: the
newest term and the recent results survive an agent restart.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import trio

from superagent.participant.errors import SignalError, StaleTerm
from superagent.rpc.server import DONE, NEW, RUNNING

CAPACITY = 1000  # results remembered: far more than the signals of one retry window
_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,200}")



class SignalLedger:
    """Term fencing and per-id results (see the module docstring)."""

    def __init__(self, *, newest_term: int = 0, capacity: int = CAPACITY) -> None:
        self.newest_term = newest_term
        self.capacity = capacity
        self._results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._running: dict[str, trio.Event] = {}

    def __repr__(self) -> str:
        return (f"<SignalLedger term={self.newest_term} results={len(self._results)}"
                f" running={sorted(self._running)}>")

    def admit(self, signal_id: object, term: object) -> tuple[str, dict[str, Any] | None]:
        """``(NEW, None)`` to act on a signal (it is then RUNNING until ``finish``),
        ``(DONE, result)`` for a repeat, ``(RUNNING, None)`` while the original runs.

        Raises SignalError for a malformed id or term, StaleTerm for an old term.
        """
        if not isinstance(signal_id, str) or _ID.fullmatch(signal_id) is None:
            raise SignalError("a signal needs an 'id': 1-200 letters, digits or ._:@/+=-")
        if isinstance(term, bool) or not isinstance(term, int) or term < 0:
            raise SignalError("a signal needs a 'term': a non-negative integer")
        if term < self.newest_term:
            raise StaleTerm(term, self.newest_term)
        self.newest_term = term
        result = self._results.get(signal_id)
        if result is not None:
            return DONE, result
        if signal_id in self._running:
            return RUNNING, None
        self._running[signal_id] = trio.Event()
        return NEW, None

    def finish(self, signal_id: str, result: dict[str, Any]) -> None:
        """Record the result of a signal admitted as NEW; wakes retries waiting for it."""
        self._results[signal_id] = result
        while len(self._results) > self.capacity:
            self._results.popitem(last=False)
        event = self._running.pop(signal_id, None)
        if event is not None:
            event.set()

    def abandon(self, signal_id: str) -> None:
        """The signal failed without a result worth repeating: a retry may act anew."""
        event = self._running.pop(signal_id, None)
        if event is not None:
            event.set()

    async def wait(self, signal_id: str) -> dict[str, Any] | None:
        """Wait for a RUNNING signal; its result, or None if it was abandoned."""
        event = self._running.get(signal_id)
        if event is not None:
            await event.wait()
        return self._results.get(signal_id)

    def to_json(self) -> dict[str, Any]:
        return {"newest_term": self.newest_term, "results": dict(self._results)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], *, capacity: int = CAPACITY) -> SignalLedger:
        ledger = cls(newest_term=int(doc.get("newest_term", 0)), capacity=capacity)
        for signal_id, result in dict(doc.get("results", {})).items():
            ledger._results[str(signal_id)] = dict(result)
        return ledger
