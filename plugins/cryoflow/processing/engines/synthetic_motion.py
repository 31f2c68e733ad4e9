"""Synthetic movies with local (non-rigid) motion at realistic contrast, for motion correction.

Why: :func:`cryoflow.processing.engines.synthetic.make_movie` moves each frame rigidly, so it
cannot tell a
local-motion correction from a global one, and its test specimen is about ten times more
contrasty than a real micrograph. Here each frame is the specimen image deformed by a smooth
field over space and time, scaled to a chosen image std (real micrographs: 1-2 %).

Convention (as in :mod:`cryoflow.processing.engines.synthetic`): frame ``i`` shows the content
that sits at
``p`` in the still image at ``p + D_i(p)``, with ``D_i(p) = drift[i] + local_i(p)`` in (x, y) px.
``local`` has zero mean over the frame in every frame and is zero in frame 0, so ``drift`` is the
frame-average (global) trajectory.

Rendering: the deformation is applied by exact sub-pixel Fourier shifts of small windowed tiles
(32 px hop, 64 px tiles, a sin^2 partition of unity), so the shift is piecewise constant over
32 px cells; the field changes by well under 0.05 px across one cell for the fields made here.
A rigid shift is rendered to ~0.3 % (rms) of a full-frame Fourier shift of the same image.
That is far finer than the engine's correction tiles (>= 192 px), and much faster than spline
interpolation at K3 size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

from cryoflow.processing.engines import synthetic as syn
from cryoflow.processing.engines.ctf_model import CTFParams

__all__ = ["LocalMotionTruth", "make_local_motion_movie", "realistic_image", "smooth_field"]

_HOP = 32  # rendering cell (px); tiles are 2 * _HOP with a sin^2 overlap


@dataclass
class LocalMotionTruth:
    """What the generator did: global drift (n, 2) and the local field, both (x, y) px."""

    shifts_px: np.ndarray  # (n, 2) frame-average trajectory, frame 0 at (0, 0)
    temporal: np.ndarray  # (n,) profile of the local field, 0 at frame 0, 1 at the last frame
    field: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (x, y) -> (len, 2) at the last frame
    shape: tuple[int, int]

    def displacement(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n, len(x), 2): where the content at still position (x, y) sits in each frame."""
        loc = self.field(np.asarray(x, float), np.asarray(y, float))
        return self.shifts_px[:, None, :] + self.temporal[:, None, None] * loc[None]


def realistic_image(
    shape: tuple[int, int],
    pixel_A: float,
    contrast_std: float,
    rng: np.random.Generator,
    defocus_A: float = 15000.0,
) -> np.ndarray:
    """A CTF-modulated particle field (150 A particles, crowded as on a grid), image std set."""
    area = shape[0] * shape[1] * (pixel_A / 0.83) ** 2 / (1024 * 1024)  # in 0.83 A K3 frames
    dens, _ = syn.make_specimen(
        shape,
        pixel_A,
        n_particles=int(7 * area) + 1,
        diameter_A=150.0,
        n_contaminants=int(area / 8),
        contaminant_diameter_A=500.0,
        rng=rng,
    )
    img = syn.apply_ctf(dens, pixel_A, CTFParams(defocus_A, defocus_A - 500.0, 30.0))
    img *= np.float32(contrast_std / max(float(img.std()), 1e-12))
    return img


def smooth_field(
    shape: tuple[int, int], amplitude_px: float, rng: np.random.Generator
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A smooth, non-polynomial displacement field: three broad Gaussian bumps ("doming"),
    each pushing along its own direction, mean removed over the frame, max |field| scaled to
    ``amplitude_px``. Returns f(x, y) -> (len, 2)."""
    ny, nx = shape
    centres = rng.uniform(0.1, 0.9, (3, 2)) * (nx, ny)
    sigmas = rng.uniform(0.3, 0.5, 3) * max(ny, nx)
    angles = rng.uniform(0, 2 * np.pi, 3)
    dirs = np.stack([np.cos(angles), np.sin(angles)], axis=1) * rng.uniform(0.5, 1.0, (3, 1))

    def raw(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.zeros(x.shape + (2,))
        for c, s, d in zip(centres, sigmas, dirs, strict=True):
            g = np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2) / (2 * s * s))
            out += g[..., None] * d
        return out

    gy, gx = np.mgrid[0:ny:16, 0:nx:16].astype(float)
    sample = raw(gx.ravel(), gy.ravel())
    mean = sample.mean(axis=0)
    scale = amplitude_px / max(float(np.hypot(*(sample - mean).T).max()), 1e-12)
    return lambda x, y: (raw(np.asarray(x, float), np.asarray(y, float)) - mean) * scale


def _window(n: int) -> np.ndarray:
    """sin^2 rise over the first half, cos^2 fall over the second: tiles at hop n/2 sum to 1."""
    h = n // 2
    ramp = np.sin(0.5 * np.pi * (np.arange(h) + 0.5) / h) ** 2
    return np.concatenate([ramp, ramp[::-1]]).astype(np.float32)


def _render_frame(
    img: np.ndarray,
    pad: int,
    out_shape: tuple[int, int],
    shift_at: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """One deformed frame: each 64 px tile of the padded still, windowed, Fourier-shifted by
    the displacement at its centre, and added. ``img`` is the zero-mean contrast image: the
    windows move with their content, so where neighbouring tiles move differently they no
    longer add up to exactly 1; that error scales with the contrast, not with the dose."""
    oy, ox = out_shape
    t = 2 * _HOP
    w1 = _window(t)
    w2 = w1[:, None] * w1[None, :]
    ky = np.fft.fftfreq(t)[None, :, None]
    kx = np.fft.rfftfreq(t)[None, None, :]
    out = np.zeros((oy + 2 * t, ox + 2 * t), np.float32)  # tile k lands at y0 + _HOP >= 0
    xs = np.arange(-_HOP, ox, _HOP)
    for y0 in range(-_HOP, oy, _HOP):
        cx = xs + _HOP + 0.0
        cy = np.full_like(cx, y0 + _HOP)
        s = shift_at(cx, cy)  # (k, 2)
        n = np.round(s).astype(int)
        f = s - n
        tiles = np.empty((len(xs), t, t), np.float32)
        for k, x0 in enumerate(xs):
            r0 = y0 + pad - n[k, 1]
            c0 = x0 + pad - n[k, 0]
            tiles[k] = img[r0 : r0 + t, c0 : c0 + t]
        tiles *= w2  # window first: the tile is then periodic and its shift rings nowhere
        spec = sfft.rfft2(tiles, workers=-1)
        spec *= np.exp(-2j * np.pi * (ky * f[:, 1, None, None] + kx * f[:, 0, None, None]))
        moved = sfft.irfft2(spec, s=(t, t), workers=-1)
        for k, x0 in enumerate(xs):
            out[y0 + _HOP : y0 + _HOP + t, x0 + _HOP : x0 + _HOP + t] += moved[k]
    return out[_HOP : _HOP + oy, _HOP : _HOP + ox]


def make_local_motion_movie(
    shape: tuple[int, int],
    n_frames: int,
    *,
    pixel_A: float = 1.0,
    contrast_std: float = 0.01,
    drift_px: float = 10.0,
    local_px: float = 2.0,
    dose_per_frame: float = 1.0,
    rng: np.random.Generator | None = None,
    ref: int | None = None,
    texture_std: float = 0.0,
) -> tuple[np.ndarray, LocalMotionTruth, np.ndarray]:
    """A counting movie (uint8, (n, ny, nx)) of a specimen moving globally and locally.

    Returns ``(frames, truth, still)``; ``still`` is the noise-free contrast image as frame
    ``ref`` (default ``n // 2``, the engine's reference) shows it, for comparing sums against.
    The local field follows the drift's time course (fast first, then slowing) and reaches
    ``local_px`` (max over the frame) in the last frame. ``texture_std`` adds a fine random
    texture (flat spectrum to 0.35 cycles/px, like a carbon support film) of that std: particle
    images carry little power at high resolution, so a test of sharpness needs it.
    """
    rng = rng if rng is not None else np.random.default_rng()
    ny, nx = shape
    ref = n_frames // 2 if ref is None else ref
    drift = syn.default_drift(n_frames, drift_px, rng)
    field = smooth_field(shape, local_px, rng)
    tau = 1.0 - np.exp(-np.arange(n_frames) / max(n_frames / 6.0, 1.0))
    tau /= max(tau[-1], 1e-12)
    truth = LocalMotionTruth(shifts_px=drift, temporal=tau, field=field, shape=(ny, nx))
    pad = int(np.ceil(drift_px + local_px)) + 2 * _HOP + 2
    img = realistic_image((ny + 2 * pad, nx + 2 * pad), pixel_A, contrast_std, rng)
    if texture_std > 0:
        noise = sfft.rfft2(rng.standard_normal(img.shape).astype(np.float32))
        f = np.hypot(*np.meshgrid(np.fft.fftfreq(img.shape[0]), np.fft.rfftfreq(img.shape[1]),
                                  indexing="ij"))  # fmt: skip
        noise *= (f < 0.35) & (f > 0.01)
        tex = sfft.irfft2(noise, s=img.shape).astype(np.float32)
        img += tex * np.float32(texture_std / max(float(tex.std()), 1e-12))
    frames = np.empty((n_frames, ny, nx), np.uint8)

    def at(i: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        return lambda x, y: drift[i] + tau[i] * field(x, y)

    for i in range(n_frames):
        moved = _render_frame(img, pad, (ny, nx), at(i))
        lam = np.clip(1.0 + moved, 0.0, None) * dose_per_frame
        frames[i] = np.minimum(rng.poisson(lam), 255)
    still = _render_frame(img, pad, (ny, nx), at(ref))
    return frames, truth, still
