"""CTFFIND as a pipeline step: parameters, the answers it reads on stdin, and its output parsers.

Airflow-free on purpose: the Slurm job script, the operator and the tests all use these pure
functions. CTFFIND takes no flags for its parameters; it asks questions and reads one answer per
line from standard input, and the questions depend on the version and on earlier answers. Three
orders exist (cisTEM's ``src/programs/ctffind/ctffind.cpp``), keyed here as:

* ``"4"``: CTFFIND 4.1.0-4.1.14 (the 4.1.14 release is the common one);
* ``"4.1.15"``: 4.1.15-4.1.16 add "Determine sample tilt?" (asked only without a phase-shift
  search) and, in the expert block, a dark reference and "Weight down low resolution signal?";
* ``"5"``: 5.0.x also asks "Determine samnple thickness?" (sic) and a target pixel size.

RELION 5 writes the same answers (its ctffind_runner answers the tilt question "as of 4.1.15").
All write the 7-column summary, CTFFIND 5 adds tilt axis, tilt angle and thickness columns.

Run the command with ``LC_ALL=C`` (:data:`ENV`): CTFFIND reads and writes numbers with the C
library, so a locale with a decimal comma breaks both.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ENV",
    "VERSIONS",
    "AvrotProfile",
    "CtfEstimate",
    "CtfResult",
    "CtffindOutputError",
    "CtffindOutputs",
    "CtffindParams",
    "build_command",
    "output_paths",
    "parse_avrot",
    "parse_ctffind_txt",
    "stdin_answers",
]

#: Environment the job must run CTFFIND with (numbers in C locale: decimal point, not comma).
ENV: dict[str, str] = {"LC_ALL": "C"}


class CtffindParams(BaseModel):
    """One CTFFIND run. Defaults are CTFFIND's own, except where a comment says otherwise."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_path: Path = Field(description="micrograph (MRC), or a movie / stack of micrographs")
    diag_path: Path = Field(description="diagnostic spectrum image; .txt files are named from it")
    pixel_size_A: float = Field(gt=0, description="Angstrom per pixel of the input")
    voltage_kV: float = Field(300.0, gt=0)
    cs_mm: float = Field(2.7, ge=0, description="spherical aberration")
    amplitude_contrast: float = Field(0.07, ge=0, le=1)
    box_size: int = Field(512, ge=128, description="size of the amplitude spectrum, pixels")
    min_res_A: float = Field(30.0, gt=0, le=50, description="lowest resolution fitted")
    max_res_A: float = Field(5.0, gt=0, description="highest resolution fitted")
    min_defocus_A: float = Field(5000.0, description="positive = underfocus")
    max_defocus_A: float = 50000.0
    defocus_step_A: float = Field(100.0, ge=1)
    known_astigmatism_A: float | None = Field(
        None, ge=0, description="known df1 - df2; None lets CTFFIND search for it"
    )
    known_astigmatism_angle_deg: float = 0.0
    slower_search: bool = False
    astigmatism_restraint_A: float | None = Field(
        None, description="expected (tolerated) astigmatism; None = no restraint"
    )
    find_phase_shift: bool = False
    min_phase_shift_rad: float = Field(0.0, ge=-3.15, le=3.15)
    max_phase_shift_rad: float = Field(3.15, ge=-3.15, le=3.15)
    phase_shift_step_rad: float = Field(0.5, ge=0)
    # The input: CTFFIND asks "Input is a movie" only when the file holds more than one image.
    input_is_stack: bool = False
    input_is_movie: bool = False
    frames_to_average: int = Field(1, ge=1)
    # Expert options (asked only when one differs from CTFFIND's default).
    resample_if_pixel_too_small: bool = True
    target_pixel_size_A: float = Field(1.4, gt=0, description="CTFFIND 5 only; 4.1 uses 1.4")
    gain_path: Path | None = Field(None, description="movie not gain-corrected: its gain reference")
    dark_path: Path | None = Field(None, description="4.1.15+: dark reference for a movie")
    known_defocus_A: tuple[float, float, float] | None = Field(
        None, description="(defocus 1, defocus 2, angle deg): only score this CTF"
    )
    known_phase_shift_rad: float = 0.0
    weight_down_low_res: bool = Field(True, description="4.1.15+ only")
    threads: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> CtffindParams:
        if self.max_res_A >= self.min_res_A:
            raise ValueError(
                f"max_res_A ({self.max_res_A}) must be finer (smaller) than min_res_A "
                f"({self.min_res_A})"
            )
        if self.max_defocus_A < self.min_defocus_A:
            raise ValueError(
                f"max_defocus_A ({self.max_defocus_A}) is below min_defocus_A "
                f"({self.min_defocus_A})"
            )
        if self.find_phase_shift and self.max_phase_shift_rad < self.min_phase_shift_rad:
            raise ValueError("max_phase_shift_rad is below min_phase_shift_rad")
        if self.input_is_movie and not self.input_is_stack:
            raise ValueError("input_is_movie needs input_is_stack (a movie has several frames)")
        if (self.gain_path or self.dark_path) and not self.input_is_movie:
            raise ValueError("gain_path/dark_path apply to movies only (input_is_movie)")
        return self

    def _expert_needed(self) -> bool:
        return (
            not self.resample_if_pixel_too_small
            or self.target_pixel_size_A != 1.4
            or self.gain_path is not None
            or self.dark_path is not None
            or self.known_defocus_A is not None
            or not self.weight_down_low_res
            or self.threads != 1
        )


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def _num(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else f"{float(x):.1f}"


Version = Literal["4", "4.1.15", "5"]
VERSIONS: tuple[str, ...] = ("4", "4.1.15", "5")


def stdin_answers(params: CtffindParams, version: Version) -> str:
    """The answers CTFFIND ``version`` expects ("4", "4.1.15" or "5", see above), one per line."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {', '.join(VERSIONS)}; got {version!r}")
    unaskable = {
        "dark_path": version == "4" and params.dark_path is not None,
        "weight_down_low_res": version == "4" and not params.weight_down_low_res,
        "target_pixel_size_A": version != "5" and params.target_pixel_size_A != 1.4,
    }
    bad = [name for name, used in unaskable.items() if used]
    if bad:
        raise ValueError(f"CTFFIND version {version} has no question for {', '.join(bad)}")
    p = params
    a: list[str] = [str(p.input_path)]
    if p.input_is_stack:
        a.append(_yn(p.input_is_movie))
        if p.input_is_movie:
            a.append(str(p.frames_to_average))
    a += [str(p.diag_path), _num(p.pixel_size_A), _num(p.voltage_kV), _num(p.cs_mm)]
    a += [_num(p.amplitude_contrast), str(p.box_size), _num(p.min_res_A), _num(p.max_res_A)]
    a += [_num(p.min_defocus_A), _num(p.max_defocus_A), _num(p.defocus_step_A)]
    a.append(_yn(p.known_astigmatism_A is not None))
    a.append(_yn(p.slower_search))
    if p.known_astigmatism_A is not None:
        a += [_num(p.known_astigmatism_A), _num(p.known_astigmatism_angle_deg)]
    else:
        a.append(_yn(p.astigmatism_restraint_A is not None))
        if p.astigmatism_restraint_A is not None:
            a.append(_num(p.astigmatism_restraint_A))
    a.append(_yn(p.find_phase_shift))
    if p.find_phase_shift:
        a += [_num(p.min_phase_shift_rad), _num(p.max_phase_shift_rad)]
        a.append(_num(p.phase_shift_step_rad))
    if version != "4" and not p.find_phase_shift:
        a.append("no")  # Determine sample tilt?
    if version == "5":
        a.append("no")  # Determine samnple thickness?
    expert = p._expert_needed()
    a.append(_yn(expert))
    if expert:
        a.append(_yn(p.resample_if_pixel_too_small))
        if version == "5" and p.resample_if_pixel_too_small:
            a.append(_num(p.target_pixel_size_A))
        if p.input_is_movie:
            if version != "4":
                a.append(_yn(p.dark_path is None))
                if p.dark_path is not None:
                    a.append(str(p.dark_path))
            a.append(_yn(p.gain_path is None))
            if p.gain_path is not None:
                a.append(str(p.gain_path))
            a.append("no")  # Correct Movie Mag. Distortion?
        a.append(_yn(p.known_defocus_A is not None))
        if p.known_defocus_A is not None:
            a += [_num(v) for v in p.known_defocus_A]
            if p.find_phase_shift:
                a.append(_num(p.known_phase_shift_rad))
        if version != "4":
            a.append(_yn(p.weight_down_low_res))
        a.append(str(p.threads))
    return "\n".join(a) + "\n"


def build_command(binary: str | Path, *, threads: int | None = None) -> list[str]:
    """argv for CTFFIND; the answers go on stdin and the environment needs :data:`ENV`.

    ``threads`` adds ``-j N`` (CTFFIND >= 4.1.11; it overrides the answers' thread count).
    """
    argv = [str(binary)]
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        argv += ["-j", str(threads)]
    return argv


@dataclass(frozen=True)
class CtffindOutputs:
    """The files one run writes, all derived from the diagnostic image's name as CTFFIND does."""

    diag: Path
    txt: Path
    avrot: Path
    preview: Path  # written by the built-in engine only


def output_paths(diag_path: str | Path) -> CtffindOutputs:
    """``x.mrc`` -> ``x.txt``, ``x_avrot.txt`` (and the engine's ``x.png``)."""
    diag = Path(diag_path)
    txt = diag.with_suffix(".txt") if diag.suffix else diag.with_name(diag.name + ".txt")
    return CtffindOutputs(
        diag, txt, txt.with_name(txt.stem + "_avrot.txt"), txt.with_suffix(".png")
    )


# =========================================================================== parsers


class CtffindOutputError(ValueError):
    """A CTFFIND output file is missing, empty or not in CTFFIND's layout (names file/line)."""


@dataclass(frozen=True)
class CtfEstimate:
    """One row of ``<diag>.txt``: one micrograph's fit (columns 8-10 exist in CTFFIND 5 only)."""

    micrograph: int
    defocus_1_A: float
    defocus_2_A: float
    astigmatism_angle_deg: float
    phase_shift_rad: float
    cross_correlation: float
    fit_resolution_A: float  # may be math.inf: CTFFIND writes "inf" when its test never triggers
    tilt_axis_deg: float | None = None
    tilt_angle_deg: float | None = None
    thickness_A: float | None = None

    @property
    def astigmatism_A(self) -> float:
        return abs(self.defocus_1_A - self.defocus_2_A)

    @property
    def mean_defocus_A(self) -> float:
        return 0.5 * (self.defocus_1_A + self.defocus_2_A)


@dataclass(frozen=True)
class CtfResult:
    """``<diag>.txt``: the header's settings and one :class:`CtfEstimate` per micrograph."""

    path: Path
    version: str | None
    input_file: str | None
    pixel_size_A: float | None
    voltage_kV: float | None
    cs_mm: float | None
    amplitude_contrast: float | None
    box_size: int | None
    estimates: tuple[CtfEstimate, ...] = field(default_factory=tuple)

    @property
    def single(self) -> CtfEstimate:
        """The estimate of a one-micrograph run (raises if the file holds several)."""
        if len(self.estimates) != 1:
            raise CtffindOutputError(
                f"{self.path}: holds {len(self.estimates)} micrographs, not one"
            )
        return self.estimates[0]

    # The one-micrograph case is the pipeline's: expose its values directly.
    @property
    def defocus_1_A(self) -> float:
        return self.single.defocus_1_A

    @property
    def defocus_2_A(self) -> float:
        return self.single.defocus_2_A

    @property
    def astigmatism_angle_deg(self) -> float:
        return self.single.astigmatism_angle_deg

    @property
    def phase_shift_rad(self) -> float:
        return self.single.phase_shift_rad

    @property
    def cross_correlation(self) -> float:
        return self.single.cross_correlation

    @property
    def fit_resolution_A(self) -> float:
        return self.single.fit_resolution_A


_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan)"
_HEADER_PATTERNS = {
    "version": re.compile(r"Output from CTFFind version (\S+?),", re.IGNORECASE),
    "input_file": re.compile(r"Input file: (.*?) ; Number of micrographs", re.IGNORECASE),
    "pixel_size_A": re.compile(rf"Pixel size: {_NUM} Angstroms", re.IGNORECASE),
    "voltage_kV": re.compile(rf"acceleration voltage: {_NUM} keV", re.IGNORECASE),
    "cs_mm": re.compile(rf"spherical aberration: {_NUM} mm", re.IGNORECASE),
    "amplitude_contrast": re.compile(rf"amplitude contrast: {_NUM}", re.IGNORECASE),
    "box_size": re.compile(r"Box size: (\d+) pixels", re.IGNORECASE),
}


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CtffindOutputError(f"{path}: no such file (did CTFFIND run?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CtffindOutputError(f"{path}: cannot read ({exc})") from exc
    return text.splitlines()


def _floats(path: Path, lineno: int, line: str) -> list[float]:
    try:
        return [float(tok) for tok in line.split()]  # float() reads "inf" and "nan" too
    except ValueError:
        raise CtffindOutputError(f"{path}:{lineno}: not a row of numbers: {line[:80]!r}") from None


def parse_ctffind_txt(path: str | Path) -> CtfResult:
    """Parse CTFFIND 4.1/5's ``<diag>.txt`` (7 or 10 columns, one row per micrograph)."""
    path = Path(path)
    header: dict[str, object] = dict.fromkeys(_HEADER_PATTERNS)
    estimates: list[CtfEstimate] = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            for key, pat in _HEADER_PATTERNS.items():
                m = pat.search(stripped)
                if m and header[key] is None:
                    raw = m.group(1).strip()
                    header[key] = (
                        raw
                        if key in ("version", "input_file")
                        else int(raw)
                        if key == "box_size"
                        else float(raw)
                    )
            continue
        vals = _floats(path, lineno, stripped)
        if len(vals) not in (7, 10):
            raise CtffindOutputError(
                f"{path}:{lineno}: {len(vals)} columns, CTFFIND writes 7 (4.1) or 10 (5)"
            )
        for name, v in (("defocus 1", vals[1]), ("defocus 2", vals[2]), ("CC", vals[5])):
            if not math.isfinite(v):
                raise CtffindOutputError(f"{path}:{lineno}: {name} is {v}")
        extra = vals[7:10] if len(vals) == 10 else [None, None, None]
        estimates.append(
            CtfEstimate(int(vals[0]), *vals[1:7], *extra)  # type: ignore[arg-type]
        )
    if not estimates:
        raise CtffindOutputError(f"{path}: no result rows (CTFFIND did not finish?)")
    return CtfResult(path=path, estimates=tuple(estimates), **header)  # type: ignore[arg-type]


@dataclass(frozen=True)
class AvrotProfile:
    """One micrograph's 6 lines of ``<diag>_avrot.txt`` (arrays over the same bins)."""

    spatial_frequency_per_A: np.ndarray
    rotational_average: np.ndarray  # assuming no astigmatism
    rotational_average_astig: np.ndarray  # taking astigmatism into account
    ctf_fit: np.ndarray
    cross_correlation: np.ndarray
    two_sigma_noise_cc: np.ndarray

    @property
    def resolution_A(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return 1.0 / self.spatial_frequency_per_A


def parse_avrot(path: str | Path) -> list[AvrotProfile]:
    """Parse ``<diag>_avrot.txt``: '#' comments, then 6 equal-length lines per micrograph."""
    path = Path(path)
    rows: list[tuple[int, list[float]]] = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            rows.append((lineno, _floats(path, lineno, stripped)))
    if not rows:
        raise CtffindOutputError(f"{path}: no profile lines (CTFFIND did not finish?)")
    if len(rows) % 6:
        raise CtffindOutputError(
            f"{path}: {len(rows)} data lines, CTFFIND writes 6 per micrograph (truncated?)"
        )
    n = len(rows[0][1])
    for lineno, vals in rows:
        if len(vals) != n:
            raise CtffindOutputError(f"{path}:{lineno}: {len(vals)} values, line 1 has {n}")
    out = []
    for k in range(0, len(rows), 6):
        arrays = [np.asarray(vals, dtype=np.float64) for _, vals in rows[k : k + 6]]
        if np.any(np.diff(arrays[0]) <= 0):
            raise CtffindOutputError(
                f"{path}:{rows[k][0]}: spatial frequencies do not increase (not an avrot file?)"
            )
        out.append(AvrotProfile(*arrays))
    return out
