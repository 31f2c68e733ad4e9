"""CTFFIND as a step: the stdin answers each version expects, the command, and the parsers.

The parsers are checked on files in CTFFIND 4.1.14's and 5.0.2's layout (tests/data/ctffind/);
the engine tests (tests/engines/test_ctffind.py) check them again on the built-in engine's output.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from cryoflow.processing.engines.ctffind import read_answers
from cryoflow.processing.engines.imageio import write_mrc
from cryoflow.processing.tools.ctffind import (
    ENV,
    VERSIONS,
    CtffindOutputError,
    CtffindParams,
    build_command,
    output_paths,
    parse_avrot,
    parse_ctffind_txt,
    stdin_answers,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "ctffind"


@pytest.fixture
def mic(tmp_path: Path) -> Path:
    path = tmp_path / "mic.mrc"
    write_mrc(path, np.random.default_rng(0).poisson(40, (128, 128)).astype(np.float32), 1.06)
    return path


@pytest.fixture
def stack(tmp_path: Path) -> Path:
    path = tmp_path / "movie.mrcs"
    frames = np.random.default_rng(1).poisson(1, (4, 128, 128)).astype(np.float32)
    write_mrc(path, frames, 1.06)
    return path


def _params(mic: Path, **kw: object) -> CtffindParams:
    return CtffindParams(
        input_path=mic, diag_path=mic.with_name("mic_ctf.mrc"), pixel_size_A=1.06, **kw
    )


# --------------------------------------------------------------------------- stdin answers


def test_default_answers_follow_ctffind_4_1_14_question_order(mic: Path) -> None:
    # cisTEM src/programs/ctffind/ctffind.cpp (4.1.14): input, diagnostic, pixel size, kV, Cs,
    # amplitude contrast, box, min res, max res, min df, max df, step, astigmatism known?,
    # slower search?, restraint?, phase shift?, expert options?
    assert stdin_answers(_params(mic), "4").splitlines() == [
        str(mic),
        str(mic.with_name("mic_ctf.mrc")),
        "1.06",
        "300.0",
        "2.7",
        "0.07",
        "512",
        "30.0",
        "5.0",
        "5000.0",
        "50000.0",
        "100.0",
        "no",
        "no",
        "no",
        "no",
        "no",
    ]


def test_later_versions_ask_about_tilt_and_thickness_before_expert_options(mic: Path) -> None:
    four = stdin_answers(_params(mic), "4").splitlines()
    four15 = stdin_answers(_params(mic), "4.1.15").splitlines()
    five = stdin_answers(_params(mic), "5").splitlines()
    assert four15 == four[:-1] + ["no"] + four[-1:]  # tilt?, expert?
    assert five == four[:-1] + ["no", "no"] + four[-1:]  # tilt?, thickness?, expert?
    # With a phase-shift search nobody asks about tilt.
    ps = [stdin_answers(_params(mic, find_phase_shift=True), v).splitlines() for v in VERSIONS]
    assert ps[0][15:] == ps[1][15:] == ["yes", "0.0", "3.15", "0.5", "no"]
    assert ps[2][15:] == ["yes", "0.0", "3.15", "0.5", "no", "no"]


def test_restraint_known_astigmatism_and_expert_answers(mic: Path) -> None:
    restrained = stdin_answers(_params(mic, astigmatism_restraint_A=300), "4").splitlines()
    assert restrained[12:] == ["no", "no", "yes", "300.0", "no", "no"]
    known = stdin_answers(
        _params(mic, known_astigmatism_A=450, known_astigmatism_angle_deg=-12.5), "4"
    ).splitlines()
    assert known[12:] == ["yes", "no", "450.0", "-12.5", "no", "no"]
    expert4 = stdin_answers(_params(mic, threads=4), "4").splitlines()
    assert expert4[16:] == ["yes", "yes", "no", "4"]  # expert, resample, defocus known?, threads
    expert415 = stdin_answers(_params(mic, threads=4), "4.1.15").splitlines()
    assert expert415[17:] == ["yes", "yes", "no", "yes", "4"]  # + weight down low res
    expert5 = stdin_answers(_params(mic, threads=4), "5").splitlines()
    assert expert5[18:] == ["yes", "yes", "1.4", "no", "yes", "4"]  # + target pixel size


def test_a_version_cannot_be_asked_what_it_has_no_question_for(mic: Path) -> None:
    with pytest.raises(ValueError, match="version 4 has no question for weight_down_low_res"):
        stdin_answers(_params(mic, weight_down_low_res=False), "4")
    with pytest.raises(ValueError, match="version 4.1.15 has no question for target_pixel"):
        stdin_answers(_params(mic, target_pixel_size_A=1.0), "4.1.15")
    with pytest.raises(ValueError, match="version must be one of"):
        stdin_answers(_params(mic), "4.1")  # type: ignore[arg-type]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"astigmatism_restraint_A": 250.0, "slower_search": True},
        {"known_astigmatism_A": 600.0, "known_astigmatism_angle_deg": 33.0},
        {"find_phase_shift": True, "min_phase_shift_rad": 0.2, "phase_shift_step_rad": 0.1},
        {
            "known_defocus_A": (15000.0, 14000.0, 20.0),
            "threads": 3,
            "resample_if_pixel_too_small": False,
        },
    ],
)
def test_ctffinds_questions_consume_the_answers_exactly(
    mic: Path, version: str, extra: dict[str, object]
) -> None:
    params = _params(mic, max_res_A=4.0, min_defocus_A=8000.0, **extra)
    text = stdin_answers(params, version)  # type: ignore[arg-type]
    s = read_answers(text.splitlines(), version)  # type: ignore[arg-type]
    assert (s.input_path, s.diag_path) == (params.input_path, params.diag_path)
    assert (s.pixel_size_A, s.max_res_A, s.min_defocus_A) == (1.06, 4.0, 8000.0)
    assert s.restrain_astig == (params.astigmatism_restraint_A is not None)
    assert s.astig_known == (params.known_astigmatism_A is not None)
    assert s.find_phase_shift == params.find_phase_shift
    assert s.defocus_known == (params.known_defocus_A is not None)
    assert (s.threads, s.resample) == (params.threads, params.resample_if_pixel_too_small)
    # The answers alone identify the version, or an equivalent one: 4.1.14 and 4.1.15 ask the
    # same questions when a phase shift is searched.
    auto = read_answers(text.splitlines(), "auto")
    assert replace(auto, version=version) == s
    if not params.find_phase_shift:
        assert auto.version == version


@pytest.mark.parametrize("version", VERSIONS)
def test_movie_answers_include_the_frames_question_and_gain(
    stack: Path, tmp_path: Path, version: str
) -> None:
    gain = tmp_path / "gain.mrc"
    write_mrc(gain, np.ones((128, 128), np.float32))
    params = CtffindParams(
        input_path=stack,
        diag_path=tmp_path / "movie_ctf.mrc",
        pixel_size_A=1.06,
        input_is_stack=True,
        input_is_movie=True,
        frames_to_average=2,
        gain_path=gain,
    )
    if version != "4":
        params = params.model_copy(update={"dark_path": gain})  # any image will do as a file
    lines = stdin_answers(params, version).splitlines()  # type: ignore[arg-type]
    assert lines[1:3] == ["yes", "2"]
    s = read_answers(lines, version)  # type: ignore[arg-type]
    assert (s.is_movie, s.frames_to_average, s.gain_path) == (True, 2, gain)
    assert s.dark_path == (None if version == "4" else gain)


def test_params_refuse_impossible_values(mic: Path) -> None:
    with pytest.raises(ValidationError, match="max_res_A"):
        _params(mic, min_res_A=4.0, max_res_A=5.0)
    with pytest.raises(ValidationError, match="pixel_size_A"):
        CtffindParams(input_path=mic, diag_path=mic, pixel_size_A=0)
    with pytest.raises(ValidationError, match="max_defocus_A"):
        _params(mic, min_defocus_A=30000.0, max_defocus_A=20000.0)
    with pytest.raises(ValidationError, match="input_is_stack"):
        _params(mic, input_is_movie=True)
    with pytest.raises(ValidationError, match="box_size"):
        _params(mic, box_size=64)


def test_command_and_environment() -> None:
    assert build_command("/opt/ctffind/4.1.14/bin/ctffind") == ["/opt/ctffind/4.1.14/bin/ctffind"]
    assert build_command("ctffind", threads=8) == ["ctffind", "-j", "8"]
    with pytest.raises(ValueError, match="threads"):
        build_command("ctffind", threads=0)
    assert ENV == {"LC_ALL": "C"}


def test_output_paths_are_derived_like_ctffind() -> None:
    out = output_paths("/gpfs/run/CtfFind/mic_0001.mrc")
    assert (out.txt, out.avrot) == (
        Path("/gpfs/run/CtfFind/mic_0001.txt"),
        Path("/gpfs/run/CtfFind/mic_0001_avrot.txt"),
    )
    assert output_paths("job/mic.ctf").txt == Path("job/mic.txt")  # RELION's .ctf naming
    assert output_paths("job/mic").avrot == Path("job/mic_avrot.txt")


# --------------------------------------------------------------------------- parsers


def test_parse_ctffind_4_summary() -> None:
    r = parse_ctffind_txt(DATA / "ctffind4_single.txt")
    assert r.version == "4.1.14"
    assert r.input_file == "MotionCorr/job003/Movies/FoilHole_1234_Data_5678_fractions.mrc"
    assert (r.pixel_size_A, r.voltage_kV, r.cs_mm, r.amplitude_contrast) == (0.83, 300.0, 2.7, 0.07)
    assert r.box_size == 512
    assert (r.defocus_1_A, r.defocus_2_A) == (17345.876953, 16912.304688)
    assert r.astigmatism_angle_deg == -37.402168
    assert (r.phase_shift_rad, r.cross_correlation, r.fit_resolution_A) == (0.0, 0.187213, 3.814672)
    assert r.single.astigmatism_A == pytest.approx(433.572265)
    assert r.single.thickness_A is None


def test_parse_ctffind_inf_resolution() -> None:
    r = parse_ctffind_txt(DATA / "ctffind4_inf.txt")
    assert math.isinf(r.fit_resolution_A)
    assert r.defocus_1_A == 31284.109375


def test_parse_ctffind_several_micrographs() -> None:
    r = parse_ctffind_txt(DATA / "ctffind4_stack.txt")
    assert [e.micrograph for e in r.estimates] == [1, 2, 3]
    assert r.estimates[2].phase_shift_rad == 0.785398
    with pytest.raises(CtffindOutputError, match="holds 3 micrographs"):
        _ = r.defocus_1_A


def test_parse_ctffind_5_ten_columns() -> None:
    r = parse_ctffind_txt(DATA / "ctffind5_single.txt")
    assert r.version == "5.0.2"
    e = r.single
    assert (e.tilt_axis_deg, e.tilt_angle_deg, e.thickness_A) == (0.0, 0.0, 0.0)
    assert e.fit_resolution_A == 3.452019


def test_parse_avrot_ctffind_4_and_5() -> None:
    profiles = parse_avrot(DATA / "ctffind4_avrot.txt")
    assert len(profiles) == 2
    for p in profiles:
        assert p.spatial_frequency_per_A.shape == (91,)  # box 128: ceil(sqrt(2) * 64) bins
        assert p.spatial_frequency_per_A[0] == 0.0 and math.isinf(p.resolution_A[0])
        assert np.all((p.ctf_fit >= 0) & (p.ctf_fit <= 1))
        assert p.cross_correlation[0] == 1.0
    assert not np.allclose(profiles[0].ctf_fit, profiles[1].ctf_fit)  # two different defoci
    (five,) = parse_avrot(DATA / "ctffind5_avrot.txt")
    assert five.rotational_average.shape == (91,)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("# header only\n", "no result rows"),
        ("1.0 2.0 3.0\n", "3 columns"),
        ("1.000000 abc 1 1 1 1 1\n", ":1: not a row of numbers"),
        ("1 nan 15000 0 0 0.1 4\n", "defocus 1 is nan"),
    ],
)
def test_parse_ctffind_txt_names_file_and_line_of_bad_content(
    tmp_path: Path, content: str, message: str
) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    with pytest.raises(CtffindOutputError, match=message) as info:
        parse_ctffind_txt(bad)
    assert str(bad) in str(info.value)


def test_parse_errors_for_missing_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(CtffindOutputError, match="no such file"):
        parse_ctffind_txt(tmp_path / "absent.txt")
    lines = (DATA / "ctffind4_avrot.txt").read_text().splitlines()
    truncated = tmp_path / "trunc_avrot.txt"
    truncated.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(CtffindOutputError, match="6 per micrograph"):
        parse_avrot(truncated)
    ragged = tmp_path / "ragged_avrot.txt"
    ragged.write_text("\n".join(lines[:7] + [lines[7] + " 1.0"] + lines[8:11]) + "\n")
    with pytest.raises(CtffindOutputError, match=":8: 92 values"):
        parse_avrot(ragged)
