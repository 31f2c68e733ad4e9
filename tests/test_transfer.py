"""Copying to long-term storage: verified, atomic, idempotent, and the source is never touched.

The copy tests run on both backends (``share_backend``): the source file is written into
``root`` as the microscope PC would and read as a :class:`SourceFile` of the share's source, a
mounted folder or the same folder over SMB; the destination is a local folder outside ``root``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from cryoflow.ingest import transfer
from cryoflow.ingest.share.source import SourceFile
from cryoflow.ingest.transfer import (
    DestinationTakenError,
    SourceChangedError,
    TransferError,
    copy_verified,
    partial_path,
    read_back_from_storage,
    sync_filesystem,
)
from tests.share import conftest as share
from tests.share.conftest import Backend

share_backend = share.share_backend  # the fixture, from the share tests: mount and smb
Source = Callable[[str], SourceFile]


def _write(path: Path, size: int, seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes((seed * 7 + i) % 251 for i in range(size)))
    return path


@pytest.fixture
def root(share_backend: Backend) -> Path:
    """Where the "microscope" writes the source files."""
    return share_backend.root


@pytest.fixture
def source(share_backend: Backend) -> Source:
    """``source(relpath)``: that file of the share, as the copy reads it."""
    return lambda relpath: SourceFile(share_backend.source, relpath)


@pytest.fixture
def gpfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The destination storage: a local folder, never under the share's ``root``."""
    return tmp_path_factory.mktemp("gpfs")


def test_copy_preserves_content_mtime_and_mode(
    root: Path, source: Source, gpfs: Path, share_backend: Backend
) -> None:
    rel = "FoilHole_1_Data_2_fractions.tiff"
    local = _write(root / rel, 3 * 1024 * 1024 + 17)
    os.utime(local, ns=(1_700_000_000_000_000_000, 1_700_000_000_123_456_789))
    before = local.stat()
    seen = share_backend.source.stat(rel)  # the mtime as the share reports it (SMB: in µs)
    dst = gpfs / "raw" / rel

    result = copy_verified(source(rel), dst, file_mode=0o640, chunk_bytes=1 << 20)

    assert result.copied
    assert dst.read_bytes() == local.read_bytes()
    assert result.checksum == xxhash.xxh3_128(local.read_bytes()).hexdigest()
    assert dst.stat().st_mtime_ns == seen.st_mtime_ns
    step = 1 if share_backend.kind == "mount" else 1000  # an SMB listing's mtime is in µs
    assert seen.st_mtime_ns == before.st_mtime_ns // step * step
    assert dst.stat().st_mode & 0o777 == 0o640
    assert local.stat().st_mtime_ns == before.st_mtime_ns  # source untouched
    assert local.stat().st_size == before.st_size
    assert not partial_path(dst).exists()


def test_second_copy_of_identical_file_copies_nothing(
    root: Path, source: Source, gpfs: Path
) -> None:
    _write(root / "a.mrc", 100_000)
    dst = gpfs / "out" / "a.mrc"
    first = copy_verified(source("a.mrc"), dst)
    inode = dst.stat().st_ino
    second = copy_verified(source("a.mrc"), dst)
    assert first.copied and not second.copied
    assert second.checksum == first.checksum
    assert dst.stat().st_ino == inode  # the verified file was not rewritten


@pytest.mark.parametrize("rename", ["renameat2", "link"])
def test_different_file_at_destination_is_never_overwritten(
    root: Path, source: Source, gpfs: Path, rename: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of naming a verified copy refuse to replace: renameat2(RENAME_NOREPLACE),
    and the hard link used where the kernel or file system lacks it."""
    if rename == "link":
        monkeypatch.setattr(transfer, "_renameat2_no_replace", lambda tmp, dst: False)
    _write(root / "a.mrc", 50_000, seed=1)
    dst = _write(gpfs / "out" / "a.mrc", 50_000, seed=2)
    before = dst.read_bytes()
    seen = source("a.mrc").stat()
    os.utime(dst, ns=(seen.st_atime_ns, seen.st_mtime_ns))  # same size+mtime, other bytes
    with pytest.raises(DestinationTakenError, match="a.mrc"):
        copy_verified(source("a.mrc"), dst)
    assert dst.read_bytes() == before
    assert sorted(p.name for p in dst.parent.iterdir()) == ["a.mrc"]  # no partial left


def test_a_255_byte_name_copies(root: Path, source: Source, gpfs: Path) -> None:
    name = "m" * 250 + ".tiff"
    local = _write(root / "in" / name, 10_000)
    dst = gpfs / "out" / name
    copy_verified(source(f"in/{name}"), dst)
    assert dst.read_bytes() == local.read_bytes()
    assert len(partial_path(dst).name.encode()) < 64


def test_leftover_partial_from_a_killed_copy_is_overwritten(
    root: Path, source: Source, gpfs: Path
) -> None:
    local = _write(root / "m.tif", 200_000)
    dst = gpfs / "out" / "m.tif"
    dst.parent.mkdir()
    partial_path(dst).write_bytes(b"half of a movie")
    copy_verified(source("m.tif"), dst)
    assert dst.read_bytes() == local.read_bytes()
    assert not partial_path(dst).exists()


def test_source_that_changed_since_detection_is_not_copied(
    root: Path, source: Source, gpfs: Path
) -> None:
    _write(root / "growing.tiff", 10_000)
    stat = source("growing.tiff").stat()
    seen = (stat.st_size, stat.st_mtime_ns)
    with open(root / "growing.tiff", "ab") as fh:  # the microscope writes on
        fh.write(b"more frames")
    dst = gpfs / "out" / "growing.tiff"
    with pytest.raises(SourceChangedError, match="growing.tiff"):
        copy_verified(source("growing.tiff"), dst, expected=seen)
    assert not dst.exists() and not partial_path(dst).exists()


def test_names_with_shell_metacharacters_are_plain_data(
    root: Path, source: Source, gpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(gpfs)
    name = "mov $(touch pwned) `id` [1] ü;rm -rf x.tif"
    local = _write(root / name, 1000)
    dst = gpfs / "out" / name
    copy_verified(source(name), dst)
    assert dst.read_bytes() == local.read_bytes()
    assert not list(gpfs.rglob("pwned")) and not (root / "pwned").exists()


def test_missing_source_names_the_file(source: Source, gpfs: Path) -> None:
    with pytest.raises(TransferError, match="nothere.tiff"):
        copy_verified(source("nothere.tiff"), gpfs / "out" / "x")


# Mount only: about the destination (its folders' modes, its read-back), where the source's
# backend makes no difference.


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
