"""DoG picker step: the command built from the flag table, and pick files read back.

The parsers are tested on samples in the layouts RELION and ApDogPicker write
(tests/data/dogpicker/README.md), and on what the built-in engine writes when run through the
command built here.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from cryoflow.processing.engines import synthetic as syn
from cryoflow.processing.engines.ctf_model import CTFParams
from cryoflow.processing.engines.dogpicker import Picks, match_picks, write_star, write_xy
from cryoflow.processing.engines.imageio import write_mrc
from cryoflow.processing.tools.dogpicker import (
    FLAGS,
    DogPickerParams,
    PickFileError,
    build_command,
    output_paths,
    parse_picks,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "dogpicker"
REPO = Path(__file__).resolve().parents[2]


def flag_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


# --------------------------------------------------------------------------- parameters, command


def test_every_parameter_in_the_table_reaches_the_command():
    params = DogPickerParams(
        diameter_A=180.0,
        pixel_size_A=1.25,
        thresh=0.7,
        max_thresh=5.5,
        num_slices=3,
        size_range_A=40.0,
        kfactor=1.3,
        max_area=0.4,
        max_peaks=321,
        overlap_mult=1.2,
        min_size=0.4,
        max_size=2.5,
        bin=4,
        invert=True,
    )
    argv = build_command(params, "/opt/bin/cryoflow-dogpicker", "/gpfs/s1/mic_0007.mrc", "/tmp/o")
    assert argv[0] == "/opt/bin/cryoflow-dogpicker"
    assert flag_value(argv, "--image") == "/gpfs/s1/mic_0007.mrc"
    for name, spec in FLAGS.items():
        value = getattr(params, name)
        if isinstance(value, bool):
            assert spec.flag in argv
        else:
            assert float(flag_value(argv, spec.flag)) == pytest.approx(value), name


def test_defaults_are_spelled_out_and_unset_values_left_out():
    argv = build_command(DogPickerParams(diameter_A=150), ["python", "-m", "engine"], "m.mrc", "o")
    assert argv[:3] == ["python", "-m", "engine"]
    assert "--apix" not in argv  # None: the engine reads the MRC header
    assert "--invert" in argv  # cryo-EM particles are dark
    assert flag_value(argv, "--thresh") == "0.6"
    assert flag_value(argv, "--max-peaks") == "500"
    assert "--invert" not in build_command(
        DogPickerParams(diameter_A=150, invert=False), "b", "m.mrc", "o"
    )


def test_outputs_are_named_after_the_micrograph():
    params = DogPickerParams(diameter_A=150, preview="png")
    out = output_paths("/data/Movies/FoilHole_1_Data_2.mrc", "/proc/picks", params)
    assert out.xy == Path("/proc/picks/FoilHole_1_Data_2_dogpicker.txt")
    assert out.star == Path("/proc/picks/FoilHole_1_Data_2_dogpicker.star")
    assert out.preview == Path("/proc/picks/FoilHole_1_Data_2_dogpicker.png")
    argv = build_command(params, "b", "/data/Movies/FoilHole_1_Data_2.mrc", "/proc/picks")
    assert flag_value(argv, "--outfile") == str(out.xy)
    assert flag_value(argv, "--star") == str(out.star)
    assert flag_value(argv, "--preview") == str(out.preview)
    quiet = DogPickerParams(diameter_A=150, write_star=False, preview=None)
    argv = build_command(quiet, "b", "m.mrc", "o")
    assert "--star" not in argv and "--preview" not in argv


def test_appion_dialect_uses_only_apdogpicker_flags():
    params = DogPickerParams(diameter_A=150, pixel_size_A=1.0, bin=2)
    argv = build_command(params, "ApDogPicker.py", "m.mrc", "o", appion=True)
    flags = {a for a in argv if a.startswith("--")}
    assert flags == {
        "--image",
        "--outfile",
        "--diam",
        "--apix",
        "--thresh",
        "--max-thresh",
        "--num-slices",
        "--size-range",
        "--max-area",
        "--max-peaks",
        "--invert",
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_thresh": 0.5}, "max_thresh"),
        ({"size_range_A": 400.0}, "size_range_A"),
        ({"pixel_size_A": 60.0}, "at least 4 pixels"),
        ({"num_slices": 0}, "num_slices"),
        ({"invert": "maybe"}, "invert"),
        ({"colour": "red"}, "colour"),
        ({"preview": "gif"}, "preview"),
    ],
)
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        DogPickerParams(**{"diameter_A": 180.0, **kwargs})


# --------------------------------------------------------------------------- parsers on samples


@pytest.mark.parametrize(
    ("name", "first", "last", "n", "first_score"),
    [
        ("relion30_autopick.star", (1219.364633, 233.878135), (3710.25, 3099.0), 3, 1.523455),
        ("relion31_autopick.star", (811.0, 413.0), (2290.0, 1504.0), 2, 3.117820),
        ("relion31_manualpick.star", (1024.0, 2048.0), (330.0, 127.0), 2, math.nan),
        ("named_block_picks.star", (640.5, 1280.25), (2000.0, 900.0), 2, 0.812),
        ("apdogpicker_picks.txt", (1201.0, 334.5), (402.0, 2911.75), 3, None),
        ("xy_with_header.txt", (100.5, 200.25), (512.0, 1024.0), 3, None),
    ],
)
def test_reads_the_layouts_relion_and_appion_write(name, first, last, n, first_score):
    result = parse_picks(DATA / name)
    assert result.n == n
    assert result.xy()[0] == pytest.approx(first)
    assert result.xy()[-1] == pytest.approx(last)
    if first_score is None:
        assert result.score is None and result.format == "xy"
    else:
        assert result.format == "star"
        assert result.score[0] == pytest.approx(first_score, nan_ok=True)


@pytest.mark.parametrize("name", ["relion31_autopick_empty.star", "apdogpicker_empty.txt"])
def test_a_micrograph_without_picks_reads_as_zero_picks(name):
    result = parse_picks(DATA / name)
    assert result.n == 0 and result.xy().shape == (0, 2)


def test_refuses_relions_list_of_coordinate_files():
    with pytest.raises(PickFileError, match="relion_autopick_index.star: lists coordinate files"):
        parse_picks(DATA / "relion_autopick_index.star")


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("1.0 2.0\n3.0 oops\n", ".txt", r"bad.txt:2: expected 'x y' numbers, got '3.0 oops'"),
        ("1.0 2.0\n7\n", ".txt", "bad.txt:2"),
        ("1.0 nan\n", ".txt", "bad.txt:1: coordinates must be finite"),
        (
            "data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1 2\nabc 3\n",
            ".star",
            "row 2: _rlnCoordinateX is 'abc'",
        ),
        (
            "data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1 2\n3\n",
            ".star",
            "row 2: _rlnCoordinateY is missing",
        ),
        ("data_\nloop_\n_rlnMicrographName #1\nmic.mrc\n", ".star", "no data block with"),
        ("\x00\x01binary\xff", ".star", "bad.star"),
    ],
)
def test_damaged_pick_files_are_refused_naming_the_place(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(PickFileError, match=message):
        parse_picks(path)


def test_missing_pick_file(tmp_path):
    with pytest.raises(PickFileError, match="nothing.star: no such file"):
        parse_picks(tmp_path / "nothing.star")


# --------------------------------------------------------------------------- engine's own output


def test_reads_back_what_the_engine_writes(tmp_path):
    rng = np.random.default_rng(3)
    picks = Picks(
        x=rng.uniform(0, 4000, 25),
        y=rng.uniform(0, 4000, 25),
        score=rng.uniform(0.6, 3, 25),
        diameter_A=np.full(25, 180.0),
        shape=(4096, 4096),
        bin=6,
    )
    write_star(tmp_path / "p.star", picks)
    write_xy(tmp_path / "p.txt", picks)
    star, xy = parse_picks(tmp_path / "p.star"), parse_picks(tmp_path / "p.txt")
    assert star.xy() == pytest.approx(np.column_stack([picks.x, picks.y]), abs=1e-5)
    assert star.score == pytest.approx(picks.score, abs=1e-5)
    # The text file is ordered by x + y and rounded to 0.01 px, as ApDogPicker writes it.
    order = np.argsort(picks.x + picks.y)
    assert xy.xy() == pytest.approx(np.column_stack([picks.x, picks.y])[order], abs=0.006)


def test_the_built_command_runs_the_engine_and_finds_the_particles(tmp_path):
    apix, diam = 1.5, 150.0
    image, truth = syn.make_micrograph(
        (1024, 1024),
        apix,
        CTFParams(15_000.0, 14_700.0, 20.0),
        dose_total=50 * apix**2,
        contrast=0.15,
        rng=np.random.default_rng(5),
        n_particles=20,
        diameter_A=diam,
    )
    mic = tmp_path / "in" / "mic_0042.mrc"
    write_mrc(mic, image, pixel_size_A=apix)
    params = DogPickerParams(diameter_A=diam)
    argv = build_command(
        params,
        [sys.executable, "-m", "cryoflow.processing.engines.dogpicker"],
        mic,
        tmp_path / "out",
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "plugins")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    out = output_paths(mic, tmp_path / "out", params)
    assert out.preview is not None and out.preview.stat().st_size > 1000
    star, xy = parse_picks(out.star), parse_picks(out.xy)
    assert star.n == xy.n > 0
    true_xy = np.array([[p.x, p.y] for p in truth.particles])
    m = match_picks(star.xy(), true_xy, 0.3 * diam / apix)
    assert m.precision >= 0.95 and m.recall >= 0.95, m
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [out.xy.name, out.star.name, out.preview.name]
    )
