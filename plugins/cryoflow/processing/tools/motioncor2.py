"""MotionCor2 as a pipeline step: parameters, the command line, and its shift logs. No Airflow.

Why here: the Slurm operator only needs a list of arguments to run and a parser for what the run
left behind; keeping both pure makes them testable without a GPU or the licensed binary.

Pixel size: ``pixel_size_A`` is always the pixel size *of the movie as recorded* (for a K3
super-resolution movie, the super-resolution pixel, e.g. 0.415 A); it is passed unchanged as
``-PixSize``, which MotionCor2 defines as the input stack's pixel size. With ``-FtBin 2`` the
aligned sum then has twice that pixel (0.83 A): see :meth:`MotionCor2Params.output_pixel_size_A`.
Shifts in the logs are in *input* pixels (MotionCor2 multiplies its binned measurements back).

Shift logs (checked against MotionCor2/MotionCor3 source, ``CAlignMain::mCreateLogFile``,
``CFullAlign::LogShift``, ``CPatchShifts::Log*``):

* ``-LogDir D`` (1.4+): ``D/<movie name cut at its first .mrc/.tif/.eer>`` + ``-Full.log``
  (full-frame only) or ``-Patch-Full.log``, ``-Patch-Patch.log``, ``-Patch-Frame.log`` (with
  ``-Patch``). The name comes from the *input movie*, not from ``-OutMrc``.
* ``-LogFile P`` (older): ``P0-Full.log`` / ``P0-Patch-Full.log`` / ... (0 = the stack index).
* Full logs: '#' comment lines (and blank lines with -Patch), then ``frame  x  y`` rows
  (``%4d  %8.2f  %8.2f``), frame numbers 1-based, shifts in input pixels.
* Patch logs: per row ``frame  centre_x  centre_y  shift_x  shift_y  bad``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "FLAG_TABLE",
    "MotionCor2Params",
    "ShiftLog",
    "ShiftLogError",
    "build_command",
    "find_shift_log",
    "fm_int_file_text",
    "input_flag",
    "log_stem",
    "parse_shift_log",
]

INPUT_FLAGS = {
    ".tif": "-InTiff",
    ".tiff": "-InTiff",
    ".eer": "-InEer",
    ".mrc": "-InMrc",
    ".mrcs": "-InMrc",
}


class MotionCor2Params(BaseModel):
    """One MotionCor2 run. Defaults are MotionCor2 1.6's; units are in the field names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    movie: Path
    out_mrc: Path
    pixel_size_A: float = Field(gt=0, description="pixel size of the input movie (see module)")
    gain: Path | None = None
    rot_gain: int = Field(0, ge=0, le=3)
    flip_gain: int = Field(0, ge=0, le=2)
    kv: float = Field(300.0, gt=0)
    fm_dose_e_per_A2: float | None = Field(None, gt=0, description="dose per frame, e/A^2")
    init_dose_e_per_A2: float | None = Field(None, ge=0)
    patch: tuple[int, int] | None = None
    iterations: int = Field(7, ge=1)
    tolerance_px: float = Field(0.5, gt=0)
    bfactor: tuple[float, float] = (500.0, 150.0)
    ft_bin: float = Field(1.0, ge=1.0)
    fm_int_file: Path | None = None
    eer_sampling: int | None = Field(None, ge=1, le=3)
    log_dir: Path | None = None
    gpu: tuple[int, ...] = (0,)
    extra_args: tuple[str, ...] = ()

    @field_validator("movie")
    @classmethod
    def _known_movie_type(cls, v: Path) -> Path:
        if Path(v).suffix.lower() not in INPUT_FLAGS:
            raise ValueError(f"movie {v}: MotionCor2 reads .tif/.tiff, .eer, .mrc/.mrcs only")
        return v

    @field_validator("patch")
    @classmethod
    def _patch_pair(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and (v[0] < 0 or v[1] < 0):
            raise ValueError(f"patch must be two counts >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _eer_needs_fractions(self) -> MotionCor2Params:
        is_eer = Path(self.movie).suffix.lower() == ".eer"
        if is_eer and self.fm_int_file is None:
            raise ValueError(f"movie {self.movie} is EER: fm_int_file (-FmIntFile) is required")
        if not is_eer and (self.fm_int_file is not None or self.eer_sampling is not None):
            raise ValueError("fm_int_file/eer_sampling only apply to EER movies")
        if self.fm_dose_e_per_A2 is not None and not 200.0 <= self.kv <= 300.0:
            raise ValueError(f"kv {self.kv}: MotionCor2 dose weighting models 200-300 kV only")
        return self

    def output_pixel_size_A(self) -> float:
        """Pixel size of the aligned sum: the input pixel times -FtBin."""
        return self.pixel_size_A * self.ft_bin

    @property
    def uses_patches(self) -> bool:
        return self.patch is not None and self.patch[0] > 1 and self.patch[1] > 1


def input_flag(movie: str | os.PathLike) -> str:
    """-InTiff / -InEer / -InMrc by the movie's extension."""
    suffix = Path(movie).suffix.lower()
    try:
        return INPUT_FLAGS[suffix]
    except KeyError:
        raise ValueError(f"{movie}: no MotionCor2 input flag for {suffix!r}") from None


def _num(v: float) -> str:
    return f"{v:g}"


# field name -> (flag, formatter). A formatter returns the value tokens, or None to skip the flag.
# Adding a flag is one line here. -Iter/-Tol/-Bft are always given so a MotionCor2 version's
# changed defaults can never change our results silently.
Formatter = Callable[[Any], "list[str] | None"]
FLAG_TABLE: list[tuple[str, str, Formatter]] = [
    ("out_mrc", "-OutMrc", lambda v: [str(v)]),
    ("gain", "-Gain", lambda v: [str(v)] if v is not None else None),
    ("rot_gain", "-RotGain", lambda v: [str(v)] if v else None),
    ("flip_gain", "-FlipGain", lambda v: [str(v)] if v else None),
    ("pixel_size_A", "-PixSize", lambda v: [_num(v)]),
    ("kv", "-kV", lambda v: [_num(v)]),
    ("fm_dose_e_per_A2", "-FmDose", lambda v: [_num(v)] if v is not None else None),
    ("init_dose_e_per_A2", "-InitDose", lambda v: [_num(v)] if v is not None else None),
    ("patch", "-Patch", lambda v: [str(v[0]), str(v[1])] if v is not None else None),
    ("iterations", "-Iter", lambda v: [str(v)]),
    ("tolerance_px", "-Tol", lambda v: [_num(v)]),
    ("bfactor", "-Bft", lambda v: [_num(v[0]), _num(v[1])]),
    ("ft_bin", "-FtBin", lambda v: [_num(v)] if v != 1.0 else None),
    ("fm_int_file", "-FmIntFile", lambda v: [str(v)] if v is not None else None),
    ("eer_sampling", "-EerSampling", lambda v: [str(v)] if v is not None else None),
    ("log_dir", "-LogDir", lambda v: [str(v)] if v is not None else None),
    ("gpu", "-Gpu", lambda v: [str(g) for g in v]),
]


def build_command(params: MotionCor2Params, binary: str = "MotionCor2") -> list[str]:
    """The argument list for one MotionCor2 run (no shell quoting needed: pass it as a list)."""
    cmd = [binary, input_flag(params.movie), str(params.movie)]
    for name, flag, fmt in FLAG_TABLE:
        tokens = fmt(getattr(params, name))
        if tokens is not None:
            cmd.append(flag)
            cmd.extend(tokens)
    cmd.extend(params.extra_args)
    return cmd


def fm_int_file_text(n_raw_frames: int, group: int, dose_per_raw_frame_e_per_A2: float) -> str:
    """An -FmIntFile for EER: one line "raw_frames group dose_per_raw_frame" (MotionCor2 1.4+)."""
    if n_raw_frames < 1 or group < 1 or not dose_per_raw_frame_e_per_A2 > 0:
        raise ValueError("need n_raw_frames >= 1, group >= 1 and a dose > 0")
    return f"{n_raw_frames} {group} {dose_per_raw_frame_e_per_A2:g}\n"


# --------------------------------------------------------------------------- logs


class ShiftLogError(ValueError):
    """A shift log that is missing, empty or not in MotionCor2's format (names the file/line)."""


@dataclass
class ShiftLog:
    """Global shifts from one -Full.log (+ patch shifts when the -Patch logs are beside it).

    ``shifts_px`` are (x, y) per frame in input pixels as logged; ``frames`` the 1-based frame
    numbers. Drift figures are path lengths (sum of frame-to-frame steps), in A when the pixel
    size is known, in px otherwise.
    """

    path: Path
    frames: list[int]
    shifts_px: list[tuple[float, float]]
    patch: bool
    patch_log: Path | None = None
    patch_shifts: dict[int, list[tuple[int, float, float, float, float]]] = field(
        default_factory=dict
    )  # patch number -> rows (frame, centre_x, centre_y, shift_x, shift_y)

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    def steps_px(self) -> list[float]:
        """Frame-to-frame displacement lengths (n - 1 values)."""
        s = self.shifts_px
        return [math.dist(s[i], s[i + 1]) for i in range(len(s) - 1)]

    def total_drift(self, pixel_size_A: float | None = None) -> float:
        """Path length over all frames (px, or A with ``pixel_size_A``)."""
        return sum(self.steps_px()) * (pixel_size_A or 1.0)

    def early_drift(self, n_frames: int = 4, pixel_size_A: float | None = None) -> float:
        """Path length over the first ``n_frames`` frames (RELION's 'early' motion uses 4)."""
        return sum(self.steps_px()[: max(n_frames - 1, 0)]) * (pixel_size_A or 1.0)

    def late_drift(self, n_frames: int = 4, pixel_size_A: float | None = None) -> float:
        """Path length after the first ``n_frames`` frames."""
        return sum(self.steps_px()[max(n_frames - 1, 0) :]) * (pixel_size_A or 1.0)

    def max_step(self, pixel_size_A: float | None = None) -> float:
        """The largest frame-to-frame step."""
        return max(self.steps_px(), default=0.0) * (pixel_size_A or 1.0)


def _rows(path: Path, n_cols: int) -> list[list[float]]:
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split()
            if len(parts) != n_cols:
                raise ShiftLogError(
                    f"{path}:{lineno}: expected {n_cols} columns, got {len(parts)}: {text!r}"
                )
            try:
                rows.append([float(p) for p in parts])
            except ValueError:
                raise ShiftLogError(f"{path}:{lineno}: not numbers: {text!r}") from None
    return rows


def parse_shift_log(path: str | os.PathLike) -> ShiftLog:
    """Parse a MotionCor2 -Full.log or -Patch-Full.log (old -LogFile or new -LogDir naming).

    A -Patch-Full.log's per-patch companion (``-Patch-Patch.log``) is read too when present.
    """
    path = Path(path)
    if not path.is_file():
        raise ShiftLogError(f"{path}: no such shift log")
    name = path.name
    if not name.endswith("-Full.log"):
        raise ShiftLogError(f"{path}: not a MotionCor2 full-frame log (*-Full.log)")
    rows = _rows(path, 3)
    if not rows:
        raise ShiftLogError(f"{path}: no shift rows (MotionCor2 failed or was cut short?)")
    frames = [int(r[0]) for r in rows]
    if frames != list(range(frames[0], frames[0] + len(frames))):
        raise ShiftLogError(f"{path}: frame numbers are not consecutive: {frames[:5]}...")
    log = ShiftLog(
        path=path,
        frames=frames,
        shifts_px=[(r[1], r[2]) for r in rows],
        patch=name.endswith("-Patch-Full.log"),
    )
    if log.patch:
        patch_path = path.with_name(name[: -len("-Full.log")] + "-Patch.log")
        if patch_path.is_file():
            log.patch_log = patch_path
            log.patch_shifts = _parse_patch_rows(patch_path)
    return log


def _parse_patch_rows(path: Path) -> dict[int, list[tuple[int, float, float, float, float]]]:
    out: dict[int, list[tuple[int, float, float, float, float]]] = {}
    current = 0
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.strip()
            if text.lower().startswith("#patch"):
                try:
                    current = int(text.split()[1])
                except (IndexError, ValueError):
                    raise ShiftLogError(f"{path}:{lineno}: bad patch header {text!r}") from None
                continue
            if not text or text.startswith("#"):
                continue
            parts = text.split()
            if len(parts) < 5:
                raise ShiftLogError(f"{path}:{lineno}: expected >= 5 columns: {text!r}")
            f, cx, cy, sx, sy = parts[:5]
            out.setdefault(current, []).append((int(f), float(cx), float(cy), float(sx), float(sy)))
    return out


def log_stem(movie: str | os.PathLike) -> str:
    """MotionCor2's log base name: the movie's file name cut at its first .mrc/.tif/.eer."""
    name = Path(movie).name
    low = name.lower()
    cuts = [i for i in (low.find(".mrc"), low.find(".tif"), low.find(".eer")) if i >= 0]
    return name[: min(cuts)] if cuts else name


def find_shift_log(log_dir: str | os.PathLike, stem: str | os.PathLike) -> Path:
    """The global shift log for ``stem`` in ``log_dir``, in whichever naming MotionCor2 used.

    ``stem`` may be the movie path/name (cut like MotionCor2 does) or the -LogFile prefix's name.
    Patch logs are preferred over full-frame ones (a -Patch run writes only those).
    """
    log_dir = Path(log_dir)
    base = log_stem(stem)
    candidates: Sequence[str] = (
        f"{base}-Patch-Full.log",
        f"{base}-Full.log",
        f"{base}0-Patch-Full.log",
        f"{base}0-Full.log",
    )
    for name in candidates:
        path = log_dir / name
        if path.is_file():
            return path
    raise ShiftLogError(
        f"no MotionCor2 shift log for {base!r} in {log_dir} (looked for {', '.join(candidates)})"
    )
