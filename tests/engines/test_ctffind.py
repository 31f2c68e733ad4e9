"""The CTFFIND stand-in: known CTFs come back out of noisy micrographs, via CTFFIND's stdin/files.

Truth is rendered with ctf_model (via synthetic.apply_ctf) and counted at a realistic dose; the
engine is driven exactly as the pipeline drives CTFFIND (answers from tools.ctffind.stdin_answers)
and its files are read back with the pipeline's parsers.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryoflow.processing.engines import ctffind as engine
from cryoflow.processing.engines import synthetic as syn
from cryoflow.processing.engines.ctf_model import CTFParams, electron_wavelength_A
from cryoflow.processing.engines.imageio import write_mrc
from cryoflow.processing.tools.ctffind import (
    CtffindParams,
    output_paths,
    parse_avrot,
    parse_ctffind_txt,
    stdin_answers,
)

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


def micrograph(
    shape: tuple[int, int],
    truth: CTFParams,
    seed: int,
    *,
    pixel_A: float = 1.0,
    frames: int = 40,
    dose_per_frame: float = 1.0,
    contrast: float = 0.1,
) -> np.ndarray:
    """A summed counting micrograph of amorphous ice (white density) seen through ``truth``.

    Counts are Poisson at ``frames * dose_per_frame`` e/px: a sum of independent Poisson frames
    is exactly that, so one draw stands for the 40-frame sum.
    """
    rng = np.random.default_rng(seed)
    density = rng.standard_normal(shape).astype(np.float32)
    contrast_img = contrast * syn.apply_ctf(density, pixel_A, truth, b_factor=50.0)
    lam = np.clip(1.0 + contrast_img, 0.0, None) * frames * dose_per_frame
    return rng.poisson(lam).astype(np.float32)


def ctf_errors(
    df1: float,
    df2: float,
    angle_deg: float,
    truth: CTFParams,
    *,
    rel: float = 0.005,
    angle_tol_deg: float = 3.0,
    angle_from_astig_A: float = 500.0,
) -> list[str]:
    """Why an estimate misses ``truth`` (empty if it does not): defocus 1 and 2 within ``rel``,
    and the angle within ``angle_tol_deg`` when the true astigmatism is >= ``angle_from_astig_A``.

    Compared after putting both in CTFFIND's convention (df1 >= df2, angle modulo 180).
    """

    def canon(d1: float, d2: float, a: float) -> tuple[float, float, float]:
        return (d1, d2, a) if d1 >= d2 else (d2, d1, a + 90.0)

    e1, e2, ea = canon(df1, df2, angle_deg)
    t1, t2, ta = canon(truth.defocus1_A, truth.defocus2_A, truth.astig_angle_deg)
    problems = []
    for name, est, true in (("defocus 1", e1, t1), ("defocus 2", e2, t2)):
        if abs(est - true) > rel * true:
            problems.append(f"{name} {est:.0f} vs {true:.0f} A ({100 * (est / true - 1):+.2f}%)")
    if t1 - t2 >= angle_from_astig_A:
        diff = (ea - ta + 90.0) % 180.0 - 90.0
        if abs(diff) > angle_tol_deg:
            problems.append(f"angle {ea:.1f} vs {ta:.1f} deg ({diff:+.1f})")
    return problems


# For the 1024 px plumbing tests: a quarter of the data, so about twice the scatter.
LOOSE = {"rel": 0.01, "angle_tol_deg": 10.0}


def run_engine(
    stdin_text: str, *args: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    rc = engine.main(list(args), stdin=io.StringIO(stdin_text))
    out = capsys.readouterr()
    return rc, out.out, out.err


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- the tolerance check


def test_tolerance_check_accepts_the_truth_and_equivalent_conventions() -> None:
    truth = CTFParams(18000.0, 17200.0, 40.0)
    assert ctf_errors(18000.0, 17200.0, 40.0, truth) == []
    assert ctf_errors(17200.0, 18000.0, -50.0, truth) == []  # axes swapped: angle + 90
    assert ctf_errors(18000.0, 17200.0, 220.0, truth) == []  # angle modulo 180
    edge = CTFParams(18000.0, 17200.0, 89.0)
    assert ctf_errors(18000.0, 17200.0, -89.5, edge) == []  # wraps across +/-90


def test_tolerance_check_rejects_deliberately_broken_estimates() -> None:
    truth = CTFParams(18000.0, 17200.0, 40.0)
    assert ctf_errors(18000.0 * 1.01, 17200.0, 40.0, truth)  # defocus 1 off by 1 %
    assert ctf_errors(18000.0, 17200.0 * 0.99, 40.0, truth)  # defocus 2 off by 1 %
    assert ctf_errors(18000.0, 17200.0, 45.0, truth)  # angle off by 5 degrees
    assert ctf_errors(17200.0, 18000.0, 40.0, truth)  # axes swapped without the angle
    # Below 500 A of astigmatism the angle is not judged (it is barely defined there).
    assert ctf_errors(18000.0, 17700.0, 85.0, CTFParams(18000.0, 17700.0, 40.0)) == []


# --------------------------------------------------------------------------- acceptance

# Truths drawn once from a seeded generator within the acceptance ranges (not hand-picked):
# defocus 10 000-25 000 A, astigmatism 500-1500 A, any angle.
_draw = np.random.default_rng(2026)
TRUTHS = []
for _ in range(3):
    _mean, _astig, _ang = (
        _draw.uniform(10000, 25000),
        _draw.uniform(500, 1500),
        _draw.uniform(-90, 90),
    )
    TRUTHS.append(CTFParams(_mean + _astig / 2, _mean - _astig / 2, _ang))


@pytest.mark.parametrize(("case", "version"), [(0, "4"), (1, "4.1.15"), (2, "5")])
def test_recovers_known_ctf_from_a_realistic_micrograph_through_ctffind_io(
    tmp_path: Path, case: int, version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    truth = TRUTHS[case]
    mic = tmp_path / "mic.mrc"
    write_mrc(mic, micrograph((2048, 2048), truth, seed=10 + case), 1.0)
    params = CtffindParams(
        input_path=mic, diag_path=tmp_path / "mic_ctf.mrc", pixel_size_A=1.0, max_res_A=3.5
    )
    rc, out, err = run_engine(stdin_answers(params, version), capsys=capsys)
    assert rc == 0, err
    paths = output_paths(params.diag_path)
    assert f"Summary of results                          : {paths.txt}" in out
    result = parse_ctffind_txt(paths.txt)
    assert result.version == f"{engine.CTFFIND_VERSIONS[version]}-cryoflow"
    est = result.single
    assert ctf_errors(est.defocus_1_A, est.defocus_2_A, est.astigmatism_angle_deg, truth) == []
    assert (est.thickness_A is not None) == (version == "5")  # CTFFIND 5 writes 10 columns
    # Rings are there up to ~3 A in these images: the fit resolution must say so, finitely.
    assert 2.8 <= est.fit_resolution_A <= 6.0
    assert 0.05 < est.cross_correlation < 1.0


def test_a_broken_estimate_of_a_real_fit_fails_the_same_check(tmp_path: Path) -> None:
    truth = TRUTHS[0]
    spectrum = engine.compute_spectrum([micrograph((2048, 2048), truth, seed=10)], 1.0, 512)
    fit = engine.fit_ctf(spectrum, engine.FitOptions(max_res_A=3.5))
    assert ctf_errors(fit.defocus1_A, fit.defocus2_A, fit.astig_angle_deg, truth) == []
    assert ctf_errors(fit.defocus1_A * 1.01, fit.defocus2_A, fit.astig_angle_deg, truth)
    assert ctf_errors(fit.defocus1_A, fit.defocus2_A * 1.01, fit.astig_angle_deg, truth)
    assert ctf_errors(fit.defocus1_A, fit.defocus2_A, fit.astig_angle_deg + 5.0, truth)


def test_engine_files_have_ctffind_layout_and_agree_with_each_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truth = CTFParams(15300.0, 14500.0, -20.0)
    mic = tmp_path / "mic.mrc"
    write_mrc(mic, micrograph((1024, 1024), truth, seed=3), 1.0)
    diag = tmp_path / "out" / "mic.ctf"  # RELION's naming: an MRC without .mrc
    params = CtffindParams(input_path=mic, diag_path=diag, pixel_size_A=1.0)
    rc, _, err = run_engine(stdin_answers(params, "4"), capsys=capsys)
    assert rc == 0, err
    paths = output_paths(diag)
    assert leftovers(diag.parent) == sorted(
        p.name for p in (diag, paths.txt, paths.avrot, paths.preview)
    )
    est = parse_ctffind_txt(paths.txt).single
    assert (
        ctf_errors(est.defocus_1_A, est.defocus_2_A, est.astigmatism_angle_deg, truth, **LOOSE)
        == []
    )
    (prof,) = parse_avrot(paths.avrot)
    p_fit = 1.0 * engine.tile_box_for(512, 1.0, True, 1.4) / 512
    n_bins = math.ceil(math.sqrt(2.0) * 256)  # CTFFIND: out to the corner of the spectrum
    assert prof.spatial_frequency_per_A.size == n_bins == 363
    assert prof.spatial_frequency_per_A[1] == pytest.approx(1 / (512 * p_fit), abs=1e-6)
    assert np.all((prof.ctf_fit >= 0) & (prof.ctf_fit <= 1))
    # The fit row is |CTF| (ctf_model's chi) at the mean defocus the summary reports.
    lam, g = electron_wavelength_A(300.0), prof.spatial_frequency_per_A
    chi = (
        math.pi * lam * est.mean_defocus_A * g**2
        - 0.5 * math.pi * 2.7e7 * lam**3 * g**4
        + math.atan2(0.07, math.sqrt(1 - 0.07**2))
    )
    np.testing.assert_allclose(prof.ctf_fit, np.abs(np.sin(chi)), atol=1e-3)  # %f rounding
    # The fit-resolution column is where the profile's correlation row gives out.
    assert 1.0 / prof.spatial_frequency_per_A[-1] < est.fit_resolution_A
    with mrcfile.open(diag) as m:
        assert m.data.shape == (512, 512) and m.data.dtype == np.float32
        assert float(m.voxel_size.x) == pytest.approx(p_fit, rel=1e-3)
        assert np.all(np.isfinite(m.data))


def test_movie_frames_are_summed_in_groups_as_ctffind_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truth = CTFParams(12400.0, 11600.0, 60.0)
    rng = np.random.default_rng(5)
    density = rng.standard_normal((1024, 1024)).astype(np.float32)
    image = 0.1 * syn.apply_ctf(density, 1.0, truth)
    frames, _ = syn.make_movie(
        image, n_frames=10, dose_per_frame=4.0, drift=np.zeros((10, 2)), rng=rng
    )
    movie = tmp_path / "movie.mrcs"
    syn.write_movie_mrc(movie, frames, 1.0)
    params = CtffindParams(
        input_path=movie,
        diag_path=tmp_path / "movie_ctf.mrc",
        pixel_size_A=1.0,
        input_is_stack=True,
        input_is_movie=True,
        frames_to_average=10,
    )
    rc, out, err = run_engine(stdin_answers(params, "4"), capsys=capsys)
    assert rc == 0, err
    assert "Input is a movie (stack of frames)" in out
    est = parse_ctffind_txt(output_paths(params.diag_path).txt).single
    assert (
        ctf_errors(est.defocus_1_A, est.defocus_2_A, est.astigmatism_angle_deg, truth, **LOOSE)
        == []
    )


def test_a_stack_of_micrographs_gives_one_row_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truths = [CTFParams(11000.0, 10300.0, 10.0), CTFParams(21000.0, 20200.0, -70.0)]
    stack = np.stack([micrograph((1024, 1024), t, seed=20 + i) for i, t in enumerate(truths)])
    path = tmp_path / "two.mrcs"
    write_mrc(path, stack, 1.0)
    params = CtffindParams(
        input_path=path, diag_path=tmp_path / "two_ctf.mrc", pixel_size_A=1.0, input_is_stack=True
    )
    rc, _, err = run_engine(stdin_answers(params, "5"), capsys=capsys)
    assert rc == 0, err
    result = parse_ctffind_txt(output_paths(params.diag_path).txt)
    assert [e.micrograph for e in result.estimates] == [1, 2]
    for est, truth in zip(result.estimates, truths, strict=True):
        assert (
            ctf_errors(est.defocus_1_A, est.defocus_2_A, est.astigmatism_angle_deg, truth, **LOOSE)
            == []
        )
    assert len(parse_avrot(output_paths(params.diag_path).avrot)) == 2
    with mrcfile.open(params.diag_path) as m:
        assert m.data.shape == (2, 512, 512)


def test_phase_plate_shift_is_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth = CTFParams(9000.0, 8400.0, 25.0, phase_shift_rad=1.2)
    mic = tmp_path / "vpp.mrc"
    write_mrc(mic, micrograph((1024, 1024), truth, seed=1), 1.0)
    params = CtffindParams(
        input_path=mic,
        diag_path=tmp_path / "vpp_ctf.mrc",
        pixel_size_A=1.0,
        find_phase_shift=True,
        phase_shift_step_rad=0.2,
    )
    rc, out, err = run_engine(stdin_answers(params, "4"), capsys=capsys)
    assert rc == 0, err
    assert "Additional phase shift" in out
    est = parse_ctffind_txt(output_paths(params.diag_path).txt).single
    assert est.phase_shift_rad == pytest.approx(1.2, abs=0.2)
    # Phase shift and defocus trade off at low resolution: judged at 2 % on this small image.
    assert (
        ctf_errors(
            est.defocus_1_A,
            est.defocus_2_A,
            est.astigmatism_angle_deg,
            truth,
            rel=0.02,
            angle_tol_deg=10.0,
        )
        == []
    )


def test_known_defocus_is_scored_not_searched(
    tmp_path: Path, small_mic: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scores = {}
    for name, known in (("true", (15000.0, 15000.0, 0.0)), ("wrong", (13000.0, 12500.0, 0.0))):
        params = CtffindParams(
            input_path=small_mic,
            diag_path=tmp_path / f"{name}_ctf.mrc",
            pixel_size_A=1.0,
            known_defocus_A=known,
        )
        rc, _, err = run_engine(stdin_answers(params, "5"), capsys=capsys)
        assert rc == 0, err
        est = parse_ctffind_txt(output_paths(params.diag_path).txt).single
        assert (est.defocus_1_A, est.defocus_2_A) == pytest.approx(known[:2])
        scores[name] = est.cross_correlation
    assert scores["true"] > scores["wrong"] + 0.05


@pytest.mark.parametrize(
    "extra",
    [
        {"slower_search": True, "astigmatism_restraint_A": 200.0},
        {"known_astigmatism_A": 0.0, "known_astigmatism_angle_deg": 0.0},
    ],
)
def test_other_search_answers_run_end_to_end(
    tmp_path: Path, small_mic: Path, extra: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    params = CtffindParams(
        input_path=small_mic, diag_path=tmp_path / "s_ctf.mrc", pixel_size_A=1.0, **extra
    )
    rc, _, err = run_engine(stdin_answers(params, "4"), capsys=capsys)
    assert rc == 0, err
    est = parse_ctffind_txt(output_paths(params.diag_path).txt).single
    assert est.mean_defocus_A == pytest.approx(15000.0, rel=0.02)  # small_mic: 15000 A, stigmatic


# --------------------------------------------------------------------------- the "fit resolution"


def test_fit_resolution_follows_ctffinds_rule_including_inf() -> None:
    g = np.arange(100) / 100.0
    good = np.full(100, 0.9)
    assert engine._fit_resolution(good, g) == pytest.approx(1 / g[99])  # all significant: last bin
    drop = good.copy()
    drop[40:] = 0.05
    assert engine._fit_resolution(drop, g) == pytest.approx(1 / g[40])  # first bin below 0.5
    assert engine._fit_resolution(np.full(100, 0.3), g) == pytest.approx(1 / g[1])  # none > 0.5
    # Weak but never failing: CTFFIND's loop ends without a cut-off, reads element -1: inf.
    weak = np.full(100, 0.3)
    weak[50::7] = 0.6
    assert math.isinf(engine._fit_resolution(weak, g))


# --------------------------------------------------------------------------- bad input


def _answers(tmp_path: Path, mic: Path, **changes: str) -> str:
    values = {
        "input": str(mic),
        "diag": str(tmp_path / "out" / "x_ctf.mrc"),
        "pixel": "1.0",
        "kv": "300",
        "cs": "2.7",
        "ac": "0.07",
        "box": "512",
        "minres": "30",
        "maxres": "5",
        "mindf": "5000",
        "maxdf": "50000",
        "step": "100",
    }
    values.update(changes)
    return "\n".join([*values.values(), "no", "no", "no", "no", "no"]) + "\n"


@pytest.fixture
def small_mic(tmp_path: Path) -> Path:
    path = tmp_path / "small.mrc"
    write_mrc(path, micrograph((512, 512), CTFParams(15000.0, 15000.0), seed=1), 1.0)
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pixel": "0"}, "'Pixel size'"),
        ({"pixel": "-1.06"}, "'Pixel size'"),
        ({"minres": "4", "maxres": "5"}, "maximum resolution 5 A must be finer"),
        ({"maxres": "2.0"}, "beyond Nyquist"),
        ({"minres": "80"}, "'Minimum resolution'"),
        ({"box": "100"}, "'Size of amplitude spectrum to compute'"),
        ({"maxdf": "1000"}, "'Maximum defocus'"),
        ({"kv": "three hundred"}, "'three hundred' is not a number"),
        ({"ac": "1.5"}, "'Amplitude contrast'"),
    ],
)
def test_impossible_parameters_are_refused_and_nothing_is_written(
    tmp_path: Path,
    small_mic: Path,
    changes: dict[str, str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, _, err = run_engine(_answers(tmp_path, small_mic, **changes), capsys=capsys)
    assert rc != 0
    assert message in err
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


def test_unreadable_truncated_or_missing_input_is_named(
    tmp_path: Path, small_mic: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated = tmp_path / "truncated.mrc"
    truncated.write_bytes(small_mic.read_bytes()[:-4096])
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(b"not an image" * 200)
    for bad in (truncated, junk, tmp_path / "missing.mrc"):
        rc, _, err = run_engine(_answers(tmp_path, bad), capsys=capsys)
        assert rc != 0
        assert str(bad) in err
    assert not (tmp_path / "out").exists()


def test_a_failure_in_a_later_micrograph_leaves_no_output_at_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = micrograph((512, 512), CTFParams(15000.0, 15000.0), seed=2)
    path = tmp_path / "stack.mrcs"
    write_mrc(path, np.stack([good, np.full_like(good, 40.0)]), 1.0)
    lines = _answers(tmp_path, path).splitlines()
    lines.insert(1, "no")  # "Input is a movie (stack of frames)?"
    rc, _, err = run_engine("\n".join(lines) + "\n", capsys=capsys)
    assert rc == 1
    assert f"{path}: image 2 is blank" in err
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


def test_answers_that_fit_no_ctffind_version_are_refused(
    tmp_path: Path, small_mic: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = "\n".join(_answers(tmp_path, small_mic).splitlines()[:8]) + "\n"
    rc, _, err = run_engine(short, capsys=capsys)
    assert rc == 2 and "ended before the question" in err
    rc, _, err = run_engine(
        _answers(tmp_path, small_mic) + "no\n", "--ctffind-version", "4", capsys=capsys
    )
    assert rc == 2 and "left over" in err
    five = _answers(tmp_path, small_mic).replace("no\nno\nno\nno\nno\n", "no\nno\nno\nno\nyes\n")
    rc, _, err = run_engine(five + "no\nno\n", "--ctffind-version", "5", capsys=capsys)
    assert rc == 2 and "sample tilt determination is not supported" in err


def test_console_command_reads_stdin_and_exits_nonzero_on_error(
    tmp_path: Path, small_mic: Path
) -> None:
    env = {**os.environ, "LC_ALL": "C", "PYTHONPATH": str(REPO / "plugins")}
    bad = subprocess.run(
        [sys.executable, "-m", "cryoflow.processing.engines.ctffind"],
        input=_answers(tmp_path, small_mic, maxres="40"),
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2
    assert "maximum resolution 40 A must be finer" in bad.stderr


def test_no_preview_flag_and_thread_override(
    tmp_path: Path, small_mic: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run_engine(
        _answers(tmp_path, small_mic), "--no-preview", "-j", "2", capsys=capsys
    )
    assert rc == 0, err
    assert "Estimated defocus values" in out
    assert parse_ctffind_txt(tmp_path / "out" / "x_ctf.txt").single.mean_defocus_A > 0
    assert not (tmp_path / "out" / "x_ctf.png").exists()
    rc, _, err = run_engine(_answers(tmp_path, small_mic), "-j", "0", capsys=capsys)
    assert rc == 2 and "-j 0" in err
