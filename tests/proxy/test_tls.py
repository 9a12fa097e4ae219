"""TLS on the proxy's listeners: a self-signed certificate made here, real sockets.

The in-process worker (conftest ``make_proxy``) serves a plain and a TLS listener; a
trio TLS client that trusts only the test's certificate talks to it. The certificate
files are replaced under a running worker to prove the reload: the next connection
gets the new certificate, a connection opened before keeps serving on the same
listener, and a pair that does not load leaves the last good one in force. One test
runs the real ``superagent proxy`` (master and workers) with a TLS listener from its
TOML file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from superagent.errors import ConfigError
from superagent.proxy.config import (
    config_from_document,
    load_config,
    snapshot_from_wire,
    snapshot_to_wire,
)
from tests.proxy.conftest import DEADLINE, HOST, Client, reserved_port
from tests.proxy.test_master import Upstream, get_once  # the process-level harness
from tests.support.ports import free_port
from tests.support.wait import wait_until

REPO = Path(__file__).resolve().parents[2]


def self_signed(name: str) -> tuple[bytes, bytes]:
    """A PEM certificate for ``localhost`` and 127.0.0.1 (subject CN ``name``) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_pair(directory: Path, cert: bytes, key: bytes) -> tuple[Path, Path]:
    """Replace cert.pem and key.pem whole (key first, as a renewal tool would)."""
    paths = directory / "cert.pem", directory / "key.pem"
    for path, data in ((paths[1], key), (paths[0], cert)):
        tmp = path.with_name(path.name + ".new")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return paths


def trusting(*certs: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata="".join(c.decode() for c in certs))
    context.set_alpn_protocols(["http/1.1"])
    return context


async def tls_client(port: int, context: ssl.SSLContext) -> tuple[Client, bytes]:
    """A conftest ``Client`` over TLS, and the certificate the proxy presented (DER)."""
    with trio.fail_after(DEADLINE):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, context, server_hostname="localhost")
        await stream.do_handshake()
    der = stream.getpeercert(binary_form=True)
    assert der is not None
    return Client(stream), der  # type: ignore[arg-type]  # any trio stream will do


def der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def headers(received: Any) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in received.headers}


def app_of(up: Any) -> dict[str, Any]:
    return {"prefix": "/", "instances": [up.address]}


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, bytes]:
    cert, key = self_signed("first")
    cert_path, key_path = write_pair(tmp_path, cert, key)
    return cert_path, key_path, cert


async def test_https_and_http_listeners_side_by_side(
        make_proxy: Callable[..., Any], upstream: Callable[..., Any],
        pair: tuple[Path, Path, bytes]) -> None:
    cert_path, key_path, cert = pair
    with reserved_port() as tls_port:
        async with upstream() as up, make_proxy(
                {"web": app_of(up)}, tls_listen=[f"127.0.0.1:{tls_port}"],
                tls_cert=str(cert_path), tls_key=str(key_path)) as proxy:
            client, der = await tls_client(tls_port, trusting(cert))
            assert der == der_of(cert)
            for path in ("/one", "/two"):  # kept alive across requests
                resp = await client.request("GET", path)
                assert resp.status == 200, resp
            await client.stream.aclose()
            seen = [headers(r) for r in up.requests]
            assert [h[b"x-forwarded-proto"] for h in seen] == [b"https", b"https"]
            assert b"proto=https" in seen[0][b"forwarded"]

            plain = await proxy.request("GET", "/plain")  # the plain listener stays plain
            assert plain.status == 200
            assert headers(up.requests[-1])[b"x-forwarded-proto"] == b"http"
            lines = await proxy.access_log(3)
            assert [line["status"] for line in lines] == [200, 200, 200]


async def test_big_request_bodies_cross_the_terminator(
        make_proxy: Callable[..., Any], upstream: Callable[..., Any],
        pair: tuple[Path, Path, bytes]) -> None:
    """Many TLS records and full socket buffers on the way in, twice on one connection."""
    import hashlib
    import json

    cert_path, key_path, cert = pair
    body = os.urandom(3 << 20)
    with reserved_port() as tls_port:
        async with upstream() as up, make_proxy(
                {"web": app_of(up)}, tls_listen=[f"127.0.0.1:{tls_port}"],
                tls_cert=str(cert_path), tls_key=str(key_path)):
            client, _ = await tls_client(tls_port, trusting(cert))
            for _ in range(2):
                resp = await client.request("POST", "/upload", body=body, timeout=30.0)
                assert resp.status == 200, resp
                seen = json.loads(resp.body)
                assert seen["body_len"] == len(body)
                assert seen["sha256"] == hashlib.sha256(body).hexdigest()
            await client.stream.aclose()


async def test_certificate_files_reload_without_dropping_the_listener(
        make_proxy: Callable[..., Any], upstream: Callable[..., Any],
        pair: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    cert_path, key_path, first = pair
    second, second_key = self_signed("second")
    with reserved_port() as tls_port:
        async with upstream() as up, make_proxy(
                {"web": app_of(up)}, tls_listen=[f"127.0.0.1:{tls_port}"],
                tls_cert=str(cert_path), tls_key=str(key_path)) as proxy:
            both = trusting(first, second)
            before, der = await tls_client(tls_port, both)
            assert der == der_of(first)
            assert (await before.request("GET", "/before")).status == 200
            listener = proxy.worker._listeners[("127.0.0.1", tls_port)][0]

            write_pair(tmp_path, second, second_key)
            after, der = await tls_client(tls_port, both)
            assert der == der_of(second), "the renewed certificate is served at once"
            assert (await after.request("GET", "/after")).status == 200
            # The connection accepted with the old certificate goes on serving.
            assert (await before.request("GET", "/still")).status == 200
            assert proxy.worker._listeners[("127.0.0.1", tls_port)][0] is listener

            # A broken pair (a certificate whose key was not written yet): the last good
            # certificate keeps serving, and the files are tried again when they change.
            third, third_key = self_signed("third")
            cert_path.write_bytes(third)
            _, der = await tls_client(tls_port, both)
            assert der == der_of(second)
            key_path.write_bytes(third_key)
            _, der = await tls_client(tls_port, trusting(third))
            assert der == der_of(third)
            for client in (before, after):
                await client.stream.aclose()


async def test_a_client_that_does_not_speak_tls_is_dropped(
        make_proxy: Callable[..., Any], upstream: Callable[..., Any],
        pair: tuple[Path, Path, bytes]) -> None:
    cert_path, key_path, cert = pair
    with reserved_port() as tls_port:
        async with upstream() as up, make_proxy(
                {"web": app_of(up)}, tls_listen=[f"127.0.0.1:{tls_port}"],
                tls_cert=str(cert_path), tls_key=str(key_path),
                header_timeout="1s"):
            raw = await Client.connect(tls_port)
            await raw.send(b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n")
            with trio.fail_after(DEADLINE):
                while await raw.receive():  # a TLS alert at most, then the close
                    pass
            silent = await Client.connect(tls_port)  # never says anything: the handshake
            with trio.fail_after(DEADLINE):         # times out with header_timeout
                while await silent.receive():
                    pass
            client, _ = await tls_client(tls_port, trusting(cert))
            assert (await client.request("GET", "/")).status == 200
            await client.stream.aclose()
            assert len(up.requests) == 1


def test_config_keys_are_checked(tmp_path: Path, pair: tuple[Path, Path, bytes]) -> None:
    cert_path = pair[0]

    def doc(**proxy: Any) -> dict[str, Any]:
        return {"proxy": {"listen": ["127.0.0.1:8080"], **proxy},
                "apps": {"web": {"prefix": "/", "instances": ["127.0.0.1:9"]}}}

    with pytest.raises(ConfigError, match=r"proxy\.tls_listen: tls_listen needs tls_cert"):
        config_from_document(doc(tls_listen=["127.0.0.1:8443"]), source="t", version=1)
    with pytest.raises(ConfigError, match=r"proxy\.tls_listen: port 8080 is listed twice"):
        config_from_document(doc(tls_listen=["127.0.0.1:8080"], tls_cert="c.pem"),
                             source="t", version=1)
    with pytest.raises(ConfigError, match=r"proxy\.tls_key: tls_key needs tls_cert"):
        config_from_document(doc(tls_key="k.pem"), source="t", version=1)

    # A file: relative paths are the config file's own; a missing file names both.
    conf = tmp_path / "proxy.toml"
    conf.write_text('[proxy]\nlisten = ["127.0.0.1:8080"]\ntls_listen = ["127.0.0.1:8443"]\n'
                    'tls_cert = "cert.pem"\ntls_key = "key.pem"\n')
    _, snapshot = load_config(str(conf))
    assert snapshot.settings.tls_cert == str(cert_path)
    assert [(lst.port, lst.tls) for lst in snapshot.listeners] == [(8080, False), (8443, True)]
    assert snapshot_from_wire(snapshot_to_wire(snapshot)) == snapshot

    conf.write_text('[proxy]\ntls_listen = ["127.0.0.1:8443"]\ntls_cert = "missing.pem"\n')
    with pytest.raises(ConfigError, match=r"proxy\.toml: proxy\.tls_cert: .*missing\.pem "
                                          r"does not exist"):
        load_config(str(conf))
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    conf.write_text('[proxy]\ntls_listen = ["127.0.0.1:8443"]\ntls_cert = "bad.pem"\n')
    with pytest.raises(ConfigError, match=r"not a PEM certificate chain and its private key"):
        load_config(str(conf))
    check = subprocess.run([sys.executable, "-m", "superagent", "proxy", "--config", str(conf),
                            "--check"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert check.returncode != 0 and "bad.pem" in check.stderr, check
    assert "Traceback" not in check.stderr


def test_the_proxy_process_serves_https_from_its_toml(
        tmp_path: Path, pair: tuple[Path, Path, bytes]) -> None:
    """``superagent proxy`` with a TLS listener: master, two workers, the wire snapshot."""
    cert = pair[2]
    up = Upstream("web")
    port, tls_port, admin = free_port(), free_port(), free_port()
    conf = tmp_path / "proxy.toml"
    conf.write_text(f'[proxy]\nlisten = ["127.0.0.1:{port}"]\nadmin = "127.0.0.1:{admin}"\n'
                    f'workers = 2\ngrace = "2s"\ntls_listen = ["127.0.0.1:{tls_port}"]\n'
                    f'tls_cert = "cert.pem"\ntls_key = "key.pem"\n'
                    f'[apps.web]\nprefix = "/"\ninstances = ["{up.address}"]\n')
    with open(tmp_path / "stderr.log", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "superagent", "proxy", "--config",
                                 str(conf)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        def serving() -> bool:
            assert proc.poll() is None, (tmp_path / "stderr.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", tls_port), timeout=2.0) as raw, \
                        trusting(cert).wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                    answer = b""
                    while chunk := tls.recv(65536):
                        answer += chunk
                return answer.startswith(b"HTTP/1.1 200")
            except (OSError, ssl.SSLError):
                return False

        wait_until(serving, "the TLS listener to serve", timeout=30.0)
        assert get_once(port, "/y").status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        up.close()
    assert proc.returncode == 0, (tmp_path / "stderr.log").read_text()


def test_a_pair_that_never_loaded_is_retried_when_its_files_change(tmp_path: Path) -> None:
    """No good context yet: every ask raises, the failure is logged once per state of the
    files and listed by ``errors``; writing the pair makes the next ask serve it."""
    from structlog.testing import capture_logs

    from superagent.proxy.tls import CertFiles, CertStore

    files = CertFiles(cert=str(tmp_path / "cert.pem"), key=str(tmp_path / "key.pem"))
    store = CertStore()
    with capture_logs() as logs:
        for _ in range(3):
            with pytest.raises(ConfigError, match=r"cert\.pem does not exist"):
                store.context(files)
    assert len([e for e in logs if e["log_level"] == "warning"]) == 1, logs
    assert len(store.errors()) == 1 and "cert.pem does not exist" in store.errors()[0]
    write_pair(tmp_path, *self_signed("late"))
    assert isinstance(store.context(files), ssl.SSLContext)
    assert store.errors() == []
    store.keep_only(set())
    assert repr(store) == "<CertStore pairs=0 refused=0>"
