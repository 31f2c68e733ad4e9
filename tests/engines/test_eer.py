"""EER (Falcon 4/4i) input: the codec, MotionCor2's sampling and grouping, and the whole chain.

The encoder is ours (no registry package encodes EER), so it is checked against two decoders it
shares no code with: imagecodecs' C decoder and a line-by-line transcription of MotionCor3's
``CDecodeEerFrame`` below. The chain test runs the simulator's EPU + Falcon EER movie through
``cryoflow-motioncor2 -InEer``, ``cryoflow-ctffind`` and ``cryoflow-dogpicker`` and compares with
its truth, at the bars of the TIFF chain (tests/test_processing_e2e.py): 0.2 px RMS drift, 0.5 %
defocus, 0.8-1.25x the particles.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import imagecodecs
import mrcfile
import numpy as np
import pytest
import tifffile

from cryoflow.ingest.share.completeness import Verdict, check_complete
from cryoflow.processing.engines import ctffind
from cryoflow.processing.engines import eer as E
from cryoflow.processing.engines import motioncor as mc
from cryoflow.processing.engines.dogpicker import main as dogpicker_main
from cryoflow.processing.engines.dogpicker import match_picks
from cryoflow.processing.engines.imageio import ImageReadError, open_movie
from cryoflow.processing.tools.ctffind import (
    CtffindParams,
    output_paths,
    parse_ctffind_txt,
    stdin_answers,
)
from cryoflow.processing.tools.motioncor2 import (
    MotionCor2Params,
    build_command,
    find_shift_log,
    fm_int_file_text,
    parse_shift_log,
)
from cryoflow.simulator import SimulatorConfig, simulate_session


def mc3_decode(data: bytes, shape: tuple[int, int], sampling: int) -> np.ndarray:
    """MotionCor3 ``CDecodeEerFrame::mDo7Bits*`` (7-bit runs, 4 sub-pixel bits), in Python."""
    ny, nx = shape
    f = {1: 1, 2: 2, 3: 4}[sampling]
    out = np.zeros((ny * f, nx * f), dtype=np.uint8)
    bits = np.unpackbits(np.frombuffer(data + b"\0" * 8, dtype=np.uint8), bitorder="little")
    weights = 1 << np.arange(11)

    def take(pos: int, n: int) -> int:
        return int(bits[pos : pos + n] @ weights[:n])

    pos = num = 0
    while True:
        p = take(pos, 7)
        pos += 7
        num += p
        if num >= ny * nx:
            break
        if p == 127:
            continue
        s = take(pos, 4) ^ 0x0A
        pos += 4
        row, col = divmod(num, nx)
        if sampling == 1:
            out[row, col] += 1
        elif sampling == 2:
            out[(row << 1) | ((s & 8) >> 3), (col << 1) | ((s & 2) >> 1)] += 1
        else:
            out[(row << 2) | ((s & 12) >> 2), (col << 2) | (s & 3)] += 1
        num += 1
    return out


def raw_frames(n: int, shape: tuple[int, int], p: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random(shape) < p).astype(np.uint8) for _ in range(n)]


def write(path: Path, frames: list[np.ndarray], **meta: object) -> Path:
    E.write_eer(path, frames, frames[0].shape, meta or None, rng=np.random.default_rng(0))
    return path


# --------------------------------------------------------------------------- codec


def _edge_frames() -> list[np.ndarray]:
    """Runs of 0, 126, 127, 128, 254 and 255 pixels, an electron on the last pixel, none, all."""
    frames = []
    for run in (0, 126, 127, 128, 254, 255):
        f = np.zeros((20, 30), np.uint8)
        f.flat[run] = 1
        f.flat[min(run + 1 + run, f.size - 1)] = 1
        frames.append(f)
    last = np.zeros((20, 30), np.uint8)
    last.flat[-1] = 1
    tail = np.zeros((20, 30), np.uint8)
    tail.flat[f.size - 1 - 254] = 1  # the closing run is exactly 2 x 127
    return [*frames, last, tail, np.zeros((20, 30), np.uint8), np.ones((20, 30), np.uint8)]


def test_encoder_round_trips_through_imagecodecs_and_motioncor3_decoders() -> None:
    rng = np.random.default_rng(5)
    frames = _edge_frames() + [
        (rng.random((20, 30)) < p).astype(np.uint8) for p in (0.003, 0.05, 0.4, 0.97)
    ]
    for frame in frames:
        k = int(frame.sum())
        sub = rng.integers(0, 16, k)
        data = E.encode_frame(frame, sub)
        assert len(data) % 2 == 0
        assert np.array_equal(imagecodecs.eer_decode(data, (20, 30), 7, 2, 2), frame)
        for sampling in (1, 2, 3):
            ours = E.decode_frame(data, (20, 30), sampling=sampling)
            assert np.array_equal(ours, mc3_decode(data, (20, 30), sampling)), sampling
            assert int(ours.sum()) == k
    # A 4k frame at a Falcon's dose encodes to ~11 bits per electron.
    big = (rng.random((4096, 4096)) < 0.02).astype(np.uint8)
    data = E.encode_frame(big, rng.integers(0, 16, int(big.sum())))
    assert np.array_equal(imagecodecs.eer_decode(data, big.shape, 7, 2, 2), big)
    assert len(data) * 8 / big.sum() < 12.5


def test_sub_pixel_positions_land_where_falcon_puts_them() -> None:
    frame = np.zeros((8, 8), np.uint8)
    frame[2, 5] = frame[6, 1] = 1  # raster order: (2, 5) first
    sx, sy = np.array([3, 0]), np.array([1, 2])
    data = E.encode_frame(frame, E.subpixel_code(sx, sy))
    hi = E.decode_frame(data, (8, 8), sampling=3)
    assert sorted(map(tuple, np.argwhere(hi))) == [(2 * 4 + 1, 5 * 4 + 3), (6 * 4 + 2, 1 * 4 + 0)]
    mid = E.decode_frame(data, (8, 8), sampling=2)  # the high bit of each sub-position
    assert sorted(map(tuple, np.argwhere(mid))) == [(2 * 2 + 0, 5 * 2 + 1), (6 * 2 + 1, 1 * 2 + 0)]
    with pytest.raises(ValueError, match="at most one electron"):
        E.encode_frame(frame * 2)


def test_written_file_is_a_bigtiff_eer_that_tifffile_and_completeness_read(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("CRYOFLOW_FILE_MODE", "0640")  # as a cryoflow job sets it
    frames = raw_frames(7, (48, 64), 0.1, seed=1)
    path = write(tmp_path / "m_EER.eer", frames, numberOfFrames=7)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff and tif.is_eer and len(tif.pages) == 7
        assert {p.compression for p in tif.pages} == {65001}
        assert tif.eer_metadata == {"numberOfFrames": 7}
        assert np.array_equal(tif.asarray(), np.stack(frames))
    done = check_complete(path)
    assert done.verdict is Verdict.COMPLETE and done.frames == 7
    assert path.stat().st_mode & 0o777 == 0o640  # the job's mode: not world-readable


# --------------------------------------------------------------------------- sampling, grouping


def test_sampling_renders_the_detector_8k_and_16k_grids(tmp_path) -> None:
    path = write(tmp_path / "s.eer", raw_frames(6, (32, 40), 0.2, seed=2))
    plan = [E.FmIntEntry(6, 3, 0.05)]
    movies = [open_movie(path, eer_sampling=s, fm_int=plan) for s in (1, 2, 3)]
    try:
        assert [m.shape for m in movies] == [(2, 32, 40), (2, 64, 80), (2, 128, 160)]
        for i in range(2):
            f1, f2, f3 = (m.frame(i) for m in movies)
            assert f1.dtype == np.float32 and f1.sum() == f2.sum() == f3.sum() > 0
            assert np.array_equal(f3.reshape(64, 2, 80, 2).sum(axis=(1, 3)), f2)
            assert np.array_equal(f2.reshape(32, 2, 40, 2).sum(axis=(1, 3)), f1)
    finally:
        for m in movies:
            m.close()


@pytest.mark.parametrize(
    ("n_raw", "entries", "sizes"),
    [
        (1000, [(1000, 10)], [10] * 100),
        # the remainder is spread over the last fractions, never a short last fraction
        (1005, [(1005, 10)], [10] * 95 + [11] * 5),
        (23, [(23, 5)], [5, 6, 6, 6]),
        # the movie has more raw frames than the file lists: they join the last entry
        (125, [(100, 10)], [10] * 7 + [11] * 5),
        # an entry's remainder joins the next entry
        (300, [(100, 3), (200, 5)], [3] * 33 + [5] * 39 + [6]),
        # the file lists more than the movie has: taken off the last entries first
        (120, [(100, 10), (50, 5)], [10] * 10 + [5] * 4),
        (90, [(100, 10), (50, 5)], [10] * 9),
    ],
)
def test_fraction_plan_groups_raw_frames_as_motioncor2(n_raw, entries, sizes) -> None:
    plan = E.fraction_plan(n_raw, [E.FmIntEntry(r, g, 0.01) for r, g in entries])
    assert list(plan.sizes) == sizes
    assert list(plan.starts) == [0, *np.cumsum(sizes)[:-1].tolist()]
    assert plan.dose_per_raw_frame == 0.01


def test_fraction_plan_without_integration_and_impossible_remainders() -> None:
    one_each = E.fraction_plan(5, [E.FmIntEntry(5, 1, 0.1)])
    assert one_each.sizes == (1,) * 5
    mixed = E.fraction_plan(6, [E.FmIntEntry(3, 3, 0.1), E.FmIntEntry(3, 3, 0.2)])
    assert mixed.sizes == (1,) * 6  # MotionCor integrates only at one dose per raw frame
    assert E.fraction_plan(4, None).sizes == (1,) * 4
    with pytest.raises(ValueError, match="left over"):
        E.fraction_plan(19, [E.FmIntEntry(19, 10, 0.1)])  # 9 left over, 1 fraction
    plan = E.fraction_plan(1005, [E.FmIntEntry(1005, 10, 0.02)])
    assert plan.fraction_dose() == pytest.approx(0.2)


def test_fm_int_file_is_parsed_or_refused_with_file_and_line(tmp_path) -> None:
    f = tmp_path / "fm.txt"
    f.write_text(fm_int_file_text(400, 20, 0.025))
    assert E.read_fm_int_file(f) == [E.FmIntEntry(400, 20, 0.025)]
    f.write_text("300 10\n100 5\n")  # two columns: -FmDose is the dose per raw frame
    assert E.read_fm_int_file(f, 0.03) == [E.FmIntEntry(300, 10, 0.03), E.FmIntEntry(100, 5, 0.03)]
    f.write_text("400 20 0.025\n100 x 0.025\n")
    with pytest.raises(ValueError, match=r"fm\.txt:2: "):
        E.read_fm_int_file(f)
    f.write_text("")
    with pytest.raises(ValueError, match="no entries"):
        E.read_fm_int_file(f)


def test_each_fraction_is_the_sum_of_exactly_its_raw_frames(tmp_path) -> None:
    raws = raw_frames(23, (16, 24), 0.3, seed=3)
    path = write(tmp_path / "g.eer", raws)
    with open_movie(path, fm_int=[E.FmIntEntry(23, 5, 0.1)]) as movie:
        assert movie.shape == (4, 16, 24) and movie.n_raw_frames == 23
        for i, (start, size) in enumerate(zip(movie.plan.starts, movie.plan.sizes, strict=True)):
            assert np.array_equal(movie.frame(i), np.sum(raws[start : start + size], axis=0))
    # Pages of several strips (EER allows it): each strip is decoded into its rows.
    strips = tmp_path / "strips.eer"
    with E._eer_compression_registered(), tifffile.TiffWriter(strips, bigtiff=True) as tw:
        for raw in raws[:5]:
            tw.write(iter([E.encode_frame(raw[:8]), E.encode_frame(raw[8:])]), shape=raw.shape,
                     dtype=np.uint8, compression=65001, rowsperstrip=8, metadata=None)  # fmt: skip
    with open_movie(strips, fm_int=[E.FmIntEntry(5, 5, 0.1)]) as movie:
        assert np.array_equal(movie.raw_frame(3), raws[3])
        assert np.array_equal(movie.frame(0), np.sum(raws[:5], axis=0))
    # More than 255 raw frames in one fraction (the uint8 buffer is summed in chunks).
    many = [np.ones((4, 6), np.uint8)] * 300
    with open_movie(write(tmp_path / "many.eer", many), fm_int=[E.FmIntEntry(300, 300, 1.0)]) as m:
        assert m.shape == (1, 4, 6) and np.all(m.frame(0) == 300)


# --------------------------------------------------------------------------- gain, damage


def _flat_field_movie(tmp_path: Path, gain: np.ndarray, n_raw: int = 64) -> Path:
    """Raw EER frames of a flat exposure seen through a detector whose reference is ``gain``."""
    rng = np.random.default_rng(4)
    p = 0.3 / gain  # efficiency 1/gain: raw * gain is flat
    return write(
        tmp_path / "flat.eer", [(rng.random(gain.shape) < p).astype(np.uint8) for _ in range(n_raw)]
    )


def _gain_residual(tmp_path: Path, movie: Path, gain_file: Path, *flags: str) -> np.ndarray:
    out = tmp_path / f"sum{len(list(tmp_path.glob('sum*')))}.mrc"
    fm = tmp_path / "fm.txt"
    fm.write_text(fm_int_file_text(64, 8, 0.05))
    argv = ["-InEer", str(movie), "-OutMrc", str(out), "-FmIntFile", str(fm),
            "-Gain", str(gain_file), "-Iter", "2", "-Preview", "0", *flags]  # fmt: skip
    assert mc.main(argv) == 0
    assert out.stat().st_mode & 0o777 == 0o640  # the engine's output: not world-readable
    return mrcfile.read(out)


def _corrected_sum(movie: Path, gain_file: Path, **orientation: int) -> np.ndarray:
    params = mc.MotionCorParams(in_path=movie, out_mrc=movie.with_suffix(".mrc"), gain=gain_file,
                                **orientation)  # fmt: skip
    with open_movie(movie, fm_int=[E.FmIntEntry(64, 8, 0.05)]) as m:
        gain = mc.load_gain(params, m.shape[1:])
        return sum(m.frame(i) * gain for i in range(m.shape[0]))


def test_falcon_gain_applies_in_the_eers_orientation_and_rotated_with_rotgain(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("CRYOFLOW_FILE_MODE", "0640")
    ny, nx = 96, 128
    yy, xx = np.mgrid[0:ny, 0:nx]
    gain = (1.0 + 0.6 * (xx / nx) + 0.8 * ((yy < 30) & (xx < 40))).astype(np.float32)
    movie = _flat_field_movie(tmp_path, gain)
    stored = tmp_path / "20261202_094500_EER_GainReference.gain"  # EPU's float32 TIFF
    tifffile.imwrite(stored, gain, photometric="minisblack")

    def pattern_left(total: np.ndarray) -> float:
        """Correlation of the corrected sum with the detector's pattern (0 when removed)."""
        return float(np.corrcoef(total[4:-4, 4:-4].ravel(), (1 / gain)[4:-4, 4:-4].ravel())[0, 1])

    assert abs(pattern_left(_gain_residual(tmp_path, movie, stored))) < 0.1
    # Through the engine's own gain loader (no alignment in the way): the same gain stored
    # upside down is wrong as it is, right with -FlipGain 1; stored rotated, -RotGain 1 turns it
    # back (transform_gain's convention).
    flipped = tmp_path / "flipped.gain"
    tifffile.imwrite(flipped, gain[::-1], photometric="minisblack")
    rotated = tmp_path / "rotated.gain"
    tifffile.imwrite(rotated, np.ascontiguousarray(np.rot90(gain, 1)), photometric="minisblack")
    assert abs(pattern_left(_corrected_sum(movie, stored))) < 0.1
    assert pattern_left(_corrected_sum(movie, flipped)) > 0.3
    assert abs(pattern_left(_corrected_sum(movie, flipped, flip_gain=1))) < 0.1
    assert abs(pattern_left(_corrected_sum(movie, rotated, rot_gain=1))) < 0.1
    # -EerSampling 2: the detector-size gain is repeated onto the 8k grid.
    fine = _gain_residual(tmp_path, movie, stored, "-EerSampling", "2")
    assert fine.shape == (2 * ny, 2 * nx)
    assert abs(pattern_left(fine.reshape(ny, 2, nx, 2).sum(axis=(1, 3)))) < 0.1


def test_truncated_or_foreign_eer_is_refused_naming_the_file(tmp_path, capsys) -> None:
    frames = raw_frames(12, (64, 64), 0.2, seed=6)
    whole = write(tmp_path / "whole.eer", frames, numberOfFrames=12)
    cut = tmp_path / "cut_EER.eer"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    with pytest.raises(ImageReadError, match=r"cut_EER\.eer: .*(truncated|not a readable)"):
        open_movie(cut)
    assert check_complete(cut).verdict is Verdict.INCOMPLETE
    # Cut between pages: the IFD chain is whole, the metadata says how many there should be.
    short = write(tmp_path / "short.eer", frames[:5], numberOfFrames=12)
    with pytest.raises(ImageReadError, match=r"short\.eer: truncated EER file: 5 raw frames, .*12"):
        open_movie(short)
    fm = tmp_path / "fm.txt"
    fm.write_text(fm_int_file_text(12, 3, 0.1))
    rc = mc.main(["-InEer", str(cut), "-OutMrc", str(tmp_path / "o.mrc"), "-FmIntFile", str(fm)])
    assert rc == 2 and str(cut) in capsys.readouterr().err
    assert not list(tmp_path.glob("o*"))
    classic = tmp_path / "classic.eer"
    tifffile.imwrite(classic, np.stack(frames))
    with pytest.raises(ImageReadError, match=r"classic\.eer: named as EER but .*BigTIFF"):
        open_movie(classic)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give -FmIntFile"),
        (["-FmIntFile", "fm.txt", "-EerSampling", "4"], "-EerSampling must be 1, 2 or 3"),
    ],
)
def test_eer_flags_are_checked_before_reading(tmp_path, capsys, extra, message) -> None:
    argv = ["-InEer", str(tmp_path / "none.eer"), "-OutMrc", str(tmp_path / "o.mrc"), *extra]
    assert mc.main(argv) == 2
    assert message in capsys.readouterr().err
    tiff = ["-InTiff", str(tmp_path / "m.tiff"), "-OutMrc", str(tmp_path / "o.mrc")]
    assert mc.main([*tiff, "-FmIntFile", "fm.txt"]) == 2
    assert "EER input only" in capsys.readouterr().err


# --------------------------------------------------------------------------- the chain

APIX = 2.0
DIAM_A = 150.0


@pytest.fixture(scope="module")
def eer_session(tmp_path_factory) -> dict:
    """One EPU + Falcon EER movie from the simulator, aligned once by the engine."""
    root = tmp_path_factory.mktemp("eer_session")
    cfg = SimulatorConfig(
        layout="epu",
        out=root / "share",
        truth_dir=root / "truth",
        movies=1,
        frames=20,
        eer_group=8,  # 160 raw frames of 0.25 e/px
        size=(1024, 1024),
        pixel_size_A=APIX,
        dose_per_frame=0.5,
        format="eer",
        content="synthetic",
        particles=40,
        diameter_A=DIAM_A,
        contrast=2.0,
        drift_px=8.0,
        seed=7,
    )
    (movie,) = simulate_session(cfg)
    doc = json.loads(Path(movie.truth_path).read_text())
    fm = root / "fmint.txt"
    fm.write_text(doc["eer"]["fm_int_file"])
    gain = next(cfg.out.glob("*_EER_GainReference.gain"))
    aligned = root / "mc" / "mic.mrc"
    argv = ["-InEer", str(cfg.out / movie.relpath), "-OutMrc", str(aligned), "-FmIntFile", str(fm),
            "-Gain", str(gain), "-PixSize", str(APIX), "-FmDose", "0.5", "-kV", "300",
            "-LogDir", str(root / "logs")]  # fmt: skip
    assert mc.main(argv) == 0
    return {"root": root, "cfg": cfg, "movie": movie, "doc": doc, "aligned": aligned}


def test_eer_movie_through_motioncor2_recovers_the_true_drift(eer_session, capsys) -> None:
    doc, movie = eer_session["doc"], eer_session["movie"]
    assert movie.relpath.endswith("_EER.eer")
    assert doc["eer"] == {
        "raw_frames": 160,
        "group": 8,
        "dose_per_raw_frame_e_per_A2": 0.0625,
        "fm_int_file": "160 8 0.0625\n",
    }
    with tifffile.TiffFile(eer_session["cfg"].out / movie.relpath) as tif:
        assert tif.is_eer and len(tif.pages) == 160
    log = parse_shift_log(find_shift_log(eer_session["root"] / "logs", movie.relpath))
    assert log.path.name.endswith("_EER-Full.log") and log.n_frames == 20
    rms = mc.trajectory_rms_error(np.array(log.shifts_px), np.array(doc["truth"]["shifts_px"]))
    print(f"EER drift RMS error {rms:.3f} px")
    assert rms < 0.2
    with mrcfile.open(eer_session["aligned"]) as mrc:
        assert mrc.data.shape == (1024, 1024)
        assert float(mrc.voxel_size.x) == pytest.approx(APIX)
        # the sum keeps the exposure: 20 fractions of 2 e/px, gain-corrected
        assert float(mrc.data.mean()) == pytest.approx(40.0, rel=0.02)
    assert eer_session["aligned"].with_name("mic_DW.mrc").is_file()


def test_the_pipelines_motioncor2_command_runs_the_engine_on_eer(eer_session, tmp_path) -> None:
    """tools.motioncor2 builds the command (as processing.plan_motioncor does for EER), the
    engine runs it; the sum is the one aligned above."""
    cfg, movie = eer_session["cfg"], eer_session["movie"]
    n_raw = eer_session["doc"]["eer"]["raw_frames"]
    fm = tmp_path / "mic_fmint.txt"  # processing._eer_fractions_file's grouping and dose
    fm.write_text(fm_int_file_text(n_raw, n_raw // cfg.frames, 0.5 * cfg.frames / n_raw))
    params = MotionCor2Params(
        movie=cfg.out / movie.relpath,
        out_mrc=tmp_path / "mic.mrc",
        pixel_size_A=APIX,
        gain=next(cfg.out.glob("*.gain")),
        fm_dose_e_per_A2=0.5,
        fm_int_file=fm,
        log_dir=tmp_path / "logs",
    )
    cmd = build_command(params, "cryoflow-motioncor2")
    assert cmd[1] == "-InEer" and "-FmIntFile" in cmd
    assert mc.main(cmd[1:]) == 0
    assert np.allclose(mrcfile.read(params.out_mrc), mrcfile.read(eer_session["aligned"]))


def test_ctf_of_the_aligned_eer_sum_matches_the_truth(eer_session, capsys) -> None:
    truth = eer_session["doc"]["truth"]["ctf"]
    params = CtffindParams(
        input_path=eer_session["aligned"],
        diag_path=eer_session["root"] / "ctf" / "mic_ctf.mrc",
        pixel_size_A=APIX,
        max_res_A=5.0,
        min_defocus_A=3000.0,
        max_defocus_A=40000.0,
    )
    params.diag_path.parent.mkdir()
    assert ctffind.main([], stdin=io.StringIO(stdin_answers(params, "4"))) == 0
    est = parse_ctffind_txt(output_paths(params.diag_path).txt).single
    true_df = 0.5 * (truth["defocus1_A"] + truth["defocus2_A"])
    est_df = 0.5 * (est.defocus_1_A + est.defocus_2_A)
    print(
        f"EER defocus {est_df:.0f} A, truth {true_df:.0f} A ({100 * (est_df / true_df - 1):+.2f}%)"
    )
    assert abs(est_df / true_df - 1) < 0.005


def test_picks_on_the_aligned_eer_sum_match_the_true_particles(eer_session, capsys) -> None:
    specimen = eer_session["doc"]["truth"]["specimen"]
    star = eer_session["root"] / "picks.star"
    argv = ["-i", str(eer_session["aligned"]), "-o", str(eer_session["root"] / "picks.txt"),
            "--star", str(star), "--diam", str(DIAM_A), "--invert",
            # The default (6) takes the simulator's particles for contamination, TIFF or EER alike
            # (tests/engines/test_eer.py history; reported): a looser bar, same for both formats.
            "--max-thresh", "10"]  # fmt: skip
    assert dogpicker_main(argv) == 0
    import starfile

    picks = starfile.read(star)[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
    ny, nx = specimen["shape"]
    r = DIAM_A / 2 / APIX
    inside = np.array(
        [
            [p["x"], p["y"]]
            for p in specimen["particles"]
            if r <= p["x"] <= nx - r and r <= p["y"] <= ny - r
        ]
    )
    m = match_picks(picks, inside, 0.3 * DIAM_A / APIX)
    print(f"EER picks: {m.n_picks} picks, {m.n_matched} of {m.n_true} particles")
    assert 0.8 * len(inside) <= len(picks) <= 1.25 * len(inside)
    assert m.recall >= 0.8 and m.precision >= 0.8
