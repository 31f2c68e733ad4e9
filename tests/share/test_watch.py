"""The watch decision loop: batches, already-done files, idle timeout and end time.

Every test runs on both backends (``share_backend``: a mounted folder, and the same folder over
SMB); a share that goes offline, or a session folder that vanishes or lists empty while the
ledger has files from it, pauses the watch on both: nothing is concluded from it.
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cryoflow.ingest.share.completeness import Completeness, Verdict
from cryoflow.ingest.share.source import ShareOffline
from cryoflow.ingest.share.watch import ShareWatch, WatchSettings
from tests.share.conftest import Backend


def _settings(root: Path, **kw) -> WatchSettings:
    base = dict(
        root=root,
        settle_seconds=2.0,
        batch_max_files=3,
        batch_window_seconds=10.0,
        idle_timeout_seconds=30.0,
    )
    base.update(kw)
    return WatchSettings(**base)


def test_batch_is_offered_once_files_settle(share_backend: Backend) -> None:
    b = share_backend
    (b.root / "a.dat").write_bytes(b"1")
    (b.root / "b.dat").write_bytes(b"2")
    watch = ShareWatch(_settings(b.root), done={}, started=0.0, source=b.source)
    assert watch.poll(0.0).status == "wait"
    out = watch.poll(2.5)
    assert out.status == "ready"
    assert [f["relpath"] for f in out.files] == ["a.dat", "b.dat"]
    assert out.files[0]["size"] == 1


def test_batch_waits_for_window_while_other_files_still_grow(share_backend: Backend) -> None:
    b = share_backend
    (b.root / "done.dat").write_bytes(b"1")
    growing = b.root / "growing.dat"
    growing.write_bytes(b"1")
    watch = ShareWatch(_settings(b.root), done={}, started=0.0, source=b.source)
    watch.poll(0.0)
    for t in (1.0, 3.0, 6.0, 9.0):
        with open(growing, "ab") as fh:
            fh.write(b"more")
        assert watch.poll(t).status == "wait", t
    with open(growing, "ab") as fh:
        fh.write(b"more")
    out = watch.poll(13.0)  # window of 10 s since done.tif was first ready at 3.0
    assert out.status == "ready"
    assert [f["relpath"] for f in out.files] == ["done.dat"]
    assert out.pending == 1
    # the next batch run's watch starts from what is still on its way, not from the handed-over
    # batch (the ledger's from now on; the session view shows the carried state as settling)
    carried = watch.carry_over(13.0, out)
    assert list(carried) == ["growing.dat"]
    assert carried["growing.dat"][0] == growing.stat().st_size


def test_full_batch_goes_at_once_and_is_capped(share_backend: Backend) -> None:
    b = share_backend
    for i in range(5):
        (b.root / f"m{i}.dat").write_bytes(b"x")
    watch = ShareWatch(_settings(b.root), done={}, started=0.0, source=b.source)
    watch.poll(0.0)
    out = watch.poll(2.0)
    assert len(out.files) == 3 and out.pending == 2


def test_done_files_are_not_offered_again_unless_changed(share_backend: Backend) -> None:
    b = share_backend
    f = b.root / "a.dat"
    f.write_bytes(b"1")
    st = b.source.stat("a.dat")  # as the share reports it (SMB: microseconds)
    watch = ShareWatch(
        _settings(b.root, idle_timeout_seconds=5.0),
        done={"a.dat": (st.st_size, st.st_mtime_ns)},
        started=0.0,
        source=b.source,
    )
    assert watch.poll(0.0).status == "wait"
    out = watch.poll(6.0)
    assert out.status == "ended" and "idle" in out.reason
    f.write_bytes(b"12")  # rewritten on the share: offered again
    watch = ShareWatch(
        _settings(b.root),
        done={"a.dat": (st.st_size, st.st_mtime_ns)},
        started=0.0,
        source=b.source,
    )
    watch.poll(0.0)
    assert [x["relpath"] for x in watch.poll(3.0).files] == ["a.dat"]


def test_idle_timeout_counts_from_last_change_once_nothing_is_on_its_way(
    share_backend: Backend,
) -> None:
    b = share_backend
    g = b.root / "slow.dat"
    g.write_bytes(b"1")
    watch = ShareWatch(
        _settings(b.root, idle_timeout_seconds=5.0, settle_seconds=100.0),
        done={},
        started=0.0,
        source=b.source,
    )
    watch.poll(0.0)
    g.write_bytes(b"12")
    assert watch.poll(4.0).status == "wait"
    assert watch.poll(9.5).status == "wait"  # quiet for 5.5 s, but still settling
    g.unlink()  # gone from the share (renamed by the microscope PC): nothing on its way
    assert watch.poll(9.6).status == "ended"


def test_end_time_ends_the_session(share_backend: Backend) -> None:
    b = share_backend
    deadline = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    watch = ShareWatch(_settings(b.root, deadline=deadline), done={}, started=0.0, source=b.source)
    assert watch.poll(0.0, wall=deadline - timedelta(seconds=1)).status == "wait"
    out = watch.poll(1.0, wall=deadline)
    assert out.status == "ended" and "end time" in out.reason


def test_missing_session_folder_waits_then_idles(share_backend: Backend) -> None:
    b = share_backend.sub("not_yet")
    watch = ShareWatch(
        _settings(b.root, idle_timeout_seconds=5.0), done={}, started=0.0, source=b.source
    )
    out = watch.poll(1.0)
    assert out.status == "wait" and "does not exist" in out.errors[0]
    assert watch.poll(6.0).status == "ended"


def test_quiet_but_incomplete_files_wait_and_are_reported_once_abandoned(
    share_backend: Backend,
) -> None:
    b = share_backend
    (b.root / "whole.tiff").write_bytes(b"1")
    (b.root / "half.tiff").write_bytes(b"1")
    seen: list[tuple[str, int | None]] = []

    def checker(path: Path, frames: int | None) -> Completeness:
        seen.append((path.name, frames))
        if path.name == "half.tiff":
            return Completeness(Verdict.INCOMPLETE, "3 of 40 pages")
        return Completeness(Verdict.COMPLETE)

    settings = _settings(b.root, incomplete_after_seconds=20.0, batch_window_seconds=100.0)
    watch = ShareWatch(settings, done={}, started=0.0, checker=checker, source=b.source)
    assert watch.poll(0.0).status == "wait"
    assert watch.poll(3.0).status == "wait"  # whole.tiff is ready; half.tiff holds the batch
    out = watch.poll(21.0)  # half.tiff unchanged for 21 s: its writer is gone
    assert out.status == "ready"
    assert [f["relpath"] for f in out.files] == ["whole.tiff"]
    assert [(f["relpath"], f["why"]) for f in out.incomplete] == [("half.tiff", "3 of 40 pages")]
    assert sorted(seen) == [("half.tiff", None), ("whole.tiff", None)]  # checked once each


def test_failed_copies_are_not_offered_before_their_backoff_ends(share_backend: Backend) -> None:
    b = share_backend
    (b.root / "a.dat").write_bytes(b"1")
    watch = ShareWatch(
        _settings(b.root), done={}, started=0.0, source=b.source, backing_off={"a.dat": 10.0}
    )
    assert watch.poll(0.0).status == "wait"
    assert watch.poll(5.0).status == "wait"
    assert watch.poll(10.0).status == "wait"  # owed again: settles like any file
    assert [f["relpath"] for f in watch.poll(12.0).files] == ["a.dat"]


def test_an_emptied_session_folder_pauses_the_watch_instead_of_idling_out(
    share_backend: Backend,
) -> None:
    """The folder lists empty, then is gone, then comes back empty (a replacement), while the
    ledger has a file from it: offline each time, never "all deleted"; and the idle clock does
    not run while nobody can see the share."""
    b = share_backend
    (b.root / "a.dat").write_bytes(b"1")
    local = (b.root / "a.dat").stat()
    st = b.source.stat("a.dat")
    watch = ShareWatch(
        _settings(b.root, idle_timeout_seconds=5.0),
        done={"a.dat": (st.st_size, st.st_mtime_ns)},
        started=0.0,
        source=b.source,
    )
    assert watch.poll(0.0).status == "wait"
    (b.root / "a.dat").unlink()
    with pytest.raises(ShareOffline, match="lists no files while 1 of its files are in the ledger"):
        watch.poll(1.0)
    shutil.rmtree(b.root)
    with pytest.raises(ShareOffline, match="is gone"):
        watch.poll(6.0)  # past the idle timeout: still no conclusion
    b.root.mkdir()
    with pytest.raises(ShareOffline, match="lists no files"):
        watch.poll(10.0)
    (b.root / "a.dat").write_bytes(b"1")  # the real folder is back, as it was
    os.utime(b.root / "a.dat", ns=(local.st_atime_ns, local.st_mtime_ns))
    out = watch.poll(11.0)
    assert out.status == "wait", out.reason  # the 10 s offline do not count as idle
    assert watch.poll(16.5).status == "ended"  # 6.5 s idle since it came back


def test_the_end_time_ends_a_session_whose_share_is_offline(share_backend: Backend) -> None:
    b = share_backend
    deadline = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    watch = ShareWatch(
        _settings(b.root, deadline=deadline),
        done={"gone.dat": (1, 1)},
        started=0.0,
        source=b.source,
    )
    with pytest.raises(ShareOffline):
        watch.poll(0.0, wall=deadline - timedelta(seconds=1))
    out = watch.poll(1.0, wall=deadline)
    assert out.status == "ended" and "end time" in out.reason


def test_files_proven_whole_skip_the_settle_time_and_nothing_else_does(
    share_backend: Backend,
) -> None:
    """A movie with the session's frame count, or well-formed XML, cannot grow: ready after
    ``whole_settle_seconds`` quiet. A TIFF whose count is not known (more pages may follow), a
    TIFF short of the count (its writer paused) and a file no format check covers sit out
    the whole settle time."""
    import numpy as np

    from cryoflow.processing.engines.synthetic import write_movie_tiff

    b = share_backend
    frames = np.zeros((4, 16, 16), dtype=np.uint8)
    write_movie_tiff(b.root / "m1_fractions.tiff", frames)
    write_movie_tiff(b.root / "m2_fractions.tiff", frames[:3])
    (b.root / "whole.xml").write_text("<Movie><Frames>4</Frames></Movie>")
    (b.root / "notes.dat").write_bytes(b"1")
    settings = _settings(
        b.root, settle_seconds=30.0, whole_settle_seconds=1.5, expected_frames=4,
        batch_window_seconds=0.0, batch_max_files=10,
    )  # fmt: skip
    watch = ShareWatch(settings, done={}, started=0.0, source=b.source)
    assert watch.poll(0.0).status == "wait"
    out = watch.poll(2.0)
    assert out.status == "ready"
    assert [f["relpath"] for f in out.files] == ["m1_fractions.tiff", "whole.xml"]
    # Without a frame count the same whole TIFF waits for the settle time.
    unknown = ShareWatch(
        _settings(b.root, settle_seconds=30.0, whole_settle_seconds=1.5, batch_window_seconds=0.0,
                  batch_max_files=10),
        done={}, started=0.0, source=b.source,
    )  # fmt: skip
    unknown.poll(0.0)
    assert [f["relpath"] for f in unknown.poll(2.0).files] == ["whole.xml"]
    late = unknown.poll(31.0)
    names = {f["relpath"] for f in late.files}
    assert names >= {"notes.dat", "m1_fractions.tiff", "m2_fractions.tiff"}
