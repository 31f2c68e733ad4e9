"""Reading a microscope PC directly over SMB (the Samba server of ``scripts/services.sh samba``).

What a facility relies on: the same files, sizes and verdicts as through a mount; a copy verified
by checksum; a movie the PC still holds open for writing is never offered or copied; a share
that goes away mid-session pauses the watch with a warning and it resumes by itself, with nothing
taken as deleted or missing; and the share's password appears in no log or message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import smbclient
import tifffile
import xxhash

from cryoflow.ingest.share.smb import SmbCredentials, SmbSource
from cryoflow.ingest.share.source import (
    HeldForWriting,
    LocalSource,
    ShareOffline,
    SourceFile,
    source_for,
)
from cryoflow.ingest.share.watch import ShareWatch, WatchSettings
from cryoflow.ingest.transfer import (
    SourceChangedError,
    TransferError,
    copy_verified,
    file_checksum,
    stage_copy,
)
from tests.services_fixtures import SambaService
from tests.share.conftest import Backend, smb_folder, smb_source

pytestmark = pytest.mark.services

CONN_ID = "cryoflow_test_smb"


@pytest.fixture
def smb(samba_service: SambaService) -> Iterator[Backend]:
    root, folder = smb_folder(samba_service)
    source = smb_source(samba_service, folder, timeout_seconds=3.0)
    try:
        yield Backend("smb", root, source, samba_service, folder)
    finally:
        source.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def samba_back(samba_service: SambaService) -> Iterator[SambaService]:
    """For tests that stop the server: it is running again afterwards, whatever happened."""
    try:
        yield samba_service
    finally:
        samba_service.start()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _frames(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, (n, 64, 48)).astype(np.uint16)


class Writer:
    """Another SMB client (the microscope PC): holds a file open for writing, letting readers
    in, as acquisition software does."""

    def __init__(self, samba: SambaService, folder: str, rel: str) -> None:
        self.cache: dict[str, Any] = {}
        kw = dict(username=samba.user, password=samba.password, port=samba.port)
        unc = f"\\\\{samba.host}\\{samba.share}\\{folder}\\{rel}"
        self.fh = smbclient.open_file(
            unc, mode="wb", share_access="r", connection_cache=self.cache, **kw
        )

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()
        smbclient.reset_connection_cache(fail_on_error=False, connection_cache=self.cache)


# --- listing and stat -------------------------------------------------------------------------


def test_listing_is_the_mounted_folders(smb: Backend) -> None:
    keep = [
        "Images-Disc1/GridSquare_1/Data/FoilHole_2_Data_3_4_20261124_101010_fractions.tiff",
        "Images-Disc1/GridSquare_1/Data/FoilHole_2_Data_3_4_20261124_101010.xml",
        "odd names/[grid 2] ü $(x) `y`.tif",
        "top.gain",
    ]
    skip = ["$RECYCLE.BIN/old.tif", ".hidden/movie.tif", "movie.tif.downloading", "thumbs/a.jpg"]
    for i, rel in enumerate(keep + skip):
        _write(smb.root / rel, b"x" * (i + 1))
    over_smb = smb.source.scan(exclude=["*.jpg"])
    local = LocalSource(smb.root).scan(exclude=["*.jpg"])
    assert sorted(over_smb.files) == sorted(local.files) == sorted(keep)
    assert not over_smb.errors and not over_smb.refused
    for rel, stat in over_smb.files.items():
        assert stat.size == local.files[rel].size
        # the directory listing's precision: microseconds, the same in scan and stat
        assert stat.mtime_ns == local.files[rel].mtime_ns // 1000 * 1000
        assert smb.source.stat(rel)[:2] == (stat.size, stat.mtime_ns)
    with pytest.raises(FileNotFoundError, match="no such file on the share"):
        smb.source.stat("nope.tif")
    assert smb.source.exists()


def test_a_location_never_holds_credentials(smb: Backend) -> None:
    assert str(smb.source).startswith("smb://127.0.0.1:")
    rebuilt = source_for(str(smb.source), credentials=lambda: None)
    assert str(rebuilt) == str(smb.source)
    with pytest.raises(ValueError, match="must not hold credentials"):
        SmbSource.from_root("smb://u:pw@127.0.0.1:4445/share/x", lambda: None)  # type: ignore[arg-type]


def test_an_smb_share_is_configured_by_server_share_and_connection_id() -> None:
    from pydantic import ValidationError

    from cryoflow.config import ShareConfig
    from cryoflow.ingest.share.source import session_root

    share = ShareConfig(
        kind="smb", path=Path("krios1"), server="krios1-pc", share_name="OffloadData", conn_id="k"
    )
    root = session_root(share, "grid #3/100%")
    assert root == "smb://krios1-pc:445/OffloadData/krios1/grid%20%233/100%25"
    source = source_for(root, credentials=lambda: SmbCredentials("u", "p"))
    assert isinstance(source, SmbSource) and str(source) == root
    assert source._unc("a b.tif") == "\\\\krios1-pc\\OffloadData\\krios1\\grid #3\\100%\\a b.tif"
    top = share.model_copy(update={"path": Path(".")})
    assert session_root(top, "s") == "smb://krios1-pc:445/OffloadData/s"
    with pytest.raises(ValidationError, match="kind smb needs conn_id"):
        ShareConfig(kind="smb", path=Path("x"), server="pc", share_name="s")
    with pytest.raises(ValidationError, match="must be a folder within the share"):
        ShareConfig(kind="smb", path=Path("/abs"), server="pc", share_name="s", conn_id="k")
    with pytest.raises(ValidationError, match="only for kind smb"):
        ShareConfig(path=Path("/mnt/x"), conn_id="k")
    with pytest.raises(ValueError, match="needs share.conn_id"):
        source_for("smb://pc:445/s/x")


# --- completeness through SMB -----------------------------------------------------------------


def _tiff(path: Path, cut: int = 0, **kw: Any) -> None:
    tifffile.imwrite(path, _frames(), photometric="minisblack", **kw)
    if cut:
        os.truncate(path, path.stat().st_size - cut)


def test_a_truncated_movie_over_smb_is_held_by_the_watch(smb: Backend) -> None:
    _tiff(smb.root / "m.tiff", cut=100)
    settings = WatchSettings(root=smb.root, settle_seconds=1.0, batch_window_seconds=0)
    watch = ShareWatch(settings, done={}, started=0.0, source=smb.source)
    assert watch.poll(0.0).status == "wait"
    out = watch.poll(2.0)
    assert out.status == "wait" and "TIFF page 6" in watch._held["m.tiff"]
    _tiff(smb.root / "m.tiff")  # the writer finished it
    watch.poll(3.0)
    assert [f["relpath"] for f in watch.poll(4.5).files] == ["m.tiff"]


# --- the copy ---------------------------------------------------------------------------------


def test_streaming_copy_over_smb_is_verified_and_idempotent(smb: Backend, tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 256, 24 << 20, dtype=np.uint8).tobytes()
    src = _write(smb.root / "Data" / "movie 1.tiff", data)
    stat = smb.source.stat("Data/movie 1.tiff")
    dst = tmp_path / "gpfs" / "movie 1.tiff"
    started = time.monotonic()
    result = copy_verified(
        SourceFile(smb.source, "Data/movie 1.tiff"),
        dst,
        chunk_bytes=8 << 20,
        expected=(stat.st_size, stat.st_mtime_ns),
    )
    seconds = time.monotonic() - started
    assert result.copied and result.size == len(data)
    assert result.checksum == xxhash.xxh3_128(data).hexdigest() == file_checksum(dst)
    assert dst.read_bytes() == data
    assert dst.stat().st_mtime_ns == stat.st_mtime_ns
    assert src.stat().st_size == len(data)  # the source is only read
    again = copy_verified(SourceFile(smb.source, "Data/movie 1.tiff"), dst)
    assert not again.copied and again.checksum == result.checksum
    print(f"SMB copy with verify: {len(data) / seconds / (1 << 20):.0f} MiB/s")


# --- a file the PC still holds open for writing -----------------------------------------------


def test_a_file_held_open_for_writing_is_never_offered_or_copied(
    smb: Backend, tmp_path: Path
) -> None:
    """Quiet for far longer than the settle time, but its writer still has it open: held."""
    assert smb.samba is not None
    writer = Writer(smb.samba, smb.folder, "movie.dat")  # a format settling alone would pass
    try:
        writer.write(b"x" * 5000)
        _write(smb.root / "other.dat", b"y")
        settings = WatchSettings(root=smb.root, settle_seconds=1.0, batch_window_seconds=0)
        watch = ShareWatch(settings, done={}, started=0.0, source=smb.source)
        assert watch.poll(0.0).status == "wait"
        out = watch.poll(30.0)
        assert [f["relpath"] for f in out.files] == ["other.dat"]
        assert out.pending == 1 and watch._held == {"movie.dat": "open for writing on the share"}
        watch.done = {"other.dat": (out.files[0]["size"], out.files[0]["mtime_ns"])}  # copied
        later = watch.poll(60.0)  # held still, however long it is quiet; never idle meanwhile
        assert later.status == "wait" and later.pending == 1
        assert smb.source.held_for_writing("movie.dat")
        with pytest.raises(HeldForWriting):
            smb.source.open("movie.dat")
        with pytest.raises(SourceChangedError, match="open for writing"):
            copy_verified(SourceFile(smb.source, "movie.dat"), tmp_path / "movie.dat")
        assert not (tmp_path / "movie.dat").exists()
    finally:
        writer.close()
    assert not smb.source.held_for_writing("movie.dat")
    watch.poll(61.0)
    out = watch.poll(62.5)
    assert [f["relpath"] for f in out.files] == ["movie.dat"] and out.files[0]["size"] == 5000


# --- the share going away ---------------------------------------------------------------------


def test_share_offline_pauses_the_watch_and_it_resumes(
    smb: Backend, samba_back: SambaService
) -> None:
    _write(smb.root / "done.dat", b"d")
    _write(smb.root / "new.dat", b"n")
    st = smb.source.stat("done.dat")
    settings = WatchSettings(root=smb.root, settle_seconds=2.0, idle_timeout_seconds=5.0)
    watch = ShareWatch(
        settings, done={"done.dat": (st.st_size, st.st_mtime_ns)}, started=0.0, source=smb.source
    )
    assert watch.poll(0.0).status == "wait"
    samba_back.stop()
    for t in (1.0, 10.0):  # long past the settle time and the idle timeout
        with pytest.raises(ShareOffline, match="is offline"):
            watch.poll(t)
    samba_back.start()
    out = watch.poll(11.0)  # new.dat's settling was not lost, nor its idle clock run down
    assert out.status == "ready" and [f["relpath"] for f in out.files] == ["new.dat"]


def test_a_copy_meeting_an_offline_share_is_a_transient_fault(
    smb: Backend, samba_back: SambaService, tmp_path: Path
) -> None:
    _write(smb.root / "a.dat", b"a" * 100)
    samba_back.stop()
    with pytest.raises(TransferError) as caught:
        stage_copy(SourceFile(smb.source, "a.dat"), tmp_path / "a.dat")
    assert caught.value.transient and "is offline" in str(caught.value)
    assert not list(tmp_path.iterdir())


def _trigger(tmp_path: Path, root: str, **kw: Any) -> Any:
    from cryoflow.ledger.store import Ledger
    from cryoflow.triggers.share_watch import ShareWatchTrigger

    url = f"sqlite:///{tmp_path}/ledger.db"
    sid = Ledger(url).open_session("k1", "s", dest_root="/d", source_root=root, params={})
    args = dict(
        root=root,
        ledger_url=url,
        session_id=sid,
        settle_seconds=1.0,
        poll_seconds=0.1,
        batch_window_seconds=0,
        idle_timeout_seconds=30,
        backoff_max_seconds=0.3,
        smb_conn_id=CONN_ID,
    )
    return ShareWatchTrigger(**{**args, **kw})


def _connection(monkeypatch: pytest.MonkeyPatch, samba: SambaService, password: str) -> None:
    conn = {
        "conn_type": "samba",
        "host": samba.host,
        "port": samba.port,
        "login": samba.user,
        "password": password,
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))


def test_trigger_pauses_with_a_warning_while_the_share_is_away_and_resumes(
    smb: Backend,
    samba_back: SambaService,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    _connection(monkeypatch, samba_back, samba_back.password)
    _write(smb.root / "m1.dat", b"12")
    trigger = _trigger(tmp_path, str(smb.source))
    samba_back.stop()  # away before the first poll: the event can only come after it is back

    async def outage() -> list[dict]:
        async def back() -> None:
            await asyncio.sleep(1.5)
            await asyncio.to_thread(samba_back.start)

        task = asyncio.ensure_future(back())
        events = [e.payload async for e in trigger.run()]
        await task
        return events

    caplog.set_level(logging.INFO)
    (event,) = asyncio.run(asyncio.wait_for(outage(), 30))
    assert event["status"] == "ready" and [f["relpath"] for f in event["files"]] == ["m1.dat"]
    # Airflow's trigger logger writes through structlog to the console, the rest via logging
    out = capfd.readouterr()
    logged = caplog.text + out.out + out.err
    paused = [line for line in logged.splitlines() if "PAUSED" in line]
    assert len(paused) == 1 and "is offline" in paused[0] and str(smb.source) in paused[0]
    assert "RESUMED: the share of" in logged
    assert samba_back.password not in logged


# --- credentials ------------------------------------------------------------------------------


def test_credentials_appear_in_no_log_or_message(
    smb: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert smb.samba is not None
    caplog.set_level(logging.DEBUG)  # smbprotocol's own debug log included
    password = smb.samba.password
    creds = SmbCredentials(smb.samba.user, password)
    assert password not in repr(creds) and password not in str(smb.source) + repr(smb.source)
    _write(smb.root / "a.tiff", b"abc")
    smb.source.scan()
    copy_verified(SourceFile(smb.source, "a.tiff"), tmp_path / "a.tiff")
    wrong = "Wr0ng-" + password[::-1]
    bad = smb_source(smb.samba, smb.folder)
    bad._credentials = lambda: SmbCredentials(smb.samba.user, wrong)  # type: ignore[union-attr]
    with pytest.raises(ShareOffline, match="credentials refused or expired") as caught:
        bad.scan()
    bad.close()
    for secret in (password, wrong):
        assert secret not in str(caught.value) and secret not in repr(caught.value)
        assert secret not in caplog.text
    assert any(r.name.startswith("smbprotocol") for r in caplog.records)  # it did log


def test_a_connection_without_a_password_takes_the_stacks_secret_file(
    smb: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docker-compose.yml: the Connection is plain JSON in the environment, its password the
    ``smb_password`` secret's file; the real share must accept what is read from it."""
    from cryoflow.ingest.share.smb import PASSWORD_FILE_ENV, airflow_credentials

    assert smb.samba is not None
    _connection(monkeypatch, smb.samba, "")
    secret = tmp_path / "smb_password"
    secret.write_text(smb.samba.password + "\n")  # as `docker secret create` from a file
    secret.chmod(0o400)
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(secret))
    creds = airflow_credentials(CONN_ID)
    source = smb_source(smb.samba, smb.folder)
    source._credentials = lambda: creds  # type: ignore[assignment]
    _write(smb.root / "a.tiff", b"abc")
    try:
        assert "a.tiff" in source.scan().files
    finally:
        source.close()
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=f"{CONN_ID}.*no password.*missing"):
        airflow_credentials(CONN_ID)


def test_session_over_smb_copies_verified_and_survives_an_outage(
    smb: Backend,
    samba_back: SambaService,
    site_env: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The session's own code (open_session, the trigger's watch, ingest_event with its copy
    threads) on an ``smb`` microscope: movies verified; the share away: nothing marked missing
    or incomplete, nothing copied twice; back: the next movie goes on."""
    from cryoflow.config import ShareConfig, load_site
    from cryoflow.ledger.store import FileState, Ledger
    from cryoflow.operators.ingest_batch import watch_trigger
    from cryoflow.session import SessionParams, form_defaults, ingest_event, open_session

    _connection(monkeypatch, samba_back, samba_back.password)
    site = load_site()
    facility = site.facility
    base = site.microscopes["krios2"]
    share = ShareConfig(
        kind="smb",
        path=Path(smb.folder),
        server=samba_back.host,
        port=samba_back.port,
        share_name=samba_back.share,
        conn_id=CONN_ID,
    )
    scope = base.model_copy(update={"share": share})
    params = SessionParams.from_form(
        {**form_defaults(scope), "session_name": "smbsess", "frames": 6}
    )
    handle, _ = open_session(facility, scope, params)
    assert handle.source_root == f"{smb.source}/smbsess"
    local = smb.root / "smbsess"
    movies = [f"m{i}.tif" for i in range(3)]
    for rel in movies[:2]:
        local.mkdir(exist_ok=True)
        tifffile.imwrite(local / rel, _frames(seed=len(rel)))
    ledger = Ledger(facility.storage.ledger_url)

    def batch(timeout: float = 8.0) -> dict | None:
        trigger = watch_trigger(facility, scope, params, handle)
        watch = trigger._start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            outcome = trigger._poll(watch)
            if outcome.status != "wait":
                ingest_event(facility, scope, handle, outcome.payload(), "b", params)
                return outcome.payload()
            time.sleep(trigger.poll_seconds)
        return None

    def states() -> dict[str, str]:
        return {f.relpath: str(f.state) for f in ledger.files(handle.session_id)}

    assert batch()["status"] == "ready"
    errors = [f.error for f in ledger.files(handle.session_id)]
    assert states() == {rel: str(FileState.VERIFIED) for rel in movies[:2]}, errors
    raw = Path(handle.dest_root) / "raw"
    for rel in movies[:2]:
        assert (raw / rel).read_bytes() == (local / rel).read_bytes()
    samba_back.stop()
    trigger = watch_trigger(facility, scope, params, handle)
    watch = trigger._start()
    with pytest.raises(ShareOffline):
        trigger._poll(watch)
    assert states() == {rel: str(FileState.VERIFIED) for rel in movies[:2]}
    samba_back.start()
    tifffile.imwrite(local / movies[2], _frames(seed=9))
    assert [f["relpath"] for f in batch()["files"]] == [movies[2]]
    assert states() == {rel: str(FileState.VERIFIED) for rel in movies}
