"""The microscope simulator writes sessions the pipeline's own layout and metadata code accept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile
from pydantic import ValidationError

from cryoflow.ingest.share.completeness import check_complete
from cryoflow.ingest.share.layout import FileKind, Layout, MovieFormat, classify, metadata_for_movie
from cryoflow.ingest.share.metadata import read_epu_xml, read_mdoc, read_mdoc_sections
from cryoflow.processing.engines.eer import read_fm_int_file
from cryoflow.processing.engines.imageio import open_movie
from cryoflow.simulator import Content, SimulatorConfig, main, simulate_session

ROOT = Path(__file__).resolve().parents[1]


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _config(tmp_path: Path, **kw) -> SimulatorConfig:
    base = dict(
        out=tmp_path / "share" / "session [1] ü $(x) 'q'",  # odd names are ordinary data
        truth_dir=tmp_path / "truth",
        movies=3,
        frames=4,
        size=(96, 128),
        pixel_size_A=1.3,
        defocus_range_um=(1.0, 2.0),
        seed=3,
    )
    base.update(kw)
    return SimulatorConfig(**base)


def test_epu_session_layout_metadata_and_truth(tmp_path: Path) -> None:
    cfg = _config(tmp_path, layout=Layout.EPU, movies=5, holes_per_square=2)
    movies = simulate_session(cfg)
    assert [m.index for m in movies] == [0, 1, 2, 3, 4]

    kinds: dict[FileKind, list[str]] = {}
    for rel in _files(cfg.out):
        kinds.setdefault(classify(rel, Layout.EPU), []).append(rel)
    assert FileKind.OTHER not in kinds, kinds.get(FileKind.OTHER)
    assert sorted(kinds[FileKind.MOVIE]) == sorted(m.relpath for m in movies)
    assert sorted(kinds[FileKind.MOVIE_METADATA]) == sorted(m.metadata_relpath for m in movies)
    assert len(kinds[FileKind.GAIN_REFERENCE]) == 1
    assert "EpuSession.dm" in kinds[FileKind.OTHER_METADATA]
    assert len({Path(m.relpath).parent.parent for m in movies}) == 3  # 2 holes per square

    for m in movies:
        assert metadata_for_movie(m.relpath, Layout.EPU) == [m.metadata_relpath]
        frames = tifffile.imread(cfg.out / m.relpath)
        assert frames.shape == (4, 96, 128) == m.shape
        md = read_epu_xml(cfg.out / m.metadata_relpath)
        assert md.pixel_size_A == pytest.approx(1.3)
        assert md.voltage_kV == pytest.approx(300.0)
        assert md.n_frames == 4
        assert md.total_dose_e_per_A2 == pytest.approx(4 * cfg.dose_per_frame)
        assert md.target_defocus_A == pytest.approx(m.target_defocus_A)
        assert 10000.0 <= md.target_defocus_A <= 20000.0
        assert md.gain_reference == kinds[FileKind.GAIN_REFERENCE][0]
        truth = json.loads(Path(m.truth_path).read_text())
        assert truth["movie"] == m.relpath
        assert truth["truth"]["n_frames"] == 4

    gain = tifffile.imread(cfg.out / kinds[FileKind.GAIN_REFERENCE][0])
    assert gain.shape == (96, 128) and gain.dtype == np.float32
    # The truth lives outside the share, with an index of the whole session.
    assert not any(p.endswith(".json") for p in _files(tmp_path / "share"))
    index = json.loads((cfg.truth_dir / "session.json").read_text())
    assert [m["relpath"] for m in index["movies"]] == [m.relpath for m in movies]


def test_epu_falcon_eer_session_holds_the_tiff_fractions_as_raw_frames(tmp_path: Path) -> None:
    common = dict(layout=Layout.EPU, movies=2, content=Content.SYNTHETIC, particles=2,
                  diameter_A=40.0, eer_group=8)  # fmt: skip
    eer_cfg = _config(tmp_path / "eer", format=MovieFormat.EER, **common)
    tiff_cfg = _config(tmp_path / "tiff", format=MovieFormat.TIFF, **common)
    eer_movies, tiff_movies = simulate_session(eer_cfg), simulate_session(tiff_cfg)
    kinds = {rel: classify(rel, Layout.EPU) for rel in _files(eer_cfg.out)}
    assert FileKind.OTHER not in kinds.values(), kinds
    assert sorted(r for r, k in kinds.items() if k is FileKind.MOVIE) == sorted(
        m.relpath for m in eer_movies
    )
    for em, tm in zip(eer_movies, tiff_movies, strict=True):
        assert em.relpath.endswith("_EER.eer") and em.shape == (4, 96, 128)
        assert metadata_for_movie(em.relpath, Layout.EPU) == [em.metadata_relpath]
        assert read_epu_xml(eer_cfg.out / em.metadata_relpath).n_frames == 4
        path = eer_cfg.out / em.relpath
        with tifffile.TiffFile(path) as tif:
            assert tif.is_bigtiff and tif.is_eer and len(tif.pages) == 32  # 4 fractions x 8
            assert tif.pages[0].compression == 65001
            assert tif.eer_metadata["numberOfFrames"] == 32
            raw = tif.asarray()
        assert raw.max() == 1  # one electron per pixel and raw frame at most
        assert check_complete(path).frames == 32
        doc = json.loads(Path(em.truth_path).read_text())
        assert doc["eer"]["fm_int_file"] == "32 8 0.125\n"
        assert doc["truth"] == json.loads(Path(tm.truth_path).read_text())["truth"]
        fm = tmp_path / "fm.txt"
        fm.write_text(doc["eer"]["fm_int_file"])
        # Grouped as the truth's -FmIntFile says, the raw frames are the TIFF's fractions (less
        # what no counting detector records: more electrons in a pixel than raw frames).
        tiff = tifffile.imread(tiff_cfg.out / tm.relpath)
        assert np.mean(tiff > 8) < 1e-3
        tiff = np.minimum(tiff, 8)
        with open_movie(path, fm_int=read_fm_int_file(fm)) as movie:
            assert movie.shape == tiff.shape
            for i in range(4):
                assert np.array_equal(movie.frame(i), tiff[i])
        assert np.array_equal(raw.reshape(4, 8, 96, 128).sum(axis=1), tiff)


def test_serialem_mrc_session(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path, layout=Layout.SERIALEM, format=MovieFormat.MRC, session_name="grid [2] 粒子 $x"
    )
    movies = simulate_session(cfg)
    files = _files(cfg.out)
    kinds = {rel: classify(rel, Layout.SERIALEM) for rel in files}
    assert sorted(r for r, k in kinds.items() if k is FileKind.MOVIE) == [m.relpath for m in movies]
    gains = [r for r, k in kinds.items() if k is FileKind.GAIN_REFERENCE]
    assert len(gains) == 1 and gains[0].startswith("CountRef_")
    for m in movies:
        assert m.metadata_relpath == m.relpath + ".mdoc"
        assert kinds[m.metadata_relpath] is FileKind.MOVIE_METADATA
        with mrcfile.open(cfg.out / m.relpath, permissive=False) as mrc:
            assert mrc.data.shape == (4, 96, 128)
            assert mrc.voxel_size.x == pytest.approx(1.3)
        md = read_mdoc(cfg.out / m.metadata_relpath)
        assert md.movie_file == Path(m.relpath).name
        assert md.n_frames == 4
        assert md.pixel_size_A == pytest.approx(1.3)
        assert md.dose_per_frame_e_per_A2 == pytest.approx(cfg.dose_per_frame)
        assert md.target_defocus_A == pytest.approx(m.target_defocus_A)
        assert md.gain_reference == gains[0]
    # SerialEM's summed stack grew by one section per movie, its mdoc lists them all.
    with mrcfile.open(cfg.out / "grid [2] 粒子 $x.mrc", permissive=False) as stack:
        assert stack.data.shape == (3, 96, 128)
    sections = read_mdoc_sections(cfg.out / "grid [2] 粒子 $x.mrc.mdoc")
    assert [s.movie_file for s in sections] == [Path(m.relpath).name for m in movies]


def test_synthetic_content_truth(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        layout=Layout.EPU,
        movies=1,
        size=(128, 128),
        content=Content.SYNTHETIC,
        particles=3,
        diameter_A=60.0,
        drift_px=4.0,
    )
    (movie,) = simulate_session(cfg)
    truth = json.loads(Path(movie.truth_path).read_text())
    ctf = truth["truth"]["ctf"]
    mean = (ctf["defocus1_A"] + ctf["defocus2_A"]) / 2
    assert mean == pytest.approx(movie.defocus_A)
    assert abs(mean - movie.target_defocus_A) <= 500.0  # near the stated target
    assert len(truth["truth"]["specimen"]["particles"]) == 3
    shifts = np.asarray(truth["truth"]["shifts_px"])
    steps = np.linalg.norm(np.diff(shifts, axis=0), axis=1)
    assert steps.sum() == pytest.approx(4.0)
    assert tifffile.imread(cfg.out / movie.relpath).shape == (4, 128, 128)


def test_noise_frames_are_poisson_counts_that_the_gain_reference_flattens(
    tmp_path: Path,
) -> None:
    cfg = _config(
        tmp_path, layout=Layout.EPU, movies=1, frames=16, size=(128, 128), pixel_size_A=2.0
    )  # 4 e/px/frame
    (movie,) = simulate_session(cfg)
    frames = tifffile.imread(cfg.out / movie.relpath).astype(np.float64)
    gain = tifffile.imread(next(cfg.out.glob("*.gain")))
    assert gain.std() > 0.05  # a visible fixed pattern...
    corrected = frames * gain
    assert corrected.mean() == pytest.approx(4.0, rel=0.01)  # ...that the reference removes
    per_pixel = corrected.mean(axis=0)
    low, high = per_pixel[gain < np.median(gain)], per_pixel[gain >= np.median(gain)]
    assert low.mean() == pytest.approx(high.mean(), rel=0.02)
    levels, counts = np.unique(gain, return_counts=True)
    level = levels[counts.argmax()]
    raw = frames[:, gain == level]  # the pixels of one gain level
    assert raw.size > 1000
    assert raw.mean() == pytest.approx(4.0 / level, rel=0.05)
    assert raw.var() == pytest.approx(raw.mean(), rel=0.1)  # Poisson: variance = mean


def test_same_seed_same_movies(tmp_path: Path) -> None:
    def first_movie(sub: str, seed: int) -> np.ndarray:
        cfg = _config(tmp_path / sub, layout=Layout.SERIALEM, movies=1, seed=seed)
        (movie,) = simulate_session(cfg)
        return tifffile.imread(cfg.out / movie.relpath)

    a, b, c = first_movie("a", 3), first_movie("b", 3), first_movie("c", 4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("fmt", [MovieFormat.TIFF, MovieFormat.MRC, MovieFormat.EER])
def test_movie_is_visible_while_being_written(tmp_path: Path, fmt: MovieFormat) -> None:
    cfg = _config(
        tmp_path, layout=Layout.EPU, movies=1, frames=8, write_seconds=1.6, format=fmt, eer_group=8
    )
    pages_per_frame = 8 if fmt is MovieFormat.EER else 1
    result: list = []
    thread = threading.Thread(target=lambda: result.extend(simulate_session(cfg)))
    thread.start()
    partial = None
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        movies = list((cfg.out).rglob("*_Fractions.*")) + list(cfg.out.rglob("*_EER.eer"))
        if movies and not list(movies[0].parent.glob("*.xml")):
            size = movies[0].stat().st_size
            if size > 0:
                partial = (movies[0], size)
                if fmt is not MovieFormat.MRC:
                    with tifffile.TiffFile(movies[0]) as tif:
                        pages = len(tif.pages)
                    if 0 < pages < 8 * pages_per_frame:
                        break
                else:
                    with pytest.raises(ValueError):  # header promises more than is there
                        mrcfile.open(movies[0], permissive=False).close()
                    break
        time.sleep(0.05)
    thread.join()
    assert partial is not None, "never saw the movie before its metadata"
    path, size = partial
    (movie,) = result
    assert path == cfg.out / movie.relpath  # written in place, under its final name
    assert size < path.stat().st_size
    assert (cfg.out / movie.metadata_relpath).exists()


def test_config_refuses_truth_inside_the_share_and_eer_beyond_counting(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="must not be inside the share"):
        SimulatorConfig(layout="epu", out=tmp_path, truth_dir=tmp_path / "truth")
    # 1 e/A^2 at 2 A/px is 4 e/px per fraction: 16 raw frames (0.25 e/px) do, 8 do not.
    SimulatorConfig(layout="epu", out=tmp_path / "s", format="eer", pixel_size_A=2.0)
    with pytest.raises(ValidationError, match="e/px per raw frame"):
        SimulatorConfig(
            layout="epu", out=tmp_path / "s", format="eer", pixel_size_A=2.0, eer_group=8
        )


def test_cli_writes_eer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    share = tmp_path / "s"
    argv = ["--out", str(share), "--format", "eer", "--eer-group", "4", "--frames", "2",
            "--movies", "1", "--size", "32x48"]  # fmt: skip
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    with tifffile.TiffFile(share / first["relpath"]) as tif:
        assert tif.is_eer and len(tif.pages) == 8 and tif.pages[0].shape == (32, 48)


def test_cli_rejects_bad_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "s"), "--size", "4096"])
    assert exc.value.code == 2
    assert "NYxNX" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "s"), "--size", "8x8"]) == 2
    assert "too small" in capsys.readouterr().err


def test_background_process_reports_each_movie_and_stops_on_sigterm(tmp_path: Path) -> None:
    share, truth = tmp_path / "share", tmp_path / "truth"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    cmd = [
        sys.executable, "-m", "cryoflow.simulator", "--layout", "serialem", "--out", str(share),
        "--truth-dir", str(truth), "--movies", "100", "--interval", "0.3", "--write-seconds",
        "0.2", "--frames", "3", "--size", "64x64",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = json.loads(proc.stdout.readline())  # arrives while the process still runs
        assert first["event"] == "movie" and first["index"] == 0
        assert (share / first["relpath"]).is_file()
        assert Path(first["truth_path"]).is_file()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    *rest, last = [json.loads(line) for line in out.splitlines()]
    assert [m["event"] for m in rest] == ["movie"] * len(rest)
    assert last["event"] == "stopped"
    assert last["movies"] == 1 + len(rest) < 100  # the first line was read above
    assert "Traceback" not in err
