"""A movie's mdoc that lands after the movie was processed is still read into the ledger.

SerialEM writes ``<movie>.mdoc`` after the movie; with its own settle and copy it often arrives a
batch later, when the movie's MotionCor2 and CTF were already submitted. The processing side looks
again for recent movies without acquisition metadata whenever CTF or picking results come in and
at the end of each run, until the file is there (bounded to a recent window, so the cost does not
grow with the session).
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cryoflow.config import load_site
from cryoflow.ledger.store import FileRow, Ledger, StageState
from cryoflow.operators.process_owed import METADATA_WINDOW, ProcessOwedOperator
from cryoflow.session import SessionParams
from tests.airflow_helpers import ROOT

MDOC = ROOT / "tests" / "data" / "serialem" / "apoF_g2_00007_Mar14_10.02.31.tif.mdoc"
PARAMS = SessionParams(
    session_name="late", pixel_size_A=0.834, kv=300, cs_mm=2.7, dose_per_frame=1.24, frames=40,
    idle_timeout_minutes=1, max_hours=1,
)  # fmt: skip


@pytest.fixture
def site(tmp_path: Path) -> tuple[Ledger, int, Path]:
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    dest = tmp_path / "gpfs" / "late"
    (dest / "raw").mkdir(parents=True)
    sid = ledger.open_session(
        "krios2", "late", dest_root=str(dest), source_root="/share/late",
        params=PARAMS.model_dump(mode="json"),
    )  # fmt: skip
    return ledger, sid, dest


def _movie(ledger: Ledger, sid: int, dest: Path, name: str) -> int:
    fid = ledger.begin_copy(sid, name, kind="movie", size=1, mtime_ns=1, batch="b").file_id
    (dest / "raw" / name).write_bytes(b"movie")
    ledger.mark_verified(fid, checksum="c", dest_path=str(dest / "raw" / name), copy_seconds=0)
    return fid


def _operator(ledger: Ledger) -> ProcessOwedOperator:
    op = ProcessOwedOperator(task_id="process", microscope_id="krios2")
    op.__dict__.update(site=load_site(ROOT / "config"), ledger=ledger)  # the cached properties
    return op


def _acquisition(ledger: Ledger, fid: int) -> dict[str, Any] | None:
    rows = [s for s in ledger.stages([fid]) if s.stage == "acquisition"]
    return rows[0].results if rows and rows[0].state == StageState.DONE else None


def test_an_mdoc_that_lands_after_its_movie_is_read_by_a_later_look(
    site: tuple[Ledger, int, Path],
) -> None:
    ledger, sid, dest = site
    name = "apoF_g2_00007_Mar14_10.02.31.tif"
    fid = _movie(ledger, sid, dest, name)
    op = _operator(ledger)

    op._catch_up_metadata()  # the movie is processed, its mdoc is not at GPFS yet
    assert _acquisition(ledger, fid) is None
    assert [f.id for f in ledger.recent_movies_without([sid], "acquisition", _an_hour_ago())] == [
        fid
    ]

    shutil.copy(MDOC, dest / "raw" / f"{name}.mdoc")  # the next batch copied it
    op._catch_up_metadata()
    acquisition = _acquisition(ledger, fid)
    assert acquisition is not None and acquisition["pixel_size_A"] == pytest.approx(0.834)
    assert ledger.recent_movies_without([sid], "acquisition", _an_hour_ago()) == []


def test_only_recent_movies_of_the_microscopes_sessions_are_looked_at(
    site: tuple[Ledger, int, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    ledger, sid, dest = site
    names = ["old_00001_Mar14_10.00.00.tif", "new_00002_Mar14_10.40.00.tif"]
    old, new = (_movie(ledger, sid, dest, name) for name in names)
    for name in names:
        shutil.copy(MDOC, dest / "raw" / f"{name}.mdoc")
        # the mdoc's own verified row: a metadata file, never read as a movie
        mdoc = ledger.begin_copy(sid, f"{name}.mdoc", kind="movie_metadata", size=1, mtime_ns=1,
                                 batch="b").file_id  # fmt: skip
        ledger.mark_verified(mdoc, checksum="c", dest_path=str(dest / "raw" / f"{name}.mdoc"),
                             copy_seconds=0)  # fmt: skip
    with ledger._tx() as s:  # copied before the window: no longer looked at
        row = s.get(FileRow, old)
        row.copy_started_at = datetime.now(UTC) - METADATA_WINDOW - timedelta(days=1)
    other_dest = dest.parent / "other"
    (other_dest / "raw").mkdir(parents=True)
    other = ledger.open_session(
        "krios1", "other", dest_root=str(other_dest), source_root="/share/other",
        params=PARAMS.model_dump(mode="json"),
    )  # fmt: skip
    theirs = _movie(ledger, other, other_dest, "other_00003_Mar14_10.41.00.tif")
    shutil.copy(MDOC, other_dest / "raw" / "other_00003_Mar14_10.41.00.tif.mdoc")

    _operator(ledger)._catch_up_metadata()
    assert _acquisition(ledger, new) is not None
    assert _acquisition(ledger, old) is None
    assert _acquisition(ledger, theirs) is None  # another microscope's: not this run's
    assert "not read" not in "".join(capfd.readouterr())  # the mdoc rows were not taken for movies


def test_a_movie_it_cannot_read_is_reported_and_the_others_are_read(
    site: tuple[Ledger, int, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    ledger, sid, dest = site
    broken = ledger.open_session(
        "krios2", "broken", dest_root=str(dest), source_root="/share/broken",
        params={"pixel_size_A": -1},
    )  # a session from an older release whose form no longer validates
    _movie(ledger, broken, dest, "b_00001_Mar14_10.00.00.tif")
    name = "apoF_g2_00007_Mar14_10.02.31.tif"
    fid = _movie(ledger, sid, dest, name)
    shutil.copy(MDOC, dest / "raw" / f"{name}.mdoc")

    _operator(ledger)._catch_up_metadata()
    assert _acquisition(ledger, fid) is not None
    logged = "".join(capfd.readouterr())
    assert "b_00001_Mar14_10.00.00.tif: acquisition metadata not read" in logged


def _an_hour_ago() -> datetime:
    return datetime.now(UTC) - timedelta(hours=1)
