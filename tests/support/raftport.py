"""Talk to a Raft port the way pysyncobj does, to show who can and cannot reach it.

pysyncobj frames every message as ``struct('i', len) + Fernet(zlib(pickle(message)))``
(``tcp_connection.send``) with a Fernet key derived from the password (``encryptor``); the
receiver checks the Fernet token (an HMAC-SHA256) and only then unpickles, and on any
failure disconnects (``__processParseMessage``). ``probe`` sends one such frame carrying a
pickle whose unpickling creates a directory, and says whether the server closed the
connection at once or kept it open; the directory tells whether anything was unpickled.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import zlib
from pathlib import Path

import superagent.coordinator.raft  # noqa: F401 - imports pysyncobj safely first

from pysyncobj.encryptor import getEncryptor  # isort: skip

PROBE_TIMEOUT = 10.0  # seconds to connect
KEPT_OPEN = 2.0  # a server that has not hung up after this long accepted the frame
# Where the test expects a hang-up it waits longer: a member stalled on a loaded machine
# reads the frame late, and only a wait that is over makes the answer "open".
HANG_UP_WAIT = 10.0


class MakeDir:
    """Unpickling this creates ``path``: the proof that the receiver ran our code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.path),))


def frame(password: str, message: object) -> bytes:
    data = getEncryptor(password).encrypt(zlib.compress(pickle.dumps(message), 3))
    return struct.pack("i", len(data)) + data


def probe(address: str, password: str, marker: Path, *, kept_open: float = KEPT_OPEN) -> str:
    """Send a code-running pickle encrypted with ``password`` to the Raft port at
    ``address``: "closed" when the server hung up (a frame it could not authenticate),
    "open" when it kept the connection after ``kept_open`` seconds, "refused" when
    nothing listens there."""
    host, port = address.rsplit(":", 1)
    try:
        sock = socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT)
    except ConnectionRefusedError:
        return "refused"
    with sock:
        sock.sendall(frame(password, MakeDir(marker)))
        sock.settimeout(kept_open)
        try:
            while sock.recv(4096):
                pass  # an answer: keep reading until it hangs up or goes quiet
        except ConnectionResetError:
            return "closed"
        except TimeoutError:
            return "open"
        return "closed"
