"""Share scanning: what is ignored, what is refused, and when a file counts as finished."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cryoflow.share.scan import (
    FileStat,
    Observation,
    StabilityTracker,
    UnsafePathError,
    is_ignored,
    resolve_in,
    safe_relpath,
    scan_tree,
)


def _touch(root: Path, rel: str, data: bytes = b"x") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_scan_lists_files_and_prunes_windows_and_hidden_entries(tmp_path: Path) -> None:
    keep = [
        "Images-Disc1/GridSquare_1/Data/FoilHole_2_Data_3_4_20261124_101010_fractions.tiff",
        "Images-Disc1/GridSquare_1/Data/FoilHole_2_Data_3_4_20261124_101010.xml",
        "odd names/[grid 2] ü $(x) `y`.tif",
    ]
    skip = [
        "$RECYCLE.BIN/S-1-5/old.tif",
        "System Volume Information/tracking.log",
        ".hidden/movie.tif",
        "Images-Disc1/.~lock.tiff",
        "movie.tif.downloading",
        "Thumbs.db",
        "thumbs/a.jpg",
    ]
    for rel in keep + skip:
        _touch(tmp_path, rel)
    result = scan_tree(tmp_path, exclude=["*.jpg"])
    assert sorted(result.files) == sorted(keep)
    assert result.files[keep[0]] == FileStat(1, (tmp_path / keep[0]).stat().st_mtime_ns)


def test_symlinks_out_of_the_share_are_refused(tmp_path: Path) -> None:
    share, outside = tmp_path / "share", tmp_path / "secret"
    share.mkdir()
    outside.mkdir()
    (outside / "passwd").write_text("root")
    os.symlink(outside / "passwd", share / "escape.tif")
    os.symlink(outside, share / "escape_dir")
    _touch(share, "real.tif")
    os.symlink(share / "real.tif", share / "alias.tif")
    result = scan_tree(share)
    assert set(result.files) == {"real.tif", "alias.tif"}
    assert sorted(result.refused) == ["escape.tif", "escape_dir"]


@pytest.mark.parametrize("bad", ["../etc/passwd", "/etc/passwd", "a/../../b", "a\\b", "a\x00b", ""])
def test_unsafe_relative_paths_are_rejected(bad: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_relpath(bad)


def test_resolve_in_refuses_symlinked_escape(tmp_path: Path) -> None:
    (tmp_path / "share").mkdir()
    os.symlink("/etc", tmp_path / "share" / "etc")
    with pytest.raises(UnsafePathError, match="outside"):
        resolve_in(tmp_path / "share", "etc/passwd")
    assert resolve_in(tmp_path / "share", "x y/z.tif") == tmp_path / "share" / "x y" / "z.tif"


def test_ignore_rules() -> None:
    assert is_ignored("a/$RECYCLE.BIN/b")
    assert is_ignored("FoilHole_1_downloading_2.tiff")
    assert is_ignored("x/.partial")
    assert not is_ignored("GridSquare_1/Data/FoilHole_1_Data_2_fractions.tiff")
    assert is_ignored("a/b.jpg", ["*.jpg"])
    assert is_ignored("logs/run.log", ["logs/*"])


def test_file_is_ready_only_after_settling() -> None:
    tracker = StabilityTracker(settle_seconds=5.0)
    m = {"m.tif"}
    growing = {"m.tif": FileStat(100, 1)}
    assert tracker.observe(growing, now=0.0) == Observation(set(), m, m)
    growing = {"m.tif": FileStat(200, 2)}  # still being written
    assert tracker.observe(growing, now=4.0) == Observation(set(), m, m)
    assert tracker.observe(growing, now=8.0) == Observation(set(), m, set())  # 4 s unchanged
    assert tracker.observe(growing, now=9.0) == Observation(m, set(), set())
    # mtime touched without size change restarts the clock
    touched = {"m.tif": FileStat(200, 3)}
    assert tracker.observe(touched, now=10.0) == Observation(set(), m, m)
    # vanished files are forgotten
    assert tracker.observe({}, now=11.0) == Observation(set(), set(), set())
    assert tracker.stat_of("m.tif") is None
