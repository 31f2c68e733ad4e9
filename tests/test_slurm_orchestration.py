"""Ingest never waits on processing: the clusters' queue held, copying goes on.

MotionCor2's jobs are held in Slurm (`scontrol hold`, partition down: a GPU queue that does
not move) for longer than three batches of a session. The batches go on copying at the
microscope's pace; once the jobs are released, every movie is processed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cryoflow.ledger.store import FileState, Ledger
from tests.airflow_helpers import closed_by, load_dag
from tests.conftest import ROOT
from tests.test_orchestration_e2e import _driver as driver
from tests.test_orchestration_e2e import output

pytestmark = [pytest.mark.slow, pytest.mark.services]


def _slurm(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True).stdout


class _GpuQueueHeld:
    """Holds this test's MotionCor2 jobs (their ids from the ledger) in a gpu partition that
    does not move, until released."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.held: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _GpuQueueHeld:
        _slurm("scontrol", "update", "PartitionName=gpu", "State=DOWN")
        self._thread.start()
        return self

    def _ours(self) -> set[str]:
        try:
            return {st.job_id for st, _ in self.ledger.claimed("krios2", "motioncor") if st.job_id}
        except Exception:  # noqa: BLE001 - the ledger is busy: ask again
            return set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for job in self._ours() - self.held:
                _slurm("scontrol", "hold", job)
                self.held.add(job)
            time.sleep(0.2)

    def pending(self) -> set[str]:
        return set(_slurm("squeue", "-h", "-p", "gpu", "-t", "PD", "-o", "%A").split())

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        _slurm("scontrol", "update", "PartitionName=gpu", "State=UP")
        for job in self.held:
            subprocess.run(["scontrol", "release", job], capture_output=True)

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self.release()


def test_copying_goes_on_while_processing_jobs_are_held(
    airflow_db, slurm_site, experiment_group, tmp_path
) -> None:
    session = "held_queue"
    share = slurm_site["share"] / session
    share.mkdir(parents=True)
    staging = tmp_path / "microscope"
    subprocess.run(
        [sys.executable, "-m", "cryoflow.simulator", "--layout", "serialem", "--out", str(staging),
         "--truth-dir", str(tmp_path / "truth"), "--movies", "5", "--interval", "0",
         "--write-seconds", "0", "--frames", "8", "--size", "256x256", "--pixel-size", "1.0"],
        env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")}, check=True, capture_output=True,
    )  # fmt: skip
    movies = sorted(staging.glob("*_0000?_*.tif"))
    assert len(movies) == 5

    def acquire(movie: Path | None) -> None:
        """The microscope finishes a movie (and its mdoc): it appears complete on the share."""
        names = (
            [movie, movie.with_name(movie.name + ".mdoc")]
            if movie
            else [
                p for p in staging.iterdir() if not any(p.name.startswith(m.name) for m in movies)
            ]
        )
        for path in names:
            os.replace(path, share / path.name)

    conf = {"session_name": session, "unix_group": experiment_group, "pixel_size_A": 1.0,
            "frames": 8, "particle_diameter_A": 40.0, "idle_timeout_minutes": 0.15}  # fmt: skip
    ledger = Ledger(os.environ["CRYOFLOW_LEDGER_URL"])
    ingest = load_dag("session_krios2")
    batches = []
    with _GpuQueueHeld(ledger) as queue:
        # batch 1, then processing starts (its asset event) and submits MotionCor2: held
        acquire(None)
        acquire(movies[0])
        batches.append(ingest.test(run_conf=conf))
        processing = driver("process_krios2", {})
        deadline = time.monotonic() + 120
        while not queue.held:
            assert processing.poll() is None, output(processing)[-3000:]
            assert time.monotonic() < deadline, "processing never submitted MotionCor2"
            time.sleep(0.2)
        # the microscope goes on; so does copying, batch after batch, while the job is held
        for movie in movies[1:]:
            acquire(movie)
            batches.append(ingest.test(run_conf=conf))
            assert not closed_by(batches[-1])
            assert ledger.find_session("krios2", session) is not None
        verified = {f.relpath for f in ledger.files(1, FileState.VERIFIED)}
        assert {m.name for m in movies} <= verified  # all copied while the queue was held
        # The held run hears that the ledger owes more (its trigger looks beside the array) and
        # takes the later batches' movies itself: they do not wait for a run slot; every array
        # it submits is held too.
        deadline = time.monotonic() + 60
        while ledger.stage_counts(1)["motioncor"] != {"submitted": 5}:
            assert processing.poll() is None, output(processing)[-3000:]
            assert time.monotonic() < deadline, ledger.stage_counts(1)
            time.sleep(0.5)
        assert queue.held <= queue.pending(), "the held MotionCor2 jobs should still be pending"
        queue.release()
    assert all(str(b.state) == "success" for b in batches)
    while not closed_by(batches[-1]):
        batches.append(ingest.test(run_conf=conf))
    processing.wait(timeout=300)
    assert "RUN-STATE success" in output(processing), output(processing)[-3000:]
    # what the held run did not take (if anything), later runs do
    process = load_dag("process_krios2")
    for _ in range(6):
        if ledger.owed_count(1, max_attempts=3) == 0:
            break
        assert str(process.test().state) == "success"
    counts = ledger.stage_counts(1)
    assert counts["motioncor"] == {"done": 5} and counts["ctf"] == {"done": 5}, counts
    summary = json.loads(
        next((slurm_site["base"] / "gpfs").rglob("session_summary.json")).read_text()
    )
    assert summary["processing_complete"] is True
    assert summary["processing"] == counts
