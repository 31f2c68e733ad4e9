"""MotionCor2 step: command building from the flag table, and parsing its shift logs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from cryoflow.processing.engines import motioncor as engine
from cryoflow.processing.engines import synthetic as syn
from cryoflow.processing.tools import motioncor2 as mc2

DATA = Path(__file__).resolve().parents[1] / "data" / "motioncor2"
STEM = "FoilHole_29811034_Data_29809467_29809469_20240517_101512_fractions"


def _params(**kw) -> mc2.MotionCor2Params:
    base = {"movie": Path("/gpfs/s1/m.tiff"), "out_mrc": Path("/gpfs/s1/mc/m.mrc")}
    base["pixel_size_A"] = 0.415
    base.update(kw)
    return mc2.MotionCor2Params(**base)


def _flag(cmd: list[str], flag: str, n: int = 1) -> list[str]:
    i = cmd.index(flag)
    return cmd[i + 1 : i + 1 + n]


def test_build_command_for_a_super_resolution_tiff():
    p = _params(
        gain=Path("/gpfs/s1/gain.mrc"),
        rot_gain=1,
        flip_gain=2,
        fm_dose_e_per_A2=0.8,
        patch=(5, 5),
        ft_bin=2.0,
        log_dir=Path("/gpfs/s1/mc/logs"),
        gpu=(0, 1),
    )
    cmd = mc2.build_command(p, "/opt/MotionCor2_1.6.4")
    assert cmd[:3] == ["/opt/MotionCor2_1.6.4", "-InTiff", "/gpfs/s1/m.tiff"]
    assert _flag(cmd, "-OutMrc") == ["/gpfs/s1/mc/m.mrc"]
    assert _flag(cmd, "-Gain") == ["/gpfs/s1/gain.mrc"]
    assert _flag(cmd, "-RotGain") == ["1"] and _flag(cmd, "-FlipGain") == ["2"]
    # -PixSize is the movie's (super-resolution) pixel; the sum's pixel is twice it.
    assert _flag(cmd, "-PixSize") == ["0.415"] and _flag(cmd, "-FtBin") == ["2"]
    assert p.output_pixel_size_A() == pytest.approx(0.83)
    assert _flag(cmd, "-FmDose") == ["0.8"] and _flag(cmd, "-kV") == ["300"]
    assert _flag(cmd, "-Patch", 2) == ["5", "5"]
    assert _flag(cmd, "-LogDir") == ["/gpfs/s1/mc/logs"]
    assert _flag(cmd, "-Gpu", 2) == ["0", "1"]
    assert "-FmIntFile" not in cmd and "-InitDose" not in cmd


def test_iter_tol_bft_are_always_explicit_and_empty_values_are_skipped():
    cmd = mc2.build_command(_params(), "MotionCor2")
    assert _flag(cmd, "-Iter") == ["7"] and _flag(cmd, "-Tol") == ["0.5"]
    assert _flag(cmd, "-Bft", 2) == ["500", "150"]
    for absent in ("-Gain", "-RotGain", "-FlipGain", "-FmDose", "-Patch", "-FtBin", "-LogDir"):
        assert absent not in cmd
    # Every token after the binary is a flag followed by its values: flags come from the table.
    flags = [t for t in cmd[1:] if t.startswith("-") and not t[1:2].isdigit()]
    assert set(flags) <= {"-InTiff"} | {f for _, f, _ in mc2.FLAG_TABLE}


@pytest.mark.parametrize(
    ("name", "flag"),
    [("a.tif", "-InTiff"), ("a.TIFF", "-InTiff"), ("a.mrc", "-InMrc"), ("a.mrcs", "-InMrc")],
)
def test_input_flag_follows_the_extension(name, flag):
    assert mc2.build_command(_params(movie=Path(name)))[1] == flag


def test_eer_needs_a_fraction_file_and_gets_it_passed():
    with pytest.raises(ValidationError, match="fm_int_file"):
        _params(movie=Path("m.eer"))
    cmd = mc2.build_command(_params(movie=Path("m.eer"), fm_int_file=Path("fi.txt")))
    assert cmd[1:3] == ["-InEer", "m.eer"] and _flag(cmd, "-FmIntFile") == ["fi.txt"]
    assert mc2.fm_int_file_text(1200, 30, 0.0125) == "1200 30 0.0125\n"


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"movie": Path("m.png")}, "reads .tif/.tiff, .eer, .mrc/.mrcs only"),
        ({"rot_gain": 4}, "less than or equal to 3"),
        ({"pixel_size_A": 0.0}, "greater than 0"),
        ({"ft_bin": 0.5}, "greater than or equal to 1"),
        ({"fm_dose_e_per_A2": 1.0, "kv": 120.0}, "200-300 kV"),
        ({"fm_int_file": Path("fi.txt")}, "only apply to EER"),
        ({"bogus": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_parameters_are_refused_with_the_reason(kw, needle):
    with pytest.raises(ValidationError, match=needle):
        _params(**kw)


# --------------------------------------------------------------------------- logs


def _independent_read(path: Path) -> np.ndarray:
    rows = [
        line.split()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return np.array([[float(v) for v in r[1:3]] for r in rows])


@pytest.mark.parametrize(
    "name",
    [f"{STEM}-Full.log", f"{STEM}-Patch-Full.log", "GridSquare_5_0001_0-Full.log"],
)
def test_parse_full_logs_in_every_naming(name):
    log = mc2.parse_shift_log(DATA / name)
    expected = _independent_read(DATA / name)
    assert log.frames == list(range(1, 21))
    np.testing.assert_allclose(log.shifts_px, expected)
    assert log.shifts_px[10] == (0.0, 0.0)  # the central frame is MotionCor2's reference
    steps = np.linalg.norm(np.diff(expected, axis=0), axis=1)
    assert log.total_drift() == pytest.approx(steps.sum())
    assert log.total_drift(0.83) == pytest.approx(0.83 * steps.sum())
    assert log.early_drift(4) == pytest.approx(steps[:3].sum())
    assert log.late_drift(4) == pytest.approx(steps[3:].sum())
    assert log.early_drift(4) + log.late_drift(4) == pytest.approx(log.total_drift())
    assert log.max_step() == pytest.approx(steps.max())
    assert log.patch == ("-Patch-" in name)


def test_parse_patch_logs_reads_per_patch_shifts():
    log = mc2.parse_shift_log(DATA / "GridSquare_5_0001_0-Patch-Full.log")
    assert log.patch_log == DATA / "GridSquare_5_0001_0-Patch-Patch.log"
    assert sorted(log.patch_shifts) == list(range(1, 10))
    first = log.patch_shifts[1]
    assert len(first) == 20 and first[0][:3] == (1, 960.0, 682.0)
    assert all(math.isfinite(v) for rows in log.patch_shifts.values() for r in rows for v in r)


def test_find_shift_log_handles_both_namings_and_prefers_patch_logs(tmp_path):
    movie = f"/microscope/share/{STEM}.tiff"
    assert mc2.find_shift_log(DATA, movie).name == f"{STEM}-Patch-Full.log"
    assert (
        mc2.find_shift_log(DATA, "GridSquare_5_0001_").name == "GridSquare_5_0001_0-Patch-Full.log"
    )
    (tmp_path / f"{STEM}-Full.log").write_text((DATA / f"{STEM}-Full.log").read_text())
    assert mc2.find_shift_log(tmp_path, STEM + ".tiff").name == f"{STEM}-Full.log"
    with pytest.raises(mc2.ShiftLogError, match="no MotionCor2 shift log for 'other'"):
        mc2.find_shift_log(tmp_path, "other.mrc")


def test_log_stem_cuts_at_the_first_known_extension_like_motioncor2():
    assert mc2.log_stem("/a/b/x_fractions.tiff") == "x_fractions"
    assert mc2.log_stem("x.mrcs") == "x"
    assert mc2.log_stem("x.EER") == "x"
    assert mc2.log_stem("x.tif.bz2") == "x"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("# full frame alignment\n", "no shift rows"),
        ("# full frame alignment\n   1  0.00\n", "expected 3 columns"),
        ("# full frame alignment\n   1  0.00  x\n", "not numbers"),
        ("   1  0.00  0.00\n   3  0.10  0.00\n", "not consecutive"),
    ],
)
def test_malformed_logs_are_refused_naming_the_file(tmp_path, text, needle):
    path = tmp_path / "m-Full.log"
    path.write_text(text)
    with pytest.raises(mc2.ShiftLogError, match=needle) as exc:
        mc2.parse_shift_log(path)
    assert str(path) in str(exc.value)


def test_missing_or_misnamed_logs_are_refused(tmp_path):
    with pytest.raises(mc2.ShiftLogError, match="no such shift log"):
        mc2.parse_shift_log(tmp_path / "m-Full.log")
    other = tmp_path / "m-Patch-Frame.log"
    other.write_text("")
    with pytest.raises(mc2.ShiftLogError, match=r"not a MotionCor2 full-frame log"):
        mc2.parse_shift_log(other)


def test_the_builtin_engine_log_parses_with_the_same_parser(tmp_path):
    rng = np.random.default_rng(5)
    dens, _ = syn.make_specimen((160, 160), 4.0, n_particles=4, diameter_A=100.0, rng=rng)
    drift = np.cumsum(np.full((8, 2), [0.5, -0.25]), axis=0)
    frames, truth = syn.make_movie(
        dens - dens.mean(), n_frames=8, dose_per_frame=200.0, drift=drift, rng=rng,
        dtype=np.uint16, out_shape=(128, 128),
    )  # fmt: skip
    syn.write_movie_mrc(tmp_path / "tiny.mrcs", frames, 4.0)
    res = engine.run(
        engine.MotionCorParams(
            in_path=tmp_path / "tiny.mrcs",
            out_mrc=tmp_path / "out" / "tiny.mrc",
            log_dir=tmp_path / "logs",
            preview=False,
        )
    )
    log = mc2.parse_shift_log(mc2.find_shift_log(tmp_path / "logs", "tiny.mrcs"))
    assert log.path == res.log_paths[0]
    np.testing.assert_allclose(log.shifts_px, res.shifts_px, atol=0.006)  # printed %8.2f
    assert engine.trajectory_rms_error(np.array(log.shifts_px), truth.shifts_px) < 0.2
