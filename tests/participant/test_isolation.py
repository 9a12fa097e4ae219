"""Tests of ``superagent.participant.isolation``.

These use the real kernel: real users created with useradd, real children started
through ``child_setup``. Everything created is removed in ``finally`` blocks, even
when a test fails. Tests that need root skip, naming it, where the capability is
missing. The cgroup side is in test_cgroups.py.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from superagent.participant.cgroups import InstanceCgroup
from superagent.participant.errors import IsolationError
from superagent.participant.isolation import (
    SETUP_FAILED,
    AppUser,
    IsolationReport,
    RLimits,
    app_user_name,
    child_setup,
    ensure_app_user,
    loopback_group_name,
    remove_app_user,
)
from tests.participant.children import CHILD_TIMEOUT, run_child

# App names of this run: two suites on one machine (CI beside a developer's run) must not
# create, check and delete each other's users.
RUN = secrets.token_hex(3)
USER_APPS = (f"t1{RUN}", f"t2{RUN}")

READ_FILE = """
import sys
try:
    with open(sys.argv[1]) as file:
        print(file.read())
except PermissionError as exc:
    print("denied:", exc, file=sys.stderr)
    sys.exit(13)
"""

SHOW_STATUS = """
import resource
with open("/proc/self/status") as file:
    for line in file:
        if line.split(":")[0] in ("Uid", "Gid", "Groups", "NoNewPrivs"):
            print(line.rstrip("\\n"))
for name in ("RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE"):
    soft, hard = resource.getrlimit(getattr(resource, name))
    print(f"{name}:{soft}:{hard}")
"""


# --- helpers ----------------------------------------------------------------------------------


def status_lines(output: str) -> dict[str, list[str]]:
    """``Key:\tv1\tv2`` lines of /proc/self/status (and our rlimit lines) as a dict."""
    result: dict[str, list[str]] = {}
    for line in output.splitlines():
        key, _, rest = line.partition(":")
        result[key] = rest.replace(":", " ").split()
    return result


@pytest.fixture
def app_users() -> Iterator[list[AppUser]]:
    """The system users of USER_APPS, created for the test and deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: useradd and switching uid (CAP_SETUID)")
    if not (shutil.which("useradd") or Path("/usr/sbin/useradd").exists()):
        pytest.skip("useradd (passwd package) not installed")
    users: list[AppUser] = []
    try:
        for app in USER_APPS:
            users.append(ensure_app_user(app))
        yield users
    finally:
        for app in USER_APPS:
            remove_app_user(app)
            name = app_user_name(app)
            if subprocess.run(["getent", "group", name], capture_output=True,
                              check=False).returncode == 0:
                subprocess.run(["groupdel", name], check=True)



# --- the child's last steps -------------------------------------------------------------------


def test_a_failed_setup_writes_the_step_and_why_to_stderr(tmp_path: Path) -> None:
    """Popen reports only that the ``preexec_fn`` raised: the child writes which step
    failed and why to its stderr first (here a cgroup removed under the agent)."""
    procs = os.fsencode(tmp_path / "gone" / "cgroup.procs")

    class Removed:  # an instance cgroup whose directory is gone
        def procs_files(self) -> tuple[bytes, ...]:
            return (procs,)

    err = tmp_path / "err.log"
    with err.open("wb") as stderr, pytest.raises(subprocess.SubprocessError):
        subprocess.run(["/bin/true"], stderr=stderr, check=False, timeout=CHILD_TIMEOUT,
                       preexec_fn=child_setup(None, cast(InstanceCgroup, Removed()), RLimits()))
    line = err.read_bytes()
    assert line.startswith(SETUP_FAILED + b"joining cgroup " + procs + b": "), line
    assert b"No such file or directory" in line and line.endswith(b"\n"), line


def test_rlimits_and_no_new_privs_in_child() -> None:
    """Without a user switch: nofile/core set (soft = hard), nproc left alone, NoNewPrivs: 1."""
    before = resource.getrlimit(resource.RLIMIT_NPROC)
    done = run_child(SHOW_STATUS, child_setup(None, None, RLimits(nofile=256, nproc=100)))
    assert done.returncode == 0, done.stderr
    status = status_lines(done.stdout)
    assert status["NoNewPrivs"] == ["1"]
    assert status["RLIMIT_NOFILE"] == ["256", "256"]
    assert status["RLIMIT_NPROC"] == [str(limit) for limit in before]
    assert status["RLIMIT_CORE"] == ["0", "0"]
    assert status["Uid"] == [str(os.geteuid())] * 4


def test_failing_setup_starts_nothing(tmp_path: Path) -> None:
    """A cgroup that cannot be joined makes the spawn fail instead of running unisolated."""
    group = InstanceCgroup(mode="v1", app="hello", instance="i1",
                           paths={"memory": tmp_path / "gone"})
    marker = tmp_path / "ran"
    with pytest.raises(subprocess.SubprocessError):
        subprocess.run(["touch", str(marker)], preexec_fn=child_setup(None, group, RLimits()),
                       timeout=CHILD_TIMEOUT, check=False)
    assert not marker.exists()


def test_uid_switch_isolates_files(app_users: list[AppUser]) -> None:
    """Two app users: user 2 cannot read user 1's 0700 directory, user 1 can."""
    user1, user2 = app_users
    assert (user1.name, user2.name) == tuple(f"sa-{app}" for app in USER_APPS)
    assert user1.switched and user2.switched and user1.uid != user2.uid
    assert ensure_app_user(USER_APPS[0]) == user1  # idempotent
    base = Path(tempfile.mkdtemp(prefix="sa-isolation-"))
    try:
        base.chmod(0o711)
        private = base / "private"
        private.mkdir(mode=0o700)
        secret = private / "secret"
        secret.write_text("s3cret")
        secret.chmod(0o600)
        for path in (private, secret):
            os.chown(path, user1.uid, user1.gid)

        denied = run_child(READ_FILE, child_setup(user2, None, RLimits()), str(secret))
        assert denied.returncode == 13, (denied.stdout, denied.stderr)
        assert "PermissionError" in denied.stderr or "denied" in denied.stderr

        allowed = run_child(READ_FILE, child_setup(user1, None, RLimits()), str(secret))
        assert allowed.returncode == 0, allowed.stderr
        assert allowed.stdout.strip() == "s3cret"

        shown = run_child(SHOW_STATUS, child_setup(user1, None, RLimits(nproc=50)))
        assert shown.returncode == 0, shown.stderr
        status = status_lines(shown.stdout)
        assert status["Uid"] == [str(user1.uid)] * 4
        assert status["Gid"] == [str(user1.gid)] * 4
        assert status["Groups"] == []
        assert status["NoNewPrivs"] == ["1"]
        assert status["RLIMIT_NPROC"] == ["50", "50"]
        report = IsolationReport.build(user1, None, RLimits()).to_json()
        assert (report["user"], report["uid"], report["switched_user"]) == \
            (f"sa-{USER_APPS[0]}", user1.uid, True)
        assert report["rlimits"] == {"nofile": 4096, "nproc": 512, "core": 0}
    finally:
        shutil.rmtree(base)


RACE_APPS = (f"t4{RUN}", f"t5{RUN}", f"t6{RUN}")
RACE_AGENTS = 6  # processes, as several agents on one host deploying the same new apps

ENSURE_AT_ONCE = """
import json, sys, time
from superagent.participant.isolation import ensure_app_user
start = float(sys.argv[1])
time.sleep(max(0.0, start - time.time()))  # all agents call useradd at the same moment
print(json.dumps({app: [u.uid, u.gid] for app in sys.argv[2:]
                  for u in [ensure_app_user(app)]}))
"""


def _remove_users(apps: tuple[str, ...]) -> None:
    for app in apps:  # every entry of the name, however many a race left behind
        name = app_user_name(app)
        while subprocess.run(["getent", "passwd", name], capture_output=True,
                             check=False).returncode == 0:
            subprocess.run(["userdel", name], check=True, capture_output=True)
        if subprocess.run(["getent", "group", name], capture_output=True,
                          check=False).returncode == 0:
            subprocess.run(["groupdel", name], check=False, capture_output=True)


def test_agents_creating_the_same_users_at_once_agree_on_ids() -> None:
    """Agents sharing a host that create a new app's user at the same moment all get the
    one uid and gid the system holds for it, and the system holds exactly one entry."""
    if os.geteuid() != 0:
        pytest.skip("needs root: useradd")
    _remove_users(RACE_APPS)
    start = time.time() + 1.0  # time for every process to import and wait
    agents = [subprocess.Popen([sys.executable, "-c", ENSURE_AT_ONCE, str(start), *RACE_APPS],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(RACE_AGENTS)]
    try:
        results = []
        for agent in agents:
            out, err = agent.communicate(timeout=CHILD_TIMEOUT)
            assert agent.returncode == 0, err
            results.append(json.loads(out.splitlines()[-1]))  # after the log lines
        for app in RACE_APPS:
            entries = subprocess.run(["getent", "passwd", app_user_name(app)],
                                     capture_output=True, text=True, check=True).stdout
            assert len(entries.splitlines()) == 1, entries
            uid, gid = (int(field) for field in entries.split(":")[2:4])
            assert {tuple(result[app]) for result in results} == {(uid, gid)}
        assert len({results[0][app][0] for app in RACE_APPS}) == len(RACE_APPS)
    finally:
        for agent in agents:
            agent.kill()
            agent.wait()
        _remove_users(RACE_APPS)


def test_existing_regular_user_is_refused() -> None:
    """A non-system account that happens to be called sa-<app> is never used."""
    if os.geteuid() != 0:
        pytest.skip("needs root: useradd")
    name = app_user_name(f"t3{RUN}")
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        with pytest.raises(IsolationError, match="not a system user"):
            ensure_app_user(f"t3{RUN}")
        with pytest.raises(IsolationError, match="non-system"):
            remove_app_user(f"t3{RUN}")
    finally:
        subprocess.run(["userdel", name], check=True)


def test_app_user_names() -> None:
    """Plain app names map to sa-<app>; long or odd ones get a stable hashed name <= 32."""
    assert app_user_name("hello") == "sa-hello"
    long_name = app_user_name("a-really-long-application-name-that-overflows")
    odd_name = app_user_name("Shop.Front")
    for name in (long_name, odd_name):
        assert len(name) <= 32 and name.startswith("sa-")
    assert long_name == app_user_name("a-really-long-application-name-that-overflows")
    assert app_user_name("Shop.Front") != app_user_name("shop-front")


def test_egress_group_names_never_name_a_user() -> None:
    """A loopback-only app's group is salo-<app>, <= 32 long: never an app user's name
    (those start sa-), not even for an app called lo-<other>."""
    assert loopback_group_name("hello") == "salo-hello"
    assert loopback_group_name("hello") != app_user_name("lo-hello")
    for app in ("a-really-long-application-name-that-overflows", "Shop.Front", "lo-x"):
        name = loopback_group_name(app)
        assert len(name) <= 32 and name.startswith("salo-")
        assert not name.startswith("sa-")


def test_not_root_means_no_switch() -> None:
    """Without root, ensure_app_user returns the agent's own user and no switch."""
    if os.geteuid() != 0:
        user = ensure_app_user("hello")
        assert (user.uid, user.switched) == (os.geteuid(), False)
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child that gives up root, then asks
        try:
            os.setgid(65534)
            os.setuid(65534)
            user = ensure_app_user("hello")
            os.write(write_end, f"{user.uid} {user.switched}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answer:
        assert answer.read().split() == ["65534", "False"]
    assert os.waitpid(pid, 0)[1] == 0
