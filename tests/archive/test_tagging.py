"""Archive tags on real files: set after verification, read back from the file system, refused
when they would contradict the checksum a file already carries."""

from __future__ import annotations

import errno
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cryoflow.archive.settings import ArchiveConfig
from cryoflow.archive.tagging import TAGS, TaggingError, read_tags, tag_summary, tag_verified

PREFIX = ArchiveConfig().xattr_prefix
WHEN = datetime(2026, 12, 1, 22, 14, 7, tzinfo=UTC)


def _tag(path: Path, checksum: str = "xxh3_128:" + "ab" * 16, session: str = "s1") -> dict:
    return tag_verified(
        path,
        prefix=PREFIX,
        session=session,
        checksum=checksum,
        archive_class="raw",
        verified_at=WHEN,
    )


def _movie(tmp_path: Path, name: str = "FoilHole_1_Data_2_fractions.tiff") -> Path:
    path = tmp_path / "raw" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"II*\x00" + bytes(1000))
    return path


def test_tags_are_on_the_file_and_read_back(tmp_path: Path) -> None:
    movie = _movie(tmp_path)

    found = _tag(movie)

    assert found == read_tags(movie, PREFIX)
    # straight from the kernel, not through read_tags: what the GPFS policy will see
    assert os.getxattr(movie, "user.cryoflow.archive_class") == b"raw"
    assert os.getxattr(movie, "user.cryoflow.checksum") == b"xxh3_128:" + b"ab" * 16
    assert os.getxattr(movie, "user.cryoflow.session") == b"s1"
    assert os.getxattr(movie, "user.cryoflow.verified_at") == b"2026-12-01T22:14:07+00:00"
    assert sorted(n for n in os.listxattr(movie) if n.startswith(PREFIX)) == sorted(
        PREFIX + t for t in TAGS
    )


def test_retagging_with_the_same_checksum_is_fine(tmp_path: Path) -> None:
    movie = _movie(tmp_path)
    _tag(movie)
    assert _tag(movie)["checksum"] == "xxh3_128:" + "ab" * 16


def test_a_different_checksum_is_refused_and_the_tags_stay(tmp_path: Path) -> None:
    movie = _movie(tmp_path)
    _tag(movie)

    with pytest.raises(TaggingError, match="refusing") as caught:
        _tag(movie, checksum="xxh3_128:" + "cd" * 16, session="other")

    assert caught.value.errno == errno.EEXIST
    assert read_tags(movie, PREFIX)["checksum"] == "xxh3_128:" + "ab" * 16
    assert read_tags(movie, PREFIX)["session"] == "s1"


def test_a_session_name_that_is_not_utf8_round_trips(tmp_path: Path) -> None:
    session = os.fsdecode(b"grid\xff_krios1")  # as Path(dest_root).name gives it
    movie = _movie(tmp_path)

    found = _tag(movie, session=session)

    assert found["session"] == session
    assert os.getxattr(movie, "user.cryoflow.session") == b"grid\xff_krios1"


def test_a_file_system_without_user_attributes_is_a_tagging_error(tmp_path: Path) -> None:
    """procfs refuses user attributes (ENOTSUP), like a file system mounted without them: the
    error is an OSError the copy logs (the file stays on disk), never a crash of another kind."""
    target = Path("/proc/self/comm")
    try:
        os.setxattr(target, "user.cryoflow.probe", b"x")
    except OSError as exc:
        assert exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES)
    else:  # pragma: no cover - a kernel that keeps user attributes on procfs
        pytest.skip("this kernel keeps user attributes on /proc")

    with pytest.raises(TaggingError) as caught:
        _tag(target)

    assert isinstance(caught.value, OSError)
    assert caught.value.errno == errno.ENOTSUP
    assert "user.cryoflow.session" in str(caught.value)
    assert read_tags(target, PREFIX) == {}


def test_attributes_that_read_back_otherwise_are_a_tagging_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that takes an attribute but keeps less of it (a size cap, a gateway that
    rewrites values) must not leave a tape label nobody checked: the read-back catches it."""
    real = os.setxattr

    def capped(path, name, value, *args, **kwargs):  # keeps the first 16 bytes only
        return real(path, name, value[:16], *args, **kwargs)

    movie = _movie(tmp_path)
    monkeypatch.setattr("cryoflow.archive.tagging.os.setxattr", capped)

    with pytest.raises(TaggingError) as caught:
        _tag(movie)

    assert caught.value.errno == errno.EIO and "read back" in str(caught.value)
    assert read_tags(movie, PREFIX)["checksum"] == ("xxh3_128:" + "ab" * 16)[:16]  # as kept


def test_tag_summary_counts_what_the_files_carry(tmp_path: Path) -> None:
    tagged = [_movie(tmp_path, f"m{i}.tiff") for i in range(3)]
    for path in tagged:
        _tag(path)
    tar = _movie(tmp_path, "small-files.tar")
    tag_verified(
        tar,
        prefix=PREFIX,
        session="s1",
        checksum="xxh3_128:" + "ef" * 16,
        archive_class="aggregate",
        verified_at=WHEN,
    )
    bare = _movie(tmp_path, "untagged.tiff")
    half = _movie(tmp_path, "half.tiff")
    os.setxattr(half, PREFIX + "session", b"s1")

    summary = tag_summary([*tagged, tar, bare, half], PREFIX)

    assert summary.as_dict() == {
        "tagged": 4,
        "untagged": 1,
        "partially_tagged": 1,
        "by_class": {"aggregate": 1, "raw": 3},
        "not_tagged": [str(bare), str(half)],
    }


def test_tag_summary_lists_at_most_so_many_names(tmp_path: Path) -> None:
    paths = [_movie(tmp_path, f"u{i}.tiff") for i in range(5)]

    summary = tag_summary(paths, PREFIX, list_at_most=2)

    assert summary.untagged == 5
    assert summary.not_tagged == [str(paths[0]), str(paths[1])]
