"""A session processed on a real Slurm cluster over SSH, checked against the simulator's truth.

The simulator writes a SerialEM session whose file names carry shell metacharacters; the DAG copies
the movies, runs MotionCor2, CTFFIND and DoG picker (the built-in engines, installed for the cluster
user as a facility would install them) as job arrays under slurmd, and records every movie's
results in the ledger. The results must agree with the ground truth the simulator wrote.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cryoflow.ingest.share.layout import FileKind
from cryoflow.ledger.store import Ledger, StageState
from tests.airflow_helpers import ROOT, load_dag, run_session

pytestmark = [pytest.mark.slow, pytest.mark.services]

HOSTILE = "grid $(touch pwned_marker) `touch pwned2`"


def _rms_drift_error(estimated: list, truth: list) -> float:
    """RMS distance between two trajectories, whatever their reference frame and sign."""
    est, tru = np.asarray(estimated, float), np.asarray(truth, float)
    best = math.inf
    for sign in (1.0, -1.0):
        d = est - sign * tru
        d -= d.mean(axis=0)
        best = min(best, float(np.sqrt((d**2).sum(axis=1).mean())))
    return best


def _simulate_and_process(
    scope: str, session: str, group: str, cwd: Path, simulator_args: list[str]
) -> Any:
    """Write a session with the simulator, then run it through the microscope's ingest and
    processing DAGs (24 frames, 2 Å/px, as the simulator wrote them); every processing run
    must succeed."""
    subprocess.run(
        [sys.executable, "-m", "cryoflow.simulator", *simulator_args],
        check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")},
        cwd=cwd,
    )  # fmt: skip
    conf = {
        "session_name": session,
        "unix_group": group,
        "pixel_size_A": 2.0,
        "dose_per_frame": 1.0,
        "frames": 24,
        "particle_diameter_A": 150.0,
        "idle_timeout_minutes": 0.05,
    }
    runs = run_session(load_dag(f"session_{scope}"), conf, process=load_dag(f"process_{scope}"))
    assert all(str(r.get_task_instance("process").state) == "success" for r in runs.processing)
    return runs


def test_session_is_processed_on_slurm_and_matches_the_truth(
    airflow_db, slurm_site, experiment_group, tmp_path
) -> None:
    session = "slurm_e2e"
    share = slurm_site["share"] / session
    truth_dir = tmp_path / "truth"
    movie_flags = "--movies 3 --frames 24 --size 1024x1024 --pixel-size 2.0 --dose-per-frame 1.0"
    content = "--content synthetic --particles 40 --contrast 1.0 --ice 0.05 --seed 7"
    runs = _simulate_and_process(
        "krios2", session, experiment_group, tmp_path,
        ["--layout", "serialem", "--out", str(share), "--truth-dir", str(truth_dir),
         *movie_flags.split(), *content.split(), "--session-name", HOSTILE],
    )  # fmt: skip
    # ingest: one task instance per batch run; processing: one per processing run
    assert all(len(r.get_task_instances()) == 1 for r in runs.runs + runs.processing)

    # nothing was injected anywhere: not on the cluster, not on the worker
    for where in (tmp_path, Path("/home/cryo"), slurm_site["base"], ROOT, Path.cwd()):
        assert not list(where.rglob("pwned*")), where

    ledger = Ledger(os.environ["CRYOFLOW_LEDGER_URL"])
    movies = [f for f in ledger.files(1) if f.kind == str(FileKind.MOVIE)]
    assert len(movies) == 3 and all(HOSTILE in f.relpath for f in movies)
    stages = {(s.file_id, s.stage): s for s in ledger.stages([f.id for f in movies])}
    report = []
    for f in movies:
        truth = json.loads((truth_dir / f"{f.relpath}.truth.json").read_text())["truth"]
        mc, ctf, picks = (stages[(f.id, st)] for st in ("motioncor", "ctf", "picking"))
        assert (mc.state, ctf.state, picks.state) == (StageState.DONE,) * 3, (mc.error, ctf.error)
        assert mc.job_id.isdigit() and ctf.job_id.isdigit() and picks.job_id.isdigit()  # Slurm
        assert (mc.attempts, ctf.attempts, picks.attempts) == (1, 1, 1)  # each ran once
        # what SerialEM's mdoc says about the movie is kept beside the results
        acquisition = stages[(f.id, "acquisition")].results
        assert acquisition["pixel_size_A"] == pytest.approx(2.0)
        assert acquisition["n_frames"] == 24
        drift_err = _rms_drift_error(mc.results["shifts_px"], truth["shifts_px"])
        true_df = 0.5 * (truth["ctf"]["defocus1_A"] + truth["ctf"]["defocus2_A"])
        est_df = 0.5 * (ctf.results["defocus1_A"] + ctf.results["defocus2_A"])
        ny, nx = truth["specimen"]["shape"]
        r = 150.0 / 2 / 2.0  # particle radius in px (150 Å at 2 Å/px)
        n_true = sum(  # particles whole inside the frame; pickers skip those cut by the edge
            r <= p["x"] <= nx - r and r <= p["y"] <= ny - r for p in truth["specimen"]["particles"]
        )
        report.append(
            (f.relpath[-30:], drift_err, est_df / true_df - 1, picks.results["particles"], n_true)
        )
        assert drift_err < 0.2, report  # the engines' bars: 0.2 px RMS, 0.5 % defocus
        assert abs(est_df / true_df - 1) < 0.005, report
        assert 0.8 * n_true <= picks.results["particles"] <= 1.25 * n_true, report
    print(report)
    _check_summary_and_star(slurm_site, session, ledger, movies, stages)


def _check_summary_and_star(
    slurm_site: dict, session: str, ledger: Ledger, movies: list, stages: dict
) -> None:
    summary = json.loads(
        (slurm_site["base"] / "gpfs" / f"{datetime.now().year}" / session / "logs"
         / "session_summary.json").read_text()
    )  # fmt: skip
    for stage in ("motioncor", "ctf", "picking", "acquisition"):
        assert summary["processing"][stage] == {"done": 3}, summary
    # rewritten when the last owed step finished: the final counts, equal to the ledger's
    assert summary["processing_complete"] is True and summary["steps_owed"] == 0
    assert summary["processing"] == ledger.stage_counts(1)
    assert summary["files"] == ledger.counts(1)

    # RELION can continue from here: micrographs_ctf_all.star holds every movie with a CTF,
    # micrographs_ctf.star those curation accepted (each movie has its verdict in the ledger)
    year = datetime.now().year
    processed = slurm_site["base"] / "gpfs" / f"{year}" / session / "processed"
    star = processed / "micrographs_ctf_all.star"
    import starfile

    decided = [f for f in ledger.files(1) if f.kind == str(FileKind.MOVIE)]
    assert all(f.accepted is not None and f.decided_at is not None for f in decided), decided
    assert all(f.accepted or f.reject_reason for f in decided)
    accepted = [f for f in decided if f.accepted]
    if accepted:
        kept = starfile.read(processed / "micrographs_ctf.star")["micrographs"]
        assert len(kept) == len(accepted)
    tables = starfile.read(star)
    rows = tables["micrographs"]
    assert list(rows["rlnDefocusU"]) == [
        stages[(f.id, "ctf")].results["defocus1_A"] for f in movies
    ]
    session_root = star.parent.parent
    assert all((session_root / name).is_file() for name in rows["rlnMicrographName"])
    assert float(tables["optics"]["rlnVoltage"].iloc[0]) == 300.0


def test_an_epu_eer_session_is_processed_on_slurm_and_matches_the_truth(
    airflow_db, slurm_site, experiment_group, tmp_path
) -> None:
    """krios1 is EPU + Falcon 4i: EER movies (24 fractions of 16 raw frames each, grouped by the
    -FmIntFile the pipeline writes), an EPU ``.gain``; the built-in engines on Slurm."""
    session = "eer_e2e"
    share = slurm_site["share_krios1"] / session
    truth_dir = tmp_path / "truth"
    movie_flags = "--movies 2 --frames 24 --size 1024x1024 --pixel-size 2.0 --dose-per-frame 1.0"
    content = "--content synthetic --particles 40 --contrast 1.0 --ice 0.05 --seed 11"
    _simulate_and_process(
        "krios1", session, experiment_group, tmp_path,
        ["--layout", "epu", "--out", str(share), "--truth-dir", str(truth_dir),
         *movie_flags.split(), *content.split(), "--format", "eer", "--eer-group", "16",
         "--session-name", session],
    )  # fmt: skip
    ledger = Ledger(os.environ["CRYOFLOW_LEDGER_URL"])
    movies = [f for f in ledger.files(1) if f.kind == str(FileKind.MOVIE)]
    assert len(movies) == 2 and all(f.relpath.endswith(".eer") for f in movies), movies
    stages = {(s.file_id, s.stage): s for s in ledger.stages([f.id for f in movies])}
    report = []
    for f in movies:
        truth = json.loads((truth_dir / f"{f.relpath}.truth.json").read_text())["truth"]
        mc, ctf, picks = (stages[(f.id, st)] for st in ("motioncor", "ctf", "picking"))
        assert (mc.state, ctf.state, picks.state) == (StageState.DONE,) * 3, (mc.error, ctf.error)
        assert mc.job_id.isdigit()  # a Slurm job
        assert len(mc.results["shifts_px"]) == 24  # the fractions, not the 384 raw frames
        drift_err = _rms_drift_error(mc.results["shifts_px"], truth["shifts_px"])
        true_df = 0.5 * (truth["ctf"]["defocus1_A"] + truth["ctf"]["defocus2_A"])
        est_df = 0.5 * (ctf.results["defocus1_A"] + ctf.results["defocus2_A"])
        ny, nx = truth["specimen"]["shape"]
        r = 150.0 / 2 / 2.0
        n_true = sum(
            r <= p["x"] <= nx - r and r <= p["y"] <= ny - r for p in truth["specimen"]["particles"]
        )
        report.append((f.relpath[-30:], drift_err, est_df / true_df - 1,
                       picks.results["particles"], n_true))  # fmt: skip
        assert drift_err < 0.2, report
        assert abs(est_df / true_df - 1) < 0.005, report
        assert 0.8 * n_true <= picks.results["particles"] <= 1.25 * n_true, report
    print(report)
