"""Share cleanup over SMB: the same rules as on a mount, the deletes sent to the Samba server of
``scripts/services.sh samba``. A session of an ``smb`` microscope is copied by its own code (the
watch and the copy read the share over SMB, so the ledger holds the share's own sizes and
times); cleanup then deletes over SMB only files whose GPFS copy is proven, keeps a file whose
copy was damaged, and deletes nothing while the share is away (never "gone")."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import tifffile

from cryoflow.archive.cleanup import (
    Action,
    LocalSourceFiles,
    Reason,
    SmbSourceFiles,
    run_cleanup,
    sources_for,
)
from cryoflow.archive.settings import CleanupConfig
from cryoflow.config import ShareConfig, load_site
from cryoflow.ledger.store import FileState, Ledger, SessionRow
from cryoflow.operators.ingest_batch import watch_trigger
from cryoflow.session import SessionParams, form_defaults, ingest_event, open_session
from tests.services_fixtures import SambaService
from tests.share.conftest import Backend
from tests.share.test_smb_source import (  # noqa: F401 - fixtures
    CONN_ID,
    _connection,
    _frames,
    samba_back,
    smb,
)

pytestmark = pytest.mark.services


def test_cleanup_over_smb_deletes_only_proven_files_and_nothing_while_the_share_is_away(
    smb: Backend,  # noqa: F811
    samba_back: SambaService,  # noqa: F811
    site_env: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _connection(monkeypatch, samba_back, samba_back.password)
    site = load_site()
    facility = site.facility
    share = ShareConfig(
        kind="smb", path=Path(smb.folder), server=samba_back.host, port=samba_back.port,
        share_name=samba_back.share, conn_id=CONN_ID,
    )  # fmt: skip
    scope = site.microscopes["krios2"].model_copy(update={"share": share})
    params = SessionParams.from_form({**form_defaults(scope), "session_name": "tidy", "frames": 6})
    handle, _ = open_session(facility, scope, params)
    local = smb.root / "tidy"  # the folder behind the share, as the microscope PC writes it
    local.mkdir()
    movies = ["Data/m0.tif", "Data/m1.tif", "Data/m2.tif"]
    for i, rel in enumerate(movies):
        (local / rel).parent.mkdir(exist_ok=True)
        tifffile.imwrite(local / rel, _frames(seed=i))
    for path in (local, *local.rglob("*")):  # the PC's files belong to the share's user
        shutil.chown(path, samba_back.user, samba_back.user)
    ledger = Ledger(facility.storage.ledger_url)
    trigger = watch_trigger(facility, scope, params, handle)
    watch = trigger._start()
    deadline = time.monotonic() + 30
    while {f.relpath for f in ledger.files(handle.session_id, FileState.VERIFIED)} != set(movies):
        assert time.monotonic() < deadline, [(f.relpath, f.state) for f in ledger.files(1)]
        outcome = trigger._poll(watch)
        if outcome.status == "wait":
            time.sleep(trigger.poll_seconds)
            continue
        ingest_event(facility, scope, handle, outcome.payload(), "b", params)
        watch = trigger._start()
    ledger.close_session(handle.session_id, "ended for the test")
    damaged = Path(handle.dest_root) / "raw" / movies[2]
    with damaged.open("r+b") as fh:  # the GPFS copy of m2 loses its last bytes
        fh.truncate(damaged.stat().st_size - 10)
    config = CleanupConfig(mode="delete", min_age_hours=0, reread_checksum=True)

    opened: list[SmbSourceFiles] = []

    def tracked(session):  # what the run opened, to check it lets each connection go
        folder = sources_for(scope)(session)
        opened.append(folder)
        return folder

    def cleanup() -> dict[str, tuple[Action, Reason]]:
        report = run_cleanup(
            ledger, "krios2", config, xattr_prefix=facility.archive.xattr_prefix,
            sources=tracked, run_id="test",
        )  # fmt: skip
        assert opened and all(not f.source._cache for f in opened)  # connections closed
        return {d.relpath: (d.action, d.reason) for d in report.decisions}

    samba_back.stop()  # the PC is rebooting: nothing is deleted, nothing taken for gone
    away = cleanup()
    assert set(away) == set(movies)
    assert all(action == Action.KEPT for action, _ in away.values()), away
    assert all((local / rel).exists() for rel in movies)
    samba_back.start()

    decided = cleanup()
    assert decided[movies[0]] == (Action.DELETED, Reason.SAFE)
    assert decided[movies[1]] == (Action.DELETED, Reason.SAFE)
    assert decided[movies[2]] == (Action.KEPT, Reason.DEST_SIZE)
    assert not (local / movies[0]).exists() and not (local / movies[1]).exists()
    assert (local / movies[2]).exists()  # its copy is not proven: the original stays


def test_sessions_from_before_a_switch_to_smb_are_reached_on_their_mount(site_env) -> None:
    """A microscope moved from its CIFS mount to SMB: its earlier sessions recorded a mounted
    folder, and cleanup must reach them there, not wrap the path in an SMB client."""
    scope = load_site().microscopes["krios2"]
    share = ShareConfig(
        kind="smb", path=Path("sessions"), server="pc", share_name="data", conn_id="pc_smb"
    )
    smb_scope = scope.model_copy(update={"share": share})
    old = SessionRow(id=1, name="before", source_root="/mnt/krios2/before")
    assert isinstance(sources_for(smb_scope)(old), LocalSourceFiles)
    new = SessionRow(id=2, name="after", source_root="smb://pc:445/data/sessions/after")
    assert isinstance(sources_for(smb_scope)(new), SmbSourceFiles)
    cifs = SessionRow(id=3, name="smb-once", source_root="smb://pc:445/data/sessions/x")
    with pytest.raises(ValueError, match="smb-once.*no share.conn_id"):
        sources_for(scope)(cifs)  # back to the mount: SMB sessions need a Connection named
