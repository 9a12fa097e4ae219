"""Process-level tests of the participant's ProxyDriver: real workers, real loopback sockets.

Upstreams are tiny HTTP/1.1 servers in the test's trio loop that answer with their own
name; ``/gate`` requests block until the test opens the upstream's gate. Every test runs
its workers under a short run directory (Unix socket paths are limited to 107 bytes) and
the ``run_dir`` fixture kills every worker spawned for it, whatever the outcome.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pytest
import trio

from superagent.participant.errors import ProxyDriverError
from superagent.participant.proxydriver import ProxyDriver
from superagent.proxy import control
from superagent.proxy.snapshot import AppRoute, Instance
from tests.support.ports import free_port
from tests.support.wait import wait_until_async

STEP = 15.0  # bound on any single wait (a worker's cold start is ~1 s)


# --------------------------------------------------------------------------- fixtures
def _workers_under(path: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "superagent.proxy.worker" in cmd and any(path in part for part in cmd):
            found.append(proc)
    return found


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short run directory; every worker whose control socket lives in it is killed after."""
    path = tempfile.mkdtemp(prefix="sa-pd-")
    try:
        yield Path(path)
    finally:
        for proc in _workers_under(path):
            try:
                proc.kill()
                proc.wait(timeout=5)
            except psutil.Error:
                pass
        shutil.rmtree(path, ignore_errors=True)


def live_workers(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


# --------------------------------------------------------------------------- upstreams
class Upstream:
    """An HTTP/1.1 keep-alive server answering its name; ``/gate`` waits for ``gate``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.gate = trio.Event()
        self.gated = 0  # /gate requests received

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        async with stream:
            try:
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        buf += data
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    path = head.split(b" ")[1]
                    if path == b"/gate":
                        self.gated += 1
                        await self.gate.wait()
                    body = self.name.encode()
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                          % (len(body), body))
            except trio.BrokenResourceError:
                return


async def get(port: int, path: str = "/") -> tuple[int, str]:
    """One request on a fresh connection through the proxy: (status, body)."""
    with trio.fail_after(STEP):
        data = await _fetch(await trio.open_tcp_stream("127.0.0.1", port), path)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


async def https(port: int, cert: bytes) -> bytes:
    """One request over TLS on a fresh connection, trusting ``cert``: the raw answer."""
    from tests.proxy.test_tls import trusting

    with trio.fail_after(STEP):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        return await _fetch(trio.SSLStream(tcp, trusting(cert), server_hostname="localhost"))


async def _fetch(stream: trio.abc.Stream, path: str = "/") -> bytes:
    """Send one ``Connection: close`` request on ``stream``; all it answers."""
    async with stream:
        await stream.send_all(b"GET %s HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
                              % path.encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


def app(*ups: Upstream, port: int | None = None) -> AppRoute:
    return AppRoute(name="web", prefix="/", port=port, instances=tuple(
        Instance(id=up.name, host="127.0.0.1", port=up.port) for up in ups))


@asynccontextmanager
async def upstreams(*names: str) -> AsyncIterator[list[Upstream]]:
    ups = [Upstream(n) for n in names]
    async with trio.open_nursery() as nursery:
        for up in ups:
            await nursery.start(up.serve)
        try:
            yield ups
        finally:
            for up in ups:
                up.gate.set()
            nursery.cancel_scope.cancel()


def driver(run_dir: Path, port: int) -> ProxyDriver:
    return ProxyDriver(run_dir, workers=2, parser="h11", grace=5.0,
                       listen=(f"127.0.0.1:{port}",), dedicated_host="127.0.0.1")


async def versions(d: ProxyDriver) -> list[int]:
    return [(await control.call(s.control_path, {"type": "ping"}))["version"] for s in d.slots]


# --------------------------------------------------------------------------- tests
async def test_apply_switches_instances_on_every_worker_and_offline(run_dir: Path) -> None:
    """v1 routes to a, v2 to b on both workers; a refusal keeps v2; offline flips healthz."""
    port = free_port()
    d = driver(run_dir, port)
    async with upstreams("a", "b") as (a, b):
        try:
            await d.start()
            assert await d.apply([app(a)]) == 1
            assert await get(port) == (200, "a")
            assert await d.apply([app(b)]) == 2
            assert await versions(d) == [2, 2]
            # SO_REUSEPORT spreads fresh connections over both workers: all say b.
            assert {await get(port) for _ in range(12)} == {(200, "b")}
            assert (await d.stats())["workers"] == 2

            with socket.socket() as taken:  # a dedicated port nobody can bind
                taken.bind(("127.0.0.1", 0))
                taken.listen(1)
                with pytest.raises(ProxyDriverError) as err:
                    await d.apply([app(b, port=taken.getsockname()[1])])
            assert err.value.worker in (0, 1) and "cannot listen" in err.value.reason
            assert d.snapshot.version == 2 and await versions(d) == [2, 2]
            assert await get(port) == (200, "b")
            assert await d.apply([app(a)]) == 4  # the refused version is never reused

            assert (await get(port, "/-/healthz"))[0] == 200
            await d.set_offline(True)
            assert {(await get(port, "/-/healthz"))[0] for _ in range(6)} == {503}
            await d.set_offline(False)
            assert (await get(port, "/-/healthz"))[0] == 200
        finally:
            pids = [s.pid for s in d.slots if s.pid]
            await d.stop()
    assert len(pids) == 2 and live_workers(pids) == []
    assert "workers" in (run_dir / "proxy.json").read_text()


async def test_drain_waits_for_in_flight_then_reports_leftovers(run_dir: Path) -> None:
    """Drain returns 0 once a slow request ends (new ones go elsewhere); 1 after grace."""
    port = free_port()
    d = driver(run_dir, port)
    async with upstreams("a", "b") as (a, b):
        try:
            await d.start()
            await d.apply([app(a)])
            await d.apply([app(a, b)])
            async with trio.open_nursery() as nursery:
                slow: list[tuple[int, str]] = []

                async def slow_request() -> None:
                    slow.append(await get(port, "/gate"))

                nursery.start_soon(slow_request)
                await wait_until_async(lambda: a.gated + b.gated == 1, "the slow request",
                                       timeout=STEP)
                busy = a if a.gated else b
                other = b if busy is a else a
                result: dict[str, int] = {}

                async def drain() -> None:
                    result.update(await d.drain([busy.name], grace=STEP))

                nursery.start_soon(drain)
                await wait_until_async(lambda: busy.name in d.draining, "the drain mark",
                                       timeout=STEP)
                assert {await get(port) for _ in range(6)} == {(200, other.name)}
                assert result == {}  # still waiting for the slow request
                busy.gate.set()
            assert result == {busy.name: 0} and slow == [(200, busy.name)]

            # Now the other instance holds a request longer than the grace period.
            nursery_result: dict[str, int] = {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(get, port, "/gate")
                await wait_until_async(lambda: other.gated == 1, "the long request", timeout=STEP)
                nursery_result = await d.drain([other.name], grace=0.3)
                other.gate.set()
            assert nursery_result == {other.name: 1}
            await d.undrain([busy.name, other.name])
            assert d.draining == set()
        finally:
            await d.stop()


async def test_new_driver_adopts_running_workers_without_dropping_traffic(run_dir: Path) -> None:
    """A driver dropped without stop() leaves workers serving; the next one adopts them."""
    port = free_port()
    async with upstreams("a", "b") as (a, b):
        first = driver(run_dir, port)
        await first.start()
        await first.apply([app(a)])
        pids = [s.pid for s in first.slots]
        del first  # the agent was killed: nothing stops its workers

        failures: list[BaseException] = []
        answered = 0
        done = trio.Event()

        async def client_loop() -> None:
            nonlocal answered
            with trio.fail_after(STEP):
                while not done.is_set() or answered < 20:
                    try:
                        status, _ = await get(port)
                        assert status == 200
                        answered += 1
                    except (OSError, AssertionError, trio.BrokenResourceError) as exc:
                        failures.append(exc)

        second = driver(run_dir, port)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_loop)
                await second.start()
                assert [s.pid for s in second.slots] == pids
                assert second.snapshot.version == 1
                assert await second.apply([app(b)]) == 2
                done.set()
            assert failures == [] and answered >= 20
            assert await get(port) == (200, "b")
        finally:
            await second.stop()
    assert live_workers([p for p in pids if p]) == []


async def test_supervise_restarts_a_killed_worker_with_the_current_snapshot(
        run_dir: Path) -> None:
    """SIGKILL one worker: supervise() spawns a new one and pushes the current version."""
    port = free_port()
    d = driver(run_dir, port)
    async with upstreams("a") as (a,):
        try:
            await d.start()
            await d.apply([app(a)])
            await d.apply([app(a)])
            async with trio.open_nursery() as nursery:
                await nursery.start(d.supervise)
                victim = d.slots[0].pid
                assert victim is not None
                os.kill(victim, signal.SIGKILL)

                async def replaced() -> bool:
                    slot = d.slots[0]
                    if slot.pid == victim or not slot.running:
                        return False
                    try:
                        return await versions(d) == [2, 2]
                    except control.ControlError:
                        return False

                await wait_until_async(replaced, "a restarted worker on v2", timeout=STEP)
                assert d.slots[0].restarts == 1
                assert {await get(port) for _ in range(6)} == {(200, "a")}
                pids = [s.pid for s in d.slots if s.pid]
                await d.stop()
                nursery.cancel_scope.cancel()
        finally:
            await d.stop()
    assert live_workers(pids) == [] and _workers_under(str(run_dir)) == []


async def test_a_tls_listener_serves_https_beside_the_plain_one(run_dir: Path) -> None:
    """--tls-listen: the workers terminate TLS with the agent's certificate files."""
    from superagent.proxy.snapshot import ServerSettings
    from tests.proxy.test_tls import self_signed, write_pair

    cert, key = self_signed("node")
    cert_path, key_path = write_pair(run_dir, cert, key)
    port, tls_port = free_port(), free_port()
    d = ProxyDriver(run_dir, workers=1, parser="httptools", grace=5.0,
                    listen=(f"127.0.0.1:{port}",), tls_listen=(f"127.0.0.1:{tls_port}",),
                    settings=ServerSettings(tls_cert=str(cert_path), tls_key=str(key_path)))
    async with upstreams("a") as (a,):
        try:
            await d.start()
            await d.apply([app(a)])
            assert await get(port) == (200, "a")
            data = await https(tls_port, cert)
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"a"), data
        finally:
            await d.stop()


async def test_a_certificate_that_does_not_load_yet_leaves_plain_http_serving(
        run_dir: Path) -> None:
    """A fresh worker whose certificate files are missing (mid-renewal, a late mount)
    serves its plain listeners, refuses TLS handshakes and says why in ``stats``, then
    serves HTTPS from the next connection once the pair loads."""
    import ssl

    from superagent.proxy.snapshot import ServerSettings
    from tests.proxy.test_tls import self_signed, write_pair

    certs = run_dir / "certs"
    certs.mkdir()
    cert_path, key_path = certs / "cert.pem", certs / "key.pem"
    port, tls_port = free_port(), free_port()
    d = ProxyDriver(run_dir, workers=1, parser="httptools", grace=5.0,
                    listen=(f"127.0.0.1:{port}",), tls_listen=(f"127.0.0.1:{tls_port}",),
                    settings=ServerSettings(tls_cert=str(cert_path), tls_key=str(key_path)))
    cert, key = self_signed("node")

    async with upstreams("a") as (a,):
        try:
            await d.start()
            await d.apply([app(a)])
            assert await get(port) == (200, "a")
            with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
                await https(tls_port, cert)
            stats = await d.stats()
            assert any("cert.pem does not exist" in e for e in stats["tls_errors"]), stats
            write_pair(certs, cert, key)
            data = await https(tls_port, cert)
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"a"), data
            assert (await d.stats())["tls_errors"] == []
        finally:
            await d.stop()


def test_tls_files_that_do_not_load_are_no_usage_error(tmp_path: Path) -> None:
    """A missing certificate is the environment's state, not a wrong command line: the
    agent starts (its TLS listeners wait for the pair) instead of exiting with status 2,
    which the systemd unit would never restart."""
    import argparse

    from superagent.cli import _participant_tls

    args = argparse.Namespace(tls_listen=["127.0.0.1:8443"], tls_cert="/nonexistent/c.pem",
                              tls_key=None)
    assert _participant_tls(args, ("127.0.0.1:8080",)) == (
        ("127.0.0.1:8443",), "/nonexistent/c.pem", None)


@pytest.mark.parametrize(("flags", "message"), [
    (["--tls-listen", "127.0.0.1:8443"], "--tls-listen needs --tls-cert"),
    (["--tls-key", "k.pem"], "--tls-key needs --tls-cert"),
    (["--tls-listen", "127.0.0.1:8080", "--tls-cert", "c.pem"],
     "--tls-listen 127.0.0.1:8080: port 8080 is listed twice"),
    (["--trusted-proxy", "10.0.0.300"], "--trusted-proxy '10.0.0.300' is not an IP"),
])
def test_participant_proxy_flags_are_checked(flags: list[str], message: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from superagent.cli import main
    from superagent.rpc.credentials import JOIN_TOKEN_PREFIX

    code = main(["participant", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:8080",
                 "--join-token", f"{JOIN_TOKEN_PREFIX}unused", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err
