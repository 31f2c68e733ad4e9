"""The session view's response time for a ledger with 20,000 movies (all steps done).

Fills a SQLite ledger (and a PostgreSQL one when ``CRYOFLOW_BENCH_PG_URL`` names a database it
may fill, e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/cryoflow_bench``) with one session
of N movies acquired at 500/h, each with its EPU XML, and the acquisition, MotionCor2 (40-frame
shift trace), CTFFIND and picking rows that processing writes, in bulk. Then it serves the view's
real FastAPI app (``cryoflow.view.app``) behind Airflow's real authentication (a JWT of the
simple auth manager) and prints, per endpoint, the median of several requests, uncached (the
view's answer cache cleared before each request) and cached, next to a plain
``SELECT count(*)`` of the stage rows and a plain scan of the same rows in the same run.

Run: .venv/bin/python benchmarks/bench_view.py [--movies 20000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from sqlalchemy import func, insert, select, text  # noqa: E402

from cryoflow.ledger.store import (  # noqa: E402
    FileRow,
    FileState,
    SessionRow,
    StageRow,
    StageState,
    get_engine,
)

MOVIES_PER_HOUR = 500
CHUNK = 5000


def _params(name: str) -> dict[str, Any]:
    return {
        "session_name": name, "pixel_size_A": 0.83, "kv": 300.0, "cs_mm": 2.7,
        "amp_contrast": 0.07, "dose_per_frame": 1.0, "frames": 40, "motioncor": True,
        "ctf": True, "picking": True, "particle_diameter_A": 150.0,
        "idle_timeout_minutes": 60.0, "max_hours": 96.0, "collaborators": [],
    }  # fmt: skip


def fill_ledger(
    url: str, movies: int, *, name: str | None = None, dest_base: str = "/gpfs/bench/2026",
    seed: int = 1,
) -> int:  # fmt: skip
    """One closed krios1 session of ``movies`` movies, every step done; returns its id."""
    rng = random.Random(seed)
    engine = get_engine(url)
    name = name or f"bench-{movies}"
    start = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
    step = timedelta(hours=1) / MOVIES_PER_HOUR
    dest = f"{dest_base}/{name}"
    with engine.begin() as c:
        sid = c.execute(
            insert(SessionRow).values(
                microscope="krios1", name=name, dest_root=dest,
                source_root=f"/mnt/krios1/{name}", params=_params(name), state="closed",
                close_reason="idle", opened_at=start, closed_at=start + step * movies,
                summary_final=True,
            )  # fmt: skip
        ).inserted_primary_key[0]
        max_file = c.scalar(select(func.max(FileRow.id))) or 0
        max_stage = c.scalar(select(func.max(StageRow.id))) or 0
    file_id, stage_id = max_file, max_stage
    for lo in range(0, movies, CHUNK):
        files: list[dict[str, Any]] = []
        stages: list[dict[str, Any]] = []
        for i in range(lo, min(movies, lo + CHUNK)):
            acquired = start + step * i
            sq, hole = divmod(i, 300)
            stem = f"FoilHole_{sq * 1000 + hole}_Data_{sq}_{hole}_20261120_{i:06d}"
            rel = f"Images-Disc1/GridSquare_{sq}/Data/{stem}"
            verified = acquired + timedelta(seconds=25)
            common = {"session_id": sid, "version": 1, "state": FileState.VERIFIED,
                      "attempts": 1, "transient": False, "batch": f"{name}__batch_{i // 10}",
                      "checksum": f"{rng.getrandbits(128):032x}", "copy_seconds": 1.5,
                      "ready_at": verified - timedelta(seconds=8),
                      "copy_started_at": verified - timedelta(seconds=3),
                      "verified_at": verified}  # fmt: skip
            mtime = int(acquired.timestamp() * 1e9)
            file_id += 1
            movie_id = file_id
            files.append({**common, "id": movie_id, "relpath": f"{rel}_fractions.tiff",
                          "kind": "movie", "size": 400_000_000, "mtime_ns": mtime,
                          "dest_path": f"{dest}/raw/{rel}_fractions.tiff"})  # fmt: skip
            file_id += 1
            files.append({**common, "id": file_id, "relpath": f"{rel}.xml",
                          "kind": "movie_metadata", "size": 9000, "mtime_ns": mtime,
                          "dest_path": f"{dest}/raw/{rel}.xml"})  # fmt: skip
            drift = abs(rng.gauss(12, 6)) + (rng.random() < 0.03) * 40
            shifts, x, y = [], 0.0, 0.0
            for _ in range(40):
                x, y = x + rng.gauss(0.3, 0.2), y + rng.gauss(0.2, 0.2)
                shifts.append([round(x, 3), round(y, 3)])
            d1 = rng.uniform(8000, 25000)
            astig = abs(rng.gauss(250, 200))
            mc_dir = f"{dest}/processed/motioncor/Images-Disc1/GridSquare_{sq}/Data"
            base = {"file_id": movie_id, "session_id": sid, "microscope": "krios1",
                    "state": StageState.DONE, "attempts": 1, "claimed_at": verified,
                    "job_dir": f"/scratch/jobs/process_krios1/asset_triggered__{i // 200}"}
            per_stage = {
                "acquisition": {"pixel_size_A": 0.83, "dose_per_frame_e_per_A2": 1.0,
                                "frames": 40, "defocus_target_um": -1.6},
                "motioncor": {"total_drift_A": round(drift, 3),
                              "early_drift_A": round(drift * 0.6, 3),
                              "late_drift_A": round(drift * 0.1, 3), "frames": 40,
                              "shifts_px": shifts, "aligned": f"{mc_dir}/{stem}_fractions.mrc"},
                "ctf": {"defocus1_A": round(d1 + astig, 2), "defocus2_A": round(d1, 2),
                        "astigmatism_A": round(astig, 2), "astig_angle_deg": 12.5,
                        "cc": round(rng.uniform(0.05, 0.3), 4),
                        "fit_resolution_A": None if rng.random() < 0.01
                        else round(rng.uniform(2.8, 9.0), 3),
                        "diag": f"{dest}/processed/ctffind/{stem}_fractions_ctf.mrc"},
                "picking": {"particles": max(0, int(rng.gauss(180, 60))),
                            "picks": f"{dest}/processed/picks/{stem}_fractions_DW_dogpicker.star"},
            }  # fmt: skip
            for k, (stage, results) in enumerate(per_stage.items()):
                stage_id += 1
                stages.append({**base, "id": stage_id, "stage": stage, "results": results,
                               "job_id": None if stage == "acquisition" else f"{1000 + i // 200}",
                               "array_index": i % 200,
                               "updated_at": verified + timedelta(seconds=20 + 15 * k),
                               })  # fmt: skip
        with engine.begin() as c:
            c.execute(insert(FileRow), files)
            c.execute(insert(StageRow), stages)
    if engine.dialect.name == "sqlite":
        with engine.begin() as c:
            c.execute(text("ANALYZE"))
    elif engine.dialect.name == "postgresql":
        with engine.begin() as c:
            c.execute(text("ANALYZE cryoflow_files"))
            c.execute(text("ANALYZE cryoflow_stages"))
    return int(sid)


def median_ms(fn: Callable[[], Any], repeat: int, before: Callable[[], Any] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _ledger_reference(url: str, sid: int, repeat: int) -> dict[str, float]:
    """Plain SQL on the same ledger, in the same run: the floor the view is measured against."""
    engine = get_engine(url)
    refs = {
        "SELECT count(*) of the session's stage rows":
            text("SELECT count(*) FROM cryoflow_stages WHERE session_id = :sid"),
        "SELECT count(*) of the session's movies":
            text("SELECT count(*) FROM cryoflow_files WHERE session_id = :sid AND kind = 'movie'"),
        "read every motioncor results JSON of the session":
            text("SELECT results FROM cryoflow_stages WHERE session_id = :sid "
                 "AND stage = 'motioncor'"),
    }  # fmt: skip
    out = {}
    with engine.connect() as c:
        for label, query in refs.items():
            out[label] = median_ms(lambda q=query: c.execute(q, {"sid": sid}).all(), repeat)
    return out


def _airflow_env(home: Path) -> None:
    os.environ.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__API_AUTH__JWT_SECRET": "cryoflow-bench-only-" + "x" * 48,
        "AIRFLOW__API__SECRET_KEY": "cryoflow-bench-only",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "CRYOFLOW_CONFIG_DIR": str(ROOT / "config"),
        "CRYOFLOW_GPFS_ROOT": str(home / "gpfs"),
        "CRYOFLOW_SHARE_ROOT": str(home / "share"),
    })  # fmt: skip


def _thumbnail_source(aligned: Path) -> None:
    """A Falcon-4i-sized aligned sum (4096 x 4096 float32) where the ledger says it is."""
    import mrcfile
    import numpy as np

    aligned.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(0).normal(0, 1, (4096, 4096)).astype(np.float32)
    with mrcfile.new(aligned, overwrite=True) as mrc:
        mrc.set_data(image)


def _serve(label: str, url: str, movies: int, repeat: int, client: object, headers: dict,
           view_cache: Callable[[], None], home: Path) -> None:  # fmt: skip
    name = f"bench-{movies}-{int(time.time())}"
    t = time.perf_counter()
    sid = fill_ledger(url, movies, name=name, dest_base=str(home / "gpfs" / "2026"))
    filled = time.perf_counter() - t
    os.environ["CRYOFLOW_LEDGER_URL"] = url
    base = f"/cryoflow/view/api/sessions/krios1/{name}"
    endpoints = {
        "session page (HTML: counts, rates, 11 SVG plots, tiles, 50 movies)":
            f"/cryoflow/view/sessions/krios1/{name}",
        "counts + rates (JSON)": base,
        "plots: 5 series <= 500 points + 5 histograms (JSON)": f"{base}/plots",
        "latest 50 movies with task-log links (JSON)": f"{base}/movies?limit=50",
        "microscopes with running and recent sessions (JSON)": "/cryoflow/view/api/microscopes",
    }  # fmt: skip
    print(f"\n{label} ({url.split('@')[-1]}): a session of {movies} movies, {movies * 4} stage "
          f"rows, {movies * 2} file rows (filled in {filled:.0f} s)")  # fmt: skip
    for what, ms in _ledger_reference(url, sid, repeat).items():
        print(f"  {ms:8.1f} ms  reference: {what}")
    for what, path in endpoints.items():

        def get(path: str = path) -> int:
            r = client.get(path, headers=headers)  # type: ignore[attr-defined]
            assert r.status_code == 200, (path, r.status_code, r.text[:300])
            return len(r.content)

        size = get()
        cold = median_ms(get, repeat, before=view_cache)
        warm = median_ms(get, repeat)
        print(f"  {cold:8.1f} ms  {what}: uncached; cached {warm:.1f} ms; {size / 1024:.0f} KiB")
    from cryoflow.view.queries import ViewQueries

    q = ViewQueries(url)
    latest = q.movies(sid, limit=1)[0]
    _thumbnail_source(Path(q.movie_outputs(sid, latest["file_id"])["aligned"]))
    path = f"{base}/movies/{latest['file_id']}/micrograph.png"
    t = time.perf_counter()
    r = client.get(path, headers=headers)  # type: ignore[attr-defined]
    first = (time.perf_counter() - t) * 1000
    assert r.status_code == 200, r.text
    cached = median_ms(lambda: client.get(path, headers=headers), repeat)  # type: ignore
    print(f"  {first:8.1f} ms  thumbnail of a 4096 x 4096 aligned sum, made; then served "
          f"from processed/thumbnails/ in {cached:.1f} ms")  # fmt: skip
    if engine_dialect(url) == "postgresql":  # leave the database as it was
        with get_engine(url).begin() as c:
            for table in ("cryoflow_stages", "cryoflow_files", "cryoflow_sessions"):
                key = "id" if table == "cryoflow_sessions" else "session_id"
                c.execute(text(f"DELETE FROM {table} WHERE {key} = :sid"), {"sid": sid})


def engine_dialect(url: str) -> str:
    return get_engine(url).dialect.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--movies", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cryoflow-bench-view-") as tmp:
        home = Path(tmp)
        _airflow_env(home)
        os.environ["CRYOFLOW_LEDGER_URL"] = f"sqlite:///{home}/ledger.db"
        import subprocess

        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True,
                       capture_output=True)  # fmt: skip
        from airflow.api_fastapi.app import create_app, get_auth_manager
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
        from fastapi.testclient import TestClient

        import cryoflow.view.app as view_app

        client = TestClient(create_app())
        jwt = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="bench",
                                                                    role="viewer"))  # fmt: skip
        headers = {"Authorization": f"Bearer {jwt}"}

        def clear() -> None:
            for view in view_app._views.values():
                view.cache.clear()
                view.queries.clear_cache()

        load = os.getloadavg()[0]
        print(f"cryoflow session view, {args.movies} movies, median of {args.repeat} requests "
              f"through Airflow's create_app() (JWT auth) in-process; load average {load:.1f} "
              f"on {os.cpu_count()} CPUs")  # fmt: skip
        _serve("SQLite", f"sqlite:///{home}/ledger.db", args.movies, args.repeat, client,
               headers, clear, home)  # fmt: skip
        pg = os.environ.get("CRYOFLOW_BENCH_PG_URL")
        if pg:
            _serve("PostgreSQL", pg, args.movies, args.repeat, client, headers, clear, home)
        else:
            print("\n(PostgreSQL: set CRYOFLOW_BENCH_PG_URL to a database this may fill)")
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
