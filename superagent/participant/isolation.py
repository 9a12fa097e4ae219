"""Isolation of app instances: a per-app uid, rlimits, no_new_privs, joining the cgroup.

Theory of operation
-------------------
An instance is an ordinary process that must not disturb the other tenants'
instances on the same machine. Its cgroup (memory, cpu and pids limits) comes
from ``cgroups``; the supervisor gets the rest from here:

1. **A uid per app.** When the agent is root, ``ensure_app_user()`` creates the
   system user ``sa-<app>`` on demand (no home, no login shell); all instances
   of an app share it, so tenants cannot read each other's files. Without root
   the agent cannot switch users and says so in the returned ``AppUser``.
   Several agents may share a host (and run ``useradd`` for the same new app at
   the same moment): lookup and creation happen under one host-wide file lock
   (``USERS_LOCK``), and the uid and gid are always read back by name, so every
   agent on the host gets the same ids for an app. A loopback-only app (``[permissions]
   network = "loopback"``) also gets a group of its own, ``salo-<app>``
   (``ensure_loopback_group``, same lock): its instances' primary group, which the
   egress table matches (``permissions``, ``nftegress``).
2. **The child's last steps.** ``child_setup()`` returns the ``preexec_fn`` that
   runs in the forked child before ``exec``: join the cgroup while still root,
   set rlimits, set ``no_new_privs`` (so no setuid binary can give the uid back),
   then set supplementary groups, gid and uid, in that order — once the uid is
   dropped nothing else could be done. The caller passes ``start_new_session=
   True`` itself and must not pass ``user=``/``group=`` to Popen: those run
   before ``preexec_fn``, which would then lack the right to join the cgroup.
3. **What an instance got.** ``IsolationReport`` records user, cgroup and
   rlimits for the status API.

Everything that touches the system is blocking (``useradd``, ``userdel``);
async callers run it with ``trio.to_thread.run_sync``. Errors are
``IsolationError``: the instance is not started rather than started unisolated.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import grp
import hashlib
import os
import pwd
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from superagent.participant.cgroups import CgroupMode, InstanceCgroup
from superagent.participant.errors import IsolationError
from superagent.participant.nftegress import EGRESS_TABLE, GID_SET, run_nft
from superagent.participant.permissions import Sandbox

log = structlog.get_logger("superagent.participant")

PR_SET_NO_NEW_PRIVS = 38  # <linux/prctl.h>
USER_PREFIX = "sa-"
# loopback-only apps' own groups; no user name starts so (they all start "sa-")
LOOPBACK_PREFIX = "salo-"
MAX_USER_NAME = 32  # useradd refuses longer names
USERADD_TIMEOUT = 30.0  # useradd waits for /etc/passwd's lock; a stuck lock is an error
NOLOGIN = "/usr/sbin/nologin"
# One lock for every agent on the host: /run is per boot and root's, like the users it guards.
USERS_LOCK = Path("/run/superagent/users.lock")
LOCK_RETRY = 0.02  # flock has no timeout: try again this often until USERADD_TIMEOUT
_USER_SAFE = re.compile(r"^[a-z0-9_][a-z0-9_-]*$")


# --- the app's user ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AppUser:
    """The user an app's instances run as.

    ``switched`` is True when the agent is root and the instance gets this uid; False
    means the agent is not root and the instance keeps the agent's own user.
    ``loopback_gid`` is the app's egress group (``ensure_loopback_group``), set once it
    is in the egress table's set: instances of a loopback-only app run with it as their
    primary group.
    """

    name: str
    uid: int
    gid: int
    switched: bool
    loopback_gid: int | None = None


def app_user_name(app: str) -> str:
    """``sa-<app>``; an app name that is long or has other characters gets a hashed suffix."""
    return _system_name(USER_PREFIX, app)


def loopback_group_name(app: str) -> str:
    """``salo-<app>``, shortened like ``app_user_name``."""
    return _system_name(LOOPBACK_PREFIX, app)


def _system_name(prefix: str, app: str) -> str:
    if _USER_SAFE.match(app) and len(prefix) + len(app) <= MAX_USER_NAME:
        return prefix + app
    digest = hashlib.sha256(app.encode()).hexdigest()[:8]
    cleaned = re.sub(r"[^a-z0-9_-]", "-", app.lower())[:MAX_USER_NAME - len(prefix) - 9]
    return f"{prefix}{cleaned}-{digest}"


def ensure_app_user(app: str) -> AppUser:
    """The user for ``app``'s instances, created on demand when the agent is root.

    An existing system user of that name is reused (idempotent, also across a race with
    another ``useradd``). Raises ``IsolationError`` when the name belongs to a regular
    (non-system) account or to root, or when useradd fails. Blocking (runs useradd).
    """
    if os.geteuid() != 0:
        return current_user()
    name = app_user_name(app)
    with _host_lock(USERS_LOCK, app=app):
        entry = _create_user(app, name)
    if entry.pw_uid == 0 or entry.pw_uid >= _uid_min():
        raise IsolationError(f"user {name} exists and is not a system user (uid {entry.pw_uid})",
                             app=app)
    return AppUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid, switched=True)


def _create_user(app: str, name: str) -> pwd.struct_passwd:
    """The passwd entry of ``name``, created by useradd when missing (under the host lock)."""
    entry = _lookup_user(name)
    if entry is None:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        command = [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
                   "--shell", NOLOGIN, "--user-group", "--comment", f"superagent app {app}",
                   name]
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=USERADD_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise IsolationError(f"cannot run useradd for {name}: {exc}", app=app,
                                 path=useradd) from exc
        entry = _lookup_user(name)  # read back by name: the ids are what the system holds
        if entry is None:
            raise IsolationError(f"useradd {name} failed ({done.returncode}): "
                                 f"{done.stderr.strip()}", app=app, path=useradd)
        log.info("app user created", app=app, user=name, uid=entry.pw_uid)
    return entry


def ensure_loopback_group(app: str) -> int:
    """The gid of ``app``'s egress group, a system group created on demand (no members:
    only the app's instances get it, as their primary group).

    Raises ``IsolationError`` when the name belongs to a non-system group or groupadd
    fails. Blocking (runs groupadd under the users lock).
    """
    name = loopback_group_name(app)
    with _host_lock(USERS_LOCK, app=app):
        gid = _lookup_group(name)
        if gid is None:
            groupadd = shutil.which("groupadd") or "/usr/sbin/groupadd"
            try:
                done = subprocess.run([groupadd, "--system", name], capture_output=True,
                                      text=True, timeout=USERADD_TIMEOUT, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise IsolationError(f"cannot run groupadd for {name}: {exc}", app=app,
                                     path=groupadd) from exc
            gid = _lookup_group(name)
            if gid is None:
                raise IsolationError(f"groupadd {name} failed ({done.returncode}): "
                                     f"{done.stderr.strip()}", app=app, path=groupadd)
            log.info("app egress group created", app=app, group=name, gid=gid)
    if gid == 0 or gid >= _uid_min():
        raise IsolationError(f"group {name} exists and is not a system group (gid {gid})",
                             app=app)
    return gid


def _lookup_group(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


@contextlib.contextmanager
def _host_lock(path: Path, *, app: str, timeout: float = USERADD_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created 0600 in a root-only folder).

    Raises ``IsolationError`` when it cannot be had within ``timeout``. Blocking.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise IsolationError(f"cannot open the users lock {path}: {exc}", app=app,
                             path=str(path)) from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise IsolationError(f"the users lock {path} is held for over "
                                         f"{timeout:.0f} s", app=app, path=str(path)) from None
                time.sleep(LOCK_RETRY)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def current_user() -> AppUser:
    """The agent's own user, as an ``AppUser`` that does not switch."""
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return AppUser(name=name, uid=uid, gid=os.getegid(), switched=False)


def remove_app_user(app: str, *, egress_table: str = EGRESS_TABLE) -> bool:
    """Delete ``app``'s system user (and its group, and its egress group): False when
    there was no user.

    For deleting an app for good, once its files are gone and its instances stopped on
    every agent of the host. The egress group's gid leaves ``egress_table``'s set first:
    a later group may get the same gid, and would be cut off the network. Raises
    ``IsolationError`` for a non-system user of that name or when userdel fails.
    """
    name = app_user_name(app)
    with _host_lock(USERS_LOCK, app=app):
        loopback = loopback_group_name(app)
        gid = _lookup_group(loopback)
        if gid is not None and 0 < gid < _uid_min():
            # fails when the gid (or the table) is not there: nothing to take out then
            run_nft(script=f"delete element inet {egress_table} {GID_SET} {{ {gid} }}\n")
            groupdel = shutil.which("groupdel") or "/usr/sbin/groupdel"
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run([groupdel, loopback], capture_output=True,
                               timeout=USERADD_TIMEOUT, check=False)
        entry = _lookup_user(name)
        if entry is None:
            return False
        if entry.pw_uid == 0 or entry.pw_uid >= _uid_min():
            raise IsolationError(f"refusing to delete non-system user {name}", app=app)
        userdel = shutil.which("userdel") or "/usr/sbin/userdel"
        try:
            done = subprocess.run([userdel, name], capture_output=True, text=True,
                                  timeout=USERADD_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise IsolationError(f"cannot run userdel for {name}: {exc}", app=app,
                                 path=userdel) from exc
    if done.returncode != 0:
        raise IsolationError(f"userdel {name} failed ({done.returncode}): "
                             f"{done.stderr.strip()}", app=app, path=userdel)
    return True


def _lookup_user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _uid_min(login_defs: Path = Path("/etc/login.defs")) -> int:
    """The first uid of regular accounts (UID_MIN of login.defs, 1000 by default)."""
    try:
        for line in login_defs.read_text().splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == "UID_MIN" and fields[1].isdigit():
                return int(fields[1])
    except OSError:
        pass
    return 1000


# --- the child's last steps -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RLimits:
    """Per-process rlimits of an instance (soft = hard, so the app cannot raise them)."""

    nofile: int = 4096  # open files and sockets
    # Processes + threads of the app's uid, summed over all its instances on the machine.
    # Set only when the instance runs as its app user: under the agent's own uid it would
    # count unrelated processes (and the kernel ignores it for root anyway).
    nproc: int | None = 512
    core: int = 0  # no core dumps: they fill disks and leak tenant memory


_RLIMIT = {"nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC,
           "core": resource.RLIMIT_CORE}


def effective_rlimits(limits: RLimits, *, app_user: bool) -> dict[str, int]:
    """The values ``child_setup`` sets (soft = hard), by name.

    ``nproc`` only with ``app_user`` (see ``RLimits``); a non-root agent cannot raise a
    hard limit, so its values are capped at the current hard limits.
    """
    wanted = {"nofile": limits.nofile, "nproc": limits.nproc if app_user else None,
              "core": limits.core}
    result: dict[str, int] = {}
    for name, value in wanted.items():
        if value is None:
            continue
        _, hard = resource.getrlimit(_RLIMIT[name])
        if os.geteuid() != 0 and hard != resource.RLIM_INFINITY and value > hard:
            value = hard
        result[name] = value
    return result


SETUP_FAILED = b"superagent: the instance's setup failed: "  # its stderr's line, then
SETUP_FAILURE_BYTES = 8192  # read of a failed setup's stderr, for that line


@functools.cache
def _load_prctl() -> Callable[[int, int, int, int, int], int]:
    """libc's prctl(2), typed; loaded in the parent so the child only calls it."""
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int

    def call(option: int, arg2: int, arg3: int, arg4: int, arg5: int) -> int:
        return int(prctl(option, arg2, arg3, arg4, arg5))

    return call


def child_setup(user: AppUser | None, cgroup: InstanceCgroup | None,
                limits: RLimits, sandbox: Sandbox | None = None) -> Callable[[], None]:
    """The ``preexec_fn`` for ``subprocess.Popen`` / ``trio.lowlevel.open_process``.

    In the child, between fork and exec: write its pid to ``cgroup.procs`` in every
    hierarchy (needs root), set the rlimits, ``prctl(PR_SET_NO_NEW_PRIVS, 1)``, then
    ``setgroups([])``, ``setgid``, ``setuid`` when ``user.switched``. Any failure raises
    in the child, Popen reports it as ``SubprocessError`` and nothing is exec'd; the step
    that failed and why are written to the child's stderr first (a ``SETUP_FAILED`` line).

    Code between fork and exec may in general only make async-signal-safe calls: the fork
    copied one thread, and locks other threads held (malloc's, the import lock, logging's)
    stay locked forever. This function is acceptable because the child is single-threaded
    and everything that could take such a lock happens here in the parent: paths are
    encoded, rlimits computed, libc loaded, modules imported. The child only makes
    syscalls through ``os``, ``resource`` and one ctypes call, allocating a few small
    objects. (trio's ``open_process`` forks from a worker thread: the child is a copy of
    that one thread, so the same reasoning holds.) A new session is the caller's job: pass
    ``start_new_session=True``, and not ``user``/``group``/``extra_groups``, which Popen
    would apply before this runs.
    ``sandbox`` (``permissions``) adds the instance's permissions: its mount namespace
    is entered right after the cgroup (still root), and its ``gid`` (the app's egress
    group) replaces the user's as the primary group, the user's becoming supplementary.
    Raises ``IsolationError`` (in the parent) for a user switch without root.
    """
    switch = user is not None and user.switched
    if switch and os.geteuid() != 0:
        raise IsolationError(f"cannot switch to user {user.name if user else ''} without root")
    uid = user.uid if user is not None else -1
    gid = user.gid if user is not None else -1
    groups: list[int] = []
    if sandbox is not None and sandbox.gid is not None:
        # the app's egress group becomes the primary one: sockets carry it (the egress
        # table matches it) and so do new files, open to no other app. The app's own group
        # stays as a supplementary one, for the release's files
        groups, gid = [gid], sandbox.gid
    enter_sandbox = sandbox.prepare() if sandbox is not None else (lambda: None)
    procs_files = cgroup.procs_files() if cgroup is not None else ()
    rlimits = tuple((_RLIMIT[name], (value, value))
                    for name, value in effective_rlimits(limits, app_user=switch).items())
    prctl = _load_prctl()
    get_errno = ctypes.get_errno
    strerror = os.strerror

    def setup() -> None:
        step = b"starting"  # what it is doing, for the explanation of a failure
        try:
            pid = str(os.getpid()).encode()
            for procs in procs_files:
                step = b"joining cgroup " + procs
                fd = os.open(procs, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)
            step = b"entering the filesystem sandbox"
            enter_sandbox()
            step = b"setting rlimits"
            for which, pair in rlimits:
                resource.setrlimit(which, pair)
            step = b"setting no_new_privs"
            if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                code = get_errno()
                raise OSError(code, strerror(code))
            if switch:
                step = b"switching to uid %d, gid %d" % (uid, gid)
                os.setgroups(groups)
                os.setgid(gid)
                os.setuid(uid)
        except BaseException as exc:
            # Popen reports only that this raised: the reason goes to the instance's
            # stderr (its log file), where the agent reads it back (``SETUP_FAILED``)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            os.write(2, SETUP_FAILED + step + b": " + why.encode(errors="replace") + b"\n")
            raise

    return setup


def setup_failure(err_log: Path, offset: int) -> str:
    """What a child whose setup failed wrote to its stderr file ``err_log`` (a
    ``SETUP_FAILED`` line) after ``offset``, its size before the spawn, without the
    prefix; empty when there is no such line. A file truncated meanwhile (the log
    follower's rotation) is read from its start."""
    try:
        with err_log.open("rb") as f:
            f.seek(offset if os.fstat(f.fileno()).st_size >= offset else 0)
            written = f.read(SETUP_FAILURE_BYTES)
    except OSError:
        return ""
    for line in written.splitlines():
        at = line.find(SETUP_FAILED)
        if at >= 0:
            return line[at + len(SETUP_FAILED):].decode(errors="replace")
    return ""


# --- what an instance got ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class IsolationReport:
    """What an instance really got, for the status API (``to_json``)."""

    user: str
    uid: int
    gid: int
    switched_user: bool
    cgroup_mode: CgroupMode
    cgroup_reason: str
    cgroup_paths: Mapping[str, str] = field(default_factory=dict, hash=False)
    cgroup_limits: Mapping[str, object] = field(default_factory=dict, hash=False)
    no_new_privs: bool = True
    rlimits: Mapping[str, int] = field(default_factory=dict, hash=False)
    # permission name -> {"wanted", "enforced", "reason"}; only those the manifest restricts
    permissions: Mapping[str, Mapping[str, object]] = field(default_factory=dict, hash=False)

    @classmethod
    def build(cls, user: AppUser | None, cgroup: InstanceCgroup | None,
              limits: RLimits, sandbox: Sandbox | None = None) -> IsolationReport:
        """The report of an instance started with ``child_setup(user, cgroup, limits)``."""
        if user is None:
            user = current_user()
        return cls(user=user.name, uid=user.uid, gid=user.gid, switched_user=user.switched,
                   cgroup_mode=cgroup.mode if cgroup is not None else "none",
                   cgroup_reason=cgroup.reason if cgroup is not None else "no cgroup requested",
                   cgroup_paths={key: str(path) for key, path in
                                 (cgroup.paths.items() if cgroup is not None else ())},
                   cgroup_limits=dict(cgroup.applied) if cgroup is not None else {},
                   no_new_privs=True,
                   rlimits=effective_rlimits(limits, app_user=user.switched),
                   permissions=dict(sandbox.report or {}) if sandbox is not None else {})

    def to_json(self) -> dict[str, object]:
        """A JSON-able dict (plain str/int/bool/dict values)."""
        return {
            "user": self.user, "uid": self.uid, "gid": self.gid,
            "switched_user": self.switched_user,
            "cgroup": {"mode": self.cgroup_mode, "reason": self.cgroup_reason,
                       "paths": dict(self.cgroup_paths), "limits": dict(self.cgroup_limits)},
            "no_new_privs": self.no_new_privs, "rlimits": dict(self.rlimits),
            "permissions": {name: dict(entry) for name, entry in self.permissions.items()},
        }
