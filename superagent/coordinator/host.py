"""What the API, the deploy runner and the reconciler use of a coordinator: ``Protocol``s.

``Coordinator`` (``service.py``) wires Raft, the artifact store, membership, the API, the
deploy runner and the reconciler. The API (``api.py``), the runner (``deploy/runner.py``)
and the reconciler (``reconciler.py``) need only a part of it, and depending on that part
rather than on the class keeps the modules out of an import cycle (service → api →
service) and lets tests hand the runner and the reconciler small fakes. ``Coordinator``
satisfies the protocols structurally; mypy checks it where it passes itself to
``api_app``, ``DeployRunner`` and ``Reconciler``.

The two constants the API shares with the service's forwarding live here for the same
reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import trio

from superagent.coordinator import commands as cmd
from superagent.coordinator.artifacts import ArtifactStore
from superagent.coordinator.membership import Liveness
from superagent.coordinator.raft import RaftNode
from superagent.coordinator.state import ClusterState, Result
from superagent.manifest import AppSpec
from superagent.rpc.client import Participants

PROPOSE_TIMEOUT = 5.0  # one Raft round; retried with the same key within SUBMIT_TIMEOUT
APPLIED_INDEX = "_applied_index"  # a forwarded command's result: the leader's Raft index


class Identity(Protocol):
    """Who this coordinator is (its ``CoordinatorConfig``)."""

    @property
    def id(self) -> str: ...

    @property
    def peers(self) -> Mapping[str, str]: ...


class ApiIdentity(Identity, Protocol):
    @property
    def secret(self) -> str:
        """The coordinators' secret, which peers present (and nothing else holds)."""
        ...

    @property
    def data_dir(self) -> Path:
        """The coordinator's own directory (backups are staged under it)."""
        ...

    @property
    def raft_address(self) -> str: ...

    @property
    def url(self) -> str:
        """This coordinator's advertised API base URL."""
        ...

    @property
    def max_upload(self) -> int: ...

    @property
    def participant_secret(self) -> str:
        """The legacy secret shared by participants during a migration ("": none)."""
        ...


class RunnerHost(Protocol):
    """What the deploy runner (and ``begin_deploy``) uses."""

    @property
    def config(self) -> Identity: ...

    @property
    def participants(self) -> Participants:
        """The RPC client to participants (while the coordinator runs)."""
        ...

    def is_leader(self) -> bool: ...

    def term(self) -> int:
        """This node's current Raft term: the fence every signal carries."""
        ...

    def read(self, reader: Callable[[ClusterState], Any]) -> Any: ...

    async def submit(self, command: cmd.Command) -> Result: ...

    def command(self, cls: type[cmd.Command], *, actor: str, key: str | None = None,
                **fields: Any) -> cmd.Command: ...


class ReconcilerHost(RunnerHost, Protocol):
    """What the reconciler uses: the runner's part and the heartbeats' liveness."""

    @property
    def liveness(self) -> Liveness:
        """Last heartbeat (time and status) per node, while this coordinator leads."""
        ...


class ApiHost(ReconcilerHost, Protocol):
    """What the HTTP API uses, on top of the runner's and the reconciler's part."""

    @property
    def config(self) -> ApiIdentity: ...

    @property
    def raft(self) -> RaftNode: ...

    @property
    def store(self) -> ArtifactStore: ...

    @property
    def http(self) -> httpx.AsyncClient | None: ...

    @property
    def started_at(self) -> float: ...

    @property
    def requests(self) -> dict[tuple[str, int], int]: ...

    def leader_id(self) -> str | None: ...

    def leader_url(self) -> str | None: ...

    async def ensure_artifact(self, sha256: str) -> None: ...

    async def missing_artifacts(self) -> list[str]: ...

    async def replicate_artifact(self, sha256: str, size: int) -> None: ...

    async def barrier(self) -> None: ...

    def member_ids(self) -> dict[str, str]:
        """The current Raft members: coordinator id -> Raft address."""
        ...

    @property
    def membership_lock(self) -> trio.Lock: ...

    def committed(self, command: cmd.Command) -> None:
        """Called with each command a follower forwarded, once committed here."""
        ...

    async def heartbeat(self, node: str, status: dict[str, Any] | None) -> bool: ...

    async def store_release(self, chunks: AsyncIterator[bytes], *, app: str,
                            expected_sha256: str | None = None
                            ) -> tuple[str, int, AppSpec]: ...
