"""Tests of ``superagent.participant.archive``: real tar archives unpacked to real files.

Archives are built with ``tarfile`` (hostile ones by writing the headers an attacker would).
Each test checks both the refusal (error type and member named) and that nothing was
written next to the destination.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from superagent.participant import archive as archive_module
from superagent.participant.archive import safe_extract
from superagent.participant.errors import ArchiveTooLarge, UnsafeArchive
from tests.participant.tarballs import (
    Member,
    directory,
    file,
    link,
    make_tar,
    special,
    zero_bomb,
)

MiB = 1024**2


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An empty directory; extraction goes to ``out/src`` and nothing else may appear."""
    path = tmp_path / "out"
    path.mkdir()
    return path


def test_extracts_a_normal_app(out: Path) -> None:
    """Files, directories, modes and inside symlinks arrive; setuid and archive owners do not."""
    archive = make_tar([
        directory("./"),
        file("./app.py", "print('hi')\n"),
        file("bin/run", "#!/bin/sh\n", mode=0o4775),  # setuid + group write: stripped
        file("deep/er/note.txt", "implicit parents"),
        directory("locked", mode=0o500),
        file("locked/inside.txt", "written before the directory's mode is applied"),
        file("node_modules/pkg/cli.js", "//"),
        link("node_modules/.bin/pkg", "../pkg/cli.js"),
        link("self", "."),
    ])
    dest = out / "src"
    safe_extract(archive, dest)
    assert sorted(p.name for p in out.iterdir()) == ["src"]
    assert (dest / "app.py").read_text() == "print('hi')\n"
    assert stat.S_IMODE((dest / "bin/run").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "locked").stat().st_mode) == 0o700
    assert (dest / "locked/inside.txt").exists()
    assert stat.S_IMODE((dest / "deep/er").stat().st_mode) == 0o755
    assert os.readlink(dest / "node_modules/.bin/pkg") == "../pkg/cli.js"
    assert (dest / "node_modules/.bin/pkg").read_text() == "//"
    assert (dest / "self" / "app.py").exists()
    assert (dest / "app.py").stat().st_mtime == 1_700_000_000
    for path in dest.rglob("*"):
        assert path.lstat().st_uid == os.geteuid()


def test_extracts_a_plain_tar_from_a_file(tmp_path: Path, out: Path) -> None:
    """An uncompressed archive given as a path works too."""
    path = tmp_path / "app.tar"
    path.write_bytes(make_tar([file("a.txt", "a")], gz=False))
    safe_extract(path, out / "src")
    assert (out / "src/a.txt").read_text() == "a"


def test_refuses_an_existing_destination(out: Path) -> None:
    """The destination must not exist: extraction never merges into a tree."""
    (out / "src").mkdir()
    with pytest.raises(FileExistsError):
        safe_extract(make_tar([file("a.txt")]), out / "src")


MALICIOUS: dict[str, tuple[list[Member], str, str]] = {
    "absolute path": ([file("/etc/evil", "x")], "/etc/evil", "absolute path"),
    "dotdot": ([file("../x", "x")], "../x", "'..'"),
    "dotdot deep": ([file("a/../../x", "x")], "a/../../x", "'..'"),
    "symlink to /etc/passwd, then written through": (
        [link("passwd", "/etc/passwd"), file("passwd", "root::0:0::/:/bin/sh\n")],
        "passwd", "absolute path"),
    "symlink to ..": ([link("up", "..")], "up", "outside"),
    "symlink escaping through another symlink": (
        [link("s", "."), link("t", "s/..")], "t", "outside"),
    "symlink chain that is circular": ([link("a", "b"), link("b", "a")], "a", "circular"),
    "file written through an inside symlink": (
        [directory("real"), link("d", "real"), file("d/x", "x")], "d/x", "below a symlink"),
    "hardlink": ([file("a.txt", "a"), link("h", "a.txt", tarfile.LNKTYPE)], "h", "hardlink"),
    "hardlink out": ([link("h", "/etc/shadow", tarfile.LNKTYPE)], "h", "hardlink"),
    "char device": ([special("null", tarfile.CHRTYPE)], "null", "character device"),
    "block device": ([special("sda", tarfile.BLKTYPE)], "sda", "block device"),
    "fifo": ([special("pipe", tarfile.FIFOTYPE)], "pipe", "fifo"),
    "same name twice": ([file("a.txt", "1"), file("a.txt", "2")], "a.txt", "twice"),
    "file below a file": ([file("a", "1"), file("a/b", "2")], "a/b", "below a regular file"),
}


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_refuses_malicious_archives(case: str, out: Path) -> None:
    """Each hostile archive is refused naming the member, and nothing is written."""
    members, member, reason = MALICIOUS[case]
    with pytest.raises(UnsafeArchive) as caught:
        safe_extract(make_tar(members), out / "src")
    assert caught.value.member == member
    assert reason in str(caught.value)
    assert "data filter" not in str(caught.value)  # our own checks, not tarfile's
    assert caught.value.status_hint == 400
    assert list(out.iterdir()) == []


def test_refuses_too_many_files(out: Path) -> None:
    """The member count is checked while reading headers."""
    archive = make_tar([file(f"f{i}", "x") for i in range(11)])
    with pytest.raises(ArchiveTooLarge, match="more than 10 members") as caught:
        safe_extract(archive, out / "src", max_files=10)
    assert caught.value.member == "f10"
    assert caught.value.status_hint == 413
    assert list(out.iterdir()) == []


def test_refuses_a_declared_size_over_the_limit_without_reading_it(out: Path) -> None:
    """A header declaring 10 GiB is refused from the header alone (the data is not there)."""
    info = tarfile.TarInfo("huge.bin")
    info.size = 10 * 1024**3
    archive = info.tobuf(tarfile.GNU_FORMAT) + bytes(1024)
    with pytest.raises(ArchiveTooLarge, match="declares 10737418240") as caught:
        safe_extract(archive, out / "src", max_bytes=MiB)
    assert caught.value.member == "huge.bin"
    assert list(out.iterdir()) == []


def test_refuses_a_gzip_bomb(out: Path) -> None:
    """A few KiB of gzip that unpack to 32 MiB are refused, before decompressing it all."""
    archive = make_tar([file(f"zeros{i}", bytes(8 * MiB)) for i in range(4)])
    assert len(archive) < 64 * 1024
    with pytest.raises(ArchiveTooLarge, match="more than 16777216 bytes") as caught:
        safe_extract(archive, out / "src", max_bytes=16 * MiB)
    assert caught.value.member == "zeros2"
    assert list(out.iterdir()) == []


def test_refuses_a_giant_extended_header(out: Path) -> None:
    """A pax header tarfile would read whole into memory is refused by the stream budget."""
    info, data = file("a.txt", "x")
    info.pax_headers = {"comment": "x" * (2 * MiB)}
    with pytest.raises(ArchiveTooLarge, match="extended header"):
        safe_extract(make_tar([(info, data)]), out / "src")
    assert list(out.iterdir()) == []


def test_copy_stops_at_the_budget_while_writing() -> None:
    """The write pass counts bytes too: a stream longer than the budget stops there."""
    sink = io.BytesIO()
    with pytest.raises(ArchiveTooLarge, match="more than 100000 bytes"):
        archive_module._copy_bounded(io.BytesIO(bytes(300_000)), sink, declared=300_000,
                                     budget=100_000, max_bytes=100_000, name="big")
    assert len(sink.getvalue()) <= 100_000
    with pytest.raises(UnsafeArchive, match="more data than its header"):
        archive_module._copy_bounded(io.BytesIO(bytes(10)), io.BytesIO(), declared=5,
                                     budget=100, max_bytes=100, name="liar")


@pytest.mark.parametrize("archive", [b"", b"definitely not a tarball" * 40,
                                     make_tar([file("a.txt", "x" * 5000)])[:60]],
                         ids=["empty", "garbage", "truncated gzip"])
def test_refuses_unreadable_archives(archive: bytes, out: Path) -> None:
    """Garbage and truncated archives are UnsafeArchive, not tarfile or zlib errors."""
    with pytest.raises(UnsafeArchive):
        safe_extract(archive, out / "src")
    assert list(out.iterdir()) == []


def test_refuses_a_compression_ratio_bomb_with_the_shared_rule(out: Path) -> None:
    """The ratio rule of ``superagent.tarcheck`` applies at prepare too, as ArchiveTooLarge."""
    bomb = zero_bomb("zeros.bin", 300 * MiB, first=(file("app.py", "x"),))
    with pytest.raises(ArchiveTooLarge, match="times its compressed size") as caught:
        safe_extract(bomb, out / "src")
    assert caught.value.member == "zeros.bin"
    assert caught.value.status_hint == 413
    assert list(out.iterdir()) == []
