"""The built-in motion-correction engine against movies whose true drift is known.

Reference-frame convention: the engine reports each frame's shift relative to its reference
frame (-FmRef, default the central frame); the generator's truth is relative to frame 0. Only
relative motion is measurable, so errors are compared after removing the constant offset
(:func:`trajectory_rms_error`).

Test specimen: 1024 px at 2 A/px, 40 particles of 150 A, one contaminant, fractional contrast
2.0 (image std ~10 %), 1 e/px/frame. That contrast is higher than a typical single particle
micrograph: a 1024 px frame has 1/23 of a K3 frame's pixels, and at realistic contrast its
per-frame correlation is too noisy for 0.2 px (see benchmarks/bench_engines_motioncor.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryoflow.processing.engines import motioncor as mc
from cryoflow.processing.engines import synthetic as syn
from cryoflow.processing.engines.ctf_model import CTFParams
from cryoflow.processing.engines.imageio import write_mrc
from cryoflow.processing.tools.motioncor2 import find_shift_log, parse_shift_log

MAX_RMS_PX = 0.2
SIZE = 1024
N_FRAMES = 24
PIXEL_A = 2.0


def assert_drift_recovered(estimated: np.ndarray, true: np.ndarray) -> None:
    """The acceptance check: RMS error over frames below 0.2 px (offset removed)."""
    rms = mc.trajectory_rms_error(estimated, true)
    assert rms < MAX_RMS_PX, f"drift RMS error {rms:.3f} px >= {MAX_RMS_PX} px"


@pytest.fixture(scope="module")
def movie(tmp_path_factory) -> dict:
    """A gain-modulated counting TIFF movie with known drift (made once for the module)."""
    root = tmp_path_factory.mktemp("movie")
    rng = np.random.default_rng(20261124)
    pad = 24
    dens, _ = syn.make_specimen(
        (SIZE + 2 * pad, SIZE + 2 * pad),
        PIXEL_A,
        n_particles=40,
        diameter_A=150.0,
        n_contaminants=1,
        rng=rng,
    )
    img = 2.0 * syn.apply_ctf(dens, PIXEL_A, CTFParams(15000.0, 14500.0, 30.0))
    gain = syn.make_gain((SIZE, SIZE), spread=0.1, rng=rng)
    drift = syn.default_drift(N_FRAMES, 8.0, rng)
    frames, truth = syn.make_movie(
        img,
        n_frames=N_FRAMES,
        dose_per_frame=1.0,
        drift=drift,
        gain=gain,
        rng=rng,
        out_shape=(SIZE, SIZE),
    )
    syn.write_movie_tiff(root / "FoilHole_1_Data_2_fractions.tiff", frames)
    syn.write_gain_mrc(root / "gain.mrc", gain)
    ref = N_FRAMES // 2
    still = syn.fourier_shift(img, drift[ref])[pad:-pad, pad:-pad]  # specimen as frame `ref`
    return {"root": root, "truth": truth, "frames": frames, "gain": gain, "still": still}


def _outputs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.rglob("*") if p.is_file())


def test_cli_recovers_the_true_drift_and_writes_motioncor2_outputs(movie, tmp_path, capsys):
    root = movie["root"]
    out = tmp_path / "aligned" / "mic.mrc"
    rc = mc.main(
        ["-InTiff", str(root / "FoilHole_1_Data_2_fractions.tiff"), "-OutMrc", str(out),
         "-Gain", str(root / "gain.mrc"), "-PixSize", str(PIXEL_A), "-FmDose", "0.25",
         "-kV", "300", "-Iter", "7", "-Tol", "0.5", "-Bft", "500", "150",
         "-LogDir", str(tmp_path / "logs"), "-Gpu", "0", "-Serial", "0"]
    )  # fmt: skip
    assert rc == 0
    # The log is named after the INPUT movie, as MotionCor2 names it, and parses with the tool's
    # parser; its shifts are the engine's estimate.
    log = parse_shift_log(find_shift_log(tmp_path / "logs", "FoilHole_1_Data_2_fractions.tiff"))
    assert log.path.name == "FoilHole_1_Data_2_fractions-Full.log"
    assert log.frames == list(range(1, N_FRAMES + 1))
    est = np.array(log.shifts_px)
    assert_drift_recovered(est, movie["truth"].shifts_px)
    assert np.allclose(est[N_FRAMES // 2], 0.0)  # reference: the central frame
    assert log.total_drift() == pytest.approx(8.0, abs=1.0)
    # stdout carries MotionCor2's markers too.
    assert "Full-frame alignment shift" in capsys.readouterr().out
    with mrcfile.open(out) as mrc:
        assert mrc.data.shape == (SIZE, SIZE) and mrc.data.dtype == np.float32
        assert float(mrc.voxel_size.x) == pytest.approx(PIXEL_A)
        total = mrc.data.copy()
    # The sum preserves the exposure: mean counts per pixel = frames x dose (gain-corrected).
    raw_mean = (movie["frames"].astype(np.float64) * movie["gain"]).sum(axis=0).mean()
    assert total.mean() == pytest.approx(raw_mean, rel=1e-3)
    with mrcfile.open(out.with_name("mic_DW.mrc")) as mrc:
        dw = mrc.data.copy()
    assert dw.shape == total.shape and dw.mean() == pytest.approx(total.mean(), rel=1e-3)
    preview = out.with_name("mic_preview.png")
    assert preview.stat().st_size > 10_000
    assert not [n for n in _outputs(tmp_path) if n.startswith(".") or n.endswith(".part")]


def _band_correlation(a: np.ndarray, b: np.ndarray, lo: float, hi: float) -> float:
    f = np.hypot(
        *np.meshgrid(np.fft.fftfreq(a.shape[0]), np.fft.rfftfreq(a.shape[1]), indexing="ij")
    )
    band = (f > lo) & (f < hi)
    fa, fb = np.fft.rfft2(a)[band], np.fft.rfft2(b)[band]
    return float(
        (fa * np.conj(fb)).real.sum() / np.sqrt((abs(fa) ** 2).sum() * (abs(fb) ** 2).sum())
    )


def test_aligned_sum_matches_the_still_specimen_better_than_the_plain_sum(movie, tmp_path):
    root = movie["root"]
    res = mc.run(
        mc.MotionCorParams(
            in_path=root / "FoilHole_1_Data_2_fractions.tiff",
            out_mrc=tmp_path / "a.mrc",
            gain=root / "gain.mrc",
            preview=False,
        )
    )
    aligned = mrcfile.read(res.sum_path).astype(np.float64)
    corrected = movie["frames"].astype(np.float32) * movie["gain"]
    plain = corrected.sum(axis=0)
    true = movie["truth"].shifts_px - movie["truth"].shifts_px[N_FRAMES // 2]
    ideal = sum(syn.fourier_shift(f, -s) for f, s in zip(corrected, true, strict=True))
    c = {
        name: _band_correlation(img, movie["still"], 0.05, 0.2)
        for name, img in (("aligned", aligned), ("plain", plain), ("ideal", ideal))
    }
    assert c["aligned"] > 0.97 * c["ideal"], c  # as good as knowing the true drift
    assert c["plain"] < 0.9 * c["ideal"], c  # and the drift did blur the plain sum


def test_dose_weighting_follows_the_critical_exposure_curve(tmp_path):
    # Noise-free frames: a common coarse pattern (so alignment finds no motion) plus a fine
    # sinusoid that only the first or only the last frame carries.
    n, size, pixel, dose = 10, 128, 1.0, 3.0
    yy, xx = np.mgrid[0:size, 0:size]
    coarse = 100.0 + 20.0 * np.sin(2 * np.pi * xx / 64.0) * np.cos(2 * np.pi * yy / 32.0)
    fine = np.cos(2 * np.pi * xx * 32 / size)  # 0.25 cycles/px = 1/4 A^-1
    frames = np.repeat(coarse[None], n, axis=0).astype(np.float32)
    frames[0] += fine
    frames[-1] += 2 * fine
    syn.write_movie_mrc(tmp_path / "m.mrc", frames, pixel)
    res = mc.run(
        mc.MotionCorParams(
            in_path=tmp_path / "m.mrc",
            out_mrc=tmp_path / "s.mrc",
            pixel_size_A=pixel,
            fm_dose=dose,
            preview=False,
        )
    )
    assert np.abs(res.shifts_px).max() < 0.05
    plain, dw = mrcfile.read(res.sum_path), mrcfile.read(res.dw_path)
    amp = lambda img: abs(np.fft.rfft2(img)[0, 32])  # noqa: E731
    ne = float(mc.critical_exposure(np.array([0.25]), 300.0)[0])
    w = np.exp(-dose * np.arange(1, n + 1) / (2 * ne))  # exposure at the end of each frame
    expected = (w[0] + 2 * w[-1]) * np.sqrt(n / (w**2).sum()) / 3.0
    assert amp(dw) / amp(plain) == pytest.approx(expected, rel=0.02)
    assert amp(dw) / amp(plain) < 0.9  # the late, damaged frame counts less


@pytest.mark.parametrize(
    "broken",
    [
        lambda t, r: np.zeros_like(t),  # no alignment at all
        lambda t, r: t + r.normal(0.0, 0.35, t.shape),  # right on average, too noisy
        lambda t, r: -t,  # sign flipped
        lambda t, r: 0.8 * t,  # drift under-estimated by 20 %
    ],
)
def test_the_acceptance_check_rejects_broken_estimates(movie, broken):
    true = movie["truth"].shifts_px
    with pytest.raises(AssertionError, match="drift RMS error"):
        assert_drift_recovered(broken(true, np.random.default_rng(1)), true)
    assert_drift_recovered(true + np.array([3.0, -2.0]), true)  # a constant offset is fine


def test_ftbin_halves_the_sum_and_keeps_shifts_in_input_pixels(movie, tmp_path):
    root = movie["root"]
    res = mc.run(
        mc.MotionCorParams(
            in_path=root / "FoilHole_1_Data_2_fractions.tiff",
            out_mrc=tmp_path / "b.mrc",
            gain=root / "gain.mrc",
            pixel_size_A=PIXEL_A,
            ft_bin=2.0,
            preview=False,
        )
    )
    with mrcfile.open(res.sum_path) as mrc:
        assert mrc.data.shape == (SIZE // 2, SIZE // 2)
        assert float(mrc.voxel_size.x) == pytest.approx(2 * PIXEL_A)
    assert_drift_recovered(res.shifts_px, movie["truth"].shifts_px)


def test_transform_gain_matches_motioncor2_rotation_and_flip_conventions():
    g = np.arange(6, dtype=np.float32).reshape(2, 3)  # rows are y, shown top-down
    np.testing.assert_array_equal(mc.transform_gain(g, 0, 0), g)
    # -RotGain 1: 90 deg counter-clockwise with y up = clockwise as an array shown top-down.
    np.testing.assert_array_equal(mc.transform_gain(g, 1, 0), [[3, 0], [4, 1], [5, 2]])
    np.testing.assert_array_equal(mc.transform_gain(g, 2, 0), g[::-1, ::-1])
    np.testing.assert_array_equal(mc.transform_gain(g, 3, 0), [[2, 5], [1, 4], [0, 3]])
    np.testing.assert_array_equal(mc.transform_gain(g, 0, 1), g[::-1])  # upside down
    np.testing.assert_array_equal(mc.transform_gain(g, 0, 2), g[:, ::-1])  # left-right
    # Flip comes after rotation.
    np.testing.assert_array_equal(mc.transform_gain(g, 1, 1), [[5, 2], [4, 1], [3, 0]])


@pytest.mark.parametrize(("rot", "flip"), [(1, 2), (3, 1)])
def test_rotated_and_flipped_gain_files_flat_field_the_movie(tmp_path, rot, flip):
    rng = np.random.default_rng(rot * 10 + flip)
    gain = syn.make_gain((128, 128), spread=0.3, rng=rng)
    frames, _ = syn.make_movie(
        np.zeros((128, 128), np.float32),
        n_frames=4,
        dose_per_frame=50.0,
        drift=np.zeros((4, 2)),
        gain=gain,
        rng=rng,
    )
    syn.write_movie_mrc(tmp_path / "flat.mrcs", frames, 1.0)
    # Store the reference as a camera software might: so that -RotGain/-FlipGain undo it.
    stored = gain[::-1] if flip == 1 else gain[:, ::-1]
    stored = np.rot90(stored, rot)
    syn.write_gain_mrc(tmp_path / "gain.mrc", stored)

    def corrected_std(r: int, f: int) -> float:
        out = tmp_path / f"s{r}{f}.mrc"
        args = ["-InMrc", str(tmp_path / "flat.mrcs"), "-OutMrc", str(out), "-Gain",
                str(tmp_path / "gain.mrc"), "-RotGain", str(r), "-FlipGain", str(f)]  # fmt: skip
        assert mc.main(args) == 0
        img = mrcfile.read(out)
        return float(img.std() / img.mean())

    right = corrected_std(rot, flip)
    assert right < 0.08  # Poisson only: 1/sqrt(4 frames x 50 counts) = 0.071
    assert corrected_std(0, 0) > 2.5 * right  # the 30 % gain pattern shows through


def test_patch_alignment_logs_in_motioncor2_layout(movie, tmp_path):
    root = movie["root"]
    res = mc.run(
        mc.MotionCorParams(
            in_path=root / "FoilHole_1_Data_2_fractions.tiff",
            out_mrc=tmp_path / "p.mrc",
            gain=root / "gain.mrc",
            patch=(2, 2),
            log_dir=tmp_path / "logs",
            preview=False,
        )
    )
    names = sorted(p.name for p in res.log_paths)
    assert names == [
        "FoilHole_1_Data_2_fractions-Patch-Frame.log",
        "FoilHole_1_Data_2_fractions-Patch-Full.log",
        "FoilHole_1_Data_2_fractions-Patch-Patch.log",
    ]
    log = parse_shift_log(find_shift_log(tmp_path / "logs", "FoilHole_1_Data_2_fractions"))
    assert log.patch and sorted(log.patch_shifts) == [1, 2, 3, 4]
    assert_drift_recovered(np.array(log.shifts_px), movie["truth"].shifts_px)
    # The motion is global only, so what is left per patch after global correction is small.
    residual = np.array([[r[3], r[4]] for rows in log.patch_shifts.values() for r in rows])
    assert np.sqrt((residual**2).sum(axis=1).mean()) < 0.5


# --------------------------------------------------------------------------- bad input


def _run_expect_error(tmp_path: Path, args: list[str], capsys, needle: str) -> None:
    before = _outputs(tmp_path)
    assert mc.main(args) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert _outputs(tmp_path) == before  # nothing written, not even a temp file


def test_refuses_a_file_that_is_not_what_its_name_says(tmp_path, capsys):
    fake = tmp_path / "movie.tif"
    fake.write_text("not a tiff\n")
    _run_expect_error(
        tmp_path, ["-InTiff", str(fake), "-OutMrc", str(tmp_path / "o.mrc")], capsys,
        f"{fake}: named as TIFF but does not start with a TIFF header",
    )  # fmt: skip
    png = tmp_path / "movie.png"
    png.write_bytes(b"\x89PNG....")
    _run_expect_error(
        tmp_path, ["-InTiff", str(png), "-OutMrc", str(tmp_path / "o.mrc")], capsys,
        "expected a .tif/.tiff file",
    )  # fmt: skip


def test_refuses_a_truncated_mrc_movie(tmp_path, capsys):
    frames = np.random.default_rng(2).poisson(1.0, (6, 64, 64)).astype(np.uint16)
    syn.write_movie_mrc(tmp_path / "full.mrc", frames, 1.0)
    data = (tmp_path / "full.mrc").read_bytes()
    (tmp_path / "cut.mrc").write_bytes(data[: len(data) - 3000])
    _run_expect_error(
        tmp_path, ["-InMrc", str(tmp_path / "cut.mrc"), "-OutMrc", str(tmp_path / "o.mrc")],
        capsys, "truncated MRC file",
    )  # fmt: skip


def test_refuses_a_gain_of_the_wrong_size(movie, tmp_path, capsys):
    syn.write_gain_mrc(tmp_path / "small_gain.mrc", np.ones((512, 1024), np.float32))
    _run_expect_error(
        tmp_path,
        ["-InTiff", str(movie["root"] / "FoilHole_1_Data_2_fractions.tiff"), "-OutMrc",
         str(tmp_path / "o.mrc"), "-Gain", str(tmp_path / "small_gain.mrc")],
        capsys, "size 1024x512 (after -RotGain 0 -FlipGain 0) does not match the movie frames",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["-FtBin", "0.5"], "-FtBin must be >= 1"),
        (["-RotGain", "4"], "-RotGain must be 0, 1, 2 or 3"),
        (["-FlipGain", "3"], "-FlipGain must be 0, 1 or 2"),
        (["-FmDose", "1.0"], "-FmDose needs -PixSize"),
        (["-FmDose", "1.0", "-PixSize", "1", "-kV", "120"], "200-300 kV"),
        (["-Iter", "0"], "-Iter must be >= 1"),
        (["-Serial", "1"], "-Serial 1 (batch mode) is not supported"),
        (["-Throw", "20", "-Trunc", "10"], "leave fewer than 2 to align"),
    ],
)
def test_refuses_impossible_parameters(tmp_path, capsys, extra, needle):
    frames = np.random.default_rng(3).poisson(1.0, (24, 64, 64)).astype(np.uint16)
    syn.write_movie_mrc(tmp_path / "m.mrc", frames, 1.0)
    _run_expect_error(
        tmp_path, ["-InMrc", str(tmp_path / "m.mrc"), "-OutMrc", str(tmp_path / "o.mrc"), *extra],
        capsys, needle,
    )  # fmt: skip


def test_refuses_eer_with_a_pointer_to_the_real_tool(tmp_path, capsys):
    eer = tmp_path / "movie.eer"
    eer.write_bytes(b"II*\x00" + os.urandom(64))
    _run_expect_error(
        tmp_path, ["-InEer", str(eer), "-OutMrc", str(tmp_path / "o.mrc")], capsys,
        "give -FmIntFile",
    )  # fmt: skip


def test_a_failed_write_leaves_nothing_under_the_final_name(tmp_path):
    # mrcfile refuses complex128 data half-way through writing: no file may appear.
    with pytest.raises(ValueError):
        write_mrc(tmp_path / "bad.mrc", np.zeros((8, 8), np.complex128))
    assert _outputs(tmp_path) == []
    write_mrc(tmp_path / "good.mrc", np.ones((8, 8), np.float32), 1.5)
    assert _outputs(tmp_path) == ["good.mrc"]
    assert oct((tmp_path / "good.mrc").stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's


def test_lzw_compressed_tiff_as_k3_writes_it_gives_the_same_alignment(movie, tmp_path):
    """EPU and SerialEM write K3 movies as LZW-compressed TIFF; they must read like plain ones."""
    import tifffile

    lzw = tmp_path / "K3_lzw_fractions.tiff"
    tifffile.imwrite(lzw, movie["frames"], compression="lzw")
    assert tifffile.TiffFile(lzw).pages[0].compression == tifffile.COMPRESSION.LZW
    shifts = {}
    for name, path in (("plain", movie["root"] / "FoilHole_1_Data_2_fractions.tiff"), ("lzw", lzw)):
        rc = mc.main(
            ["-InTiff", str(path), "-OutMrc", str(tmp_path / name / "mic.mrc"),
             "-Gain", str(movie["root"] / "gain.mrc"), "-PixSize", str(PIXEL_A),
             "-Iter", "7", "-Tol", "0.5", "-Bft", "500", "150", "-LogDir", str(tmp_path / name)]
        )  # fmt: skip
        assert rc == 0
        shifts[name] = parse_shift_log(find_shift_log(tmp_path / name, path.name)).shifts_px
    assert shifts["lzw"] == shifts["plain"]


def test_noise_limited_trajectories_are_smoothed_as_strongly_as_their_noise_needs():
    """At 1 e/px/frame and 1 % image std a frame's own peak is off by ~1 px: MotionCor2's fixed
    passes leave ~0.6 px. The cross-validated fit must do clearly better there (over several
    trajectories: its strength is itself an estimate)."""
    passes = lambda s: mc.smooth_trajectory(mc.smooth_trajectory(s, 0.5), 0.4)  # noqa: E731
    err_passes, err_global = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        truth = syn.default_drift(40, 15.0, rng)
        noisy = truth + rng.normal(0.0, 0.7, truth.shape)
        err_passes.append(mc.trajectory_rms_error(passes(noisy), truth))
        err_global.append(mc.trajectory_rms_error(mc.smooth_global_trajectory(noisy), truth))
    assert np.mean(err_global) < 0.87 * np.mean(err_passes), (err_global, err_passes)
    # Straight-line drift passes the third-difference penalty untouched, however strong.
    line = np.outer(np.arange(40.0), [0.3, -0.2])
    smoothed, _ = mc.smooth_trajectory_adaptive(
        line + np.random.default_rng(0).normal(0, 1e-9, line.shape)
    )
    np.testing.assert_allclose(smoothed, line, atol=1e-6)
