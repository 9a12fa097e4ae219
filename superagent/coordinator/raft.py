"""Raft replication of the coordinator state machine, on pysyncobj.

Theory of operation. This is the only module that imports pysyncobj. A ``RaftNode`` owns one
``_Replica`` (a ``SyncObj`` subclass) with exactly one ``@replicated`` method, ``_apply``, whose
only argument is a command's JSON text; applying it calls ``StateMachine.apply`` and the returned
dict is the command's result on every node.

Threads. pysyncobj runs its own tick thread, which exits as soon as the thread that *constructed*
the SyncObj exits. So ``start()`` constructs it on a dedicated "raft-owner" thread that lives until
``close()``; every state-machine call (apply, snapshot, restore) happens on the tick thread.
``propose()`` (trio) hands the command to pysyncobj's queue and waits on a ``trio.Event`` that the
tick thread sets through ``TrioToken.run_sync_soon``. A leader without peers would commit
each entry only at the tick after the one that appended it, after up to ``autoTickPeriod``
(50 ms) asleep in the poller; ``_Replica`` wakes the tick thread at once while a proposal
of ours waits (with peers, their answers wake it).

Persistence. ``journalFile`` keeps the log; ``fullDumpFile`` keeps log-compaction snapshots. The
snapshot does not go through pysyncobj's default pickling of the SyncObj's ``__dict__``: we pass
our own ``serializer``/``deserializer`` hooks, which write a JSON document holding
``StateMachine.to_json()`` plus the two log entries pysyncobj needs to resume (their command bytes
in base64). We chose the hooks over "keep the state as a JSON string attribute" because the
attribute would have to be re-encoded on every apply (O(state) per command) to be current when
pysyncobj snapshots; the hooks encode it only at compaction time. Nothing of ours is pickled;
pysyncobj still pickles its own messages and journal entries (whose payload is our JSON string),
which is why the password is mandatory: it encrypts and authenticates the Raft port.

Who can reach the Raft port. The password is derived from the coordinators' secret, which
only coordinators hold (participants have their own credentials, docs/coordinator.md
"Trust"). pysyncobj checks every frame with Fernet (HMAC-SHA256 over the ciphertext)
*before* it unpickles it and drops the connection on a frame that fails, so a peer without
the secret never gets a byte unpickled (tests/coordinator/test_raft_port.py shows it). The
port binds exactly the configured address (``bindAddress``), not every interface, which is
pysyncobj's default.

Membership. The members are given at the first start (``--peers``) and changed at run time
with pysyncobj's dynamic membership (``dynamicMembershipChange``): ``change_membership``
appends one ``add``/``rem`` entry on the leader, which takes effect on each node when it
appends the entry and commits under the new configuration; pysyncobj itself refuses a
second change while one is uncommitted. pysyncobj does not replay membership entries of
the journal at a restart: a node starts with the members it is given, and loading a dump
resets them to the dump's. So every node records the members it last saw in
``members.json`` in its data dir (``watch`` writes it on every change) and starts from
that file when it exists, in preference to ``--peers``; the first dump loaded at start
keeps the file's members too (later dumps, sent by a leader, carry the leader's).

Leadership. ``leaderFallbackTimeout`` is ~2 s, so a leader cut off from a quorum demotes itself
within about 2 s (the library default is 30 s). The election timeout is the library's 0.4-1.4 s
unless the node is given other bounds (``election_timeout``). Proposals are accepted only on the
leader; a follower raises ``NotLeader`` naming the leader (pysyncobj would silently forward them).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

import structlog
import trio

from superagent.coordinator import _pysyncobj_import  # before pysyncobj: see the module
from superagent.coordinator.errors import NotLeader, RaftError, RaftTimeout

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated  # isort: skip
from pysyncobj.pipe_notifier import PipeNotifier  # isort: skip
from pysyncobj.node import TCPNode  # isort: skip

_pysyncobj_import.restore()

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: A leader that has not heard from a quorum for this long steps down (library default: 30 s).
LEADER_FALLBACK_TIMEOUT = 2.0
#: Reconnect to a lost partner after this long (library default 5 s slows recovery after restarts).
CONNECTION_RETRY_TIME = 1.0
#: A follower that hears no leader for a random time between these two bounds (seconds)
#: starts an election; a new cluster's first leader, a single node's included, is elected
#: that long after start. pysyncobj's defaults; ``CoordinatorConfig.election_timeout`` sets
#: others (the test suite's single-node coordinators use a short one).
ELECTION_TIMEOUT = (0.4, 1.4)
#: pysyncobj's heartbeat period and connection timeout (its defaults, left as they are):
#: an election timeout must exceed three heartbeats and not exceed the connection timeout.
APPEND_ENTRIES_PERIOD = 0.1
CONNECTION_TIMEOUT = 3.5
#: How often ``watch`` samples the status; leadership changes are logged within this delay.
WATCH_PERIOD = 0.1
#: Bound on how long ``start()``/``close()`` wait for the owner thread.
THREAD_START_TIMEOUT = 10.0
#: Label HMAC'd with the coordinators' secret to derive the Raft password (domain separation).
_PASSWORD_LABEL = b"superagent/raft/password/v1"
#: The members this node last saw (addresses), read at start in preference to ``--peers``.
MEMBERS_FILE = "members.json"
#: Version tag of our full-dump file format.
_DUMP_FORMAT = 1

_RAFT_LEADER_STATE = 2  # pysyncobj's _RAFT_STATE.LEADER

# pysyncobj failure codes -> (reason tag, may the command still have committed?)
_FAILURES: dict[int, tuple[str, bool]] = {
    FAIL_REASON.QUEUE_FULL: ("queue_full", False),
    FAIL_REASON.MISSING_LEADER: ("missing_leader", False),
    FAIL_REASON.DISCARDED: ("discarded", False),
    FAIL_REASON.NOT_LEADER: ("not_leader", True),
    FAIL_REASON.LEADER_CHANGED: ("leader_changed", True),
    FAIL_REASON.REQUEST_DENIED: ("request_denied", False),
    FAIL_REASON.UNKNOWN_OUTCOME: ("unknown_outcome", True),
}


class StateMachine(Protocol):
    """What Raft replicates: deterministic ``apply`` and a JSON snapshot codec."""

    def apply(self, command_json: str) -> dict[str, Any]:
        """Apply one committed command; must be deterministic and must not raise."""
        ...

    def to_json(self) -> str:
        """Encode the whole state (used for snapshots)."""
        ...

    @classmethod
    def from_json(cls, text: str) -> Self:
        """Decode a state written by ``to_json``."""
        ...


def derive_password(secret: str) -> str:
    """The pysyncobj password for the coordinators' secret (hex HMAC-SHA256 of a label)."""
    return hmac.new(secret.encode(), _PASSWORD_LABEL, hashlib.sha256).hexdigest()


@dataclass
class _Holder:
    """The current state machine; replaced wholesale when a snapshot is restored."""

    state: StateMachine
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Replica(SyncObj):  # type: ignore[misc]
    """The SyncObj: one replicated method, and the single-node commit nudge (below)."""

    def __init__(
        self, self_address: str, peers: list[str], conf: SyncObjConf, holder: _Holder
    ) -> None:
        self._holder = holder  # set before SyncObj.__init__: the tick thread may apply at once
        self._outstanding = 0  # our commands whose result has not come back yet
        self._count_lock = threading.Lock()  # the caller's thread adds, the tick thread takes
        self._nudge: PipeNotifier | None = None  # made on the tick thread, which owns the poller
        self._calls: list[Callable[[], None]] = []  # run on the tick thread (``on_tick``)
        super().__init__(self_address, peers, conf)

    def on_tick(self, call: Callable[[], None]) -> None:
        """Run ``call`` once on the tick thread, which alone may touch pysyncobj's state."""
        with self._count_lock:
            self._calls.append(call)

    def _applyCommand(self, command: Any, callback: Any, commandType: Any = None) -> None:
        if not callable(callback):  # a peer's forwarded command: answered by message
            super()._applyCommand(command, callback, commandType)
            return

        def answered(result: Any, error: int) -> None:
            with self._count_lock:
                self._outstanding -= 1
            callback(result, error)

        with self._count_lock:
            self._outstanding += 1
        super()._applyCommand(command, answered, commandType)

    def _checkCommandsToApply(self) -> None:
        """Append the queued commands to the log; alone, then wake the tick thread at once.

        A leader without peers commits an entry at the tick after the one that appended
        it, and between the two the tick thread sleeps up to ``autoTickPeriod`` (50 ms) in
        its poller: nothing else wakes it (with peers, their answers do). So every commit
        of a one-coordinator cluster took 50 ms; while a command of ours waits for its
        result the next tick starts at once instead (a single leader commits it there).
        """
        with self._count_lock:
            calls, self._calls = self._calls, []
        for call in calls:
            call()
        super()._checkCommandsToApply()
        if self._outstanding and not self.otherNodes and self._isLeader():
            if self._nudge is None:
                self._nudge = PipeNotifier(self._poller)
            self._nudge.notify()

    @replicated  # type: ignore[untyped-decorator]
    def _apply(self, command_json: str) -> dict[str, Any]:
        with self._holder.lock:
            return self._holder.state.apply(command_json)


def _encode_entry(entry: tuple[bytes, int, int]) -> list[Any]:
    command, index, term = entry
    return [base64.b64encode(command).decode("ascii"), index, term]


def _decode_entry(raw: list[Any]) -> tuple[bytes, int, int]:
    return (base64.b64decode(raw[0]), int(raw[1]), int(raw[2]))


def election_timeout_problem(bounds: tuple[float, float]) -> str:
    """What is wrong with ``bounds`` as an election timeout ("" when nothing): pysyncobj
    needs low > 3 heartbeats, high > low, and high <= its connection timeout."""
    low, high = bounds
    if not APPEND_ENTRIES_PERIOD * 3 < low < high <= CONNECTION_TIMEOUT:
        return (f"election timeout {low:g}..{high:g} s: need"
                f" {APPEND_ENTRIES_PERIOD * 3:g} < low < high <= {CONNECTION_TIMEOUT:g}")
    return ""


class RaftNode:
    """One member of the Raft cluster, replicating ``state``.

    Owns its pysyncobj instance and the thread that constructed it; ``start()`` then ``close()``.
    ``state`` may be replaced by a restored snapshot: read it through ``state`` / ``read_state``.
    """

    def __init__(
        self,
        self_address: str,
        peers: list[str],
        *,
        secret: str,
        data_dir: Path,
        state: StateMachine,
        election_timeout: tuple[float, float] = ELECTION_TIMEOUT,
    ) -> None:
        if not secret:
            raise ValueError("the coordinators' secret is required: the Raft port is unsafe"
                             " without one")
        problem = election_timeout_problem(election_timeout)
        if problem:
            raise ValueError(problem)
        self.election_timeout = election_timeout
        self.self_address = self_address
        self.data_dir = data_dir
        self.recorded = read_members(data_dir)  # the members seen before a restart
        if self.recorded is not None:
            peers = self.recorded
        self.peers = [p for p in peers if p != self_address]
        self._members_seen = sorted({self_address, *self.peers})
        # a dump of our own is loaded at start: it keeps the recorded members
        self._first_dump = (data_dir / "raft.dump").exists()
        self._holder = _Holder(state)
        self._password = derive_password(secret)
        self._replica: _Replica | None = None
        self._owner: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._start_error: BaseException | None = None
        self._log = log.bind(node=self_address)

    def __repr__(self) -> str:
        if self._replica is None:
            return f"<RaftNode {self.self_address} stopped>"
        s = self.status()
        return (
            f"<RaftNode {self.self_address} leader={s['leader']} term={s['term']} "
            f"commit={s['commit_index']} applied={s['last_applied']} quorum={s['has_quorum']}>"
        )

    # -- lifecycle -------------------------------------------------------------------------

    def _conf(self) -> SyncObjConf:
        return SyncObjConf(
            password=self._password,
            bindAddress=self.self_address,  # pysyncobj binds 0.0.0.0 unless told
            journalFile=str(self.data_dir / "raft.journal"),
            fullDumpFile=str(self.data_dir / "raft.dump"),
            appendEntriesUseBatch=False,
            leaderFallbackTimeout=LEADER_FALLBACK_TIMEOUT,
            raftMinTimeout=self.election_timeout[0],
            raftMaxTimeout=self.election_timeout[1],
            connectionRetryTime=CONNECTION_RETRY_TIME,
            dynamicMembershipChange=True,
            useFork=False,  # never fork a threaded trio process; snapshots are small JSON
            serializer=self._write_dump,
            deserializer=self._read_dump,
        )

    def _own(self) -> None:
        """Body of the owner thread: construct the SyncObj, then live until close()."""
        replica: _Replica | None = None
        try:
            replica = _Replica(self.self_address, self.peers, self._conf(), self._holder)
            self._replica = replica
        except BaseException as exc:  # handed to start()'s caller
            self._start_error = exc
        finally:
            self._ready.set()
        if replica is None:
            return
        self._stop.wait()
        replica.destroy_synchronous()

    def start(self) -> None:
        """Create the data dir and start the node (binds the Raft port). Raises RaftError."""
        if self._owner is not None:
            raise RaftError("RaftNode already started", reason="already_started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._owner = threading.Thread(
            target=self._own, name=f"raft-owner-{self.self_address}", daemon=True
        )
        self._owner.start()
        if not self._ready.wait(THREAD_START_TIMEOUT) or self._start_error is not None:
            raise RaftError(f"cannot start Raft node: {self._start_error!r}", reason="start")
        self._log.info("raft.started", peers=self.peers)

    def close(self) -> None:
        """Stop the tick thread and close connections; idempotent, blocks up to a few seconds."""
        self._stop.set()
        if self._owner is not None:
            self._owner.join(THREAD_START_TIMEOUT)
        self._replica = None

    # -- snapshot hooks (run on the tick thread) -------------------------------------------

    def _write_dump(self, filename: str, data: tuple[Any, Any, Any]) -> None:
        last_entry, prev_entry, cluster = data
        with self._holder.lock:
            state_json = self._holder.state.to_json()
        doc = {
            "format": _DUMP_FORMAT,
            "state": state_json,
            "last": _encode_entry(last_entry),
            "prev": _encode_entry(prev_entry),
            "cluster": sorted(node.address for node in cluster),
        }
        with open(filename, "w", encoding="utf-8") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())

    def _read_dump(self, filename: str) -> tuple[Any, Any, Any]:
        with open(filename, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("format") != _DUMP_FORMAT:
            raise ValueError(f"{filename}: unknown dump format {doc.get('format')!r}")
        with self._holder.lock:
            self._holder.state = type(self._holder.state).from_json(doc["state"])
        addresses = doc["cluster"]
        if self._first_dump and self.recorded is not None:
            # our own dump, older than the members we saw after it (see Membership)
            addresses = self.recorded
        self._first_dump = False
        cluster = {TCPNode(address) for address in addresses}
        return (_decode_entry(doc["last"]), _decode_entry(doc["prev"]), cluster)

    # -- queries ---------------------------------------------------------------------------

    def _running(self) -> _Replica:
        if self._replica is None:
            raise RaftError("Raft node is not running", reason="not_running")
        return self._replica

    @property
    def state(self) -> StateMachine:
        """The current state machine (mutated on the tick thread: use read_state to read it)."""
        return self._holder.state

    def read_state(self, reader: Callable[[StateMachine], T]) -> T:
        """Run ``reader`` on the state while no command is being applied."""
        with self._holder.lock:
            return reader(self._holder.state)

    def leader(self) -> str | None:
        """The last known leader's address (may be stale), or None."""
        node = self._running()._getLeader()
        return None if node is None else str(node.id)

    def is_leader(self) -> bool:
        """Whether this node currently believes it is the leader."""
        return bool(self._running()._isLeader())

    def members(self) -> list[str]:
        """Every member's Raft address as this node sees it now, itself included."""
        others = self._running().otherNodes
        return sorted({self.self_address, *(str(node.address) for node in others)})

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot: self, leader, is_leader, term, commit_index, last_applied,
        has_quorum, partners (address -> connected) and, on the leader, match_index
        (address -> the partner's matched log index)."""
        raw = self._running().getStatus()
        prefix, match = "partner_node_status_server_", "match_idx_server_"
        leader = raw["leader"]
        return {
            "self": self.self_address,
            "leader": None if leader is None else str(leader.id),
            "is_leader": raw["state"] == _RAFT_LEADER_STATE,
            "term": raw["raft_term"],
            "commit_index": raw["commit_idx"],
            "last_applied": raw["last_applied"],
            "has_quorum": bool(raw["has_quorum"]),
            "partners": {
                key[len(prefix):]: value == 2 for key, value in raw.items()
                if key.startswith(prefix)
            },
            # on the leader: how far each partner's log is known to match its own
            "match_index": {key[len(match):]: value for key, value in raw.items()
                            if key.startswith(match) and key != "match_idx_count"},
        }

    # -- trio bridge -----------------------------------------------------------------------

    async def propose(self, command_json: str, timeout: float) -> dict[str, Any]:
        """Replicate one command and return its result once committed and applied here.

        Raises NotLeader (with the leader's address) on a follower; RaftTimeout when no
        result came within ``timeout`` — the command may or may not have committed, so retry
        only with the same idempotency key; RaftError for other failures (``may_have_committed``
        tells which).
        """
        replica = self._running()
        if not replica._isLeader():
            raise NotLeader(self.leader(), node=self.self_address)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        outcome: list[tuple[Any, int]] = []

        def on_result(result: Any, error: int) -> None:  # runs on the tick thread
            outcome.append((result, error))
            with contextlib.suppress(trio.RunFinishedError):  # trio already gone: nobody waits
                token.run_sync_soon(done.set)

        replica._apply(command_json, callback=on_result)
        with trio.move_on_after(timeout):
            await done.wait()
        if not outcome:
            raise RaftTimeout(timeout, node=self.self_address)
        result, error = outcome[0]
        if error == FAIL_REASON.SUCCESS:
            return dict(result)
        reason, maybe = _FAILURES.get(error, (f"code_{error}", True))
        raise RaftError(
            f"Raft rejected the command: {reason}",
            reason=reason,
            may_have_committed=maybe,
            node=self.self_address,
        )

    async def change_membership(self, kind: str, address: str, timeout: float) -> None:
        """Add (``kind="add"``) or remove (``"remove"``) the member at ``address``; returns
        once the change committed. Only on the leader (NotLeader); RaftError
        ``request_denied`` when another change is still uncommitted or the change is void
        (already a member, not a member, this node); RaftTimeout."""
        replica = self._leading()
        change = replica.addNodeToCluster if kind == "add" else replica.removeNodeFromCluster
        error = await self._outcome(lambda done: change(address, callback=done), timeout)
        if error != FAIL_REASON.SUCCESS:
            reason, maybe = _FAILURES.get(error, (f"code_{error}", True))
            raise RaftError(f"Raft refused the membership change: {reason}", reason=reason,
                            may_have_committed=maybe, node=self.self_address)
        self._record_members()

    async def transfer_leadership(self, timeout: float) -> None:
        """Ask the most caught-up connected follower to take the leadership (Raft
        ``TimeoutNow``); returns once the request is sent. RaftError ``request_denied``
        when no follower is caught up, NotLeader on a follower."""
        replica = self._leading()
        error = await self._outcome(
            lambda done: replica.on_tick(
                lambda: replica.transferLeadership(None, callback=done)), timeout)
        if error != FAIL_REASON.SUCCESS:
            reason, _ = _FAILURES.get(error, (f"code_{error}", False))
            raise RaftError(f"Raft refused to hand the leadership over: {reason}",
                            reason=reason, node=self.self_address)

    def _leading(self) -> _Replica:
        replica = self._running()
        if not replica._isLeader():
            raise NotLeader(self.leader(), node=self.self_address)
        return replica

    async def _outcome(self, start: Callable[[Callable[[Any, int], None]], None],
                       timeout: float) -> int:
        """Start a pysyncobj request with ``start(callback)`` and wait up to ``timeout``
        for its callback (which runs on the tick thread); its error code, or RaftTimeout."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        outcome: list[int] = []

        def on_result(result: Any, error: int) -> None:  # runs on the tick thread
            outcome.append(error)
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        start(on_result)
        with trio.move_on_after(timeout):
            await done.wait()
        if not outcome:
            raise RaftTimeout(timeout, node=self.self_address)
        return outcome[0]

    def _record_members(self) -> None:
        """Write ``members.json`` when the members changed since it was last written."""
        members = self.members()
        if members != self._members_seen:
            write_members(self.data_dir, members)
            self._members_seen = members
            self._log.info("raft.members", members=members)

    async def watch(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Log leadership changes and quorum loss/regain, sampling every WATCH_PERIOD, and
        record the members whenever they change."""
        last = self.status()
        self._log.info("raft.status", leader=last["leader"], term=last["term"],
                       has_quorum=last["has_quorum"])
        task_status.started()
        while True:
            await trio.sleep(WATCH_PERIOD)
            now = self.status()
            self._record_members()
            if (now["leader"], now["is_leader"]) != (last["leader"], last["is_leader"]):
                self._log.info("raft.leader_changed", leader=now["leader"],
                               previous=last["leader"], is_leader=now["is_leader"],
                               term=now["term"])
            if now["has_quorum"] != last["has_quorum"]:
                event = "raft.quorum_regained" if now["has_quorum"] else "raft.quorum_lost"
                self._log.warning(event, term=now["term"], partners=now["partners"])
            last = now


def read_members(data_dir: Path) -> list[str] | None:
    """The members recorded in ``data_dir`` (see Membership), or None when none are."""
    try:
        doc = json.loads((data_dir / MEMBERS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RaftError(f"{data_dir / MEMBERS_FILE}: unreadable: {exc}",
                        reason="members_file") from None
    members = doc.get("members") if isinstance(doc, dict) else None
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise RaftError(f"{data_dir / MEMBERS_FILE}: no list of addresses under 'members'",
                        reason="members_file")
    return members


def write_members(data_dir: Path, members: list[str]) -> None:
    """Record ``members`` atomically (a crash leaves the old file or the new one)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / (MEMBERS_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"members": members}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, data_dir / MEMBERS_FILE)
