"""Unit tests of superagent/coordinator/membership.py: ``Liveness`` on trio's clock.

``Liveness`` is pure (every call takes ``now``), so the scenarios run it under
``MockClock(autojump_threshold=0)``: fake participants beat on ``trio.sleep`` and a fake
leader loop (the shape of the coordinator's ``_watch_nodes``) applies ``due`` to a dict that
stands in for the replicated ``up`` flags. Virtual time makes the timings exact and instant.
"""

from __future__ import annotations

import math

import trio
import trio.testing

from superagent.coordinator.membership import Liveness

TIMEOUT = 5.0  # node timeout of every Liveness here
PERIOD = 0.5  # the fake leader loop's period (the coordinator's WATCH_PERIOD)
BEAT = 1.0  # a fake participant's heartbeat interval
# The pure tests call ``due`` at whatever times they check, not every PERIOD: an endless
# period keeps those gaps from counting as the leader's stalls (tested on their own below).
ANY_PERIOD = math.inf


class FakeLeader:
    """The coordinator's watch loop without Raft: ``up`` is the replicated node table,
    ``transitions`` the NodeDown/NodeUp commands it would commit, stamped with the time."""

    def __init__(self, liveness: Liveness, nodes: list[str]) -> None:
        self.liveness = liveness
        self.up = dict.fromkeys(nodes, True)
        self.transitions: list[tuple[float, str, str]] = []

    def __repr__(self) -> str:
        return f"<FakeLeader up={self.up} transitions={self.transitions}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self.liveness.lead(trio.current_time())
        task_status.started()
        while True:
            await trio.sleep(PERIOD)
            now = trio.current_time()
            down, back = self.liveness.due(self.up, now)
            for name in down:
                self.up[name] = False
                self.transitions.append((now, name, "down"))
            for name in back:
                self.up[name] = True
                self.transitions.append((now, name, "up"))


async def beat(liveness: Liveness, node: str, until: float) -> None:
    """A participant heartbeating every ``BEAT`` s until (virtual) time ``until``."""
    while trio.current_time() < until:
        liveness.beat(node, trio.current_time(), {"instances": 0})
        await trio.sleep(BEAT)


def test_not_leading_knows_nothing() -> None:
    """Before ``lead`` nobody is alive and nothing is due, whatever was heard."""
    liveness = Liveness(TIMEOUT, ANY_PERIOD)
    liveness.beat("n1", 10.0)
    assert liveness.alive("n1", 10.0) is False
    assert liveness.due({"n1": True, "n2": False}, 10.0) == ([], [])


def test_the_start_of_leadership_counts_as_heard() -> None:
    """A node never heard from is alive until one timeout after the election, then down."""
    liveness = Liveness(TIMEOUT, ANY_PERIOD)
    liveness.lead(100.0)
    assert liveness.alive("n1", 100.0 + TIMEOUT)
    assert liveness.due({"n1": True}, 100.0 + TIMEOUT) == ([], [])
    assert not liveness.alive("n1", 100.0 + TIMEOUT + 0.01)
    assert liveness.due({"n1": True}, 100.0 + TIMEOUT + 0.01) == (["n1"], [])


def test_a_heartbeat_from_before_the_election_does_not_shorten_the_grace() -> None:
    """A stale ``last`` older than ``leader_since`` counts from the election instead."""
    liveness = Liveness(TIMEOUT, ANY_PERIOD)
    liveness.beat("n1", 1.0)
    liveness.lead(50.0)
    assert liveness.alive("n1", 50.0 + TIMEOUT)


def test_a_down_node_comes_back_only_once_heard() -> None:
    """``due`` marks a down node up only after a heartbeat this leader received itself."""
    liveness = Liveness(TIMEOUT, ANY_PERIOD)
    liveness.lead(0.0)
    assert liveness.due({"n1": False}, 1.0) == ([], [])  # alive by grace, but never heard
    liveness.beat("n1", 2.0)
    assert liveness.due({"n1": False}, 3.0) == ([], ["n1"])


def test_follow_forgets_and_status_and_age_are_kept() -> None:
    """``beat`` keeps a copy of the status; ``age`` measures from it; ``follow`` and
    ``forget`` drop what was known."""
    liveness = Liveness(TIMEOUT, ANY_PERIOD)
    liveness.lead(0.0)
    status = {"instances": 2}
    liveness.beat("n1", 3.0, status)
    liveness.beat("n2", 4.0)
    status["instances"] = 9  # the caller's dict: not aliased
    assert liveness.status == {"n1": {"instances": 2}}
    assert liveness.age("n1", 5.0) == 2.0
    assert liveness.age("n1", 1.0) == 0.0  # a clock read before the beat never goes negative
    assert liveness.age("n3", 5.0) is None
    liveness.forget("n1")
    assert (liveness.age("n1", 5.0), liveness.status) == (None, {})
    liveness.follow()
    assert (liveness.leader_since, liveness.last, liveness.status) == (None, {}, {})
    assert liveness.alive("n2", 4.0) is False


async def test_silent_node_goes_down_then_up_on_virtual_time(
        autojump_clock: trio.testing.MockClock) -> None:
    """n1 beats throughout; n2 stops at t=10 and is marked down on the first watch tick past
    its timeout, then up on the first tick after it beats again at t=30.2."""
    liveness = Liveness(TIMEOUT, PERIOD)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        leader = FakeLeader(liveness, ["n1", "n2"])
        await nursery.start(leader.run)
        nursery.start_soon(beat, liveness, "n1", start + 60.0)
        nursery.start_soon(beat, liveness, "n2", start + 10.0)
        await trio.sleep(30.2)  # between two watch ticks: no same-instant ordering to rely on
        assert leader.up == {"n1": True, "n2": False}, leader
        nursery.start_soon(beat, liveness, "n2", start + 60.0)
        await trio.sleep(5.0)
        nursery.cancel_scope.cancel()
    # n2's last beat was at t=9; silence exceeds TIMEOUT after t=14; the watch ticks every 0.5.
    # It beats again at t=30.2: up on the t=30.5 tick.
    assert [(at - start, node, what) for at, node, what in leader.transitions] == [
        (14.5, "n2", "down"), (30.5, "n2", "up")], leader


async def test_new_leader_gives_every_node_one_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    """After a change of leader nobody is marked down before one full timeout, even a node
    that was silent long before the election."""
    liveness = Liveness(TIMEOUT, PERIOD)
    liveness.beat("n1", trio.current_time())
    await trio.sleep(100.0)  # n1 silent for long, under a previous leader
    liveness.follow()
    elected = trio.current_time()
    async with trio.open_nursery() as nursery:
        leader = FakeLeader(liveness, ["n1"])
        await nursery.start(leader.run)
        await trio.sleep(TIMEOUT)
        assert leader.transitions == [], leader
        await trio.sleep(2 * PERIOD)
        nursery.cancel_scope.cancel()
    assert [(at - elected, node, what) for at, node, what in leader.transitions] == [
        (TIMEOUT + PERIOD, "n1", "down")], leader



def run_leader(liveness: Liveness, up: dict[str, bool], beats: dict[str, list[float]],
               stall: tuple[float, float], until: float, beats_first: bool = False
               ) -> list[tuple[float, str, str]]:
    """The leader's loop on a pure clock: ``due`` every PERIOD from t=0.5 to ``until``,
    except while it is stalled (``stall`` = from, to: the loop's next call is at ``to``);
    each node's beats are read at the given times (ones sent during the stall just after
    it). Returns the transitions, stamped."""
    liveness.lead(0.0)
    ticks = [round(PERIOD * k, 6) for k in range(1, int(until / PERIOD) + 1)]
    ticks = sorted({t for t in ticks if not stall[0] <= t < stall[1]} | {stall[1]})
    # beats sent during the stall are read just after it: after the loop's first call
    # (which wakes first, as it does in trio), unless ``beats_first``
    late = 0 if beats_first else 2
    events = sorted([(t, 1, "due") for t in ticks]
                    + [(stall[1], late, node) if stall[0] <= t < stall[1] else (t, 0, node)
                       for node, times in beats.items() for t in times])
    seen = []
    for at, _, what in events:
        if what != "due":
            liveness.beat(what, at)
            continue
        down, back = liveness.due(up, at)
        seen += [(at, name, "down") for name in down] + [(at, name, "up") for name in back]
        up.update({name: False for name in down} | {name: True for name in back})
    return seen


def test_the_leaders_own_stall_is_not_the_nodes_silence() -> None:
    """The leader does not run from t=3 to t=9, longer than TIMEOUT. n1 beats every second
    throughout (those sent during the stall are read right after it): it stays up. n2 fell
    silent at t=1: down the stall's 6 s later than without the stall (t=6.5)."""
    every_second = [float(t) for t in range(0, 20)]
    up = {"n1": True, "n2": True}
    seen = run_leader(Liveness(TIMEOUT, PERIOD), up, {"n1": every_second, "n2": [1.0]},
                      stall=(3.0, 9.0), until=15.0)
    assert seen == [(12.5, "n2", "down")]
    no_stall = run_leader(Liveness(TIMEOUT, PERIOD), {"n1": True, "n2": True},
                          {"n1": every_second, "n2": [1.0]}, stall=(0.0, 0.0), until=15.0)
    assert no_stall == [(6.5, "n2", "down")]


def test_a_beat_read_after_the_stall_is_not_forgiven_it() -> None:
    """A heartbeat read after the stall, before the leader's loop noticed it, gets no
    credit for the stall: when that node then falls silent it is down one TIMEOUT later."""
    seen = run_leader(Liveness(TIMEOUT, PERIOD), {"n1": True}, {"n1": [2.0, 8.5]},
                      stall=(3.0, 9.0), until=16.0, beats_first=True)
    assert seen == [(14.5, "n1", "down")]  # read at 9.0; silent for TIMEOUT at 14.0



def test_a_late_observation_is_a_stall_only_past_stall_gap_periods() -> None:
    """Scheduling jitter (a gap under STALL_GAP periods) is not a stall: n1, silent since
    0, is down on time. A judge that observes before the watch loop (the reconciler, after
    the stall) counts the stall once."""
    liveness = Liveness(TIMEOUT, PERIOD)
    liveness.lead(0.0)
    up = {"n1": True}
    assert [liveness.due(up, t) for t in (0.9, 1.8, 2.7, 3.6, 4.5)] == [([], [])] * 5
    assert liveness.due(up, 5.4) == (["n1"], [])
    assert liveness.blind == 0.0
    liveness = Liveness(TIMEOUT, PERIOD)
    liveness.lead(0.0)
    liveness.beat("n1", 0.0)
    assert liveness.due(up, 0.5) == ([], [])
    liveness.observe(9.0)  # a judge first, after a stall from 1.0
    assert liveness.due(up, 9.0) == ([], [])
    assert liveness.blind == 8.0
