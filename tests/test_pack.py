"""Tests of ``superagent.pack``: the ignore matcher (pure) and packing real trees on disk.

Every packed tree is also unpacked with the participant's ``safe_extract``, the code that
will receive it, so "packs" always means "packs into something the agent accepts".
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from superagent.errors import ConfigError, SuperagentError
from superagent.manifest import load_manifest
from superagent.pack import IgnoreRules, PackError, PackResult, pack
from superagent.participant.archive import safe_extract

MANIFEST = '[app]\nname = "demo"\n[run]\ncommand = "python3 app.py"\n'


def make_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    """Write ``files`` (relative path -> content; a path ending in '/' is a directory)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def app_tree(root: Path, files: dict[str, str | bytes] | None = None) -> Path:
    return make_tree(root, {"superagent.toml": MANIFEST, "app.py": "print('hi')\n",
                            **(files or {})})


def pack_bytes(root: Path, *, max_files: int = 20_000) -> tuple[bytes, PackResult]:
    buf = io.BytesIO()
    result = pack(root, buf, max_files=max_files)
    return buf.getvalue(), result


def names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getnames()


# --- the matcher -----------------------------------------------------------------------------


def rules(*lines: str) -> IgnoreRules:
    return IgnoreRules.from_lines(lines)


@pytest.mark.parametrize(("pattern", "path", "is_dir", "expected"), [
    ("*.log", "a.log", False, True),
    ("*.log", "deep/down/a.log", False, True),
    ("*.log", "a.log.txt", False, False),
    ("build/", "build", True, True),
    ("build/", "build", False, False),  # trailing '/': directories only
    ("build/", "src/build", True, True),  # no inner '/': any level
    ("/build", "build", True, True),
    ("/build", "src/build", True, False),  # leading '/': anchored
    ("doc/frotz", "doc/frotz", False, True),
    ("doc/frotz", "a/doc/frotz", False, False),  # inner '/': anchored too
    ("foo?.txt", "foo1.txt", False, True),
    ("foo?.txt", "foo/.txt", False, False),  # '?' never matches '/'
    ("a/*/c", "a/b/c", False, True),
    ("a/*/c", "a/b/x/c", False, False),  # '*' never matches '/'
    ("**/logs", "logs", True, True),
    ("**/logs", "x/y/logs", True, True),
    ("logs/**", "logs/a/b.txt", False, True),
    ("logs/**", "logs", True, False),  # inside only, not the directory itself
    ("logs/**", "logs/sub", True, True),
    ("a/**/b", "a/b", False, True),
    ("a/**/b", "a/x/y/b", False, True),
    ("a/**/b", "ab", False, False),
    ("x**y", "xay", False, True),  # a '**' not between slashes is a plain '*'
    ("x**y", "xa/y", False, False),
    ("[abc].txt", "b.txt", False, True),
    ("[abc].txt", "d.txt", False, False),
    ("[!abc].txt", "d.txt", False, True),
    ("[!abc].txt", "a.txt", False, False),
    ("[a-c]x", "bx", False, True),
    ("[a-c]x", "dx", False, False),
    ("[].txt", "[].txt", False, False),  # never closed: git's wildmatch matches nothing
    ("\\#hash", "#hash", False, True),
    ("\\!bang", "!bang", False, True),
    ("space\\ ", "space ", False, True),
    ("trailing   ", "trailing", False, True),  # unescaped trailing spaces are dropped
])
def test_pattern(pattern: str, path: str, is_dir: bool, expected: bool) -> None:
    """Each gitignore form matches what git would match."""
    assert rules(pattern).ignored(path, is_dir) is expected


def test_blank_lines_and_comments_are_skipped() -> None:
    """Blank lines and '#' comments compile to nothing."""
    r = rules("", "   ", "# a comment", "*.tmp")
    assert r.patterns == ("*.tmp",)
    assert not r.ignored("# a comment", False)
    assert r.ignored("x.tmp", False)


def test_negation_last_match_wins() -> None:
    """'!' re-includes what an earlier rule excluded, and a later rule can exclude again."""
    r = rules("*.log", "!keep.log")
    assert r.ignored("a.log", False)
    assert not r.ignored("keep.log", False)
    assert rules("*.log", "!keep.log", "keep.log").ignored("keep.log", False)


def test_everything_inside_except_one_file() -> None:
    """'dir/**' then '!dir/keep' keeps that one file, as in git (the directory is kept)."""
    r = rules("logs/**", "!logs/keep")
    assert not r.ignored("logs", True)
    assert not r.ignored("logs/keep", False)
    assert r.ignored("logs/today.log", False)
    assert r.ignored("logs/old/a.log", False)


def test_later_rules_add_up() -> None:
    """Rules joined with + keep their order, so .superagentignore can re-include."""
    r = rules("*.log") + rules("!keep.log")
    assert r.patterns == ("*.log", "!keep.log")
    assert not r.ignored("keep.log", False)


def test_no_reinclude_below_an_ignored_directory() -> None:
    """As in git, a file cannot be re-included when a parent directory is excluded."""
    r = rules("build/", "!build/keep.txt")
    assert r.ignored("build/keep.txt", False)
    assert r.ignored("build/x/y", False)
    assert not r.ignored("src/x", False)


def test_repr_names_the_patterns() -> None:
    """The repr lists the patterns, for logs and assertion messages."""
    assert repr(rules("*.log", "!a.log")) == "IgnoreRules(['*.log', '!a.log'])"


# --- packing ---------------------------------------------------------------------------------


def test_round_trip_through_safe_extract(tmp_path: Path) -> None:
    """A packed tree unpacks with the participant's extractor to the same files and manifest."""
    root = app_tree(tmp_path / "src", {"static/style.css": "body {}\n", "empty/": "",
                                       "run.sh": "#!/bin/sh\n"})
    (root / "run.sh").chmod(0o700)
    os.symlink("static/style.css", root / "style.css")
    data, result = pack_bytes(root)
    safe_extract(data, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "static/style.css").read_text() == "body {}\n"
    assert (out / "empty").is_dir()
    assert os.readlink(out / "style.css") == "static/style.css"
    assert os.access(out / "run.sh", os.X_OK)
    assert load_manifest(out).name == "demo"
    assert result.app_name == "demo"
    assert result.files == 5  # superagent.toml, app.py, run.sh, static/style.css, style.css
    assert result.size == len(data)
    assert result.excluded == 0


def test_headers_are_normalised(tmp_path: Path) -> None:
    """Owners, times and modes are the same whoever packs, whenever."""
    root = app_tree(tmp_path / "src", {"bin/tool": "x", "secret": "y"})
    (root / "bin/tool").chmod(0o750)
    (root / "secret").chmod(0o600)
    (root / "bin").chmod(0o700)
    data, _ = pack_bytes(root)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert names(data) == sorted(members, key=lambda n: n.split("/"))
    for member in members.values():
        assert (member.uid, member.gid, member.uname, member.gname, member.mtime) == (
            0, 0, "", "", 0)
    assert members["bin"].mode == 0o755
    assert members["bin/tool"].mode == 0o755
    assert members["secret"].mode == 0o644
    assert members["app.py"].mode == 0o644
    assert data[4:8] == b"\0\0\0\0"  # gzip header mtime


def test_deterministic(tmp_path: Path) -> None:
    """The same tree gives the same sha256, whatever the mtimes, the location or the order
    files were created in."""
    a = app_tree(tmp_path / "a", {"z.txt": "z", "m/n.txt": "n", "b.txt": "b"})
    b = make_tree(tmp_path / "b", {"b.txt": "b", "m/n.txt": "n", "z.txt": "z",
                                   "app.py": "print('hi')\n", "superagent.toml": MANIFEST})
    os.utime(b / "z.txt", (1_000, 1_000))
    data_a, result_a = pack_bytes(a)
    data_b, result_b = pack_bytes(b)
    assert data_a == data_b
    assert result_a.sha256 == result_b.sha256
    (b / "z.txt").write_text("changed")
    assert pack_bytes(b)[1].sha256 != result_a.sha256


def test_sha256_is_of_the_bytes_written(tmp_path: Path) -> None:
    """sha256 and size describe exactly what went to ``dest``."""
    data, result = pack_bytes(app_tree(tmp_path / "src"))
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.size == len(data)


def test_always_excluded(tmp_path: Path) -> None:
    """VCS, caches, virtualenvs and agent state are left out; '!' cannot bring them back."""
    root = app_tree(tmp_path / "src", {
        ".git/HEAD": "ref", ".superagent/state": "s", "__pycache__/app.cpython-311.pyc": "c",
        "pkg/__pycache__/x.pyc": "c", "stray.pyc": "c", ".venv/bin/python": "p",
        "node_modules/left-pad/index.js": "j", ".superagentignore": "!.git/\n!*.pyc\n"})
    data, result = pack_bytes(root)
    assert names(data) == [".superagentignore", "app.py", "pkg", "superagent.toml"]
    assert result.excluded == 7  # each excluded directory counts once


def test_ignore_files(tmp_path: Path) -> None:
    """.gitignore then .superagentignore rules apply, the latter winning."""
    root = app_tree(tmp_path / "src", {
        ".gitignore": "# build output\n*.log\n/dist/\ndata/\n!important.log\n",
        ".superagentignore": "!data/\nsecret.txt\n",
        "a.log": "x", "important.log": "x", "dist/x.js": "x", "sub/dist/y.js": "y",
        "data/seed.csv": "1", "secret.txt": "s"})
    data, result = pack_bytes(root)
    assert names(data) == [".gitignore", ".superagentignore", "app.py", "data",
                           "data/seed.csv", "important.log", "sub", "sub/dist",
                           "sub/dist/y.js", "superagent.toml"]
    assert result.excluded == 3  # a.log, dist/, secret.txt


def test_excluded_directory_is_not_descended(tmp_path: Path) -> None:
    """Nothing under an excluded directory is looked at: an escaping link there is no error."""
    root = app_tree(tmp_path / "src", {".gitignore": "cache/\n", "cache/": ""})
    os.symlink("/etc/passwd", root / "cache" / "evil")
    os.mkfifo(root / "cache" / "fifo")
    data, result = pack_bytes(root)
    assert "cache" not in names(data)
    assert result.excluded == 1


def test_no_manifest(tmp_path: Path) -> None:
    """A directory without superagent.toml or Procfile is refused, naming the directory."""
    root = make_tree(tmp_path / "src", {"app.py": ""})
    with pytest.raises(PackError, match=r"no superagent\.toml or Procfile") as info:
        pack(root, io.BytesIO())
    assert str(root) in str(info.value)
    assert isinstance(info.value, SuperagentError)


def test_not_a_directory(tmp_path: Path) -> None:
    """A missing directory is refused by name."""
    with pytest.raises(PackError, match="not a directory"):
        pack(tmp_path / "missing", io.BytesIO())


def test_bad_manifest_names_the_key(tmp_path: Path) -> None:
    """An invalid manifest raises the loader's ConfigError naming the key; nothing is written."""
    root = app_tree(tmp_path / "src")
    (root / "superagent.toml").write_text(MANIFEST + "[scale]\nper_node = -1\n")
    buf = io.BytesIO()
    with pytest.raises(ConfigError, match=r"scale\.per_node"):
        pack(root, buf)
    assert buf.getvalue() == b""


def test_procfile_only(tmp_path: Path) -> None:
    """A Procfile with a web: line packs; the app name is then unknown."""
    root = make_tree(tmp_path / "src", {"Procfile": "web: python3 app.py\n", "app.py": ""})
    data, result = pack_bytes(root)
    assert result.app_name is None
    assert names(data) == ["Procfile", "app.py"]
    assert pack(root, io.BytesIO(), app="named").app_name == "named"


def test_procfile_without_web(tmp_path: Path) -> None:
    """A Procfile without a web: line is refused by the manifest loader."""
    root = make_tree(tmp_path / "src", {"Procfile": "worker: python3 w.py\n"})
    with pytest.raises(ConfigError, match="web:"):
        pack(root, io.BytesIO())


def test_manifest_must_not_be_ignored(tmp_path: Path) -> None:
    """Ignoring the manifest would ship an undeployable tree: refused."""
    root = app_tree(tmp_path / "src", {".superagentignore": "*.toml\n"})
    with pytest.raises(PackError, match=r"superagent\.toml is excluded"):
        pack(root, io.BytesIO())


@pytest.mark.parametrize("target", ["../outside", "/etc/passwd", "sub/../../outside"])
def test_escaping_symlink_refused(tmp_path: Path, target: str) -> None:
    """A symlink leaving the tree (or absolute) is refused, naming the link."""
    root = app_tree(tmp_path / "src", {"sub/": ""})
    (tmp_path / "outside").write_text("secret")
    os.symlink(target, root / "link")
    with pytest.raises(PackError, match="symlink") as info:
        pack(root, io.BytesIO())
    assert str(root / "link") in str(info.value)


def test_symlink_through_a_symlink_is_resolved(tmp_path: Path) -> None:
    """A link that looks inside but resolves through another link to outside is refused."""
    root = app_tree(tmp_path / "src")
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere" / "deep", root / "d")  # itself refused, but found second
    os.symlink("d/..", root / "a")
    with pytest.raises(PackError, match=r"outside|absolute"):
        pack(root, io.BytesIO())


def test_inside_symlinks_kept(tmp_path: Path) -> None:
    """Links to directories and dangling links inside the tree are kept as links."""
    root = app_tree(tmp_path / "src", {"lib/x.py": ""})
    os.symlink("lib", root / "vendor")
    os.symlink("not-yet-built", root / "dangling")
    data, _ = pack_bytes(root)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        vendor = tar.getmember("vendor")
        assert vendor.issym() and vendor.linkname == "lib"
        assert tar.getmember("dangling").issym()
        assert "vendor/x.py" not in tar.getnames()
    safe_extract(data, tmp_path / "out")


def test_fifo_refused(tmp_path: Path) -> None:
    """A fifo (or device, or socket) is refused by name."""
    root = app_tree(tmp_path / "src")
    os.mkfifo(root / "pipe")
    with pytest.raises(PackError, match="fifo") as info:
        pack(root, io.BytesIO())
    assert str(root / "pipe") in str(info.value)


def test_max_bytes(tmp_path: Path) -> None:
    """Files adding up to more than max_bytes are refused before anything is written."""
    root = app_tree(tmp_path / "src", {"big.bin": b"x" * 10_000})
    buf = io.BytesIO()
    with pytest.raises(PackError, match="more than 5000 bytes"):
        pack(root, buf, max_bytes=5_000)
    assert buf.getvalue() == b""
    assert pack(root, io.BytesIO(), max_bytes=20_000).files == 3


def test_max_files(tmp_path: Path) -> None:
    """More members than max_files (directories count, as in the extractor) are refused."""
    root = app_tree(tmp_path / "src", {f"d/{i}.txt": "" for i in range(5)})
    with pytest.raises(PackError, match="more than 6 files"):
        pack(root, io.BytesIO(), max_files=6)
    data, _ = pack_bytes(root, max_files=8)
    safe_extract(data, tmp_path / "out", max_files=8)


def test_dest_inside_the_tree_is_skipped(tmp_path: Path) -> None:
    """Writing the tarball into the directory being packed does not pack the tarball."""
    root = app_tree(tmp_path / "src")
    with open(root / "out.tar.gz", "wb") as dest:
        result = pack(root, dest)
    assert names((root / "out.tar.gz").read_bytes()) == ["app.py", "superagent.toml"]
    assert result.excluded == 1


def test_streams_in_chunks(tmp_path: Path) -> None:
    """A file larger than one chunk reaches ``dest`` in many writes, not one."""
    root = app_tree(tmp_path / "src", {"big.bin": os.urandom(1024 * 1024)})

    class Recorder(io.BytesIO):
        writes = 0

        def write(self, data: bytes, /) -> int:  # type: ignore[override]
            self.writes += 1
            return super().write(data)

    dest = Recorder()
    pack(root, dest)
    assert dest.writes > 4
