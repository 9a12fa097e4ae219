"""Tests of ``superagent.participant.releases``: real archives, real files, real builds.

Archives are built here with ``tarfile`` (the extractor's own tests are in
test_archive.py). Store tests run real ``/bin/sh`` builds; the Python one creates a real
venv (a few seconds, so only one), the Node one runs real npm.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import stat
import sys
import time
from pathlib import Path

import pytest
import trio

from superagent.participant.errors import (
    BadManifest,
    BuildFailed,
    ChecksumMismatch,
    InvalidName,
    ReleaseError,
    UnknownRelease,
    UnsafeArchive,
)
from superagent.participant.releases import PreparedRelease, ReleaseStore
from superagent.participant.toolchain import runnable_by_all
from tests.participant.tarballs import file, link, make_tar
from tests.support.wait import wait_until_async


# ---------------------------------------------------------------------------- helpers
def app_tar(files: dict[str, str], *, build: str | None = None, name: str = "hello") -> bytes:
    manifest = f'[app]\nname = "{name}"\n[run]\ncommand = "python3 app.py"\n'
    if build is not None:
        manifest += f"[build]\ncommand = {json.dumps(build)}\n"
    members = [file("superagent.toml", manifest), file("app.py", "print('hi')\n")]
    members += [file(path, text) for path, text in files.items()]
    return make_tar(members)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> ReleaseStore:
    return ReleaseStore(tmp_path / "store", keep=2)


# ---------------------------------------------------------------------------- the store
def marker_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_checksum_mismatch_unpacks_nothing(store: ReleaseStore) -> None:
    """The sha256 is checked before anything is unpacked."""
    archive = app_tar({})
    with pytest.raises(ChecksumMismatch) as caught:
        await store.prepare("hello", "r1", archive, sha(b"something else"))
    assert (caught.value.app, caught.value.release, caught.value.status_hint) == (
        "hello", "r1", 400)
    assert caught.value.actual == sha(archive)
    assert not (store.root / "hello" / "r1").exists()
    with pytest.raises(ChecksumMismatch, match="not a sha256"):
        await store.prepare("hello", "r1", archive, "abc")


async def test_unsafe_archive_leaves_no_release(store: ReleaseStore) -> None:
    """An archive refused by the extractor names app, release and member; no directory stays."""
    archive = make_tar([file("superagent.toml", "x"), link("up", "..")])
    with pytest.raises(UnsafeArchive) as caught:
        await store.prepare("hello", "r1", archive, sha(archive))
    assert (caught.value.app, caught.value.release, caught.value.member) == ("hello", "r1", "up")
    assert str(caught.value).startswith("hello@r1: ")
    assert os.listdir(store.root / "hello") == []


async def test_missing_manifest_is_bad_manifest(store: ReleaseStore) -> None:
    """No superagent.toml and no Procfile: BadManifest (422), nothing kept."""
    archive = make_tar([file("app.py", "")])
    with pytest.raises(BadManifest, match="no app manifest") as caught:
        await store.prepare("hello", "r1", archive, sha(archive))
    assert caught.value.status_hint == 422
    assert os.listdir(store.root / "hello") == []


async def test_python_app_builds_a_venv_in_place(store: ReleaseStore) -> None:
    """requirements.txt gets a venv and pip install, built where it will run."""
    archive = app_tar({"requirements.txt": ""})
    prepared = await store.prepare("hello", "r1", archive, sha(archive))
    assert prepared.src == store.root / "hello" / "r1" / "src"
    python = prepared.src / ".venv" / "bin" / "python"
    assert python.exists()
    # The release's bin/ links an interpreter every user can run, and the venv is made
    # on it (uv's venv, or python -m venv without uv).
    tools = prepared.path / "bin" / "python"
    assert runnable_by_all(tools)
    home = dict(line.split(" = ", 1) for line in
                (prepared.src / ".venv" / "pyvenv.cfg").read_text().splitlines() if " = " in line)
    assert Path(home["home"]).resolve() == tools.resolve().parent
    log_text = prepared.build_log.read_text()
    assert "# tools: python " in log_text and f"at {tools.readlink()}" in log_text
    assert "venv" in log_text and "[exit status 0" in log_text
    doc = json.loads((prepared.path / "release.json").read_text())
    assert doc["sha256"] == sha(archive)
    assert (doc["app"], doc["release"]) == ("hello", "r1")
    assert doc["spec"]["run"]["command"] == "python3 app.py"
    assert prepared.spec.name == "hello"
    entries = set(os.listdir(prepared.path))
    assert {"build.log", "release.json", "src"} <= entries
    assert not [e for e in entries if e.startswith((".release.json", ".build.log", ".src"))]


async def test_node_app_builds_with_npm(store: ReleaseStore) -> None:
    """package.json without dependencies: npm install runs and writes its lock file."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed; the Node build needs it")
    package = json.dumps({"name": "hello", "version": "1.0.0", "private": True})
    archive = app_tar({"package.json": package})
    prepared = await store.prepare("hello", "r1", archive, sha(archive),
                                   env={"npm_config_update_notifier": "false"})
    assert (prepared.src / "package-lock.json").exists()
    assert "npm install --prefer-offline --no-audit --no-fund" in prepared.build_log.read_text()


async def test_failed_build_keeps_only_the_log(store: ReleaseStore) -> None:
    """A failing build raises BuildFailed with the log's tail; a later good release is clean."""
    archive = app_tar({}, build="echo compiling; echo 'error: boom' >&2; exit 3")
    with pytest.raises(BuildFailed) as caught:
        await store.prepare("hello", "r1", archive, sha(archive))
    error = caught.value
    assert (error.returncode, error.timed_out, error.status_hint) == (3, False, 422)
    assert "compiling" in error.tail and "error: boom" in error.tail
    assert error.log_path == store.root / "hello" / "r1.failed.log"
    tools, command = error.log_path.read_text().splitlines()[:2]
    assert tools.startswith("# tools: python ") and command.startswith("$ echo compiling")
    assert os.listdir(store.root / "hello") == ["r1.failed.log"]
    assert store.releases("hello") == []
    with pytest.raises(UnknownRelease):
        store.get("hello", "r1")

    fixed = app_tar({}, build="echo ok")
    prepared = await store.prepare("hello", "r1", fixed, sha(fixed))
    assert prepared.sha256 == sha(fixed)
    assert not error.log_path.exists()


async def test_build_timeout_kills_the_build(store: ReleaseStore, tmp_path: Path) -> None:
    """A build over its timeout is stopped, with its background children, and fails."""
    pidfile = tmp_path / "bg.pid"
    archive = app_tar({}, build=f"sleep 60 & echo $! > {pidfile}; sleep 60")
    started = time.monotonic()
    # the timeout leaves the shell time to start its child and write the pidfile on a
    # loaded machine; the bound shows the build was cut, far short of its 60 s
    with pytest.raises(BuildFailed, match=r"timed out after 2s") as caught:
        await store.prepare("hello", "r1", archive, sha(archive), timeout=2.0)
    assert time.monotonic() - started < 30.0
    assert caught.value.timed_out and caught.value.returncode is None
    background = int(pidfile.read_text())
    await wait_until_async(lambda: not _alive(background), "the build's background child gone",
                           timeout=5.0)
    assert not (store.root / "hello" / "r1").exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_build_environment_is_clean(store: ReleaseStore,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The build sees PATH, HOME, LANG, the manifest's [env] and ``env``; not the agent's env."""
    monkeypatch.setenv("AGENT_SECRET", "s3cret")
    manifest = ('[app]\nname = "hello"\n[run]\ncommand = "x"\n[build]\ncommand = "env > env.txt"'
                '\n[env]\nGREETING = "hi"\nOVERRIDDEN = "manifest"\n')
    archive = make_tar([file("superagent.toml", manifest)])
    prepared = await store.prepare("hello", "r1", archive, sha(archive),
                                   env={"OVERRIDDEN": "caller", "EXTRA": "1"})
    env = dict(line.split("=", 1) for line in (prepared.src / "env.txt").read_text().splitlines())
    assert env["HOME"] == str(prepared.path)
    assert env["LANG"] == "C.UTF-8"
    assert env["PATH"]
    assert (env["GREETING"], env["OVERRIDDEN"], env["EXTRA"]) == ("hi", "caller", "1")
    assert (env["SUPERAGENT_APP"], env["SUPERAGENT_RELEASE"]) == ("hello", "r1")
    assert "AGENT_SECRET" not in env


async def test_prepare_is_idempotent(store: ReleaseStore, tmp_path: Path) -> None:
    """Preparing a prepared release returns it at once without building again."""
    marker = tmp_path / "builds"
    archive = app_tar({}, build='echo built >> "$MARKER"')
    first = await store.prepare("hello", "r1", archive, sha(archive), env={"MARKER": str(marker)})
    second = await store.prepare("hello", "r1", archive, sha(archive),
                                 env={"MARKER": str(marker)})
    assert second == first
    assert marker_lines(marker) == ["built"]
    assert store.get("hello", "r1") == first


async def test_prepared_release_with_another_archive_conflicts(store: ReleaseStore) -> None:
    """A release name is immutable: another archive under it is a 409."""
    archive = app_tar({})
    await store.prepare("hello", "r1", archive, sha(archive))
    other = app_tar({"more.txt": "x"})
    with pytest.raises(ChecksumMismatch, match="already prepared") as caught:
        await store.prepare("hello", "r1", other, sha(other))
    assert caught.value.status_hint == 409


async def test_concurrent_prepares_build_once(store: ReleaseStore, tmp_path: Path) -> None:
    """Two prepares of one release at once: one build, both get the same release."""
    marker = tmp_path / "builds"
    gate = tmp_path / "gate"  # the build waits for it, so both prepares overlap for sure
    archive = app_tar({}, build=(
        'echo built >> "$MARKER"; '
        'i=0; while [ ! -e "$GATE" ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done'))
    results: list[PreparedRelease] = []

    async def prepare() -> None:
        results.append(await store.prepare("hello", "r1", archive, sha(archive),
                                           env={"MARKER": str(marker), "GATE": str(gate)}))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(prepare)
        nursery.start_soon(prepare)
        await wait_until_async(marker.exists, "the build to start")
        assert "preparing=[hello@r1]" in repr(store)
        gate.touch()
    assert len(results) == 2 and results[0] == results[1]
    assert marker_lines(marker) == ["built"]
    assert store._locks == {}


async def test_stale_directory_of_an_interrupted_prepare_is_replaced(store: ReleaseStore,
                                                                     tmp_path: Path) -> None:
    """A release directory without release.json (a crash mid-prepare) is removed and redone."""
    stale = store.root / "hello" / "r1"
    (stale / "src").mkdir(parents=True)
    (stale / "src" / "junk").write_text("half done")
    assert store.releases("hello") == []
    archive = app_tar({})
    path = tmp_path / "upload.tar.gz"  # the archive as a file, as the RPC server stores it
    path.write_bytes(archive)
    prepared = await store.prepare("hello", "r1", path, sha(archive))
    assert not (prepared.src / "junk").exists()
    assert (prepared.src / "app.py").exists()
    assert sorted(os.listdir(store.root / "hello")) == ["r1"]


async def test_releases_gc_keeps_newest_and_in_use(store: ReleaseStore) -> None:
    """gc keeps the newest ``keep`` releases and any in use, and removes the rest."""
    for n in range(1, 6):
        archive = app_tar({"n.txt": str(n)})
        await store.prepare("hello", f"r{n}", archive, sha(archive))
    assert [p.release for p in store.releases("hello")] == ["r5", "r4", "r3", "r2", "r1"]
    (store.root / "hello" / "r9").mkdir()  # an unfinished prepare from before a crash
    removed = store.gc("hello", in_use={"r1"})
    assert sorted(removed) == ["r2", "r3"]
    assert [p.release for p in store.releases("hello")] == ["r5", "r4", "r1"]
    assert sorted(os.listdir(store.root / "hello")) == ["r1", "r4", "r5"]
    assert store.gc("hello", in_use=set()) == ["r1"]
    assert store.gc("hello", in_use=set()) == []


async def test_names_must_be_plain_directory_names(store: ReleaseStore) -> None:
    """App and release names are path components: '..', '/', hidden names are refused."""
    archive = app_tar({})
    for app, release in [("..", "r1"), ("hello", "../r1"), ("hello", ".r1"), ("a/b", "r1"),
                         ("hello", "r1.failed.log")]:
        with pytest.raises(InvalidName):
            await store.prepare(app, release, archive, sha(archive))
    with pytest.raises(InvalidName):
        store.get("hello", "..")
    assert not store.root.exists() or list(store.root.iterdir()) == []


async def test_store_errors_are_release_errors(store: ReleaseStore, tmp_path: Path) -> None:
    """An unusable store root is a ReleaseError with a 500 hint, not a bare OSError."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    broken = ReleaseStore(blocker / "store")
    archive = app_tar({})
    with pytest.raises(ReleaseError) as caught:
        await broken.prepare("hello", "r1", archive, sha(archive))
    assert caught.value.status_hint == 500


# ---------------------------------------------------------------------------- as root
@pytest.mark.skipif(os.geteuid() != 0, reason="building as another user needs root")
async def test_build_runs_as_the_app_user(world_dir: Path) -> None:
    """With uid/gid, the tree is the app user's and the build runs as it, without groups."""
    nobody = pwd.getpwnam("nobody")
    store = ReleaseStore(world_dir / "store")
    archive = app_tar({}, build="id -u > uid.txt; id -G > groups.txt; touch $HOME/home-ok")
    prepared = await store.prepare("hello", "r1", archive, sha(archive), uid=nobody.pw_uid,
                                   gid=nobody.pw_gid)
    assert (prepared.src / "uid.txt").read_text().strip() == str(nobody.pw_uid)
    assert (prepared.src / "groups.txt").read_text().split() == [str(nobody.pw_gid)]
    for path in [prepared.src, *prepared.src.rglob("*"), prepared.path / "home-ok"]:
        assert (path.lstat().st_uid, path.lstat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
    # After the build the release directory and the agent's files are root's again.
    for path in [prepared.path, prepared.path / "release.json", prepared.build_log]:
        assert path.lstat().st_uid == 0
    # Only the app's group may enter the release, only the app user may read its source.
    assert prepared.path.stat().st_gid == nobody.pw_gid
    assert stat.S_IMODE(prepared.path.stat().st_mode) == 0o750
    assert stat.S_IMODE(prepared.src.stat().st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="changing file owners needs root")
async def test_release_owned_by_other_ids_is_given_back_before_a_start(world_dir: Path) -> None:
    """A release prepared for ids the app no longer has is given to its current ids."""
    nobody = pwd.getpwnam("nobody")
    store = ReleaseStore(world_dir / "store")
    archive = app_tar({})
    prepared = await store.prepare("hello", "r1", archive, sha(archive), uid=nobody.pw_uid,
                                   gid=nobody.pw_gid)
    assert not store.ensure_owner(prepared, nobody.pw_uid, nobody.pw_gid)
    uid, gid = nobody.pw_uid - 1, nobody.pw_gid - 1  # the app user as made again
    assert store.ensure_owner(prepared, uid, gid)
    for path in [prepared.src, *prepared.src.rglob("*")]:
        assert (path.lstat().st_uid, path.lstat().st_gid) == (uid, gid)
    assert (prepared.path.stat().st_uid, prepared.path.stat().st_gid) == (0, gid)
    assert not store.ensure_owner(prepared, uid, gid)


async def test_unchanged_requirements_install_from_the_apps_cache(store: ReleaseStore) -> None:
    """The second release of unchanged requirements builds offline: the app's own package
    cache holds what the first one downloaded."""
    if shutil.which("uv", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("uv is not installed beside this interpreter")
    files = {"requirements.txt": "iniconfig==2.0.0\n"}
    first = app_tar(files)
    await store.prepare("hello", "r1", first, sha(first))
    second = app_tar({**files, "lib.py": "# changed\n"})
    prepared = await store.prepare("hello", "r2", second, sha(second),
                                   env={"UV_OFFLINE": "1"})  # no index: the cache or nothing
    site = list((prepared.src / ".venv" / "lib").glob("python3*/site-packages/iniconfig"))
    assert site, prepared.build_log.read_text()
    assert stat.S_IMODE((store.cache_dir / "hello").stat().st_mode) == 0o700


async def test_named_releases_are_kept_and_failed_ones_evict_nothing(store: ReleaseStore
                                                                     ) -> None:
    """With the coordinator's list, exactly the named and in-use releases stay prepared,
    however many newer ones came after them."""
    for n in range(1, 6):
        archive = app_tar({"v.txt": str(n)})
        await store.prepare("hello", f"r{n}", archive, sha(archive))
    removed = store.gc("hello", {"r5"}, wanted={"r5", "r1"})
    assert sorted(removed) == ["r2", "r3", "r4"]
    assert sorted(p.release for p in store.releases("hello")) == ["r1", "r5"]
    assert store.gc("hello", {"r5"}, wanted={"r5", "r1"}) == []
