"""CTF estimation that stands in for CTFFIND4/5: same questions on stdin, same output files.

Why a stand-in: the pipeline must run (tests, demos, sites without a CTFFIND licence/binary) with
exactly the job it runs on a cluster: ``LC_ALL=C ctffind`` with the answers on standard input,
then parse ``<diag>.txt`` and ``<diag>_avrot.txt``. So this engine asks CTFFIND's questions in
CTFFIND's order (4.1.0-4.1.14, 4.1.15-4.1.16 or 5.0.x, as in cisTEM's ctffind.cpp; chosen by
``--ctffind-version`` or detected from the answers) and writes CTFFIND's files in its layout.

Algorithm (CTFFIND4's, Rohou & Grigorieff 2015, in numpy/scipy):

1. Power spectrum: mean periodogram of 50 %-overlapping tiles. As CTFFIND, a pixel smaller than
   1.4 A is "resampled": tiles are ``box * 1.4 / pixel`` wide and their spectra are cropped to
   ``box``, so fitting sees a 1.4 A pixel (cheaper than CTFFIND's whole-micrograph FFT).
2. Amplitude spectrum, central cross damped, background removed by subtracting a box-car
   smoothed copy (box ~ sqrt(2) x the radius of the minimum-resolution ring), outliers clipped.
3. 1-D brute-force search of the rotational average over [min, max] defocus in the user's step,
   then per-sector 1-D fits give a first astigmatism; Nelder-Mead refines (defocus 1, defocus 2,
   angle[, phase shift]) maximising the normalised cross-correlation between the 2-D spectrum and
   ``|CTF|`` in the resolution band (CTFFIND's score, including its astigmatism restraint).
4. Diagnostics as CTFFIND: an astigmatism-aware (equi-phase) rotational average, the fit, their
   local correlation in a window of about two Thon rings, and the "fit resolution": the first
   frequency (checked from 10 % of the bins on) where that correlation falls below CTFFIND's
   thresholds (0.1 after >3 bins above 0.1, or 0.5 after >3 bins above 0.66). Where CTFFIND's test
   never triggers it reads past its array and writes ``inf``; so does this engine.

"Slower, more exhaustive search" adds a coarse 2-D grid of astigmatism and angle as further
starting points. "Known astigmatism", the astigmatism restraint, phase-shift search, movies
(frames summed in groups), stacks of micrographs, gain/dark references and "Do you already know the
defocus?" (score only) behave as in CTFFIND. Refused with a clear error: tilt and thickness
determination (CTFFIND 5), magnification-distortion correction, EER input. Accepted without
effect: CTFFIND 5's "Weight down low resolution signal?".

Files are written only when every micrograph succeeded, each to a temp name then renamed; the
summary ``.txt`` is renamed last, so its presence means the run is complete. Its version field
reads e.g. ``4.1.14-cryoflow`` so nobody mistakes these numbers for CTFFIND's own.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Literal

import numpy as np
import scipy.fft
from scipy import ndimage, optimize

from cryoflow.processing.engines.ctf_model import electron_wavelength_A
from cryoflow.processing.engines.imageio import (
    ImageReadError,
    atomic_path,
    open_movie,
    read_image,
    write_mrc,
    write_preview,
)
from cryoflow.processing.tools.ctffind import output_paths

__all__ = [
    "CTFFIND_VERSIONS",
    "CtfFit",
    "CtffindError",
    "FitOptions",
    "Settings",
    "Spectrum",
    "compute_spectrum",
    "estimate",
    "fit_ctf",
    "main",
    "read_answers",
    "write_outputs",
]

Version = Literal["4", "4.1.15", "5"]
#: Question orders (cisTEM's ctffind.cpp) and the release each key writes in its header:
#: "4" = 4.1.0-4.1.14, "4.1.15" = 4.1.15-4.1.16 (adds the tilt question), "5" = 5.0.x.
CTFFIND_VERSIONS: dict[str, str] = {"4": "4.1.14", "4.1.15": "4.1.15", "5": "5.0.2"}
TARGET_PIXEL_A = 1.4  # CTFFIND resamples finer pixels to this (Nyquist 2.8 A)
LOWEST_ALLOWED_MIN_RES_A = 50.0  # CTFFIND refuses a minimum resolution above this
_BIN_LOW, _BIN_SIGNIF, _BIN_HIGH = 0.1, 0.5, 0.66  # CTFFIND's fit-resolution thresholds


class CtffindError(ValueError):
    """Bad answers, bad input data or an impossible request; the message names the culprit."""


# =========================================================================== stdin protocol


@dataclass(frozen=True)
class Settings:
    """Everything CTFFIND's questions establish (defaults are CTFFIND's)."""

    input_path: Path
    diag_path: Path
    pixel_size_A: float
    version: Version = "4"
    n_images: int = 1
    is_movie: bool = False
    frames_to_average: int = 1
    kv: float = 300.0
    cs_mm: float = 2.7
    amp_contrast: float = 0.07
    box: int = 512
    min_res_A: float = 30.0
    max_res_A: float = 5.0
    min_defocus_A: float = 5000.0
    max_defocus_A: float = 50000.0
    defocus_step_A: float = 100.0
    astig_known: bool = False
    known_astig_A: float = 0.0
    known_astig_angle_deg: float = 0.0
    slower_search: bool = False
    restrain_astig: bool = False
    astig_tolerance_A: float = -100.0  # negative: no restraint (CTFFIND's convention)
    find_phase_shift: bool = False
    min_phase_rad: float = 0.0
    max_phase_rad: float = 0.0
    phase_step_rad: float = 0.0
    resample: bool = True
    target_pixel_A: float = TARGET_PIXEL_A
    gain_path: Path | None = None
    dark_path: Path | None = None
    defocus_known: bool = False
    known_defocus1_A: float = 0.0
    known_defocus2_A: float = 0.0
    known_angle_deg: float = 0.0
    known_phase_rad: float = 0.0
    weight_down_low_res: bool = True  # CTFFIND 5 expert option; accepted, no effect here
    threads: int = 1


class _Answers:
    """CTFFIND's UserInput over a list of answer lines: one line per question, '' = default."""

    def __init__(self, lines: Sequence[str], echo: IO[str] | None) -> None:
        self.lines = list(lines)
        self.pos = 0
        self.echo = echo

    def _next(self, prompt: str, default: str) -> str:
        if self.pos >= len(self.lines):
            raise CtffindError(
                f"standard input ended before the question {prompt!r} "
                f"(answer {self.pos + 1}; check the CTFFIND version of the answers)"
            )
        raw = self.lines[self.pos].strip()
        self.pos += 1
        value = raw if raw else default
        if self.echo is not None:
            print(f"{prompt} [{default}]".ljust(51) + f": {value}", file=self.echo)
        return value

    def text(self, prompt: str, default: str) -> str:
        return self._next(prompt, default)

    def number(
        self,
        prompt: str,
        default: str,
        lo: float | None = None,
        hi: float | None = None,
        *,
        integer: bool = False,
        lo_open: bool = False,
    ) -> float:
        raw = self._next(prompt, default)
        try:
            value = float(int(raw)) if integer else float(raw)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise CtffindError(f"answer {self.pos} ({prompt!r}): {raw!r} is not {kind}") from None
        if not math.isfinite(value):
            raise CtffindError(f"answer {self.pos} ({prompt!r}): {raw!r} is not finite")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            rel = ">" if lo_open else ">="
            raise CtffindError(f"answer {self.pos} ({prompt!r}): {value:g} must be {rel} {lo:g}")
        if hi is not None and value > hi:
            raise CtffindError(f"answer {self.pos} ({prompt!r}): {value:g} must be <= {hi:g}")
        return value

    def yes_no(self, prompt: str, default: str) -> bool:
        raw = self._next(prompt, default).lower()
        if raw in {"yes", "y", "true", "t", "1"}:
            return True
        if raw in {"no", "n", "false", "f", "0"}:
            return False
        raise CtffindError(f"answer {self.pos} ({prompt!r}): {raw!r} is not yes or no")

    def leftover(self) -> list[str]:
        return [line for line in self.lines[self.pos :] if line.strip()]


def _ask(a: _Answers, version: Version, n_images_of: Callable[[Path], int]) -> Settings:
    """Ask CTFFIND's questions in the order of ``version`` (cisTEM's ctffind.cpp, 4.1.14/5.0.2)."""
    s: dict[str, object] = {"version": version}
    inp = Path(a.text("Input image file name", "input.mrc"))
    n_images = n_images_of(inp)
    s.update(input_path=inp, n_images=n_images)
    if n_images > 1:
        s["is_movie"] = a.yes_no("Input is a movie (stack of frames)", "No")
        if s["is_movie"]:
            s["frames_to_average"] = int(
                a.number("Number of frames to average together", "1", 1, integer=True)
            )
    s["diag_path"] = Path(a.text("Output diagnostic image file name", "diagnostic_output.mrc"))
    s["pixel_size_A"] = a.number("Pixel size", "1.0", 0.0, lo_open=True)
    s["kv"] = a.number("Acceleration voltage", "300.0", 0.0, lo_open=True)
    s["cs_mm"] = a.number("Spherical aberration", "2.70", 0.0)
    s["amp_contrast"] = a.number("Amplitude contrast", "0.07", 0.0, 1.0)
    s["box"] = int(a.number("Size of amplitude spectrum to compute", "512", 128, integer=True))
    min_res = a.number("Minimum resolution", "30.0", 0.0, LOWEST_ALLOWED_MIN_RES_A, lo_open=True)
    s["min_res_A"] = min_res
    max_res = a.number("Maximum resolution", "5.0", 0.0, lo_open=True)
    if max_res >= min_res:
        raise CtffindError(
            f"maximum resolution {max_res:g} A must be finer (smaller) than the minimum "
            f"resolution {min_res:g} A"
        )
    s["max_res_A"] = max_res
    min_df = a.number("Minimum defocus", "5000.0")
    s["min_defocus_A"] = min_df
    s["max_defocus_A"] = a.number("Maximum defocus", "50000.0", min_df)
    s["defocus_step_A"] = a.number("Defocus search step", "100.0", 1.0)
    s["astig_known"] = a.yes_no("Do you know what astigmatism is present?", "No")
    s["slower_search"] = a.yes_no("Slower, more exhaustive search?", "No")
    if s["astig_known"]:
        s["known_astig_A"] = a.number("Known astigmatism", "0.0", 0.0)
        s["known_astig_angle_deg"] = a.number("Known astigmatism angle", "0.0")
    else:
        s["restrain_astig"] = a.yes_no("Use a restraint on astigmatism?", "No")
        if s["restrain_astig"]:
            s["astig_tolerance_A"] = a.number("Expected (tolerated) astigmatism", "200.0")
    s["find_phase_shift"] = a.yes_no("Find additional phase shift?", "No")
    if s["find_phase_shift"]:
        lo = a.number("Minimum phase shift (rad)", "0.0", -3.15, 3.15)
        hi = a.number("Maximum phase shift (rad)", "3.15", lo, 3.15)
        s.update(min_phase_rad=lo, max_phase_rad=hi)
        s["phase_step_rad"] = a.number("Phase shift search step", "0.5", 0.0, hi - lo)
    if version != "4" and not s["find_phase_shift"] and a.yes_no("Determine sample tilt?", "No"):
        raise CtffindError("sample tilt determination is not supported by the built-in engine")
    if version == "5" and a.yes_no("Determine samnple thickness?", "No"):  # sic, CTFFIND 5's
        raise CtffindError("sample thickness determination is not supported by the built-in engine")
    if a.yes_no("Do you want to set expert options?", "No"):
        _ask_expert(a, version, s)
    return Settings(**s)  # type: ignore[arg-type]


def _ask_expert(a: _Answers, version: Version, s: dict[str, object]) -> None:
    s["resample"] = a.yes_no("Resample micrograph if pixel size too small?", "Yes")
    if version == "5" and s["resample"]:
        s["target_pixel_A"] = a.number(
            "Target pixel size after resampling", "1.4", 0.0, lo_open=True
        )
    if s.get("is_movie"):
        if version != "4" and not a.yes_no("Movie is dark-subtracted?", "Yes"):
            s["dark_path"] = Path(a.text("Dark image filename", "dark.dm4"))
        if not a.yes_no("Movie is gain-corrected?", "Yes"):
            s["gain_path"] = Path(a.text("Gain image filename", "gain.dm4"))
        if a.yes_no("Correct Movie Mag. Distortion?", "No"):
            raise CtffindError(
                "magnification distortion correction is not supported by the built-in engine"
            )
    if a.yes_no("Do you already know the defocus?", "No"):
        s["defocus_known"] = True
        s["known_defocus1_A"] = a.number("Known defocus 1", "0.0")
        s["known_defocus2_A"] = a.number("Known defocus 2", "0.0")
        s["known_angle_deg"] = a.number("Known astigmatism angle", "0.0")
        if s["find_phase_shift"]:
            s["known_phase_rad"] = a.number("Known phase shift (radians)", "0.0")
    if version != "4":
        s["weight_down_low_res"] = a.yes_no("Weight down low resolution signal?", "Yes")
    s["threads"] = int(a.number("Desired number of parallel threads", "1", 1, integer=True))


def _n_images(path: Path) -> int:
    try:
        with open_movie(path) as mov:
            return mov.shape[0]
    except ImageReadError as exc:
        raise CtffindError(str(exc)) from exc


def read_answers(
    lines: Sequence[str],
    version: Version | Literal["auto"] = "auto",
    *,
    echo: IO[str] | None = None,
    n_images_of: Callable[[Path], int] = _n_images,
) -> Settings:
    """Settings from CTFFIND's stdin answers, in the given version's order or detected.

    Detection: the answers must be used up exactly (blank trailing lines aside) by one version's
    questions: after the phase-shift answers 4.1.14 asks for expert options, 4.1.15 first asks
    about tilt, 5 about tilt and thickness. Orders that read the same answers the same way (4.1.14
    and 4.1.15 with a phase-shift search) are equivalent; the oldest is taken.
    """
    if version != "auto":
        a = _Answers(lines, echo)
        settings = _ask(a, version, n_images_of)
        if a.leftover():
            raise CtffindError(
                f"{len(a.leftover())} answer(s) left over after the questions of CTFFIND "
                f"{CTFFIND_VERSIONS[version]} (first: {a.leftover()[0]!r}); are they for another "
                f"CTFFIND version?"
            )
        return settings
    fits: list[Settings] = []
    errors: list[str] = []
    for v in ("4", "4.1.15", "5"):
        a = _Answers(lines, None)
        try:
            candidate = _ask(a, v, n_images_of)
        except CtffindError as exc:
            errors.append(f"as CTFFIND {CTFFIND_VERSIONS[v]}: {exc}")
            continue
        if a.leftover():
            errors.append(f"as CTFFIND {CTFFIND_VERSIONS[v]}: answers left over")
        else:
            fits.append(candidate)
    distinct = {replace(f, version="4") for f in fits}
    if len(distinct) != 1:
        why = "; ".join(errors) if not fits else "they fit several CTFFIND versions differently"
        raise CtffindError(f"cannot read the answers ({why}); give --ctffind-version")
    if echo is not None:  # replay, so the log shows the questions as asked
        read_answers(lines, fits[0].version, echo=echo, n_images_of=n_images_of)
    return fits[0]


# =========================================================================== spectrum


@dataclass
class Spectrum:
    """A centred (fftshifted) box x box power spectrum and the pixel size it is sampled at."""

    power: np.ndarray
    pixel_size_A: float
    n_tiles: int


def tile_box_for(box: int, pixel_size_A: float, resample: bool, target_A: float) -> int:
    """Tile edge in input pixels: ``box``, or bigger so the cropped spectrum has ~target pixels."""
    if not resample or pixel_size_A >= target_A:
        return box
    return int(scipy.fft.next_fast_len(int(round(box * target_A / pixel_size_A)), real=True))


def _tile_starts(n: int, tile: int) -> np.ndarray:
    """Start offsets covering ``n`` with tiles of ``tile`` overlapping by at least half."""
    if n <= tile:
        return np.zeros(1, dtype=int)
    count = int(math.ceil((n - tile) / (tile / 2))) + 1
    return np.round(np.linspace(0, n - tile, count)).astype(int)


def tile_periodogram_sum(image: np.ndarray, tile: int, workers: int = 1) -> tuple[np.ndarray, int]:
    """Sum of |rfft2|^2 of the tiles of ``image`` (DC removed): the spectrum's FFT cost floor.

    Images smaller than a tile are padded with their mean (as CTFFIND pads to a square).
    """
    img = np.asarray(image)
    ny, nx = img.shape
    if ny < tile or nx < tile:
        mean = float(np.mean(img, dtype=np.float64))
        padded = np.full((max(ny, tile), max(nx, tile)), mean, dtype=np.float32)
        padded[:ny, :nx] = img
        img, (ny, nx) = padded, padded.shape
    ys, xs = _tile_starts(ny, tile), _tile_starts(nx, tile)
    half = tile // 2 + 1
    acc = np.zeros((tile, half), dtype=np.float64)
    batch = np.empty((len(xs), tile, tile), dtype=np.float32)
    for y in ys:
        band = np.asarray(img[y : y + tile], dtype=np.float32)  # one row of tiles from a memmap
        for k, x in enumerate(xs):
            batch[k] = band[:, x : x + tile]
        ft = scipy.fft.rfft2(batch, workers=workers).view(np.float32).reshape(len(xs), -1)
        acc += np.einsum("ij,ij->j", ft, ft).reshape(tile, half, 2).sum(axis=-1)  # |F|^2
    acc[0, 0] = 0.0  # a tile's mean only moves its DC term: removing it is zeroing this
    return acc, len(ys) * len(xs)


def _full_centred(half: np.ndarray) -> np.ndarray:
    """The full centred spectrum from an rfft2-shaped one, using P(-k) = P(k)."""
    n = half.shape[0]
    full = np.empty((n, n), dtype=half.dtype)
    full[:, : n // 2 + 1] = half
    full[:, n // 2 + 1 :] = half[(-np.arange(n)) % n][:, n // 2 - 1 : 0 : -1]
    return np.fft.fftshift(full)


def compute_spectrum(
    images: Iterable[np.ndarray],
    pixel_size_A: float,
    box: int,
    *,
    resample: bool = True,
    target_pixel_A: float = TARGET_PIXEL_A,
    workers: int = 1,
) -> Spectrum:
    """Mean tile periodogram of ``images`` (summed frame groups, or one micrograph), box x box."""
    tile = tile_box_for(box, pixel_size_A, resample, target_pixel_A)
    acc = np.zeros((tile, tile // 2 + 1), dtype=np.float64)
    n = 0
    for img in images:
        part, k = tile_periodogram_sum(img, tile, workers)
        acc += part
        n += k
    if n == 0:
        raise CtffindError("no image to compute a spectrum from")
    full = _full_centred(acc / n)
    if tile != box:
        c = tile // 2
        full = full[c - box // 2 : c + box // 2, c - box // 2 : c + box // 2]
    return Spectrum(np.ascontiguousarray(full), pixel_size_A * tile / box, n)


def filter_spectrum(power: np.ndarray, pixel_A: float, min_res_A: float) -> np.ndarray:
    """Background-subtracted amplitude spectrum (CTFFIND's ComputeFilteredAmplitudeSpectrum)."""
    box = power.shape[0]
    c = box // 2
    amp = np.sqrt(np.maximum(power, 0.0))
    r = _radius_px(box)
    r_min = box * pixel_A / min_res_A
    ring = amp[(r >= r_min) & (r <= c)]
    amp /= max(float(ring.std()), 1e-30)
    # Tile edges leak power along the axes (the "central cross"): use the neighbours instead.
    amp[c, :] = 0.5 * (amp[c - 2, :] + amp[c + 2, :])
    amp[:, c] = 0.5 * (amp[:, c - 2] + amp[:, c + 2])
    size = int(box * pixel_A / min_res_A * math.sqrt(2.0))
    size += 1 - size % 2
    amp -= ndimage.uniform_filter(amp, size=max(size, 3), mode="wrap")
    band = (r >= r_min) & (r <= c)
    hi = float(np.percentile(amp[band], 99.9))
    return np.minimum(amp, hi)


def _radius_px(box: int) -> np.ndarray:
    k = np.arange(box) - box // 2
    return np.hypot(k[None, :], k[:, None])


# =========================================================================== fitting


@dataclass(frozen=True)
class FitOptions:
    """The physical constants and search settings of one fit (Angstrom, kV, mm, radians)."""

    kv: float = 300.0
    cs_mm: float = 2.7
    amp_contrast: float = 0.07
    min_res_A: float = 30.0
    max_res_A: float = 5.0
    min_defocus_A: float = 5000.0
    max_defocus_A: float = 50000.0
    defocus_step_A: float = 100.0
    astig_tolerance_A: float = -100.0
    known_astig: tuple[float, float] | None = None  # (astigmatism A, angle deg)
    slower_search: bool = False
    phase_range: tuple[float, float, float] | None = None  # (min, max, step) rad
    known: tuple[float, float, float, float] | None = None  # df1, df2, angle deg, phase rad

    @classmethod
    def from_settings(cls, s: Settings) -> FitOptions:
        return cls(
            kv=s.kv,
            cs_mm=s.cs_mm,
            amp_contrast=s.amp_contrast,
            min_res_A=s.min_res_A,
            max_res_A=s.max_res_A,
            min_defocus_A=s.min_defocus_A,
            max_defocus_A=s.max_defocus_A,
            defocus_step_A=s.defocus_step_A,
            astig_tolerance_A=s.astig_tolerance_A if s.restrain_astig else -100.0,
            known_astig=(s.known_astig_A, s.known_astig_angle_deg) if s.astig_known else None,
            slower_search=s.slower_search,
            phase_range=(s.min_phase_rad, s.max_phase_rad, s.phase_step_rad)
            if s.find_phase_shift
            else None,
            known=(s.known_defocus1_A, s.known_defocus2_A, s.known_angle_deg, s.known_phase_rad)
            if s.defocus_known
            else None,
        )


@dataclass
class CtfFit:
    """One micrograph's result, the 1-D profiles of ``_avrot.txt`` and the diagnostic image."""

    defocus1_A: float
    defocus2_A: float
    astig_angle_deg: float
    phase_shift_rad: float
    score: float
    fit_resolution_A: float
    pixel_size_A: float  # the pixel size the spectrum was fitted at
    profiles: np.ndarray = field(repr=False)  # (6, n_bins): CTFFIND's avrot rows
    diagnostic: np.ndarray = field(repr=False)  # box x box float32


class _Ctf:
    """|CTF| on a set of spectrum pixels, with the astigmatic defocus linear in (m, u, v).

    ``df(az) = m + u cos 2az + v sin 2az`` is ctf_model's ``defocus_at_azimuth`` with
    ``m = (d1 + d2) / 2`` and ``(u, v) = (d1 - d2) / 2 * (cos 2a, sin 2a)``.
    """

    def __init__(self, g2: np.ndarray, az: np.ndarray, opts: FitOptions) -> None:
        lam = electron_wavelength_A(opts.kv)
        self.lam = lam
        # float32: chi is at most a few hundred radians, so 1e-5 rad is plenty, and it is 2x faster
        self.k1 = (math.pi * lam * g2).astype(np.float32)
        self.k2 = (0.5 * math.pi * opts.cs_mm * 1e7 * lam**3 * g2 * g2).astype(np.float32)
        self.c2 = np.cos(2 * az).astype(np.float32)
        self.s2 = np.sin(2 * az).astype(np.float32)
        w = opts.amp_contrast
        self.w = math.atan2(w, math.sqrt(max(1.0 - w * w, 0.0)))

    def chi(self, m: float, u: float, v: float, phase: float) -> np.ndarray:
        df = self.c2 * np.float32(u)
        df += self.s2 * np.float32(v)
        df += np.float32(m)
        df *= self.k1
        df -= self.k2
        df += np.float32(self.w + phase)
        return df

    def abs_ctf(self, m: float, u: float, v: float, phase: float) -> np.ndarray:
        c = self.chi(m, u, v, phase)
        np.sin(c, out=c)
        return np.abs(c, out=c)


def _mv_from(df1: float, df2: float, angle_deg: float) -> tuple[float, float, float]:
    h = 0.5 * (df1 - df2)
    a = math.radians(2.0 * angle_deg)
    return 0.5 * (df1 + df2), h * math.cos(a), h * math.sin(a)


def _convention(m: float, u: float, v: float) -> tuple[float, float, float]:
    """(df1, df2, angle) with df1 >= df2 and the angle in [-90, 90) (CTFFIND's convention)."""
    h = math.hypot(u, v)
    angle = 0.5 * math.degrees(math.atan2(v, u)) if h > 0 else 0.0
    angle -= 180.0 * round(angle / 180.0)
    if angle >= 90.0:
        angle -= 180.0
    return m + h, m - h, angle


class _Scorer:
    """CTFFIND's score: normalised cross-correlation of the spectrum with |CTF| in the band."""

    def __init__(self, spec: np.ndarray, mask: np.ndarray, ctf: _Ctf, tol_A: float) -> None:
        d = spec[mask].astype(np.float64)
        d -= d.mean()
        self.d = (d / max(math.sqrt(_dot(d, d)), 1e-30)).astype(np.float32)
        self.ctf = ctf
        self.n = d.size
        self.tol = tol_A

    def score(self, m: float, u: float, v: float, phase: float = 0.0) -> float:
        c = self.ctf.abs_ctf(m, u, v, phase)
        s = float(c.sum(dtype=np.float64))
        norm = _dot(c, c) - s * s / self.n
        cc = _dot(self.d, c) / math.sqrt(norm) if norm > 0 else 0.0
        if self.tol > 0:  # CTFFIND's restraint, as small as it is there
            cc -= (2.0 * math.hypot(u, v)) ** 2 * 0.5 / self.tol**2 / self.n
        return cc


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Dot product without BLAS: OpenBLAS threads crawl on a busy node (7 ms vs 40 us here)."""
    return float(np.einsum("i,i->", a, b, dtype=np.float64))


def _band_geometry(box: int, pixel_A: float, min_res: float, max_res: float):
    k = (np.arange(box) - box // 2) / (box * pixel_A)
    fx, fy = np.meshgrid(k, k)
    g2 = fx * fx + fy * fy
    az = np.arctan2(fy, fx)
    half = (fy > 0) | ((fy == 0) & (fx >= 0))  # the spectrum is centro-symmetric
    mask = half & (g2 >= 1.0 / min_res**2) & (g2 <= 1.0 / max_res**2)
    return g2, az, mask


def _pearson_rows(curves: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``curves`` with ``data``."""
    c = curves - curves.mean(axis=-1, keepdims=True)
    d = data - data.mean()
    den = np.sqrt(np.einsum("ij,ij->i", c, c)) * max(math.sqrt(_dot(d, d)), 1e-30)
    num = np.einsum("ij,j->i", c, d)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _search_1d(
    profile: np.ndarray,
    g2: np.ndarray,
    opts: FitOptions,
    lo: float,
    hi: float,
    step: float,
    phases: np.ndarray,
) -> tuple[float, float, float]:
    """Best (defocus, phase, cc) of |CTF| against a radial profile: grid, then local polish."""
    ctf = _Ctf(g2, np.zeros_like(g2), opts)
    dfs = np.arange(lo, hi + 0.5 * step, step)
    best = (lo, float(phases[0]), -2.0)
    for ph in phases:
        curves = np.abs(np.sin(ctf.k1[None, :] * dfs[:, None] - ctf.k2 + ctf.w + ph))
        cc = _pearson_rows(curves, profile)
        i = int(np.argmax(cc))
        if cc[i] > best[2]:
            best = (float(dfs[i]), float(ph), float(cc[i]))

    def neg(df: float) -> float:
        curve = np.abs(np.sin(ctf.k1 * df - ctf.k2 + ctf.w + best[1]))
        return -float(_pearson_rows(curve[None, :], profile)[0])

    res = optimize.minimize_scalar(
        neg, bounds=(best[0] - step, best[0] + step), method="bounded", options={"xatol": 1.0}
    )
    if -res.fun > best[2]:
        best = (float(res.x), best[1], float(-res.fun))
    return best


def _radial_profile(
    spec: np.ndarray, rbin: np.ndarray, sel: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    w = np.bincount(rbin[sel], minlength=n_bins).astype(np.float64)
    s = np.bincount(rbin[sel], weights=spec[sel], minlength=n_bins)
    ok = w > 0
    prof = np.zeros(n_bins)
    prof[ok] = s[ok] / w[ok]
    return prof, ok


def fit_ctf(spectrum: Spectrum, opts: FitOptions) -> CtfFit:
    """Fit the CTF to a spectrum and compute CTFFIND's diagnostics for it."""
    box = spectrum.power.shape[0]
    p = spectrum.pixel_size_A
    if opts.max_res_A < 2.0 * p:
        raise CtffindError(
            f"maximum resolution {opts.max_res_A:g} A is beyond Nyquist ({2 * p:g} A at the "
            f"fitting pixel size {p:.3f} A); ask for a coarser maximum resolution, or answer no "
            f"to 'Resample micrograph if pixel size too small?' (expert options)"
        )
    if opts.min_res_A * 1.0 > box * p / 2.0:
        raise CtffindError(
            f"minimum resolution {opts.min_res_A:g} A is coarser than the spectrum box "
            f"({box} px at {p:.3f} A) can sample; use a bigger box or a finer minimum resolution"
        )
    spec = filter_spectrum(spectrum.power, p, opts.min_res_A)
    g2, az, mask = _band_geometry(box, p, opts.min_res_A, opts.max_res_A)
    ctf = _Ctf(g2[mask], az[mask], opts)
    scorer = _Scorer(spec, mask, ctf, opts.astig_tolerance_A)
    if opts.known is not None:
        df1, df2, ang, phase = opts.known
        m, u, v = _mv_from(df1, df2, ang)
        result = (m, u, v, phase, scorer.score(m, u, v, phase))
    else:
        result = _search(spec, g2, az, mask, scorer, opts, box, p)
    m, u, v, phase, score = result
    df1, df2, angle = _convention(m, u, v)
    profiles, diag, res_A = _diagnostics(spec, spectrum.pixel_size_A, (m, u, v, phase), opts)
    return CtfFit(df1, df2, angle, phase, score, res_A, p, profiles, diag)


def _search(
    spec: np.ndarray,
    g2: np.ndarray,
    az: np.ndarray,
    mask: np.ndarray,
    scorer: _Scorer,
    opts: FitOptions,
    box: int,
    p: float,
) -> tuple[float, float, float, float, float]:
    step = opts.defocus_step_A
    if opts.phase_range is not None:
        lo_ph, hi_ph, st_ph = opts.phase_range
        phases = np.arange(lo_ph, hi_ph + 1e-9, st_ph) if st_ph > 0 else np.array([lo_ph])
    else:
        phases = np.array([0.0])
    # 1-D: rotational average of the band against |CTF| without astigmatism.
    rbin = np.rint(np.sqrt(g2) * box * p).astype(np.int64)
    n_bins = int(rbin[mask].max()) + 1
    prof, ok = _radial_profile(spec, rbin, mask, n_bins)
    g2_bins = (np.arange(n_bins) / (box * p)) ** 2
    df0, ph0, _ = _search_1d(
        prof[ok], g2_bins[ok], opts, opts.min_defocus_A, opts.max_defocus_A, step, phases
    )
    starts: list[tuple[float, float, float]] = []
    if opts.known_astig is not None:
        astig, ang = opts.known_astig
        starts.append(_mv_from(df0 + astig / 2, df0 - astig / 2, ang))
    else:
        starts.append((df0, 0.0, 0.0))
        starts.append(_sector_start(spec, rbin, az, mask, g2_bins, n_bins, opts, df0, ph0))
        if opts.slower_search:
            starts.extend(_grid_starts(scorer, df0, ph0, opts))
    best: tuple[float, float, float, float, float] | None = None
    for m0, u0, v0 in starts:
        cand = _refine(scorer, (m0, u0, v0, ph0), opts)
        if best is None or cand[4] > best[4]:
            best = cand
    assert best is not None
    return best


def _sector_start(
    spec: np.ndarray,
    rbin: np.ndarray,
    az: np.ndarray,
    mask: np.ndarray,
    g2_bins: np.ndarray,
    n_bins: int,
    opts: FitOptions,
    df0: float,
    ph0: float,
    n_sectors: int = 12,
) -> tuple[float, float, float]:
    """Astigmatism from 1-D fits in azimuthal sectors: df(az) = m + u cos 2az + v sin 2az."""
    reach = max(3000.0, 0.15 * df0)
    if opts.astig_tolerance_A > 0:
        reach = min(reach, 3.0 * opts.astig_tolerance_A)
    lo = max(opts.min_defocus_A, df0 - reach)
    hi = min(opts.max_defocus_A, df0 + reach)
    sector = np.minimum((az % np.pi) / (np.pi / n_sectors), n_sectors - 1).astype(np.int64)
    rows, dfs, weights = [], [], []
    for k in range(n_sectors):
        prof, ok = _radial_profile(spec, rbin, mask & (sector == k), n_bins)
        if ok.sum() < 8:
            continue
        df, _, cc = _search_1d(
            prof[ok], g2_bins[ok], opts, lo, hi, max(opts.defocus_step_A / 2, 10.0), np.array([ph0])
        )
        a = (k + 0.5) * np.pi / n_sectors
        rows.append((1.0, math.cos(2 * a), math.sin(2 * a)))
        dfs.append(df)
        weights.append(max(cc, 0.0) + 1e-6)
    if len(rows) < 3:
        return (df0, 0.0, 0.0)
    design, target, w = np.array(rows), np.array(dfs), np.sqrt(np.array(weights))
    for _ in range(2):  # one pass of outlier rejection: a sector caught on a wrong ring
        coef, *_ = np.linalg.lstsq(design * w[:, None], target * w, rcond=None)
        resid = np.abs(design @ coef - target)
        keep = resid <= max(3.0 * float(np.median(resid)), opts.defocus_step_A)
        if keep.all() or keep.sum() < 3:
            break
        design, target, w = design[keep], target[keep], w[keep]
    return float(coef[0]), float(coef[1]), float(coef[2])


def _grid_starts(
    scorer: _Scorer, df0: float, ph0: float, opts: FitOptions
) -> list[tuple[float, float, float]]:
    """The slower search: a coarse 2-D grid of astigmatism and angle around the 1-D defocus."""
    top = 3.0 * opts.astig_tolerance_A if opts.astig_tolerance_A > 0 else 3000.0
    amounts = np.linspace(opts.defocus_step_A, top, 12)
    scored = []
    for a in amounts:
        for ang in np.arange(0.0, 180.0, 7.5):
            for dm in (-opts.defocus_step_A, 0.0, opts.defocus_step_A):
                m, u, v = _mv_from(df0 + dm + a / 2, df0 + dm - a / 2, ang)
                scored.append((scorer.score(m, u, v, ph0), (m, u, v)))
    scored.sort(key=lambda t: -t[0])
    return [s[1] for s in scored[:3]]


def _refine(
    scorer: _Scorer, start: tuple[float, float, float, float], opts: FitOptions
) -> tuple[float, float, float, float, float]:
    """Nelder-Mead on (m, u, v[, phase]) (or m alone when the astigmatism is known)."""
    m0, u0, v0, ph0 = start
    fit_phase = opts.phase_range is not None and opts.phase_range[1] - opts.phase_range[0] > 0.01
    step = opts.defocus_step_A
    if opts.known_astig is not None:

        def unpack(x: np.ndarray) -> tuple[float, float, float, float]:
            return x[0], u0, v0, (x[1] if fit_phase else ph0)

        x0 = [m0] + ([ph0] if fit_phase else [])
        scales = [step] + ([0.2] if fit_phase else [])
    else:

        def unpack(x: np.ndarray) -> tuple[float, float, float, float]:
            return x[0], x[1], x[2], (x[3] if fit_phase else ph0)

        x0 = [m0, u0, v0] + ([ph0] if fit_phase else [])
        scales = [step, step, step] + ([0.2] if fit_phase else [])
    x0a = np.array(x0, dtype=np.float64)
    simplex = np.vstack([x0a] + [x0a + np.eye(len(x0a))[i] * scales[i] for i in range(len(x0a))])

    def neg(x: np.ndarray) -> float:
        m, u, v, ph = unpack(x)
        if not opts.min_defocus_A - step <= m <= opts.max_defocus_A + step:
            return 1.0
        return -scorer.score(m, u, v, ph)

    res = optimize.minimize(
        neg,
        x0a,
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": 0.5, "fatol": 1e-8, "maxiter": 2000},
    )
    m, u, v, ph = unpack(res.x)
    if fit_phase:
        ph = float((ph + np.pi) % (2 * np.pi) - np.pi)
    return float(m), float(u), float(v), float(ph), float(-res.fun)


# =========================================================================== diagnostics


def _diagnostics(
    spec: np.ndarray,
    p: float,
    params: tuple[float, float, float, float],
    opts: FitOptions,
) -> tuple[np.ndarray, np.ndarray, float]:
    """CTFFIND's avrot rows, its diagnostic image and the fit resolution (A)."""
    m, u, v, phase = params
    box = spec.shape[0]
    c = box // 2
    g2, az, band = _band_geometry(box, p, opts.min_res_A, opts.max_res_A)
    full = np.ones_like(band)
    ctf = _Ctf(g2, az, opts)
    # Standardise over the fitting band, clip outliers (CTFFIND renormalises similarly).
    vals = spec[band]
    mu, sd = float(vals.mean()), max(float(vals.std()), 1e-30)
    z = np.clip((spec - mu) / sd, -4.0, 4.0)
    # Equi-phase radius: where the mean-defocus CTF has the same phase as this pixel.
    n_bins = int(math.ceil(math.sqrt(2.0) * c))
    phi = ctf.k1 * (m + u * ctf.c2 + v * ctf.s2) - ctf.k2
    a = 0.5 * math.pi * opts.cs_mm * 1e7 * ctf.lam**3
    b = math.pi * ctf.lam * m
    if b > 0:
        disc = np.sqrt(np.maximum(b * b - 4.0 * a * phi, 0.0))
        x = np.where(phi > 0, 2.0 * phi / (b + disc), 0.0)
        r_eq = np.sqrt(x) * box * p
    else:
        r_eq = np.sqrt(g2) * box * p
    r_plain = np.rint(np.sqrt(g2) * box * p).astype(np.int64)
    r_epa = np.clip(np.rint(r_eq).astype(np.int64), 0, n_bins - 1)
    rot, _ = _radial_profile(z, np.minimum(r_plain, n_bins - 1), full, n_bins)
    epa, ok = _radial_profile(z, r_epa, full, n_bins)
    idx = np.arange(n_bins)
    if ok.any() and not ok.all():
        epa[~ok] = np.interp(idx[~ok], idx[ok], epa[ok])
    g_bins = idx / (box * p)
    lam = ctf.lam
    chi_1d = (
        math.pi * lam * m * g_bins**2
        - 0.5 * math.pi * opts.cs_mm * 1e7 * lam**3 * g_bins**4
        + ctf.w
        + phase
    )
    fit_1d = np.abs(np.sin(chi_1d))
    frc, sigma = _windowed_cc(epa, fit_1d, g_bins, m, opts, p, box)
    res_A = _fit_resolution(frc, g_bins)
    profiles = np.vstack([g_bins, rot, epa, fit_1d, frc, sigma])
    # Diagnostic image: spectrum in [avg - sd, avg + 2 sd] -> [0, 1]; lower-left quadrant the
    # fitted |CTF| in the band, lower-right the equi-phase average, nothing below min. res.
    diag = np.clip((z + 1.0) / 3.0, 0.0, 1.0)
    rows = np.arange(box)[:, None] < c
    left = (np.arange(box)[None, :] < c) & rows
    right = (np.arange(box)[None, :] >= c) & rows
    in_band = (g2 >= 1.0 / opts.min_res_A**2) & (g2 <= 1.0 / opts.max_res_A**2)
    fit2d = np.abs(np.sin(ctf.chi(m, u, v, phase)))
    diag = np.where(left & in_band, fit2d, diag)
    lo_e, hi_e = np.percentile(epa[first_bin(g_bins, opts) :], [2.0, 98.0])
    epa_disp = np.clip((epa - lo_e) / max(hi_e - lo_e, 1e-12), 0.0, 1.0)
    diag = np.where(right, epa_disp[r_epa], diag)
    diag[g2 < 1.0 / opts.min_res_A**2] = 0.0
    return profiles, diag.astype(np.float32), res_A


def first_bin(g: np.ndarray, opts: FitOptions) -> int:
    """The first 1-D bin at or beyond the minimum resolution."""
    return int(np.searchsorted(g, 1.0 / opts.min_res_A))


def _windowed_cc(
    spec_1d: np.ndarray,
    fit_1d: np.ndarray,
    g: np.ndarray,
    m: float,
    opts: FitOptions,
    p: float,
    box: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Local correlation of profile and fit over about two Thon rings around each bin."""
    n = g.size
    lam = electron_wavelength_A(opts.kv)
    dchi_dg = np.abs(2.0 * math.pi * lam * m * g - 2.0 * math.pi * opts.cs_mm * 1e7 * lam**3 * g**3)
    # one |CTF| period (pi in chi) in bins: pi / (dchi/dg * dg/dbin), dg/dbin = 1 / (box p)
    period_bins = np.where(dchi_dg > 0, math.pi * box * p / np.maximum(dchi_dg, 1e-30), n)
    half = np.clip(np.ceil(period_bins), 2, max(2, n // 8)).astype(int)
    first = first_bin(g, opts)
    frc = np.ones(n)
    sigma = np.zeros(n)
    for i in range(first, n):
        lo, hi = max(first, i - half[i]), min(n, i + half[i] + 1)
        a, b = spec_1d[lo:hi], fit_1d[lo:hi]
        a0, b0 = a - a.mean(), b - b.mean()
        den = math.sqrt(_dot(a0, a0) * _dot(b0, b0))
        frc[i] = _dot(a0, b0) / den if den > 0 else 0.0
        sigma[i] = 2.0 / math.sqrt(hi - lo)
    return frc, sigma


def _fit_resolution(frc: np.ndarray, g: np.ndarray) -> float:
    """CTFFIND's "spacing up to which CTF rings were fit successfully" (A; may be inf)."""
    n = frc.size
    first = int(0.1 * n)
    above_low = above_sig = above_high = 0
    last = -1
    for i in range(first, n):
        if (above_low > 3 and frc[i] < _BIN_LOW) or (above_high > 3 and frc[i] < _BIN_SIGNIF):
            last = i
            break
        above_low += frc[i] > _BIN_LOW
        above_sig += frc[i] > _BIN_SIGNIF
        above_high += frc[i] > _BIN_HIGH
    if above_sig == n - first:
        last = n - 1
    if above_sig == 0:
        last = 1
    if last <= 0:  # CTFFIND indexes element -1 here and prints inf
        return math.inf
    return float(1.0 / g[last])


# =========================================================================== running


def _micrograph_images(s: Settings) -> Iterator[list[np.ndarray]]:
    """For each micrograph, the images whose spectra are averaged (frame groups of a movie)."""
    gain = read_image(s.gain_path) if s.gain_path else None
    dark = read_image(s.dark_path) if s.dark_path else None
    with open_movie(s.input_path) as mov:
        n, ny, nx = mov.shape
        for ref, what in ((gain, s.gain_path), (dark, s.dark_path)):
            if ref is not None and ref.shape != (ny, nx):
                raise CtffindError(f"{what}: shape {ref.shape} does not match frames {(ny, nx)}")

        def frame(i: int) -> np.ndarray:
            f = mov.frame(i)
            if dark is not None:
                f = f - dark
            if gain is not None:
                f = f * gain
            return f

        if not s.is_movie:
            for i in range(n):
                yield [_checked(frame(i), s.input_path, i)]
            return
        groups = []
        for start in range(0, n, s.frames_to_average):
            acc = np.zeros((ny, nx), dtype=np.float32)
            for i in range(start, min(n, start + s.frames_to_average)):
                acc += frame(i)
            groups.append(_checked(acc, s.input_path, start))
        yield groups


def _checked(img: np.ndarray, path: Path, i: int) -> np.ndarray:
    if not np.isfinite(img).all():
        raise CtffindError(f"{path}: image {i + 1} contains NaN or infinite values")
    if float(img.max()) == float(img.min()):
        raise CtffindError(f"{path}: image {i + 1} is blank (constant)")
    return img


def estimate(s: Settings) -> list[CtfFit]:
    """Fit every micrograph of the input (nothing is written)."""
    opts = FitOptions.from_settings(s)
    fits = []
    try:
        for images in _micrograph_images(s):
            spectrum = compute_spectrum(
                images,
                s.pixel_size_A,
                s.box,
                resample=s.resample,
                target_pixel_A=s.target_pixel_A,
                workers=s.threads,
            )
            fits.append(fit_ctf(spectrum, opts))
    except ImageReadError as exc:
        raise CtffindError(str(exc)) from exc
    return fits


def _header(s: Settings, n: int, now: str) -> list[str]:
    ver = CTFFIND_VERSIONS[s.version] + "-cryoflow"
    return [
        f"# Output from CTFFind version {ver}, run on {now}",
        f"# Input file: {s.input_path} ; Number of micrographs: {n}",
        f"# Pixel size: {s.pixel_size_A:0.3f} Angstroms ; acceleration voltage: {s.kv:0.1f} keV ; "
        f"spherical aberration: {s.cs_mm:0.2f} mm ; amplitude contrast: {s.amp_contrast:0.2f}",
        f"# Box size: {s.box} pixels ; min. res.: {s.min_res_A:0.1f} Angstroms ; max. res.: "
        f"{s.max_res_A:0.1f} Angstroms ; min. def.: {s.min_defocus_A:0.1f} um; max. def. "
        f"{s.max_defocus_A:0.1f} um",
    ]


_COLUMNS_4 = (
    "# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; "
    "#4 - azimuth of astigmatism; #5 - additional phase shift [radians]; #6 - cross correlation; "
    "#7 - spacing (in Angstroms) up to which CTF rings were fit successfully"
)
_COLUMNS_5 = (
    _COLUMNS_4 + "; #8 - Estimated tilt axis angle; #9 - Estimated tilt angle ; "
    "#10 Estimated sample thickness (in Angstroms)"
)
_AVROT_ROWS = (
    "# 6 lines per micrograph: #1 - spatial frequency (1/Angstroms); #2 - 1D rotational average "
    "of spectrum (assuming no astigmatism); #3 - 1D rotational average of spectrum; #4 - CTF fit; "
    "#5 - cross-correlation between spectrum and CTF fit; #6 - 2sigma of expected cross "
    "correlation of noise"
)


def write_outputs(s: Settings, fits: Sequence[CtfFit], preview: bool = True) -> None:
    """Diagnostic MRC, _avrot.txt, preview, then the summary .txt (each atomically)."""
    out = output_paths(s.diag_path)
    txt, avrot, png = out.txt, out.avrot, out.preview
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    head = _header(s, len(fits), now)
    diag = np.stack([f.diagnostic for f in fits]) if len(fits) > 1 else fits[0].diagnostic
    write_mrc(s.diag_path, diag, fits[0].pixel_size_A)
    lines = head[:3] + [head[3] + f"; num. frames averaged: {s.frames_to_average}", _AVROT_ROWS]
    for f in fits:
        g_per_A, rot, epa, fit, frc, sig = f.profiles
        lines.append(" ".join(f"{x:f}" for x in g_per_A))
        lines.append(" ".join(f"{x:14.5f}" for x in rot))  # CTFFIND writes this row as float
        for row in (epa, fit, frc, sig):
            lines.append(" ".join(f"{x:f}" for x in row))
    _write_text(avrot, lines)
    if preview:  # flipped: image viewers put row 0 at the top, MRC viewers at the bottom
        write_preview(png, np.flipud(fits[0].diagnostic))
    rows = []
    for i, f in enumerate(fits, start=1):
        vals = [i, f.defocus1_A, f.defocus2_A, f.astig_angle_deg, f.phase_shift_rad, f.score]
        vals.append(f.fit_resolution_A)
        if s.version == "5":
            vals += [0.0, 0.0, 0.0]  # tilt axis, tilt angle, thickness: not determined
        rows.append(" ".join(f"{float(x):f}" for x in vals))
    _write_text(txt, head + [_COLUMNS_5 if s.version == "5" else _COLUMNS_4] + rows)


def _write_text(path: Path, lines: Sequence[str]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _report(s: Settings, fits: Sequence[CtfFit], out: IO[str]) -> None:
    paths = output_paths(s.diag_path)
    txt, avrot = paths.txt, paths.avrot
    if len(fits) == 1:
        f = fits[0]
        print(
            f"\n\nEstimated defocus values        : {f.defocus1_A:0.2f} , {f.defocus2_A:0.2f} "
            f"Angstroms\nEstimated azimuth of astigmatism: {f.astig_angle_deg:0.2f} degrees",
            file=out,
        )
        if s.find_phase_shift:
            ps = f.phase_shift_rad
            print(
                f"Additional phase shift          : {math.degrees(ps):0.3f} degrees "
                f"({ps:0.3f} radians) ({ps / math.pi:0.3f} PIf)",
                file=out,
            )
        print(f"Score                           : {f.score:0.5f}", file=out)
        print(f"Pixel size for fitting          : {f.pixel_size_A:0.3f} Angstroms", file=out)
        print(f"Thon rings with good fit up to  : {f.fit_resolution_A:0.1f} Angstroms", file=out)
    print(f"\n\nSummary of results                          : {txt}", file=out)
    print(f"Diagnostic images                           : {s.diag_path}", file=out)
    print(f"Detailed results, including 1D fit profiles : {avrot}", file=out)


# =========================================================================== CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cryoflow-ctffind",
        description="CTF estimation driven like CTFFIND 4.1/5: answers on standard input.",
    )
    p.add_argument(
        "--ctffind-version",
        choices=("4", "4.1.15", "5", "auto"),
        default="auto",
        help="question order: CTFFIND 4.1.0-4.1.14, 4.1.15-4.1.16 or 5.0.x (default: detect)",
    )
    p.add_argument("-j", type=int, default=None, help="FFT threads (overrides the answers)")
    p.add_argument("--no-preview", action="store_true", help="do not write the PNG preview")
    return p


def main(argv: Sequence[str] | None = None, stdin: IO[str] | None = None) -> int:
    """Console script ``cryoflow-ctffind``: exit 0 on success, 2 on bad answers, 1 on bad data."""
    args = _parser().parse_args(argv)
    src = stdin if stdin is not None else sys.stdin
    lines = src.read().splitlines()
    print("\n        **   Welcome to Ctffind (cryoflow built-in engine)   **\n", file=sys.stdout)
    try:
        settings = read_answers(lines, args.ctffind_version, echo=sys.stdout)
        if args.j is not None:
            if args.j < 1:
                raise CtffindError(f"-j {args.j}: the number of threads must be >= 1")
            settings = replace(settings, threads=args.j)
    except CtffindError as exc:
        print(f"cryoflow-ctffind: error: {exc}", file=sys.stderr)
        return 2
    try:
        fits = estimate(settings)
        write_outputs(settings, fits, preview=not args.no_preview)
    except (CtffindError, OSError) as exc:
        print(f"cryoflow-ctffind: error: {exc}", file=sys.stderr)
        return 1
    _report(settings, fits, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
