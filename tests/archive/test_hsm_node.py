"""The HSM command step when a session closes: over a real SSH connection (the sshd of
scripts/services.sh) to an "HSM node" whose ``dsmmigrate`` and ``dsmls`` are small stand-ins
(IBM's client needs a Storage Protect server and GPFS): they keep each file's state in a file
and print ``dsmls``'s documented listing. What is checked is ours: every verified file of the
session is asked for in quoted command lines (a file name with ``$(...)`` and backticks runs
nothing), the answer is parsed into the session summary, and a node that cannot be reached
leaves the session closed with the failure recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryoflow.session import close_session
from tests.archive.test_cleanup import CLEAN, OTHER, Session

pytestmark = pytest.mark.services

HOSTILE = "Metadata/notes $(touch hsm_pwned) `touch hsm_pwned2`.txt"
KEPT_ON_DISK = {  # config/gpfs/hsm-migrate.pol: 'keep-previews-and-metadata'
    "EpuSession.dm": b"<EpuSessionXml/>",
    "Images-Disc1/GridSquare_1/GridSquare_20240101_120000.xml": b"<MicroscopeImage/>",
}

# dsmmigrate [-premigrate] PATH...: records each path's new state; dsmls PATH...: the listing
# (banner, two header lines, one line per file: actual size, resident size, resident KB, state,
# name). Names come in as arguments and are only ever used quoted.
DSMMIGRATE = r"""#!/bin/bash
state=p
if [[ $1 == -premigrate ]]; then shift; else state=m; fi
for p in "$@"; do printf '%s\t%s\n' "$state" "$p" >> "$HSM_STATE"; done
echo "ANS9101I Migrated $# files."
"""
DSMLS = r"""#!/bin/bash
echo "IBM Spectrum Protect"
echo "Command Line Space Management Client Interface"
echo
echo "      Actual     Resident     Resident  File   File"
echo "        Size         Size     Blk (KB)  State  Name"
for p in "$@"; do
  s=$(awk -F'\t' -v p="$p" '$2 == p {s = $1} END {print s}' "$HSM_STATE" 2>/dev/null)
  printf '%12d %12d %12d   %s      %s\n' 1024 1024 1 "${s:-r}" "$p"
done
"""


@pytest.fixture
def hsm_node(slurm_services) -> Iterator[dict[str, str]]:
    """The stand-in client in a folder the SSH user can run it from; its state file."""
    base = Path("/srv/cryoflow-tests") / f"hsm-{uuid.uuid4().hex[:10]}"
    (base / "bin").mkdir(parents=True)
    for d in (base.parent, base, base / "bin"):
        d.chmod(0o755)
    state = base / "state.tsv"
    state.touch()
    shutil.chown(state, user="cryo")
    for name, text in (("dsmmigrate", DSMMIGRATE), ("dsmls", DSMLS)):
        (base / "bin" / name).write_text(text)
        (base / "bin" / name).chmod(0o755)
    yield {"bin": str(base / "bin"), "state": str(state), "conn_id": slurm_services.conn_id}
    shutil.rmtree(base, ignore_errors=True)


def _with_hsm(session: Session, mode: str, conn_id: str, node: dict[str, str]) -> None:
    archive = session.facility.archive.model_copy(
        update={
            "hsm_mode": mode,
            "hsm_ssh_conn_id": conn_id,
            "hsm_command_prefix": ("env", f"HSM_STATE={node['state']}"),
            "hsm_migrate_command": (f"{node['bin']}/dsmmigrate",),
            "hsm_ls_command": (f"{node['bin']}/dsmls",),
        }
    )
    session.facility = session.facility.model_copy(update={"archive": archive})


def test_closing_a_session_premigrates_its_files_and_records_dsmls(
    site_env: dict[str, Path], hsm_node: dict[str, str], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = Session("hsm_premigrate")
    # the notes too (every raw file the shipped policy migrates), but not the metadata and
    # previews that policy keeps on disk: a stub of those would need a recall to be read
    s.copy(CLEAN, OTHER, HOSTILE, notes=KEPT_ON_DISK)
    _with_hsm(s, "premigrate", hsm_node["conn_id"], hsm_node)
    everything = [f for f in s.ledger.files(s.handle.session_id) if f.state == "verified"]
    verified = [f for f in everything if f.relpath not in KEPT_ON_DISK]
    assert HOSTILE in {f.relpath for f in verified} and len(everything) == len(verified) + 2

    summary = close_session(s.facility, s.handle, "ended for the test", max_attempts=3)

    hsm = summary["archive"]["hsm"]
    assert hsm["ok"] is True, hsm
    assert hsm["mode"] == "premigrate"
    assert hsm["files"]["premigrated"] == len(verified), hsm
    assert hsm["missing"] == [] and hsm["unparsed"] == []
    assert any("ANS9101I" in m for m in hsm["messages"])
    # the node saw every file by its full GPFS path, the hostile name as one argument
    asked = {line.split("\t", 1)[1] for line in Path(hsm_node["state"]).read_text().splitlines()}
    assert asked == {f.dest_path for f in verified}
    for where in (tmp_path, Path("/home/cryo"), Path(hsm_node["bin"]).parent, Path.cwd()):
        assert not list(where.rglob("hsm_pwned*")), where  # nothing ran from a file name
    # the report is kept beside the summary, not world-readable
    report = Path(s.handle.dest_root) / "logs" / "hsm_report.json"
    assert json.loads(report.read_text())["files"] == hsm["files"]
    assert report.stat().st_mode & 0o007 == 0
    on_disk = json.loads((Path(s.handle.dest_root) / "logs" / "session_summary.json").read_text())
    assert on_disk["archive"]["hsm"]["files"]["premigrated"] == len(verified)


def test_an_unreachable_hsm_node_is_recorded_and_the_session_still_closes(
    site_env: dict[str, Path], hsm_node: dict[str, str], monkeypatch
) -> None:
    # the same node on a port nothing listens on (what a node that is down looks like)
    conn = json.loads(os.environ[f"AIRFLOW_CONN_{hsm_node['conn_id'].upper()}"])
    conn["port"] = 1
    monkeypatch.setenv("AIRFLOW_CONN_HSM_DOWN", json.dumps(conn))
    s = Session("hsm_down")
    s.copy(CLEAN)
    _with_hsm(s, "migrate", "hsm_down", hsm_node)

    summary = close_session(s.facility, s.handle, "ended for the test", max_attempts=3)

    assert s.ledger.get_session(s.handle.session_id).state == "closed"
    hsm = summary["archive"]["hsm"]
    assert hsm["ok"] is False and hsm["mode"] == "migrate"
    assert hsm["error"], hsm
    assert Path(hsm_node["state"]).read_text() == ""  # nothing was migrated
