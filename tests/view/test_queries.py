"""The session view's aggregate queries, on a ledger filled through the Ledger API (SQLite, and
the PostgreSQL of the deployment when one is reachable): the counts, rates, series and
histograms equal what was put in."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from cryoflow.ingest.share.layout import Layout
from cryoflow.ledger.store import Ledger, StageState
from cryoflow.view.queries import (
    DEFAULT_THRESHOLDS,
    ViewQueries,
    downsample,
    histogram,
    session_end,
    settling_movies,
    thresholds_for,
)

PG_ADMIN_URL = os.environ.get(
    "CRYOFLOW_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
NOW = datetime.now(UTC)
DRIFT = [4.0, 8.5, 12.0, 16.25, 22.0, 35.0, 41.5, 9.0]  # two beyond the 30 Å default
DEFOCUS_A = [8000, 12000, 15000, 18000, 21000, 24000, 36000, 4000]  # 0.4 and 3.6 µm beyond
ASTIG = [50.0, 120.0, 300.0, 700.0, 1500.0, 90.0, 60.0, 40.0]
FIT = [3.1, 3.9, 4.4, 5.2, 7.5, None, 4.1, 3.3]  # CTFFIND's inf is stored as None
PARTICLES = [150, 220, 5, 180, 310, 0, 95, 140]


def _postgres_url() -> Iterator[str]:
    name = f"cryoflow_view_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - report any connection problem the same way
        admin.dispose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required in CI: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    from cryoflow.ledger.store import _ENGINES
    from cryoflow.view.queries import _READ_ENGINES

    for engines in (_ENGINES, _READ_ENGINES):
        if url in engines:
            engines.pop(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ledger.db"
    else:
        yield from _postgres_url()


def _params(**extra: object) -> dict[str, object]:
    return {"session_name": "s1", "pixel_size_A": 0.83, "particle_diameter_A": 150.0, **extra}


def fill(ledger: Ledger, name: str = "s1", *, movies: int = len(DRIFT), params: dict | None = None,
         minutes_apart: float = 3.0) -> tuple[int, list[int]]:  # fmt: skip
    """A session whose movies were acquired ``minutes_apart`` apart up to now, each copied and
    done with every step (results from the tables above), each with its EPU XML."""
    sid = ledger.open_session(
        "krios1", name, dest_root=f"/gpfs/2026/{name}", source_root=f"/mnt/krios1/{name}",
        params=params or _params(session_name=name),
    )  # fmt: skip
    ids = []
    now = datetime.now(UTC)  # not the module's import time: CI may run this minutes later
    for i in range(movies):
        acquired = now - timedelta(minutes=minutes_apart * (movies - i))
        mtime = int(acquired.timestamp() * 1e9)
        rel = f"Images-Disc1/GridSquare_1/Data/FoilHole_{i}_Data_1_{i}_fractions.tiff"
        claim = ledger.begin_copy(sid, rel, kind="movie", size=100, mtime_ns=mtime, batch="b1")
        ledger.mark_verified(claim.file_id, checksum="ab" * 16, dest_path=f"/gpfs/{rel}",
                             copy_seconds=0.5, owe=["motioncor"], archived=True)  # fmt: skip
        xml = ledger.begin_copy(sid, rel.replace("_fractions.tiff", ".xml"), kind="movie_metadata",
                                size=10, mtime_ns=mtime, batch="b1")  # fmt: skip
        ledger.mark_verified(xml.file_id, checksum="cd" * 16, dest_path="/gpfs/x.xml",
                             copy_seconds=0.1)  # fmt: skip
        j = i % len(DRIFT)
        ledger.record_stage(
            claim.file_id, "motioncor", StageState.DONE, job_id="11", array_index=i,
            results={"total_drift_A": DRIFT[j], "early_drift_A": 1.0, "late_drift_A": 0.5,
                     "frames": 40, "shifts_px": [[0.1 * k, 0.2 * k] for k in range(40)],
                     "aligned": f"/gpfs/2026/{name}/processed/motioncor/m{i}.mrc"},
            then_owe=["ctf", "picking"],
        )  # fmt: skip
        ledger.record_stage(
            claim.file_id, "ctf", StageState.DONE, job_id="12", array_index=i,
            results={"defocus1_A": DEFOCUS_A[j] + ASTIG[j], "defocus2_A": DEFOCUS_A[j],
                     "astigmatism_A": ASTIG[j], "astig_angle_deg": 10.0, "cc": 0.1,
                     "fit_resolution_A": FIT[j], "diag": "/gpfs/d.mrc"},
        )  # fmt: skip
        ledger.record_stage(claim.file_id, "picking", StageState.DONE, job_id="13",
                            array_index=i, results={"particles": PARTICLES[j],
                                                    "picks": "/gpfs/p.star"})  # fmt: skip
        ids.append(claim.file_id)
    return sid, ids


def test_counts_per_step(url: str) -> None:
    ledger = Ledger(url)
    sid, ids = fill(ledger)
    # one more movie: copied, motion correction failed for good (3 tries), nothing downstream
    bad = ledger.begin_copy(sid, "Images-Disc1/x_fractions.tiff", kind="movie", size=1,
                            mtime_ns=int(NOW.timestamp() * 1e9), batch="b2")  # fmt: skip
    ledger.mark_verified(bad.file_id, checksum="ef" * 16, dest_path="/gpfs/x", copy_seconds=1,
                         owe=["motioncor"])  # fmt: skip
    for _ in range(3):
        ledger.record_stage(bad.file_id, "motioncor", StageState.SUBMITTED, job_id="20")
    ledger.record_stage(bad.file_id, "motioncor", StageState.FAILED, error="exit 1")
    # one whose motion correction failed once (retried), one whose CTF is still pending
    retry = ledger.begin_copy(sid, "Images-Disc1/y_fractions.tiff", kind="movie", size=1,
                              mtime_ns=int(NOW.timestamp() * 1e9), batch="b2")  # fmt: skip
    ledger.mark_verified(retry.file_id, checksum="01" * 16, dest_path="/gpfs/y", copy_seconds=1,
                         owe=["motioncor"])  # fmt: skip
    ledger.record_stage(retry.file_id, "motioncor", StageState.SUBMITTED, job_id="21")
    ledger.record_stage(retry.file_id, "motioncor", StageState.FAILED, error="node died")
    pending = ledger.begin_copy(sid, "Images-Disc1/z_fractions.tiff", kind="movie", size=1,
                                mtime_ns=int(NOW.timestamp() * 1e9), batch="b2")  # fmt: skip
    ledger.mark_verified(pending.file_id, checksum="02" * 16, dest_path="/gpfs/z",
                         copy_seconds=1, owe=["motioncor"])  # fmt: skip
    ledger.record_stage(pending.file_id, "motioncor", StageState.DONE, results={},
                        then_owe=["ctf"])  # fmt: skip
    # a copy that fails for good (5 tries, not transient) and one still copying
    gone = ledger.begin_copy(sid, "Images-Disc1/w_fractions.tiff", kind="movie", size=1,
                             mtime_ns=1, batch="b3")  # fmt: skip
    for _ in range(4):
        ledger.begin_copy(sid, "Images-Disc1/w_fractions.tiff", kind="movie", size=1,
                          mtime_ns=1, batch="b3")  # fmt: skip
    ledger.mark_failed(gone.file_id, "checksum differs", transient=False, retry_after=NOW)
    ledger.begin_copy(sid, "Images-Disc1/v_fractions.tiff", kind="movie", size=1, mtime_ns=1,
                      batch="b4")  # fmt: skip

    q = ViewQueries(url)
    c = q.counts(sid, max_attempts=3, transfer_max_attempts=5, settling_movies=2)
    n = len(DRIFT)
    assert c["seen"] == n + 5 + 2 and c["settling"] == 2
    assert c["copied"] == n + 3
    assert c["copying"] == 1 and c["copy_failed"] == 1 and c["copy_failed_retrying"] == 0
    assert c["motion_corrected"] == n + 1 and c["ctf"] == n and c["picked"] == n
    mc = c["stages"]["motioncor"]
    assert (mc["done"], mc["failed"], mc["retrying"], mc["owed"]) == (n + 1, 1, 1, 1)
    assert c["stages"]["ctf"]["pending"] == 1 and c["stages"]["ctf"]["owed"] == 1
    assert c["failed"] == 1 + 1  # the copy out of tries, the motion correction out of tries
    assert c["owed"] == 1 + 2 + 1 + 1  # copying, settling, motioncor retry, ctf pending
    assert c["archived"] == n  # movies whose tags were read back (the xml is not a movie)
    # metadata files are not movies
    assert sum(v for k, v in c.items() if k in ("copied", "copying", "copy_failed")) == n + 5


def test_rates_against_the_acquisition_rate(url: str) -> None:
    ledger = Ledger(url)
    sid, _ = fill(ledger, movies=16, minutes_apart=3.0)  # 48 min of acquisition, 20/h
    q = ViewQueries(url)
    end = datetime.now(UTC) + timedelta(seconds=1)
    r = q.rates(sid, end=end)
    # all 16 acquired within the last hour (mtimes), copied and processed just now
    assert r["per_hour"] == {"acquired": 16.0, "copied": 16.0, "motioncor": 16.0, "ctf": 16.0,
                             "picking": 16.0}  # fmt: skip
    assert sum(r["hourly"]["acquired"]) == 16 and sum(r["hourly"]["picking"]) == 16
    assert len(r["hourly"]["t"]) == len(r["hourly"]["acquired"]) <= 2
    # the session mean: 16 movies over the 48 minutes since the first one (to ``end``)
    assert r["session_per_hour"]["acquired"] == pytest.approx(16 / 0.8, rel=0.05)
    # an hour later nothing happened in the window
    later = q.rates(sid, end=end + timedelta(hours=2))
    assert later["per_hour"]["acquired"] == 0.0 and later["per_hour"]["ctf"] == 0.0


def test_plots_series_and_histograms_equal_the_results(url: str) -> None:
    ledger = Ledger(url)
    sid, _ = fill(ledger)
    q = ViewQueries(url)
    p = q.plots(sid, DEFAULT_THRESHOLDS, points=500, bins=20)
    drift = p["total_drift"]
    assert drift["series"]["mean"] == DRIFT  # fewer movies than points: one point each
    assert drift["series"]["t"] == sorted(drift["series"]["t"])
    assert drift["high"] == 30.0 and drift["low"] is None
    h = drift["histogram"]
    assert h["n"] == len(DRIFT) and sum(h["counts"]) + h["below"] + h["above"] == len(DRIFT)
    assert h["counts"] == list(np.histogram(DRIFT, h["edges"])[0])
    assert h["over_high"] == 2 and h["under_low"] == 0 and h["within"] == 6
    assert h["median"] == pytest.approx(float(np.median(DRIFT)))

    defocus = p["defocus"]
    expected = [(d + a / 2) / 1e4 for d, a in zip(DEFOCUS_A, ASTIG, strict=True)]
    assert defocus["series"]["mean"] == pytest.approx(expected)
    assert (defocus["low"], defocus["high"]) == (0.5, 3.0)
    assert defocus["histogram"]["under_low"] == 1 and defocus["histogram"]["over_high"] == 1

    assert p["astigmatism"]["histogram"]["over_high"] == 1  # 1500 Å > 1000 Å
    fit = p["fit_resolution"]
    assert fit["missing"] == 1 and fit["histogram"]["n"] == len(FIT) - 1
    assert fit["histogram"]["over_high"] == 1  # 7.5 Å > 6 Å
    parts = p["particles"]
    assert parts["series"]["mean"] == [float(x) for x in PARTICLES]
    assert parts["histogram"]["under_low"] == 2  # 5 and 0 < 20
    assert sum(parts["histogram"]["counts"]) == len(PARTICLES)
    edges = parts["histogram"]["edges"]
    assert all(float(e).is_integer() for e in edges)


def test_series_are_downsampled_for_many_movies(url: str) -> None:
    ledger = Ledger(url)
    sid, _ = fill(ledger, movies=64, minutes_apart=0.5)
    q = ViewQueries(url)
    p = q.plots(sid, DEFAULT_THRESHOLDS, points=10)
    s = p["total_drift"]["series"]
    assert len(s["t"]) <= 10 and sum(s["n"]) == 64
    expected = [DRIFT[i % len(DRIFT)] for i in range(64)]
    assert sum(m * n for m, n in zip(s["mean"], s["n"], strict=True)) == pytest.approx(
        sum(expected)
    )
    assert min(s["min"]) == min(DRIFT) and max(s["max"]) == max(DRIFT)


def test_sessions_movies_and_outputs(url: str) -> None:
    ledger = Ledger(url)
    sid, ids = fill(ledger, "s1")
    sid2, ids2 = fill(ledger, "s2", movies=3)
    ledger.close_session(sid2, "idle")
    q = ViewQueries(url)
    listed = q.sessions("krios1")
    assert [s["name"] for s in listed] == ["s1", "s2"]  # running first, then closed
    assert listed[0]["counts"] == {"movies": len(DRIFT), "copied": len(DRIFT), "owed": 0,
                                   "motioncor": len(DRIFT), "ctf": len(DRIFT),
                                   "picking": len(DRIFT)}  # fmt: skip
    assert listed[1]["state"] == "closed" and listed[1]["counts"]["picking"] == 3
    assert q.sessions("krios2") == []

    movies = q.movies(sid, limit=3)
    assert [m["file_id"] for m in movies] == ids[::-1][:3]
    older = q.movies(sid, limit=50, before=movies[-1]["file_id"])
    assert [m["file_id"] for m in older] == ids[::-1][3:]
    mc = movies[0]["stages"]["motioncor"]
    assert mc["state"] == "done" and mc["job_id"] == "11"
    assert mc["results"]["total_drift_A"] == DRIFT[-1] and "shifts_px" not in mc["results"]
    assert set(movies[0]["stages"]) == {"motioncor", "ctf", "picking"}

    out = q.movie_outputs(sid, ids[0])
    assert out["aligned"].endswith("/processed/motioncor/m0.mrc") and out["picks"]
    assert q.movie_outputs(sid2, ids[0]) is None  # another session's movie
    assert q.session("krios1", "s2")["state"] == "closed"
    assert q.session("krios1", "nope") is None


def test_processed_only_lists_motion_corrected_movies(url: str) -> None:
    ledger = Ledger(url)
    sid, ids = fill(ledger, movies=2)
    new = ledger.begin_copy(sid, "Images-Disc1/new_fractions.tiff", kind="movie", size=1,
                            mtime_ns=1, batch="b9")  # fmt: skip
    ledger.mark_verified(new.file_id, checksum="aa" * 16, dest_path="/gpfs/new",
                         copy_seconds=1, owe=["motioncor"])  # fmt: skip
    q = ViewQueries(url)
    assert q.movies(sid, limit=5)[0]["file_id"] == new.file_id
    assert [m["file_id"] for m in q.movies(sid, limit=5, processed_only=True)] == ids[::-1]


def test_thresholds_from_session_params() -> None:
    assert thresholds_for({}) == DEFAULT_THRESHOLDS
    th = thresholds_for({"thresholds": {"max_total_drift_A": 50, "min_particles": "x",
                                        "unknown": 1, "max_defocus_um": float("nan")}})  # fmt: skip
    assert th["max_total_drift_A"] == 50.0
    assert th["min_particles"] == DEFAULT_THRESHOLDS["min_particles"]
    assert th["max_defocus_um"] == DEFAULT_THRESHOLDS["max_defocus_um"] and "unknown" not in th


def test_settling_movies_from_the_watch_state() -> None:
    state = {
        "Images-Disc1/GridSquare_1/Data/FoilHole_1_Data_2_3_fractions.tiff": [10, 1, 2.0],
        "Images-Disc1/GridSquare_1/Data/FoilHole_1_Data_2_3.xml": [10, 1, 2.0],
        "/frames": [40],
    }
    assert settling_movies(state, Layout.EPU) == 1
    assert settling_movies(None, Layout.EPU) == 0


def test_downsample_and_histogram_edges() -> None:
    t = np.arange(1000, dtype=float) * 1000
    v = np.sin(np.arange(1000) / 50.0)
    v[10] = np.nan
    s = downsample(t, v, points=100)
    assert len(s["t"]) == 100 and sum(s["n"]) == 999
    assert all(lo <= m <= hi for lo, m, hi in zip(s["min"], s["mean"], s["max"], strict=True))
    # a few wild outliers do not stretch the bars; they are counted apart
    values = np.concatenate([np.random.default_rng(1).normal(10, 2, 1000), [500.0, 900.0]])
    h = histogram(values, bins=30, high=30.0)
    assert h["edges"][-1] < 100 and h["above"] == 2 and h["over_high"] == 2
    assert sum(h["counts"]) + h["below"] + h["above"] == 1002
    assert histogram(np.array([np.nan]), bins=5)["n"] == 0


def test_session_end_is_the_close_time_of_a_closed_session() -> None:
    closed = {"state": "closed", "closed_at": "2026-11-20T10:00:00+00:00"}
    assert session_end(closed) == datetime(2026, 11, 20, 10, tzinfo=UTC)
    assert session_end({"state": "open", "closed_at": None}, NOW) == NOW


def test_steps_done_after_the_close_still_count_in_the_rates() -> None:
    closed = {
        "state": "closed",
        "closed_at": "2026-11-20T10:00:00+00:00",
        "summary_at": "2026-11-20T10:04:00+00:00",  # the last owed step done 4 min later
    }
    assert session_end(closed) == datetime(2026, 11, 20, 10, 4, tzinfo=UTC)
