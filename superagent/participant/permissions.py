"""Per-app permissions of the manifest (``[permissions]``), enforced by the kernel.

Theory of operation
-------------------
``network = "loopback"`` and ``filesystem = "release"`` are promises the kernel keeps,
not the app; where the agent cannot make the kernel keep one, the instance still
starts and its status names the permission as not enforced. Three steps:

1. **Detection, once at agent start.** ``detect_permissions()`` decides what this
   machine can enforce. Network needs root, ``nft`` (nftables) and a kernel that
   accepts the egress table; filesystem needs root and a mount namespace (probed by
   a throwaway child that unshares one). Each has ``None`` (enforceable) or a reason.
2. **Network: one host-wide nftables rule keyed on a group.** Instances of loopback-only
   apps run with the primary group ``sa-loopback`` (created on demand, a system group),
   their app's group becoming a supplementary one; their uid stays the app's, so access
   to their files and the per-uid limits are unchanged. The table ``inet
   superagent_egress`` rejects, in the output hook, every packet of a socket owned by
   that gid whose destination is not 127.0.0.0/8 or ::1: the packet is refused before
   routing sends it anywhere (connect fails at once, a datagram send fails with EPERM)
   and nothing leaves the machine. Keying on the gid rather than the uid leaves the
   app's builds (same uid, own gid) free to fetch dependencies, and makes the rule
   static: every agent on the host writes the same table, atomically, and nothing
   follows instance lifetimes. An app cannot leave the group: it has no CAP_SETGID and
   ``no_new_privs`` stops setgid binaries. A firewall reload (``nft flush ruleset``,
   ``systemctl restart nftables``) deletes the table while instances run: the agent
   checks it every ``EGRESS_CHECK_PERIOD`` and loads it again (``restore_egress_table``).
3. **Filesystem: a mount namespace per instance.** What ``Sandbox.prepare()`` returns runs in the
   child between fork and exec (``isolation.child_setup``), still as root: it unshares
   the mount namespace, makes every mount private (nothing propagates back to the
   host), bind-mounts the release directory and the instance's data directory onto
   themselves, then remounts every other mount read-only (bind remounts, keeping each
   mount's nosuid/nodev/noexec flags). Writes outside those two trees fail with EROFS.
   It changes into its working directory again at the end: the one Popen entered
   before is the directory under the now read-only mount.
   Open file descriptors the agent passed (the log files) refer to the host's mounts
   and stay writable.

Detection and the nft calls are blocking; async callers use ``trio.to_thread``.
"""

from __future__ import annotations

import ctypes
import functools
import grp
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from superagent.participant.errors import IsolationError

log = structlog.get_logger("superagent.participant")

LOOPBACK_GROUP = "sa-loopback"  # the primary group of loopback-only instances
EGRESS_TABLE = "superagent_egress"  # nftables table (family inet), host-wide
NFT_TIMEOUT = 10.0
GROUPADD_TIMEOUT = 30.0
PROBE_TIMEOUT = 10.0
EGRESS_CHECK_PERIOD = 5.0  # seconds a deleted egress table may stay gone (a firewall reload)

CLONE_NEWNS = 0x00020000  # <linux/sched.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
# per-mount flags a bind remount must repeat, or the kernel refuses to clear them
_KEPT_FLAGS = {b"nosuid": MS_NOSUID, b"nodev": MS_NODEV, b"noexec": MS_NOEXEC,
               b"noatime": MS_NOATIME, b"nodiratime": MS_NODIRATIME,
               b"relatime": MS_RELATIME, b"strictatime": MS_STRICTATIME}


def egress_ruleset(table: str, gid: int) -> str:
    """The nft script that (re)defines ``table`` atomically: declaring it first makes the
    delete succeed on a fresh host, and one ``nft -f`` is one transaction."""
    reject = "reject with icmpx admin-prohibited"
    return (f"table inet {table} {{}}\n"
            f"delete table inet {table}\n"
            f"table inet {table} {{\n"
            f"  chain output {{\n"
            f"    type filter hook output priority 0; policy accept;\n"
            f"    meta skgid {gid} ip daddr != 127.0.0.0/8 {reject}\n"
            f"    meta skgid {gid} ip6 daddr != ::1 {reject}\n"
            f"  }}\n"
            f"}}\n")


@dataclass(frozen=True, kw_only=True)
class PermissionSupport:
    """What this agent can enforce: each ``*_problem`` is None or why not."""

    network_problem: str | None
    filesystem_problem: str | None
    loopback_gid: int | None = None
    table: str = EGRESS_TABLE

    def to_json(self) -> dict[str, object]:
        return {"network": self.network_problem or "enforced",
                "filesystem": self.filesystem_problem or "enforced"}


UNSUPPORTED = PermissionSupport(network_problem="the agent is not root",
                                filesystem_problem="the agent is not root")


def detect_permissions(*, group: str = LOOPBACK_GROUP,
                       table: str = EGRESS_TABLE) -> PermissionSupport:
    """Decide what can be enforced here; installs the egress table when it can. Never
    raises: a missing capability is a reason (and one warning)."""
    if os.geteuid() != 0:
        return UNSUPPORTED
    gid: int | None = None
    network: str | None
    try:
        gid = ensure_group(group)
        network = install_egress_table(table, gid)
    except IsolationError as exc:
        network = str(exc)
    filesystem = probe_mount_namespace()
    for name, problem in (("network", network), ("filesystem", filesystem)):
        if problem is not None:
            log.warning("permission cannot be enforced on this machine", permission=name,
                        reason=problem)
    return PermissionSupport(network_problem=network, filesystem_problem=filesystem,
                             loopback_gid=gid if network is None else None, table=table)


def ensure_group(name: str) -> int:
    """The gid of system group ``name``, created with groupadd when missing."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        pass
    groupadd = shutil.which("groupadd") or "/usr/sbin/groupadd"
    try:
        subprocess.run([groupadd, "--system", "-f", name], capture_output=True, text=True,
                       timeout=GROUPADD_TIMEOUT, check=False)
        return grp.getgrnam(name).gr_gid  # read back: -f makes a racing agent's add fine
    except (OSError, subprocess.TimeoutExpired, KeyError) as exc:
        raise IsolationError(f"cannot create group {name}: {exc}", path=groupadd) from exc


def install_egress_table(table: str, gid: int) -> str | None:
    """Load the egress rules; None when done, else why not."""
    nft = shutil.which("nft")
    if nft is None:
        return "nft (nftables) is not installed"
    try:
        done = subprocess.run([nft, "-f", "-"], input=egress_ruleset(table, gid),
                              capture_output=True, text=True, timeout=NFT_TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run nft: {exc}"
    if done.returncode != 0:
        return f"nft refused the egress table: {done.stderr.strip()[:300]}"
    return None


def restore_egress_table(support: PermissionSupport) -> bool:
    """Load the egress table again when it is gone or lost its rules (a firewall reload
    flushes the whole ruleset); True when it did. Never raises."""
    nft = shutil.which("nft")
    if support.loopback_gid is None or nft is None:
        return False
    try:
        listed = subprocess.run([nft, "list", "table", "inet", support.table],
                                capture_output=True, text=True, timeout=NFT_TIMEOUT,
                                check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if listed.returncode == 0 and listed.stdout.count(f"skgid {support.loopback_gid} ") >= 2:
        return False
    problem = install_egress_table(support.table, support.loopback_gid)
    log.warning("nftables egress table was gone: loaded again", table=support.table,
                problem=problem)
    return problem is None


def remove_egress_table(table: str) -> None:
    """Delete ``table`` (tests; production keeps the host-wide table). Never raises."""
    nft = shutil.which("nft")
    if nft is not None:
        subprocess.run([nft, "delete", "table", "inet", table], capture_output=True,
                       timeout=NFT_TIMEOUT, check=False)


def probe_mount_namespace() -> str | None:
    """None when a throwaway child can enter the whole sandbox (unshare, bind mount,
    remount every mount of this machine read-only), else why not: a mount the kernel
    will not remount is found here, not at an instance's start."""
    with tempfile.TemporaryDirectory(prefix="sa-probe-") as kept:
        enter = Sandbox(writable=(os.fsencode(kept),)).prepare()
        # Popen says only that the preexec_fn raised; the reason must say which step failed
        # and why (EPERM on unshare in a service without CAP_SYS_ADMIN, a mount that
        # refuses the remount...): the child writes it to a pipe first.
        read_end, write_end = os.pipe()

        def enter_or_explain() -> None:
            try:
                enter()
            except BaseException as exc:
                os.write(write_end, str(exc).encode(errors="replace")[:1000] or b"failed")
                raise

        try:
            subprocess.run(["/bin/true"], preexec_fn=enter_or_explain, check=True,
                           timeout=PROBE_TIMEOUT, cwd="/", pass_fds=(write_end,))
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(write_end)
            write_end = -1
            with os.fdopen(read_end, "rb") as pipe:
                why = pipe.read().decode(errors="replace")
            read_end = -1
            return f"cannot create a read-only mount namespace: {why or exc}"
        finally:
            for fd in (read_end, write_end):
                if fd >= 0:
                    os.close(fd)
    return None


@functools.cache
def _libc_call(name: str) -> Callable[..., int]:
    libc = ctypes.CDLL(None, use_errno=True)
    function: Callable[..., int] = getattr(libc, name)
    return function


# --- one instance -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Sandbox:
    """What ``child_setup`` applies for an instance's permissions: ``gid`` replaces the
    app's group (loopback-only network), ``writable`` (encoded absolute paths) turns the
    mount namespace on. ``report`` is the instance's view for the status API."""

    gid: int | None = None
    writable: tuple[bytes, ...] | None = None
    report: dict[str, dict[str, object]] | None = None

    def prepare(self) -> Callable[[], None]:
        """The part of the child's setup that runs as root before the uid is dropped.
        Everything it needs (libc calls, paths) is made here, in the parent."""
        writable = self.writable
        if writable is None:
            return lambda: None
        unshare, mount = _libc_call("unshare"), _libc_call("mount")
        get_errno, strerror = ctypes.get_errno, os.strerror

        def check(result: int, what: bytes) -> None:
            if result != 0:
                code = get_errno()
                raise OSError(code, f"{strerror(code)}: {what.decode(errors='replace')}")

        def enter() -> None:
            check(unshare(CLONE_NEWNS), b"unshare")
            check(mount(None, b"/", None, MS_REC | MS_PRIVATE, None), b"/")
            for path in writable:
                check(mount(path, path, None, MS_BIND | MS_REC, None), path)
            for point, flags in _mounts():
                if any(point == p or point.startswith(p.rstrip(b"/") + b"/")
                       for p in writable):
                    continue
                result = mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags,
                               None)
                check(result, point)
            # Popen changed into the working directory before this ran: the directory it
            # holds is the one under the old (now read-only) mount, not the bind mount on
            # top; resolving the path again lands in the writable tree
            os.chdir(os.getcwd())

        return enter


def _mounts() -> list[tuple[bytes, int]]:
    """(mount point, per-mount flags to keep) of this namespace, from mountinfo."""
    fd = os.open(b"/proc/self/mountinfo", os.O_RDONLY)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    found = []
    for line in b"".join(chunks).splitlines():
        fields = line.split(b" ")
        if len(fields) < 6:
            continue
        flags = 0
        for option in fields[5].split(b","):
            flags |= _KEPT_FLAGS.get(option, 0)
        found.append((_unescape(fields[4]), flags))
    return found


def _unescape(path: bytes) -> bytes:
    r"""mountinfo writes space, tab, newline and backslash as \ooo octal."""
    if b"\\" not in path:
        return path
    out, i = bytearray(), 0
    while i < len(path):
        if path[i:i + 1] == b"\\" and path[i + 1:i + 4].isdigit():
            out.append(int(path[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return bytes(out)


def build_sandbox(support: PermissionSupport | None, *, network: str, filesystem: str,
                  writable: tuple[Path, ...], switched_user: bool) -> Sandbox:
    """The sandbox of an instance whose manifest asks for ``network``/``filesystem``, on
    an agent with ``support``: what can be enforced is, the rest is reported."""
    report: dict[str, dict[str, object]] = {}
    gid: int | None = None
    paths: tuple[bytes, ...] | None = None
    if network != "any":
        problem = support.network_problem if support is not None else "no detection"
        if problem is None and not switched_user:
            problem = "the instance does not run as its own user"
        if problem is None and support is not None:
            gid = support.loopback_gid
        table = support.table if support is not None else EGRESS_TABLE
        report["network"] = {"wanted": network, "enforced": gid is not None,
                             "reason": problem or f"nftables table inet {table} rejects"
                                                  " non-loopback egress"}
    if filesystem != "any":
        problem = support.filesystem_problem if support is not None else "no detection"
        if problem is None:
            paths = tuple(os.fsencode(p.resolve()) for p in writable)
        report["filesystem"] = {"wanted": filesystem, "enforced": paths is not None,
                                "reason": problem or "mount namespace: read-only outside "
                                + ", ".join(str(p) for p in writable)}
    return Sandbox(gid=gid, writable=paths, report=report)


def unenforced(report: Mapping[str, Mapping[str, object]] | None) -> list[str]:
    """The permissions an instance asked for that are not enforced, by name."""
    return sorted(name for name, entry in (report or {}).items() if not entry["enforced"])
