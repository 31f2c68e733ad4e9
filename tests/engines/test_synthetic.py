"""The synthetic data generator: its truth must describe exactly what it rendered."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import tifffile

from cryoflow.processing.engines import synthetic as syn
from cryoflow.processing.engines.ctf_model import CTFParams, ctf_2d, spatial_frequency_grid


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_specimen_places_separated_particles_and_decoys_where_truth_says() -> None:
    img, truth = syn.make_specimen(
        (512, 512),
        2.0,
        n_particles=10,
        diameter_A=80.0,
        n_specks=6,
        n_contaminants=1,
        contaminant_diameter_A=200.0,
        rng=_rng(1),
    )
    assert img.dtype == np.float32 and img.shape == (512, 512)
    assert len(truth.particles) == 10 and len(truth.specks) == 6 and len(truth.contaminants) == 1
    pts = np.array([(p.x, p.y) for p in truth.particles])
    d = np.hypot(*(pts[:, None, :] - pts[None, :, :]).transpose(2, 0, 1))
    assert d[np.triu_indices(10, 1)].min() >= 1.5 * 40.0  # diameter 80 A = 40 px
    r_px = 20.0
    assert np.all(pts >= r_px) and np.all(pts <= 512 - r_px)
    # Density peaks where the truth says, and the background is empty.
    centre_vals = [img[round(p.y), round(p.x)] for p in truth.particles]
    assert min(centre_vals) > 0.8
    yy, xx = np.mgrid[0:512, 0:512]
    empty = np.ones(img.shape, bool)
    for obj in truth.particles + truth.specks + truth.contaminants:
        empty &= np.hypot(xx - obj.x, yy - obj.y) > obj.diameter_A / 2.0 / 2.0 + 4
    assert empty.mean() > 0.3 and np.abs(img[empty]).max() < 1e-3
    # Decoys never overlap particles.
    for decoy in truth.specks + truth.contaminants:
        for p in truth.particles:
            gap = np.hypot(decoy.x - p.x, decoy.y - p.y) - (decoy.diameter_A + p.diameter_A) / 4.0
            assert gap > 0
    assert max(img[round(s.y), round(s.x)] for s in truth.specks) > 1.5


def test_specimen_refuses_impossible_crowding() -> None:
    with pytest.raises(ValueError, match="could place only"):
        syn.make_specimen((256, 256), 1.0, n_particles=50, diameter_A=100.0, rng=_rng())


def test_apply_ctf_is_the_ctf_model_filter_and_particles_go_dark_at_underfocus() -> None:
    dens, truth = syn.make_specimen((256, 256), 1.5, n_particles=4, diameter_A=60.0, rng=_rng(2))
    ctf = CTFParams(defocus1_A=20000.0, defocus2_A=18000.0, astig_angle_deg=25.0)
    out = syn.apply_ctf(dens, 1.5, ctf, b_factor=80.0)
    ratio_expected = ctf_2d(dens.shape, 1.5, ctf, rfft=True)
    g, _ = spatial_frequency_grid(dens.shape, 1.5, rfft=True)
    ratio_expected = ratio_expected * np.exp(-80.0 * g * g / 4.0)
    fin, fout = np.fft.rfft2(dens), np.fft.rfft2(out)
    mask = np.abs(fin) > 1e-2 * np.abs(fin).max()
    mask[0, 0] = False
    assert np.allclose((fout[mask] / fin[mask]).real, ratio_expected[mask], atol=1e-3)
    assert abs(out.mean()) < 1e-4
    smooth = syn.apply_ctf(dens, 1.5, CTFParams(defocus1_A=20000.0, defocus2_A=20000.0), 2000.0)
    centres = [smooth[round(p.y), round(p.x)] for p in truth.particles]
    assert max(centres) < 0  # mass is dark at underfocus in CTFFIND's sign convention


def test_default_drift_starts_at_zero_has_the_path_length_and_slows_down() -> None:
    d = syn.default_drift(30, 6.0, _rng(3))
    assert d.shape == (30, 2)
    assert np.allclose(d[0], 0.0)
    steps = np.linalg.norm(np.diff(d, axis=0), axis=1)
    assert steps.sum() == pytest.approx(6.0)
    assert steps[:10].sum() > 2 * steps[-10:].sum()


def test_movie_frames_are_the_image_moved_by_the_true_drift() -> None:
    dens, _ = syn.make_specimen((128, 128), 2.0, n_particles=3, diameter_A=60.0, rng=_rng(4))
    drift = np.array([[0.0, 0.0], [3.0, -2.0], [-4.5, 1.25]])
    frames, truth = syn.make_movie(
        dens, n_frames=3, dose_per_frame=4000.0, drift=drift, rng=_rng(5), dtype=np.uint16
    )
    np.testing.assert_array_equal(truth.shifts_px, drift)
    for i in (1, 2):
        expected = 4000.0 * (1.0 + syn.fourier_shift(dens, drift[i]))
        # Poisson noise at 4000 counts has sigma ~63; the shifted density differs by far more.
        assert np.abs(frames[i] - expected).mean() < 80
        assert (
            np.abs(frames[i] - 4000.0 * (1.0 + dens)).mean()
            > 2 * np.abs(frames[i] - expected).mean()
        )


def test_movie_counts_are_poisson_and_gain_reference_multiplies_them_flat() -> None:
    flat = np.zeros((64, 64), dtype=np.float32)
    gain = syn.make_gain((64, 64), spread=0.2, rng=_rng(6))
    frames, truth = syn.make_movie(
        flat, n_frames=400, dose_per_frame=2.0, drift=np.zeros((400, 2)), gain=gain, rng=_rng(7)
    )
    assert truth.gain_applied and frames.dtype == np.uint8
    raw_mean = frames.mean(axis=0)
    # Pixels with a high gain reference count fewer electrons...
    assert np.corrcoef(raw_mean.ravel(), gain.ravel())[0, 1] < -0.5
    # ...and multiplying by the reference makes the exposure flat at the dose.
    corrected = raw_mean * gain
    assert corrected.mean() == pytest.approx(2.0, rel=0.02)
    assert np.corrcoef(corrected.ravel(), gain.ravel())[0, 1] == pytest.approx(0.0, abs=0.1)
    raw0 = frames[:, gain.shape[0] // 2, :].astype(float)  # a row: var/mean of Poisson is 1
    assert raw0.var(axis=0).mean() / raw0.mean(axis=0).mean() == pytest.approx(1.0, abs=0.15)


def test_movie_rejects_mismatched_gain_and_drift() -> None:
    img = np.zeros((32, 32), dtype=np.float32)
    with pytest.raises(ValueError, match="gain shape"):
        syn.make_movie(img, n_frames=2, dose_per_frame=1.0, gain=np.ones((16, 16)))
    with pytest.raises(ValueError, match=r"drift must have shape \(3, 2\)"):
        syn.make_movie(img, n_frames=3, dose_per_frame=1.0, drift=np.zeros((2, 2)))


def test_writers_round_trip_and_leave_no_temp_files(tmp_path) -> None:
    frames = np.random.default_rng(8).poisson(1.0, (4, 32, 48)).astype(np.uint8)
    syn.write_movie_tiff(tmp_path / "m.tiff", frames)
    syn.write_movie_mrc(tmp_path / "m.mrc", frames, 0.83)
    syn.write_gain_mrc(tmp_path / "g.mrc", np.full((32, 48), 1.5, np.float32))
    truth = syn.MovieTruth(4, (32, 48), 1.0, np.zeros((4, 2)), False)
    syn.write_truth_json(tmp_path / "t.json", truth)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "m.tiff"), frames)
    with mrcfile.open(tmp_path / "m.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, frames)
        assert float(mrc.voxel_size.x) == pytest.approx(0.83)
    assert mrcfile.read(tmp_path / "g.mrc").dtype == np.float32
    assert json.loads((tmp_path / "t.json").read_text())["shifts_px"] == [[0.0, 0.0]] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.mrc", "m.mrc", "m.tiff", "t.json"]
    with pytest.raises(ValueError, match="integer counts"):
        syn.write_movie_tiff(tmp_path / "bad.tiff", frames.astype(np.float32))
    assert not list(tmp_path.glob("*bad*")) and not list(tmp_path.glob(".*"))


def test_cli_writes_movie_gain_and_truth(tmp_path, capsys) -> None:
    out = tmp_path / "movie.tif"
    rc = syn.main(
        [str(out), "--size", "192", "128", "--frames", "5", "--particles", "2", "--diameter",
         "60", "--drift", "3", "--gain", str(tmp_path / "gain.mrc"), "--seed", "1"]
    )  # fmt: skip
    assert rc == 0
    frames = tifffile.imread(out)
    assert frames.shape == (5, 128, 192) and frames.dtype == np.uint8
    truth = json.loads((tmp_path / "movie.tif.truth.json").read_text())
    assert len(truth["shifts_px"]) == 5 and truth["gain_applied"] is True
    assert len(truth["specimen"]["particles"]) == 2 and truth["ctf"]["kv"] == 300.0
    assert mrcfile.read(tmp_path / "gain.mrc").shape == (128, 192)
    assert syn.main([str(tmp_path / "movie.png")]) == 2
    assert "unsupported movie extension" in capsys.readouterr().err


# --------------------------------------------------------------------------- distractors

CTF = CTFParams(defocus1_A=15_150.0, defocus2_A=14_850.0, astig_angle_deg=30.0)
APIX, DIAM_A = 1.5, 180.0
R_PX = DIAM_A / APIX / 2.0


def _dirty(distractors: syn.Distractors, seed: int = 3, n: int = 30, size: int = 1536, **kw):
    return syn.make_micrograph(
        (size, size),
        APIX,
        CTF,
        dose_total=50 * APIX**2,
        contrast=0.1,
        rng=_rng(seed),
        diameter_A=DIAM_A,
        n_particles=n,
        distractors=distractors,
        **kw,
    )


def _xy(objs: list[syn.Particle]) -> np.ndarray:
    return np.array([[o.x, o.y] for o in objs]).reshape(-1, 2)


def test_without_distractors_the_images_are_those_of_before() -> None:
    # Other tests and the simulator rely on a seed giving the same micrograph as before.
    kw = {"n_particles": 10, "diameter_A": 150.0, "n_specks": 5, "n_contaminants": 1}
    a, ta = syn.make_micrograph((1024, 1024), 1.5, CTF, rng=_rng(4), **kw)
    b, tb = syn.make_micrograph((1024, 1024), 1.5, CTF, rng=_rng(4), distractors=None, **kw)
    assert np.array_equal(a, b) and ta == tb
    assert not (ta.excluded or ta.aggregates or ta.ethane or ta.junk) and ta.carbon is None
    # Pinned from the generator before distractors existed: a change in the draws shows here.
    assert float(a[100:110, 200:210].sum()) == 4126.0


def test_carbon_is_dark_and_only_particles_in_the_ice_count() -> None:
    img, truth = _dirty(syn.Distractors(carbon=True, carbon_particles=6, carbon_darkening=0.15))
    edge = truth.carbon
    assert edge is not None and len(truth.excluded) == 6
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    d = edge.distance(xx, yy)
    assert 0.1 < (d > 0).mean() < 0.5  # the arc crosses the image
    ratio = img[d > 50].mean() / img[d < -50].mean()
    assert ratio == pytest.approx(0.85, abs=0.02)
    p, e = _xy(truth.particles), _xy(truth.excluded)
    assert np.all(edge.distance(p[:, 0], p[:, 1]) < -(R_PX + 0.5 * 2 * R_PX))  # clearance
    assert np.all(edge.distance(e[:, 0], e[:, 1]) > R_PX)  # wholly on the carbon


def test_ethane_aggregates_and_junk_are_recorded_where_they_are_drawn() -> None:
    dis = syn.Distractors(n_ethane=2, n_aggregates=2, n_junk=20, ethane_darkening=0.5)
    img, truth = _dirty(dis, n=20, size=2048)
    assert len(truth.ethane) == 2 and len(truth.aggregates) == 2 and len(truth.junk) == 20
    mean = img.mean()
    for e in truth.ethane:
        assert 2.5 * DIAM_A <= e.diameter_A <= 5.0 * DIAM_A
        core = img[round(e.y) - 5 : round(e.y) + 5, round(e.x) - 5 : round(e.x) + 5].mean()
        assert core / mean < 0.6  # 50 % darker at the centre, less the mean's own dip
    members = _xy(truth.excluded)
    assert 8 <= len(members) <= 16  # 4-8 each
    d = np.hypot(*(members[:, None] - members[None]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert np.all(d.min(axis=1) <= 0.95 * 2 * R_PX)  # each member touches another one
    assert d.min() >= 0.7 * 2 * R_PX
    p = _xy(truth.particles)
    for a in truth.aggregates + truth.ethane:
        gap = np.hypot(p[:, 0] - a.x, p[:, 1] - a.y) - a.diameter_A / APIX / 2 - R_PX
        assert gap.min() >= 0.5 * 2 * R_PX - 1e-6  # clearance
    for j in truth.junk:
        assert 0.2 * DIAM_A <= j.diameter_A <= 0.45 * DIAM_A


def test_gradient_and_ice_change_the_background_only() -> None:
    clean, _ = _dirty(syn.Distractors(), n=10)
    ramp, _ = _dirty(syn.Distractors(gradient=0.3), n=10)
    ice, _ = _dirty(syn.Distractors(ice=0.5), n=10)
    # A 30 % ramp end to end: the block means span about that (less near the corners' mix).
    blocks = ramp.reshape(8, 192, 8, 192).mean(axis=(1, 3))
    assert 0.15 < (blocks.max() - blocks.min()) / ramp.mean() < 0.45
    assert clean.reshape(8, 192, 8, 192).mean(axis=(1, 3)).std() / clean.mean() < 0.01
    # Random ice under the CTF: more power at mid frequencies than shot noise alone.
    assert ice.std() > 1.05 * clean.std()


def test_particle_contrast_is_the_darkening_over_the_image_std() -> None:
    img, truth = _dirty(syn.Distractors(), n=20)
    c = syn.particle_contrast(img, truth)
    img2, truth2 = _dirty(syn.Distractors(), n=20, seed=3)
    assert c == syn.particle_contrast(img2, truth2)
    low, tl = syn.make_micrograph(
        (1536, 1536),
        APIX,
        CTF,
        dose_total=50 * APIX**2,
        contrast=0.05,
        rng=_rng(3),
        diameter_A=DIAM_A,
        n_particles=20,
    )
    assert 0.05 < c < 0.1 and syn.particle_contrast(low, tl) == pytest.approx(c / 2, rel=0.35)


def test_distractors_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="counts must be >= 0"):
        syn.Distractors(n_junk=-1)
    with pytest.raises(ValueError, match="aggregate_members"):
        syn.Distractors(aggregate_members=(1, 3))


def test_cli_adds_distractors_in_frame_coordinates(tmp_path, capsys) -> None:
    out = tmp_path / "movie.mrc"
    argv = [str(out), "--size", "768", "768", "--frames", "2", "--particles", "3", "--diameter",
            "60", "--distractors", "carbon,ethane,junk", "--seed", "2"]  # fmt: skip
    assert syn.main(argv) == 0
    spec = json.loads((tmp_path / "movie.mrc.truth.json").read_text())["specimen"]
    assert spec["carbon"] is not None and len(spec["ethane"]) == 1 and len(spec["junk"]) >= 1
    assert len(spec["excluded"]) == 1  # one particle on the carbon (20 per 4096^2, at least 1)
    for obj in spec["particles"] + spec["junk"]:
        assert 0 <= obj["x"] < 768 and 0 <= obj["y"] < 768
    assert syn.main([*argv[:-4], "--distractors", "snow"]) == 2
    assert "unknown distractor kinds ['snow']" in capsys.readouterr().err
