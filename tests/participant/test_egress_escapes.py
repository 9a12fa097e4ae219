"""Roads out of ``network = "loopback"`` an instance might try, as root on real children.

The instance runs as its app's user with its egress group as primary group and the
app's own group (outside the egress set) as a supplementary one. None of these may give
it a socket outside the set or a packet past the rules: changing its group (setgid
calls, a setgid copy of the interpreter it owns, ``sg``/``newgrp``: ``no_new_privs`` and
no CAP_SETGID), a user namespace, raw and packet sockets, a v4-mapped IPv6 address, a
local IPv6 address other than ::1, the machine's own non-loopback address (refused: the
host's services are reached on loopback), and port 53 over ::1. Reuses the network
namespace, table and app fixtures of ``test_permissions``.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import random
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import pytest

from superagent.participant.isolation import AppUser
from superagent.participant.permissions import PermissionSupport
from tests.participant.children import run_child
from tests.participant.test_permissions import (  # noqa: F401 (fixtures used by name)
    Peer,
    attempts,
    loopback_apps,
    loopback_sandbox,
    peer,
    support,
)

ESCAPES = r'''
import ctypes, json, os, shutil, socket, subprocess, sys
peer, port, own, own_port, v6, v6_port, app_gid, app_group, work = sys.argv[1:]
port, own_port, v6_port, app_gid = int(port), int(own_port), int(v6_port), int(app_gid)
out = {}
def attempt(name, action):
    try:
        action()
        out[name] = "ok"
    except OSError as exc:
        out[name] = f"errno{exc.errno}"
def connect(family, address):
    s = socket.socket(family)
    s.settimeout(3)
    try:
        s.connect(address)
    finally:
        s.close()
attempt("setgid", lambda: os.setgid(app_gid))
attempt("setegid", lambda: os.setegid(app_gid))
attempt("setresgid", lambda: os.setresgid(app_gid, app_gid, app_gid))
ctypes.CDLL(None).setfsgid(app_gid)
out["fsgid"] = ctypes.CDLL(None).setfsgid(-1)
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
attempt("mapped", lambda: connect(socket.AF_INET6, ("::ffff:" + peer, port)))
attempt("own", lambda: connect(socket.AF_INET, (own, own_port)))
attempt("v6", lambda: connect(socket.AF_INET6, (v6, v6_port)))
attempt("dns6", lambda: connect(socket.AF_INET6, ("::1", 53)))
attempt("lo6", lambda: connect(socket.AF_INET6, ("::1", v6_port)))
copy = os.path.join(work, "python")
shutil.copy(sys.executable, copy)
os.chown(copy, -1, app_gid)
os.chmod(copy, 0o2755)
probe = f"import os, socket\nprint(os.getegid())\nsocket.create_connection(({peer!r}, {port}), 3)"
done = subprocess.run([copy, "-c", probe], capture_output=True, text=True)
outcome = "/ok" if done.returncode == 0 else "/refused"
out["setgid_binary"] = (done.stdout.split() or ["?"])[0] + outcome
for tool in ("sg", "newgrp"):
    if shutil.which(tool):
        done = subprocess.run([tool, app_group, *(["-c", "id -g"] if tool == "sg" else [])],
                              input="id -g\n", capture_output=True, text=True, timeout=10)
        out[tool] = done.stdout.strip() or "refused"
pid = os.fork()
if pid == 0:  # a user namespace: full capabilities in it, none over the host's network
    try:
        if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        connect(socket.AF_INET, (peer, port))
        os._exit(0)
    except OSError:
        os._exit(1)
_, status = os.waitpid(pid, 0)
out["userns"] = "ok" if status == 0 else "refused"
print(json.dumps(out))
'''


@pytest.fixture
def local_v6() -> Iterator[str]:
    """A unique-local IPv6 address on lo (removed afterwards): the machine's own."""
    address = f"fd5a:{random.randint(1, 0xfffe):x}:{random.randint(1, 0xfffe):x}::7"
    added = subprocess.run(["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo",
                            "nodad"], capture_output=True, text=True, check=False)
    if added.returncode != 0:
        pytest.skip(f"cannot add an IPv6 address to lo: {added.stderr.strip()}")
    try:
        yield address
    finally:
        subprocess.run(["ip", "-6", "addr", "del", f"{address}/128", "dev", "lo"],
                       capture_output=True, check=False)


def listener(family: socket.AddressFamily, address: str, port: int = 0) -> socket.socket:
    server = socket.socket(family)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    server.bind((address, port))
    server.listen(8)
    return server


def test_no_road_out_of_loopback(request: pytest.FixtureRequest, local_v6: str) -> None:
    found: PermissionSupport = request.getfixturevalue("support")
    far: Peer = request.getfixturevalue("peer")
    make: Callable[[], AppUser] = request.getfixturevalue("loopback_apps")
    sent: Callable[[], int] = request.getfixturevalue("attempts")  # SYNs and UDP to far
    user = make()
    own = far.address.rsplit(".", 1)[0] + ".1"  # the host's end of the veth pair
    servers = [listener(socket.AF_INET, "0.0.0.0"), listener(socket.AF_INET6, "::")]
    # a listener on [::1]:53 when the port is free (no resolver of the host there), so
    # only the rules can refuse the connection
    with contextlib.suppress(OSError):
        servers.append(listener(socket.AF_INET6, "::1", 53))
    try:
        with tempfile.TemporaryDirectory(prefix="sa-escape-") as work:
            os.chmod(work, 0o755)
            os.chown(work, user.uid, user.gid)
            before = sent()
            done = run_child(ESCAPES, loopback_sandbox(found, user), far.address,
                             str(far.port), own, str(servers[0].getsockname()[1]),
                             local_v6, str(servers[1].getsockname()[1]), str(user.gid),
                             grp.getgrgid(user.gid).gr_name, work)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        egress = str(user.loopback_gid)
        refused = ("errno1", "errno13", "errno113")
        assert out["setgid"] == out["setegid"] == out["setresgid"] == "errno1", out
        assert out["fsgid"] == user.loopback_gid, out
        assert out["raw"] == out["packet"] == "errno1", out
        for road in ("mapped", "own", "v6", "dns6"):
            assert out[road] in refused, (road, out)
        assert out["lo6"] == "ok", out  # the control: ::1 is loopback
        assert out["setgid_binary"] == f"{egress}/refused", out
        for tool in ("sg", "newgrp"):
            assert out.get(tool, "refused") in ("refused", egress), out
        assert out["userns"] == "refused", out
        assert sent() == before  # no connection attempt went out on the link
    finally:
        for server in servers:
            server.close()

