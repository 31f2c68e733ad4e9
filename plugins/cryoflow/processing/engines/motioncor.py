"""Built-in whole-frame motion correction: a CPU stand-in for MotionCor2 with its flags and logs.

Why: the pipeline must run (and be tested) where no GPU or MotionCor2 licence exists. This engine
reads the same inputs, takes the same flags and writes the same outputs (aligned sum, ``_DW``
sum, ``-LogDir`` shift logs) so the rest of the pipeline cannot tell which one ran.

Algorithm (MotionCor2's global alignment, Zheng et al. 2017):

1. Each frame is gain-corrected (``raw * gain``; ``-RotGain`` then ``-FlipGain`` applied to the
   reference first, exactly as MotionCor2 does), Fourier transformed once, and kept as a spectrum
   cropped to the output grid (``-FtBin``).
2. Alignment runs on a further crop of those spectra (MotionCor2's "xcf" grid: the shorter side
   binned to at most 2048 px, then cut where the ``-Bft`` low-pass has fallen below 1e-4, which
   loses nothing the filter keeps; ``-Bft`` is in px^2 of that binned grid, as in MotionCor2),
   with the frame borders faded so the static image edge cannot pull shifts to zero. Every
   iteration builds the aligned sum, correlates each frame with the sum of all *other* frames
   (so a frame's own shot noise cannot pull the peak to zero), finds the sub-pixel peak by a
   3-point Gaussian fit, and updates all shifts at once. It stops when the largest update is
   below ``-Tol`` px (after at least two iterations) or at ``-Iter``. The measured trajectory is
   smoothed with MotionCor2's two neighbour-averaging passes (weights 0.5 and 0.4), unless the
   measurements say they are noise-limited: a penalised fit (third differences, a Whittaker
   smoother) whose strength generalised cross-validation chooses from the measurements then
   takes its place where that strength is large (1 e/px/frame at 1 % image std: 0.60 -> 0.44-0.51
   px drift error on K3 frames; see the benchmark). Patches keep the passes (their model fit
   smooths them).
3. The sums are formed in Fourier space with exact sub-pixel phase shifts; the dose-weighted sum
   uses Grant & Grigorieff's (2015) critical exposure (``-FmDose`` in e/A^2 per frame, the
   exposure at the end of each frame, ``-InitDose`` added) with noise-power restoring
   normalisation scaled so its mean equals the plain sum's.
4. ``-Patch px py`` (local motion): after global alignment each patch of the globally corrected
   frames is aligned the same way (``-Bft``'s second value), logged in MotionCor2's
   ``-Patch-*.log`` layout, and MotionCor2's smooth model (quadratic in x, y times cubic in t,
   zero in the reference frame) is fitted to all patches and frames at once. The sums are then
   built tile by tile: each tile is cut from where its content sits in that frame (global +
   modelled local shift at the tile centre) and moved by an exact sub-pixel phase ramp; tiles
   are blended with a partition-of-unity window.

Memory and threads: the movie is streamed twice (measure, then sum); only the small alignment
spectra (and, with -Patch, Fourier-binned patch-grid frames) are held, and the sums accumulate
in place. FFTs use the CPUs of the process's affinity mask, capped by ``SLURM_CPUS_PER_TASK``.

Shift convention (as in MotionCor2's logs): the shift of frame ``i`` is where its content sits
relative to the reference frame (``-FmRef``, default the central frame ``n // 2``), in input
pixels: ``frame_i(r) = frame_ref(r - shift_i)``; the reference frame's shift is (0, 0) and the sum
is registered to it. :mod:`cryoflow.processing.engines.synthetic` uses the same sign for its drift.

EER input (``-InEer``, ``-EerSampling``, ``-FmIntFile``, required here) is read fraction by
fraction as MotionCor2 groups it (:mod:`cryoflow.processing.engines.eer`); a detector-size gain is
repeated
to an 8k/16k rendering. Not done (honestly): defect
maps, magnification distortion, dark references, gain references of a different size, frame
grouping (``-Group`` > 1 for global alignment is refused).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import scipy.fft as sfft

from cryoflow.processing.engines.eer import EerMovie, read_fm_int_file, upsample_gain
from cryoflow.processing.engines.imageio import (
    ImageReadError,
    MovieInfo,
    atomic_path,
    open_movie,
    read_image,
    write_mrc,
    write_preview,
)
from cryoflow.processing.tools.motioncor2 import log_stem

__all__ = [
    "MotionCorError",
    "MotionCorParams",
    "MotionCorResult",
    "align_spectra",
    "critical_exposure",
    "fft_workers",
    "fit_local_motion",
    "LocalMotion",
    "main",
    "run",
    "smooth_global_trajectory",
    "smooth_trajectory_adaptive",
    "trajectory_rms_error",
    "transform_gain",
]


def fft_workers() -> int:
    """Threads for scipy.fft: the CPUs this process may run on, capped by Slurm's allocation.

    Why: ``os.cpu_count()`` is the node's size. Under Slurm (``--cpus-per-task``) or any CPU
    affinity mask, using it oversubscribes the job's cores and slows every job on the node.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    return max(1, n)


class MotionCorError(ValueError):
    """A parameter or input the engine cannot work with; the message says which and why."""


@dataclass
class MotionCorParams:
    """MotionCor2's options that this engine honours (names follow the flags)."""

    in_path: Path
    out_mrc: Path
    gain: Path | None = None
    rot_gain: int = 0
    flip_gain: int = 0
    pixel_size_A: float | None = None
    kv: float = 300.0
    fm_dose: float | None = None  # e/A^2 per frame (MotionCor2's unit, not e/px)
    init_dose: float = 0.0  # e/A^2 received before the first frame
    patch: tuple[int, int] = (0, 0)
    group: tuple[int, int] = (1, 1)  # -Group: frames summed for global / patch alignment
    iterations: int = 7
    tolerance_px: float = 0.5
    bfactor: tuple[float, float] = (500.0, 150.0)
    ft_bin: float = 1.0
    log_dir: Path | None = None
    fm_ref: int = -1
    throw: int = 0
    trunc: int = 0
    preview: bool = True
    eer_sampling: int = 1  # -EerSampling: 1 = detector grid (4k), 2 = 8k, 3 = 16k
    fm_int_file: Path | None = None  # -FmIntFile: EER raw frames per fraction (required for EER)

    def validate(self) -> None:
        """Refuse impossible values before any file is read (fail fast, name the flag)."""
        if self.rot_gain not in (0, 1, 2, 3):
            raise MotionCorError(f"-RotGain must be 0, 1, 2 or 3, got {self.rot_gain}")
        if self.flip_gain not in (0, 1, 2):
            raise MotionCorError(f"-FlipGain must be 0, 1 or 2, got {self.flip_gain}")
        if self.pixel_size_A is not None and not self.pixel_size_A > 0:
            raise MotionCorError(f"-PixSize must be > 0, got {self.pixel_size_A}")
        if self.fm_dose is not None and not self.fm_dose > 0:
            raise MotionCorError(f"-FmDose must be > 0, got {self.fm_dose}")
        if self.init_dose < 0:
            raise MotionCorError(f"-InitDose must be >= 0, got {self.init_dose}")
        if self.fm_dose is not None and not 200.0 <= self.kv <= 300.0:
            raise MotionCorError(
                f"-kV {self.kv}: dose weighting has a published critical-exposure model only for "
                "200-300 kV (Grant & Grigorieff 2015)"
            )
        if self.iterations < 1:
            raise MotionCorError(f"-Iter must be >= 1, got {self.iterations}")
        if not self.tolerance_px > 0:
            raise MotionCorError(f"-Tol must be > 0, got {self.tolerance_px}")
        if any(b < 0 for b in self.bfactor):
            raise MotionCorError(f"-Bft must be >= 0, got {self.bfactor}")
        if not self.ft_bin >= 1.0:
            raise MotionCorError(f"-FtBin must be >= 1, got {self.ft_bin}")
        if any(p < 0 for p in self.patch) or (self.patch[0] > 1) != (self.patch[1] > 1):
            raise MotionCorError(f"-Patch needs two values both > 1 (or 0 0), got {self.patch}")
        if min(self.group) < 1:
            raise MotionCorError(f"-Group must be >= 1, got {self.group}")
        if self.group[0] != 1:
            raise MotionCorError(
                f"-Group {self.group[0]}: frame grouping for global alignment is not implemented "
                "in the built-in engine (use 1)"
            )
        if self.throw < 0 or self.trunc < 0:
            raise MotionCorError(f"-Throw/-Trunc must be >= 0, got {self.throw}/{self.trunc}")
        out_suffix = Path(self.out_mrc).suffix.lower()
        if out_suffix not in (".mrc", ".mrcs"):
            raise MotionCorError(f"-OutMrc {self.out_mrc}: output must be an .mrc file")
        if self.eer_sampling not in (1, 2, 3):
            raise MotionCorError(f"-EerSampling must be 1, 2 or 3, got {self.eer_sampling}")
        is_eer = Path(self.in_path).suffix.lower() == ".eer"
        if is_eer and self.fm_int_file is None:
            raise MotionCorError(
                f"-InEer {self.in_path}: give -FmIntFile (raw frames per fraction); without it "
                "every raw EER frame would be aligned on its own"
            )
        if not is_eer and self.fm_int_file is not None:
            raise MotionCorError("-FmIntFile: frame grouping is implemented for EER input only")


@dataclass
class MotionCorResult:
    """What one run produced: shifts (n, 2) (x, y) input px relative to ``ref_frame``, and files."""

    shifts_px: np.ndarray
    ref_frame: int
    iterations: int
    converged: bool
    errors_px: list[float]
    sum_path: Path
    dw_path: Path | None = None
    log_paths: list[Path] = field(default_factory=list)
    preview_path: Path | None = None
    pixel_size_A: float | None = None
    seconds: float = 0.0
    patch_shifts: np.ndarray | None = None  # (n_frames, n_patches, 2) residual local shifts
    patch_centres: np.ndarray | None = None  # (n_patches, 2) (x, y) input px
    local_motion: LocalMotion | None = None  # fitted patch model (input px)
    local_applied: bool = False  # False: the model fitted noise, the sum is global only


# --------------------------------------------------------------------------- Fourier helpers


def _even(n: float) -> int:
    return max(2, int(round(n / 2.0)) * 2)


def crop_rfft(spec: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Crop an rfft2 spectrum of a (ny, nx) image to the spectrum of an (my, mx) image (even).

    Fourier cropping is exact binning without aliasing: what it keeps is unchanged.
    """
    my, mx = shape
    ny = spec.shape[-2]
    if my == ny and mx // 2 + 1 == spec.shape[-1]:
        return spec
    h = my // 2
    out = np.empty(spec.shape[:-2] + (my, mx // 2 + 1), dtype=spec.dtype)
    out[..., :h, :] = spec[..., :h, : mx // 2 + 1]
    out[..., h:, :] = spec[..., ny - h :, : mx // 2 + 1]
    return out


def _ramp_1d(n: int, shift: float, half: bool) -> np.ndarray:
    k = np.fft.rfftfreq(n) if half else np.fft.fftfreq(n)
    return np.exp(-2j * np.pi * k * shift).astype(np.complex64)


def phase_ramp(shape: tuple[int, int], dx: float, dy: float) -> tuple[np.ndarray, np.ndarray]:
    """Separable factors (column, row) of the rfft2 phase ramp moving content by (dx, dy)."""
    ny, nx = shape
    return _ramp_1d(ny, dy, False)[:, None], _ramp_1d(nx, dx, True)[None, :]


def _freq2(shape: tuple[int, int]) -> np.ndarray:
    """|f|^2 in cycles/px on the rfft2 grid of ``shape``."""
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)
    return fy[:, None] ** 2 + fx[None, :] ** 2


def trajectory_rms_error(estimated: np.ndarray, true: np.ndarray) -> float:
    """RMS over frames of |estimated - true| (px) after removing their constant offset.

    Only relative motion is measurable: each trajectory may be referred to a different frame
    (ours to -FmRef, the generator's to frame 0), so the best constant is taken out first.
    """
    est = np.asarray(estimated, dtype=np.float64)
    tru = np.asarray(true, dtype=np.float64)
    if est.shape != tru.shape or est.ndim != 2 or est.shape[1] != 2:
        raise ValueError(f"trajectories must both be (n, 2), got {est.shape} and {tru.shape}")
    d = est - tru
    d -= d.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(d * d, axis=1))))


def critical_exposure(k_inv_A: np.ndarray, kv: float) -> np.ndarray:
    """Grant & Grigorieff (2015) critical exposure (e/A^2) at spatial frequency k (1/A).

    Ne(k) = 0.245 k^-1.665 + 2.81 at 300 kV; scaled by 0.8 at 200 kV (linear in between).
    """
    scale = 0.8 + 0.2 * (kv - 200.0) / 100.0
    with np.errstate(divide="ignore"):
        ne = 0.24499 * np.power(k_inv_A, -1.6649) + 2.8141
    return (ne * scale).astype(np.float32)


# --------------------------------------------------------------------------- gain


def transform_gain(gain: np.ndarray, rot_gain: int, flip_gain: int) -> np.ndarray:
    """Apply MotionCor2's -RotGain then -FlipGain to a gain reference array (rows = y).

    MotionCor2 rotates "counter-clockwise" with y pointing up (MRC display); on an array whose
    row 0 is shown at the top that is a clockwise turn, i.e. ``np.rot90(gain, -rot_gain)`` (the
    same as RELION's "clockwise in relion_display"). -FlipGain 1 flips upside down (rows),
    2 left-right (columns).
    """
    out = np.rot90(gain, -rot_gain)
    if flip_gain == 1:
        out = out[::-1, :]
    elif flip_gain == 2:
        out = out[:, ::-1]
    return np.ascontiguousarray(out, dtype=np.float32)


def load_gain(params: MotionCorParams, frame_shape: tuple[int, int]) -> np.ndarray | None:
    """Read, orient and check the gain reference against the movie's frame size."""
    if params.gain is None:
        return None
    try:
        gain = read_image(params.gain)
    except ImageReadError as exc:
        raise MotionCorError(f"-Gain: {exc}") from exc
    gain = transform_gain(gain, params.rot_gain, params.flip_gain)
    if Path(params.in_path).suffix.lower() == ".eer":  # a detector-size gain for 8k/16k EER
        gain = upsample_gain(gain, frame_shape)  # repeated, as MotionCor2 does
    if gain.shape != frame_shape:
        raise MotionCorError(
            f"-Gain {params.gain}: size {gain.shape[1]}x{gain.shape[0]} (after -RotGain "
            f"{params.rot_gain} -FlipGain {params.flip_gain}) does not match the movie frames "
            f"{frame_shape[1]}x{frame_shape[0]}"
        )
    if not np.all(np.isfinite(gain)):
        raise MotionCorError(f"-Gain {params.gain}: contains NaN or infinite values")
    if np.all(gain == 0):
        raise MotionCorError(f"-Gain {params.gain}: is all zeros")
    return gain


# --------------------------------------------------------------------------- alignment


def _subpixel(c_m: float, c_0: float, c_p: float) -> float:
    """Offset of a peak from 3 samples: Gaussian fit (exact for Gaussian peaks), else parabola."""
    if c_m > 0 and c_0 > 0 and c_p > 0:
        lm, l0, lp = math.log(c_m), math.log(c_0), math.log(c_p)
        den = lm - 2.0 * l0 + lp
        if den < 0:
            return float(np.clip(0.5 * (lm - lp) / den, -1.0, 1.0))
    den = c_m - 2.0 * c_0 + c_p
    if den < 0:
        return float(np.clip(0.5 * (c_m - c_p) / den, -1.0, 1.0))
    return 0.0


def smooth_trajectory(shifts: np.ndarray, weight: float) -> np.ndarray:
    """MotionCor2's CStackShift::Smooth: s_i <- w s_i + (1 - w)/2 (s_i-1 + s_i+1), ends kept."""
    out = shifts.copy()
    if len(shifts) > 2 and weight < 1.0:
        out[1:-1] = weight * shifts[1:-1] + 0.5 * (1.0 - weight) * (shifts[:-2] + shifts[2:])
    return out


# A cross-validated smoothing strength at least this large means the measured trajectory is
# mostly noise; below it MotionCor2's own passes are kept (they did as well or better there).
NOISE_LIMITED_LAMBDA = 1.0


def smooth_trajectory_adaptive(shifts: np.ndarray, order: int = 3) -> tuple[np.ndarray, float]:
    """Whittaker smoothing of a (n, 2) trajectory, its strength chosen by generalised
    cross-validation (Craven & Wahba): the same data decide how much is noise.

    Why not fixed weights: per-frame noise varies by orders of magnitude with dose and contrast;
    fixed passes under-smooth noise-limited movies and blur sharp, well-measured ones. The
    ``order``-th difference penalty leaves polynomials of degree < ``order`` untouched, so a
    fast-then-slowing beam-induced drift is kept. Returns the smoothed trajectory and the
    chosen strength (0 when there are too few frames to choose one).
    """
    y = np.asarray(shifts, dtype=np.float64)
    n = len(y)
    if n <= order + 2:
        return y.copy(), 0.0
    d = np.diff(np.eye(n), order, axis=0)
    evals, vecs = np.linalg.eigh(d.T @ d)
    evals = np.clip(evals, 0.0, None)
    coef = vecs.T @ y  # the data in the penalty's eigenbasis
    best: tuple[float, np.ndarray, float] | None = None
    for lam in np.logspace(-3, 6, 91):
        keep = 1.0 / (1.0 + lam * evals)
        resid = ((1.0 - keep)[:, None] * coef) ** 2  # |y - H y|^2, per mode (V orthonormal)
        score = n * float(resid.sum()) / max(n - float(keep.sum()), 1e-9) ** 2
        if best is None or score < best[0]:
            best = (score, keep, float(lam))
    assert best is not None
    return vecs @ (best[1][:, None] * coef), best[2]


def smooth_global_trajectory(shifts: np.ndarray) -> np.ndarray:
    """MotionCor2's passes, or the cross-validated fit where the measurements are noise."""
    adaptive, lam = smooth_trajectory_adaptive(shifts)
    if lam >= NOISE_LIMITED_LAMBDA:
        return adaptive
    return smooth_trajectory(smooth_trajectory(shifts, 0.5), 0.4)


def find_peak(cc: np.ndarray, max_shift: float) -> tuple[float, float]:
    """Sub-pixel (dx, dy) of the highest correlation within ``max_shift`` px of zero (periodic)."""
    ny, nx = cc.shape
    r = int(min(max_shift, ny // 2 - 2, nx // 2 - 2))
    win = np.roll(np.roll(cc, r, axis=0), r, axis=1)[: 2 * r + 1, : 2 * r + 1]
    iy, ix = np.unravel_index(int(np.argmax(win)), win.shape)
    iy, ix = int(iy) - r, int(ix) - r
    c0 = cc[iy % ny, ix % nx]
    dy = _subpixel(cc[(iy - 1) % ny, ix % nx], c0, cc[(iy + 1) % ny, ix % nx])
    dx = _subpixel(cc[iy % ny, (ix - 1) % nx], c0, cc[iy % ny, (ix + 1) % nx])
    return ix + dx, iy + dy


@dataclass
class AlignOutcome:
    shifts: np.ndarray  # (n, 2) in the units of the grid the spectra were cropped from
    iterations: int
    converged: bool
    errors: list[float]


def align_spectra(
    spectra: np.ndarray,
    grid_shape: tuple[int, int],
    bfactor: float,
    iterations: int,
    tolerance: float,
    max_shift: float | None = None,
    binning: tuple[float, float] = (1.0, 1.0),
    smooth: Sequence[float] = (0.5, 0.4),
) -> AlignOutcome:
    """Iterative frame-vs-sum-of-others alignment of rfft2 ``spectra`` (n, my, mx//2+1).

    ``binning`` (bx, by) converts grid px to the caller's px: returned shifts and ``tolerance``
    are in the caller's px. ``bfactor`` is MotionCor2's -Bft in (caller's) px^2 units: the
    correlation is low-passed by ``exp(-B f^2 / 2)`` with f in cycles per caller's pixel.
    ``smooth``: the weights of MotionCor2's two final neighbour-smoothing passes (0.5, then
    0.3 + 0.1 * group size); ``()`` returns the raw per-frame measurements.
    """
    n = spectra.shape[0]
    my, mx = grid_shape
    bx, by = binning
    f2 = (np.fft.fftfreq(my)[:, None] / by) ** 2 + (np.fft.rfftfreq(mx)[None, :] / bx) ** 2
    filt = np.exp(-0.5 * bfactor * f2).astype(np.float32)
    filt[0, 0] = 0.0  # no DC: the mean dose carries no position
    if max_shift is None:
        max_shift = min(my, mx) / 4.0
    shifts = np.zeros((n, 2))
    errors: list[float] = []
    converged = False
    aligned = np.empty_like(spectra[0])
    it = 0
    for it in range(1, iterations + 1):
        ramps = [phase_ramp((my, mx), -shifts[i, 0] / bx, -shifts[i, 1] / by) for i in range(n)]
        total = np.zeros_like(spectra[0])
        for i in range(n):
            total += spectra[i] * ramps[i][0] * ramps[i][1]
        updates = np.zeros((n, 2))
        # Correlations in batches: one threaded transform of many small maps is much faster
        # than as many single ones (patches), at a bounded extra memory (~16 MB of spectra).
        batch = max(1, min(n, (16 << 20) // max(spectra[0].nbytes, 1)))
        prod = np.empty((batch,) + spectra[0].shape, dtype=spectra.dtype)
        for i0 in range(0, n, batch):
            idx = range(i0, min(n, i0 + batch))
            for j, i in enumerate(idx):
                np.multiply(spectra[i], ramps[i][0], out=aligned)
                aligned *= ramps[i][1]
                np.multiply(aligned, np.conj(total - aligned), out=prod[j])
                prod[j] *= filt
            cc = sfft.irfft2(prod[: len(idx)], s=(my, mx), workers=fft_workers())
            for j, i in enumerate(idx):
                dx, dy = find_peak(cc[j], max_shift)
                updates[i] = (dx * bx, dy * by)
        # Only relative motion is defined: keep the mean update from drifting the whole stack.
        updates -= updates.mean(axis=0)
        shifts += updates
        err = float(np.max(np.hypot(updates[:, 0], updates[:, 1])))
        errors.append(err)
        if err < tolerance and it > 1:
            converged = True
            break
    for w in smooth:
        shifts = smooth_trajectory(shifts, w)
    return AlignOutcome(shifts=shifts, iterations=it, converged=converged, errors=errors)


def edge_taper(shape: tuple[int, int], fraction: float = 0.1) -> np.ndarray:
    """A separable cosine (Tukey) window falling to 0 over ``fraction`` of each side."""

    def tukey(n: int) -> np.ndarray:
        w = np.ones(n, dtype=np.float32)
        m = max(int(n * fraction), 1)
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(m) + 0.5) / m)
        w[:m] = ramp
        w[n - m :] = ramp[::-1]
        return w

    return tukey(shape[0])[:, None] * tukey(shape[1])[None, :]


def tapered_spectra(spec: Sequence[np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """Alignment spectra on ``grid``: each frame Fourier-cropped, mean removed, edges tapered.

    Why: a frame is not periodic, so its FFT carries the step at the image border. That step is
    the same in every frame and would pull every correlation peak towards zero shift; fading the
    borders removes it. Done at the small alignment size (two small FFTs per frame).
    """
    win = edge_taper(grid)
    out = np.empty((len(spec), grid[0], grid[1] // 2 + 1), dtype=np.complex64)
    for i in range(len(spec)):
        small = sfft.irfft2(crop_rfft(spec[i], grid), s=grid, workers=fft_workers())
        small -= small.mean()
        small *= win
        out[i] = sfft.rfft2(small, workers=fft_workers())
    return out


def _xcf_bin(shape: tuple[int, int]) -> float:
    """MotionCor2's alignment binning: the shorter side is brought down to 2048 px."""
    return max(1.0, min(shape) / 2048.0)


def _xcf_grid(shape: tuple[int, int], bfactor_out: float) -> tuple[int, int]:
    """The alignment grid: a crop of ``shape`` to MotionCor2's xcf size, cut further where the
    B-factor filter (``bfactor_out`` in px^2 of ``shape``) has fallen below 1e-4."""
    ny, nx = shape
    frac = 1.0 / _xcf_bin(shape)
    if bfactor_out > 0:
        f_cut = math.sqrt(2.0 * math.log(1e4) / bfactor_out)  # cycles per px of ``shape``
        frac = min(frac, 2.0 * f_cut * 1.15)
    my = sfft.next_fast_len(_even(max(ny * frac, 64)), real=True)
    mx = sfft.next_fast_len(_even(max(nx * frac, 64)), real=True)
    return (_even(min(my, ny)), _even(min(mx, nx)))


# --------------------------------------------------------------------------- logs


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)


def format_full_log(shifts: np.ndarray, patch: bool) -> str:
    """MotionCor2's -Full.log / -Patch-Full.log text: '#' headers, then frame, x, y."""
    head = (
        "# Patch based alignment\n# Initial alignment based upon full frames\n\n"
        if patch
        else "# full frame alignment\n"
    )
    rows = "".join(f"{i + 1:4d}  {x:8.2f}  {y:8.2f}\n" for i, (x, y) in enumerate(shifts))
    return head + rows


def format_patch_logs(
    centres: np.ndarray, pshifts: np.ndarray, size: tuple[int, int, int]
) -> tuple[str, str]:
    """MotionCor2's -Patch-Patch.log (per patch) and -Patch-Frame.log (per frame) texts."""
    n_frames, n_patches = pshifts.shape[:2]
    head = (
        f"# Patch based alignment\n# Number of patches: {n_patches}\n"
        "# Shifts are listed per {what}.\n"
        f"# Movie size: {size[0]}  {size[1]}  {size[2]}\n\n"
    )
    per_patch = [head.format(what="patch")]
    for p in range(n_patches):
        per_patch.append(f"#Patch {p + 1:03d} raw and fit shifts\n")
        cx, cy = centres[p]
        for f in range(n_frames):
            sx, sy = pshifts[f, p]
            per_patch.append(f"{f + 1:4d} {cx:8.2f} {cy:8.2f} {sx:8.2f} {sy:8.2f} {0:4d}\n")
        per_patch.append("\n")
    per_frame = [head.format(what="frame")]
    for f in range(n_frames):
        for p in range(n_patches):
            cx, cy = centres[p]
            sx, sy = pshifts[f, p]
            per_frame.append(f"{f + 1:4d} {cx:8.2f} {cy:8.2f} {sx:8.2f} {sy:8.2f} {0:4d}\n")
        per_frame.append("\n")
    return "".join(per_patch), "".join(per_frame)


# --------------------------------------------------------------------------- main work


def _out_shape(shape: tuple[int, int], ft_bin: float) -> tuple[int, int]:
    ny, nx = shape
    if ft_bin == 1.0:
        return ny - ny % 2, nx - nx % 2
    return _even(ny / ft_bin), _even(nx / ft_bin)


PATCH_WINDOW_PX = 8.0  # largest residual local shift searched for (output px)
MAX_FIT_RESIDUAL_PX = 1.0  # a patch model fitting worse than this is noise: not applied


def _patch_layout(grid: tuple[int, int], patch: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """MotionCor2's -Patch px py: px * py non-overlapping patches (y0, x0, ph, pw), row by row."""
    gy, gx = grid
    px, py = patch
    ph, pw = _even(gy / py), _even(gx / px)
    return [
        (min(j * ph, gy - ph), min(i * pw, gx - pw), ph, pw) for j in range(py) for i in range(px)
    ]


def _measure_patches(
    frames: np.ndarray,
    out_shape: tuple[int, int],
    shifts_out: np.ndarray,
    patch: tuple[int, int],
    bfactor: float,
    iterations: int,
    tolerance: float,
    group: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Residual local motion per patch after global correction, in output px.

    ``group`` (-Group's second value, as MotionCor2): patches are aligned on sums of that many
    consecutive frames, each frame reporting its group's shift. Why: a patch holds 1/P of the
    frame's signal; at realistic contrast single-frame patch correlations are mostly noise.

    ``frames`` (n, gy, gx) are the frames on the patch grid (a Fourier-binned copy of the output
    grid, kept from the first pass); they are moved by the global shifts in place. ``bfactor``
    is in output px^2. Returns patch centres (P, 2) and shifts (n, P, 2), both (x, y) output px.
    """
    n, gy, gx = frames.shape
    oy, ox = out_shape
    pbin = (ox / gx, oy / gy)
    workers = fft_workers()
    for i in range(n):
        r0, r1 = phase_ramp((gy, gx), -shifts_out[i, 0] / pbin[0], -shifts_out[i, 1] / pbin[1])
        spec = sfft.rfft2(frames[i], workers=workers)
        spec *= r0
        spec *= r1
        frames[i] = sfft.irfft2(spec, s=(gy, gx), workers=workers)
    starts = list(range(0, n, group)) if 1 < group < n else list(range(n))
    members = np.searchsorted(starts, np.arange(n), side="right") - 1  # frame -> group
    if len(starts) < n:
        # Each group's sum goes to slot g <= its first frame: slots are only overwritten once
        # their own group has been summed, so no second copy of the stack is needed.
        for g, a in enumerate(starts):
            frames[g] = frames[a : a + group].sum(axis=0)
    layout = _patch_layout((gy, gx), patch)
    pshifts = np.zeros((n, len(layout), 2))
    centres = []
    for k, (y0, x0, ph, pw) in enumerate(layout):
        tile = frames[: len(starts), y0 : y0 + ph, x0 : x0 + pw]
        tile = (tile - tile.mean(axis=(1, 2), keepdims=True)) * edge_taper((ph, pw))
        spec = sfft.rfft2(tile, workers=workers)
        # Residual local motion is a few px: a small search window keeps noise peaks out.
        window = min(ph / 8, max(3.0, PATCH_WINDOW_PX / min(pbin)))
        res = align_spectra(
            spec, (ph, pw), bfactor, iterations, tolerance, max_shift=window, binning=pbin
        )
        pshifts[:, k] = res.shifts[members]
        centres.append(((x0 + pw / 2.0) * pbin[0], (y0 + ph / 2.0) * pbin[1]))
    return np.asarray(centres), pshifts


@dataclass
class LocalMotion:
    """Smooth local motion, MotionCor2's model: per axis a polynomial in x, y (up to quadratic,
    as far as the patch grid supports) times (t, t^2, t^3), t = (frame - ref) / n_frames.

    It is zero in the reference frame and is added to the global shift: content at position
    (x, y) of the reference frame sits at ``(x, y) + global[i] + shifts(x, y)[i]`` in frame i.
    Why this model: the patch measurements are noisy (a patch has 1/P of the frame's signal);
    a few smooth terms fitted to all patches and frames at once average that noise away.
    """

    coeffs: np.ndarray  # (n_terms, 2) (x, y) px
    powers: list[tuple[int, int, int]]  # (x power, y power, t power) per term
    shape: tuple[int, int]  # (ny, nx) of the frame the coordinates are in
    ref: int
    n_frames: int
    rms_residual_px: float = 0.0  # patch measurements minus the model (after outliers)
    n_rejected: int = 0

    def _design(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        ny, nx = self.shape
        u = 2.0 * np.asarray(x, float) / nx - 1.0
        v = 2.0 * np.asarray(y, float) / ny - 1.0
        t = (np.arange(self.n_frames) - self.ref) / self.n_frames
        return np.stack(
            [t[:, None] ** c * (u**a * v**b)[None, :] for a, b, c in self.powers], axis=-1
        )  # (n_frames, len(x), n_terms)

    def shifts(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n_frames, len(x), 2): the local part of the motion at positions (x, y)."""
        return self._design(x, y) @ self.coeffs

    def scaled(self, bx: float, by: float) -> LocalMotion:
        """The same model in px ``(bx, by)`` times larger (e.g. output -> input px)."""
        ny, nx = self.shape
        return LocalMotion(
            coeffs=self.coeffs * np.array([bx, by]),
            powers=list(self.powers),
            shape=(int(round(ny * by)), int(round(nx * bx))),
            ref=self.ref,
            n_frames=self.n_frames,
            rms_residual_px=self.rms_residual_px * max(bx, by),
            n_rejected=self.n_rejected,
        )


def fit_local_motion(
    centres: np.ndarray, pshifts: np.ndarray, shape: tuple[int, int], ref: int
) -> LocalMotion:
    """Least-squares fit of :class:`LocalMotion` to per-patch trajectories (n, P, 2).

    Each patch trajectory is only known up to a constant (it was aligned to its own mean), so
    data and model are both centred over frames per patch before fitting. One pass of outlier
    rejection (> 3 robust sigma) follows, for patches over ice-free carbon or a contaminant.
    """
    n, n_p, _ = pshifts.shape
    nxs = len(np.unique(np.round(centres[:, 0], 3)))
    nys = len(np.unique(np.round(centres[:, 1], 3)))
    spatial = [(0, 0), (1, 0), (0, 1)]
    if nxs >= 2 and nys >= 2:
        spatial.append((1, 1))
    if nxs >= 3:
        spatial.append((2, 0))
    if nys >= 3:
        spatial.append((0, 2))
    powers = [(a, b, c) for c in (1, 2, 3) for a, b in spatial]
    model = LocalMotion(np.zeros((len(powers), 2)), powers, shape, ref, n)
    design = model._design(centres[:, 0], centres[:, 1])
    design = design - design.mean(axis=0, keepdims=True)
    data = pshifts - pshifts.mean(axis=0, keepdims=True)
    a = design.reshape(n * n_p, -1)
    d = data.reshape(n * n_p, 2)
    keep = np.ones(n * n_p, bool)
    for _ in range(2):
        coeffs, *_ = np.linalg.lstsq(a[keep], d[keep], rcond=None)
        res = np.hypot(*(d - a @ coeffs).T)
        sigma = 1.4826 * float(np.median(res[keep])) + 1e-6
        keep = res < 3.0 * sigma + 0.05
    model.coeffs = coeffs
    model.rms_residual_px = float(np.sqrt(np.mean(res[keep] ** 2))) if keep.any() else 0.0
    model.n_rejected = int((~keep).sum())
    return model


def _tile_hop(shape: tuple[int, int]) -> int:
    """Correction tile spacing: about a tenth of the shorter side, 96-384 px (tiles 4/3 of it,
    FFT-friendly 128-512 px). Why: the shift is constant per tile, so tiles must be small
    against the field's scale; much smaller tiles only add overhead."""
    target = max(96.0, min(shape) / 10.0)
    return max(h for h in (96, 192, 288, 384) if h <= target)


def _pou_window(t: int, overlap: int) -> np.ndarray:
    """1-D tile window: sin^2 rise over ``overlap``, flat, cos^2 fall; at hop t - overlap the
    windows of neighbouring tiles add up to exactly 1 (a partition of unity)."""
    ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
    w = np.ones(t)
    w[:overlap] = ramp
    w[t - overlap :] = ramp[::-1]
    return w.astype(np.float32)


class _DoseWeights:
    """Grant & Grigorieff (2015) per-frame filters on one rfft grid (why a class: the full
    frame and the local-correction tiles need them on different grids)."""

    def __init__(
        self, params: MotionCorParams, grid: tuple[int, int], out_pixel: float, first: int, n: int
    ) -> None:
        ne = critical_exposure(np.sqrt(_freq2(grid)) / out_pixel, params.kv)
        dose_A2 = params.fm_dose  # -FmDose is e/A^2 per frame, as MotionCor2 takes it
        assert dose_A2 is not None
        self.step = np.exp(-dose_A2 / (2.0 * ne)).astype(np.float32)  # one frame's attenuation
        # Exposure at the end of the first summed frame (pre-exposure, thrown frames included).
        self.weight = np.exp(-(params.init_dose + dose_A2 * (first + 1)) / (2.0 * ne)).astype(
            np.float32
        )
        # sum_i weight_i^2 is a geometric series in step^2 (n where there is no attenuation).
        q2 = self.step.astype(np.float64) ** 2
        w2 = np.where(
            1.0 - q2 > 1e-9,
            self.weight.astype(np.float64) ** 2 * (1.0 - q2**n) / np.maximum(1.0 - q2, 1e-300),
            n * self.weight.astype(np.float64) ** 2,
        )
        # Noise-power restoring normalisation (Grant & Grigorieff 2015, eq. 9), scaled so that
        # the DC term (weight 1 in every frame) equals the plain sum's.
        self.norm = np.sqrt(n / np.maximum(w2, 1e-30)).astype(np.float32)

    def next(self) -> np.ndarray:
        """This frame's filter; advances to the next frame."""
        w = self.weight.copy()
        self.weight *= self.step
        return w


class _FourierSum:
    """Global correction: each frame's spectrum moved by a phase ramp and added in place."""

    def __init__(self, out_shape: tuple[int, int], dose: _DoseWeights | None) -> None:
        self.shape = out_shape
        self.acc = np.zeros((out_shape[0], out_shape[1] // 2 + 1), dtype=np.complex64)
        self.dose = dose
        self.dw_acc = np.zeros_like(self.acc) if dose is not None else None

    def add(self, spec: np.ndarray, shift: np.ndarray) -> None:
        r0, r1 = phase_ramp(self.shape, -shift[0], -shift[1])
        spec *= r0
        spec *= r1
        self.acc += spec
        if self.dose is not None and self.dw_acc is not None:
            spec *= self.dose.next()
            self.dw_acc += spec

    def result(self, scale: float) -> tuple[np.ndarray, np.ndarray | None]:
        w = fft_workers()
        total = sfft.irfft2(self.acc, s=self.shape, workers=w).astype(np.float32) * scale
        dw = None
        if self.dose is not None and self.dw_acc is not None:
            self.dw_acc *= self.dose.norm
            dw = sfft.irfft2(self.dw_acc, s=self.shape, workers=w).astype(np.float32) * scale
        return total, dw


class _TileSum:
    """Local correction: the frame is cut into overlapping tiles (4/3 of :func:`_tile_hop`);
    each tile is taken from where its content sits in this frame (global + local shift at its
    centre, the integer part by where it is cut, the fraction by an exact phase ramp) and added
    to that tile's running spectrum. At the end each tile is transformed back once and the
    tiles are blended with a partition-of-unity window.

    Why tiles and not per-pixel interpolation: Fourier shifts keep the high frequencies that
    interpolation would blur, the sum stays in place (one spectrum per tile, no frame stack),
    and the cost is about 1.8x one full-frame FFT per frame.
    """

    def __init__(
        self,
        out_shape: tuple[int, int],
        model: LocalMotion,
        dose_grid: _DoseWeights | None,
    ) -> None:
        oy, ox = out_shape
        self.shape = out_shape
        self.hop = _tile_hop(out_shape)
        self.t = self.hop * 4 // 3
        self.overlap = self.t - self.hop
        start = -self.overlap // 2
        self.ys = list(range(start, oy, self.hop))
        self.xs = list(range(start, ox, self.hop))
        self.model = model
        cy = np.clip(np.array(self.ys, float) + self.t / 2.0, 0.0, oy)
        cx = np.clip(np.array(self.xs, float) + self.t / 2.0, 0.0, ox)
        gy, gx = np.meshgrid(cy, cx, indexing="ij")
        self.local = model.shifts(gx.ravel(), gy.ravel())  # (n, tiles, 2)
        n_tiles = len(self.ys) * len(self.xs)
        spec_shape = (n_tiles, self.t, self.t // 2 + 1)
        self.acc = np.zeros(spec_shape, dtype=np.complex64)
        self.dose = dose_grid
        self.dw_acc = np.zeros_like(self.acc) if dose_grid is not None else None
        self.ky = np.fft.fftfreq(self.t).astype(np.float32)[None, :, None]
        self.kx = np.fft.rfftfreq(self.t).astype(np.float32)[None, None, :]
        self.pad = self.overlap + self.t
        self.buf: np.ndarray | None = None
        self.k = 0

    def add(self, frame: np.ndarray, shift: np.ndarray) -> None:
        """Add one frame (real, output grid) whose global shift is ``shift`` (output px)."""
        oy, ox = self.shape
        s = shift[None, :] + self.local[self.k]  # (tiles, 2)
        self.k += 1
        whole = np.round(s).astype(int)
        frac = (s - whole).astype(np.float32)
        p = self.pad + int(np.abs(whole).max())
        if self.buf is None or self.buf.shape != (oy + 2 * p, ox + 2 * p):
            self.buf = np.empty((oy + 2 * p, ox + 2 * p), np.float32)
        buf = self.buf
        fill = float(frame.mean())  # beyond the detector: the mean, not a wrapped edge
        buf[:p] = fill
        buf[-p:] = fill
        buf[:, :p] = fill
        buf[:, -p:] = fill
        buf[p : p + oy, p : p + ox] = frame
        weight = self.dose.next() if self.dose is not None else None
        t, nxt = self.t, len(self.xs)
        tiles = np.empty((nxt, t, t), np.float32)
        workers = fft_workers()
        for j, y0 in enumerate(self.ys):
            row = slice(j * nxt, (j + 1) * nxt)
            for i, x0 in enumerate(self.xs):
                dx, dy = whole[j * nxt + i]
                r, c = p + y0 + dy, p + x0 + dx
                tiles[i] = buf[r : r + t, c : c + t]
            spec = sfft.rfft2(tiles, workers=workers)
            f = frac[row]
            spec *= np.exp(2j * np.pi * self.ky * f[:, 1, None, None]).astype(np.complex64)
            spec *= np.exp(2j * np.pi * self.kx * f[:, 0, None, None]).astype(np.complex64)
            self.acc[row] += spec
            if weight is not None and self.dw_acc is not None:
                spec *= weight
                self.dw_acc[row] += spec

    def _blend(self, acc: np.ndarray) -> np.ndarray:
        oy, ox = self.shape
        t, h = self.t, self.overlap // 2
        w1 = _pou_window(t, self.overlap)
        w2 = w1[:, None] * w1[None, :]
        out = np.zeros((oy + 2 * t, ox + 2 * t), np.float32)
        wsum = np.zeros_like(out)
        nxt = len(self.xs)
        for j, y0 in enumerate(self.ys):
            row = sfft.irfft2(acc[j * nxt : (j + 1) * nxt], s=(t, t), workers=fft_workers())
            for i, x0 in enumerate(self.xs):
                out[y0 + h : y0 + h + t, x0 + h : x0 + h + t] += row[i] * w2
                wsum[y0 + h : y0 + h + t, x0 + h : x0 + h + t] += w2
        return out[h : h + oy, h : h + ox] / wsum[h : h + oy, h : h + ox]

    def result(self, scale: float) -> tuple[np.ndarray, np.ndarray | None]:
        del scale  # the frames were scaled when they were binned
        total = self._blend(self.acc)
        dw = None
        if self.dose is not None and self.dw_acc is not None:
            self.dw_acc *= self.dose.norm
            dw = self._blend(self.dw_acc)
        return total, dw


def _read_frame(movie: MovieInfo, i: int, gain: np.ndarray | None) -> np.ndarray:
    """Frame ``i`` of the movie, gain-corrected, float32 (the engine's one place that reads)."""
    frame = movie.frame(i)
    if gain is not None:
        frame *= gain
    return frame


def run(params: MotionCorParams, echo: bool = False) -> MotionCorResult:
    """Align one movie and write the sum (+ _DW sum, logs, preview). Raises MotionCorError.

    Memory: the movie is read twice, frame by frame (measure, then sum), so what is held is the
    small alignment spectra (and, with -Patch, Fourier-binned patch-grid frames), never the
    full-size frames or spectra of the whole movie.
    """
    t0 = time.perf_counter()
    params.validate()
    try:
        fm_int = None
        if params.fm_int_file is not None:  # with 2 columns, -FmDose is per raw frame
            fm_int = read_fm_int_file(params.fm_int_file, params.fm_dose)
        movie = open_movie(params.in_path, eer_sampling=params.eer_sampling, fm_int=fm_int)
    except (ImageReadError, ValueError) as exc:
        raise MotionCorError(str(exc)) from exc
    # MotionCor2 takes the dose from -FmIntFile (and skips dose weighting without -PixSize or
    # outside its kV range); fractions given a left-over raw frame are weighted as full ones.
    eer_dose = isinstance(movie, EerMovie) and movie.plan.dose_per_raw_frame is not None
    if eer_dose and params.pixel_size_A is not None and 200.0 <= params.kv <= 300.0:
        params = replace(params, fm_dose=movie.plan.fraction_dose())
    with movie:
        n_all, ny, nx = movie.shape
        first, last = params.throw, n_all - params.trunc
        n = last - first
        if n < 2:
            raise MotionCorError(
                f"{params.in_path}: {n_all} frames, -Throw {params.throw} -Trunc {params.trunc} "
                "leave fewer than 2 to align"
            )
        gain = load_gain(params, (ny, nx))
        pixel = params.pixel_size_A or movie.pixel_size_A
        if params.fm_dose is not None and params.pixel_size_A is None:
            raise MotionCorError("-FmDose needs -PixSize for dose weighting")
        out_shape = _out_shape((ny, nx), params.ft_bin)
        oy, ox = out_shape
        bin_out = (nx / ox, ny / oy) if params.ft_bin != 1.0 else (1.0, 1.0)
        workers = fft_workers()
        # -Bft is in px^2 of MotionCor2's binned xcf grid; convert it to output px^2.
        bfactor_out = params.bfactor[0] * _xcf_bin(out_shape) ** 2
        xcf = _xcf_grid(out_shape, bfactor_out)
        xcf_bin = (ox / xcf[1], oy / xcf[0])
        local = params.patch[0] > 1
        bfactor_patch = params.bfactor[1] * _xcf_bin(out_shape) ** 2
        pgrid = _xcf_grid(out_shape, bfactor_patch) if local else (0, 0)

        # Pass 1: one FFT per frame; keep only the small alignment spectra (and patch frames).
        xspec = np.empty((n, xcf[0], xcf[1] // 2 + 1), dtype=np.complex64)
        pframes = np.empty((n, *pgrid), dtype=np.float32) if local else None
        taper = edge_taper(xcf)
        for k in range(n):
            frame = _read_frame(movie, first + k, gain)
            spec = crop_rfft(sfft.rfft2(frame, workers=workers), out_shape)
            del frame
            if not np.isfinite(spec[0, 0]):
                raise MotionCorError(f"{params.in_path}: frames contain NaN or infinite values")
            small = sfft.irfft2(crop_rfft(spec, xcf), s=xcf, workers=workers)
            small -= small.mean()
            small *= taper
            xspec[k] = sfft.rfft2(small, workers=workers)
            if pframes is not None:
                pframes[k] = sfft.irfft2(crop_rfft(spec, pgrid), s=pgrid, workers=workers)
            del spec

        # Alignment on the xcf grid, shifts returned in output px.
        outcome = align_spectra(
            xspec,
            xcf,
            bfactor_out,
            params.iterations,
            params.tolerance_px / max(bin_out),
            binning=xcf_bin,
            smooth=(),
        )
        outcome.shifts = smooth_global_trajectory(outcome.shifts)
        del xspec
        # -FmRef is 1-based in the input movie, thrown frames included (MotionCor2's rule).
        ref = n // 2 if params.fm_ref < 0 else min(max(params.fm_ref - 1 - first, 0), n - 1)
        shifts_out = outcome.shifts - outcome.shifts[ref]
        shifts_in = shifts_out * np.array(bin_out)  # report in input px, like MotionCor2

        out_px = pixel * bin_out[0] if pixel else None
        result = MotionCorResult(
            shifts_px=shifts_in,
            ref_frame=ref,
            iterations=outcome.iterations,
            converged=outcome.converged,
            errors_px=[e * max(bin_out) for e in outcome.errors],
            sum_path=Path(params.out_mrc),
            pixel_size_A=out_px,
        )
        model = None
        if pframes is not None:
            centres, pshifts = _measure_patches(
                pframes,
                out_shape,
                shifts_out,
                params.patch,
                bfactor_patch,
                params.iterations,
                params.tolerance_px / max(bin_out),
                group=params.group[1],
            )
            del pframes
            model = fit_local_motion(centres, pshifts, out_shape, ref)
            result.patch_centres = centres * np.array(bin_out)  # input px, like MotionCor2
            result.patch_shifts = pshifts * np.array(bin_out)
            result.local_motion = model.scaled(*bin_out)
            # At low signal the patch measurements are noise (a patch has 1/P of the frame's
            # signal); a model fitted to noise would blur the sum, so the global sum is kept.
            rejected = model.n_rejected > 0.25 * n * len(centres)
            if model.rms_residual_px * max(bin_out) > MAX_FIT_RESIDUAL_PX or rejected:
                model = None
            result.local_applied = model is not None

        # Pass 2: read each frame again, move it (globally, or tile by tile with the local
        # model) and add it to the sums in place.
        dose_grid = None
        dw_pixel = (params.pixel_size_A or 1.0) * bin_out[0]  # -FmDose needs -PixSize (above)
        summer: _FourierSum | _TileSum
        if model is None:
            if params.fm_dose is not None:
                dose_grid = _DoseWeights(params, out_shape, dw_pixel, first, n)
            summer = _FourierSum(out_shape, dose_grid)
        else:
            hop = _tile_hop(out_shape)
            if params.fm_dose is not None:
                dose_grid = _DoseWeights(params, (hop * 4 // 3,) * 2, dw_pixel, first, n)
            summer = _TileSum(out_shape, model, dose_grid)
        scale = np.float32(oy * ox / (ny * nx))
        for k in range(n):
            frame = _read_frame(movie, first + k, gain)
            if isinstance(summer, _TileSum) and params.ft_bin == 1.0:
                summer.add(frame[:oy, :ox], shifts_out[k])
                continue
            spec = crop_rfft(sfft.rfft2(frame, workers=workers), out_shape)
            del frame
            if isinstance(summer, _TileSum):
                binned = sfft.irfft2(spec, s=out_shape, workers=workers).astype(np.float32)
                summer.add(binned * scale, shifts_out[k])
            else:
                summer.add(spec, shifts_out[k])
    total, dw = summer.result(float(scale))
    del summer
    write_mrc(params.out_mrc, total, out_px)
    if dw is not None:
        dw_path = Path(params.out_mrc).with_name(Path(params.out_mrc).stem + "_DW.mrc")
        write_mrc(dw_path, dw, out_px)
        result.dw_path = dw_path
        del dw
    if params.log_dir is not None:
        result.log_paths = write_logs(params, result, (nx, ny, n))
    if params.preview:
        preview = Path(params.out_mrc).with_name(Path(params.out_mrc).stem + "_preview.png")
        write_preview(preview, total)
        result.preview_path = preview
    result.seconds = time.perf_counter() - t0
    if echo:
        _echo(result)
    return result


def write_logs(params: MotionCorParams, result: MotionCorResult, size: tuple[int, int, int]):
    """Write the shift logs under -LogDir with MotionCor2's names; returns their paths."""
    assert params.log_dir is not None
    base = Path(params.log_dir) / log_stem(params.in_path)
    patch = result.patch_shifts is not None
    paths = [Path(f"{base}-Patch-Full.log" if patch else f"{base}-Full.log")]
    _write_text(paths[0], format_full_log(result.shifts_px, patch))
    if patch:
        assert result.patch_centres is not None and result.patch_shifts is not None
        per_patch, per_frame = format_patch_logs(result.patch_centres, result.patch_shifts, size)
        for suffix, text in (("-Patch-Patch.log", per_patch), ("-Patch-Frame.log", per_frame)):
            paths.append(Path(f"{base}{suffix}"))
            _write_text(paths[-1], text)
    return paths


def _echo(result: MotionCorResult) -> None:
    """Print MotionCor2's stdout markers, so parsers of its console output work on ours too."""
    for i, e in enumerate(result.errors_px):
        print(f"Iteration {i + 1:2d}  Error: {e:9.3f}")
    print("\nFull-frame alignment shift")
    for i, (x, y) in enumerate(result.shifts_px):
        print(f"...... Frame ({i + 1:3d}) shift: {x:9.3f}  {y:9.3f}")
    print("")
    print(f"Global shifts are corrected. Reference frame {result.ref_frame + 1}.")
    if result.patch_shifts is not None:
        lm = result.local_motion
        fit = f" (model fit residual {lm.rms_residual_px:.2f} px)" if lm is not None else ""
        if result.local_applied:
            print(f"Local motion corrected with a smooth patch model{fit}.")
        else:
            print(f"Patch model not applied{fit}: patch signal too weak; global correction only.")
    print(f"Written: {result.sum_path}" + (f", {result.dw_path}" if result.dw_path else ""))
    print(f"Computational time: {result.seconds:.2f} sec")


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cryoflow-motioncor2",
        description="CPU motion correction taking MotionCor2's flags (global and -Patch local).",
        allow_abbrev=False,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-InMrc", type=Path)
    src.add_argument("-InTiff", type=Path)
    src.add_argument("-InEer", type=Path)
    p.add_argument("-EerSampling", type=int, default=1, help="EER: 1 = 4k, 2 = 8k, 3 = 16k")
    p.add_argument("-FmIntFile", type=Path, help="EER: lines 'raw_frames group dose_per_raw'")
    p.add_argument("-OutMrc", type=Path, required=True)
    p.add_argument("-Gain", type=Path)
    p.add_argument("-RotGain", type=int, default=0)
    p.add_argument("-FlipGain", type=int, default=0)
    p.add_argument("-PixSize", type=float)
    p.add_argument("-kV", type=float, default=300.0)
    p.add_argument("-FmDose", type=float)
    p.add_argument("-InitDose", type=float, default=0.0)
    p.add_argument("-Patch", type=int, nargs="+", default=[0, 0])
    p.add_argument("-Group", type=int, nargs="+", default=[1, 1])
    p.add_argument("-Iter", type=int, default=7)
    p.add_argument("-Tol", type=float, default=0.5)
    p.add_argument("-Bft", type=float, nargs="+", default=[500.0, 150.0])
    p.add_argument("-FtBin", type=float, default=1.0)
    p.add_argument("-LogDir", type=Path)
    p.add_argument("-FmRef", type=int, default=-1)
    p.add_argument("-Throw", type=int, default=0)
    p.add_argument("-Trunc", type=int, default=0)
    p.add_argument("-Gpu", type=int, nargs="+", default=[0], help="accepted, ignored (CPU)")
    p.add_argument("-Serial", type=int, default=0, help="only 0 (one movie per call)")
    p.add_argument("-OutStack", type=int, default=0, help="only 0 (no aligned stack)")
    p.add_argument("-Preview", type=int, default=1, help="1: write <OutMrc stem>_preview.png")
    return p


def params_from_args(ns: argparse.Namespace) -> MotionCorParams:
    """Map parsed flags to parameters (refusing the MotionCor2 modes this engine lacks)."""
    if ns.Serial != 0:
        raise MotionCorError("-Serial 1 (batch mode) is not supported; run once per movie")
    if ns.OutStack != 0:
        raise MotionCorError("-OutStack 1 is not supported (no aligned frame stack is written)")
    inputs = {"-InMrc": ns.InMrc, "-InTiff": ns.InTiff, "-InEer": ns.InEer}
    flag, in_path = next((f, p) for f, p in inputs.items() if p is not None)
    suffix = Path(in_path).suffix.lower()
    expected = {
        "-InMrc": (".mrc", ".mrcs", ".st"),
        "-InTiff": (".tif", ".tiff"),
        "-InEer": (".eer",),
    }[flag]
    if suffix not in expected:
        raise MotionCorError(f"{flag} {in_path}: expected a {'/'.join(expected)} file")
    patch = tuple(ns.Patch[:2]) if len(ns.Patch) >= 2 else (ns.Patch[0], ns.Patch[0])
    grp = tuple(ns.Group[:2]) if len(ns.Group) >= 2 else (ns.Group[0], 1)
    bft = tuple(ns.Bft[:2]) if len(ns.Bft) >= 2 else (ns.Bft[0], 150.0)
    return MotionCorParams(
        in_path=in_path,
        out_mrc=ns.OutMrc,
        gain=ns.Gain,
        rot_gain=ns.RotGain,
        flip_gain=ns.FlipGain,
        pixel_size_A=ns.PixSize,
        kv=ns.kV,
        fm_dose=ns.FmDose,
        init_dose=ns.InitDose,
        patch=(int(patch[0]), int(patch[1])),
        group=(int(grp[0]), int(grp[1])),
        iterations=ns.Iter,
        tolerance_px=ns.Tol,
        bfactor=(float(bft[0]), float(bft[1])),
        ft_bin=ns.FtBin,
        log_dir=ns.LogDir,
        fm_ref=ns.FmRef,
        throw=ns.Throw,
        trunc=ns.Trunc,
        preview=bool(ns.Preview),
        eer_sampling=ns.EerSampling,
        fm_int_file=ns.FmIntFile,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``cryoflow-motioncor2``: exit 0 on success, 2 on bad input or flags."""
    ns = _parser().parse_args(argv)
    try:
        params = params_from_args(ns)
        run(params, echo=True)
    except (MotionCorError, ImageReadError) as exc:
        print(f"cryoflow-motioncor2: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
