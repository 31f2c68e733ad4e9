"""The ledger on SQLite and on the PostgreSQL the deployment uses."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from cryoflow.ledger import FileState, Ledger, StageState

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
    from cryoflow.ledger import _ENGINES

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
    fid, already = ledger.begin_copy(
        sid, "a b/ü.tif", kind="movie", size=10, mtime_ns=5, batch="r1"
    )
    assert not already
    assert ledger.done_files(sid, max_attempts=3) == {}
    ledger.mark_verified(fid, checksum="ab" * 16, dest_path="/gpfs/x", copy_seconds=0.1)
    assert ledger.done_files(sid, 3) == {"a b/ü.tif": (10, 5)}
    assert ledger.begin_copy(sid, "a b/ü.tif", kind="movie", size=10, mtime_ns=5, batch="r2") == (
        fid,
        True,
    )
    # the same path with new content is a new copy of the same row
    fid2, already = ledger.begin_copy(
        sid, "a b/ü.tif", kind="movie", size=11, mtime_ns=6, batch="r3"
    )
    assert (fid2, already) == (fid, False)
    assert ledger.counts(sid) == {"copying": 1}


def test_failures_count_attempts_but_changing_sources_do_not(ledger: Ledger) -> None:
    sid = _open(ledger)
    for _ in range(3):
        fid, _ = ledger.begin_copy(sid, "bad.tif", kind="movie", size=1, mtime_ns=1, batch="r")
        ledger.mark_failed(fid, "Permission denied")
    assert "bad.tif" in ledger.done_files(sid, max_attempts=3)
    for _ in range(5):
        fid, _ = ledger.begin_copy(sid, "slow.tif", kind="movie", size=1, mtime_ns=1, batch="r")
        ledger.release(fid, "still changing")
    assert "slow.tif" not in ledger.done_files(sid, max_attempts=3)
    assert [f.relpath for f in ledger.files(sid, FileState.FAILED)] == ["bad.tif", "slow.tif"]


def test_stage_results_are_recorded_per_file(ledger: Ledger) -> None:
    sid = _open(ledger)
    fid, _ = ledger.begin_copy(sid, "m.tif", kind="movie", size=1, mtime_ns=1, batch="r")
    ledger.record_stage(fid, "ctf", StageState.SUBMITTED, job_id="42", array_index=0)
    ledger.record_stage(fid, "ctf", StageState.DONE, results={"defocus1_A": 12000.5})
    assert ledger.stage_counts(sid) == {"ctf": {"done": 1}}
    (row,) = ledger.stages([fid])
    assert (row.state, row.job_id, row.attempts) == (StageState.DONE, "42", 1)
    assert row.results == {"defocus1_A": 12000.5}
