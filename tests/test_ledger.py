"""The ledger on SQLite and on the PostgreSQL the deployment uses."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from cryoflow.ledger.store import FileState, Ledger, StageState

PG_ADMIN_URL = os.environ.get(
    "CRYOFLOW_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _postgres_url() -> Iterator[str]:
    name = f"cryoflow_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - report any connection problem the same way
        admin.dispose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required in CI: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    from cryoflow.ledger.store import _ENGINES

    for url in [u for u in _ENGINES if u.endswith(f"/{name}")]:
        _ENGINES.pop(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "sqlite":
        yield Ledger(f"sqlite:///{tmp_path}/ledger.db")
    else:
        yield from (Ledger(url) for url in _postgres_url())


def _open(ledger: Ledger, name: str = "s1") -> int:
    return ledger.open_session(
        "krios1", name, dest_root="/gpfs/2026/s1", source_root="/mnt/k1/s1", params={"a": 1}
    )


def test_session_is_opened_once_and_reopened_after_close(ledger: Ledger) -> None:
    sid = _open(ledger)
    assert _open(ledger) == sid
    ledger.close_session(sid, "idle")
    assert ledger.get_session(sid).state == "closed"
    assert _open(ledger) == sid
    assert ledger.get_session(sid).state == "open"
    assert _open(ledger, "s2") != sid


def test_file_lifecycle_and_idempotence(ledger: Ledger) -> None:
    sid = _open(ledger)
    fid, already, version, _ = ledger.begin_copy(
        sid, "a b/ü.tif", kind="movie", size=10, mtime_ns=5, batch="r1"
    )
    assert not already and version == 1
    assert ledger.done_files(sid, max_attempts=3) == {}
    ledger.mark_verified(fid, checksum="ab" * 16, dest_path="/gpfs/x", copy_seconds=0.1)
    assert ledger.done_files(sid, 3) == {"a b/ü.tif": (10, 5)}
    again = ledger.begin_copy(sid, "a b/ü.tif", kind="movie", size=10, mtime_ns=5, batch="r2")
    assert (again.file_id, again.already) == (fid, True)
    # the same path with new content after verification: a second version, the first is kept
    v2 = ledger.begin_copy(sid, "a b/ü.tif", kind="movie", size=11, mtime_ns=6, batch="r3")
    assert (v2.already, v2.version, v2.replaces) == (False, 2, "/gpfs/x")
    assert v2.file_id != fid
    assert ledger.counts(sid) == {"copying": 1, "verified": 1}
    # while version 2 copies, the watch's cache learns that the relpath is no longer done
    since = datetime.now(UTC) - timedelta(minutes=1)
    assert ledger.done_files(sid, 3, touched_since=since) == {"a b/ü.tif": None}


def test_names_that_are_not_utf8_are_stored_losslessly(ledger: Ledger) -> None:
    sid = _open(ledger)
    names = ["raw\udcff\udcfe.tif", "back\\slash.tif", "new\nline.tif", "x" * 251 + ".tif"]
    for name in names:
        fid = ledger.begin_copy(sid, name, kind="movie", size=1, mtime_ns=1, batch="r").file_id
        ledger.mark_verified(fid, checksum="c", dest_path=f"/gpfs/{name}", copy_seconds=0)
    assert set(ledger.done_files(sid, 3)) == set(names)
    assert {f.dest_path for f in ledger.files(sid)} == {f"/gpfs/{n}" for n in names}


def test_failures_back_off_and_only_permanent_ones_give_up(ledger: Ledger) -> None:
    sid = _open(ledger)
    soon = datetime.now(UTC) + timedelta(minutes=5)
    for _ in range(3):
        fid, *_ = ledger.begin_copy(sid, "bad.tif", kind="movie", size=1, mtime_ns=1, batch="r")
        ledger.mark_failed(fid, "checksum mismatch", transient=False, retry_after=soon)
    for _ in range(4):
        fid, *_ = ledger.begin_copy(sid, "full.tif", kind="movie", size=1, mtime_ns=1, batch="r")
        ledger.mark_failed(fid, "No space left [ENOSPC]", transient=True, retry_after=soon)
    done = ledger.done_files(sid, max_attempts=3)
    assert "bad.tif" in done and "full.tif" not in done  # a transient fault never gives up
    assert set(ledger.backing_off(sid)) == {"bad.tif", "full.tif"}
    assert ledger.backing_off(sid, now=soon + timedelta(seconds=1)) == {}
    for _ in range(5):
        fid, *_ = ledger.begin_copy(sid, "slow.tif", kind="movie", size=1, mtime_ns=1, batch="r")
        ledger.release(fid, "still changing")
    assert "slow.tif" not in ledger.done_files(sid, max_attempts=3)
    failed = [f.relpath for f in ledger.files(sid, FileState.FAILED)]
    assert failed == ["bad.tif", "full.tif", "slow.tif"]
    # a new trigger of the session offers again what waited for a person
    assert ledger.offer_again(sid) == 3
    assert "bad.tif" not in ledger.done_files(sid, max_attempts=3)


def test_incomplete_files_are_done_until_they_change(ledger: Ledger) -> None:
    sid = _open(ledger)
    ledger.mark_incomplete(sid, "m.tif", kind="movie", size=9, mtime_ns=2, reason="3 of 40")
    assert ledger.done_files(sid, 3) == {"m.tif": (9, 2)}
    (row,) = ledger.still_owed(sid)
    assert (row.state, row.error) == (FileState.INCOMPLETE, "3 of 40")
    fid = ledger.begin_copy(sid, "m.tif", kind="movie", size=12, mtime_ns=3, batch="r").file_id
    assert fid == row.id  # the same row, now copying (its writer came back)


def test_stage_results_are_recorded_per_file(ledger: Ledger) -> None:
    sid = _open(ledger)
    fid, *_ = ledger.begin_copy(sid, "m.tif", kind="movie", size=1, mtime_ns=1, batch="r")
    ledger.record_stage(fid, "ctf", StageState.SUBMITTED, job_id="42", array_index=0)
    ledger.record_stage(fid, "ctf", StageState.DONE, results={"defocus1_A": 12000.5})
    assert ledger.stage_counts(sid) == {"ctf": {"done": 1}}
    (row,) = ledger.stages([fid])
    assert (row.state, row.job_id, row.attempts) == (StageState.DONE, "42", 1)
    assert row.results == {"defocus1_A": 12000.5}


def _verified_movies(ledger: Ledger, sid: int, n: int, owe=("motioncor",)) -> list[int]:
    ids = []
    for i in range(n):
        fid, *_ = ledger.begin_copy(sid, f"m{i}.tif", kind="movie", size=1, mtime_ns=1, batch="r")
        ledger.mark_verified(fid, checksum="c", dest_path=f"/g/m{i}.tif", copy_seconds=0, owe=owe)
        ids.append(fid)
    return ids


def test_a_verified_movie_owes_its_steps_until_they_are_done(ledger: Ledger) -> None:
    sid = _open(ledger)
    fids = _verified_movies(ledger, sid, 3)
    assert ledger.stage_counts(sid) == {"motioncor": {"pending": 3}}
    assert ledger.owed_count(sid, max_attempts=3) == 3
    rows = ledger.claim("krios1", "motioncor", "run-a#1", limit=10, max_attempts=3)
    assert [f.id for _, f in rows] == fids
    # claimed rows are not offered again
    assert ledger.claim("krios1", "motioncor", "run-b#1", limit=10, max_attempts=3) == []
    ledger.set_job([st.id for st, _ in rows], "77", "/jobs/77")
    assert [(st.job_id, st.array_index) for st, _ in ledger.claimed("krios1", "motioncor")] == [
        ("77", 0),
        ("77", 1),
        ("77", 2),
    ]
    # done: CTF and picking become owed in the same transaction; a failure stays owed
    ledger.record_stage(fids[0], "motioncor", StageState.DONE, then_owe=["ctf", "picking"])
    ledger.record_stage(fids[1], "motioncor", StageState.FAILED, error="exit 1")
    ledger.release_stage(rows[2][0].id, "never ran")
    counts = ledger.stage_counts(sid)
    assert counts["motioncor"] == {"done": 1, "failed": 1, "pending": 1}
    assert counts["ctf"] == counts["picking"] == {"pending": 1}
    # CTF waits for motion correction: only the movie that has it is offered
    ctf = ledger.claim("krios1", "ctf", "run-c#1", limit=10, max_attempts=3, after="motioncor")
    assert [f.id for _, f in ctf] == [fids[0]]
    # the failed one (1 attempt of 3) and the released one are owed again
    again = ledger.claim("krios1", "motioncor", "run-c#1", limit=10, max_attempts=3)
    assert sorted(f.id for _, f in again) == [fids[1], fids[2]]
    assert {st.attempts for st, _ in again} == {1, 2}  # released: that try did not count


def test_a_retried_run_adopts_its_earlier_trys_running_job(ledger: Ledger) -> None:
    """Airflow retries a run whose try died while its job still runs: the new try takes over
    those claims (and follows the job); claims of another run stay where they are."""
    sid = _open(ledger)
    _verified_movies(ledger, sid, 3)
    mine = ledger.claim("krios1", "motioncor", "run-a#1", limit=2, max_attempts=3)
    other = ledger.claim("krios1", "motioncor", "run-b#1", limit=2, max_attempts=3)
    ledger.set_job([st.id for st, _ in mine], "77", "/jobs/77")
    ids = [st.id for st, _ in mine + other]
    assert ledger.adopt(ids, "run-a#2", was="run-a#1") == 2
    assert len(ledger.claimed("krios1", claimer="run-a#2")) == 2
    assert ledger.claimed("krios1", claimer="run-a#1") == []
    assert [f.id for _, f in ledger.claimed("krios1", claimer="run-b#1")] == [
        f.id for _, f in other
    ]
    assert {st.job_id for st, _ in ledger.claimed("krios1", claimer="run-a#2")} == {"77"}


def test_two_runs_claiming_at_once_never_share_a_movie(ledger: Ledger) -> None:
    import threading

    sid = _open(ledger)
    _verified_movies(ledger, sid, 40)
    taken: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def claim(name: str) -> None:
        try:
            for _ in range(10):
                rows = ledger.claim("krios1", "motioncor", name, limit=3, max_attempts=3)
                taken[name] += [st.id for st, _ in rows]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(n,)) for n in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not set(taken["a"]) & set(taken["b"])
    assert len(taken["a"]) + len(taken["b"]) == 40


def test_star_rows_and_gain_come_from_single_queries(ledger: Ledger) -> None:
    sid = _open(ledger)
    fids = _verified_movies(ledger, sid, 3)
    gain, *_ = ledger.begin_copy(
        sid, "g.gain", kind="gain_reference", size=1, mtime_ns=1, batch="r"
    )
    ledger.mark_verified(gain, checksum="g", dest_path="/g/g.gain", copy_seconds=0)
    for fid in fids[:2]:
        ledger.record_stage(fid, "motioncor", StageState.DONE, results={"aligned": "a"})
    ledger.record_stage(fids[0], "ctf", StageState.DONE, results={"defocus1_A": 1.0})
    assert ledger.ctf_table(sid) == [(fids[0], {"aligned": "a"}, {"defocus1_A": 1.0})]
    assert [f.id for f in ledger.latest_file(sid, "gain_reference")] == [gain]


def test_operator_end_request_and_watch_state_survive_in_the_ledger(ledger: Ledger) -> None:
    sid = _open(ledger)
    assert ledger.end_requested(sid) is None
    assert ledger.request_end(sid, "ended by an operator")
    assert ledger.end_requested(sid) == "ended by an operator"
    ledger.save_watch_state(sid, {"a.tif": [1, 2, 3.5]})
    assert ledger.watch_state(sid) == {"a.tif": [1, 2, 3.5]}
    ledger.close_session(sid, "ended by an operator")
    assert not ledger.request_end(sid, "again")  # closed: nothing to end
    assert [r.id for r in ledger.sessions_to_summarize("krios1")] == [sid]
    ledger.mark_summary_written(sid, final=True)
    assert ledger.sessions_to_summarize("krios1") == []
