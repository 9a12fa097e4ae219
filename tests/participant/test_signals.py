"""Term fencing and idempotent signals."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from superagent.participant.errors import SignalError, StaleTerm
from superagent.participant.signals import DONE, NEW, RUNNING, SignalLedger


def test_new_signal_then_repeat_returns_first_result() -> None:
    """A retried signal id gets the first result back instead of acting again."""
    ledger = SignalLedger()
    assert ledger.admit("s1", 3) == (NEW, None)
    ledger.finish("s1", {"started": ["hello@r1#1"]})
    assert ledger.admit("s1", 3) == (DONE, {"started": ["hello@r1#1"]})


def test_older_term_is_refused_and_names_both_terms() -> None:
    """A signal from a deposed leader (older term) is refused with 409."""
    ledger = SignalLedger()
    ledger.admit("a", 5)
    with pytest.raises(StaleTerm) as info:
        ledger.admit("b", 4)
    assert info.value.status_hint == 409
    assert "term 4" in str(info.value) and "term 5" in str(info.value)
    assert ledger.admit("c", 6) == (NEW, None)
    with pytest.raises(StaleTerm):
        ledger.admit("d", 5)


def test_same_term_is_accepted() -> None:
    """Signals of the current leader keep flowing at the same term."""
    ledger = SignalLedger(newest_term=7)
    assert ledger.admit("x", 7) == (NEW, None)


@pytest.mark.parametrize(("signal_id", "term"), [
    ("", 1), ("a b", 1), ("x" * 201, 1), (None, 1), (5, 1), ("ok", -1), ("ok", True),
    ("ok", "1"), ("ok", None),
])
def test_malformed_id_or_term_is_refused(signal_id: object, term: object) -> None:
    """A missing or malformed id or term is a 400 naming the field."""
    with pytest.raises(SignalError) as info:
        SignalLedger().admit(signal_id, term)
    assert info.value.status_hint == 400
    assert ("'id'" in str(info.value)) or ("'term'" in str(info.value))


async def test_retry_during_the_original_waits_for_its_result() -> None:
    """A retry arriving while the original runs waits and gets the same result."""
    ledger = SignalLedger()
    assert ledger.admit("slow", 1) == (NEW, None)
    assert ledger.admit("slow", 1) == (RUNNING, None)
    got: list[object] = []

    async def retry() -> None:
        got.append(await ledger.wait("slow"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(retry)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        ledger.finish("slow", {"ok": True})
    assert got == [{"ok": True}]


async def test_abandoned_signal_can_be_retried_anew() -> None:
    """A signal that failed without a result may be acted on again by its retry."""
    ledger = SignalLedger()
    ledger.admit("s", 1)
    ledger.abandon("s")
    assert await ledger.wait("s") is None
    assert ledger.admit("s", 1) == (NEW, None)


def test_capacity_forgets_the_oldest_results() -> None:
    """Only the newest results are remembered."""
    ledger = SignalLedger(capacity=3)
    for i in range(5):
        ledger.admit(f"s{i}", 1)
        ledger.finish(f"s{i}", {"i": i})
    assert ledger.admit("s4", 1)[0] == DONE
    assert ledger.admit("s0", 1) == (NEW, None)


def test_state_survives_a_restart_through_json() -> None:
    """The newest term and the recent results are persisted and restored."""
    ledger = SignalLedger()
    ledger.admit("s1", 9)
    ledger.finish("s1", {"port": 41001})
    restored = SignalLedger.from_json(json.loads(json.dumps(ledger.to_json())))
    assert restored.admit("s1", 9) == (DONE, {"port": 41001})
    with pytest.raises(StaleTerm):
        restored.admit("s2", 8)
