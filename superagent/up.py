"""``superagent up``: the embedded single-machine cluster.

One process runs a single-node coordinator and one participant (whose proxy workers are
its children), with everything under ``./.superagent/``: the coordinator's secret (created
once, 0600; the participant never uses it), the participant's own credential (enrolled at
the first start with a join token this process makes and commits itself), the admin
token (written by the coordinator when the cluster is created), the Raft journal, the
artifacts, the releases and the logs. Running it again resumes the same cluster: apps
that had a release serving are deployed again through the saga (their releases are still
prepared, so nothing is rebuilt). ``--demo`` deploys the bundled demo app when it is not
there yet. Ctrl-C (or SIGTERM) stops the apps, the proxy and the coordinator, in that
order.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import structlog
import trio

from superagent.coordinator.auth import write_private
from superagent.coordinator.commands import AddJoinToken
from superagent.coordinator.deploy.outcomes import WATCH_WINDOW
from superagent.coordinator.deploy.runner import begin_deploy
from superagent.coordinator.raft import ELECTION_TIMEOUT
from superagent.coordinator.service import Coordinator, CoordinatorConfig
from superagent.errors import SuperagentError
from superagent.participant.service import Agent, AgentConfig
from superagent.rpc.credentials import (
    CREDENTIAL_FILE,
    credential_hash,
    new_join_token,
    read_credential,
)

log = structlog.get_logger(__name__)

NODE = "local"  # the coordinator's id; the participant's adds a hash of the state dir, so
# that two `up` clusters on one machine never share instance cgroups
DEMO_APP = "hello"
READY_TIMEOUT = 30.0
DEPLOY_TIMEOUT = 300.0
TOKEN_FILE_WAIT = 10.0
JOIN_TOKEN_TTL = 300.0  # the participant enrols right after the token is committed


@dataclass(frozen=True)
class UpConfig:
    state_dir: Path
    api: tuple[str, int] = ("127.0.0.1", 7100)
    raft: tuple[str, int] = ("127.0.0.1", 7110)
    rpc: tuple[str, int] = ("127.0.0.1", 7001)
    listen: str = "127.0.0.1:8080"
    demo: bool = False
    # the coordinator's (CoordinatorConfig's); no option of `up` sets them: the test suite
    # does, for embedded clusters whose tests do not depend on them
    watch_window: float = WATCH_WINDOW
    election_timeout: tuple[float, float] = ELECTION_TIMEOUT


def read_or_create_secret(path: Path) -> str:
    if path.exists():
        secret = path.read_text().strip()
        if secret:
            return secret
    secret = secrets.token_urlsafe(32)
    write_private(path, secret + "\n")
    return secret


def state_id(state_dir: Path) -> str:
    """A short name for the cluster kept in ``state_dir``."""
    return hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]


def relocated_dir(state_dir: Path) -> Path:
    """Where ``participant_dir`` puts the participant of ``state_dir`` when it must move."""
    return Path("/var/lib/superagent") / f"up-{state_id(state_dir)}"


def participant_dir(state_dir: Path) -> Path:
    """Where the participant keeps releases: under the state dir, unless running as root in
    a directory the apps' own users cannot reach (e.g. /root/...); then under /var/lib."""
    wanted = state_dir / "participant"
    if os.geteuid() != 0 or all(os.stat(d).st_mode & 0o001 for d in state_dir.parents
                                if d.exists()):
        return wanted
    moved = relocated_dir(state_dir) / "participant"
    print(f"superagent: {state_dir} is not reachable by the apps' users; their releases live"
          f" in {moved}", file=sys.stderr)
    moved.parent.parent.mkdir(mode=0o755, exist_ok=True)
    moved.parent.mkdir(mode=0o755, exist_ok=True)
    return moved


class Embedded:
    """The coordinator and the participant of ``superagent up``."""

    def __init__(self, config: UpConfig) -> None:
        self.config = config
        state = config.state_dir
        secret = read_or_create_secret(state / "secret")  # the coordinator's only
        self.token_file = state / "admin-token"
        self.coordinator = Coordinator(CoordinatorConfig(
            id=NODE, peers={NODE: f"{config.raft[0]}:{config.raft[1]}"}, api=config.api,
            data_dir=state / "coordinator", secret=secret, admin_token_file=self.token_file,
            watch_window=config.watch_window, election_timeout=config.election_timeout))
        self.node = f"{NODE}-{state_id(state)[:6]}"
        data_dir = participant_dir(state)
        # a new participant (or one of a cluster made before machine credentials) enrols
        # with a join token for its node, committed in ``run`` before it starts
        self.join_token = ("" if read_credential(data_dir / CREDENTIAL_FILE)
                           else new_join_token())
        self.agent = Agent(AgentConfig(
            data_dir=data_dir, join_token=self.join_token, node=self.node, rpc=config.rpc,
            listen=(config.listen,), proxy_workers=1, coordinator=(self.coordinator.config.url,),
            advertise=f"{config.rpc[0]}:{config.rpc[1]}"))

    def __repr__(self) -> str:
        return f"<Embedded {self.config.state_dir}>"

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start both, resume or deploy apps, print the banner; stop on SIGINT/SIGTERM (also
        while still starting)."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                stop = trio.Event()
                starting = trio.CancelScope()

                async def on_signal() -> None:
                    async for _ in signals:
                        stop.set()
                        starting.cancel()
                        return

                nursery.start_soon(on_signal)
                agent_started = False
                try:
                    with starting:
                        await nursery.start(self.coordinator.run)
                        await self._issue_join_token()
                        await nursery.start(self.agent.run)
                        agent_started = True
                        await self._wait_for_node()
                        await self._resume()
                        if self.config.demo:
                            await self.deploy_demo()
                        self._banner()
                        task_status.started()
                    await stop.wait()
                    print("superagent: stopping apps, proxy and coordinator...",
                          file=sys.stderr)
                finally:  # also when starting failed: nothing of this cluster keeps running
                    if agent_started:
                        with trio.CancelScope(shield=True):
                            await self.agent.stop_all()
                    nursery.cancel_scope.cancel()

    async def _issue_join_token(self) -> None:
        """Commit the hash of the participant's join token (for its node, one use)."""
        if not self.join_token:
            return
        digest = credential_hash(self.join_token)
        with trio.move_on_after(READY_TIMEOUT) as waited:
            result = await self.coordinator.submit(self.coordinator.command(
                AddJoinToken, actor="superagent-up", key=f"up:join:{digest[:32]}",
                sha256=digest, expires_at=time.time() + JOIN_TOKEN_TTL, uses=1,
                node=self.node))
        if waited.cancelled_caught or not result.get("ok"):
            raise SuperagentError("the coordinator did not accept the participant's join"
                                  " token" + ("" if waited.cancelled_caught
                                              else f": {result.get('error')}"))

    async def _wait_for_node(self) -> None:
        with trio.move_on_after(READY_TIMEOUT) as waited:
            await self.coordinator.barrier()  # the journal of the last run is applied
            while not self.coordinator.read(lambda s: self.node in s.nodes
                                            and s.nodes[self.node].up and bool(s.tokens)):
                await trio.sleep(0.05)
        if waited.cancelled_caught:
            raise SuperagentError(f"the participant did not join the coordinator within"
                                  f" {READY_TIMEOUT:g}s")
        # a new cluster's token is written just after it is committed; a resumed cluster's
        # file is there already (unless it was deleted: the banner then says so)
        with trio.move_on_after(TOKEN_FILE_WAIT):
            while not self.token_file.exists():
                await trio.sleep(0.05)

    async def _resume(self) -> None:
        """Deploy again every app whose release served before the last stop."""
        serving = {i.app for i in self.agent.status().instances}
        current = self.coordinator.read(lambda s: {a.name: a.current_release
                                                   for a in s.apps.values()
                                                   if a.current_release})
        for app, release in sorted(current.items()):
            if app not in serving:
                print(f"superagent: resuming {app}@{release}", file=sys.stderr)
                await self.deploy(app, release)

    async def deploy(self, app: str, release: str) -> str:
        started = await begin_deploy(self.coordinator, app=app, release=release,
                                     actor="superagent-up")
        if not started.get("ok"):
            raise SuperagentError(f"cannot deploy {app}@{release}: {started.get('error')}")
        return await self.wait_deploy(started["deploy_id"])

    async def wait_deploy(self, deploy_id: str) -> str:
        with trio.move_on_after(DEPLOY_TIMEOUT):
            while True:
                deploy = self.coordinator.read(lambda s: s.deploys[deploy_id])
                record = deploy.record
                if deploy.finished:
                    if record["status"] != "succeeded":
                        raise SuperagentError(f"deploy {deploy_id} {record['status']}:"
                                              f" {record['reason']}")
                    return str(record["release"])
                await trio.sleep(0.1)
        raise SuperagentError(f"deploy {deploy_id} did not finish within {DEPLOY_TIMEOUT:g}s")

    async def deploy_demo(self) -> None:
        """Upload and deploy the bundled demo app unless it is already serving."""
        if self.coordinator.read(lambda s: DEMO_APP in s.apps
                                 and s.apps[DEMO_APP].current_release is not None):
            return
        from superagent.demo import demo_app_dir
        from superagent.pack import pack

        print("superagent: deploying the demo app...", file=sys.stderr)
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise SuperagentError(f"cannot read the admin token {self.token_file}:"
                                  f" {exc.strerror}") from None
        def packed_demo() -> tuple[str, bytes]:
            with tempfile.TemporaryFile() as archive:
                packed = pack(demo_app_dir(), archive)
                archive.seek(0)
                return packed.sha256, archive.read()

        sha256, data = await trio.to_thread.run_sync(packed_demo)
        async with httpx.AsyncClient(timeout=60.0) as http:
            response = await http.post(
                f"{self.coordinator.config.url}/api/v1/apps/{DEMO_APP}/releases"
                f"?sha256={sha256}", content=data,
                headers={"authorization": f"Bearer {token}"})
        doc = response.json()
        if response.status_code != 201:
            raise SuperagentError(f"demo upload refused: {doc.get('detail', doc)}")
        await self.wait_deploy(doc["deploy_id"])

    def _banner(self) -> None:
        host, port = self.config.listen.rsplit(":", 1)
        proxy = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        token = (self.token_file.read_text().strip() if self.token_file.exists()
                 else "(the file is missing: it is shown only when the cluster is created)")
        lines = [
            "superagent is up",
            f"  API:         {self.coordinator.config.url}/api/v1",
            f"  proxy:       {proxy}",
            f"  admin token: {token}  (also in {self.token_file})",
        ]
        apps = self.coordinator.read(lambda s: sorted((a.name, a.current_release, a.spec)
                                                      for a in s.apps.values()))
        for name, release, spec in apps:
            prefix = spec.get("routes", {}).get("prefix")
            where = f"{proxy}{prefix}/" if prefix else "(no path route)"
            lines.append(f"  app {name}@{release or '-'}: {where}")
        lines.append("Ctrl-C stops everything; `superagent up` again resumes.")
        print("\n".join(lines), flush=True)


def run_up(config: UpConfig) -> int:
    trio.run(Embedded(config).run)
    return 0
