"""What the ledger-driven orchestration promises, through the bundle's real DAGs (``dag.test()``).

- a batch whose copy was killed part-way: every movie it verified is still processed;
- a processing run killed mid-way: the next run records what the killed run's job finished and
  processes the rest; no movie twice;
- an operator ends a session while its watch waits, and while a copy runs: both close, with a
  summary whose counts equal the ledger's.

Local compute backend (the embedded defaults); the Slurm variants live in test_slurm_orchestration.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest
import starfile

from cryoflow.ingest.share.scan import scan_tree
from cryoflow.ingest.transfer import PARTIAL_SUFFIX, partial_path
from cryoflow.ledger.store import FileState, Ledger, StageState
from tests.airflow_helpers import closed_by, load_dag, run_session
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

ENGINES = {
    "CRYOFLOW_MOTIONCOR2": str(ROOT / ".venv" / "bin" / "cryoflow-motioncor2"),
    "CRYOFLOW_CTFFIND": str(ROOT / ".venv" / "bin" / "cryoflow-ctffind"),
    "CRYOFLOW_DOGPICKER": str(ROOT / ".venv" / "bin" / "cryoflow-dogpicker"),
}
# Small movies the engines process in seconds; CTF and picking on, like a real session.
FORM = {"pixel_size_A": 1.0, "frames": 8, "particle_diameter_A": 40.0, "idle_timeout_minutes": 0.05}

DRIVER = textwrap.dedent(
    """
    import json, sys
    from tests.airflow_helpers import load_dag, run_session
    dag_id, conf = sys.argv[1], json.loads(sys.argv[2])
    dag = load_dag(dag_id)
    if dag_id.startswith("session_"):
        run_session(dag, conf)
    else:
        run = dag.test(run_conf=conf or None)
        print("RUN-STATE", run.state)
    """
)


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ENGINES.items():
        monkeypatch.setenv(key, value)


def _driver(dag_id: str, conf: dict) -> subprocess.Popen:
    """``dag.test()`` of a DAG in a process of its own (output to a file: a pipe nobody reads
    would block it)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", prefix=f"{dag_id}-", suffix=".log", delete=False) as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, dag_id, json.dumps(conf)],
            cwd=ROOT,
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    proc.log_path = out.name  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _simulate(site_env: dict, session: str, movies: int, **extra: str) -> Path:
    share = site_env["share"] / "krios2" / session
    args = {"movies": str(movies), "interval": "0", "write-seconds": "0", "frames": "8",
            "size": "256x256", "format": "tiff", **extra}  # fmt: skip
    flags = [x for k, v in args.items() for x in (f"--{k}", v)]
    subprocess.run(
        [sys.executable, "-m", "cryoflow.simulator", "--layout", "serialem", "--out", str(share),
         "--truth-dir", str(site_env["root"] / "truth"), *flags],
        check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")},
    )  # fmt: skip
    return share


def _db(site_env: dict) -> Path:
    return Path(os.environ["CRYOFLOW_LEDGER_URL"].removeprefix("sqlite:///"))


def _query(db: Path, sql: str) -> list[tuple]:
    try:
        with sqlite3.connect(db, timeout=0.2) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.Error:
        return []


def _wait_for(what: str, check, proc: subprocess.Popen | None = None, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver ended before {what}: {output(proc)[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _process_until_done(ledger: Ledger, session_id: int, timeout: float = 240) -> list:
    """Processing runs, as ingest's asset events or the schedule would start them (a few
    seconds apart), until nothing is owed."""
    process, done = load_dag("process_krios2"), []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = process.test()
        assert str(run.state) == "success"
        done.append(run)
        if ledger.owed_count(session_id, max_attempts=3) == 0:
            return done
        time.sleep(3)
    raise AssertionError(f"still owed after {len(done)} runs: {ledger.stage_counts(session_id)}")


def _summary(site_env: dict, session: str) -> dict:
    path = site_env["gpfs"] / f"{datetime.now().year}" / session / "logs" / "session_summary.json"
    return json.loads(path.read_text())


def _assert_summary_is_the_ledger(summary: dict, ledger: Ledger, session_id: int) -> None:
    assert summary["files"] == ledger.counts(session_id)
    assert summary["processing"] == ledger.stage_counts(session_id)
    assert summary["steps_owed"] == ledger.owed_count(session_id, max_attempts=3)


def test_movies_of_a_killed_copy_are_still_processed(
    airflow_db, site_env, engines, monkeypatch
) -> None:
    """The copy is killed while a big file is half copied: the movies it had verified were
    recorded as owed at once, so processing takes them although no run ever "reported" them."""
    monkeypatch.setenv("CRYOFLOW_TRANSFER_STREAMS", "1")  # one copy at a time
    session = "kill_copy"
    share = _simulate(site_env, session, movies=4)
    movies = sorted(p.name for p in share.glob("*.tif"))
    # A big file: the kill lands while it is copied.
    big = share / (movies[1].replace(".tif", "") + "_zbig.dat")
    with open(big, "wb") as fh:
        for _ in range(12):
            fh.write(os.urandom(16 << 20))
    raw = site_env["gpfs"] / f"{datetime.now().year}" / session / "raw"
    proc = _driver("session_krios2", {"session_name": session, **FORM})
    _wait_for("the big file's copy", lambda: partial_path(raw / big.name).exists(), proc)
    _kill(proc)
    ledger = Ledger(os.environ["CRYOFLOW_LEDGER_URL"])
    session_id = ledger.find_session("krios2", session).id
    verified = {f.relpath: f for f in ledger.files(session_id, FileState.VERIFIED)}
    verified_movies = [f for f in verified.values() if f.kind == "movie"]
    assert verified_movies, "the movies (small files go first) were verified before the kill"
    assert big.name not in verified, "the kill should land while the big file is copied"

    runs = run_session(load_dag("session_krios2"), {"session_name": session, **FORM})
    assert closed_by(runs.runs[-1])
    _process_until_done(ledger, session_id)
    counts = ledger.stage_counts(session_id)
    assert counts["motioncor"] == {"done": len(movies)}, counts
    assert counts["ctf"] == {"done": len(movies)}, counts
    # curation: every movie got its verdict after its last step; the STAR files split
    decided = [f for f in ledger.files(session_id) if f.kind == "movie"]
    assert all(f.accepted is not None for f in decided), [(f.relpath, f.accepted) for f in decided]
    assert all(f.accepted or f.reject_reason for f in decided)
    processed = site_env["gpfs"] / f"{datetime.now().year}" / session / "processed"
    assert len(starfile.read(processed / "micrographs_ctf_all.star")["micrographs"]) == len(movies)
    if n_accepted := sum(bool(f.accepted) for f in decided):
        kept = starfile.read(processed / "micrographs_ctf.star")["micrographs"]
        assert len(kept) == n_accepted
    assert "low_acceptance" in (ledger.get_session(session_id).curation_alerts or {})
    summary = _summary(site_env, session)
    assert summary["processing_complete"] is True
    _assert_summary_is_the_ledger(summary, ledger, session_id)


def test_killed_processing_run_is_settled_by_the_next_without_doing_anything_twice(
    airflow_db, site_env, engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    # claims older than this whose job ended are a dead run's (600 s in production)
    monkeypatch.setenv("CRYOFLOW_CLAIM_GRACE_SECONDS", "5")
    session = "kill_process"
    _simulate(site_env, session, movies=3)
    runs = run_session(load_dag("session_krios2"), {"session_name": session, **FORM})
    assert closed_by(runs.runs[-1])
    ledger = Ledger(os.environ["CRYOFLOW_LEDGER_URL"])
    session_id = ledger.find_session("krios2", session).id
    assert ledger.stage_counts(session_id)["motioncor"] == {"pending": 3}
    summary = _summary(site_env, session)
    assert summary["processing_complete"] is False and summary["steps_owed"] == 3

    # A processing run submits the MotionCor2 array, defers, and is killed.
    db = _db(site_env)
    proc = _driver("process_krios2", {})
    _wait_for(
        "the motioncor job to be recorded",
        lambda: (
            _query(
                db,
                "select count(*) from cryoflow_stages where stage='motioncor' and state='submitted'"
                " and job_id is not null",
            )
            == [(3,)]
        ),
        proc,
    )
    _kill(proc)
    (killed_job,) = {s.job_id for s in ledger.stages([f.id for f in ledger.files(session_id)])
                     if s.stage == "motioncor"}  # fmt: skip

    _process_until_done(ledger, session_id)
    stages = [s for s in ledger.stages([f.id for f in ledger.files(session_id)])]
    mc = [s for s in stages if s.stage == "motioncor"]
    assert [s.state for s in mc] == [StageState.DONE] * 3
    # the killed run's job did the work; nobody ran MotionCor2 on these movies again
    assert {s.job_id for s in mc} == {killed_job}
    assert [s.attempts for s in mc] == [1, 1, 1]
    assert {(s.stage, s.state) for s in stages if s.stage in ("ctf", "picking")} == {
        ("ctf", StageState.DONE),
        ("picking", StageState.DONE),
    }
    summary = _summary(site_env, session)
    assert summary["processing_complete"] is True
    _assert_summary_is_the_ledger(summary, ledger, session_id)


def _end_session(session: str):
    run = load_dag("end_session_krios2").test(run_conf={"session_name": session})
    assert str(run.state) == "success"
    return run


def test_operator_ends_a_session_while_its_watch_waits(airflow_db, site_env, engines) -> None:
    session = "end_waiting"
    share = _simulate(site_env, session, movies=2)
    n_files = len(scan_tree(share).files)
    form = {"session_name": session, **FORM, "idle_timeout_minutes": 600}
    db = _db(site_env)
    proc = _driver("session_krios2", form)
    # the first batch is copied; the next batch run waits for files that never come
    _wait_for(
        "the first batch and a waiting watch",
        lambda: (
            _query(db, "select count(*) from cryoflow_files where state='verified'") == [(n_files,)]
        ),
        proc,
    )
    time.sleep(3)
    assert proc.poll() is None, "the session should still be waiting (600 min idle timeout)"
    started = time.monotonic()
    _end_session(session)
    proc.wait(timeout=120)
    assert proc.returncode == 0, output(proc)[-3000:]
    assert time.monotonic() - started < 60
    ledger = Ledger(os.environ["CRYOFLOW_LEDGER_URL"])
    row = ledger.find_session("krios2", session)
    assert row.state == "closed" and row.close_reason == "ended by an operator"
    _assert_summary_is_the_ledger(_summary(site_env, session), ledger, row.id)


def test_operator_ends_a_session_while_a_copy_runs(airflow_db, site_env, engines) -> None:
    session = "end_copying"
    share = _simulate(site_env, session, movies=2)
    with open(share / "zz_big.dat", "wb") as fh:  # copied last, slowly
        for _ in range(12):
            fh.write(os.urandom(16 << 20))
    form = {"session_name": session, **FORM, "idle_timeout_minutes": 600}
    db = _db(site_env)
    raw = site_env["gpfs"] / f"{datetime.now().year}" / session / "raw"
    proc = _driver("session_krios2", form)
    _wait_for("the big copy", lambda: partial_path(raw / "zz_big.dat").exists(), proc)
    _end_session(session)
    proc.wait(timeout=120)
    assert proc.returncode == 0, output(proc)[-3000:]
    ledger = Ledger(os.environ["CRYOFLOW_LEDGER_URL"])
    row = ledger.find_session("krios2", session)
    assert row.state == "closed" and row.close_reason == "ended by an operator"
    # the copy that ran was finished (verified), not cut off
    files = ledger.files(row.id)
    assert {f.relpath: f.state for f in files}["zz_big.dat"] == FileState.VERIFIED
    assert not list(raw.rglob(f"*{PARTIAL_SUFFIX}"))
    _assert_summary_is_the_ledger(_summary(site_env, session), ledger, row.id)
    assert _query(db, "select count(*) from cryoflow_files where state='copying'") == [(0,)]


@pytest.fixture
def pg_ledger(monkeypatch: pytest.MonkeyPatch):
    """The ledger on a fresh PostgreSQL database, as deployed (dropped afterwards)."""
    from tests.test_ledger import _postgres_url

    for url in _postgres_url():
        monkeypatch.setenv("CRYOFLOW_LEDGER_URL", url)
        yield url


def test_ledger_outage_during_the_watch_does_not_end_the_session(
    airflow_db, site_env, engines, pg_ledger: str
) -> None:
    """The ledger on PostgreSQL refuses every connection for a while (a database restart or
    failover) while the session waits for the microscope: the watch reports, retries, and the
    session goes on to copy what arrived meanwhile."""
    from sqlalchemy import create_engine, text

    from tests.test_ledger import PG_ADMIN_URL

    url = pg_ledger
    database = url.rsplit("/", 1)[1]
    session = "pg_outage"
    form = {"session_name": session, **FORM, "motioncor": False, "idle_timeout_minutes": 0.2}
    proc = _driver("session_krios2", form)
    ledger = Ledger(url)
    _wait_for("the session to open", lambda: ledger.find_session("krios2", session), proc)
    time.sleep(2)  # the watch polls
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
            {"d": database},
        )
    try:
        share = _simulate(site_env, session, movies=2)  # arrives during the outage
        time.sleep(6)
        assert proc.poll() is None, f"the session ended: {output(proc)[-3000:]}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        admin.dispose()
    proc.wait(timeout=180)
    text_out = output(proc)
    assert proc.returncode == 0, text_out[-3000:]
    assert "Watch of" in text_out and "failed" in text_out  # it was reported
    row = ledger.find_session("krios2", session)
    assert row.state == "closed" and "idle" in row.close_reason
    n_files = len(scan_tree(share).files)
    assert ledger.counts(row.id) == {"verified": n_files}
