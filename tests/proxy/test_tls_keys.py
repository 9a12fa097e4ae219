"""A passphrase-protected private key is refused with a clear error, never a prompt.

OpenSSL asks for a missing passphrase on the controlling terminal: an agent or proxy
started from a shell would block there (at start, or in a worker reloading a renewed
certificate). The check runs in a child whose controlling terminal is a pty nobody
types into, so a prompt shows up as a hang (and its text), not as a pass.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import termios
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.proxy.test_tls import self_signed

DEADLINE = 20.0


def test_an_encrypted_key_is_refused_without_a_prompt(tmp_path: Path) -> None:
    cert, plain = self_signed("encrypted")
    key = serialization.load_pem_private_key(plain, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    code = ("import sys\n"
            "from superagent.errors import ConfigError\n"
            "from superagent.proxy.tls import CertFiles, load_context\n"
            "try:\n"
            "    load_context(CertFiles(cert='cert.pem', key='key.pem'))\n"
            "except ConfigError as exc:\n"
            "    sys.stderr.write(str(exc))\n"
            "    sys.exit(3)\n")
    controller, terminal = os.openpty()

    def take_terminal() -> None:  # runs after setsid: the pty becomes the child's tty
        fcntl.ioctl(terminal, termios.TIOCSCTTY, 0)

    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, stdin=terminal,
                              capture_output=True, text=True, timeout=DEADLINE,
                              start_new_session=True, preexec_fn=take_terminal)
    except subprocess.TimeoutExpired:
        os.set_blocking(controller, False)
        try:
            shown = os.read(controller, 4096).decode(errors="replace")
        except BlockingIOError:
            shown = ""
        raise AssertionError(f"loading the key waited for a passphrase: {shown!r}") from None
    finally:
        os.close(controller)
        os.close(terminal)
    assert done.returncode == 3, done.stderr
    assert "key.pem" in done.stderr and "passphrase" in done.stderr


def test_a_nul_byte_in_a_tls_path_is_a_config_error(tmp_path: Path) -> None:
    """TOML strings may hold U+0000, which no file name can: a clear error, no traceback."""
    config = tmp_path / "proxy.toml"
    config.write_text('[proxy]\nlisten = ["127.0.0.1:1"]\ntls_listen = ["127.0.0.1:2"]\n'
                      'tls_cert = "cert\\u0000.pem"\n')
    done = subprocess.run([sys.executable, "-m", "superagent", "proxy", "--config", str(config),
                           "--check"], capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "NUL" in done.stderr, done.stderr
