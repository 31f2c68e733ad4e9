"""Copying to long-term storage: verified, atomic, idempotent, and the source is never touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from cryoflow.ingest.transfer import (
    DestinationTakenError,
    SourceChangedError,
    copy_verified,
    partial_path,
    read_back_from_storage,
    sync_filesystem,
)


def _write(path: Path, size: int, seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(0) + bytes((seed * 7 + i) % 251 for i in range(size)))
    return path


def test_copy_preserves_content_mtime_and_mode(tmp_path: Path) -> None:
    src = _write(tmp_path / "share" / "FoilHole_1_Data_2_fractions.tiff", 3 * 1024 * 1024 + 17)
    os.utime(src, ns=(1_700_000_000_000_000_000, 1_700_000_000_123_456_789))
    before = src.stat()
    dst = tmp_path / "gpfs" / "raw" / "FoilHole_1_Data_2_fractions.tiff"

    result = copy_verified(src, dst, file_mode=0o640, chunk_bytes=1 << 20)

    assert result.copied
    assert dst.read_bytes() == src.read_bytes()
    assert result.checksum == xxhash.xxh3_128(src.read_bytes()).hexdigest()
    assert dst.stat().st_mtime_ns == before.st_mtime_ns
    assert dst.stat().st_mode & 0o777 == 0o640
    assert src.stat().st_mtime_ns == before.st_mtime_ns  # source untouched
    assert not partial_path(dst).exists()


def test_second_copy_of_identical_file_copies_nothing(tmp_path: Path) -> None:
    src = _write(tmp_path / "a.mrc", 100_000)
    dst = tmp_path / "out" / "a.mrc"
    first = copy_verified(src, dst)
    inode = dst.stat().st_ino
    second = copy_verified(src, dst)
    assert first.copied and not second.copied
    assert second.checksum == first.checksum
    assert dst.stat().st_ino == inode  # the verified file was not rewritten


def test_different_file_at_destination_is_never_overwritten(tmp_path: Path) -> None:
    src = _write(tmp_path / "a.mrc", 50_000, seed=1)
    dst = _write(tmp_path / "out" / "a.mrc", 50_000, seed=2)
    before = dst.read_bytes()
    os.utime(
        dst, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns)
    )  # same size+mtime, other bytes
    with pytest.raises(DestinationTakenError, match="a.mrc"):
        copy_verified(src, dst)
    assert dst.read_bytes() == before
    assert sorted(p.name for p in dst.parent.iterdir()) == ["a.mrc"]  # no partial left


def test_a_255_byte_name_copies(tmp_path: Path) -> None:
    name = "m" * 250 + ".tiff"
    src = _write(tmp_path / "in" / name, 10_000)
    dst = tmp_path / "out" / name
    copy_verified(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert len(partial_path(dst).name.encode()) < 64


def test_leftover_partial_from_a_killed_copy_is_overwritten(tmp_path: Path) -> None:
    src = _write(tmp_path / "m.tif", 200_000)
    dst = tmp_path / "out" / "m.tif"
    dst.parent.mkdir()
    partial_path(dst).write_bytes(b"half of a movie")
    copy_verified(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert not partial_path(dst).exists()


def test_source_that_changed_since_detection_is_not_copied(tmp_path: Path) -> None:
    src = _write(tmp_path / "growing.tiff", 10_000)
    seen = (src.stat().st_size, src.stat().st_mtime_ns)
    with open(src, "ab") as fh:
        fh.write(b"more frames")
    dst = tmp_path / "out" / "growing.tiff"
    with pytest.raises(SourceChangedError, match="growing.tiff"):
        copy_verified(src, dst, expected=seen)
    assert not dst.exists() and not partial_path(dst).exists()


def test_names_with_shell_metacharacters_are_plain_data(tmp_path: Path) -> None:
    name = "mov $(touch pwned) `id` [1] ü;rm -rf x.tif"
    src = _write(tmp_path / name, 1000)
    dst = tmp_path / "out" / name
    copy_verified(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert not (tmp_path / "pwned").exists()


def test_missing_source_names_the_file(tmp_path: Path) -> None:
    from cryoflow.ingest.transfer import TransferError

    with pytest.raises(TransferError, match="nothere.tiff"):
        copy_verified(tmp_path / "nothere.tiff", tmp_path / "out" / "x")


def test_new_folders_get_the_session_mode_whatever_the_umask(tmp_path: Path) -> None:
    src = _write(tmp_path / "m.tif", 10)
    dst = tmp_path / "raw" / "Images-Disc1" / "GridSquare_1" / "Data" / "m.tif"
    (tmp_path / "raw").mkdir()
    old = os.umask(0o022)
    try:
        copy_verified(src, dst, dir_mode=0o2770)
    finally:
        os.umask(old)
    for d in (dst.parent, dst.parent.parent, dst.parent.parent.parent):
        assert d.stat().st_mode & 0o7777 == 0o2770, d


def _sectors_read(path: Path) -> int | None:
    """Sectors read so far from the block device holding ``path`` (None: not a block device,
    e.g. tmpfs or overlay)."""
    dev = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    try:
        return int(stat.read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return None


def test_the_small_files_read_back_comes_from_the_storage(tmp_path: Path) -> None:
    """After the batch's one flush, read_back_from_storage drops the small files' pages and has
    them read again: the verification that follows reads what the disk holds, not the cache."""
    if _sectors_read(tmp_path) is None:
        pytest.skip(f"{tmp_path} is not on a block device: no read counters")
    files = []
    for i in range(64):
        path = tmp_path / f"f{i}.xml"
        path.write_bytes(os.urandom(128 << 10))  # 8 MiB in all, in the page cache, dirty
        files.append(path)
    sync_filesystem(tmp_path)  # clean now, still cached
    before = _sectors_read(tmp_path)
    assert read_back_from_storage(files) == set(files)
    for path in files:  # what the verification then reads
        path.read_bytes()
    read = (_sectors_read(tmp_path) - before) * 512
    assert read >= 8 << 20, f"only {read} bytes read from the disk for 8 MiB of files"
