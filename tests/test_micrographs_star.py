"""The STAR files (here micrographs_ctf_all.star, every movie with a CTF; the accepted-only
micrographs_ctf.star is tested in test_curation.py): written whole once, then appended per
processing run, always readable."""

from __future__ import annotations

from pathlib import Path

import starfile

from cryoflow.ledger.store import Ledger, StageState
from cryoflow.processing.batch import write_micrographs_ctf_star
from cryoflow.session import SessionHandle, SessionParams

PARAMS = SessionParams(
    session_name="s", pixel_size_A=1.0, kv=300, cs_mm=2.7, dose_per_frame=1, frames=8,
    idle_timeout_minutes=1, max_hours=1,
)  # fmt: skip


def _done(ledger: Ledger, sid: int, root: Path, name: str, defocus: float) -> int:
    fid = ledger.begin_copy(sid, name, kind="movie", size=1, mtime_ns=1, batch="b").file_id
    ledger.mark_verified(fid, checksum="c", dest_path=str(root / "raw" / name), copy_seconds=0)
    aligned = str(root / "processed" / "motioncor" / f"{name}.mrc")
    ledger.record_stage(fid, "motioncor", StageState.DONE, results={"aligned": aligned})
    ctf = {"defocus1_A": defocus, "defocus2_A": defocus + 100, "astigmatism_A": 50.0,
           "astig_angle_deg": 10.0, "cc": 0.2, "fit_resolution_A": None,
           "diag": str(root / "processed" / "ctffind" / f"{name}_ctf.mrc")}  # fmt: skip
    ledger.record_stage(fid, "ctf", StageState.DONE, results=ctf)
    return fid


def test_rows_are_appended_once_and_the_file_stays_valid(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    root = tmp_path / "session"
    (root / "processed").mkdir(parents=True)
    sid = ledger.open_session("k", "s", dest_root=str(root), source_root="/s", params={})
    handle = SessionHandle(sid, "/s", str(root), None)
    first = [_done(ledger, sid, root, f"grid 1 $(x) m{i}.tif", 10000.0 + i) for i in range(2)]
    path = write_micrographs_ctf_star(ledger, handle, PARAMS, 0o640, first, accepted_only=False)
    assert path is not None and path.stat().st_mode & 0o777 == 0o640
    assert path.name == "micrographs_ctf_all.star"
    new = _done(ledger, sid, root, "grid 2 `y` m2.tif", 12345.5)
    write_micrographs_ctf_star(ledger, handle, PARAMS, 0o640, [new], accepted_only=False)
    write_micrographs_ctf_star(
        ledger, handle, PARAMS, 0o640, [new], accepted_only=False
    )  # again: no duplicate
    tables = starfile.read(path)
    rows = tables["micrographs"]
    assert list(rows["rlnDefocusU"]) == [10000.0, 10001.0, 12345.5]
    assert rows["rlnMicrographName"].iloc[2] == "processed/motioncor/grid 2 `y` m2.tif.mrc"
    assert list(rows["rlnCtfMaxResolution"]) == [999.0] * 3
    assert float(tables["optics"]["rlnVoltage"].iloc[0]) == 300.0
    assert path.stat().st_mode & 0o777 == 0o640
    # whole rewrite (no ids) gives the same table
    write_micrographs_ctf_star(ledger, handle, PARAMS, 0o640, accepted_only=False)
    assert list(starfile.read(path)["micrographs"]["rlnDefocusU"]) == [10000.0, 10001.0, 12345.5]
