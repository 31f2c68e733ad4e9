"""Faults on the copy path, each through the real pieces: the watch's own code (the trigger's
``_start``/``_poll``), the real copy, a real ledger and, for disk full and read-only, a real
filesystem that fills up or is remounted read-only.

In every case a user relies on the same outcome: nothing lost, nothing duplicated, no partial
file under a final name, and the session goes on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pytest
import tifffile

from cryoflow.config import load_site
from cryoflow.ingest.transfer import PARTIAL_SUFFIX, file_checksum
from cryoflow.ledger.store import FileState, Ledger
from cryoflow.operators.ingest_batch import watch_trigger
from cryoflow.session import (
    BatchReport,
    SessionParams,
    form_defaults,
    ingest_event,
    open_session,
    write_summary,
)

FRAMES = 8
MOVIE = "Images-Disc1/GridSquare_1/Data/FoilHole_1_Data_2_3_20240101_120000_fractions.tiff"


def _movie_rel(i: int, ext: str = "tiff") -> str:
    return (
        f"Images-Disc1/GridSquare_1/Data/FoilHole_{i}_Data_2_3_20240101_1200{i:02d}_fractions.{ext}"
    )


def _frames(n: int = FRAMES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, (n, 64, 64), dtype=np.uint8)


class Ingest:
    """One session of krios1 (EPU layout), driven batch by batch as the DAG's task does."""

    def __init__(self, name: str = "faults", **form: Any) -> None:
        site = load_site()
        self.facility = site.facility
        self.scope = site.microscopes["krios1"]
        values = {**form_defaults(self.scope), "session_name": name, "frames": FRAMES, **form}
        self.params = SessionParams.from_form(values)
        self.handle, _ = open_session(self.facility, self.scope, self.params)
        self.share = Path(self.handle.source_root)
        self.share.mkdir(parents=True, exist_ok=True)
        self.raw = Path(self.handle.dest_root) / "raw"
        self.ledger = Ledger(self.facility.storage.ledger_url)
        self.batches = 0

    def watch(self, timeout: float = 8.0) -> dict[str, Any] | None:
        """Poll like the deferred task until the watch has an event; None if none in time."""
        trigger = watch_trigger(self.facility, self.scope, self.params, self.handle)
        state = trigger._start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            outcome = trigger._poll(state)
            if outcome.status != "wait":
                return outcome.payload()
            time.sleep(trigger.poll_seconds)
        return None

    def batch(self, timeout: float = 8.0) -> tuple[dict[str, Any] | None, BatchReport | None]:
        event = self.watch(timeout)
        if event is None:
            return None, None
        self.batches += 1
        report = ingest_event(
            self.facility, self.scope, self.handle, event, f"b{self.batches}", self.params
        )
        return event, report

    def until_verified(self, rel: str, tries: int = 8) -> None:
        for _ in range(tries):
            self.batch()
            if self.state(rel) == FileState.VERIFIED:
                return
        raise AssertionError(f"{rel!r} never verified: {self.rows(rel)}")

    def rows(self, rel: str) -> list[Any]:
        return [f for f in self.ledger.files(self.handle.session_id) if f.relpath == rel]

    def state(self, rel: str) -> FileState | None:
        rows = self.rows(rel)
        return max(rows, key=lambda f: f.version).state if rows else None

    def owed_steps(self, rel: str) -> list[str]:
        ids = {f.id for f in self.rows(rel)}
        return [s.stage for s in self.ledger.stages(list(ids))] if ids else []

    def assert_clean(self) -> None:
        """No partial under any name, and every final file equals a verified ledger row."""
        assert not list(self.raw.rglob(f"*{PARTIAL_SUFFIX}")) if self.raw.exists() else True
        verified = {
            f.dest_path: f.checksum
            for f in self.ledger.files(self.handle.session_id, FileState.VERIFIED)
        }
        on_disk = [p for p in self.raw.rglob("*") if p.is_file()] if self.raw.exists() else []
        assert sorted(map(str, on_disk)) == sorted(verified)
        for path in on_disk:
            assert file_checksum(path) == verified[str(path)], path


@pytest.fixture
def ingest(site_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Ingest:
    monkeypatch.setenv("CRYOFLOW_RETRY_SECONDS", "0.2")
    monkeypatch.setenv("CRYOFLOW_INCOMPLETE_AFTER_SECONDS", "3")
    return Ingest()


def _write_tiff(path: Path, frames: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, frames, compression="lzw")


# ------------------------------------------------------------------ completeness


def test_writer_pausing_at_a_page_boundary_is_not_copied_until_whole(ingest: Ingest) -> None:
    path = ingest.share / MOVIE
    path.parent.mkdir(parents=True)
    frames = _frames()
    with tifffile.TiffWriter(path) as tif:
        for i, frame in enumerate(frames):
            tif.write(frame, contiguous=False)
            tif.filehandle.flush()
            if i == FRAMES // 2:
                event, _ = ingest.batch(timeout=3.0)  # three settle times of silence
                assert event is None, event
                assert ingest.state(MOVIE) is None
    ingest.until_verified(MOVIE)
    copied = ingest.raw / MOVIE
    with tifffile.TiffFile(copied) as tif:
        assert len(tif.pages) == FRAMES
    assert ingest.owed_steps(MOVIE) == ["motioncor"]
    ingest.assert_clean()


def test_writer_pausing_mid_page_is_not_copied_until_whole(ingest: Ingest, tmp_path) -> None:
    whole = tmp_path / "whole.tiff"
    tifffile.imwrite(whole, _frames())
    data = whole.read_bytes()
    path = ingest.share / MOVIE
    path.parent.mkdir(parents=True)
    cut = len(data) - 64 * 64 // 2  # in the middle of the last frame's pixels
    path.write_bytes(data[:cut])
    assert ingest.batch(timeout=3.0) == (None, None)
    with path.open("ab") as fh:
        fh.write(data[cut:])
    ingest.until_verified(MOVIE)
    assert (ingest.raw / MOVIE).read_bytes() == data
    ingest.assert_clean()


def test_truncated_mrc_and_tiff_abandoned_by_their_writer_are_reported_not_processed(
    ingest: Ingest, tmp_path, caplog
) -> None:
    good = _movie_rel(2)
    _write_tiff(ingest.share / good, _frames())
    tiff = ingest.share / MOVIE
    whole = tmp_path / "w.tiff"
    tifffile.imwrite(whole, _frames())
    tiff.write_bytes(whole.read_bytes()[:-500])
    mrc_rel = _movie_rel(3, "mrc")
    mrc = ingest.share / mrc_rel
    with mrcfile.new(tmp_path / "w.mrc") as m:
        m.set_data(_frames().astype(np.float32))
    mrc.write_bytes((tmp_path / "w.mrc").read_bytes()[: 1024 + 3 * 64 * 64 * 4])
    caplog.set_level(logging.ERROR)
    for _ in range(6):
        ingest.batch()
        if all(ingest.state(r) for r in (good, MOVIE, mrc_rel)):
            break
    assert ingest.state(good) == FileState.VERIFIED
    for rel in (MOVIE, mrc_rel):
        assert ingest.state(rel) == FileState.INCOMPLETE, ingest.rows(rel)
        assert ingest.owed_steps(rel) == []  # never handed to processing
        assert not (ingest.raw / rel).exists()
        assert any("INCOMPLETE" in r.getMessage() and rel in r.getMessage() for r in caplog.records)
    summary = write_summary(ingest.facility, ingest.handle.session_id, max_attempts=3)
    assert {e["relpath"] for e in summary["not_copied"]} == {MOVIE, mrc_rel}
    # reported once, not again and again
    assert ingest.batch(timeout=2.0) == (None, None)
    # the writer comes back (or the file is rewritten whole): it is copied after all
    shutil.copyfile(whole, tiff)
    ingest.until_verified(MOVIE)
    ingest.assert_clean()


# ------------------------------------------------------------------ faults at the destination


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs as the GPFS root: it fills up and can be remounted read-only."""
    mnt = tmp_path / "smallfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)


@pytest.fixture
def ingest_small(site_env, monkeypatch, small_fs) -> Ingest:
    monkeypatch.setenv("CRYOFLOW_GPFS_ROOT", str(small_fs))
    monkeypatch.setenv("CRYOFLOW_RETRY_SECONDS", "0.2")
    return Ingest()


def _big_movie(path: Path, mib: float, seed: int = 1) -> None:
    side = 512
    n = max(1, int(mib * (1 << 20) / side / side))
    frames = np.random.default_rng(seed).integers(0, 255, (n, side, side), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, frames)


def test_disk_full_then_freed(ingest_small: Ingest, small_fs: Path) -> None:
    ing = ingest_small
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (3 << 20))
    _big_movie(ing.share / MOVIE, 1.5)
    ing.params = SessionParams.from_form({**ing.params.model_dump(), "frames": 6})
    event, report = ing.batch()
    assert report is not None and [f["relpath"] for f in report.failed] == [MOVIE]
    assert (
        "ENOSPC" in report.failed[0]["error"]
        and str(ing.share / MOVIE) in report.failed[0]["error"]
    )
    (row,) = ing.rows(MOVIE)
    assert row.state == FileState.FAILED and row.transient
    ing.assert_clean()
    for _ in range(4):  # the fault lasts: tried again and again, never given up
        ing.batch(timeout=3.0)
    assert ing.state(MOVIE) == FileState.FAILED
    filler.unlink()
    ing.until_verified(MOVIE)
    ing.assert_clean()


def test_destination_read_only_then_writable(ingest_small: Ingest, small_fs: Path) -> None:
    ing = ingest_small
    _write_tiff(ing.share / MOVIE, _frames())
    subprocess.run(["mount", "-o", "remount,ro", small_fs], check=True)
    try:
        _, report = ing.batch()
        assert report is not None and "EROFS" in report.failed[0]["error"]
        for _ in range(ing.facility.transfer.max_attempts):  # longer than any retry budget
            ing.batch(timeout=3.0)
        assert ing.state(MOVIE) == FileState.FAILED
    finally:
        subprocess.run(["mount", "-o", "remount,rw", small_fs], check=True)
    ing.until_verified(MOVIE)
    ing.assert_clean()


# ------------------------------------------------------------------ faults at the source


def test_source_vanishing_before_its_copy(ingest: Ingest) -> None:
    path = ingest.share / MOVIE
    _write_tiff(path, _frames())
    event = ingest.watch()
    assert event is not None and event["files"]
    kept = path.with_name("elsewhere.bin")
    path.rename(kept)
    report = ingest_event(
        ingest.facility, ingest.scope, ingest.handle, event, "b-vanish", ingest.params
    )
    assert "ENOENT" in report.failed[0]["error"]
    ingest.assert_clean()
    summary = write_summary(ingest.facility, ingest.handle.session_id, max_attempts=3)
    assert summary["not_copied"][0]["relpath"] == MOVIE
    assert summary["not_copied"][0]["transient"] is True
    kept.rename(path)  # it comes back: it arrives
    ingest.until_verified(MOVIE)
    ingest.assert_clean()


def test_a_batch_of_many_small_files_is_verified_chunk_by_chunk(ingest: Ingest) -> None:
    """Small files are written, flushed and read back in chunks (the next chunk is written
    while one is verified): every one of them reaches its final name verified and tagged,
    and one that vanished in a middle chunk stays owed without costing its neighbours."""
    from cryoflow.session import SMALL_CHUNK

    count = 2 * SMALL_CHUNK + 22  # three chunks
    rels = []
    for i in range(count):
        rels.append(f"Images-Disc1/GridSquare_2/Data/FoilHole_{i}_Data_2_3_20240101_120000.xml")
        path = ingest.share / rels[-1]
        path.parent.mkdir(parents=True, exist_ok=True)
        body = os.urandom(4_000 + 97 * i).hex()  # EPU XML of a few to some tens of kB
        path.write_text(f"<MicroscopeImage><n>{i}</n><b>{body}</b></MicroscopeImage>")
    event = ingest.watch()
    assert event is not None and len(event["files"]) == count
    gone = rels[SMALL_CHUNK + 5]
    kept = ingest.share / (gone + ".away")
    (ingest.share / gone).rename(kept)
    report = ingest_event(
        ingest.facility, ingest.scope, ingest.handle, event, "b-many", ingest.params
    )
    assert [f["relpath"] for f in report.failed] == [gone]
    assert len(report.copied) == count - 1
    ingest.assert_clean()
    for rel in rels:
        if rel != gone:
            assert ingest.state(rel) == FileState.VERIFIED, rel
            assert os.getxattr(ingest.raw / rel, "user.cryoflow.checksum").startswith(b"xxh3")
    kept.rename(ingest.share / gone)
    ingest.until_verified(gone)
    ingest.assert_clean()


def test_file_replaced_after_verification_is_copied_beside_the_first(
    ingest: Ingest, caplog
) -> None:
    path = ingest.share / MOVIE
    _write_tiff(path, _frames(seed=1))
    ingest.until_verified(MOVIE)
    first = (ingest.raw / MOVIE).read_bytes()
    time.sleep(0.01)
    _write_tiff(path, _frames(seed=2))
    caplog.set_level(logging.WARNING)
    for _ in range(6):
        ingest.batch()
        if len(ingest.rows(MOVIE)) == 2 and ingest.state(MOVIE) == FileState.VERIFIED:
            break
    v1, v2 = sorted(ingest.rows(MOVIE), key=lambda f: f.version)
    assert (v1.state, v2.state, v2.version) == (FileState.VERIFIED, FileState.VERIFIED, 2)
    assert (ingest.raw / MOVIE).read_bytes() == first  # never overwritten
    assert Path(v2.dest_path).name.endswith("_fractions.v2.tiff")
    assert Path(v2.dest_path).read_bytes() == path.read_bytes()
    assert any(
        "changed on the share after it was verified" in r.getMessage() for r in caplog.records
    )
    ingest.assert_clean()


# ------------------------------------------------------------------ the scan


def test_symlink_loops_do_not_stop_the_scan(ingest: Ingest) -> None:
    _write_tiff(ingest.share / MOVIE, _frames())
    (ingest.share / "self").symlink_to("self")
    loop_dir = ingest.share / "Images-Disc1" / "loop"
    loop_dir.mkdir(parents=True)
    (loop_dir / "up").symlink_to("..")
    (ingest.share / "a").symlink_to("b")
    (ingest.share / "b").symlink_to("a")
    ingest.until_verified(MOVIE)
    ingest.assert_clean()


def test_unreadable_folder_is_skipped_with_a_warning(ingest: Ingest) -> None:
    """As a non-root user (root reads everything), through the real scan."""
    _write_tiff(ingest.share / MOVIE, _frames())
    locked = ingest.share / "Images-Disc1" / "locked"
    locked.mkdir()
    (locked / "secret.tiff").write_bytes(b"x")
    locked.chmod(0o000)
    for folder in [ingest.share, *ingest.share.parents]:
        folder.chmod(folder.stat().st_mode | 0o005)
    code = (
        "import json, sys; from pathlib import Path;"
        "from cryoflow.ingest.share.scan import scan_tree;"
        "r = scan_tree(Path(sys.argv[1])); print(json.dumps([sorted(r.files), r.errors]))"
    )
    plugins = Path(__file__).resolve().parents[1] / "plugins"
    for parent in [plugins, *plugins.parents, Path(sys.executable).parent]:
        parent.chmod(parent.stat().st_mode | 0o005)
    out = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
         code, str(ingest.share)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(plugins)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    files, errors = json.loads(out.stdout.splitlines()[-1])
    assert files == [MOVIE], out
    assert errors == ["Images-Disc1/locked: Permission denied"], out


# ------------------------------------------------------------------ names


def test_any_name_the_microscope_can_write_is_copied(ingest: Ingest, caplog) -> None:
    folder = "Images-Disc1/GridSquare_1/Data/"
    names = {
        "long": folder + "L" * 245 + ".tiff",  # a 250-byte name (the folder is separate)
        "not_utf8": folder + os.fsdecode(b"Foil\xff\xfeHole.tiff"),
        "newline": folder + "two\nlines.tiff",
    }
    assert len(os.fsencode(names["long"].rsplit("/", 1)[1])) == 250
    for i, rel in enumerate(names.values()):
        _write_tiff(ingest.share / rel, _frames(seed=i))
    longest = folder + "M" * 250 + ".tiff"  # 255 bytes: the most a name can be
    _write_tiff(ingest.share / longest, _frames(seed=9))
    caplog.set_level(logging.INFO)
    for _ in range(4):
        ingest.batch()
        if all(ingest.state(r) == FileState.VERIFIED for r in [*names.values(), longest]):
            break
    for rel in [*names.values(), longest]:
        assert ingest.state(rel) == FileState.VERIFIED, rel
        assert (ingest.raw / rel).read_bytes() == (ingest.share / rel).read_bytes()
    raw_names = {os.fsencode(p.name) for p in (ingest.raw / folder).iterdir()}
    assert b"Foil\xff\xfeHole.tiff" in raw_names  # byte for byte
    assert not any("\n" in r.getMessage() for r in caplog.records)
    assert any("two\\nlines.tiff" in r.getMessage() for r in caplog.records)
    ingest.assert_clean()


@pytest.mark.slow
def test_odd_names_through_airflow(airflow_db, site_env) -> None:
    """The same names through the DAG itself: the trigger event and XCom carry them too."""
    from tests.airflow_helpers import load_dag, run_session

    folder = "Images-Disc1/GridSquare_1/Data/"
    share = site_env["share"] / "krios1" / "odd_names"
    rels = [
        folder + os.fsdecode(b"Foil\xe9Hole_1_Data_2_3_20240101_120000_fractions.tiff"),
        folder + "FoilHole_2_Data_2_3_20240101_120001\n_fractions.tiff",
        folder + "F" * 250 + ".tiff",
    ]
    for i, rel in enumerate(rels):
        _write_tiff(share / rel, _frames(seed=i))
    conf = {
        "session_name": "odd_names",
        "idle_timeout_minutes": 0.05,
        "motioncor": False,
        "frames": FRAMES,
    }
    runs = run_session(load_dag("session_krios1"), conf)
    ledger = Ledger(os.environ["CRYOFLOW_LEDGER_URL"])
    (session,) = [s for s in [ledger.find_session("krios1", "odd_names")] if s]
    rows = {f.relpath: f for f in ledger.files(session.id)}
    assert set(rows) == set(rels)
    for rel in rels:
        assert rows[rel].state == FileState.VERIFIED
        assert Path(rows[rel].dest_path).read_bytes() == (share / rel).read_bytes()
    copied = [c["relpath"] for r in runs.runs for c in runs.batch(r).get("copied", [])]
    assert len(copied) == 3  # XCom holds them (in the ledger's text form)


def test_form_expecting_more_frames_delays_only_the_first_movie(
    site_env, monkeypatch, caplog
) -> None:
    """The form says 40 frames, the detector writes 8: the first whole movie goes after
    ``short_after_seconds`` with a warning, the next ones at once (nothing stalls for good)."""
    monkeypatch.setenv("CRYOFLOW_SHORT_AFTER_SECONDS", "2")
    ingest = Ingest("short", frames=40, idle_timeout_minutes=0.01)  # idle 0.6 s: must wait
    _write_tiff(ingest.share / MOVIE, _frames())
    caplog.set_level(logging.WARNING)
    event, report = ingest.batch()
    assert event["status"] == "ready" and [c["relpath"] for c in report.copied] == [MOVIE]
    assert any("8 of 40 frames" in r.getMessage() for r in caplog.records)
    second = _movie_rel(5)
    _write_tiff(ingest.share / second, _frames(seed=5))
    started = time.monotonic()
    event, report = ingest.batch()
    assert [c["relpath"] for c in report.copied] == [second]
    assert time.monotonic() - started < 2.0  # learned: 8 frames is this session's movie
