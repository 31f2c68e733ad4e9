"""Local (patch) motion correction, accuracy at realistic contrast, and the FFT thread count.

Movies come from :mod:`cryoflow.processing.engines.synthetic_motion`: a smooth deformation over
space and
time (three broad "doming" bumps, not a polynomial, so the engine's model is only an
approximation of it) on top of a global drift. Frame sizes are modest (1024 px) to keep the
module near 30 s on two cores; K3-sized figures are in benchmarks/bench_engines_motioncor.py.

Sharpness is measured as the *signal transfer* of a sum: Re<F(sum) F(still)*> / <|F(still)|^2>
over a band of spatial frequencies, per frame. Shot noise is independent of the still, so this
is unbiased by noise (unlike a plain correlation coefficient); motion blur lowers it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryoflow.processing.engines import motioncor as mc
from cryoflow.processing.engines import synthetic as syn
from cryoflow.processing.engines import synthetic_motion as smo
from cryoflow.processing.tools.motioncor2 import find_shift_log, parse_shift_log

SIZE = 1024
N_FRAMES = 24
PIXEL_A = 2.0
PATCH = (3, 3)


def signal_transfer(img: np.ndarray, still: np.ndarray, lo: float, hi: float) -> float:
    """Fraction of the still's signal in the band lo..hi cycles/px that the sum carries.

    Over the interior only (64 px margins cut): at the borders the global path's periodic
    Fourier shift wraps content around, which would dominate a high-resolution band.
    """
    img, still = img[64:-64, 64:-64], still[64:-64, 64:-64]
    f = np.hypot(
        *np.meshgrid(np.fft.fftfreq(img.shape[0]), np.fft.rfftfreq(img.shape[1]), indexing="ij")
    )
    band = (f > lo) & (f < hi)
    fa, fb = np.fft.rfft2(img)[band], np.fft.rfft2(still)[band]
    return float((fa * np.conj(fb)).real.sum() / (abs(fb) ** 2).sum())


def local_error(est_global: np.ndarray, model: mc.LocalMotion | None, truth, xy) -> float:
    """RMS (px) over frames and points of estimated minus true displacement, each point's
    constant offset removed (only motion relative to the reference frame is measurable)."""
    x, y = xy
    est = est_global[:, None, :] + (model.shifts(x, y) if model is not None else 0.0)
    d = est - truth.displacement(x, y)
    d -= d.mean(axis=0)
    return float(np.sqrt((d**2).sum(axis=-1).mean()))


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory) -> dict:
    """3 px local motion; particles (5 % std) on a fine texture (5 %), which carries the
    high-resolution signal a sharpness test needs; summed globally and with -Patch 3 3."""
    root = tmp_path_factory.mktemp("local")
    frames, truth, still = smo.make_local_motion_movie(
        (SIZE, SIZE),
        N_FRAMES,
        pixel_A=PIXEL_A,
        contrast_std=0.05,
        drift_px=10.0,
        local_px=3.0,
        rng=np.random.default_rng(11),
        texture_std=0.05,
    )
    movie = root / "local_fractions.tiff"
    syn.write_movie_tiff(movie, frames)
    out = {"truth": truth, "still": still, "raw_mean": float(frames.mean(dtype=np.float64))}
    for name, patch in (("global", (0, 0)), ("local", PATCH)):
        res = mc.run(
            mc.MotionCorParams(
                in_path=movie,
                out_mrc=root / name / "sum.mrc",
                patch=patch,
                pixel_size_A=PIXEL_A,
                fm_dose=1.0 / PIXEL_A**2,
                log_dir=root / name,
                preview=False,
            )
        )
        out[name] = res
        out[name + "_sum"] = mrcfile.read(res.sum_path).astype(np.float64)
        out[name + "_dw"] = mrcfile.read(res.dw_path).astype(np.float64)
    return out


def _grid_points(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    g = (np.arange(n) + 0.5) * SIZE / n
    gx, gy = np.meshgrid(g, g)
    return gx.ravel(), gy.ravel()


def test_patch_model_follows_the_local_motion(local_runs):
    truth, loc, glo = local_runs["truth"], local_runs["local"], local_runs["global"]
    assert loc.local_motion is not None and glo.local_motion is None
    assert loc.local_applied and not glo.local_applied
    xy = _grid_points()
    err_local = local_error(loc.shifts_px, loc.local_motion, truth, xy)
    err_global = local_error(glo.shifts_px, None, truth, xy)
    # The global trajectory alone misses the deformation; the fitted model recovers most of it.
    assert err_global > 0.4, err_global
    assert err_local < 0.6 * err_global, (err_local, err_global)  # measured 0.23 vs 0.44 px
    assert err_local < 0.3, err_local


def test_patch_alignment_on_frame_groups(local_runs, tmp_path):
    """-Group 1 4: patches are aligned on 4-frame sums (more signal per correlation); each frame
    logs its group's shift and the model still follows the deformation."""
    movie = next(Path(local_runs["local"].sum_path).parent.parent.glob("*.tiff"))
    res = mc.run(
        mc.MotionCorParams(
            in_path=movie, out_mrc=tmp_path / "g.mrc", patch=PATCH, group=(1, 4), preview=False
        )
    )
    assert res.patch_shifts is not None and res.local_applied
    np.testing.assert_array_equal(res.patch_shifts[0], res.patch_shifts[3])  # one group
    assert not np.array_equal(res.patch_shifts[3], res.patch_shifts[4])  # the next one
    err = local_error(res.shifts_px, res.local_motion, local_runs["truth"], _grid_points())
    assert err < 0.3, err


def test_locally_corrected_sum_is_sharper_than_the_global_one(local_runs):
    still = local_runs["still"]
    t = {
        name: signal_transfer(local_runs[name + "_sum"], still, 0.2, 0.34) / N_FRAMES
        for name in ("global", "local")
    }
    low = {
        name: signal_transfer(local_runs[name + "_sum"], still, 0.01, 0.05) / N_FRAMES
        for name in ("global", "local")
    }
    # Detail the global-only sum blurred away (measured 0.95 vs 0.88 of the still's signal).
    assert t["local"] > 1.04 * t["global"], t
    assert low["local"] == pytest.approx(low["global"], rel=0.03), low  # same coarse content
    assert low["local"] == pytest.approx(1.0, abs=0.05), low  # and nothing lost or doubled


def test_local_sums_keep_the_exposure_and_the_motioncor2_logs(local_runs, tmp_path):
    n_px = local_runs["local_sum"].size
    expected = local_runs["raw_mean"] * N_FRAMES
    for kind in ("local_sum", "local_dw"):
        assert local_runs[kind].mean() == pytest.approx(expected, rel=1e-3), kind
    assert local_runs["local_sum"].shape == (SIZE, SIZE) and n_px == SIZE * SIZE
    res = local_runs["local"]
    log = parse_shift_log(find_shift_log(res.log_paths[0].parent, "local_fractions.tiff"))
    assert log.patch and sorted(log.patch_shifts) == list(range(1, PATCH[0] * PATCH[1] + 1))
    np.testing.assert_allclose(np.array(log.shifts_px), res.shifts_px, atol=0.01)


# --------------------------------------------------------------------------- realistic contrast


@pytest.fixture(scope="module")
def realistic_movie(tmp_path_factory) -> dict:
    """Image std 2 % (a real micrograph's), 1 e/px/frame, global drift only."""
    root = tmp_path_factory.mktemp("realistic")
    frames, truth, _ = smo.make_local_motion_movie(
        (SIZE, SIZE), N_FRAMES, pixel_A=PIXEL_A, contrast_std=0.02, drift_px=10.0,
        local_px=0.0, rng=np.random.default_rng(5),
    )  # fmt: skip
    syn.write_movie_tiff(root / "m.tiff", frames)
    params = mc.MotionCorParams(in_path=root / "m.tiff", out_mrc=root / "s.mrc", preview=False)
    return {"truth": truth, "res": mc.run(params), "params": params}


def test_drift_at_realistic_contrast_is_bounded(realistic_movie):
    """Regression bound at 2 % std on a 1024 px frame (measured 0.94 px; no alignment: >2.5 px).

    Far from the 0.2 px goal (the xfail below): a 1024 px frame at 1 e/px carries too little
    signal per frame for the frame-vs-sum-of-others correlation (see the benchmark)."""
    truth, res = realistic_movie["truth"], realistic_movie["res"]
    err = mc.trajectory_rms_error(res.shifts_px, truth.shifts_px)
    assert err < 1.5, err
    assert mc.trajectory_rms_error(np.zeros_like(truth.shifts_px), truth.shifts_px) > 2.5


def test_a_patch_model_fitted_to_noise_is_not_applied(realistic_movie):
    """At 2 % std a 1024 px frame's 3x3 patches hold too little signal to measure: the fitted
    model is noise, and applying it would blur the sum; the global sum must be kept."""
    res = realistic_movie["res"]
    out = res.sum_path.with_name("p.mrc")
    patched = mc.run(replace(realistic_movie["params"], patch=PATCH, out_mrc=out))
    assert patched.local_motion is not None  # measured, logged and reported ...
    assert patched.local_motion.rms_residual_px > mc.MAX_FIT_RESIDUAL_PX
    assert not patched.local_applied  # ... but not used
    np.testing.assert_allclose(
        mrcfile.read(patched.sum_path), mrcfile.read(res.sum_path), rtol=1e-5, atol=1e-3
    )


@pytest.mark.xfail(
    strict=True,
    reason="goal of issue 13: 0.2 px at 1-2 % std; per-frame correlation against the sum of "
    "the other frames is noise-limited at this frame size (see the benchmark)",
)
def test_drift_at_realistic_contrast_meets_the_0_2_px_goal(realistic_movie):
    truth, res = realistic_movie["truth"], realistic_movie["res"]
    assert mc.trajectory_rms_error(res.shifts_px, truth.shifts_px) < 0.2


# --------------------------------------------------------------------------- threads


def test_fft_workers_follow_affinity_and_slurm(monkeypatch):
    monkeypatch.setattr(mc.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert mc.fft_workers() == 6  # the affinity mask, not the node's cpu_count
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert mc.fft_workers() == 2  # the job's allocation
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "64")
    assert mc.fft_workers() == 6  # never more than the CPUs we may run on
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "")
    assert mc.fft_workers() == 6


class _SpyFFT:
    """scipy.fft stand-in recording the ``workers`` each transform was asked for."""

    def __init__(self, real) -> None:
        self.real = real
        self.workers: set[object] = set()

    def __getattr__(self, name: str):
        fn = getattr(self.real, name)
        if name not in ("rfft2", "irfft2"):
            return fn

        def wrapped(*args, **kwargs):
            self.workers.add(kwargs.get("workers"))
            return fn(*args, **kwargs)

        return wrapped


def test_run_uses_the_slurm_allocation_for_every_transform(monkeypatch, tmp_path: Path):
    frames = np.random.default_rng(4).poisson(5.0, (6, 96, 96)).astype(np.uint16)
    syn.write_movie_mrc(tmp_path / "m.mrc", frames, 1.0)
    spy = _SpyFFT(mc.sfft)
    monkeypatch.setattr(mc, "sfft", spy)
    monkeypatch.setattr(mc.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    for patch in ((0, 0), (2, 2)):
        mc.run(
            mc.MotionCorParams(
                in_path=tmp_path / "m.mrc", out_mrc=tmp_path / "s.mrc", patch=patch, preview=False
            )
        )
    assert spy.workers == {3}
