"""``superagent up``'s embedded cluster for end-to-end tests, and clients for it.

``running_cluster()`` starts an ``Embedded`` (a single-node Raft coordinator plus one
participant with one proxy worker) on free loopback ports, in a fresh world-traversable
directory under /tmp (as root the agent runs app instances as per-app system users, who
must reach their release directories), and yields a ``Cluster``: an API client with the
cluster's token, the proxy's and the participant RPC's base URLs (and ``rpc_key``, the key
coordinators sign their signals to it with), and helpers that upload
an app directory exactly as ``superagent deploy`` does and wait for the deploy's end.

Two of the coordinator's timings are shorter than the product's defaults, because no
test that uses this harness is about them and every start and deploy would wait them
out: its first election and the deploy's watch window after the last switch
(``FAST_ELECTION`` and ``TEST_WATCH_WINDOW`` of ``tests.coordinator.helpers``). A test of
the watch window passes ``watch_window=WATCH_WINDOW`` to ``running_cluster``.

On the way out every instance and proxy worker is stopped, and psutil checks that no
process the test started is left: anything still running (a descendant of the test, or a
process whose working directory lies in the state directory) is killed and the exit fails
the test. Every wait polls a condition under a deadline.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

from superagent import codec
from superagent.pack import pack
from superagent.up import Embedded, UpConfig
from tests.coordinator.helpers import FAST_ELECTION, TEST_WATCH_WINDOW
from tests.e2e.apps import write_app
from tests.support.ports import free_port

START_DEADLINE = 60.0  # coordinator election, participant join, proxy workers: busy 2-core CI
DEPLOY_DEADLINE = 90.0  # one deploy of a tiny stdlib app, with long requests to drain
REQUEST_TIMEOUT = 30.0


@dataclass
class Cluster:
    """The running embedded cluster and clients for its API, proxy and participant RPC."""

    embedded: Embedded
    api: httpx.AsyncClient
    proxy: str
    rpc: str
    rpc_key: str  # what a coordinator's signal to the participant bears
    src: Path

    def __repr__(self) -> str:
        return f"<Cluster {self.embedded!r} proxy={self.proxy}>"

    def write(self, name: str, version: str, **options: Any) -> Path:
        return write_app(self.src / f"{name}-{version}", name=name, version=version, **options)

    async def upload(self, app_dir: Path, **query: str) -> httpx.Response:
        buf = io.BytesIO()
        packed = pack(app_dir, buf)
        return await self.api.post(f"/api/v1/apps/{packed.app_name}/releases",
                                   params={"sha256": packed.sha256, **query},
                                   content=buf.getvalue())

    async def deploy(self, app_dir: Path, *, deadline: float = DEPLOY_DEADLINE,
                     **query: str) -> dict[str, Any]:
        """Upload and wait for the deploy's end; the final deploy view."""
        response = await self.upload(app_dir, **query)
        assert response.status_code == 201, response.text
        doc = response.json()
        return await self.wait(doc["app"], doc["deploy_id"], deadline=deadline)

    async def view(self, app: str, deploy_id: str) -> dict[str, Any]:
        response = await self.api.get(f"/api/v1/apps/{app}/deploys/{deploy_id}")
        assert response.status_code == 200, response.text
        doc: dict[str, Any] = response.json()
        return doc

    async def wait(self, app: str, deploy_id: str, *,
                   deadline: float = DEPLOY_DEADLINE) -> dict[str, Any]:
        """The deploy's view once it is finished (polled under a deadline)."""
        with trio.fail_after(deadline):
            while not (view := await self.view(app, deploy_id))["finished"]:
                await trio.sleep(0.05)
        return view

    def instances(self, app: str) -> list[dict[str, Any]]:
        status = codec.encode(self.embedded.agent.status())
        return [i for i in status["instances"] if i["app"] == app]

    def routes(self, app: str) -> list[str]:
        return list(self.embedded.agent.status().routed(app))

    async def get(self, path: str, **options: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.proxy, timeout=REQUEST_TIMEOUT) as http:
            return await http.get(path, **options)


def _ours(state_dir: Path) -> list[psutil.Process]:
    """Live processes this test started: our descendants, or anything running in the state
    directory (an instance that lost its parent). Zombies are left for their parent."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cwd", "status", "ppid"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cwd = proc.info.get("cwd") or ""
            if cwd.startswith(str(state_dir)) or (
                    proc.pid != os.getpid() and os.getpid() in
                    (p.pid for p in proc.parents())):
                found[proc.pid] = proc
    return list(found.values())


def _describe(procs: list[psutil.Process]) -> list[str]:
    described = []
    for proc in procs:
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline())}")
        except psutil.Error:
            described.append(f"{proc.pid} (gone)")
    return described


@contextlib.asynccontextmanager
async def running_cluster(*, watch_window: float = TEST_WATCH_WINDOW
                          ) -> AsyncIterator[Cluster]:
    """An embedded cluster for the length of the block; nothing of it left running after.
    ``watch_window``: the coordinator's (see the module docstring)."""
    # app users must traverse the state directory (pytest's tmp_path is private to root)
    state_dir = Path(tempfile.mkdtemp(prefix="sa-e2e-", dir="/tmp"))
    state_dir.chmod(0o755)
    listen = free_port()
    config = UpConfig(state_dir=state_dir / "state", api=("127.0.0.1", free_port()),
                      raft=("127.0.0.1", free_port()), rpc=("127.0.0.1", free_port()),
                      listen=f"127.0.0.1:{listen}", watch_window=watch_window,
                      election_timeout=FAST_ELECTION)
    embedded = Embedded(config)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(START_DEADLINE):
                await nursery.start(embedded.run)
            token = embedded.token_file.read_text().strip()
            async with httpx.AsyncClient(base_url=embedded.coordinator.config.url,
                                         headers={"authorization": f"Bearer {token}"},
                                         timeout=REQUEST_TIMEOUT) as api:
                try:
                    yield Cluster(embedded, api, f"http://127.0.0.1:{listen}",
                                  f"http://{config.rpc[0]}:{config.rpc[1]}",
                                  embedded.agent.signal_keys()[0],
                                  state_dir / "src")
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(START_DEADLINE):
                        await embedded.agent.stop_all()
                    nursery.cancel_scope.cancel()
        with trio.fail_after(10.0):  # stop_all waited for the exits; allow for reaping
            while left := _ours(state_dir):
                await trio.sleep(0.05)
        assert not left
    finally:
        leaked = _ours(state_dir)
        for proc in leaked:  # never leave them behind, even when the test failed
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(state_dir, ignore_errors=True)
        assert not leaked, f"processes left running: {_describe(leaked)}"
