"""A microscope session: its parameters (the trigger form) and its lifecycle steps.

Pure logic over config, ledger, session tree and transfer; the Airflow tasks in
``cryoflow.operators.session_tasks`` are thin calls into these functions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cryoflow.config import FacilityConfig, MicroscopeConfig
from cryoflow.ledger import FileState, Ledger
from cryoflow.session_tree import SessionPaths, create_session_tree, resolve_gid
from cryoflow.share.layout import classify
from cryoflow.share.scan import UnsafePathError, resolve_in, safe_relpath
from cryoflow.transfer import SourceChangedError, TransferError, copy_verified

log = logging.getLogger(__name__)

SESSION_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
UNIX_NAME_PATTERN = r"^[a-z_][a-z0-9_.-]{0,31}$"


class SessionParamsError(ValueError):
    """The session form holds an invalid value; the message names the field."""


class SessionParams(BaseModel):
    """The fields of the trigger form; defaults come from the microscope's YAML."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    session_name: str = Field(pattern=SESSION_NAME_PATTERN)
    source_folder: str = Field("", description="Folder on the share; empty = session_name.")
    project: str = ""
    unix_group: str = Field("", pattern=r"^$|" + UNIX_NAME_PATTERN)
    collaborators: list[str] = Field(default_factory=list)
    sample: str = ""
    pixel_size_A: float = Field(gt=0.1, lt=20)
    kv: float = Field(ge=60, le=400)
    cs_mm: float = Field(ge=0, le=10)
    amp_contrast: float = Field(0.07, ge=0, lt=1)
    dose_per_frame: float = Field(gt=0, lt=50)
    frames: int = Field(ge=1, le=2000)
    gain_reference: str = ""
    motioncor: bool = True
    ctf: bool = True
    picking: bool = True
    particle_diameter_A: float = Field(150.0, gt=10, lt=2000)
    idle_timeout_minutes: float = Field(gt=0)
    max_hours: float = Field(gt=0)
    end_time: str = Field("", description="ISO time at which the session ends; empty = none.")

    @classmethod
    def from_form(cls, values: dict[str, Any]) -> SessionParams:
        try:
            params = cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']} (given: {e.get('input')!r})"
                for e in exc.errors()
            )
            raise SessionParamsError(f"invalid session parameters: {problems}") from None
        for user in params.collaborators:
            if not re.match(UNIX_NAME_PATTERN, user):
                raise SessionParamsError(f"collaborators: {user!r} is not a Unix user name")
        try:
            safe_relpath(params.folder)
        except UnsafePathError as exc:
            raise SessionParamsError(f"source_folder: {exc}") from None
        if params.end_time:
            try:
                datetime.fromisoformat(params.end_time)
            except ValueError:
                raise SessionParamsError(
                    f"end_time: {params.end_time!r} is not an ISO date-time"
                ) from None
        return params

    @property
    def folder(self) -> str:
        return self.source_folder or self.session_name


def form_defaults(scope: MicroscopeConfig) -> dict[str, Any]:
    """The trigger form's defaults for one microscope (its YAML speaks first)."""
    d, o, p, s = scope.detector, scope.optics, scope.processing, scope.session
    return {
        "pixel_size_A": d.pixel_size_A,
        "kv": o.kv,
        "cs_mm": o.cs_mm,
        "amp_contrast": o.amp_contrast,
        "dose_per_frame": d.dose_per_frame,
        "frames": d.frames,
        "gain_reference": d.gain_reference or "",
        "motioncor": p.motioncor,
        "ctf": p.ctf,
        "picking": p.picking,
        "particle_diameter_A": p.particle_diameter_A,
        "idle_timeout_minutes": s.idle_timeout_minutes,
        "max_hours": s.max_hours,
    }


@dataclass(frozen=True)
class SessionHandle:
    """What every task of a run needs to know about its session (passed via XCom)."""

    session_id: int
    source_root: str
    dest_root: str
    deadline: str | None

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionHandle:
        return cls(**data)


def open_session(
    facility: FacilityConfig,
    scope: MicroscopeConfig,
    params: SessionParams,
    *,
    now: datetime | None = None,
) -> tuple[SessionHandle, list[str]]:
    """Create (or find) the session's tree and ledger row; idempotent across runs."""
    now = now or datetime.now(UTC)
    ledger = Ledger(facility.storage.ledger_url)
    source_root = resolve_in(scope.share.path, params.folder)
    paths = SessionPaths.for_session(facility.storage.gpfs_root, now.year, params.session_name)
    session_id = ledger.open_session(
        scope.id,
        params.session_name,
        dest_root=str(paths.root),
        source_root=str(source_root),
        params=params.model_dump(),
    )
    row = ledger.get_session(session_id)
    paths = SessionPaths(
        Path(row.dest_root), *(Path(row.dest_root) / sub for sub in ("raw", "processed", "logs"))
    )
    notes = create_session_tree(
        paths,
        gid=resolve_gid(params.unix_group),
        dir_mode=facility.permissions.dir_mode,
        collaborators=params.collaborators,
        acl=facility.permissions.acl,
    )
    deadline = row.opened_at.replace(tzinfo=row.opened_at.tzinfo or UTC) + timedelta(
        hours=params.max_hours
    )
    if params.end_time:
        end = datetime.fromisoformat(params.end_time)
        deadline = min(deadline, end if end.tzinfo else end.replace(tzinfo=UTC))
    return (
        SessionHandle(session_id, row.source_root, row.dest_root, deadline.isoformat()),
        notes,
    )


@dataclass
class BatchReport:
    copied: list[dict[str, Any]]
    skipped: list[str]
    failed: list[dict[str, str]]
    retry_later: list[str]

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def transfer_batch(
    facility: FacilityConfig,
    scope: MicroscopeConfig,
    handle: SessionHandle,
    files: list[dict[str, Any]],
    batch: str,
) -> BatchReport:
    """Copy a batch to ``<session>/raw``, each file verified; one bad file never stops the rest."""
    ledger = Ledger(facility.storage.ledger_url)
    source_root, raw = Path(handle.source_root), Path(handle.dest_root) / "raw"
    report = BatchReport(copied=[], skipped=[], failed=[], retry_later=[])
    chunk = facility.transfer.chunk_mib << 20
    for item in files:
        rel = item["relpath"]
        try:
            src = resolve_in(source_root, rel)
            dst = raw / safe_relpath(rel)
        except UnsafePathError as exc:
            report.failed.append({"relpath": rel, "error": str(exc)})
            continue
        kind = str(classify(rel, scope.layout))
        file_id, already = ledger.begin_copy(
            handle.session_id,
            rel,
            kind=kind,
            size=item["size"],
            mtime_ns=item["mtime_ns"],
            batch=batch,
            ready_at=datetime.fromisoformat(item["ready_at"]) if item.get("ready_at") else None,
        )
        if already and dst.exists():
            report.skipped.append(rel)
            continue
        started = time.monotonic()
        try:
            result = copy_verified(
                src,
                dst,
                file_mode=facility.permissions.file_mode,
                dir_mode=facility.permissions.dir_mode,
                chunk_bytes=chunk,
                expected=(item["size"], item["mtime_ns"]),
            )
        except SourceChangedError as exc:
            ledger.release(file_id, str(exc))
            report.retry_later.append(rel)
            log.info("%s", exc)
            continue
        except (TransferError, OSError) as exc:
            ledger.mark_failed(file_id, str(exc))
            report.failed.append({"relpath": rel, "error": str(exc)})
            log.error("FAILED %s: %s", rel, exc)
            continue
        seconds = time.monotonic() - started
        ledger.mark_verified(
            file_id, checksum=result.checksum, dest_path=str(dst), copy_seconds=seconds
        )
        mb = result.size / 1e6
        if result.copied:
            log.info(
                "copied %s (%.1f MB, %.0f MB/s, xxh3 %s)",
                rel,
                mb,
                mb / max(seconds, 1e-6),
                result.checksum,
            )
        else:
            log.info("already in place and identical: %s", rel)
        report.copied.append({"relpath": rel, "file_id": file_id, "kind": kind, "dest": str(dst)})
    return report


def close_session(facility: FacilityConfig, handle: SessionHandle, reason: str) -> dict[str, Any]:
    """Mark the session closed and write a summary beside its logs."""
    ledger = Ledger(facility.storage.ledger_url)
    ledger.close_session(handle.session_id, reason)
    counts = ledger.counts(handle.session_id)
    failed = [
        {"relpath": f.relpath, "error": f.error}
        for f in ledger.files(handle.session_id, FileState.FAILED)
    ]
    summary = {
        "session_id": handle.session_id,
        "closed_at": datetime.now(UTC).isoformat(),
        "reason": reason,
        "files": counts,
        "failed": failed,
        "processing": ledger.stage_counts(handle.session_id),
    }
    target = Path(handle.dest_root) / "logs" / "session_summary.json"
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, facility.permissions.file_mode)
    with os.fdopen(fd, "w") as fh:
        json.dump(summary, fh, indent=2)
    os.chmod(tmp, facility.permissions.file_mode)
    os.replace(tmp, target)
    return summary
