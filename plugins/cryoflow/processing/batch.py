"""Pre-processing of a batch: the per-movie commands of each step, and what their outputs say.

For each step (MotionCor2, CTFFIND, DoG picker) ``plan_*`` turns a batch's verified movies into one
argument list per movie (a job-array task) and ``record_*`` reads the tools' output files after the
array ended, storing per-movie results (or the reason for a failure) in the ledger. The same code
serves the real binaries and the built-in engines: only the binary named in config differs.
No Airflow here. pandas/starfile, mrcfile and tifffile are imported where they are used: every
task start parses the DAG file, which loads this module, and they cost 1-2 s there.
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from cryoflow.config import FacilityConfig
from cryoflow.ingest.share.layout import FileKind, Layout, metadata_for_movie
from cryoflow.ingest.share.metadata import MetadataError, read_movie_metadata
from cryoflow.ingest.transfer import make_dirs
from cryoflow.ledger.store import Ledger, StageState
from cryoflow.names import portable
from cryoflow.processing.steps import downstream
from cryoflow.processing.tools import ctffind as ctffind_tool
from cryoflow.processing.tools import dogpicker as dogpicker_tool
from cryoflow.processing.tools import motioncor2 as motioncor_tool
from cryoflow.session import SessionHandle, SessionParams


@dataclass(frozen=True)
class MoviePaths:
    """Where a movie's processing outputs go under ``<session>/processed``."""

    file_id: int
    relpath: str
    movie: Path
    aligned: Path  # MotionCor2 sum (not dose-weighted: for CTF)
    aligned_dw: Path  # dose-weighted sum (for picking and display)
    mc_log_dir: Path
    ctf_diag: Path
    picks_dir: Path

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoviePaths:
        return cls(**{k: Path(v) if k not in ("file_id", "relpath") else v for k, v in d.items()})


def movie_paths(handle: SessionHandle, file_id: int, relpath: str, dest: str) -> MoviePaths:
    rel = PurePosixPath(portable(relpath))
    # The copy's name, not the source's: a second version (name.v2.tiff) gets its own outputs.
    name = portable(PurePosixPath(dest).name) if dest else rel.name
    stem = PurePosixPath(name).stem  # SerialEM names hold dots: cut the extension only
    sub = rel.parent.as_posix()
    processed = Path(handle.dest_root) / "processed"
    mc = processed / "motioncor" / sub
    return MoviePaths(
        file_id=file_id,
        relpath=relpath,
        movie=Path(dest),
        aligned=mc / f"{stem}.mrc",
        aligned_dw=mc / f"{stem}_DW.mrc",
        mc_log_dir=mc / "logs",
        ctf_diag=processed / "ctffind" / sub / f"{stem}_ctf.mrc",
        picks_dir=processed / "picks" / sub,
    )


def _dirs(paths: list[Path], mode: int) -> None:
    for p in paths:
        make_dirs(p, mode)


# ----------------------------------------------------------------------------- metadata


def record_acquisition(
    ledger: Ledger,
    handle: SessionHandle,
    movies: list[MoviePaths],
    layout: Layout,
    params: SessionParams,
) -> list[str]:
    """Store what EPU's XML / SerialEM's mdoc says about each movie; return disagreements with
    the session form (a wrong pixel size or dose would silently spoil every result)."""
    raw = Path(handle.dest_root) / "raw"
    warnings = []
    for m in movies:
        found = [
            raw / rel for rel in metadata_for_movie(m.relpath, layout) if (raw / rel).is_file()
        ]
        if not found:
            continue
        try:
            meta = read_movie_metadata(found[0])
        except (MetadataError, OSError) as exc:
            warnings.append(f"{m.relpath}: metadata unreadable: {exc}")
            continue
        ledger.record_stage(
            m.file_id, "acquisition", StageState.DONE, results=meta.model_dump(mode="json")
        )
        for name, stated, form in (
            ("pixel size", meta.pixel_size_A, params.pixel_size_A),
            ("dose per frame", meta.dose_per_frame_e_per_A2, params.dose_per_frame),
        ):
            if stated and abs(stated / form - 1) > 0.02:
                warnings.append(
                    f"{m.relpath}: {found[0].name} states {name} {stated:g}, the session form "
                    f"{form:g}; processing uses the form's value"
                )
    return warnings


# ----------------------------------------------------------------------------- MotionCor2


def gain_reference(
    ledger: Ledger,
    handle: SessionHandle,
    params: SessionParams,
    dir_mode: int,
    file_mode: int = 0o640,
) -> Path | None:
    """The session's newest verified gain reference on GPFS, matching the form's pattern if set.

    MotionCor2 reads MRC gains; EPU's EER ``.gain`` files are TIFF, so those are converted once
    to ``processed/gain/<name>.mrc``.
    """
    gains = [
        f
        for f in ledger.latest_file(handle.session_id, str(FileKind.GAIN_REFERENCE))
        if not params.gain_reference
        or fnmatch.fnmatch(PurePosixPath(f.relpath).name, params.gain_reference)
    ]
    if not gains:
        return None
    gain = Path(max(gains, key=lambda f: f.id).dest_path)
    if gain.suffix.lower() not in (".gain", ".tif", ".tiff"):
        return gain
    out = Path(handle.dest_root) / "processed" / "gain" / f"{gain.stem}.mrc"
    if not out.exists():
        import mrcfile
        import tifffile

        make_dirs(out.parent, dir_mode)
        tmp = out.with_name(f".{out.name}.tmp")
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(tifffile.imread(gain).astype(np.float32))
        os.chmod(tmp, file_mode)
        os.replace(tmp, out)
    return out


def plan_motioncor(
    facility: FacilityConfig,
    params: SessionParams,
    handle: SessionHandle,
    movies: list[MoviePaths],
    gain: Path | None,
) -> list[list[str]]:
    step = facility.software["motioncor2"]
    dir_mode = facility.permissions.dir_mode
    _dirs([p for m in movies for p in (m.aligned.parent, m.mc_log_dir)], dir_mode)
    tasks = []
    for m in movies:
        fm_int = None
        if m.movie.suffix.lower() == ".eer":
            fm_int = _eer_fractions_file(m, params, facility.permissions.file_mode)
        p = motioncor_tool.MotionCor2Params(
            movie=m.movie,
            out_mrc=m.aligned,
            pixel_size_A=params.pixel_size_A,
            gain=gain,
            kv=params.kv,
            fm_dose_e_per_A2=params.dose_per_frame,
            patch=(5, 5) if max(_frame_shape(m.movie) or (0, 0)) >= 3000 else None,
            fm_int_file=fm_int,
            log_dir=m.mc_log_dir,
        )
        tasks.append(motioncor_tool.build_command(p, step.binary))
    return tasks


def _frame_shape(movie: Path) -> tuple[int, int] | None:
    import mrcfile
    import tifffile

    try:
        if movie.suffix.lower() in (".tif", ".tiff", ".eer"):
            with tifffile.TiffFile(movie) as tif:
                return tuple(tif.pages[0].shape[:2])  # type: ignore[return-value]
        with mrcfile.mmap(movie, permissive=True) as mrc:
            return tuple(mrc.data.shape[-2:])  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - unreadable here: MotionCor2 will name the problem
        return None


def _eer_fractions_file(m: MoviePaths, params: SessionParams, file_mode: int) -> Path:
    """-FmIntFile grouping the EER's raw frames into the form's number of fractions."""
    import tifffile

    with tifffile.TiffFile(m.movie) as tif:
        n_raw = len(tif.pages)
    group = max(1, n_raw // params.frames)
    dose_raw = params.dose_per_frame * params.frames / n_raw
    path = m.mc_log_dir / f"{m.aligned.stem}_fmint.txt"
    _replace(path, motioncor_tool.fm_int_file_text(n_raw, group, dose_raw), file_mode)
    return path


# ----------------------------------------------------------------------------- CTFFIND


def ctffind_version(facility: FacilityConfig) -> str:
    version = facility.software["ctffind"].version or "4"
    return "5" if version.startswith("5") else "4"


def plan_ctffind(
    facility: FacilityConfig, params: SessionParams, movies: list[MoviePaths]
) -> tuple[list[list[str]], list[str]]:
    step = facility.software["ctffind"]
    _dirs([m.ctf_diag.parent for m in movies], facility.permissions.dir_mode)
    version = ctffind_version(facility)
    tasks, stdin = [], []
    for m in movies:
        p = ctffind_tool.CtffindParams(
            input_path=m.aligned,
            diag_path=m.ctf_diag,
            pixel_size_A=params.pixel_size_A,
            voltage_kV=params.kv,
            cs_mm=params.cs_mm,
            amplitude_contrast=params.amp_contrast,
            max_res_A=max(5.0, 2.2 * params.pixel_size_A),
            min_defocus_A=3000.0,
            max_defocus_A=40000.0,
        )
        tasks.append(ctffind_tool.build_command(step.binary))
        stdin.append(ctffind_tool.stdin_answers(p, version))  # type: ignore[arg-type]
    return tasks, stdin


# ----------------------------------------------------------------------------- DoG picker


def picker_params(params: SessionParams) -> dogpicker_tool.DogPickerParams:
    return dogpicker_tool.DogPickerParams(
        diameter_A=params.particle_diameter_A, pixel_size_A=params.pixel_size_A
    )


def plan_dogpicker(
    facility: FacilityConfig, params: SessionParams, movies: list[MoviePaths]
) -> list[list[str]]:
    step = facility.software["dogpicker"]
    _dirs([m.picks_dir for m in movies], facility.permissions.dir_mode)
    picker = picker_params(params)
    return [
        dogpicker_tool.build_command(picker, step.binary, m.aligned_dw, m.picks_dir) for m in movies
    ]


# ----------------------------------------------------------------------------- results


def _failed(ledger: Ledger, m: MoviePaths, stage: str, job: dict | None, i: int, why: str) -> str:
    job_id = (job or {}).get("job_id")
    ledger.record_stage(
        m.file_id, stage, StageState.FAILED, job_id=job_id, array_index=i, error=why[:2000]
    )
    return f"{m.relpath}: {stage} failed (job {job_id}, task {i}): {why}"


def _finite(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else round(x, 3)


def record_step(
    ledger: Ledger,
    stage: str,
    movies: list[MoviePaths],
    states: dict[str, dict[str, Any]],
    job: dict | None,
    params: list[SessionParams],
) -> tuple[list[MoviePaths], list[str]]:
    """Parse each movie's outputs into the ledger (``params[i]`` is movie i's session form);
    a movie done with a step starts to owe the next ones in the same transaction.
    Returns (movies that succeeded, problems)."""
    ok: list[MoviePaths] = []
    problems: list[str] = []
    for i, m in enumerate(movies):
        state = states.get(str(i), {})
        if state.get("exit_code") != 0:
            why = f"state {state.get('state', 'unknown')}, exit code {state.get('exit_code')}"
            problems.append(_failed(ledger, m, stage, job, i, why))
            continue
        try:
            results = _parse(stage, m, params[i])
        except (ValueError, OSError) as exc:
            problems.append(_failed(ledger, m, stage, job, i, f"unreadable output: {exc}"))
            continue
        ledger.record_stage(
            m.file_id,
            stage,
            StageState.DONE,
            job_id=(job or {}).get("job_id"),
            array_index=i,
            results=results,
            then_owe=downstream(stage, params[i]),
        )
        ok.append(m)
    return ok, problems


def _parse(stage: str, m: MoviePaths, params: SessionParams) -> dict[str, Any]:
    if stage == "motioncor":
        log = motioncor_tool.parse_shift_log(
            motioncor_tool.find_shift_log(m.mc_log_dir, motioncor_tool.log_stem(m.movie))
        )
        if not m.aligned.is_file():
            raise ValueError(f"{m.aligned}: aligned sum missing")
        px = params.pixel_size_A
        return {
            "total_drift_A": round(log.total_drift(px), 3),
            "early_drift_A": round(log.early_drift(4, px), 3),
            "late_drift_A": round(log.late_drift(4, px), 3),
            "frames": log.n_frames,
            "shifts_px": [[round(x, 3), round(y, 3)] for x, y in log.shifts_px],
            "aligned": str(m.aligned),
        }
    if stage == "ctf":
        est = ctffind_tool.parse_ctffind_txt(ctffind_tool.output_paths(m.ctf_diag).txt).single
        return {
            "defocus1_A": round(est.defocus_1_A, 2),
            "defocus2_A": round(est.defocus_2_A, 2),
            "astigmatism_A": round(est.astigmatism_A, 2),
            "astig_angle_deg": round(est.astigmatism_angle_deg, 2),
            "cc": round(est.cross_correlation, 4),
            "fit_resolution_A": _finite(est.fit_resolution_A),
            "diag": str(m.ctf_diag),
        }
    if stage == "picking":
        out = dogpicker_tool.output_paths(m.aligned_dw, m.picks_dir, picker_params(params))
        picks = dogpicker_tool.parse_picks(out.star or out.xy)
        return {"particles": picks.n, "picks": str(out.star or out.xy)}
    raise ValueError(f"unknown stage {stage!r}")


# ----------------------------------------------------------------------------- RELION


def _star_rows(root: Path, table: list[tuple[int, dict, dict]]) -> list[dict[str, Any]]:
    return [
        {
            "rlnMicrographName": os.path.relpath(mc["aligned"], root),
            "rlnOpticsGroup": 1,
            "rlnCtfImage": os.path.relpath(ctf["diag"], root) + ":mrc",
            "rlnDefocusU": ctf["defocus1_A"],
            "rlnDefocusV": ctf["defocus2_A"],
            "rlnCtfAstigmatism": ctf["astigmatism_A"],
            "rlnDefocusAngle": ctf["astig_angle_deg"],
            "rlnCtfFigureOfMerit": ctf["cc"],
            "rlnCtfMaxResolution": ctf["fit_resolution_A"] or 999.0,
        }
        for _file_id, mc, ctf in table
    ]


def _star_loop_lines(rows: list[dict[str, Any]], scratch: Path) -> list[str]:
    """The data lines starfile writes for ``rows`` (its quoting: names may hold spaces)."""
    import pandas as pd
    import starfile

    starfile.write({"micrographs": pd.DataFrame(rows)}, scratch, overwrite=True)
    try:
        lines = scratch.read_text().splitlines()
    finally:
        scratch.unlink(missing_ok=True)
    last_label = max(i for i, line in enumerate(lines) if line.startswith("_rln"))
    return [line for line in lines[last_label + 1 :] if line.strip()]


def _replace(target: Path, text: str, file_mode: int) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, file_mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, file_mode)
    os.replace(tmp, target)


#: RELION's import reads the accepted movies; the second file holds every movie with a CTF.
STAR_ACCEPTED = "micrographs_ctf.star"
STAR_ALL = "micrographs_ctf_all.star"


def write_micrographs_ctf_star(
    ledger: Ledger,
    handle: SessionHandle,
    params: SessionParams,
    file_mode: int,
    new_file_ids: list[int] | None = None,
    *,
    accepted_only: bool = True,
) -> Path | None:
    """``processed/micrographs_ctf.star`` (the movies curation accepted, for RELION 3.1+/
    CryoSPARC import) or, with ``accepted_only=False``, ``processed/micrographs_ctf_all.star``
    (every movie with a CTF), replaced atomically with ``file_mode``.

    With ``new_file_ids`` (the movies a processing run just finished, or just accepted) their
    rows are appended to the existing file: the ledger work per batch does not grow with the
    session. Without, or when there is no file yet, it is written whole from one query.
    """
    root = Path(handle.dest_root)
    target = root / "processed" / (STAR_ACCEPTED if accepted_only else STAR_ALL)
    if new_file_ids is not None and target.is_file():
        rows = _star_rows(
            root, ledger.ctf_table(handle.session_id, new_file_ids, accepted_only=accepted_only)
        )
        if not rows:
            return target
        text = target.read_text()
        have = set(text.splitlines())
        lines = [
            line
            for line in _star_loop_lines(rows, target.with_name(f".{target.name}.rows"))
            if line not in have
        ]
        if lines:
            _replace(target, text.rstrip("\n") + "\n" + "\n".join(lines) + "\n", file_mode)
        return target
    rows = _star_rows(root, ledger.ctf_table(handle.session_id, accepted_only=accepted_only))
    if not rows:
        return None
    import pandas as pd
    import starfile

    optics = pd.DataFrame(
        [
            {
                "rlnOpticsGroupName": "opticsGroup1",
                "rlnOpticsGroup": 1,
                "rlnMicrographOriginalPixelSize": params.pixel_size_A,
                "rlnVoltage": params.kv,
                "rlnSphericalAberration": params.cs_mm,
                "rlnAmplitudeContrast": params.amp_contrast,
                "rlnMicrographPixelSize": params.pixel_size_A,
            }
        ]
    )
    tmp = target.with_name(f".{target.name}.tmp")
    starfile.write({"optics": optics, "micrographs": pd.DataFrame(rows)}, tmp, overwrite=True)
    os.chmod(tmp, file_mode)
    os.replace(tmp, target)
    return target
