"""The membership routes on a real single-coordinator cluster: bad input is a 400 naming it."""

from __future__ import annotations

from tests.coordinator import test_api
from tests.coordinator.test_api import Api

api = test_api.api  # the fixture: a real single-node coordinator


async def test_adding_a_coordinator_at_an_impossible_port_is_a_400(api: Api) -> None:
    """A Raft address whose port no socket can have is bad input, named as such (not a
    refusal for want of a majority, nor a member no one can ever reach)."""
    answer = await api.call("POST", "/api/v1/cluster/members",
                            json={"id": "c9", "raft": "127.0.0.1:99999"})
    assert answer.status_code == 400, answer.text
    assert "99999" in answer.json()["detail"]
