"""A session through the deployed stack's executor: CeleryExecutor on Redis and PostgreSQL.

The scheduler, triggerer, dag-processor, api-server and two Celery workers run as separate
processes (tests/celery_stack.py); both workers serve the microscope's share queue
(``microscope-krios1``: the ingest task) and the general queue (``default``: processing), as two
nodes that mount the same share would. The simulator writes an EPU session of small movies and
one large atlas image; the session is started through the REST API. While the atlas is being
copied, the worker running the copy is killed outright (SIGKILL to its process group, as a node
dies). The scheduler notices the dead task by its missing heartbeat, retries it, and the other
worker finishes the session. Afterwards every file on the share is at its destination exactly
once, checksum-equal, the ledger holds one verified row per file, no partial file is left, and
every movie was motion-corrected, CTF-estimated and picked once.

Needs the PostgreSQL and Redis this machine kind runs on loopback; skipped without them, a
failure under CI=true. ~4 min on a quiet 2-core machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pytest
import xxhash

from cryoflow.ingest.share.layout import FileKind
from cryoflow.ledger.store import FileState, Ledger, StageState
from tests.celery_stack import CeleryStack, celery_stack, wait_workers_ready
from tests.conftest import ROOT
from tests.ui_browser import demo_site, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.services]

MICROSCOPE = "krios1"
DAG_ID = f"session_{MICROSCOPE}"
QUEUE = f"microscope-{MICROSCOPE}"
WORKERS = {"worker1": f"{QUEUE},default", "worker2": f"{QUEUE},default"}
MOVIES = 3
FRAMES = 8
PIXEL_SIZE = 2.0
#: the atlas is copied after the small files (>= 4 MiB: the large-file phase); big enough that the
#: copy takes seconds, so the kill lands in the middle of it
ATLAS = "Atlas/Atlas_1.mrc"
ATLAS_SHAPE = (8192, 16384)  # float32: 512 MiB


def _digest(path: Path) -> str:
    h = xxhash.xxh3_128()  # the ledger's algorithm (cryoflow.ingest.transfer.CHECKSUM_ALGORITHM)
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files_under(root: Path, skip: tuple[str, ...] = ()) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and not p.name.lower().endswith(skip)
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryStack]:
    root = tmp_path_factory.mktemp("celery")
    site = demo_site(root)
    with celery_stack(root / "airflow", site, WORKERS) as s:
        s.env["CRYOFLOW_SHARE_ROOT"] = site["CRYOFLOW_SHARE_ROOT"]
        s.env["CRYOFLOW_GPFS_ROOT"] = site["CRYOFLOW_GPFS_ROOT"]
        wait_workers_ready(s, list(WORKERS))
        yield s


def _write_session(share: Path, name: str, truth: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "cryoflow.simulator", "--layout", "epu", "--out", str(share),
         "--truth-dir", str(truth), "--movies", str(MOVIES), "--interval", "0",
         "--write-seconds", "0", "--frames", str(FRAMES), "--size", "512x512",
         "--pixel-size", str(PIXEL_SIZE), "--dose-per-frame", "1.0", "--format", "tiff",
         "--content", "synthetic", "--particles", "15", "--contrast", "1.0", "--seed", "5",
         "--session-name", name],
        check=True, capture_output=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")},
    )  # fmt: skip
    atlas = share / ATLAS
    atlas.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    with mrcfile.new(atlas) as mrc:
        mrc.set_data(rng.standard_normal(ATLAS_SHAPE, dtype=np.float32))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in "ZX"


def _ingest_instances(api: Any) -> list[dict[str, Any]]:
    """Every try of the ingest task in every run of the session DAG (newest runs last)."""
    runs = api.get(f"/dags/{DAG_ID}/dagRuns", params={"order_by": "run_after"}).json()
    out = []
    for run in runs["dag_runs"]:
        tis = api.get(f"/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances").json()
        out.extend(tis["task_instances"])
    return out


def test_a_worker_killed_mid_copy_loses_and_duplicates_nothing(
    stack: CeleryStack, tmp_path: Path
) -> None:
    share_root = Path(stack.env["CRYOFLOW_SHARE_ROOT"])
    gpfs_root = Path(stack.env["CRYOFLOW_GPFS_ROOT"])
    name = f"celery_{time.strftime('%Y%m%d_%H%M%S')}"
    share = share_root / MICROSCOPE / name
    _write_session(share, name, tmp_path / "truth")
    # krios1.yaml excludes EPU's thumbnails (*.jpg, *.jpeg): everything else is owed to GPFS
    on_share = {rel: _digest(p) for rel, p in _files_under(share, (".jpg", ".jpeg")).items()}
    conf = {
        "session_name": name,
        "project": "celery-e2e",
        "sample": "simulated particles",
        "pixel_size_A": PIXEL_SIZE,
        "frames": FRAMES,
        "dose_per_frame": 1.0,
        "idle_timeout_minutes": 0.5,
    }
    ledger = Ledger(stack.ledger_url)
    context = f"(component logs: {stack.airflow.home}/*.log, task logs: {stack.airflow.home}/logs)"
    with stack.airflow.api() as api:
        wait_for(
            f"{DAG_ID} in the API {context}",
            lambda: api.get(f"/dags/{DAG_ID}").status_code == 200,
            180,
            interval=1,
        )
        api.patch(f"/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()
        api.post(
            f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf}
        ).raise_for_status()

        # the atlas is on its way to GPFS: kill the worker that copies it
        def copying() -> tuple[Any, dict[str, Any], list[Path]] | None:
            partials = list(gpfs_root.rglob("*.cryoflow-partial"))
            if not partials:
                return None
            running = [ti for ti in _ingest_instances(api) if ti["state"] == "running"]
            for ti in running:
                worker = stack.worker_running(ti["pid"]) if ti.get("pid") else None
                if worker is not None:
                    return worker, ti, partials
            return None

        worker, killed_ti, partials = wait_for(
            f"the atlas copy to start {context}", copying, 240, interval=0.05
        )
        assert killed_ti["queue"] == QUEUE, killed_ti
        task_pids = worker.group()
        worker.kill()
        assert not worker.alive()
        # the task process too (it has a process group of its own); SIGKILL lands once a
        # process leaves the disk write it is in
        wait_for(
            f"every process of the killed worker to end {task_pids}",
            lambda: not [pid for pid in task_pids if _alive(pid)],
            15,
            interval=0.1,
        )
        survivor = next(c for n, c in stack.components.items() if n in WORKERS and c is not worker)
        assert survivor.alive()
        session = wait_for("the session row", lambda: ledger.find_session(MICROSCOPE, name), 30)
        verified_before = {
            f.relpath for f in ledger.files(session.id) if f.state == FileState.VERIFIED
        }
        assert ATLAS not in verified_before  # the kill came before the atlas was verified

        # the session closes by its idle timeout; every movie gets its three steps
        def finished() -> dict[str, Any] | None:
            row = ledger.find_session(MICROSCOPE, name)
            if row is None or row.state != "closed":
                return None
            stages = ledger.stage_counts(row.id)
            done = {st: stages.get(st, {}).get(str(StageState.DONE), 0) for st in stages}
            if any(done.get(st, 0) < MOVIES for st in ("motioncor", "ctf", "picking")):
                return None
            return {"row": row, "stages": stages}

        result = wait_for(
            f"the session to close with {MOVIES} movies processed {context}",
            finished,
            480,
            interval=2,
        )
        tries = [
            ti
            for ti in _ingest_instances(api)
            if ti["dag_run_id"] == killed_ti["dag_run_id"] and ti["task_id"] == "watch_and_copy"
        ]

    # the killed try failed by its heartbeat and a later try on the other worker succeeded
    brief = [{k: ti.get(k) for k in ("try_number", "state", "pid", "start_date", "end_date")}
             for ti in (*tries, killed_ti)]  # fmt: skip
    assert tries and tries[-1]["state"] == "success", brief
    assert tries[-1]["try_number"] > killed_ti["try_number"], (brief, stack.logs())
    assert not survivor.log.read_text(errors="replace").count("Traceback (most recent call"), (
        survivor.log.read_text(errors="replace")[-3000:]
    )

    # nothing lost, nothing duplicated, nothing half-written
    row = result["row"]
    files = ledger.files(row.id)
    assert sorted(f.relpath for f in files) == sorted(on_share), "one ledger row per file"
    assert all(f.state == FileState.VERIFIED and f.version == 1 for f in files), [
        (f.relpath, f.state, f.version, f.error) for f in files
    ]
    raw = Path(row.dest_root) / "raw"
    at_dest = _files_under(raw)
    assert sorted(at_dest) == sorted(on_share), set(at_dest) ^ set(on_share)
    assert {rel: _digest(p) for rel, p in at_dest.items()} == on_share
    assert {f.relpath: f.checksum for f in files} == on_share
    assert not list(gpfs_root.rglob("*.cryoflow-partial")), "a partial file was left behind"
    for p in partials:  # the killed copy's partial was replaced, not kept beside the file
        assert not p.exists()

    # each movie processed once: one row per step, done
    movies = [f for f in files if f.kind == str(FileKind.MOVIE)]
    assert len(movies) == MOVIES
    steps = ledger.stages(f.id for f in movies)
    for stage in ("motioncor", "ctf", "picking"):
        rows = [s for s in steps if s.stage == stage]
        assert len(rows) == MOVIES and all(s.state == StageState.DONE for s in rows), (
            stage,
            [(s.file_id, s.state) for s in rows],
        )
