"""Share cleanup deletes from the microscope share only what is proven safe on GPFS.

Every copy here is made by the real watch and copy (a krios1 session, as its DAG's task does),
so the destinations carry the ledger's checksums and the archive tags the copy path sets. Then a
copy is damaged (or the share, or the ledger, moves on) and cleanup must keep that file, with the
right reason, while the intact file beside it is deleted: so each test shows its protection at
work, and fails if that protection is removed.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from cryoflow.archive.cleanup import (
    Action,
    LocalSourceFiles,
    Reason,
    SourceStat,
    effective_mode,
    local_sources,
    run_cleanup,
)
from cryoflow.archive.settings import CleanupConfig
from cryoflow.config import load_site
from cryoflow.ingest.transfer import file_checksum
from cryoflow.ledger.store import FileRow, FileState, Ledger, SessionRow
from cryoflow.operators.ingest_batch import watch_trigger
from cryoflow.session import SessionParams, form_defaults, ingest_event, open_session
from tests.conftest import ROOT

FRAMES = 8
PREFIX = "user.cryoflow."


def movie(square: int, hole: int) -> str:
    return (
        f"Images-Disc1/GridSquare_{square}/Data/"
        f"FoilHole_{hole}_Data_2_3_20240101_1200{hole:02d}_fractions.tiff"
    )


CLEAN = movie(1, 1)
OTHER = movie(1, 2)
TARGET = movie(2, 3)  # in a grid square of its own, so its folder can be tampered with


class Session:
    """A krios1 session whose files are copied by the real watch and copy, batch by batch."""

    def __init__(self, name: str, **form: Any) -> None:
        site = load_site()
        self.facility, self.scope = site.facility, site.microscopes["krios1"]
        values = {**form_defaults(self.scope), "session_name": name, "frames": FRAMES, **form}
        self.params = SessionParams.from_form(values)
        self.handle, _ = open_session(self.facility, self.scope, self.params)
        self.share = Path(self.handle.source_root)
        self.share.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.facility.storage.ledger_url)
        self.batches = 0

    def write(self, rel: str, seed: int) -> None:
        path = self.share / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        frames = np.random.default_rng(seed).integers(0, 4, (FRAMES, 64, 64), dtype=np.uint8)
        tifffile.imwrite(path, frames)

    def copy(self, *rels: str, seed: int = 0, notes: dict[str, bytes] | None = None) -> None:
        """Write the files on the share (movies, and ``notes`` as given) and copy them until
        every one is verified."""
        for i, rel in enumerate(rels):
            self.write(rel, seed + i)
        for rel, data in (notes or {}).items():
            (self.share / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.share / rel).write_bytes(data)
        rels = (*rels, *(notes or {}))
        trigger = watch_trigger(self.facility, self.scope, self.params, self.handle)
        state = trigger._start()
        deadline = time.monotonic() + 30
        while any(self.state(rel) != FileState.VERIFIED for rel in rels):
            assert time.monotonic() < deadline, [self.rows(r) for r in rels]
            outcome = trigger._poll(state)
            if outcome.status == "wait":
                time.sleep(trigger.poll_seconds)
                continue
            self.batches += 1
            ingest_event(
                self.facility,
                self.scope,
                self.handle,
                outcome.payload(),
                f"b{self.batches}",
                self.params,
            )
            state = trigger._start()

    def rows(self, rel: str) -> list[FileRow]:
        return [f for f in self.ledger.files(self.handle.session_id) if f.relpath == rel]

    def state(self, rel: str) -> FileState | None:
        rows = self.rows(rel)
        return max(rows, key=lambda f: f.version).state if rows else None

    def row(self, rel: str) -> FileRow:
        return max(self.rows(rel), key=lambda f: f.version)

    def src(self, rel: str) -> Path:
        return self.share / rel

    def dst(self, rel: str) -> Path:
        return Path(self.row(rel).dest_path or "")

    def close(self) -> None:
        self.ledger.close_session(self.handle.session_id, "ended for the test")


def cleanup(
    mode: str = "delete",
    *,
    min_age_hours: float = 0,
    reread_checksum: bool = True,
    now: datetime | None = None,
    sources: Callable[[SessionRow], Any] = local_sources,
    max_files: int = 2000,
):
    site = load_site()
    config = CleanupConfig(
        mode=mode,
        min_age_hours=min_age_hours,
        reread_checksum=reread_checksum,
        max_files_per_run=max_files,
    )
    return run_cleanup(
        Ledger(site.facility.storage.ledger_url),
        "krios1",
        config,
        xattr_prefix=site.facility.archive.xattr_prefix,
        sources=sources,
        now=now,
        run_id="test",
    )


def by_rel(decisions) -> dict[str, tuple[Action, Reason]]:
    return {d.relpath: (d.action, d.reason) for d in decisions}


@pytest.fixture
def env(site_env: dict[str, Path]) -> dict[str, Path]:
    return site_env


PG_ADMIN_URL = os.environ.get(
    "CRYOFLOW_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_ledger(
    request: pytest.FixtureRequest, site_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Path]]:
    """The site on the SQLite ledger, or on a fresh database of the deployment's PostgreSQL."""
    if request.param == "sqlite":
        yield site_env
        return
    from sqlalchemy import create_engine, text

    from cryoflow.ledger.store import _ENGINES

    name = f"cryoflow_cleanup_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any connection problem means the same
        admin.dispose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required in CI: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    monkeypatch.setenv("CRYOFLOW_LEDGER_URL", url)
    try:
        yield site_env
    finally:
        if url in _ENGINES:
            _ENGINES.pop(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# ------------------------------------------------------------------ what is never deleted


def _alter_one_byte(s: Session, rel: str) -> None:
    dst = s.dst(rel)
    data = bytearray(dst.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    dst.chmod(0o640)
    dst.write_bytes(bytes(data))


def _truncate(s: Session, rel: str) -> None:
    with s.dst(rel).open("r+b") as fh:
        fh.truncate(s.row(rel).size - 100)


def _untag(s: Session, rel: str) -> None:
    os.removexattr(s.dst(rel), f"{PREFIX}checksum")


def _retag(s: Session, rel: str) -> None:
    os.setxattr(s.dst(rel), f"{PREFIX}checksum", b"xxh3_128:" + b"0" * 32)


def _remove_destination(s: Session, rel: str) -> None:
    s.dst(rel).unlink()


def _change_source(s: Session, rel: str) -> None:
    """New data under the same name, same size: only the mtime tells."""
    path = s.src(rel)
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def _newer_version_pending(s: Session, rel: str) -> None:
    """The copy of a newer version started (and is not verified): the ledger's latest word on
    this relpath is not a verified copy, even though the share looks like the verified one."""
    row = s.row(rel)
    s.ledger.begin_copy(
        s.handle.session_id,
        rel,
        kind=row.kind,
        size=row.size + 1,
        mtime_ns=row.mtime_ns + 1,
        batch="late",
    )


def _symlink_out_of_the_folder(s: Session, rel: str) -> None:
    """The folder holding the file becomes a symlink to an identical file outside the session
    folder (same size and mtime): the path must not be followed."""
    folder = s.src(rel).parents[1]  # .../GridSquare_2
    outside = s.share.parent / "elsewhere"
    outside.mkdir()
    moved = outside / folder.name
    os.rename(folder, moved)
    folder.symlink_to(moved, target_is_directory=True)


# case -> (what happens after verification, why cleanup keeps the file). All but the altered
# copy run without the checksum re-read, so the one check named is all that stands between the
# file and its deletion (the re-read would catch a truncated copy too).
TAMPER = {
    "destination-altered": (_alter_one_byte, Reason.DEST_CHECKSUM),
    "destination-truncated": (_truncate, Reason.DEST_SIZE),
    "destination-untagged": (_untag, Reason.DEST_UNTAGGED),
    "destination-tagged-otherwise": (_retag, Reason.DEST_TAGS),
    "destination-removed": (_remove_destination, Reason.DEST_MISSING),
    "source-changed": (_change_source, Reason.SOURCE_CHANGED),
    "newer-version-pending": (_newer_version_pending, Reason.NEWER_VERSION),
    "symlink-out-of-folder": (_symlink_out_of_the_folder, Reason.UNSAFE_PATH),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_a_file_whose_copy_or_source_is_not_as_verified_is_kept(env, case: str) -> None:
    s = Session(f"tamper_{case.replace('-', '_')}")
    s.copy(CLEAN, TARGET)
    clean_dst, target_src, target_dst = s.dst(CLEAN), s.src(TARGET), s.dst(TARGET)
    target_id, target_bytes = s.row(TARGET).id, target_src.read_bytes()
    tamper, reason = TAMPER[case]
    tamper(s, TARGET)
    s.close()
    dst_before = target_dst.read_bytes() if target_dst.exists() else None

    report = cleanup("delete", reread_checksum=reason == Reason.DEST_CHECKSUM)

    decisions = by_rel(report.decisions)
    assert decisions[CLEAN] == (Action.DELETED, Reason.SAFE)  # cleanup was at work
    assert decisions[TARGET] == (Action.KEPT, reason), report.to_dict()
    assert not s.src(CLEAN).exists()
    assert clean_dst.exists() and file_checksum(clean_dst) == s.row(CLEAN).checksum
    # the kept file is on the share as it was, wherever its folder now points
    outside = env["share"] / "krios1" / "elsewhere"
    kept = outside / Path(TARGET).relative_to("Images-Disc1") if outside.exists() else target_src
    assert kept.exists()
    if case != "source-changed":
        assert kept.read_bytes() == target_bytes
    # nothing at the destination was touched
    assert (target_dst.read_bytes() if target_dst.exists() else None) == dst_before
    # the decision is recorded with its reason
    (row,) = [r for r in s.ledger.cleanup_decisions(microscope="krios1") if r.action == "kept"]
    assert (row.file_id, row.reason, row.size) == (target_id, str(reason), len(target_bytes))


def test_the_share_changing_while_the_copy_is_checked_keeps_the_file(env) -> None:
    s = Session("racing_writer")
    s.copy(CLEAN, TARGET)
    s.close()

    class Rewritten(LocalSourceFiles):
        """The microscope PC rewrites TARGET right after cleanup first looked at it."""

        seen = 0

        def stat(self, relpath: str) -> SourceStat | None:
            found = super().stat(relpath)
            if relpath == TARGET and not self.seen:
                type(self).seen += 1
                with (self.root / relpath).open("ab") as fh:
                    fh.write(b"more")
            return found

    report = cleanup("delete", sources=lambda session: Rewritten(session.source_root))

    decisions = {d.relpath: d for d in report.decisions}
    assert decisions[CLEAN].action == Action.DELETED
    assert (decisions[TARGET].action, decisions[TARGET].reason) == (
        Action.KEPT,
        Reason.SOURCE_CHANGED,
    )
    assert "while it was being checked" in decisions[TARGET].detail
    assert s.src(TARGET).exists()


# ------------------------------------------------------------------ running sessions


def test_files_of_a_running_session_are_never_deleted(any_ledger) -> None:
    done = Session("finished")
    done.copy(CLEAN)
    done.close()
    running = Session("running")
    running.copy(OTHER, seed=5)

    report = cleanup("delete")

    assert by_rel(report.decisions) == {CLEAN: (Action.DELETED, Reason.SAFE)}
    assert running.src(OTHER).exists()
    # not even examined: counted as waiting for its session to end
    size = running.row(OTHER).size
    assert report.waiting["session-running"] == (1, size)
    assert report.to_dict()["waiting"]["session-running"] == {"files": 1, "bytes": size}


def test_a_closed_session_in_the_folder_of_a_running_one_is_kept(env) -> None:
    first = Session("first_try", source_folder="grid7")
    first.copy(CLEAN, TARGET)
    first.close()
    again = Session("second_try", source_folder="grid7")  # the same folder, running now
    assert again.share == first.share

    report = cleanup("delete")

    assert {d.reason for d in report.decisions} == {Reason.SESSION_RUNNING}
    assert {d.action for d in report.decisions} == {Action.KEPT}
    assert first.src(CLEAN).exists() and first.src(TARGET).exists()
    assert all("running session" in d.detail for d in report.decisions)


def test_a_session_reopened_while_cleanup_checks_keeps_its_files(env) -> None:
    s = Session("reopened")
    s.copy(CLEAN)
    s.close()

    class Reopening(LocalSourceFiles):
        """A new trigger of the same session arrives while cleanup checks its files."""

        def stat(self, relpath: str) -> SourceStat | None:
            found = super().stat(relpath)
            Session("reopened")  # reopens the closed session, as the session DAG would
            return found

    report = cleanup("delete", sources=lambda session: Reopening(session.source_root))

    (decision,) = report.decisions
    assert (decision.action, decision.reason) == (Action.KEPT, Reason.SESSION_RUNNING)
    assert s.src(CLEAN).exists()


# ------------------------------------------------------------------ modes, age, record


def _disk(s: Session) -> dict[str, int]:
    from cryoflow.view.queries import ViewQueries

    return ViewQueries(s.ledger.url).disk(s.handle.session_id, min_age_hours=0, closed=True)


def test_dry_run_deletes_nothing_and_reports_what_it_would_delete(any_ledger) -> None:
    s = Session("dry")
    s.copy(CLEAN, OTHER, TARGET)
    _alter_one_byte(s, TARGET)
    s.close()
    before = {rel: s.src(rel).read_bytes() for rel in (CLEAN, OTHER, TARGET)}

    report = cleanup("dry-run")

    assert {rel: s.src(rel).read_bytes() for rel in before} == before  # nothing deleted
    assert by_rel(report.decisions) == {
        CLEAN: (Action.WOULD_DELETE, Reason.SAFE),
        OTHER: (Action.WOULD_DELETE, Reason.SAFE),
        TARGET: (Action.KEPT, Reason.DEST_CHECKSUM),
    }
    out = report.to_dict()
    assert out["mode"] == "dry-run" and out["deleted"] == []
    assert sorted(d["relpath"] for d in out["would_delete"]) == sorted([CLEAN, OTHER])
    sizes = s.row(CLEAN).size + s.row(OTHER).size
    assert out["would_delete_bytes"] == sizes
    assert "would be deleted (dry-run)" in report.note
    # the session view's figures: only what passed every check is safe; the damaged copy's
    # file is kept, never counted as safe to free
    disk = _disk(s)
    assert disk["safe_to_free_bytes"] == sizes
    assert disk["kept_bytes"] == s.row(TARGET).size
    assert disk["freed_bytes"] == 0 and disk["unchecked_bytes"] == 0

    # a second dry run confirms the same decisions without new rows; then delete for real
    cleanup("dry-run")
    assert len(s.ledger.cleanup_decisions(session_id=s.handle.session_id)) == 3
    report = cleanup("delete")
    assert sorted(d.relpath for d in report.deleted) == sorted([CLEAN, OTHER])
    assert not s.src(CLEAN).exists() and not s.src(OTHER).exists() and s.src(TARGET).exists()
    disk = _disk(s)
    assert (disk["safe_to_free_bytes"], disk["freed_bytes"]) == (0, sizes)
    assert disk["kept_bytes"] == s.row(TARGET).size
    history = [(r.file_id, r.action) for r in s.ledger.cleanup_decisions(microscope="krios1")]
    assert history.count((s.row(CLEAN).id, "would-delete")) == 1
    assert history.count((s.row(CLEAN).id, "deleted")) == 1
    # a deleted file is not examined again
    assert by_rel(cleanup("delete").decisions) == {TARGET: (Action.KEPT, Reason.DEST_CHECKSUM)}


def test_mode_off_examines_nothing_and_says_so(env, caplog) -> None:
    # off unless a microscope's YAML turns it on, and off as shipped
    assert CleanupConfig().mode == "off"
    assert {m.cleanup.mode for m in load_site().microscopes.values()} == {"off"}
    s = Session("off")
    s.copy(CLEAN)
    s.close()
    caplog.set_level("INFO", logger="cryoflow.archive.cleanup")

    report = cleanup("off")

    assert report.decisions == [] and s.src(CLEAN).exists()
    assert "cleanup is off" in report.note
    assert any("cleanup is off" in r.getMessage() for r in caplog.records)
    assert s.ledger.cleanup_decisions() == []


def test_a_manual_dry_run_never_deletes_and_off_stays_off() -> None:
    assert effective_mode("delete", dry_run=True) == "dry-run"
    assert effective_mode("delete", dry_run=False) == "delete"
    assert effective_mode("dry-run", dry_run=False) == "dry-run"
    assert effective_mode("off", dry_run=True) == "off"


def test_only_files_verified_long_enough_ago_are_examined(env) -> None:
    s = Session("young")
    s.copy(CLEAN, OTHER)
    s.close()
    sizes = s.row(CLEAN).size + s.row(OTHER).size

    report = cleanup("delete", min_age_hours=48)

    assert report.decisions == []
    assert s.src(CLEAN).exists() and s.src(OTHER).exists()
    assert report.waiting["too-young"] == (2, sizes)

    report = cleanup("delete", min_age_hours=48, now=datetime.now(UTC) + timedelta(hours=49))
    assert sorted(d.relpath for d in report.deleted) == sorted([CLEAN, OTHER])


def test_without_the_checksum_re_read_an_altered_copy_of_the_same_size_passes(env) -> None:
    """Why ``reread_checksum`` is on by default: size and tags cannot see altered bytes."""
    s = Session("no_reread")
    s.copy(TARGET)
    _alter_one_byte(s, TARGET)
    s.close()

    assert by_rel(cleanup("dry-run", reread_checksum=False).decisions) == {
        TARGET: (Action.WOULD_DELETE, Reason.SAFE)
    }
    assert by_rel(cleanup("dry-run").decisions) == {TARGET: (Action.KEPT, Reason.DEST_CHECKSUM)}


def test_every_decision_is_one_log_line_naming_the_file(env, caplog) -> None:
    s = Session("logged")
    s.copy(CLEAN, TARGET)
    _truncate(s, TARGET)
    s.close()
    caplog.set_level("INFO", logger="cryoflow.archive.cleanup")

    cleanup("delete")

    lines = [r.getMessage() for r in caplog.records if r.name == "cryoflow.archive.cleanup"]
    (deleted,) = [line for line in lines if line.startswith("DELETED")]
    (kept,) = [line for line in lines if line.startswith("KEPT")]
    assert str(s.src(CLEAN)) in deleted and "match the ledger" in deleted
    assert str(s.src(TARGET)) in kept and "destination-size" in kept
    assert [r.levelname for r in caplog.records if r.getMessage() == kept] == ["WARNING"]


def test_a_share_that_is_not_mounted_is_not_taken_for_deleted_files(env) -> None:
    s = Session("unmounted")
    s.copy(CLEAN)
    s.close()
    hidden = s.share.with_name("hidden")
    os.rename(s.share, hidden)  # what a CIFS mount that went away looks like

    (decision,) = cleanup("delete").decisions
    assert (decision.action, decision.reason) == (Action.KEPT, Reason.SOURCE_ERROR)
    os.rename(hidden, s.share)
    (decision,) = cleanup("delete").decisions
    assert decision.action == Action.DELETED


def test_at_most_max_files_per_run_least_recently_examined_first(any_ledger) -> None:
    s = Session("bounded")
    s.copy(CLEAN, OTHER, TARGET)
    s.close()

    first = cleanup("dry-run", max_files=2)
    second = cleanup("dry-run", max_files=2)

    assert len(first.decisions) == len(second.decisions) == 2
    seen = [d.relpath for d in first.decisions + second.decisions]
    assert set(seen) == {CLEAN, OTHER, TARGET}  # the one left out first goes first next
    assert "more remain" in first.note


# ------------------------------------------------------------------ the DAG


def test_the_cleanup_dag_dry_run_deletes_nothing_and_lists_what_it_would(
    airflow_db, site_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    cfg = tmp_path / "config"
    shutil.copytree(ROOT / "config", cfg)
    path = cfg / "microscopes" / "krios1.yaml"
    path.write_text(path.read_text() + "cleanup:\n  mode: delete\n  min_age_hours: 0\n")
    monkeypatch.setenv("CRYOFLOW_CONFIG_DIR", str(cfg))
    s = Session("via_dag")
    s.copy(CLEAN, TARGET)
    _untag(s, TARGET)
    s.close()
    caplog.set_level("INFO")
    from tests.airflow_helpers import load_dag

    dag = load_dag("cleanup_krios1")
    run = dag.test(run_conf={"dry_run": True})

    assert str(run.state) == "success"
    assert s.src(CLEAN).exists() and s.src(TARGET).exists()
    out = run.get_task_instance("cleanup").xcom_pull(task_ids="cleanup")
    assert out["mode"] == "dry-run"
    assert [d["relpath"] for d in out["would_delete"]] == [CLEAN]
    assert [(d["relpath"], d["reason"]) for d in out["kept"]] == [(TARGET, "destination-untagged")]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("WOULD DELETE") and CLEAN in m for m in messages), messages[-20:]
