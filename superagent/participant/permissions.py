"""Per-app permissions of the manifest (``[permissions]``), enforced by the kernel.

Theory of operation
-------------------
``network = "loopback"`` and ``filesystem = "release"`` are promises the kernel keeps,
not the app; where the agent cannot make the kernel keep one, the instance still
starts and its status names the permission as not enforced. Three steps:

1. **Detection, once per agent.** ``detect_permissions()`` decides what this
   machine can enforce. Network needs root, ``nft`` (nftables) and a kernel that
   accepts the egress table (loaded then); filesystem needs root and a mount namespace
   (probed by a throwaway child that unshares one). Each has ``None`` (enforceable) or a reason.
2. **Network: a group of the app's own, in an nftables set.** Instances of a loopback-only
   app run with the primary group ``salo-<app>`` (``isolation.ensure_loopback_group``,
   created on demand under the users lock), their app's group becoming a supplementary
   one; their uid stays the app's, so access to their files and the per-uid limits are
   unchanged, and what they create is open to no other app (the group is theirs alone,
   whatever the umask). The agent adds that gid to the set of the host-wide table
   ``inet superagent_egress`` (``nftegress``), whose output rules refuse those sockets
   every destination but loopback, and port 53 everywhere (the host's stub resolver
   would forward a lookup outside). Several agents share the table: loading it never
   drops another agent's entries. A firewall reload (``nft flush ruleset``, ``systemctl
   restart nftables``) deletes the table while instances run: the agent checks it every
   ``EGRESS_CHECK_PERIOD`` and loads it again with its instances' groups
   (``restore_egress_table``). Instances an earlier agent started with the shared group
   ``sa-loopback`` keep running when a new agent adopts them: while that group exists
   its gid is kept in the set too.
3. **Filesystem: a mount namespace per instance.** What ``Sandbox.prepare()`` returns
   runs in the child between fork and exec (``isolation.child_setup``), still as root: it unshares
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
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from superagent.participant.nftegress import (
    EGRESS_TABLE,
    egress_intact,
    install_egress_table,
)

log = structlog.get_logger("superagent.participant")

# the primary group earlier agents gave every loopback-only instance; kept in the egress
# set while it exists, for the instances they started
LOOPBACK_GROUP = "sa-loopback"
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


@dataclass(frozen=True, kw_only=True)
class PermissionSupport:
    """What this agent can enforce: each ``*_problem`` is None or why not."""

    network_problem: str | None
    filesystem_problem: str | None
    table: str = EGRESS_TABLE
    legacy_gid: int | None = None  # LOOPBACK_GROUP's gid, when that group exists

    def to_json(self) -> dict[str, object]:
        return {"network": self.network_problem or "enforced",
                "filesystem": self.filesystem_problem or "enforced"}


UNSUPPORTED = PermissionSupport(network_problem="the agent is not root",
                                filesystem_problem="the agent is not root")


def detect_permissions(*, group: str = LOOPBACK_GROUP,
                       table: str = EGRESS_TABLE) -> PermissionSupport:
    """Decide what can be enforced here; installs the egress table when it can (with the
    gid of ``group``, the shared group of earlier agents, when it exists). Never raises:
    a missing capability is a reason (and one warning)."""
    if os.geteuid() != 0:
        return UNSUPPORTED
    legacy = _group_gid(group)
    network = install_egress_table(table, () if legacy is None else (legacy,),
                                   legacy_gid=legacy)
    filesystem = probe_mount_namespace()
    for name, problem in (("network", network), ("filesystem", filesystem)):
        if problem is not None:
            log.warning("permission cannot be enforced on this machine", permission=name,
                        reason=problem)
    return PermissionSupport(network_problem=network, filesystem_problem=filesystem,
                             table=table, legacy_gid=legacy)


def _group_gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def restore_egress_table(support: PermissionSupport, gids: Iterable[int]) -> bool:
    """Load the egress table again when it is gone, lost its rules (a firewall reload
    flushes the whole ruleset) or lacks one of ``gids`` (the groups of this agent's
    loopback-only instances); True when it did. Never raises."""
    if support.network_problem is not None:
        return False
    wanted = set(gids) | ({support.legacy_gid} if support.legacy_gid is not None else set())
    if egress_intact(support.table, wanted):
        return False
    problem = install_egress_table(support.table, wanted, legacy_gid=support.legacy_gid)
    log.warning("nftables egress table was gone or incomplete: loaded again",
                table=support.table, problem=problem)
    return problem is None


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
    """What ``child_setup`` applies for an instance's permissions: ``gid`` (the app's
    egress group) replaces the app's group as the primary one (loopback-only network),
    ``writable`` (encoded absolute paths) turns the
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
                  writable: tuple[Path, ...], switched_user: bool,
                  loopback_gid: int | None = None) -> Sandbox:
    """The sandbox of an instance whose manifest asks for ``network``/``filesystem``, on
    an agent with ``support``: what can be enforced is, the rest is reported.
    ``loopback_gid`` is the app's own egress group, already in the table's set
    (``egress.loopback_user``); without it the network permission is not enforced."""
    report: dict[str, dict[str, object]] = {}
    gid: int | None = None
    paths: tuple[bytes, ...] | None = None
    if network != "any":
        problem = support.network_problem if support is not None else "no detection"
        if problem is None and not switched_user:
            problem = "the instance does not run as its own user"
        if problem is None and loopback_gid is None:
            problem = "the app's egress group could not be set up (see the agent's log)"
        if problem is None:
            gid = loopback_gid
        table = support.table if support is not None else EGRESS_TABLE
        report["network"] = {"wanted": network, "enforced": gid is not None,
                             "reason": problem or f"nftables table inet {table} rejects"
                                                  " egress but to loopback, and DNS"}
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
