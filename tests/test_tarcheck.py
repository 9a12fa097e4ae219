"""Tests of ``superagent.tarcheck``, the archive rules the coordinator (at upload) and the
participant (at prepare) share: the same hostile archives refused naming the same member,
the limits (members, declared size, compression ratio) hit early and fast."""

from __future__ import annotations

import pytest

from superagent.errors import ArchiveOverLimit, ArchiveRefused
from superagent.tarcheck import MAX_RATIO, RATIO_FLOOR, Summary, check_archive
from tests.participant.tarballs import directory, file, link, make_tar, many_files, zero_bomb
from tests.participant.test_archive import MALICIOUS

MiB = 1024**2
MANIFEST = file("superagent.toml", '[app]\nname = "x"\n[run]\ncommand = "true"\n')


def test_a_normal_archive_is_summarised() -> None:
    """Files, directories and an inside symlink pass; the summary counts them."""
    summary = check_archive(make_tar([MANIFEST, directory("static"), file("static/a.css", "a"),
                                      link("latest", "static")]))
    assert summary == Summary(members=4, files=2, unpacked_bytes=len(MANIFEST[1] or b"") + 1)


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_refuses_what_the_participant_refuses(case: str) -> None:
    """Every hostile archive of the participant's extractor tests is refused here, naming
    the same member for the same reason: one implementation, two callers."""
    members, member, reason = MALICIOUS[case]
    with pytest.raises(ArchiveRefused) as caught:
        check_archive(make_tar(members))
    assert caught.value.member == member
    assert reason in caught.value.reason
    assert not isinstance(caught.value, ArchiveOverLimit)


def test_refuses_a_declared_2gib_file_from_its_header() -> None:
    """A 2 GiB zero file compressed to 2 MB is refused at its header, reading no data."""
    bomb = zero_bomb("zeros.bin", 2 * 1024**3, first=(MANIFEST,))
    assert len(bomb) < 3 * MiB
    with pytest.raises(ArchiveOverLimit, match="declares 2147483648") as caught:
        check_archive(bomb)
    assert caught.value.member == "zeros.bin"


def test_refuses_a_compression_ratio_past_the_floor() -> None:
    """300 MiB of zeros (under the size limit) in 300 KB is refused once the stream passes
    the floor at more than MAX_RATIO times what was read: no 300 MiB decompression."""
    bomb = zero_bomb("zeros.bin", 300 * MiB, first=(MANIFEST,))
    with pytest.raises(ArchiveOverLimit, match=f"more than {MAX_RATIO} times") as caught:
        check_archive(bomb)
    assert caught.value.member == "zeros.bin"


def test_a_high_ratio_below_the_floor_is_fine() -> None:
    """A few MiB of zeros is a legitimate (if odd) source file: the ratio is not judged."""
    size = RATIO_FLOOR // 8
    assert check_archive(zero_bomb("zeros.bin", size)).unpacked_bytes == size


def test_refuses_the_member_past_the_count_limit() -> None:
    """Counting stops at the first member too many; the rest is never read."""
    with pytest.raises(ArchiveOverLimit, match="more than 50 members") as caught:
        check_archive(many_files(100_000, first=(MANIFEST,)), max_files=50)
    assert caught.value.member == "f49"


@pytest.mark.parametrize("archive", [b"", b"garbage" * 100, make_tar([file("a", "x" * 5000)])[:60]],
                         ids=["empty", "garbage", "truncated"])
def test_unreadable_archives_are_refused_not_raised(archive: bytes) -> None:
    """tarfile, gzip and zlib errors come out as ArchiveRefused."""
    with pytest.raises(ArchiveRefused, match="not a readable tar"):
        check_archive(archive)
