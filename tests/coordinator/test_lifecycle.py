"""Tests for superagent.coordinator.lifecycle: the node lifecycle transition table."""

from __future__ import annotations

import pytest

from superagent.coordinator.errors import IllegalTransition
from superagent.coordinator.lifecycle import TRANSITIONS, Lifecycle, next_lifecycle

L = Lifecycle
ALLOWED = {(L.ONLINE, L.DRAINING), (L.DRAINING, L.ONLINE), (L.DRAINING, L.OFFLINE),
           (L.OFFLINE, L.ONLINE)}


@pytest.mark.parametrize("state", list(L))
@pytest.mark.parametrize("event", list(L))
def test_transition_table(state: Lifecycle, event: Lifecycle) -> None:
    """Exactly the listed transitions are allowed; the rest name state and event."""
    if (state, event) in ALLOWED:
        assert next_lifecycle(state, event) is event
    else:
        with pytest.raises(IllegalTransition) as info:
            next_lifecycle(state, event, node="n1")
        assert (info.value.state, info.value.event) == (state.value, event.value)
        assert state.value in str(info.value) and event.value in str(info.value)
        assert info.value.status_hint == 409


def test_table_matches_policy() -> None:
    """The table holds nothing beyond the documented policy."""
    assert set(TRANSITIONS) == ALLOWED
