"""Tests of ``superagent.participant.permissions``: the manifest's [permissions] enforced
by the kernel on real child processes.

Network: a network namespace made here (veth pair, random-suffixed names, removed in
teardown) holds the only non-loopback address used; a listener inside it proves the
address is reachable without the permission, and the host end's packet counter proves
that with it nothing left. The DNS test runs its resolver stand-in on port 53 of the
loopback of a namespace of its own, with the egress table loaded there: no real resolver
is ever asked. The network children run as loopback-only apps whose users and egress
groups are created here (random names, removed in teardown). Filesystem: a real child in
its own mount namespace, as ``nobody`` (an existing unprivileged user).
Tests that need root, nft or a mount namespace skip, naming what is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import pwd
import random
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from superagent.participant.egress import admit_app
from superagent.participant.isolation import (
    AppUser,
    RLimits,
    child_setup,
    ensure_app_user,
    remove_app_user,
)
from superagent.participant.nftegress import (
    egress_intact,
    egress_ruleset,
    parse_listing,
    remove_egress_table,
    run_nft,
)
from superagent.participant.permissions import (
    PermissionSupport,
    build_sandbox,
    detect_permissions,
    probe_mount_namespace,
    unenforced,
)
from tests.participant.children import child_python, run_child
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


@pytest.fixture
def loopback_apps(support: PermissionSupport) -> Iterator[Callable[[], AppUser]]:
    """Makes loopback-only apps as the agent does: a system user and an egress group in
    the test's table set; all removed afterwards."""
    made: list[str] = []

    def make() -> AppUser:
        app = f"perm-{suffix()}"
        made.append(app)
        user = ensure_app_user(app)
        return dataclasses.replace(user, loopback_gid=admit_app(app, support.table))

    try:
        yield make
    finally:
        for app in made:
            remove_app_user(app)


def loopback_sandbox(support: PermissionSupport, user: AppUser) -> Callable[[], None]:
    """The child setup of a loopback-only instance of ``user``'s app."""
    sandbox = build_sandbox(support, network="loopback", filesystem="any", writable=(),
                            switched_user=True, loopback_gid=user.loopback_gid)
    assert sandbox.gid == user.loopback_gid and unenforced(sandbox.report) == []
    return child_setup(user, None, RLimits(), sandbox)


def loopback_listener() -> tuple[socket.socket, int]:
    """Another app's port on loopback."""
    server = socket.socket()
    port = free_port()
    server.bind(("127.0.0.1", port))
    server.listen(8)
    return server, port


REFUSED = (f"errno{errno.EHOSTUNREACH}", f"errno{errno.EACCES}", f"errno{errno.EPERM}",
           f"errno{errno.ECONNREFUSED}")


def test_loopback_only_reaches_loopback_and_nothing_leaves(
        support: PermissionSupport, peer: Peer,
        loopback_apps: Callable[[], AppUser]) -> None:
    """Egress to another app's loopback port works; to the namespace's address it is
    refused at once, and the host end of the veth sends no packet."""
    user = loopback_apps()
    server, lo_port = loopback_listener()
    try:
        # control: without the permission the address answers (the test can fail)
        with socket.create_connection((peer.address, peer.port), timeout=DEADLINE):
            pass
        assert peer.listener.stdout is not None
        assert peer.listener.stdout.readline().strip() == "accepted"
        open_sandbox = build_sandbox(support, network="any", filesystem="any", writable=(),
                                     switched_user=True, loopback_gid=user.loopback_gid)
        done = run_child(CONNECT, child_setup(user, None, RLimits(), open_sandbox),
                         peer.address, str(peer.port), "127.0.0.1", str(lo_port))
        assert done.stdout.split()[:2] == ["ok", "ok"], done.stderr
        assert peer.listener.stdout.readline().strip() == "accepted"

        before = peer.tx_packets()
        started = time.monotonic()
        done = run_child(CONNECT, loopback_sandbox(support, user),
                         peer.address, str(peer.port), "127.0.0.1", str(lo_port))
        refused, allowed, udp = done.stdout.split()
        assert refused in REFUSED, done
        assert allowed == "ok", done
        assert udp == f"udp-errno{errno.EPERM}", done
        assert time.monotonic() - started < 3  # refused at once, not timed out
        assert peer.tx_packets() == before  # nothing went out on the link
    finally:
        server.close()


CREATE = """
import os, sys
os.umask(0o002)
os.mkdir(sys.argv[1])  # 0775
with open(os.path.join(sys.argv[1], "plain"), "w") as f:  # 0664
    f.write("first's data")
fd = os.open(os.path.join(sys.argv[1], "shared"), os.O_CREAT | os.O_WRONLY, 0o660)
os.write(fd, b"first's data")
os.close(fd)
print(os.getgid(), " ".join(str(g) for g in os.getgroups()))
"""

TRESPASS = CONNECT.replace("results = []", """results = []
for action in sys.argv[5:]:
    what, path = action.split(":", 1)
    flags = {"read": os.O_RDONLY, "write": os.O_WRONLY,
             "create": os.O_CREAT | os.O_EXCL | os.O_WRONLY}[what]
    try:
        os.close(os.open(path, flags, 0o600))
        results.append(what)
    except OSError as exc:
        results.append(f"errno{exc.errno}")""").replace("import socket, sys",
                                                      "import os, socket, sys")


def test_two_loopback_only_apps_share_no_files(
        support: PermissionSupport, peer: Peer,
        loopback_apps: Callable[[], AppUser]) -> None:
    """What the first app's instance creates with umask 002 (a 0775 directory, a 0664
    file, a 0660 file) is group-writable, but the group is the first app's own: the second
    app's instance cannot write any of it nor read the 0660 file, can still reach the
    first's loopback port, and still cannot leave the machine."""
    first, second = loopback_apps(), loopback_apps()
    assert first.loopback_gid != second.loopback_gid
    shared = Path(tempfile.mkdtemp(prefix="sa-perm-shared-", dir="/tmp"))
    server, lo_port = loopback_listener()  # the first app's port
    try:
        shared.chmod(0o777)  # like /tmp without the sticky bit: only the modes guard
        made_dir = shared / "first"
        made = run_child(CREATE, loopback_sandbox(support, first), str(made_dir))
        primary, *supplementary = (int(g) for g in made.stdout.split())
        assert primary == first.loopback_gid and supplementary == [first.gid], made
        for path, mode in ((made_dir, 0o775), (made_dir / "plain", 0o664),
                           (made_dir / "shared", 0o660)):
            st = path.stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (
                first.uid, first.loopback_gid, mode), path
        done = run_child(TRESPASS, loopback_sandbox(support, second), peer.address,
                         str(peer.port), "127.0.0.1", str(lo_port),
                         f"read:{made_dir / 'shared'}", f"write:{made_dir / 'shared'}",
                         f"write:{made_dir / 'plain'}", f"create:{made_dir / 'new'}")
        *files, refused, allowed, udp = done.stdout.split()
        assert files == [f"errno{errno.EACCES}"] * 4, done
        assert refused in REFUSED and udp == f"udp-errno{errno.EPERM}", done
        assert allowed == "ok", done
        # the control: the first app's own instance may do all of it
        own = run_child(TRESPASS, loopback_sandbox(support, first), "127.0.0.1",
                        str(lo_port), "127.0.0.1", str(lo_port),
                        f"read:{made_dir / 'shared'}", f"create:{made_dir / 'new'}")
        assert own.stdout.split()[:2] == ["read", "create"], own
    finally:
        server.close()
        shutil.rmtree(shared, ignore_errors=True)


CLONE_NEWNET = 0x40000000  # <linux/sched.h>

RESOLVER = """
import json, select, socket, sys
udp53, tcp53, control = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(),
                         socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
udp53.bind(("127.0.0.1", 53))
tcp53.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp53.bind(("127.0.0.1", 53))
tcp53.listen(8)
control.bind(("127.0.0.1", int(sys.argv[1])))
for sock in (udp53, tcp53):
    sock.setblocking(False)
print("listening", flush=True)
while True:
    control.recv(100)  # the probe's last datagram: what reached port 53 is queued by now
    seen = {"udp": 0, "tcp": 0}
    while select.select([udp53, tcp53], [], [], 0)[0]:
        for sock in select.select([udp53, tcp53], [], [], 0)[0]:
            if sock is udp53:
                sock.recv(100)
                seen["udp"] += 1
            else:
                sock.accept()[0].close()
                seen["tcp"] += 1
    print(json.dumps(seen), flush=True)
"""

LOOKUP = """
import socket, sys
results = []
for host in ("127.0.0.1", "127.0.0.53"):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.sendto(b"query", (host, 53))
        results.append("sent")
    except OSError as exc:
        results.append(f"errno{exc.errno}")
s = socket.socket()
s.settimeout(3)
try:
    s.connect(("127.0.0.1", 53))
    results.append("ok")
except OSError as exc:
    results.append(f"errno{exc.errno}")
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"done", ("127.0.0.1", int(sys.argv[1])))
print(" ".join(results))
"""


@pytest.fixture
def resolver_namespace(support: PermissionSupport) -> Iterator[str]:
    """A network namespace with only its loopback up: its port 53 is this test's."""
    if shutil.which("ip") is None:
        pytest.skip("needs the ip tool (iproute2) to make a network namespace")
    namespace = f"sa-dns-{suffix()}"
    ip("netns", "add", namespace)
    try:
        ip("-n", namespace, "link", "set", "lo", "up")
        yield namespace
    finally:
        ip("netns", "del", namespace)


def in_namespace(namespace: str, setup: Callable[[], None]) -> Callable[[], None]:
    """``setup`` preceded by joining ``namespace``'s network (still root then)."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
    setns = ctypes.CDLL(None, use_errno=True).setns

    def enter() -> None:
        if setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        setup()

    return enter


def read_line(process: subprocess.Popen[str]) -> str:
    """The next line ``process`` prints, within DEADLINE (one line per event: nothing
    waits in the reader's buffer)."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], DEADLINE)
    assert ready, "no line within the deadline"
    return process.stdout.readline().strip()


def test_loopback_only_instances_get_no_dns(
        support: PermissionSupport, resolver_namespace: str,
        loopback_apps: Callable[[], AppUser]) -> None:
    """A resolver on loopback port 53 forwards lookups outside: a loopback-only instance
    cannot send it a datagram or open a connection to it, while the same app's process
    outside the egress group can (the control)."""
    user = loopback_apps()
    gid = user.loopback_gid
    assert gid is not None
    loaded = subprocess.run(["ip", "netns", "exec", resolver_namespace, "nft", "-f", "-"],
                            input=egress_ruleset(support.table, [gid]),
                            capture_output=True, text=True, timeout=DEADLINE)
    assert loaded.returncode == 0, loaded.stderr
    control_port = free_port()
    resolver = subprocess.Popen(["ip", "netns", "exec", resolver_namespace, child_python(),
                                 "-c", RESOLVER, str(control_port)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert resolver.stdout is not None
        assert read_line(resolver) == "listening"
        as_app = build_sandbox(support, network="any", filesystem="any", writable=(),
                               switched_user=True)
        done = run_child(LOOKUP, in_namespace(resolver_namespace, child_setup(
            user, None, RLimits(), as_app)), str(control_port))
        assert done.stdout.split() == ["sent", "sent", "ok"], done
        assert json.loads(read_line(resolver)) == {"udp": 1, "tcp": 1}
        done = run_child(LOOKUP, in_namespace(resolver_namespace,
                                              loopback_sandbox(support, user)),
                         str(control_port))
        udp, udp_stub, tcp = done.stdout.split()
        assert udp == udp_stub == f"errno{errno.EPERM}", done
        assert tcp in REFUSED, done
        assert json.loads(read_line(resolver)) == {"udp": 0, "tcp": 0}
    finally:
        resolver.kill()
        resolver.wait()


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
    enforced = PermissionSupport(network_problem=None, filesystem_problem=None)
    as_agent = build_sandbox(enforced, network="loopback", filesystem="any", writable=(),
                             switched_user=False, loopback_gid=4242)
    assert unenforced(as_agent.report) == ["network"]
    # an app whose egress group could not be set up runs, unrestricted and reported
    no_group = build_sandbox(enforced, network="loopback", filesystem="any", writable=(),
                             switched_user=True)
    assert no_group.gid is None and unenforced(no_group.report) == ["network"]
    assert no_group.report is not None and "egress group" in str(no_group.report["network"])
    # with it, the instance runs with that group
    own = build_sandbox(enforced, network="loopback", filesystem="any", writable=(),
                        switched_user=True, loopback_gid=4242)
    assert own.gid == 4242 and unenforced(own.report) == []
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


def test_deleting_an_app_takes_its_egress_gid_out_of_the_set(
        support: PermissionSupport) -> None:
    """groupdel frees the gid of the app's egress group for the next group made on the
    host (at once, often: system gids are handed out from the top down); left in the set,
    it would cut that group off the network: the builds and instances of an app that may
    use it, or anything else of the host that gets the gid."""
    app = f"perm-{suffix()}"
    try:
        ensure_app_user(app)
        gid = admit_app(app, support.table)
        assert egress_intact(support.table, [gid])
    finally:
        remove_app_user(app, egress_table=support.table)
    code, listed = run_nft("list", "table", "inet", support.table)
    assert code == 0, listed
    assert gid not in parse_listing(listed)[1], listed
