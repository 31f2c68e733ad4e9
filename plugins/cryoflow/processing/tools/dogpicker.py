"""DoG picker as a pipeline step: parameters, the command line, and pick-file parsers.

Airflow-free on purpose: the Slurm job script, the operator and the tests all use these pure
functions. The command targets the built-in engine ``cryoflow-dogpicker``
(:mod:`cryoflow.processing.engines.dogpicker`), whose flags are a superset of Appion's
``ApDogPicker.py``.
With ``appion=True`` only the flags ApDogPicker itself knows are written. That binary then writes
the ``x<TAB>y`` file only, and its thresholds are in units of the map's plain standard deviation,
not the noise (see the engine's module doc).

:func:`parse_picks` reads what either writes, and the coordinate STAR files RELION writes:
``data_`` blocks with or without a name, RELION 3.0 layouts (no version line, trailing spaces)
and 3.1+ ones (``# version 30001``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DogPickerOutputs",
    "DogPickerParams",
    "PickFileError",
    "PickResult",
    "build_command",
    "output_paths",
    "parse_picks",
]


class DogPickerParams(BaseModel):
    """One DoG picker run. Defaults are the engine's (ApDogPicker's), except where noted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    diameter_A: float = Field(gt=0, description="particle diameter, Angstrom")
    pixel_size_A: float | None = Field(
        None, gt=0, description="Angstrom per pixel; None: the engine reads the MRC header"
    )
    thresh: float = Field(0.6, description="pick threshold, quarter noise standard deviations")
    max_thresh: float = Field(6.0, description="stronger blobs are contamination")
    num_slices: int = Field(2, ge=1, le=15, description="number of DoG sizes")
    size_range_A: float = Field(10.0, gt=0, description="range of diameters searched, Angstrom")
    kfactor: float = Field(1.1, gt=1, description="sigma ratio when num_slices is 1")
    max_area: float = Field(0.3, gt=0, description="largest blob, x pi x diameter^2")
    max_peaks: int = Field(500, ge=1)
    overlap_mult: float = Field(1.5, ge=0, description="closest picks, in particle radii")
    min_size: float = Field(0.5, gt=0, lt=1, description="smallest blob, x diameter")
    max_size: float = Field(2.0, gt=1, description="largest blob, x diameter")
    bin: int = Field(0, ge=0, description="binning before picking; 0 = automatic")
    # Not the tool's default: DoG finds white blobs, and particles in cryo-EM micrographs are dark.
    invert: bool = True
    write_star: bool = Field(True, description="also write a RELION coordinate STAR file")
    preview: Literal["jpg", "png"] | None = Field("jpg", description="preview format, or none")

    @model_validator(mode="after")
    def _consistent(self) -> DogPickerParams:
        if self.max_thresh <= self.thresh:
            raise ValueError(f"max_thresh ({self.max_thresh}) must exceed thresh ({self.thresh})")
        if self.num_slices > 1 and self.size_range_A >= 2 * self.diameter_A:
            raise ValueError(
                f"size_range_A ({self.size_range_A}) must be less than twice diameter_A "
                f"({self.diameter_A})"
            )
        if self.pixel_size_A is not None and self.diameter_A < 4 * self.pixel_size_A:
            raise ValueError(
                f"diameter_A ({self.diameter_A}) must span at least 4 pixels of "
                f"{self.pixel_size_A} A"
            )
        return self


@dataclass(frozen=True)
class _Flag:
    flag: str
    appion: bool  # ApDogPicker.py knows it too


#: Parameter field -> flag. Values are written as ``FLAG VALUE`` (None: left out), booleans as
#: a bare ``FLAG`` when true. Adding a flag is one line here.
FLAGS: dict[str, _Flag] = {
    "diameter_A": _Flag("--diam", appion=True),
    "pixel_size_A": _Flag("--apix", appion=True),
    "thresh": _Flag("--thresh", appion=True),
    "max_thresh": _Flag("--max-thresh", appion=True),
    "num_slices": _Flag("--num-slices", appion=True),
    "size_range_A": _Flag("--size-range", appion=True),
    "max_area": _Flag("--max-area", appion=True),
    "max_peaks": _Flag("--max-peaks", appion=True),
    "invert": _Flag("--invert", appion=True),
    "kfactor": _Flag("--kfactor", appion=False),
    "overlap_mult": _Flag("--overlap-mult", appion=False),
    "min_size": _Flag("--min-size", appion=False),
    "max_size": _Flag("--max-size", appion=False),
    "bin": _Flag("--bin", appion=False),
}


@dataclass(frozen=True)
class DogPickerOutputs:
    """The files one run writes for one micrograph (None: not asked for)."""

    xy: Path
    star: Path | None
    preview: Path | None


def output_paths(
    micrograph: str | Path, outdir: str | Path, params: DogPickerParams, *, appion: bool = False
) -> DogPickerOutputs:
    """``<outdir>/<stem>_dogpicker.txt``, ``.star`` (RELION) and ``.jpg``/``.png`` (preview).

    The STAR name keeps the micrograph's stem in front, as RELION expects of coordinate files
    (``<micrograph stem><suffix>.star``). ApDogPicker (``appion``) writes the text file only.
    """
    base = Path(outdir) / f"{Path(micrograph).stem}_dogpicker"
    star = base.with_suffix(".star") if params.write_star and not appion else None
    preview = base.with_suffix(f".{params.preview}") if params.preview and not appion else None
    return DogPickerOutputs(base.with_suffix(".txt"), star, preview)


def _value(v: float | int) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"not a number: {v!r}")
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v)) if isinstance(v, int) else f"{float(v):.1f}"
    return repr(float(v))


def build_command(
    params: DogPickerParams,
    binary: str | Path | Sequence[str],
    micrograph: str | Path,
    outdir: str | Path,
    *,
    appion: bool = False,
) -> list[str]:
    """The argv that picks ``micrograph`` into ``outdir`` (see :func:`output_paths`).

    ``binary`` is the program, or a prefix such as
    ``[python, "-m", "cryoflow.processing.engines.dogpicker"]``.
    """
    prefix = [str(binary)] if isinstance(binary, str | Path) else [str(b) for b in binary]
    out = output_paths(micrograph, outdir, params, appion=appion)
    argv = [*prefix, "--image", str(micrograph), "--outfile", str(out.xy)]
    if out.star is not None:
        argv += ["--star", str(out.star)]
    if out.preview is not None:
        argv += ["--preview", str(out.preview)]
    for name, spec in FLAGS.items():
        if appion and not spec.appion:
            continue
        value = getattr(params, name)
        if value is None or value is False:
            continue
        argv += [spec.flag] if value is True else [spec.flag, _value(value)]
    return argv


# =========================================================================== parsers


class PickFileError(ValueError):
    """A pick file is missing or not in a layout we read; the message names the file (and line)."""


@dataclass(frozen=True)
class PickResult:
    """Picks of one micrograph: centres in pixels (x = column, y = row) and scores if given."""

    path: Path
    format: Literal["star", "xy"]
    x: np.ndarray
    y: np.ndarray
    score: np.ndarray | None  # _rlnAutopickFigureOfMerit if present; RELION's -999 (unset) is NaN

    @property
    def n(self) -> int:
        return int(self.x.size)

    def xy(self) -> np.ndarray:
        """(n, 2) array of (x, y)."""
        return np.column_stack([self.x, self.y])


def parse_picks(path: str | Path) -> PickResult:
    """Read a RELION coordinate STAR file or a plain ``x y`` text file (by content)."""
    path = Path(path)
    if not path.is_file():
        raise PickFileError(f"{path}: no such file")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise PickFileError(f"{path}: not a text file ({exc})") from exc
    if path.suffix.lower() == ".star" or any(
        line.strip().startswith(("data_", "loop_")) for line in text.splitlines()
    ):
        return _parse_star(path)
    return _parse_xy(path, text)


def _parse_star(path: Path) -> PickResult:
    import pandas as pd
    import starfile

    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises many kinds for damaged files
        raise PickFileError(f"{path}: not a readable STAR file ({exc})") from exc
    tables = {}
    for name, block in blocks.items():
        if isinstance(block, dict):  # a block of single values, e.g. one pick written as pairs
            block = pd.DataFrame([block])
        if {"rlnCoordinateX", "rlnCoordinateY"} <= set(block.columns):
            tables[name] = block
    if not tables:
        if any("rlnMicrographCoordinates" in getattr(b, "columns", b) for b in blocks.values()):
            raise PickFileError(
                f"{path}: lists coordinate files (_rlnMicrographCoordinates), it holds no picks; "
                "read the files it names"
            )
        found = ", ".join(f"data_{n}" for n in blocks) or "none"
        raise PickFileError(
            f"{path}: no data block with _rlnCoordinateX and _rlnCoordinateY (blocks: {found})"
        )
    if len(tables) > 1:
        names = ", ".join(f"data_{n}" for n in tables)
        raise PickFileError(f"{path}: several blocks hold coordinates ({names}); expected one")
    ((name, table),) = tables.items()
    columns = ["rlnCoordinateX", "rlnCoordinateY"]
    if "rlnAutopickFigureOfMerit" in table.columns:
        columns.append("rlnAutopickFigureOfMerit")
    arrays = []
    for col in columns:
        values = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(values)
        if col != "rlnAutopickFigureOfMerit" and bad.any():
            row = int(np.argmax(bad))
            raw = table[col].iloc[row]
            shown = "missing" if pd.isna(raw) else repr(raw)
            raise PickFileError(
                f"{path}: data_{name} row {row + 1}: _{col} is {shown}, not a number"
            )
        arrays.append(values)
    score = np.where(arrays[2] == -999.0, np.nan, arrays[2]) if len(arrays) > 2 else None
    return PickResult(path, "star", arrays[0], arrays[1], score)


def _parse_xy(path: Path, text: str) -> PickResult:
    """ApDogPicker's ``x<TAB>y`` lines; any whitespace or commas, ``#`` comments, extra columns."""
    xs: list[float] = []
    ys: list[float] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        fields = line.split()
        try:
            x, y = float(fields[0]), float(fields[1])
        except (IndexError, ValueError):
            raise PickFileError(
                f"{path}:{lineno}: expected 'x y' numbers, got {raw.strip()!r}"
            ) from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise PickFileError(f"{path}:{lineno}: coordinates must be finite, got {raw.strip()!r}")
        xs.append(x)
        ys.append(y)
    return PickResult(path, "xy", np.asarray(xs, float), np.asarray(ys, float), None)
