"""Outputs under a session's processed/ (and the job's own files) get the facility's modes.

A real job script, run by the real local backend, runs the built-in MotionCor2, CTFFIND and
picker engines plus a shell "tool" while this process has umask 022 (which would make 0644
files and 0755 folders): every file must end 0640, every folder 2770, with the session's group.
"""

from __future__ import annotations

import grp
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cryoflow.ingest.session_tree import SessionPaths, create_session_tree
from cryoflow.processing.compute import jobscript
from cryoflow.processing.compute.jobscript import (
    JobLayout,
    SubmittedJob,
    TaskStatus,
    build_array_script,
)
from cryoflow.processing.compute.local import LocalCompute
from cryoflow.processing.compute.settings import LocalBackend
from cryoflow.processing.engines import imageio
from cryoflow.processing.engines import synthetic as syn
from cryoflow.processing.engines.ctf_model import CTFParams
from cryoflow.processing.engines.imageio import atomic_path, write_mrc
from cryoflow.processing.tools import ctffind as ctffind_tool
from cryoflow.processing.tools import dogpicker as dogpicker_tool
from cryoflow.processing.tools import motioncor2 as motioncor_tool

FILE_MODE, DIR_MODE = 0o640, 0o2770
BIN = Path(sys.executable).parent


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _other_gid() -> int | None:
    """A group other than ours, to see that outputs take the session's (root only)."""
    if os.geteuid() != 0:
        return None
    return next((g.gr_gid for g in grp.getgrall() if g.gr_gid != os.getgid()), None)


def _wait(client: LocalCompute, job: SubmittedJob, timeout_s: float = 180) -> list[TaskStatus]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        statuses = client.poll([job])[job.job_id]
        if all(s.terminal for s in statuses):
            return statuses
        time.sleep(0.2)
    raise AssertionError(f"job {job.job_id} still running after {timeout_s}s")


def _wrong_modes(root: Path, gid: int | None = None) -> list[str]:
    """Every file not FILE_MODE, folder not DIR_MODE, or entry not of group ``gid``, below root."""
    wrong = []
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        want = DIR_MODE if stat.S_ISDIR(st.st_mode) else FILE_MODE
        if stat.S_IMODE(st.st_mode) != want:
            wrong.append(f"{path.relative_to(root)}: {stat.S_IMODE(st.st_mode):04o}")
        if gid is not None and st.st_gid != gid:
            wrong.append(f"{path.relative_to(root)}: group {st.st_gid}, not {gid}")
        if st.st_mode & 0o007:
            wrong.append(f"{path.relative_to(root)}: world access")
    return wrong


def test_a_real_job_leaves_every_output_with_the_facility_modes(
    tmp_path: Path, umask_022: None
) -> None:
    session = SessionPaths.for_session(tmp_path / "gpfs", 2026, "20260101_krios1_demo")
    gid = _other_gid()
    create_session_tree(session, gid=gid, dir_mode=DIR_MODE, collaborators=[], acl="off")
    # Inputs, as the transfer would have copied them (not under test here).
    rng = np.random.default_rng(7)
    movie = session.raw / "movie.tif"
    image = syn.apply_ctf(
        rng.standard_normal((256, 256)).astype(np.float32), 1.0, CTFParams(15000.0, 14000.0)
    )
    frames, _ = syn.make_movie(0.3 * image, n_frames=6, dose_per_frame=2.0, rng=rng)
    syn.write_movie_tiff(movie, frames)
    mic = session.raw / "mic.mrc"
    write_mrc(mic, rng.poisson(40.0 * (1 + 0.1 * image)).astype(np.float32), 1.0)
    # A folder made before the job (as processing.py does) for a tool that writes into it.
    ext = session.processed / "external"
    ext.mkdir()
    os.chmod(ext, DIR_MODE)

    mc_dir = session.processed / "motioncor" / "sq 1"  # all new: the engines make them
    mc = motioncor_tool.MotionCor2Params(
        movie=movie, out_mrc=mc_dir / "movie.mrc", pixel_size_A=1.0, log_dir=mc_dir / "logs"
    )
    ctf = ctffind_tool.CtffindParams(
        input_path=mic,
        diag_path=session.processed / "ctffind" / "mic_ctf.mrc",
        pixel_size_A=1.0,
        max_res_A=5.0,
    )
    picks = session.processed / "picks"
    picker = dogpicker_tool.DogPickerParams(diameter_A=40.0, pixel_size_A=1.0)
    tasks = [
        motioncor_tool.build_command(mc, str(BIN / "cryoflow-motioncor2")),
        ctffind_tool.build_command(BIN / "cryoflow-ctffind"),
        dogpicker_tool.build_command(picker, BIN / "cryoflow-dogpicker", mic, picks),
        ["sh", "-c", 'printf x >"$1" && echo done', "sh", str(ext / "out $(x).txt")],
    ]
    stdin = [None, ctffind_tool.stdin_answers(ctf, "4"), None, None]
    layout = JobLayout(str(tmp_path / "jobs" / "dag" / "run" / "motioncor-try1"))
    script = build_array_script(
        step="outputs",
        tasks=tasks,
        layout=layout,
        stdin=stdin,
        env={"LC_ALL": "C"},
        file_mode=FILE_MODE,
        dir_mode=DIR_MODE,
    )
    client = LocalCompute(LocalBackend(workdir=str(tmp_path / "jobs"), max_parallel=4))
    job = client.submit(script, layout, len(tasks))

    statuses = _wait(client, job)

    logs = client.fetch_logs(job, range(len(tasks)), 2000)
    assert [s.state for s in statuses] == ["COMPLETED"] * len(tasks), logs
    written = {p.relative_to(session.processed).as_posix() for p in session.processed.rglob("*")}
    assert {
        "motioncor/sq 1/movie.mrc",
        "motioncor/sq 1/movie_preview.png",
        "ctffind/mic_ctf.mrc",
        "ctffind/mic_ctf.txt",
        "ctffind/mic_ctf.png",
        "picks/mic_dogpicker.star",
        "picks/mic_dogpicker.jpg",
        "external/out $(x).txt",
    } <= written, sorted(written)
    assert any(p.startswith("motioncor/sq 1/logs/") for p in written), sorted(written)
    assert _wrong_modes(session.processed, gid or session.processed.stat().st_gid) == []
    assert _wrong_modes(tmp_path / "jobs") == []  # job script, runner files, task logs


def test_the_engines_apply_the_modes_a_job_exports(
    tmp_path: Path, umask_022: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(jobscript.FILE_MODE_ENV, "0640")
    monkeypatch.setenv(jobscript.DIR_MODE_ENV, "2770")
    target = tmp_path / "out" / "a" / "b.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("x")
    assert _wrong_modes(tmp_path / "out") == []
    # A read-only file mode still lets the engine write the file first.
    monkeypatch.setenv(jobscript.FILE_MODE_ENV, "0440")
    with atomic_path(tmp_path / "out" / "ro.txt") as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE((tmp_path / "out" / "ro.txt").stat().st_mode) == 0o440
    # Run by hand (no job): the usual modes, the umask's business.
    monkeypatch.delenv(jobscript.FILE_MODE_ENV)
    monkeypatch.delenv(jobscript.DIR_MODE_ENV)
    with atomic_path(tmp_path / "hand" / "c.txt") as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE((tmp_path / "hand").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "hand" / "c.txt").stat().st_mode) == 0o644


def test_a_garbled_mode_in_the_environment_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(jobscript.FILE_MODE_ENV, "rw-r-----")
    with (
        pytest.raises(ValueError, match="CRYOFLOW_FILE_MODE='rw-r-----'"),
        atomic_path(tmp_path / "x.txt") as tmp,
    ):
        tmp.write_text("x")
    assert list(tmp_path.iterdir()) == []


def test_engine_and_job_script_agree_on_the_variable_names() -> None:
    assert (imageio.FILE_MODE_ENV, imageio.DIR_MODE_ENV) == (
        jobscript.FILE_MODE_ENV,
        jobscript.DIR_MODE_ENV,
    )
