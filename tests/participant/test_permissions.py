"""Tests of ``superagent.participant.permissions``: the manifest's [permissions] enforced
by the kernel on real child processes.

Network: a network namespace made here (veth pair, random-suffixed names, removed in
teardown) holds the only non-loopback address used; a listener inside it proves the
address is reachable without the permission, and the host end's packet counter proves
that with it nothing left. Filesystem: a real child in its own mount namespace.
The children run as ``nobody`` (an existing unprivileged user: none is created).
Tests that need root, nft or a mount namespace skip, naming what is missing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from superagent.participant.isolation import AppUser, RLimits, child_setup
from superagent.participant.permissions import (
    PermissionSupport,
    build_sandbox,
    detect_permissions,
    probe_mount_namespace,
    remove_egress_table,
    restore_egress_table,
    unenforced,
)
from tests.participant.children import run_child
from tests.support.ports import free_port

SUFFIX_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
DEADLINE = 10.0

CONNECT = """
import socket, sys
results = []
for host, port in ((sys.argv[1], int(sys.argv[2])), (sys.argv[3], int(sys.argv[4]))):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(3)
    try:
        s.connect((host, port))
        results.append("ok")
    except OSError as exc:
        results.append(f"errno{exc.errno}")
    finally:
        s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
    results.append("udp-sent")
except OSError as exc:
    results.append(f"udp-errno{exc.errno}")
print(" ".join(results))
"""

WRITE = """
import sys
for path in sys.argv[1:]:
    try:
        with open(path, "w") as f:
            f.write("x")
        print("ok", end=" ")
    except OSError as exc:
        print(f"errno{exc.errno}", end=" ")
"""


def suffix() -> str:
    return "".join(random.choices(SUFFIX_CHARS, k=6))


def nobody() -> AppUser:
    entry = pwd.getpwnam("nobody")
    return AppUser(name="nobody", uid=entry.pw_uid, gid=entry.pw_gid, switched=True)


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the agent enforces permissions as root only")


@dataclass
class Peer:
    """The far end of a veth pair, in a namespace of its own, with a TCP listener."""

    namespace: str
    host_link: str
    address: str
    port: int
    listener: subprocess.Popen[str]

    def tx_packets(self) -> int:
        return int(Path(f"/sys/class/net/{self.host_link}/statistics/tx_packets").read_text())


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=DEADLINE)


@pytest.fixture
def peer() -> Iterator[Peer]:
    """A network namespace reachable only over a veth pair made for this test."""
    need_root()
    if shutil.which("ip") is None:
        pytest.skip("needs the ip tool (iproute2) to make a network namespace")
    tag = suffix()
    namespace, host_link, peer_link = f"sa-perm-{tag}", f"sap{tag}a", f"sap{tag}b"
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True,
                            check=True).stdout
    for _ in range(50):  # a /30 under 10.0.0.0/8 no route of this machine mentions
        net = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        if f"{net}." not in routes:
            break
    made: list[str] = []
    listener: subprocess.Popen[str] | None = None
    try:
        ip("netns", "add", namespace)
        made.append("netns")
        ip("link", "add", host_link, "type", "veth", "peer", "name", peer_link)
        made.append("link")
        ip("link", "set", peer_link, "netns", namespace)
        for link in (host_link,):
            with contextlib.suppress(OSError):  # quiet link: no IPv6 chatter on the counter
                Path(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6").write_text("1")
        ip("addr", "add", f"{net}.1/30", "dev", host_link)
        ip("link", "set", host_link, "up")
        ip("-n", namespace, "addr", "add", f"{net}.2/30", "dev", peer_link)
        ip("-n", namespace, "link", "set", peer_link, "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        port = free_port()
        listener = subprocess.Popen(
            ["ip", "netns", "exec", namespace, "/usr/bin/python3", "-c",
             "import socket, sys\n"
             "s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)\n"
             "print('listening', flush=True)\n"
             "while True:\n"
             "    c, _ = s.accept(); print('accepted', flush=True); c.close()\n",
             f"{net}.2", str(port)], stdout=subprocess.PIPE, text=True)
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "listening"
        yield Peer(namespace=namespace, host_link=host_link, address=f"{net}.2", port=port,
                   listener=listener)
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        if "link" in made:
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("link", "del", host_link)  # takes its peer along
        if "netns" in made:
            ip("netns", "del", namespace)


@pytest.fixture
def support() -> Iterator[PermissionSupport]:
    """Detection with a test-only group and nftables table, both removed afterwards."""
    need_root()
    if shutil.which("nft") is None:
        pytest.skip("needs nft (nftables) to enforce network = 'loopback'")
    tag = suffix()
    group, table = f"sa-lotest-{tag}", f"satest_{tag}"
    try:
        found = detect_permissions(group=group, table=table)
        if found.network_problem is not None:
            pytest.skip(f"network permission not enforceable here: {found.network_problem}")
        yield found
    finally:
        remove_egress_table(table)
        subprocess.run(["groupdel", group], capture_output=True, check=False)


def loopback_listener() -> tuple[socket.socket, int]:
    """Another app's port on loopback."""
    server = socket.socket()
    port = free_port()
    server.bind(("127.0.0.1", port))
    server.listen(8)
    return server, port


def test_loopback_only_reaches_loopback_and_nothing_leaves(
        support: PermissionSupport, peer: Peer) -> None:
    """Egress to another app's loopback port works; to the namespace's address it is
    refused at once, and the host end of the veth sends no packet."""
    server, lo_port = loopback_listener()
    try:
        # control: without the permission the address answers (the test can fail)
        with socket.create_connection((peer.address, peer.port), timeout=DEADLINE):
            pass
        assert peer.listener.stdout is not None
        assert peer.listener.stdout.readline().strip() == "accepted"
        open_sandbox = build_sandbox(support, network="any", filesystem="any", writable=(),
                                     switched_user=True)
        done = run_child(CONNECT, child_setup(nobody(), None, RLimits(), open_sandbox),
                         peer.address, str(peer.port), "127.0.0.1", str(lo_port))
        assert done.stdout.split()[:2] == ["ok", "ok"], done.stderr
        assert peer.listener.stdout.readline().strip() == "accepted"

        sandbox = build_sandbox(support, network="loopback", filesystem="any", writable=(),
                                switched_user=True)
        assert sandbox.gid == support.loopback_gid
        assert unenforced(sandbox.report) == []
        before = peer.tx_packets()
        started = time.monotonic()
        done = run_child(CONNECT, child_setup(nobody(), None, RLimits(), sandbox),
                         peer.address, str(peer.port), "127.0.0.1", str(lo_port))
        refused, allowed, udp = done.stdout.split()
        assert refused in (f"errno{errno.EHOSTUNREACH}", f"errno{errno.EACCES}",
                           f"errno{errno.EPERM}", f"errno{errno.ECONNREFUSED}"), done
        assert allowed == "ok", done
        assert udp == f"udp-errno{errno.EPERM}", done
        assert time.monotonic() - started < 3  # refused at once, not timed out
        assert peer.tx_packets() == before  # nothing went out on the link
    finally:
        server.close()


def test_filesystem_release_writes_only_release_and_data() -> None:
    """In its mount namespace the child writes its release and data dirs, nothing else;
    the host's view is unchanged."""
    need_root()
    problem = probe_mount_namespace()
    if problem is not None:
        pytest.skip(problem)
    user = nobody()
    base = Path(tempfile.mkdtemp(prefix="sa-perm-fs-", dir="/tmp"))
    try:
        base.chmod(0o755)
        dirs = {name: base / name for name in ("release", "data", "outside")}
        for path in dirs.values():
            path.mkdir()
            os.chown(path, user.uid, user.gid)  # the uid may write all three: only the
        support = PermissionSupport(network_problem="not tested here",  # mounts refuse
                                    filesystem_problem=None)
        sandbox = build_sandbox(support, network="any", filesystem="release",
                                writable=(dirs["release"], dirs["data"]), switched_user=True)
        assert unenforced(sandbox.report) == []
        targets = [str(dirs[name] / "f") for name in ("release", "data", "outside")]
        done = run_child(WRITE, child_setup(user, None, RLimits(), sandbox), *targets,
                         "/tmp/sa-perm-never-written")
        assert done.stdout.split() == ["ok", "ok", f"errno{errno.EROFS}",
                                       f"errno{errno.EROFS}"], done
        assert not (dirs["outside"] / "f").exists()
        # the control: without the sandbox the same child writes outside
        plain = run_child(WRITE, child_setup(user, None, RLimits(), None),
                          str(dirs["outside"] / "f"))
        assert plain.stdout.split() == ["ok"], plain
        # the host's mounts are untouched (the namespace's remounts stayed in it)
        (base / "host-write").write_text("x")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unenforceable_permissions_are_reported_not_refused() -> None:
    """Without the capability the instance still gets a sandbox (nothing applied) and a
    report naming each permission that is not enforced, and why."""
    support = PermissionSupport(network_problem="nft (nftables) is not installed",
                                filesystem_problem="cannot create a mount namespace: EPERM")
    sandbox = build_sandbox(support, network="loopback", filesystem="release",
                            writable=(Path("/srv/r"), Path("/srv/d")), switched_user=True)
    assert sandbox.gid is None and sandbox.writable is None
    assert unenforced(sandbox.report) == ["filesystem", "network"]
    assert sandbox.report is not None
    assert sandbox.report["network"]["reason"] == "nft (nftables) is not installed"
    # an agent that is not root runs instances as itself: the gid rule cannot apply
    enforced = PermissionSupport(network_problem=None, filesystem_problem=None,
                                 loopback_gid=4242)
    as_agent = build_sandbox(enforced, network="loopback", filesystem="any", writable=(),
                             switched_user=False)
    assert unenforced(as_agent.report) == ["network"]
    # nothing asked, nothing reported
    assert build_sandbox(None, network="any", filesystem="any", writable=(),
                         switched_user=True).report == {}


def test_status_names_unenforced_permissions() -> None:
    """``superagent status`` lists, under its instance table, each instance with a
    permission its node does not enforce; an instance without any gets no line."""
    from superagent.client_cli import render_instances

    base = {"app": "hello", "release": "r1", "state": "ready", "port": 5000}
    nodes = {"nodes": [{"name": "n1", "up": True, "address": "127.0.0.1:7001", "status": {
        "routes": {}, "listen": [], "instances": [
            {**base, "id": "hello@r1.1", "unenforced": ["filesystem", "network"]},
            {**base, "id": "hello@r1.2", "unenforced": []},
            {**base, "id": "hello@r1.3"}]}}]}
    text = render_instances(nodes, {"apps": []})
    assert "permissions NOT enforced:\n  hello@r1.1 on n1: filesystem, network" in text
    assert "hello@r1.2 on" not in text and "hello@r1.3 on" not in text


def test_the_egress_table_is_restored_only_when_gone(support: PermissionSupport) -> None:
    """``restore_egress_table`` leaves an intact table alone (the agent calls it every few
    seconds) and loads a deleted one again, rules included."""
    assert restore_egress_table(support) is False
    remove_egress_table(support.table)
    assert restore_egress_table(support) is True
    listed = subprocess.run(["nft", "list", "table", "inet", support.table],
                            capture_output=True, text=True, check=True).stdout
    assert listed.count(f"skgid {support.loopback_gid} ") == 2, listed
    assert restore_egress_table(support) is False


def test_an_unusable_mount_namespace_is_explained() -> None:
    """Without CAP_SYS_ADMIN (a restricted service unit) the probe fails, and its reason
    says which step and why, not just that the child's setup raised."""
    need_root()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv (util-linux) to drop CAP_SYS_ADMIN")
    code = ("from superagent.participant.permissions import probe_mount_namespace\n"
            "print(probe_mount_namespace())\n")
    done = subprocess.run([setpriv, "--bounding-set=-sys_admin", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    reason = done.stdout.strip()
    assert "unshare" in reason and "Operation not permitted" in reason, reason
