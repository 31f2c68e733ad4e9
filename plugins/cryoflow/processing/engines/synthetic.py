"""Synthetic cryo-EM data with ground truth, for testing the engines and feeding the simulator.

Why: every engine (motion correction, CTF estimation, picking) must be checked against an answer
that is known exactly. This module builds that answer first (particle positions, CTF, drift, gain)
and then renders data from it the way a detector would record it.

Conventions (all engines and tests rely on them):

* Arrays are (y, x); shifts and positions are given as (x, y) in pixels, like MotionCor2's logs.
* Specimen density is positive where there is mass; :func:`apply_ctf` turns it into a *contrast*
  image (zero mean background, particles dark at underfocus).
* A movie frame ``i`` shows the image moved by ``drift[i]``: ``frame_i(r) = image(r - drift[i])``,
  so content at pixel ``p`` in the still image is found at ``p + drift[i]`` in frame ``i``.
* Gain: ``gain`` is a *gain reference* as MotionCor2's ``-Gain`` expects it: the corrected frame is
  ``raw * gain``. The detector's per-pixel efficiency is therefore ``1 / gain``: raw counts are
  ``Poisson(dose * intensity / gain)``, integers, as a counting camera writes them.
* Contrast: :func:`make_movie` takes fractional contrast. ``0.3 * apply_ctf(density)`` gives an
  image std of ~1.5 %, about what a single-particle micrograph shows; motion-correction accuracy
  at 1 e/px/frame depends strongly on it and on the frame size (see the engine's benchmark).
* Decoys: :class:`Distractors` adds what real micrographs show besides particles (a carbon
  edge, ethane contamination, aggregates, small junk, an ice gradient, random ice under the
  CTF). The truth keeps only particles in clean ice in ``particles``; aggregate members and
  particles on carbon are ``excluded`` (the usual convention: a picker should not pick them).
  Without distractors a seed gives the same images as before they existed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryoflow.processing.engines.ctf_model import CTFParams, ctf_2d, spatial_frequency_grid
from cryoflow.processing.engines.imageio import atomic_path, write_mrc

__all__ = [
    "DISTRACTOR_KINDS",
    "CarbonEdge",
    "Distractors",
    "MovieTruth",
    "Particle",
    "SpecimenTruth",
    "amplitude_map",
    "apply_ctf",
    "default_drift",
    "fourier_shift",
    "main",
    "make_gain",
    "make_micrograph",
    "make_micrograph_with_contrast",
    "make_movie",
    "make_specimen",
    "particle_contrast",
    "specimen_contrast",
    "write_gain_mrc",
    "write_movie_mrc",
    "write_movie_tiff",
    "write_truth_json",
]


@dataclass
class Particle:
    """A round object's centre (pixels, x right, y down = array column/row) and diameter."""

    x: float
    y: float
    diameter_A: float


@dataclass
class CarbonEdge:
    """The edge of a hole in the carbon film: a circle (pixels); carbon lies outside it."""

    x: float
    y: float
    radius_px: float
    darkening: float

    def distance(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Signed distance (px) from the edge: > 0 on the carbon, < 0 in the hole (the ice)."""
        return np.hypot(np.asarray(x) - self.x, np.asarray(y) - self.y) - self.radius_px


@dataclass
class SpecimenTruth:
    """What :func:`make_specimen` put in the image: pickers must find ``particles`` only.

    Everything else is a decoy a picker should not report. ``excluded`` holds particles that
    are rendered but do not count, by the usual convention of picking: members of aggregates and
    particles lying on the carbon film. A pick on one of them is a false positive.
    """

    shape: tuple[int, int]
    pixel_size_A: float
    particles: list[Particle] = field(default_factory=list)
    specks: list[Particle] = field(default_factory=list)
    contaminants: list[Particle] = field(default_factory=list)
    excluded: list[Particle] = field(default_factory=list)
    aggregates: list[Particle] = field(default_factory=list)  # centre, enclosing diameter
    ethane: list[Particle] = field(default_factory=list)
    junk: list[Particle] = field(default_factory=list)
    carbon: CarbonEdge | None = None
    ethane_darkening: float = 0.0


#: The kinds of :class:`Distractors`, one per field group; the benchmark and tests use them.
DISTRACTOR_KINDS = ("carbon", "ethane", "aggregates", "junk", "gradient", "ice")


@dataclass(frozen=True)
class Distractors:
    """What a real micrograph shows besides particles. All off by default.

    Sizes are in particle diameters; darkening is a fraction of the mean intensity, applied as
    amplitude contrast (real carbon and ethane contamination scatter electrons out of the
    aperture, so they are dark at all spatial frequencies, not only where the CTF passes).
    Particles counted in the truth keep ``clearance`` diameters away from carbon, ethane and
    aggregates: touching ones are ambiguous even for a human picker.

    * ``carbon``: a hole edge (an arc across the image). The film carries a fine texture, and
      ``carbon_particles`` particles lie on it (rendered, excluded from the truth).
    * ``n_ethane``: ethane/ice contamination, very dense blobs of ``ethane_diameter`` diameters.
    * ``n_aggregates``: clumps of ``aggregate_members`` touching particles (excluded).
    * ``n_junk``: small irregular dense bits of ``junk_diameter`` diameters.
    * ``gradient``: an intensity ramp across the image (ice thickness), this fraction end to end.
    * ``ice``: std of a random ice density (particle peak density is 1) under the CTF, so the
      background shows Thon rings as on a real micrograph.
    """

    carbon: bool = False
    carbon_darkening: float = 0.15
    carbon_particles: int = 0
    n_ethane: int = 0
    ethane_diameter: tuple[float, float] = (2.5, 5.0)
    ethane_darkening: float = 0.5
    n_aggregates: int = 0
    aggregate_members: tuple[int, int] = (4, 8)
    n_junk: int = 0
    junk_diameter: tuple[float, float] = (0.2, 0.45)
    gradient: float = 0.0
    ice: float = 0.0
    clearance: float = 0.5

    @classmethod
    def of_kinds(cls, kinds: Sequence[str], area_px: float) -> Distractors:
        """A moderate amount of each kind in ``kinds`` (DISTRACTOR_KINDS) for an image of
        ``area_px`` pixels: per 4096x4096, 20 particles on carbon, 3 ethane blobs, 4 aggregates,
        300 bits of junk (at least one each), a 20 % gradient, ice of std 0.3."""
        unknown = sorted(set(kinds) - set(DISTRACTOR_KINDS))
        if unknown:
            raise ValueError(f"unknown distractor kinds {unknown}; known: {DISTRACTOR_KINDS}")
        f = area_px / 4096**2

        def n(per_4k: int) -> int:
            return max(1, round(per_4k * f))

        return cls(
            carbon="carbon" in kinds,
            carbon_particles=n(20) if "carbon" in kinds else 0,
            n_ethane=n(3) if "ethane" in kinds else 0,
            n_aggregates=n(4) if "aggregates" in kinds else 0,
            n_junk=n(300) if "junk" in kinds else 0,
            gradient=0.2 if "gradient" in kinds else 0.0,
            ice=0.3 if "ice" in kinds else 0.0,
        )

    def __post_init__(self) -> None:
        counts = (self.carbon_particles, self.n_ethane, self.n_aggregates, self.n_junk)
        if min(counts) < 0:
            raise ValueError(f"distractor counts must be >= 0, got {counts}")
        if not 2 <= self.aggregate_members[0] <= self.aggregate_members[1]:
            raise ValueError(
                f"aggregate_members must be (lo, hi), 2 <= lo <= hi, got {self.aggregate_members}"
            )
        if self.ice < 0 or self.clearance < 0:
            raise ValueError(f"ice ({self.ice}) and clearance ({self.clearance}) must be >= 0")


@dataclass
class MovieTruth:
    """What :func:`make_movie` did: the true per-frame shifts (x, y) px and the exposure."""

    n_frames: int
    shape: tuple[int, int]
    dose_per_frame: float
    shifts_px: np.ndarray  # (n_frames, 2), (x, y), content of frame i moved by this
    gain_applied: bool
    ctf: CTFParams | None = None
    specimen: SpecimenTruth | None = None
    pixel_size_A: float | None = None


# --------------------------------------------------------------------------- specimen


def _place(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n: int,
    radius_px: float,
    taken: list[tuple[float, float, float]],
    clearance_px: float,
    what: str,
    allowed: Callable[[float, float], bool] | None = None,
) -> list[tuple[float, float]]:
    """Rejection-sample ``n`` centres inside the image, each ``clearance`` away from all others.

    ``allowed(x, y)``, if given, must also hold (e.g. in the hole, not on the carbon).
    """
    if n == 0:
        return []
    ny, nx = shape
    margin = radius_px + 1.0
    if nx <= 2 * margin or ny <= 2 * margin:
        raise ValueError(f"{what} of radius {radius_px:.1f} px do not fit in an image {nx}x{ny}")
    out: list[tuple[float, float]] = []
    # Existing objects as arrays, so each candidate is checked in one vectorised step.
    tx = np.array([t[0] for t in taken], dtype=np.float64)
    ty = np.array([t[1] for t in taken], dtype=np.float64)
    tr = np.array([t[2] for t in taken], dtype=np.float64)
    tries = 0
    max_tries = 2000 + 200 * n
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise ValueError(
                f"could place only {len(out)} of {n} {what} (diameter {2 * radius_px:.1f} px) in "
                f"{nx}x{ny} px with the requested separation; ask for fewer or a larger image"
            )
        x = rng.uniform(margin, nx - margin)
        y = rng.uniform(margin, ny - margin)
        if allowed is not None and not allowed(x, y):
            continue
        if tx.size:
            need = np.maximum(clearance_px, radius_px + tr + 2.0)
            if np.any(np.hypot(tx - x, ty - y) < need):
                continue
        out.append((x, y))
        taken.append((x, y, radius_px))
        tx, ty, tr = np.append(tx, x), np.append(ty, y), np.append(tr, radius_px)
    return out


def _add_sphere(img: np.ndarray, x: float, y: float, radius_px: float, amplitude: float) -> None:
    """Add the projection of a sphere (thickness ~ sqrt(r^2 - d^2)), peak ``amplitude``."""
    ny, nx = img.shape
    r = radius_px
    x0, x1 = max(int(np.floor(x - r - 2)), 0), min(int(np.ceil(x + r + 3)), nx)
    y0, y1 = max(int(np.floor(y - r - 2)), 0), min(int(np.ceil(y + r + 3)), ny)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    d2 = (xx - x) ** 2 + (yy - y) ** 2
    img[y0:y1, x0:x1] += amplitude * np.sqrt(np.clip(1.0 - d2 / (r * r), 0.0, None))


def _random_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """White noise blurred by ``sigma_px`` and scaled to unit std: film and ice texture."""
    from scipy import ndimage

    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px)
    return f / (float(f.std()) or 1.0)


def _carbon_edge(rng: np.random.Generator, shape: tuple[int, int], darkening: float) -> CarbonEdge:
    """A hole edge whose arc crosses the image; the carbon covers 20-35 % of it."""
    ny, nx = shape
    size = float(min(nx, ny))
    radius = rng.uniform(1.2, 2.5) * size
    angle = rng.uniform(0.0, 2.0 * np.pi)
    u = np.array([np.cos(angle), np.sin(angle)])
    # The edge point nearest the image centre lies this far out, towards u.
    edge = np.array([nx / 2.0, ny / 2.0]) + u * rng.uniform(0.15, 0.3) * size
    cx, cy = edge - u * radius
    return CarbonEdge(float(cx), float(cy), float(radius), float(darkening))


def _aggregate(rng: np.random.Generator, n: int, radius_px: float) -> list[tuple[float, float]]:
    """Member offsets of a clump of ``n`` touching particles (each 0.75-0.95 diameters from
    another one, none closer than 0.7 diameters to any), centred on (0, 0)."""
    pts = [(0.0, 0.0)]
    while len(pts) < n:
        bx, by = pts[rng.integers(len(pts))]
        a = rng.uniform(0.0, 2.0 * np.pi)
        d = rng.uniform(1.5, 1.9) * radius_px
        x, y = bx + d * np.cos(a), by + d * np.sin(a)
        if all(np.hypot(x - px, y - py) >= 1.4 * radius_px for px, py in pts):
            pts.append((x, y))
    arr = np.array(pts)
    arr -= arr.mean(axis=0)
    return [(float(a), float(b)) for a, b in arr]


def make_specimen(
    shape: tuple[int, int],
    pixel_size_A: float,
    *,
    n_particles: int,
    diameter_A: float,
    min_separation_factor: float = 1.5,
    n_specks: int = 0,
    speck_diameter_A: float | None = None,
    n_contaminants: int = 0,
    contaminant_diameter_A: float | None = None,
    rng: np.random.Generator | None = None,
    edge_softness_px: float = 1.0,
    distractors: Distractors | None = None,
) -> tuple[np.ndarray, SpecimenTruth]:
    """A projected-density image of round particles at known, well separated positions.

    Particles are projected spheres (peak density 1) softened by a Gaussian of
    ``edge_softness_px``; centres are at least ``min_separation_factor * diameter`` apart.
    Specks (default diameter: a fifth of a particle, density 4) and contaminants (default: four
    particle diameters, density 3) are decoys a picker must not report; they never overlap a
    particle. ``distractors`` adds the harder decoys of :class:`Distractors` (their density
    here; their amplitude contrast is :func:`amplitude_map`). Without it the random draws, and so
    the image for a given seed, are those of earlier versions. Returns the float32 image and the
    truth.
    """
    from scipy import ndimage

    if pixel_size_A <= 0 or diameter_A <= 0:
        raise ValueError(f"pixel size ({pixel_size_A}) and diameter ({diameter_A}) must be > 0")
    if min(n_particles, n_specks, n_contaminants) < 0:
        raise ValueError("object counts must be >= 0")
    rng = rng if rng is not None else np.random.default_rng()
    shape = (int(shape[0]), int(shape[1]))
    speck_d = speck_diameter_A if speck_diameter_A is not None else diameter_A / 5.0
    cont_d = contaminant_diameter_A if contaminant_diameter_A is not None else 4.0 * diameter_A
    r_p = diameter_A / 2.0 / pixel_size_A
    r_s = max(speck_d / 2.0 / pixel_size_A, 1.0)
    r_c = cont_d / 2.0 / pixel_size_A

    img = np.zeros(shape, dtype=np.float64)
    taken: list[tuple[float, float, float]] = []
    truth = SpecimenTruth(shape=shape, pixel_size_A=float(pixel_size_A))
    dis = distractors
    in_ice = None
    if dis is not None:
        keep_out = dis.clearance * 2.0 * r_p
        truth.ethane_darkening = float(dis.ethane_darkening)
        if dis.carbon:
            edge = truth.carbon = _carbon_edge(rng, shape, dis.carbon_darkening)
            yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
            film = 0.5 + 0.5 * np.tanh(edge.distance(xx, yy) / 4.0)
            texture = 1.0 + 0.3 * _random_field(rng, shape, 0.05 * r_p + 0.5)
            img += 0.5 * film * texture

            def in_ice(x: float, y: float) -> bool:
                return float(edge.distance(x, y)) < -(r_p + keep_out)

        for _ in range(dis.n_ethane):
            d_px = rng.uniform(*dis.ethane_diameter) * 2.0 * r_p
            ((x, y),) = _place(rng, shape, 1, d_px / 2.0, taken, 0.0, "ethane blobs")
            taken[-1] = (x, y, d_px / 2.0 + keep_out)
            _add_sphere(img, x, y, d_px / 2.0, 4.0)
            truth.ethane.append(Particle(float(x), float(y), float(d_px * pixel_size_A)))
        for _ in range(dis.n_aggregates):
            n_mem = int(rng.integers(dis.aggregate_members[0], dis.aggregate_members[1] + 1))
            members = _aggregate(rng, n_mem, r_p)
            extent = max(np.hypot(mx, my) for mx, my in members) + r_p
            ((x, y),) = _place(rng, shape, 1, extent, taken, 0.0, "aggregates", in_ice)
            taken[-1] = (x, y, extent + keep_out)
            for mx, my in members:
                _add_sphere(img, x + mx, y + my, r_p, 1.0)
                truth.excluded.append(Particle(float(x + mx), float(y + my), float(diameter_A)))
            truth.aggregates.append(Particle(float(x), float(y), float(2 * extent * pixel_size_A)))
    # Largest first, so the crowded small objects fill the space that is left.
    for x, y in _place(rng, shape, n_contaminants, r_c, taken, 0.0, "contaminants"):
        _add_sphere(img, x, y, r_c, 3.0)
        truth.contaminants.append(Particle(float(x), float(y), float(cont_d)))
    sep = min_separation_factor * 2.0 * r_p
    for x, y in _place(rng, shape, n_particles, r_p, taken, sep, "particles", in_ice):
        _add_sphere(img, x, y, r_p, 1.0)
        truth.particles.append(Particle(float(x), float(y), float(diameter_A)))
    if dis is not None and truth.carbon is not None and dis.carbon_particles:
        edge = truth.carbon

        def on_carbon(x: float, y: float) -> bool:
            return float(edge.distance(x, y)) > r_p

        for x, y in _place(
            rng, shape, dis.carbon_particles, r_p, taken, sep, "particles on carbon", on_carbon
        ):
            _add_sphere(img, x, y, r_p, 1.0)
            truth.excluded.append(Particle(float(x), float(y), float(diameter_A)))
    for x, y in _place(rng, shape, n_specks, r_s, taken, 0.0, "specks"):
        _add_sphere(img, x, y, r_s, 4.0)
        truth.specks.append(Particle(float(x), float(y), float(speck_d)))
    if dis is not None:
        for _ in range(dis.n_junk):
            size_px = rng.uniform(*dis.junk_diameter) * 2.0 * r_p
            ((x, y),) = _place(rng, shape, 1, size_px / 2.0, taken, 0.0, "junk")
            # Two to four lumps of dense matter within the junk's outline: irregular, not round.
            for _ in range(int(rng.integers(2, 5))):
                a, d = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.0, 0.3) * size_px
                _add_sphere(
                    img,
                    x + d * np.cos(a),
                    y + d * np.sin(a),
                    max(rng.uniform(0.2, 0.35) * size_px, 1.0),
                    rng.uniform(1.5, 3.0),
                )
            truth.junk.append(Particle(float(x), float(y), float(size_px * pixel_size_A)))
    if edge_softness_px > 0:
        img = ndimage.gaussian_filter(img, edge_softness_px, mode="constant")
    return img.astype(np.float32), truth


def amplitude_map(truth: SpecimenTruth) -> np.ndarray:
    """Amplitude contrast of the carbon and ethane in ``truth``: fractional darkening (float32).

    Ethane blobs darken like their thickness (a projected sphere), ``truth.ethane_darkening``
    at the centre; the carbon film by its own ``darkening``, with an edge a few pixels soft.
    """
    ny, nx = truth.shape
    out = np.zeros((ny, nx), dtype=np.float64)
    if truth.carbon is not None:
        yy, xx = np.mgrid[0:ny, 0:nx]
        out += truth.carbon.darkening * (0.5 + 0.5 * np.tanh(truth.carbon.distance(xx, yy) / 6.0))
    for e in truth.ethane:
        _add_sphere(out, e.x, e.y, e.diameter_A / truth.pixel_size_A / 2.0, truth.ethane_darkening)
    return out.astype(np.float32)


def particle_contrast(image: np.ndarray, truth: SpecimenTruth) -> float:
    """Mean darkening over the central half-radius of the true particles, over the image std.

    This is how "particle contrast as a fraction of the image std" is measured here: on a
    noisy micrograph (counts) or a noise-free contrast image alike.
    """
    img = np.asarray(image, dtype=np.float64)
    ny, nx = img.shape
    inside = np.zeros(img.shape, dtype=bool)
    for p in truth.particles:
        r = p.diameter_A / truth.pixel_size_A / 4.0
        y0, y1 = max(int(p.y - r), 0), min(int(p.y + r) + 2, ny)
        x0, x1 = max(int(p.x - r), 0), min(int(p.x + r) + 2, nx)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside[y0:y1, x0:x1] |= np.hypot(xx - p.x, yy - p.y) < r
    return float((img.mean() - img[inside].mean()) / img.std())


# --------------------------------------------------------------------------- CTF


def apply_ctf(
    image: np.ndarray,
    pixel_size_A: float,
    ctf: CTFParams,
    b_factor: float = 50.0,
) -> np.ndarray:
    """Weak-phase image of a projected density: ``IFFT(CTF * exp(-B g^2 / 4) * FFT(image))``.

    The CTF is :func:`ctf_model.ctf_2d` (``-sin(chi)``, CTFFIND conventions), so at underfocus mass
    appears dark. ``b_factor`` (Angstrom^2) is the usual envelope, 0 for none. Returns float32
    contrast with the mean removed (the zero frequency carries no phase contrast).
    """
    img = np.asarray(image, dtype=np.float32)
    ft = np.fft.rfft2(img)
    h = ctf_2d(img.shape, pixel_size_A, ctf, rfft=True)
    if b_factor:
        g, _ = spatial_frequency_grid(img.shape, pixel_size_A, rfft=True)
        h = h * np.exp(-b_factor * g * g / 4.0)
    ft *= h
    ft[0, 0] = 0.0
    return np.fft.irfft2(ft, s=img.shape).astype(np.float32)


# --------------------------------------------------------------------------- drift and movies


def default_drift(
    n_frames: int, total_px: float, rng: np.random.Generator | None = None
) -> np.ndarray:
    """A beam-induced-motion-like trajectory: fast at first, then slowing, slowly turning.

    Returns (n_frames, 2) (x, y) px starting at (0, 0); the path length is ``total_px``.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    rng = rng if rng is not None else np.random.default_rng()
    if n_frames == 1:
        return np.zeros((1, 2))
    step_len = np.exp(-np.arange(n_frames - 1) / max(n_frames / 6.0, 1.0))
    step_len = step_len * (1.0 + 0.15 * rng.standard_normal(n_frames - 1)).clip(0.3, None)
    step_len *= total_px / step_len.sum()
    angle = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.25, n_frames - 1))
    steps = np.stack([np.cos(angle), np.sin(angle)], axis=1) * step_len[:, None]
    return np.vstack([np.zeros((1, 2)), np.cumsum(steps, axis=0)])


def fourier_shift(image: np.ndarray, shift_xy: Sequence[float]) -> np.ndarray:
    """Move ``image`` by (dx, dy) px with a Fourier phase ramp (periodic, exact at sub-pixel)."""
    img = np.asarray(image, dtype=np.float32)
    ny, nx = img.shape
    ft = np.fft.rfft2(img)
    ft *= _phase_ramp((ny, nx), shift_xy[0], shift_xy[1])
    return np.fft.irfft2(ft, s=(ny, nx)).astype(np.float32)


def _phase_ramp(shape: tuple[int, int], dx: float, dy: float) -> np.ndarray:
    ny, nx = shape
    ky = np.fft.fftfreq(ny).astype(np.float32)
    kx = np.fft.rfftfreq(nx).astype(np.float32)
    return np.exp(-2j * np.pi * ky[:, None] * np.float32(dy)).astype(np.complex64) * np.exp(
        -2j * np.pi * kx[None, :] * np.float32(dx)
    ).astype(np.complex64)


def make_movie(
    image: np.ndarray,
    *,
    n_frames: int,
    dose_per_frame: float,
    drift: np.ndarray | Callable[[int], np.ndarray] | None = None,
    gain: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    out_shape: tuple[int, int] | None = None,
    dtype: Any = np.uint8,
) -> tuple[np.ndarray, MovieTruth]:
    """Render a dose-fractionated counting movie of a contrast ``image`` with known drift.

    ``image`` is fractional contrast around the mean (0 = background): the expected counts of
    frame ``i`` are ``dose_per_frame * max(1 + image(r - drift[i]), 0) / gain`` (e/px/frame), drawn
    from a Poisson distribution. ``drift`` is an (n_frames, 2) (x, y) px array, or a function of
    ``n_frames`` returning one; by default :func:`default_drift` with 3 px total.

    With ``out_shape`` the frames are the central ``out_shape`` crop of the shifted image, so
    new content enters at the edges as on a real detector; without it the shift wraps around.
    ``gain`` (a gain reference, see module doc) must match the output shape. Counts are stored in
    ``dtype`` (uint8 like a K3 counting TIFF; counts above its range raise).
    """
    import scipy.fft as sfft

    rng = rng if rng is not None else np.random.default_rng()
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    if n_frames < 1 or dose_per_frame <= 0:
        raise ValueError(
            f"need n_frames >= 1 and dose_per_frame > 0 (got {n_frames}, {dose_per_frame})"
        )
    if drift is None:
        shifts = default_drift(n_frames, 3.0, rng)
    elif callable(drift):
        shifts = np.asarray(drift(n_frames), dtype=np.float64)
    else:
        shifts = np.asarray(drift, dtype=np.float64)
    if shifts.shape != (n_frames, 2):
        raise ValueError(f"drift must have shape ({n_frames}, 2), got {shifts.shape}")
    ny, nx = img.shape
    oy, ox = out_shape if out_shape is not None else (ny, nx)
    if oy > ny or ox > nx:
        raise ValueError(f"out_shape {out_shape} is larger than the image {img.shape}")
    y0, x0 = (ny - oy) // 2, (nx - ox) // 2
    efficiency = None
    if gain is not None:
        gain = np.asarray(gain, dtype=np.float32)
        if gain.shape != (oy, ox):
            raise ValueError(f"gain shape {gain.shape} does not match frame shape {(oy, ox)}")
        if np.any(gain <= 0):
            raise ValueError("gain reference values must be > 0")
        efficiency = (1.0 / gain).astype(np.float32)
    frames = np.empty((n_frames, oy, ox), dtype=dtype)
    limit = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else np.inf
    # Single precision and all cores: a K3-sized movie is 40 full-size inverse FFTs.
    ft = sfft.rfft2(img, workers=-1)
    for i in range(n_frames):
        moved = sfft.irfft2(ft * _phase_ramp((ny, nx), *shifts[i]), s=(ny, nx), workers=-1)
        lam = np.clip(1.0 + moved[y0 : y0 + oy, x0 : x0 + ox], 0.0, None) * dose_per_frame
        if efficiency is not None:
            lam *= efficiency
        counts = rng.poisson(lam)
        if counts.max(initial=0) > limit:
            raise ValueError(
                f"counts exceed {np.dtype(dtype).name}; use a wider dtype or less dose"
            )
        frames[i] = counts
    truth = MovieTruth(
        n_frames=n_frames,
        shape=(oy, ox),
        dose_per_frame=float(dose_per_frame),
        shifts_px=shifts,
        gain_applied=gain is not None,
    )
    return frames, truth


def make_gain(
    shape: tuple[int, int], spread: float = 0.1, rng: np.random.Generator | None = None
) -> np.ndarray:
    """A plausible gain reference: ~1 with per-pixel spread and a smooth vignetting, float32."""
    rng = rng if rng is not None else np.random.default_rng()
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    r2 = ((xx - nx / 2) / nx) ** 2 + ((yy - ny / 2) / ny) ** 2
    g = (1.0 + 0.3 * r2) * np.exp(rng.normal(0.0, spread, shape))
    return g.astype(np.float32)


def make_micrograph(
    shape: tuple[int, int],
    pixel_size_A: float,
    ctf: CTFParams,
    **kwargs: Any,
) -> tuple[np.ndarray, SpecimenTruth]:
    """One noisy, aligned micrograph (float32 counts) of a fresh specimen: for CTF/picking tests.

    The counts and truth of :func:`make_micrograph_with_contrast` (same arguments).
    """
    counts, truth, _ = make_micrograph_with_contrast(shape, pixel_size_A, ctf, **kwargs)
    return counts, truth


def make_micrograph_with_contrast(
    shape: tuple[int, int],
    pixel_size_A: float,
    ctf: CTFParams,
    *,
    dose_total: float = 40.0,
    contrast: float = 0.1,
    b_factor: float = 50.0,
    rng: np.random.Generator | None = None,
    distractors: Distractors | None = None,
    **specimen_kwargs: Any,
) -> tuple[np.ndarray, SpecimenTruth, np.ndarray]:
    """A micrograph's counts, truth and noise-free fractional contrast image (to state how
    faint a benchmark's micrographs are).

    ``contrast`` scales the CTF-filtered density (whose particle peak is ~1) into fractional
    intensity; counts are Poisson at ``dose_total`` e/px. ``specimen_kwargs`` go to
    :func:`make_specimen` (n_particles, diameter_A, ...). ``distractors`` adds carbon, ethane,
    aggregates, junk (see :func:`make_specimen`), random ice density under the CTF, the amplitude
    contrast of carbon and ethane (:func:`amplitude_map`) and an intensity gradient.
    """
    rng = rng if rng is not None else np.random.default_rng()
    dens, truth = make_specimen(
        shape, pixel_size_A, rng=rng, distractors=distractors, **specimen_kwargs
    )
    img = specimen_contrast(
        dens, truth, ctf, contrast=contrast, b_factor=b_factor, distractors=distractors, rng=rng
    )
    lam = np.clip(1.0 + img, 0.0, None) * dose_total
    return rng.poisson(lam).astype(np.float32), truth, img


def specimen_contrast(
    density: np.ndarray,
    truth: SpecimenTruth,
    ctf: CTFParams,
    *,
    contrast: float,
    b_factor: float = 50.0,
    distractors: Distractors | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The fractional-contrast image of a :func:`make_specimen` density, ready for counting.

    ``contrast * apply_ctf(density)``; with ``distractors`` (the same as given to
    :func:`make_specimen`) also the random ice under the CTF, the amplitude contrast of carbon
    and ethane (:func:`amplitude_map`) and the intensity gradient. Feed the result to
    :func:`make_movie` or count it as :func:`make_micrograph` does.
    """
    rng = rng if rng is not None else np.random.default_rng()
    dens = density
    if distractors is not None and distractors.ice > 0:
        dens = dens + distractors.ice * _random_field(rng, dens.shape, 1.0)
    img = contrast * apply_ctf(dens, truth.pixel_size_A, ctf, b_factor=b_factor)
    if distractors is not None:
        img -= amplitude_map(truth)
        if distractors.gradient:
            ny, nx = img.shape
            a = rng.uniform(0.0, 2.0 * np.pi)
            yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
            ramp = (np.cos(a) * (xx / nx - 0.5) + np.sin(a) * (yy / ny - 0.5)).astype(np.float32)
            img -= np.float32(distractors.gradient) * ramp
    return img


# --------------------------------------------------------------------------- writers


def write_movie_mrc(path: str | os.PathLike, frames: np.ndarray, pixel_size_A: float) -> None:
    """A movie as an MRC stack, atomically (uint8 counts are stored as uint16: MRC mode 6)."""
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"a movie must be (n, ny, nx), got shape {frames.shape}")
    write_mrc(path, frames, pixel_size_A)


def write_movie_tiff(path: str | os.PathLike, frames: np.ndarray) -> None:
    """A movie as a multi-page TIFF, one page per frame, integer counts (as EPU writes them)."""
    import tifffile

    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"a movie must be (n, ny, nx), got shape {frames.shape}")
    if not np.issubdtype(frames.dtype, np.integer):
        raise ValueError(f"TIFF movies hold integer counts, got dtype {frames.dtype}")
    # One series of n pages, so tifffile.imread (and other readers) see the whole stack.
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, frames, compression="zlib", photometric="minisblack")


def write_gain_mrc(path: str | os.PathLike, gain: np.ndarray) -> None:
    """A gain reference as float32 MRC (multiply raw frames by it to correct them)."""
    write_mrc(path, np.asarray(gain, dtype=np.float32), None)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def truth_to_dict(truth: Any) -> dict[str, Any]:
    """A truth dataclass (nested ones included) as plain JSON types."""
    return _jsonable(asdict(truth))


def write_truth_json(path: str | os.PathLike, truth: Any) -> None:
    """Truth (a dataclass or a dict of them) as JSON, atomically."""
    data = (
        truth_to_dict(truth)
        if hasattr(truth, "__dataclass_fields__")
        else _jsonable(
            {
                k: truth_to_dict(v) if hasattr(v, "__dataclass_fields__") else v
                for k, v in truth.items()
            }
        )
    )
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cryoflow-synth",
        description="Write a synthetic counting movie (TIFF or MRC by name) with ground truth.",
    )
    p.add_argument("out", type=Path, help="movie path, *.tif/*.tiff or *.mrc/*.mrcs")
    p.add_argument("--size", type=int, nargs=2, default=(1024, 1024), metavar=("NX", "NY"))
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--pixel-size", type=float, default=1.0, help="Angstrom per pixel")
    p.add_argument("--dose", type=float, default=1.0, help="e/px/frame")
    p.add_argument("--drift", type=float, default=4.0, help="total drift path length, px")
    p.add_argument("--defocus", type=float, default=15000.0, help="mean defocus, Angstrom")
    p.add_argument("--astig", type=float, default=300.0, help="defocus1 - defocus2, Angstrom")
    p.add_argument("--astig-angle", type=float, default=30.0, help="degrees")
    p.add_argument("--kv", type=float, default=300.0)
    p.add_argument("--particles", type=int, default=12)
    p.add_argument("--diameter", type=float, default=150.0, help="particle diameter, Angstrom")
    p.add_argument("--contrast", type=float, default=0.3, help="fractional contrast scale")
    p.add_argument(
        "--distractors",
        default="",
        metavar="KIND[,KIND...]",
        help=f"add decoys ({', '.join(DISTRACTOR_KINDS)}); see synthetic.Distractors.of_kinds",
    )
    p.add_argument("--gain", type=Path, help="also write a gain reference MRC here")
    p.add_argument("--truth", type=Path, help="truth JSON (default: <out>.truth.json)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``cryoflow-synth``."""
    args = _parser().parse_args(argv)
    suffix = args.out.suffix.lower()
    if suffix not in {".tif", ".tiff", ".mrc", ".mrcs"}:
        print(
            f"cryoflow-synth: unsupported movie extension {suffix!r} in {args.out}", file=sys.stderr
        )
        return 2
    nx, ny = args.size
    rng = np.random.default_rng(args.seed)
    ctf = CTFParams(
        defocus1_A=args.defocus + args.astig / 2,
        defocus2_A=args.defocus - args.astig / 2,
        astig_angle_deg=args.astig_angle,
        kv=args.kv,
    )
    pad = int(np.ceil(args.drift)) + 16
    try:
        kinds = [k for k in args.distractors.split(",") if k]
        dis = Distractors.of_kinds(kinds, float(nx * ny)) if kinds else None
        dens, spec = make_specimen(
            (ny + 2 * pad, nx + 2 * pad),
            args.pixel_size,
            n_particles=args.particles,
            diameter_A=args.diameter,
            rng=rng,
            distractors=dis,
        )
        img = specimen_contrast(dens, spec, ctf, contrast=args.contrast, distractors=dis, rng=rng)
        gain = make_gain((ny, nx), rng=rng) if args.gain else None
        drift = default_drift(args.frames, args.drift, rng)
        frames, truth = make_movie(
            img,
            n_frames=args.frames,
            dose_per_frame=args.dose,
            drift=drift,
            gain=gain,
            rng=rng,
            out_shape=(ny, nx),
            dtype=np.uint8 if args.dose < 20 else np.uint16,
        )
    except ValueError as exc:
        print(f"cryoflow-synth: {exc}", file=sys.stderr)
        return 2
    # Particle positions in the cropped frame coordinates of the still (undrifted) image.
    objects = [spec.particles, spec.specks, spec.contaminants, spec.excluded, spec.aggregates]
    for obj in [o for group in objects + [spec.ethane, spec.junk] for o in group]:
        obj.x -= pad
        obj.y -= pad
    if spec.carbon is not None:
        spec.carbon.x -= pad
        spec.carbon.y -= pad
    spec.shape = (ny, nx)
    truth.ctf = ctf
    truth.specimen = spec
    truth.pixel_size_A = args.pixel_size
    if gain is not None:
        write_gain_mrc(args.gain, gain)
    if suffix in {".tif", ".tiff"}:
        write_movie_tiff(args.out, frames)
    else:
        write_movie_mrc(args.out, frames, args.pixel_size)
    write_truth_json(args.truth or args.out.with_name(args.out.name + ".truth.json"), truth)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
