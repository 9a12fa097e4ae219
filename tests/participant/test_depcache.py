"""Tests of ``superagent.participant.depcache``: the key, the copy, the cache, and (with the
real npm, offline: the one dependency is a ``file:`` tarball inside the app) the release
store's builds that reuse a cached ``node_modules`` instead of running npm.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pwd
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from superagent.participant.depcache import (
    MODULES,
    DependencyCache,
    ToolVersions,
    copy_tree,
    node_key,
)
from superagent.participant.errors import Uncacheable
from superagent.participant.releases import ReleaseStore
from tests.participant.tarballs import file, make_tar

VERSIONS = ToolVersions(node="v20.0.0", npm="10.0.0")
COMMAND = "npm install --prefer-offline --no-audit --no-fund"
NPM_ENV = {"npm_config_update_notifier": "false", "npm_config_offline": "true"}
needs_npm = pytest.mark.skipif(shutil.which("npm") is None or shutil.which("node") is None,
                               reason="node and npm are not installed")


def package(src: Path, **fields: object) -> Path:
    src.mkdir(parents=True, exist_ok=True)
    (src / "package.json").write_text(json.dumps({"name": "hello", "version": "1.0.0",
                                                  **fields}))
    return src


def key(src: Path, **env: str) -> str:
    return node_key(src, versions=VERSIONS, npm_command=COMMAND, env=env)


# ---------------------------------------------------------------------------- the key
def test_the_key_follows_package_json_lock_tools_and_what_npm_reads(tmp_path: Path) -> None:
    """package.json, the lock file, the tool versions, npm's own environment: each changes
    the key; the app's other variables (a VERSION bumped per release) do not."""
    src = package(tmp_path / "a", dependencies={"dep": "^1.0.0"})
    base = key(src)
    assert base == key(src, VERSION="7", GREETING="hi")
    assert base != key(src, NODE_ENV="production")
    assert base != key(src, npm_config_registry="http://mirror.invalid/")
    assert base != node_key(src, versions=ToolVersions(node="v22.0.0", npm="10.0.0"),
                            npm_command=COMMAND, env={})
    (src / "package-lock.json").write_text("{}")
    locked = key(src)
    assert locked != base
    package(src, dependencies={"dep": "^1.0.1"})
    assert key(src) not in (base, locked)


def test_trees_npm_must_build_every_time_are_not_keyed(tmp_path: Path) -> None:
    """Install scripts of the package itself, a local directory dependency, a PATH of the
    app's own and an unreadable lock file make the tree uncacheable, each with its
    reason."""
    with pytest.raises(Uncacheable, match="install scripts of its own \\(postinstall\\)"):
        key(package(tmp_path / "a", scripts={"postinstall": "node build.js", "start": "x"}))
    src = package(tmp_path / "b", dependencies={"lib": "file:lib"})
    (src / "lib").mkdir()
    with pytest.raises(Uncacheable, match="dependency lib is a local directory"):
        key(src)
    with pytest.raises(Uncacheable, match="sets PATH"):
        key(package(tmp_path / "c"), PATH="/opt/node/bin")
    (package(tmp_path / "d") / "package-lock.json").mkdir()
    with pytest.raises(Uncacheable, match=r"package-lock\.json unreadable"):
        key(tmp_path / "d")


def test_a_local_tarball_dependency_is_in_the_key_by_its_content(tmp_path: Path) -> None:
    """``file:`` a tarball: the key changes with the tarball's bytes."""
    src = package(tmp_path / "a", dependencies={"dep": "file:vendor/dep.tgz"})
    (src / "vendor").mkdir()
    (src / "vendor" / "dep.tgz").write_bytes(b"one")
    first = key(src)
    (src / "vendor" / "dep.tgz").write_bytes(b"two")
    assert key(src) != first


# ---------------------------------------------------------------------------- the copy
def tree(top: Path) -> Path:
    (top / "dep" / "bin").mkdir(parents=True)
    (top / "dep" / "index.js").write_text("module.exports = 1;\n")
    (top / "dep" / "bin" / "tool").write_text("#!/bin/sh\n")
    (top / "dep" / "bin" / "tool").chmod(0o755)
    (top / ".bin").mkdir()
    (top / ".bin" / "tool").symlink_to("../dep/bin/tool")
    return top


def test_copy_tree_makes_real_copies_and_keeps_links_as_links(tmp_path: Path) -> None:
    """Files are new inodes with the same bytes and modes; a link inside the tree stays a
    link; nothing is shared with the source."""
    source = tree(tmp_path / "src")
    copy_tree(source, tmp_path / "dst", owner=os.geteuid())
    copied = tmp_path / "dst" / "dep" / "index.js"
    assert copied.read_text() == "module.exports = 1;\n"
    assert copied.stat().st_ino != (source / "dep" / "index.js").stat().st_ino
    assert copied.stat().st_nlink == 1
    assert stat.S_IMODE((tmp_path / "dst" / "dep" / "bin" / "tool").stat().st_mode) == 0o755
    assert os.readlink(tmp_path / "dst" / ".bin" / "tool") == "../dep/bin/tool"


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "../.."])
def test_copy_tree_refuses_a_link_out_of_the_tree(tmp_path: Path, target: str) -> None:
    """A symlink leaving the tree (relative or absolute) refuses the copy; nothing stays."""
    source = tree(tmp_path / "src")
    (source / "dep" / "evil").symlink_to(target)
    with pytest.raises(Uncacheable, match="links out of the tree"):
        copy_tree(source, tmp_path / "dst", owner=os.geteuid())
    assert not (tmp_path / "dst").exists()


def test_copy_tree_resolves_links_through_each_other(tmp_path: Path) -> None:
    """``s -> .`` with ``t -> s/s/../..`` looks inside the tree to a lexical check but
    resolves two levels above it: refused, nothing stays."""
    source = tree(tmp_path / "src")
    (source / "dep" / "s").symlink_to(".")
    (source / "dep" / "t").symlink_to("s/s/../..")
    with pytest.raises(Uncacheable, match="links out of the tree"):
        copy_tree(source, tmp_path / "dst", owner=os.geteuid())
    assert not (tmp_path / "dst").exists()


def test_copy_tree_refuses_what_is_not_a_file_directory_or_link(tmp_path: Path) -> None:
    """A fifo in the tree refuses the copy (it is never opened)."""
    source = tree(tmp_path / "src")
    os.mkfifo(source / "dep" / "pipe")
    with pytest.raises(Uncacheable, match="not a file, directory or symlink"):
        copy_tree(source, tmp_path / "dst", owner=os.geteuid())


@pytest.mark.skipif(os.geteuid() != 0, reason="files of another owner need root")
def test_copy_tree_refuses_a_file_of_another_owner(tmp_path: Path) -> None:
    """Every entry must be the app user's: a hard link to someone else's file (or any file
    of another owner) in the app's tree is never copied by the agent."""
    nobody = pwd.getpwnam("nobody")
    source = tree(tmp_path / "src")
    for path in [source, *source.rglob("*")]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
    os.chown(source / "dep" / "index.js", 0, 0)  # as a hard link to a root file would be
    with pytest.raises(Uncacheable, match="belongs to uid 0"):
        copy_tree(source, tmp_path / "dst", owner=nobody.pw_uid)
    os.chown(source / "dep" / "index.js", nobody.pw_uid, nobody.pw_gid)
    copy_tree(source, tmp_path / "dst", owner=nobody.pw_uid)
    assert (tmp_path / "dst" / "dep" / "index.js").stat().st_uid == 0  # the agent's copy


def test_copy_tree_gives_up_over_its_budget(tmp_path: Path) -> None:
    """A tree over the entry budget is not copied."""
    source = tree(tmp_path / "src")
    with pytest.raises(Uncacheable, match="over 3 entries"):
        copy_tree(source, tmp_path / "dst", owner=os.geteuid(), max_entries=3)
    assert not (tmp_path / "dst").exists()


# ---------------------------------------------------------------------------- the cache
def test_cache_stores_restores_keeps_the_newest_and_removes_an_app(tmp_path: Path) -> None:
    """A stored tree comes back as a copy; only the ``keep`` most recently used keys stay
    per app; an app's keys are never another app's; ``remove`` forgets the app."""
    cache = DependencyCache(tmp_path / "modules", keep=2)
    source = tree(tmp_path / "src")
    keys = [hashlib.sha256(str(n).encode()).hexdigest() for n in range(3)]
    for n, k in enumerate(keys):
        cache.store("hello", k, source, owner=os.geteuid())
        os.utime(cache.root / "hello" / k, (1000 + n, 1000 + n))  # stored in this order
    assert cache.entries("hello") == [keys[2], keys[1]]
    assert stat.S_IMODE((cache.root / "hello").stat().st_mode) == 0o700
    assert stat.S_IMODE(cache.root.stat().st_mode) == 0o700
    assert not cache.restore("other", keys[2], tmp_path / "other-modules")
    assert cache.restore("hello", keys[1], tmp_path / "restored")
    assert (tmp_path / "restored" / "dep" / "index.js").read_text() == "module.exports = 1;\n"
    assert cache.entries("hello")[0] == keys[1]  # a restore marks the tree used
    cache.remove("hello")
    assert cache.entries("hello") == []
    assert not (cache.root / "hello").exists()


# ---------------------------------------------------------------------------- with npm
def dep_tarball(version: str = "1.0.0") -> bytes:
    """An npm package tarball (``package/`` prefix) of a one-file module."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in {"package/package.json": json.dumps({"name": "dep",
                                                               "version": version}),
                           "package/index.js": f"module.exports = '{version}';\n"}.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)  # the same bytes every time


def node_app(name: str = "hello", *, version: str = "1.0.0", code: str = "") -> bytes:
    """A Node app whose only dependency is a tarball inside it: npm installs it offline."""
    pkg = {"name": "hello-pkg", "version": version, "private": True,  # whatever the app
           "dependencies": {"dep": "file:vendor/dep-1.0.0.tgz"}}
    return make_tar([
        file("superagent.toml", f'[app]\nname = "{name}"\n[run]\ncommand = "node app.js"\n'
                                f'[env]\nVERSION = "{version}{code}"\n'),
        file("app.js", f"// {code}\nrequire('dep');\n"),
        file("package.json", json.dumps(pkg)),
        file("vendor/dep-1.0.0.tgz", dep_tarball())])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_doc(store: ReleaseStore, app: str, release: str) -> dict[str, object]:
    doc = json.loads((store.root / app / release / "release.json").read_text())
    build: dict[str, object] = doc["build"]
    return build


@needs_npm
async def test_unchanged_dependencies_reuse_the_cached_tree_without_npm(tmp_path: Path
                                                                       ) -> None:
    """r1 runs npm and keeps its node_modules before the release is prepared (before any
    start): changing r1's tree afterwards, as its running app could, does not reach r2,
    which gets a copy of the cached tree and runs no npm (it writes no lock file). A
    changed package.json misses and runs npm; another app with the same package.json
    never gets this app's tree."""
    store = ReleaseStore(tmp_path / "store")
    first = node_app(code="1")
    r1 = await store.prepare("hello", "r1", first, sha(first), env=NPM_ENV)
    log1 = r1.build_log.read_text()
    assert "$ npm install" in log1 and "node_modules: not in the cache" in log1, log1
    assert "node_modules: kept in the cache" in log1, log1
    key = build_doc(store, "hello", "r1")["node_modules"]["key"]  # type: ignore[index]
    assert store.modules.entries("hello") == [key]  # stored as the build ended
    (r1.src / MODULES / "dep" / "index.js").write_text("poisoned\n")  # the app, later

    second = node_app(code="2")
    r2 = await store.prepare("hello", "r2", second, sha(second), env=NPM_ENV)
    log2 = r2.build_log.read_text()
    assert f"node_modules: reused from cache (key {key[:16]})" in log2, log2
    assert "$ npm" not in log2 and "npm not run" in log2
    assert not (r2.src / "package-lock.json").exists()  # npm install would have written it
    assert (r2.src / MODULES / "dep" / "index.js").read_text() == "module.exports = '1.0.0';\n"
    build = build_doc(store, "hello", "r2")
    assert build["command"] is None
    assert build["node_modules"] == {"key": key, "reused": True,  # type: ignore[comparison-overlap]
                                     "copy_seconds": build["node_modules"]["copy_seconds"]}  # type: ignore[index]

    changed = node_app(version="1.0.1")
    r3 = await store.prepare("hello", "r3", changed, sha(changed), env=NPM_ENV)
    log3 = r3.build_log.read_text()
    assert "$ npm install" in log3 and "not in the cache" in log3, log3
    assert len(store.modules.entries("hello")) == 2

    other = node_app("other", code="1")
    o1 = await store.prepare("other", "r1", other, sha(other), env=NPM_ENV)
    assert "$ npm install" in o1.build_log.read_text()
    assert store.modules.entries("other") == [key]  # the same key, its own tree


@needs_npm
@pytest.mark.skipif(os.geteuid() != 0, reason="building as another user needs root")
async def test_the_cached_tree_is_the_agents_and_the_copy_the_app_users(world_dir: Path
                                                                       ) -> None:
    """As root: the cache is root's, mode 0700, out of the app user's reach; the reused
    tree in the next release belongs to the app user, who may change it."""
    nobody = pwd.getpwnam("nobody")
    store = ReleaseStore(world_dir / "store")
    ids = {"uid": nobody.pw_uid, "gid": nobody.pw_gid}
    first, second = node_app(code="1"), node_app(code="2")
    await store.prepare("hello", "r1", first, sha(first), env=NPM_ENV, **ids)
    r2 = await store.prepare("hello", "r2", second, sha(second), env=NPM_ENV, **ids)
    assert "reused from cache" in r2.build_log.read_text()
    for path in (store.modules.root, store.modules.root / "hello"):
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    cached = store.modules.root / "hello" / store.modules.entries("hello")[0]
    assert {p.stat(follow_symlinks=False).st_uid for p in cached.rglob("*")} == {0}
    modules = r2.src / MODULES
    assert {p.stat(follow_symlinks=False).st_uid
            for p in [modules, *modules.rglob("*")]} == {nobody.pw_uid}
