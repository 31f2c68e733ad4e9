"""A whole session through Airflow itself (``dag.test()``), with the simulator writing meanwhile.

What a facility relies on: every movie ends up on GPFS with a matching checksum, nothing is copied
while the microscope is still writing it, running the same session again copies nothing, and a
session killed in the middle of a copy and restarted ends complete, without duplicates or partial
files.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cryoflow.config import load_site
from cryoflow.ingest.share.layout import FileKind, Layout, classify
from cryoflow.ingest.share.scan import scan_tree
from cryoflow.ingest.transfer import PARTIAL_SUFFIX, file_checksum
from cryoflow.ledger.store import FileState, Ledger
from tests.airflow_helpers import load_dag, run_session
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _ledger() -> Ledger:
    return Ledger(os.environ["CRYOFLOW_LEDGER_URL"])


def _raw(site_env: dict[str, Path], session: str) -> Path:
    return site_env["gpfs"] / f"{datetime.now().year}" / session / "raw"


def _assert_complete_copy(share: Path, raw: Path, scope: str) -> dict[str, str]:
    """Every file of the share (less the microscope's excludes) is on GPFS with the same content;
    nothing else is there."""
    source = scan_tree(share, load_site().microscopes[scope].share.exclude).files
    assert source
    copied = {p.relative_to(raw).as_posix(): p for p in raw.rglob("*") if p.is_file()}
    assert sorted(copied) == sorted(source)
    sums = {}
    for rel in source:
        sums[rel] = file_checksum(share / rel)
        assert file_checksum(copied[rel]) == sums[rel], rel
    assert not [p for p in raw.rglob(f"*{PARTIAL_SUFFIX}")]
    return sums


def test_session_streams_movies_while_the_microscope_writes(airflow_db, site_env) -> None:
    session = "e2e_stream"
    share = site_env["share"] / "krios1" / session
    dag = load_dag("session_krios1")
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cryoflow.simulator",
            "--layout",
            "epu",
            "--out",
            str(share),
            "--truth-dir",
            str(site_env["root"] / "truth"),
            "--movies",
            "6",
            "--interval",
            "3",
            "--write-seconds",
            "2.0",
            "--frames",
            "8",
            "--size",
            "256x256",
            "--format",
            "tiff",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # processing has its own end-to-end test (test_processing_e2e.py)
    conf = {"session_name": session, "idle_timeout_minutes": 0.1, "motioncor": False, "frames": 8}
    try:
        runs = run_session(dag, conf)
    finally:
        out, err = sim.communicate(timeout=120)
    assert sim.returncode == 0, err

    # streamed: more than one batch ran while the simulator was still writing
    assert len(runs.runs) >= 2
    raw = _raw(site_env, session)
    sums = _assert_complete_copy(share, raw, "krios1")
    movies = [r for r in sums if classify(r, Layout.EPU) == FileKind.MOVIE]
    assert len(movies) == 6

    ledger = _ledger()
    (session_id,) = {r.session_id for r in ledger.files(1)} or {1}
    rows = {r.relpath: r for r in ledger.files(session_id)}
    assert set(rows) == set(sums)
    for rel, row in rows.items():
        assert row.state == FileState.VERIFIED and row.checksum == sums[rel]
        final = (share / rel).stat()
        assert (row.size, row.mtime_ns) == (final.st_size, final.st_mtime_ns)
        # none was copied while being written: the copy began after the file's last write
        assert row.copy_started_at.timestamp() * 1e9 > final.st_mtime_ns, rel
        assert row.kind in {"movie", "movie_metadata", "gain_reference", "other_metadata"}, row.kind
    assert ledger.get_session(session_id).state == "closed"
    assert "idle" in ledger.get_session(session_id).close_reason

    # a second run of the same session copies nothing
    before = {rel: (raw / rel).stat().st_ino for rel in sums}
    again = run_session(dag, conf)
    assert len(again.runs) == 1
    report = again.batch(again.runs[0])
    assert report["copied"] == [] and report["failed"] == []
    assert {rel: (raw / rel).stat().st_ino for rel in sums} == before
    assert ledger.counts(session_id) == {"verified": len(sums)}


DRIVER = textwrap.dedent(
    """
    import sys
    from tests.airflow_helpers import load_dag, run_session
    dag = load_dag("session_krios2")
    run_session(dag, {"session_name": sys.argv[1], "idle_timeout_minutes": 0.05, "frames": 6,
                      "motioncor": False})
    """
)


def _copying_with_partial(db: Path, raw: Path) -> bool:
    try:
        with sqlite3.connect(db, timeout=0.1) as conn:
            n = conn.execute(
                "select count(*) from cryoflow_files where state='copying'"
            ).fetchone()[0]
    except sqlite3.Error:
        return False
    return n > 0 and any(raw.rglob(f"*{PARTIAL_SUFFIX}"))


def test_session_killed_mid_transfer_resumes_without_duplicates(airflow_db, site_env) -> None:
    session = "e2e_killed"
    share = site_env["share"] / "krios2" / session
    share.mkdir(parents=True)
    for i in range(3):  # finished K3 movies, big enough that a copy takes a while
        frames = np.random.default_rng(i).integers(0, 255, (6, 4096, 4096), dtype=np.uint8)
        tifffile.imwrite(share / f"grid1_{i:05d}_Nov24_10.00.0{i}.tif", frames)
        (share / f"grid1_{i:05d}_Nov24_10.00.0{i}.tif.mdoc").write_text(
            f"[FrameSet = 0]\nNumSubFrames = {i}\n"
        )
    raw = _raw(site_env, session)
    db = Path(os.environ["CRYOFLOW_LEDGER_URL"].removeprefix("sqlite:///"))

    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, session],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while not _copying_with_partial(db, raw):
        assert proc.poll() is None, "the session finished before it could be killed"
        assert time.monotonic() < deadline, "no copy in progress was ever seen"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(raw.rglob(f"*{PARTIAL_SUFFIX}")), "the kill should have left a partial file"
    ledger = _ledger()
    (session_row_id,) = {f.session_id for f in ledger.files(1)} or {1}
    assert ledger.counts(session_row_id).get("verified", 0) < 6

    runs = run_session(
        load_dag("session_krios2"),
        {"session_name": session, "idle_timeout_minutes": 0.05, "motioncor": False, "frames": 6},
    )
    assert runs.runs
    sums = _assert_complete_copy(share, raw, "krios2")
    rows = ledger.files(session_row_id)
    assert sorted(r.relpath for r in rows) == sorted(sums)  # one row per file: no duplicates
    assert all(r.state == FileState.VERIFIED for r in rows)
