"""The coordinator process: Raft, the artifact store, membership and the API, wired together.

Theory of operation. Every coordinator runs the same code; Raft decides which one leads.

- **Writes** become commands. ``submit`` proposes a command on the leader, or forwards its
  JSON to the leader's ``/api/v1/internal/propose`` when this node follows; either way the
  command carries an idempotency key, so a retry after a timeout or a leader change applies
  it once. ``submit`` keeps retrying (same key) until ``SUBMIT_TIMEOUT`` while there is no
  leader, then answers ``NoLeader`` (503).
- **Where the leader is.** Raft knows the leader's Raft address; peers map it to a
  coordinator id (``--peers``), and each coordinator registers its API URL in the
  replicated state (``RegisterCoordinator``) once a leader exists, so every node can
  forward to the leader's API.
- **Artifacts.** An upload is checked with the participant's archive rules
  (``superagent.tarcheck``: paths, links, devices, member count, unpacked size, ratio) and
  refused with a 400 naming the member before it is stored; an accepted one is stored
  here, then replicated to a majority of coordinators before its release is committed. A
  coordinator asked for a blob it lacks fetches it from a peer first.
- **Membership.** Participants register (a Raft write) and heartbeat (memory of the
  leader only; see ``membership``). The leader's ``_watch_nodes`` loop commits
  ``NodeDown``/``NodeUp`` transitions.
- **Acting.** The leader's ``DeployRunner`` drives deploys; its ``Reconciler`` keeps the
  placement committed and the participants running what it says (see ``reconciler``).
- **The admin token** is created by the first leader of a new cluster: committed as a
  hash, printed once on stdout (and written to ``admin_token_file`` when configured).
"""

from __future__ import annotations

import contextlib
import secrets
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog
import trio

from superagent.backoff import Backoff
from superagent.coordinator import commands as cmd
from superagent.coordinator.api import api_app
from superagent.coordinator.api_cluster import clear_staging
from superagent.coordinator.artifacts import DEFAULT_MAX_BYTES, ArtifactStore, Peer, replicate
from superagent.coordinator.auth import new_token, token_hash, write_private
from superagent.coordinator.autoscale import DEFAULT_TIMING, AutoTiming
from superagent.coordinator.backup import needed_artifacts
from superagent.coordinator.deploy.outcomes import WATCH_WINDOW
from superagent.coordinator.deploy.runner import DeployRunner
from superagent.coordinator.errors import (
    BadArchive,
    CoordinatorError,
    ForwardRefused,
    NoLeader,
    RaftError,
    UnknownArtifact,
)
from superagent.coordinator.host import APPLIED_INDEX, PROPOSE_TIMEOUT
from superagent.coordinator.membership import Liveness
from superagent.coordinator.raft import ELECTION_TIMEOUT, RaftNode
from superagent.coordinator.reconciler import DRAIN_WAIT, Reconciler
from superagent.coordinator.state import ClusterState, Result
from superagent.errors import ArchiveOverLimit, ArchiveRefused, ConfigError
from superagent.httpserver import check_bindable, serve_app
from superagent.manifest import AppSpec, manifest_from
from superagent.rpc.client import ParticipantClient, Participants
from superagent.tarcheck import check_archive

log = structlog.get_logger(__name__)

SUBMIT_TIMEOUT = 10.0  # a write waits this long for a leader before answering 503
SUBMIT_RETRY_FIRST = 0.05  # an election ends within a few hundred ms: retry soon at first
SUBMIT_RETRY_MAX = 0.5  # then every half second, so a leader is found soon after one exists
REPLICATE_TIMEOUT = 60.0  # an artifact reaches a majority of coordinators within this
NODE_TIMEOUT = 10.0  # a participant silent this long is marked down
WATCH_PERIOD = 0.5  # how often the leader checks liveness and its own registration
MANIFEST_MAX = 1024 * 1024  # bytes of a manifest read from an uploaded tarball
CATCH_UP_TIMEOUT = 2.0  # a follower waits this long to apply what it forwarded
# how often a coordinator looks for release blobs it lacks (one that joined, or missed a
# replication) and fetches them from a peer: a new member holds every artifact soon
ARTIFACT_SYNC_PERIOD = 2.0


@dataclass(frozen=True)
class CoordinatorConfig:
    """Settings of ``superagent coordinator``."""

    id: str
    peers: dict[str, str]  # coordinator id -> Raft address, this one included
    api: tuple[str, int]
    data_dir: Path
    secret: str  # the coordinators' own: Raft password, peer calls; never on a participant
    api_url: str = ""  # advertised base URL; default http://<api host>:<api port>
    admin_token_file: Path | None = None
    node_timeout: float = NODE_TIMEOUT
    max_upload: int = DEFAULT_MAX_BYTES
    # a draining node keeps its instances this long (the front load balancer sees its
    # /-/healthz answer 503 and stops sending), then the reconciler moves them
    drain_wait: float = DRAIN_WAIT
    # the autoscalers' windows and cooldowns (--autoscale-timing; defaults: autoscale's)
    autoscale: AutoTiming = DEFAULT_TIMING
    # a deploy's last batch watches its new instances this long after their switch before
    # the old ones go (--watch-window; default outcomes.WATCH_WINDOW)
    watch_window: float = WATCH_WINDOW
    # Raft's election timeout bounds, seconds (pysyncobj's defaults). No option sets it: it
    # is for code that runs a coordinator in-process, such as the test suite's single-node
    # ones, whose first election need not wait up to 1.4 s
    election_timeout: tuple[float, float] = ELECTION_TIMEOUT
    extra: dict[str, Any] = field(default_factory=dict)
    # the secret participants shared before machine credentials (a migration; "": none)
    participant_secret: str = ""

    @property
    def raft_address(self) -> str:
        return self.peers[self.id]

    @property
    def url(self) -> str:
        if self.api_url:
            return self.api_url.rstrip("/")
        host = f"[{self.api[0]}]" if ":" in self.api[0] else self.api[0]
        return f"http://{host}:{self.api[1]}"


class Coordinator:
    """One coordinator (see the module docstring)."""

    def __init__(self, config: CoordinatorConfig) -> None:
        if config.id not in config.peers:
            raise ConfigError(f"--id {config.id!r} is not one of --peers", key="peers")
        self.config = config
        self.raft = RaftNode(config.raft_address, list(config.peers.values()),
                             secret=config.secret, data_dir=config.data_dir / "raft",
                             state=ClusterState(), election_timeout=config.election_timeout)
        self.store = ArtifactStore(config.data_dir / "artifacts", max_bytes=config.max_upload)
        self.liveness = Liveness(config.node_timeout, period=WATCH_PERIOD)
        self.http: httpx.AsyncClient | None = None
        self._participants: ParticipantClient | None = None
        self.started_at = time.time()
        self.requests: dict[tuple[str, int], int] = {}  # (method, status) -> count
        self.membership_lock = trio.Lock()  # one change of the coordinators at a time
        self.deploys = DeployRunner(self, watch_window=config.watch_window)
        self.reconciler = Reconciler(self, drain_wait=config.drain_wait,
                                     autoscale=config.autoscale)
        self._log = log.bind(coordinator=config.id)

    def __repr__(self) -> str:
        return f"<Coordinator {self.config.id} api={self.config.url} raft={self.raft!r}>"

    # ------------------------------------------------------------------ lifecycle
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Start Raft and serve the API until cancelled."""
        check_bindable(self.config.api, key="--api")
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        await trio.to_thread.run_sync(clear_staging, self.config.data_dir)
        await trio.to_thread.run_sync(self.raft.start)
        try:
            # to peers with the coordinators' secret; to participants each with its own key
            async with httpx.AsyncClient(
                    timeout=httpx.Timeout(10.0, connect=2.0),
                    headers={"authorization": f"Bearer {self.config.secret}"}) as http, \
                    httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0),
                                      trust_env=False) as to_nodes:
                self.http = http
                self._participants = ParticipantClient(to_nodes, credentials=self.signal_key)
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.raft.watch)
                    await nursery.start(serve_app, api_app(self), self.config.api)
                    nursery.start_soon(self._register_self)
                    nursery.start_soon(self._init_admin_token)
                    nursery.start_soon(self._watch_nodes)
                    nursery.start_soon(self._sync_artifacts)
                    nursery.start_soon(self.deploys.run)
                    await nursery.start(self.reconciler.run)
                    self._log.info("coordinator ready", api=self.config.url,
                                   raft=self.config.raft_address,
                                   peers=sorted(self.config.peers))
                    task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.raft.close)
            self._log.info("coordinator stopped")

    # ------------------------------------------------------------------ reads
    def read(self, reader: Callable[[ClusterState], Any]) -> Any:
        """Run ``reader`` on the replicated state (never while a command applies)."""
        return self.raft.read_state(reader)  # type: ignore[arg-type]

    def is_leader(self) -> bool:
        return self.raft.is_leader()

    def term(self) -> int:
        term: int = self.raft.status()["term"]
        return term

    @property
    def participants(self) -> Participants:
        """The RPC client to participants; only while ``run`` runs."""
        assert self._participants is not None, "the coordinator is not running"
        return self._participants

    def member_ids(self) -> dict[str, str]:
        """The current Raft members as coordinator id -> Raft address: the ids from
        ``--peers`` and those added at run time (the replicated ``members``); a member
        no one named yet appears under its address."""
        names = {address: cid for cid, address in self.config.peers.items()}
        names.update({address: cid for cid, address in self.read(lambda s: s.members).items()})
        return {names.get(address, address): address for address in self.raft.members()}

    def leader_id(self) -> str | None:
        address = self.raft.leader()
        if address is None:
            return None
        return next((cid for cid, a in self.member_ids().items() if a == address), address)

    def leader_url(self) -> str | None:
        """The leader's API URL, once it has registered it."""
        if self.is_leader():
            return self.config.url
        cid = self.leader_id()
        if cid is None:
            return None
        url: str | None = self.read(lambda s: s.coordinators.get(cid))
        return url

    def peer_urls(self) -> dict[str, str | None]:
        """Every other coordinator's API URL (None until it registered)."""
        known: dict[str, str] = self.read(lambda s: dict(s.coordinators))
        return {cid: known.get(cid) for cid in sorted(self.member_ids()) if cid != self.config.id}

    def signal_key(self, address: str) -> str | None:
        """The bearer of signals to the participant at ``address``: its signal key; the
        legacy participant secret for a node enrolled before machine credentials; None
        (the participant refuses the signal) for a revoked node."""
        def find(s: ClusterState) -> str | None:
            for name, node in s.nodes.items():
                if node.address == address:
                    if s.trust.revoked(name):
                        return None
                    return s.trust.signal_key(name) or self.config.participant_secret or None
            return self.config.participant_secret or None
        found: str | None = self.read(find)
        return found

    # ------------------------------------------------------------------ writes
    async def submit(self, command: cmd.Command) -> Result:
        """Commit ``command`` on the leader, wherever it is; returns the state's result.

        Raises NoLeader when no leader could take it within SUBMIT_TIMEOUT.
        """
        text = command.to_json()
        deadline = trio.current_time() + SUBMIT_TIMEOUT
        backoff = Backoff(SUBMIT_RETRY_FIRST, SUBMIT_RETRY_MAX)
        while True:
            try:
                if self.is_leader():
                    result = await self.raft.propose(text, PROPOSE_TIMEOUT)
                    self.committed(command)
                    return result
                url = self.leader_url()
                if url is not None:
                    return await self._forward_command(url, text)
            except RaftError as exc:  # NotLeader, a timeout: retry with the same key
                self._log.info("submit retry", key=command.key, reason=exc.reason)
            except (httpx.HTTPError, _Misdirected) as exc:
                self._log.info("forward retry", key=command.key, error=repr(exc))
            delay = backoff.next()
            if trio.current_time() + delay > deadline:
                raise NoLeader(node=self.config.id, waited=SUBMIT_TIMEOUT)
            await trio.sleep(delay)

    def committed(self, command: cmd.Command) -> None:
        """``command`` was just committed through this node while it leads (submitted here
        or forwarded by a follower): a new deploy is driven at once."""
        if isinstance(command, cmd.StartDeploy):
            self.deploys.wake()

    async def _forward_command(self, url: str, text: str) -> Result:
        assert self.http is not None
        response = await self.http.post(f"{url}/api/v1/internal/propose", content=text,
                                        headers={"content-type": "application/json"},
                                        timeout=PROPOSE_TIMEOUT)
        if response.status_code in (421, 502, 503, 504):  # not (or no longer) the leader
            raise _Misdirected(f"{url} answered {response.status_code}")
        try:
            result: Result = response.json()
        except ValueError:
            raise _Misdirected(f"{url} answered {response.status_code}, not JSON") from None
        if response.status_code != 200:  # refused as such (a bad secret, a bad command)
            raise ForwardRefused(f"the leader at {url} refused the command:"
                                 f" {result.get('detail', result)}",
                                 status=response.status_code)
        index = result.pop(APPLIED_INDEX, 0)
        with trio.move_on_after(CATCH_UP_TIMEOUT):  # read-your-writes on this follower
            while self.raft.status()["last_applied"] < index:
                await trio.sleep(0.005)
        return result

    async def barrier(self) -> None:
        """Return once this node has applied every entry committed before the call (after a
        restart the log is replayed in the background): a command goes through the log, and
        entries apply in order. Registering our own URL again changes nothing."""
        await self.submit(self.command(cmd.RegisterCoordinator,
                                       actor=f"coordinator:{self.config.id}",
                                       coordinator=self.config.id, api_url=self.config.url))

    def command(self, cls: type[cmd.Command], *, actor: str, key: str | None = None,
                **fields: Any) -> cmd.Command:
        """A command stamped with the time and a fresh (or the client's) idempotency key."""
        return cls(key=key or secrets.token_hex(16), at=time.time(), actor=actor, **fields)

    # ------------------------------------------------------------------ artifacts
    async def store_release(self, chunks: AsyncIterator[bytes], *, app: str,
                            expected_sha256: str | None = None) -> tuple[str, int, AppSpec]:
        """Store an uploaded tarball, read its manifest, replicate it to a majority.

        The archive is checked with the participant's rules (``superagent.tarcheck``) before
        it is installed in the store: a bad one leaves no blob, no release, no replica.

        Raises ArtifactTooLarge (413), ChecksumMismatch (400), BadArchive (400, naming the
        member), ConfigError (bad manifest), NoQuorum (503).
        """
        artifact = await self.store.put(chunks, expected_sha256=expected_sha256,
                                        check=_check_archive)
        path = self.store.path(artifact.sha256)
        try:
            spec = await trio.to_thread.run_sync(_manifest_of_tarball, path, app)
            await replicate(artifact.sha256, artifact.size, self.store, self._artifact_peers(),
                            timeout=REPLICATE_TIMEOUT)
        except BaseException:
            # nothing is recorded: keep no blob that no release names
            if not self.read(lambda s: any(r.sha256 == artifact.sha256
                                           for rs in s.releases.values() for r in rs)):
                with trio.CancelScope(shield=True):
                    await self.store.remove(artifact.sha256)
            raise
        return artifact.sha256, artifact.size, spec

    async def replicate_artifact(self, sha256: str, size: int) -> None:
        """Send a blob stored here to peers until a majority holds it; raises NoQuorum."""
        await replicate(sha256, size, self.store, self._artifact_peers(),
                        timeout=REPLICATE_TIMEOUT)

    def _artifact_peers(self) -> list[Peer]:
        return [self._peer_sender(cid, url) for cid, url in self.peer_urls().items()]

    def _peer_sender(self, cid: str, url: str | None) -> Peer:
        async def send(sha256: str, path: Path) -> None:
            if url is None:
                raise ConnectionError(f"coordinator {cid} has not registered its API URL")
            assert self.http is not None
            response = await self.http.put(
                f"{url}/api/v1/internal/artifacts/{sha256}",
                content=self.store.open_chunks(sha256), timeout=REPLICATE_TIMEOUT)
            response.raise_for_status()
        return send

    async def ensure_artifact(self, sha256: str) -> None:
        """Make sure the blob is stored here, fetching it from a peer that has it."""
        if await self.store.has(sha256):
            return
        assert self.http is not None
        for cid, url in self.peer_urls().items():
            if url is None:
                continue
            try:
                async with self.http.stream(
                    "GET", f"{url}/api/v1/artifacts/{sha256}",
                    headers={"x-superagent-no-fetch": "1"},
                    timeout=REPLICATE_TIMEOUT,
                ) as response:
                    if response.status_code != 200:
                        continue
                    await self.store.put(response.aiter_bytes(), expected_sha256=sha256)
                    self._log.info("artifact fetched from peer", sha256=sha256, peer=cid)
                    return
            except (httpx.HTTPError, CoordinatorError) as exc:
                self._log.warning("artifact fetch from peer failed", sha256=sha256, peer=cid,
                                  error=repr(exc))
        raise UnknownArtifact(sha256)

    async def missing_artifacts(self) -> list[str]:
        """The blobs the replicated releases name that this coordinator does not hold."""
        needed: set[str] = self.read(needed_artifacts)
        def lacking() -> list[str]:  # one thread hop for all of them
            return sorted(sha for sha in needed if not self.store.path(sha).is_file())
        return await trio.to_thread.run_sync(lacking)

    async def _sync_artifacts(self) -> None:
        """Fetch, from a peer, every release blob this coordinator lacks (see
        ARTIFACT_SYNC_PERIOD); a blob no peer has yet is tried again next round."""
        while True:
            for sha256 in await self.missing_artifacts():
                try:
                    await self.ensure_artifact(sha256)
                except CoordinatorError as exc:
                    self._log.info("artifact not synced yet", sha256=sha256, error=str(exc))
            await trio.sleep(ARTIFACT_SYNC_PERIOD)

    # ------------------------------------------------------------------ membership
    async def heartbeat(self, node: str, status: dict[str, Any] | None) -> bool:
        """Record a heartbeat on the leader; False when the node is not registered."""
        known: bool = self.read(lambda s: node in s.nodes)
        if known:
            self.liveness.beat(node, trio.current_time(), status)
        return known

    async def _watch_nodes(self) -> None:
        """Every WATCH_PERIOD, while leading: observe (Liveness) and commit the nodes that
        went down or came back. Commits run beside the loop, one per node at a time, so a
        slow commit never delays the next observation (a late one reads as a stall)."""
        leading = False
        committing: set[str] = set()

        async def commit(name: str, cls: type[cmd.NodeUp | cmd.NodeDown]) -> None:
            try:
                await self.submit(self.command(cls, actor=f"coordinator:{self.config.id}",
                                               node=name))
            except CoordinatorError as exc:
                self._log.warning("node liveness not committed", node=name, error=str(exc))
            else:
                self._log.info("node liveness", node=name, up=cls is cmd.NodeUp)
            finally:
                committing.discard(name)

        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(WATCH_PERIOD)
                now = trio.current_time()
                if self.is_leader() != leading:
                    leading = not leading
                    if leading:
                        self.liveness.lead(now)
                    else:
                        self.liveness.follow()
                if not leading:
                    continue
                # a revoked node stays down, whatever heartbeats came before the revocation
                up = self.read(lambda s: {n.name: n.up for n in s.nodes.values()
                                          if not s.trust.revoked(n.name)})
                down, back = self.liveness.due(up, now)
                for name, cls in ([(n, cmd.NodeDown) for n in down]
                                  + [(n, cmd.NodeUp) for n in back]):
                    if name not in committing:
                        committing.add(name)
                        nursery.start_soon(commit, name, cls)

    # ------------------------------------------------------------------ bootstrap
    async def _register_self(self) -> None:
        """Put this coordinator's API URL in the replicated state, and keep it there."""
        while True:
            known = self.read(lambda s: s.coordinators.get(self.config.id))
            if known != self.config.url:
                with contextlib.suppress(CoordinatorError):
                    await self.submit(self.command(
                        cmd.RegisterCoordinator, actor=f"coordinator:{self.config.id}",
                        coordinator=self.config.id, api_url=self.config.url))
            await trio.sleep(WATCH_PERIOD)

    async def _init_admin_token(self) -> None:
        """The first leader of a new cluster creates the admin token and shows it once.

        The token is made once: a retry after a timeout that did commit is answered as a
        repeat of the same command, and the token is still shown. Another coordinator's
        token under the same key is a conflict: that one shows its own.
        """
        token = new_token()
        while not self.read(lambda s: bool(s.tokens)):
            await trio.sleep(WATCH_PERIOD)
            if not self.is_leader():
                continue
            try:
                result = await self.submit(self.command(
                    cmd.AddToken, actor=f"coordinator:{self.config.id}",
                    key="init:admin-token", name="admin", sha256=token_hash(token)))
            except RaftError:
                continue
            if result.get("ok"):
                self._show_token(token)
            return

    def _show_token(self, token: str) -> None:
        path = self.config.admin_token_file
        if path is not None:
            write_private(path, token + "\n")
        print(f"superagent: admin token (shown once): {token}", flush=True)
        self._log.info("admin token created", written_to=str(path) if path else None)


class _Misdirected(Exception):
    """The node a command was forwarded to could not take it (it stopped leading)."""


def _check_archive(path: Path) -> None:
    """Refuse an uploaded archive the participants would refuse; raises BadArchive."""
    try:
        check_archive(path)
    except ArchiveRefused as exc:
        # a name that is not UTF-8 arrives with surrogate escapes, which JSON cannot carry
        member = exc.member.encode("utf-8", "backslashreplace").decode("utf-8")
        raise BadArchive(str(exc), member=member,
                         over_limit=isinstance(exc, ArchiveOverLimit)) from None


def _manifest_of_tarball(path: Path, app: str) -> AppSpec:
    """The manifest at the root of a release tarball; raises ConfigError."""
    source = "upload"
    try:
        with tarfile.open(path, "r:*") as tf:
            members = {m.name.removeprefix("./"): m for m in tf.getmembers()}

            def read(name: str) -> bytes | None:
                member = members.get(name)
                if member is None or not member.isfile():
                    return None
                if member.size > MANIFEST_MAX:
                    raise ConfigError(f"{name} is over {MANIFEST_MAX} bytes", source=source)
                fh = tf.extractfile(member)
                return fh.read() if fh is not None else None

            return manifest_from(read, source=source, app=app)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ConfigError(f"not a readable tar archive: {exc}", source=source) from None
