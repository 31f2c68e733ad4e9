"""Difference-of-Gaussians particle picker after Voss et al. 2009 (J Struct Biol 169:389).

Stands in for Appion's ``ApDogPicker.py``. It keeps that tool's flags where it has them
(``--image``, ``--outfile``, ``--diam``, ``--apix``, ``--thresh``, ``--max-thresh``,
``--num-slices``, ``--size-range``, ``--max-area``, ``--max-peaks``) and Appion's names for the
rest (``--kfactor``, ``--invert``, ``--bin``, ``--overlap-mult``). It also keeps the maths: sigma
from the radius through Voss's k-factor, a stack of DoG maps spread over the size range,
thresholds in quarter standard deviations, Appion's blob-area test, and the plain ``x<TAB>y`` pick
file. The pipeline also gets a RELION coordinate STAR file (``--star``) and a preview with the
picks drawn (``--preview``).

Where this engine differs from Appion, and why:

* Map values are in quarter *noise* standard deviations, taken from the median absolute
  deviation, not from the plain standard deviation. So one ice crystal cannot raise every
  threshold on the micrograph. For the same reason a bright, isolated particle scores high, so
  the default ``--max-thresh`` is 6, not 1.5.
* A plane fitted to the background by least median of squares is taken off first, so an ice
  gradient neither looks like carbon at its dark end nor puts a ridge along the image edges.
* Carbon film, ethane/ice contamination and thick aggregates are masked from the local mean:
  they scatter electrons out of the aperture and are darker than the ice at every scale, which
  a particle (phase contrast, almost no mean) is not. The level adapts to each micrograph: many
  robust spreads of the local-mean map, at least 1.5 pixel noise spreads, and 3 % of the mean
  intensity when the micrograph is in counts. Masked regions are painted out with the ice
  level. By the usual convention nothing on carbon, in contamination or in an aggregate is
  picked; a particle on an aggregate's rim may still be (see the tests' distractor catalogue).
* Blobs larger than ``--max-area`` (contamination) are painted out with the background level, and
  the maps are made again. Otherwise the dark rim of an ice crystal hides the particles beside it.
  Dense specks (gold, ferritin, stain grains) are found on a scale space and painted out the same
  way. Otherwise a few specks close together add up to a particle-sized blob.
* Each candidate's own size is measured on a wider scale space, from a sixth of the particle
  diameter to nearly three diameters. Blobs that stand out best below ``--min-size`` or above
  ``--max-size`` times the diameter are refused.
* Every local maximum is a candidate, not one peak per blob, so touching particles are not merged.
  The blob area is counted above half the blob's peak, so a strong particle is not "too large".
* Every test runs *before* overlap removal, so a rejected blob cannot suppress a particle.
* Picks whose centre is at least 0.75 radius inside the edge are kept (Appion: a full radius).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryoflow.processing.engines.imageio import ImageReadError, atomic_path, open_movie

__all__ = [
    "DogSettings",
    "MatchResult",
    "PickError",
    "Picks",
    "main",
    "match_picks",
    "pick",
    "read_micrograph",
    "write_preview",
    "write_star",
    "write_xy",
]

#: Binned particle diameter (pixels) that ``bin=0`` (automatic) aims for. It is large enough for
#: the DoG to see the particle's shape and small enough that a K3 micrograph takes under a second.
AUTO_BIN_TARGET_DIAMETER_PX = 24.0
#: Smallest particle diameter the picker accepts, in pixels.
MIN_DIAMETER_PX = 4.0
#: A projected sphere of radius R answers best to the Voss-calibrated DoG of radius 0.60 R
#: (measured on softened projected spheres). Sizes are divided by this to report diameters.
SIZE_CALIBRATION = 0.60
#: The size-measuring scale space, in Voss radii relative to the particle radius, and its step.
SIZE_SCALES = (0.1, 1.65)
SIZE_SCALE_STEP = 1.3
#: Picks whose centre is closer to the edge than this many radii are dropped. Appion uses a
#: full radius; a particle whose centre lies exactly one radius in is whole, and the binned peak
#: of such a particle can land a little outside, so the cut is made a quarter radius further out.
BORDER_RADII = 0.75
#: A pixel belongs to a dense speck when it stands out by more than this many robust standard
#: deviations on the size scale space, and most at a size below ``min-size``. Particles and noise
#: stay well below this (about 3-5 at the finest levels). Dense specks such as gold or ferritin
#: reach 20-40.
SPECK_SIGNIFICANCE = 10.0
#: Speck masks are grown by this many particle radii, to cover the speck's CTF fringes.
SPECK_GROWTH_RADII = 0.25
#: Contaminant masks are grown by this many particle radii, to cover the rim of the blob too.
MASK_GROWTH_RADII = 1.5
#: Carbon and ethane: local means this many robust spreads (of the local-mean map) above the
#: ice, and at least this fraction of the mean intensity darker than it, are masked; the mask
#: is grown by this many radii over the soft edge and the CTF fringes.
DARK_SIGNIFICANCE = 8.0
DARK_MIN_FRACTION = 0.03
#: ... and by at least this many robust standard deviations of a binned pixel (shot noise):
#: particles darken by well under one, carbon by several. The local mean is a Gaussian of this
#: many radii: wide enough to average the noise, narrow enough to follow an ethane blob's edge.
DARK_MIN_NOISE = 1.5
DARK_SMOOTHING_RADII = 0.5
#: Dark regions must reach the level on a local mean this many radii wide too (seeds).
DARK_CORE_RADII = 2.0
DARK_GROWTH_RADII = 1.5
#: Random planes tried by the robust (least median of squares) background fit.
PLANE_TRIALS = 200


#: Preview file suffix -> Pillow format.
PREVIEW_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


class PickError(ValueError):
    """The picker cannot work with these settings or this input; the message names the value."""


@dataclass(frozen=True)
class DogSettings:
    """What the picker needs to know.

    Defaults are ApDogPicker's where that tool has the setting (``max_thresh`` excepted, see the
    module doc). ``invert`` is off as in the tool: DoG finds white blobs, so set it for
    cryo-EM micrographs, where particles are dark.
    """

    diameter_A: float
    pixel_size_A: float
    thresh: float = 0.6
    max_thresh: float = 6.0
    num_slices: int = 2
    size_range_A: float = 10.0
    kfactor: float = 1.1
    max_area: float = 0.3
    max_peaks: int = 500
    overlap_mult: float = 1.5
    invert: bool = False
    bin: int = 0
    min_size: float = 0.5
    max_size: float = 2.0

    def __post_init__(self) -> None:
        if not self.pixel_size_A > 0:
            raise PickError(f"pixel size must be > 0 A, got {self.pixel_size_A}")
        if not self.diameter_A >= MIN_DIAMETER_PX * self.pixel_size_A:
            raise PickError(
                f"particle diameter {self.diameter_A} A is "
                f"{self.diameter_A / self.pixel_size_A:.2g} px at {self.pixel_size_A} A/px; "
                "a particle must span at least "
                f"{MIN_DIAMETER_PX:g} px to be told from noise"
            )
        if not 1 <= self.num_slices <= 15:
            raise PickError(f"num-slices must be 1..15 (2-6 is usual), got {self.num_slices}")
        if self.num_slices > 1 and not 0 < self.size_range_A < 2 * self.diameter_A:
            raise PickError(
                f"size range {self.size_range_A} A must be > 0 and less than twice the diameter "
                f"({2 * self.diameter_A} A)"
            )
        if not self.kfactor > 1.0:
            raise PickError(f"k-factor must be > 1, got {self.kfactor}")
        if not self.max_thresh > self.thresh:
            raise PickError(
                f"max-thresh {self.max_thresh} must be larger than thresh {self.thresh}"
            )
        if not self.max_area > 0:
            raise PickError(f"max-area must be > 0, got {self.max_area}")
        if self.max_peaks < 1:
            raise PickError(f"max-peaks must be >= 1, got {self.max_peaks}")
        if self.overlap_mult < 0:
            raise PickError(f"overlap-mult must be >= 0, got {self.overlap_mult}")
        if self.bin < 0:
            raise PickError(f"bin must be >= 0 (0 = automatic), got {self.bin}")
        lo, hi = SIZE_SCALES[0] / SIZE_CALIBRATION, SIZE_SCALES[1] / SIZE_CALIBRATION
        if not lo < self.min_size < 1.0 < self.max_size < hi:
            raise PickError(
                f"need {lo:.2f} < min-size < 1 < max-size < {hi:.2f}, "
                f"got {self.min_size} and {self.max_size}"
            )

    @property
    def radius_px(self) -> float:
        """Particle radius in input pixels."""
        return self.diameter_A / self.pixel_size_A / 2.0

    def binning(self) -> int:
        """The bin factor used: ``bin``, or automatic (see AUTO_BIN_TARGET_DIAMETER_PX)."""
        return self.bin or max(1, int(2.0 * self.radius_px / AUTO_BIN_TARGET_DIAMETER_PX))


@dataclass
class Picks:
    """Picked centres in the input micrograph's pixels (x = column, y = row, from 0).

    ``score`` is the DoG map value at the peak, in quarter noise standard deviations.
    ``diameter_A`` is the size at which the blob stands out most. ``rejected`` counts
    candidates by the test that removed them.
    """

    x: np.ndarray
    y: np.ndarray
    score: np.ndarray
    diameter_A: np.ndarray
    shape: tuple[int, int]
    bin: int
    rejected: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.size)


# --------------------------------------------------------------------------- DoG maths


def _ek(k: float) -> float:
    """Voss's E(k): DoG(sigma, k sigma) with sigma = E(k) r is tuned to blobs of radius r."""
    return math.sqrt((k * k - 1.0) / (2.0 * k * k * math.log(k)))


def _kfactor_for_range(r0: float, dr: float, n: int) -> float:
    """Appion's estimateKfactorIncrement: the k that spreads n slices over radius range dr."""
    half = dr / (2.0 * r0)
    return (half + math.sqrt(half * half + 1.0)) ** (2.0 / n)


def _slice_sigmas(
    radius_px: float, num_slices: int, range_px: float, kfactor: float
) -> tuple[list[float], list[float]]:
    """Gaussian sigmas (n + 1) and tuned radii (n) of Appion's DoG stack.

    The radii are spaced geometrically so the outer ones are ``range_px`` apart. A single slice
    uses ``kfactor``. With more slices the ratio follows from the range, as in Appion.
    """
    if num_slices <= 1:
        k, radii = kfactor, [radius_px]
        s0 = _ek(k) * radius_px
    else:
        n = num_slices
        k = _kfactor_for_range(radius_px, range_px, n)
        radii = [radius_px * k ** (i - (n - 1) / 2.0) for i in range(n)]
        s0 = _ek(k) * radius_px * k ** ((1.0 - n) / 2.0)
    return [s0 * k**i for i in range(len(radii) + 1)], radii


def _smooth_background(image: np.ndarray, scale_px: float) -> np.ndarray:
    """The image blurred to about ``scale_px``: ice gradients stay, particles wash out.

    It is made on a coarse grid (block means, then a small blur, then linear interpolation
    back), so the cost does not grow with the scale.
    """
    from scipy import ndimage

    c = max(1, int(scale_px / 2))
    coarse = ndimage.gaussian_filter(_bin_image(image, c), 2.0, mode="nearest")
    ny, nx = image.shape
    gy = (np.arange(ny, dtype=np.float32) + 0.5) / c - 0.5
    gx = (np.arange(nx, dtype=np.float32) + 0.5) / c - 0.5
    rows = np.array([np.interp(gx, np.arange(coarse.shape[1]), row) for row in coarse])
    cols = np.array([np.interp(gy, np.arange(coarse.shape[0]), col) for col in rows.T]).T
    return cols.astype(np.float32)


def _remove_plane(image: np.ndarray, cell_px: float) -> np.ndarray:
    """The image less a fitted plane: ice-thickness gradients and beam tilt.

    DoG filters ignore a plane, but the masks do not: a ramp would look like carbon at its
    dark end. The plane is fitted to block means by least median of squares (the best of
    PLANE_TRIALS planes through three random blocks), so carbon or ethane covering up to half the
    image does not tilt it, then refined by least squares on the blocks that lie on it.
    """
    c = max(1, int(cell_px))
    coarse = _bin_image(image, c).astype(np.float64)
    gy, gx = np.mgrid[0 : coarse.shape[0], 0 : coarse.shape[1]]
    a = np.column_stack([np.ones(coarse.size), gx.ravel(), gy.ravel()])
    z = coarse.ravel()
    rng = np.random.default_rng(0)  # the same micrograph always gets the same plane
    trios = rng.integers(0, z.size, size=(PLANE_TRIALS, 3))
    m = a[trios]
    ok = np.abs(np.linalg.det(m)) > 1e-6
    if ok.sum() == 0:
        return image
    coefs = np.linalg.solve(m[ok], z[trios[ok]][..., None])[..., 0]
    med = np.median(np.abs(z[None, :] - coefs @ a.T), axis=1)
    best = coefs[int(np.argmin(med))]
    resid = z - a @ best
    keep = np.abs(resid) <= 2.5 * 1.4826 * float(med.min()) + 1e-12
    if keep.sum() >= 3:
        best = np.linalg.lstsq(a[keep], z[keep], rcond=None)[0]
    ny, nx = image.shape
    # Block j covers pixels [j*c, (j+1)*c), centred on j*c + (c-1)/2.
    yy = (np.arange(ny, dtype=np.float64) - (c - 1) / 2.0) / c
    xx = (np.arange(nx, dtype=np.float64) - (c - 1) / 2.0) / c
    plane = best[0] + best[1] * xx[None, :] + best[2] * yy[:, None]
    return (image - plane).astype(np.float32)


def _dark_region_mask(
    image: np.ndarray, radius_px: float, pixel_noise: float, intensity: float | None
) -> np.ndarray | None:
    """Carbon film and ethane/ice contamination: regions whose local mean is far off the ice's.

    ``image`` is inverted (matter bright), the ice level at 0 (:func:`_remove_plane`). Both
    scatter electrons out of the aperture, so they are darker than the ice at every scale,
    which particles (phase contrast, almost no mean) are not. A pixel is masked when its local
    mean (a Gaussian of DARK_SMOOTHING_RADII radii) stands above the ice by DARK_SIGNIFICANCE
    robust spreads of that map, by DARK_MIN_NOISE ``pixel_noise`` (a pixel's robust std) and,
    where the micrograph is in counts (``intensity``, its mean), by DARK_MIN_FRACTION of the
    mean intensity, so particles and gentle ice variations are not; and it must belong to a
    region that reaches the level on a mean DARK_CORE_RADII wide as well. One-sided, so where
    carbon covers most of the image it is picked on rather than the ice being masked.
    """
    from scipy import ndimage

    low = ndimage.gaussian_filter(image, DARK_SMOOTHING_RADII * radius_px, mode="nearest")
    # The ice level is 0 (see _remove_plane). Its spread comes from the side away from the dark
    # regions only, so carbon covering a third of the image does not widen it.
    below = -low[low <= 0.0]
    spread = 1.4826 * float(np.median(below)) if below.size > 100 else float(low.std())
    level = max(DARK_SIGNIFICANCE * spread, DARK_MIN_NOISE * pixel_noise)
    if intensity is not None:
        level = max(level, DARK_MIN_FRACTION * intensity)
    # Seeds on a wider local mean, where a particle's own dip is diluted far below the level
    # (a dense field of them at high dose, or a dose-weighted zero-mean image, must not be masked)
    # but carbon and ethane, being larger, are not; the mask then follows the narrow map out.
    core = _smooth_background(image, DARK_CORE_RADII * radius_px) > level
    if not core.any():
        return None
    labels, _ = ndimage.label(low > 0.5 * level)
    seeded = np.unique(labels[core & (labels > 0)])
    if seeded.size == 0:
        return None
    mask = ndimage.binary_fill_holes(np.isin(labels, seeded))
    return ndimage.distance_transform_edt(~mask) <= DARK_GROWTH_RADII * radius_px


class _GaussianSpace:
    """Gaussian blurs of one image made by FFT, on a padded copy (no wrap-around).

    One forward transform is shared by every blur, so a scale space costs one inverse transform
    per level. That is far cheaper than direct convolution at the sigmas a particle needs.
    Padding mirrors only the smooth background (``background_px``). Mirroring the image itself
    would put a twin beside every particle near the edge and pull its peak outwards.
    """

    def __init__(self, image: np.ndarray, max_sigma: float, background_px: float) -> None:
        from scipy import fft as sfft

        ny, nx = image.shape
        self.shape = (ny, nx)
        self.pad = min(int(math.ceil(3.0 * max_sigma)), ny - 1, nx - 1)
        img = image.astype(np.float32, copy=False)
        low = _smooth_background(img, background_px)
        padded = np.pad(low, self.pad, mode="reflect", reflect_type="odd")
        padded[self.pad : self.pad + ny, self.pad : self.pad + nx] = img
        self.fshape = tuple(sfft.next_fast_len(n, real=True) for n in padded.shape)
        self.ft = sfft.rfft2(padded, s=self.fshape)
        self.fy2 = (sfft.fftfreq(self.fshape[0]) ** 2).astype(np.float32)
        self.fx2 = (sfft.rfftfreq(self.fshape[1]) ** 2).astype(np.float32)

    def blur(self, sigma: float) -> np.ndarray:
        from scipy import fft as sfft

        c = np.float32(-2.0 * math.pi**2 * sigma**2)
        h = np.exp(c * self.fy2)[:, None] * np.exp(c * self.fx2)[None, :]
        out = sfft.irfft2(self.ft * h, s=self.fshape)
        p = self.pad
        return out[p : p + self.shape[0], p : p + self.shape[1]]


def _robust_scale(m: np.ndarray, exclude: np.ndarray | None) -> tuple[float, float]:
    """(centre, spread) of a map from its median and MAD, skipping ``exclude``d pixels."""
    step = max(1, int(math.sqrt(m.size / 65_536)))
    sample = m[::step, ::step]
    if exclude is not None:
        keep = ~exclude[::step, ::step]
        if keep.sum() > 100:
            sample = sample[keep]
    med = float(np.median(sample))
    mad = float(np.median(np.abs(sample - med))) * 1.4826
    return med, (mad if mad > 0 else float(m.std()) or 1.0)


# --------------------------------------------------------------------------- candidates


@dataclass
class _Candidates:
    y: np.ndarray
    x: np.ndarray
    value: np.ndarray
    too_big: np.ndarray
    blob_masks: list[np.ndarray]  # per slice: pixels of blobs too large to be particles


def _subpixel(m: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Refine integer maxima with a parabola through the three neighbours along each axis."""
    ny, nx = m.shape
    y, x = iy.astype(np.float64), ix.astype(np.float64)
    inner = (iy > 0) & (iy < ny - 1) & (ix > 0) & (ix < nx - 1)
    yi, xi = iy[inner], ix[inner]
    c = m[yi, xi]
    for out, lo, hi in ((y, m[yi - 1, xi], m[yi + 1, xi]), (x, m[yi, xi - 1], m[yi, xi + 1])):
        den = lo - 2.0 * c + hi
        safe = np.where(den < 0, den, -1.0)
        out[inner] += np.clip(np.where(den < 0, 0.5 * (lo - hi) / safe, 0.0), -0.5, 0.5)
    return y, x


def _find_candidates(
    space: _GaussianSpace,
    sigmas: Sequence[float],
    s: DogSettings,
    radius_px: float,
    exclude: np.ndarray | None,
) -> _Candidates:
    """Local maxima above the threshold in every DoG slice, with their blob's area test.

    Appion takes one peak per thresholded blob. At high signal-to-noise the blobs of neighbouring
    particles merge, so every local maximum (in a window of one radius) is a candidate here
    instead. The blob area is counted above half the blob's own peak, or above the threshold if
    that is higher. For weak blobs this is Appion's thresholded area. For strong ones it stays a
    measure of shape, so a clear particle does not count as contamination just for being clear.
    """
    from scipy import ndimage

    max_area_px = s.max_area * math.pi * (2.0 * radius_px) ** 2  # Appion: x pi x diameter^2
    window = 2 * max(1, int(radius_px / 2)) + 1
    ys, xs, vals, bigs, masks = [], [], [], [], []
    prev = space.blur(sigmas[0])
    for sigma in sigmas[1:]:
        nxt = space.blur(sigma)
        dog = prev - nxt
        prev = nxt
        med, spread = _robust_scale(dog, exclude)
        nm = (dog - med) / (4.0 * spread)
        above = nm > s.thresh
        labels, n = ndimage.label(above, structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        blob_max = np.full(n + 1, -np.inf, dtype=np.float32)
        np.maximum.at(blob_max, labels[above], nm[above])
        level = np.maximum(s.thresh, 0.5 * blob_max)
        level[0] = np.inf
        area = np.bincount(labels[nm > level[labels]], minlength=n + 1)[1:]
        big = area > max_area_px
        masks.append(np.concatenate([[False], big])[labels])
        py, px = np.nonzero(above & (nm >= ndimage.maximum_filter(nm, size=window)))
        fy, fx = _subpixel(nm, py, px)
        ys.append(fy), xs.append(fx), vals.append(nm[py, px]), bigs.append(big[labels[py, px] - 1])
    if not ys:
        e = np.empty(0)
        return _Candidates(e, e, e, e.astype(bool), masks)
    return _Candidates(
        np.concatenate(ys), np.concatenate(xs), np.concatenate(vals), np.concatenate(bigs), masks
    )


def _contamination_mask(blob_masks: list[np.ndarray], grow_px: float) -> np.ndarray | None:
    """Union of blobs too large to be particles, holes filled, grown over their rim; or None."""
    from scipy import ndimage

    if not blob_masks:
        return None
    mask = np.logical_or.reduce(blob_masks)
    if not mask.any():
        return None
    mask = ndimage.binary_fill_holes(mask)
    if grow_px >= 1:
        dist = ndimage.distance_transform_edt(~mask)
        mask = dist <= grow_px
    return mask


def _size_levels(radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated diameters (px) of the size-measuring levels and their sigmas (one more)."""
    k = SIZE_SCALE_STEP
    lo, hi = SIZE_SCALES[0] * radius_px, SIZE_SCALES[1] * radius_px
    n = int(math.ceil(math.log(hi / lo) / math.log(k))) + 1
    radii = lo * k ** np.arange(n + 1)
    return 2.0 * radii[:-1] / SIZE_CALIBRATION, _ek(k) * radii


@dataclass
class _SizeMap:
    """Per pixel, the scale-space level at which the image stands out most, and dense specks."""

    diameters: np.ndarray  # calibrated diameter (px) of each level
    best_level: np.ndarray  # index into diameters, per pixel
    specks: np.ndarray | None  # pixels of dense specks, or None

    def size_at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self.diameters[self.best_level[rows, cols]]


def _size_map(
    space: _GaussianSpace, radius_px: float, min_size: float, exclude: np.ndarray | None
) -> _SizeMap:
    """Measure sizes on a DoG scale space with one fixed ratio between levels.

    With one ratio k for all levels, ``G(s) - G(ks)`` is the scale-normalised Laplacian
    (Lindeberg), so a blob's size is the level it answers best to. On a real micrograph shot noise
    dominates the finest levels, so each level is divided by its own robust spread. The size is
    then where the blob is most *significant*. Diameters are calibrated (SIZE_CALIBRATION) so that
    a projected sphere measures its own diameter.

    Specks are pixels that stand out by more than SPECK_SIGNIFICANCE, and most at a level below
    ``min_size``. A few specks close together would add up to a particle-sized blob, so the caller
    paints them out as it does contamination.
    """
    from scipy import ndimage

    diameters, sigmas = _size_levels(radius_px)
    prev = space.blur(sigmas[0])
    best = best_level = small = None
    for i, sigma in enumerate(sigmas[1:]):
        nxt = space.blur(sigma)
        dog = prev - nxt
        prev = nxt
        med, spread = _robust_scale(dog, exclude)
        z = (dog - med) / spread
        if best is None:
            best, best_level = z, np.zeros(z.shape, dtype=np.int16)
        else:
            better = z > best
            best = np.where(better, z, best)
            best_level[better] = i
        if diameters[i] < min_size * 2.0 * radius_px:
            small = z if small is None else np.maximum(small, z)
    specks = None
    if small is not None:
        core = (small > SPECK_SIGNIFICANCE) & (small >= best)
        if core.any():
            grow = SPECK_GROWTH_RADII * radius_px + 1.0
            specks = ndimage.distance_transform_edt(~core) <= grow
    return _SizeMap(diameters, best_level, specks)


def _suppress_overlaps(y: np.ndarray, x: np.ndarray, score: np.ndarray, cutoff: float):
    """Indices kept by greedy non-maximum suppression, strongest first."""
    from scipy.spatial import cKDTree

    order = np.argsort(-score, kind="stable")
    if cutoff <= 0 or order.size < 2:
        return order
    tree = cKDTree(np.column_stack([y, x]))
    alive = np.ones(score.size, dtype=bool)
    keep = []
    for i in order:
        if alive[i]:
            keep.append(i)
            alive[tree.query_ball_point((y[i], x[i]), cutoff)] = False
    return np.asarray(keep, dtype=int)


def _bin_image(image: np.ndarray, b: int) -> np.ndarray:
    """Block-average by ``b`` (the last ``shape % b`` rows/columns are dropped)."""
    if b == 1:
        return np.array(image, dtype=np.float32)
    ny, nx = (image.shape[0] // b) * b, (image.shape[1] // b) * b
    view = np.asarray(image[:ny, :nx], dtype=np.float32).reshape(ny // b, b, nx // b, b)
    return view.mean(axis=(1, 3), dtype=np.float32)


def pick(image: np.ndarray, settings: DogSettings) -> Picks:
    """Pick round particles in a 2-D micrograph. Coordinates are in the input's pixels."""
    img = np.asarray(image)
    if img.ndim != 2:
        raise PickError(f"expected a single 2-D micrograph, got an array of shape {img.shape}")
    s = settings
    b = s.binning()
    binned = _bin_image(img, b)
    if not np.isfinite(binned).all():
        raise PickError("micrograph contains NaN or infinite values")
    r = s.radius_px / b
    if min(binned.shape) < 4 * r:
        raise PickError(
            f"micrograph {img.shape[1]}x{img.shape[0]} px is too small for particles of "
            f"{s.diameter_A} A at {s.pixel_size_A} A/px (needs at least two diameters)"
        )
    level = float(np.median(binned))
    if s.invert:
        binned = -binned
    binned -= float(np.median(binned))
    binned = _remove_plane(binned, 2.0 * r)
    # A micrograph in counts (mean well above its noise) tells how dark carbon is in absolute
    # terms; a zero-mean one (some motion correctors write that) does not.
    _, pixel_noise = _robust_scale(binned, None)
    intensity = level if level > 10.0 * pixel_noise else None
    dark = _dark_region_mask(binned, r, pixel_noise, intensity)
    if dark is not None:
        binned = np.where(dark, np.float32(0.0), binned)
    sigmas, _ = _slice_sigmas(r, s.num_slices, s.size_range_A / s.pixel_size_A / b / 2.0, s.kfactor)
    max_sigma = max(sigmas[-1], _size_levels(r)[1][-1])

    def space_of(im: np.ndarray) -> _GaussianSpace:
        return _GaussianSpace(im, max_sigma, 4.0 * r)

    space = space_of(binned)
    sizes = _size_map(space, r, s.min_size, dark)
    specks = sizes.specks
    work = binned
    exclude = specks if dark is None else dark if specks is None else dark | specks
    if specks is not None:
        # Paint dense specks out with the background level (see module doc).
        work = np.where(specks, np.float32(0.0), binned)
        space = space_of(work)
    cand = _find_candidates(space, sigmas, s, r, exclude)
    contam = _contamination_mask(cand.blob_masks, MASK_GROWTH_RADII * r)
    painted = 0
    if contam is not None:
        # Paint the contamination out too, and look again. Candidates of the first look that lie
        # in it count as rejected for contamination.
        fy = np.clip(np.rint(cand.y).astype(int), 0, contam.shape[0] - 1)
        fx = np.clip(np.rint(cand.x).astype(int), 0, contam.shape[1] - 1)
        painted = int(contam[fy, fx].sum())
        exclude = contam if exclude is None else contam | exclude
        work = np.where(contam, np.float32(0.0), work)
        space = space_of(work)
        cand = _find_candidates(space, sigmas, s, r, exclude)
    if work is not binned:
        sizes = _size_map(space, r, s.min_size, exclude)

    y, x, v = cand.y, cand.x, cand.value
    ny, nx = binned.shape
    edge = BORDER_RADII * r
    iy = np.clip(np.rint(y).astype(int), 0, ny - 1)
    ix = np.clip(np.rint(x).astype(int), 0, nx - 1)
    none = np.zeros(v.size, dtype=bool)
    size = sizes.size_at(iy, ix)
    tests = [
        ("area", cand.too_big),
        ("max_thresh", v > s.max_thresh),
        ("border", (x < edge) | (y < edge) | (x > nx - 1 - edge) | (y > ny - 1 - edge)),
        ("dark_region", dark[iy, ix] if dark is not None else none),
        ("contamination", contam[iy, ix] if contam is not None else none),
        ("speck", specks[iy, ix] if specks is not None else none),
        ("size", (size < s.min_size * 2 * r) | (size > s.max_size * 2 * r)),
    ]
    ok = np.ones(v.size, dtype=bool)
    rejected: dict[str, int] = {}
    for name, failed in tests:
        rejected[name] = int((ok & failed).sum())
        ok &= ~failed
    rejected["contamination"] += painted

    y, x, v, size = y[ok], x[ok], v[ok], size[ok]
    keep = _suppress_overlaps(y, x, v, s.overlap_mult * r)
    rejected["overlap"] = int(v.size - keep.size)
    rejected["max_peaks"] = max(0, int(keep.size - s.max_peaks))
    keep = keep[: s.max_peaks]
    # Binned pixel i covers input pixels [i*b, (i+1)*b), whose centre is i*b + (b-1)/2.
    half = (b - 1) / 2.0
    return Picks(
        x=x[keep] * b + half,
        y=y[keep] * b + half,
        score=v[keep],
        diameter_A=size[keep] * b * s.pixel_size_A,
        shape=(int(img.shape[0]), int(img.shape[1])),
        bin=b,
        rejected=rejected,
    )


# --------------------------------------------------------------------------- checking picks


@dataclass(frozen=True)
class MatchResult:
    """How a set of picks compares with the true centres (one pick per particle at most)."""

    n_picks: int
    n_true: int
    n_matched: int
    tolerance_px: float

    @property
    def precision(self) -> float:
        return self.n_matched / self.n_picks if self.n_picks else 1.0

    @property
    def recall(self) -> float:
        return self.n_matched / self.n_true if self.n_true else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def match_picks(picks_xy: np.ndarray, true_xy: np.ndarray, tolerance_px: float) -> MatchResult:
    """Pair picks with true centres one-to-one (Hungarian), counting pairs within tolerance.

    A second pick on the same particle is a false positive, as it is for a user: it yields a
    duplicate particle image. The usual tolerance is 0.3 particle diameters.
    """
    from scipy.optimize import linear_sum_assignment

    p = np.asarray(picks_xy, dtype=float).reshape(-1, 2)
    t = np.asarray(true_xy, dtype=float).reshape(-1, 2)
    if p.size == 0 or t.size == 0:
        return MatchResult(len(p), len(t), 0, float(tolerance_px))
    d = np.hypot(p[:, None, 0] - t[None, :, 0], p[:, None, 1] - t[None, :, 1])
    cost = np.where(d <= tolerance_px, d, 1e6 * (1.0 + tolerance_px))
    rows, cols = linear_sum_assignment(cost)
    matched = int((d[rows, cols] <= tolerance_px).sum())
    return MatchResult(len(p), len(t), matched, float(tolerance_px))


# --------------------------------------------------------------------------- files


def read_micrograph(path: str | Path) -> tuple[np.ndarray, float | None]:
    """A single 2-D micrograph from MRC and its header pixel size (None if unset).

    A stack or volume is refused: the picker works on one motion-corrected image.
    """
    with open_movie(path, expected_kind="mrc") as mrc:
        if mrc.shape[0] != 1:
            raise ImageReadError(
                f"{path}: holds {mrc.shape[0]} images of {mrc.shape[2]}x{mrc.shape[1]}; "
                "the picker needs one motion-corrected micrograph, not a stack"
            )
        return mrc.frame(0), mrc.pixel_size_A


def write_xy(path: str | Path, picks: Picks) -> None:
    """ApDogPicker's pick file: ``x<TAB>y`` per line, two decimals, ordered by x + y."""
    order = np.argsort(picks.x + picks.y, kind="stable")
    lines = [f"{picks.x[i]:.2f}\t{picks.y[i]:.2f}\n" for i in order]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(lines))


def write_star(path: str | Path, picks: Picks) -> None:
    """A RELION coordinate file laid out as RELION's autopick writes one.

    It has a ``data_`` block with X, Y, class 0, the figure of merit (our DoG score) and psi -999
    (unknown).
    """
    import pandas as pd
    import starfile

    df = pd.DataFrame(
        {
            "rlnCoordinateX": picks.x.astype(float),
            "rlnCoordinateY": picks.y.astype(float),
            "rlnClassNumber": np.zeros(len(picks), dtype=int),
            "rlnAutopickFigureOfMerit": picks.score.astype(float),
            "rlnAnglePsi": np.full(len(picks), -999.0),
        }
    )
    with atomic_path(path) as tmp:
        starfile.write({"": df}, tmp, sep=" ")


def write_preview(
    path: str | Path,
    image: np.ndarray,
    picks: Picks,
    diameter_px: float,
    max_size: int = 1024,
) -> None:
    """A downsampled 8-bit PNG/JPEG (by extension) with a circle of the particle size per pick.

    The micrograph is shown as recorded (particles dark). Contrast is clipped at the 0.5 and 99.5
    percentiles after a light blur, so particles show through the shot noise.
    """
    from PIL import Image, ImageDraw
    from scipy import ndimage

    fmt = PREVIEW_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise PickError(f"{path}: preview must be .png, .jpg or .jpeg")
    factor = max(1, int(math.ceil(max(image.shape) / max_size)))
    small = _bin_image(image, factor)
    small = ndimage.gaussian_filter(small, max(1.0, diameter_px / factor / 16.0))
    lo, hi = np.percentile(small, [0.5, 99.5])
    scaled = np.clip((small - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    pil = Image.fromarray((scaled * 255.0 + 0.5).astype(np.uint8), mode="L").convert("RGB")
    draw = ImageDraw.Draw(pil)
    rad = max(2.0, diameter_px / 2.0 / factor)
    width = max(1, int(round(rad / 12)))
    for xi, yi in zip(picks.x, picks.y, strict=True):
        cx, cy = (xi - (factor - 1) / 2.0) / factor, (yi - (factor - 1) / 2.0) / factor
        draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], outline=(0, 230, 0), width=width)
    with atomic_path(path) as tmp:
        pil.save(tmp, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))


# --------------------------------------------------------------------------- CLI


def _default(name: str) -> object:
    """DogSettings' default for a field: the command and the library cannot drift apart."""
    return DogSettings.__dataclass_fields__[name].default


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cryoflow-dogpicker",
        description="Difference-of-Gaussians particle picking (after Voss et al. 2009, "
        "Appion's ApDogPicker.py) on one MRC micrograph.",
    )
    p.add_argument("-i", "--image", required=True, type=Path, help="micrograph, MRC")
    p.add_argument(
        "-o",
        "--outfile",
        type=Path,
        default=Path("picks.txt"),
        help="x<TAB>y pick file (default: picks.txt)",
    )
    p.add_argument("--star", type=Path, help="also write a RELION coordinate STAR file here")
    p.add_argument("--preview", type=Path, help="also write a PNG/JPEG with the picks drawn")
    p.add_argument("-d", "--diam", required=True, type=float, help="particle diameter, A")
    p.add_argument("-a", "--apix", type=float, help="pixel size, A (default: from the MRC header)")
    p.add_argument(
        "-t",
        "--thresh",
        type=float,
        default=_default("thresh"),
        help="pick threshold, in quarter standard deviations of the DoG map",
    )
    p.add_argument(
        "--max-thresh",
        type=float,
        default=_default("max_thresh"),
        help="blobs stronger than this are contamination",
    )
    p.add_argument(
        "--num-slices", type=int, default=_default("num_slices"), help="number of DoG sizes to try"
    )
    p.add_argument(
        "--size-range",
        type=float,
        default=_default("size_range_A"),
        help="range of diameters about --diam to search, A",
    )
    p.add_argument(
        "--kfactor",
        type=float,
        default=_default("kfactor"),
        help="sigma ratio of a single DoG (used when --num-slices is 1)",
    )
    p.add_argument(
        "--max-area",
        type=float,
        default=_default("max_area"),
        help="a thresholded blob larger than MAX_AREA x pi x diam^2 is contamination",
    )
    p.add_argument(
        "--max-peaks", type=int, default=_default("max_peaks"), help="keep at most this many picks"
    )
    p.add_argument(
        "--overlap-mult",
        type=float,
        default=_default("overlap_mult"),
        help="picks closer than this many particle radii: keep the stronger",
    )
    p.add_argument(
        "--min-size",
        type=float,
        default=_default("min_size"),
        help="refuse blobs whose measured size is below this fraction of --diam",
    )
    p.add_argument(
        "--max-size",
        type=float,
        default=_default("max_size"),
        help="refuse blobs whose measured size is above this multiple of --diam",
    )
    p.add_argument(
        "--bin",
        type=int,
        default=_default("bin"),
        help="bin the micrograph by this factor first (0: automatic)",
    )
    p.add_argument(
        "--invert",
        action="store_true",
        help="invert contrast first (DoG picks white blobs; cryo particles are dark)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``cryoflow-dogpicker``. Returns 0, or 2 on bad input or settings."""
    parser = _parser()
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        image, header_apix = read_micrograph(args.image)
        apix = args.apix if args.apix is not None else header_apix
        if apix is None:
            raise PickError(f"{args.image}: no pixel size in the MRC header; pass --apix")
        settings = DogSettings(
            diameter_A=args.diam,
            pixel_size_A=apix,
            thresh=args.thresh,
            max_thresh=args.max_thresh,
            num_slices=args.num_slices,
            size_range_A=args.size_range,
            kfactor=args.kfactor,
            max_area=args.max_area,
            max_peaks=args.max_peaks,
            overlap_mult=args.overlap_mult,
            invert=args.invert,
            bin=args.bin,
            min_size=args.min_size,
            max_size=args.max_size,
        )
        if args.preview is not None and args.preview.suffix.lower() not in PREVIEW_FORMATS:
            raise PickError(f"{args.preview}: preview must be .png, .jpg or .jpeg")
        picks = pick(image, settings)
    except (ImageReadError, PickError) as exc:
        print(f"cryoflow-dogpicker: error: {exc}", file=sys.stderr)
        return 2
    try:
        write_xy(args.outfile, picks)
        if args.star is not None:
            write_star(args.star, picks)
        if args.preview is not None:
            write_preview(args.preview, image, picks, settings.diameter_A / apix)
    except OSError as exc:
        print(f"cryoflow-dogpicker: error: cannot write output: {exc}", file=sys.stderr)
        return 1
    rejected = ", ".join(f"{k} {v}" for k, v in picks.rejected.items() if v)
    print(
        f"cryoflow-dogpicker: {args.image}: {len(picks)} particles "
        f"(bin {picks.bin}; rejected: {rejected or 'none'}) "
        f"in {time.perf_counter() - t0:.2f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
