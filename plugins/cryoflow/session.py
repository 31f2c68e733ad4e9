"""A microscope session: its parameters (the trigger form) and its lifecycle steps.

Pure logic over config, ledger, session tree and transfer; the Airflow tasks in
``cryoflow.operators.session_tasks`` are thin calls into these functions.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cryoflow.archive.aggregate import AggregateError, aggregate_small_files, aggregate_status
from cryoflow.archive.tagging import tag_summary, tag_verified
from cryoflow.config import CurationThresholds, FacilityConfig, MicroscopeConfig, config_dir
from cryoflow.ingest.session_tree import SessionPaths, create_session_tree, resolve_gid
from cryoflow.ingest.share.layout import classify
from cryoflow.ingest.share.scan import PathResolver, UnsafePathError, safe_relpath
from cryoflow.ingest.share.source import SourceFile, is_smb_root, session_root, source_for
from cryoflow.ingest.transfer import (
    CHECKSUM_ALGORITHM,
    CopyResult,
    SourceChangedError,
    Staged,
    TransferError,
    commit_copy,
    fsync_dir,
    read_ahead,
    read_back_from_storage,
    stage_copy,
    sync_filesystem,
)
from cryoflow.ledger.store import CopyClaim, CopyStart, FileState, Ledger, Verified
from cryoflow.names import from_text, shown, to_text
from cryoflow.processing.steps import Switches, first_steps

log = logging.getLogger(__name__)

SESSION_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
UNIX_NAME_PATTERN = r"^[a-z_][a-z0-9_.-]{0,31}$"


class SessionClosedError(RuntimeError):
    """A continuation batch found its session closed (an operator ended it meanwhile)."""


class SessionParamsError(ValueError):
    """The session form holds an invalid value; the message names the field."""


def _optional(title: str, description: str = "", **kw: Any) -> Any:
    """An optional text field: null in the form (a typed Param is otherwise required there)."""
    return Field(None, title=title, description=description, **kw)


class SessionParams(BaseModel):
    """The fields of the trigger form: the one definition of their types and bounds (the DAG's
    form is generated from it, see :func:`form_params`); defaults come from the microscope's
    YAML."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    session_name: str = Field(
        pattern=SESSION_NAME_PATTERN,
        title="Session name",
        description="Letters, digits, . _ - (max 64).",
    )
    source_folder: str | None = _optional(
        "Folder on the share", "Where EPU/SerialEM writes; empty = the session name."
    )
    project: str | None = _optional("Project / proposal")
    unix_group: str | None = _optional(
        "Unix group of the experiment",
        "Owns the data on GPFS; empty = the service's group.",
        pattern=UNIX_NAME_PATTERN,
    )
    collaborators: list[str] | None = Field(
        default_factory=list, title="Collaborators", description="Unix users, granted ACLs."
    )
    sample: str | None = _optional("Sample")
    pixel_size_A: float = Field(gt=0.1, lt=20, title="Pixel size (Å)")
    kv: float = Field(ge=60, le=400, title="Voltage (kV)")
    cs_mm: float = Field(ge=0, le=10, title="Cs (mm)")
    amp_contrast: float = Field(0.07, ge=0, lt=1, title="Amplitude contrast")
    dose_per_frame: float = Field(gt=0, lt=50, title="Dose per frame (e/Å²)")
    frames: int = Field(ge=1, le=2000, title="Frames", description="Frames or EER fractions.")
    gain_reference: str | None = _optional(
        "Gain reference file", "File name or glob within the session folder."
    )
    motioncor: bool = Field(True, title="Motion correction")
    ctf: bool = Field(True, title="CTF estimation")
    picking: bool = Field(True, title="Particle picking")
    particle_diameter_A: float = Field(150.0, gt=10, lt=2000, title="Particle diameter (Å)")
    # Curation thresholds: defaults from the microscope's ``curation:``; empty = that default.
    max_total_drift_A: float | None = _optional("Curation: max total drift (Å)", gt=0)
    max_fit_resolution_A: float | None = _optional("Curation: worst CTF fit resolution (Å)", gt=0)
    min_defocus_um: float | None = _optional("Curation: min defocus (µm)", ge=0)
    max_defocus_um: float | None = _optional("Curation: max defocus (µm)", gt=0)
    max_astigmatism_A: float | None = _optional("Curation: max astigmatism (Å)", gt=0)
    min_particles: float | None = _optional("Curation: min particles per micrograph", ge=0)
    idle_timeout_minutes: float = Field(gt=0, title="End after idle (minutes)")
    max_hours: float = Field(gt=0, title="Longest session (hours)")
    end_time: str | None = _optional(
        "End time", "ISO date-time at which the session ends; empty = none."
    )

    @field_validator("collaborators", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator(
        "source_folder", "project", "unix_group", "sample", "gain_reference", "end_time",
        *CurationThresholds.model_fields, mode="before",
    )  # fmt: skip
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

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

    def thresholds(self, defaults: CurationThresholds) -> CurationThresholds:
        """The session's curation thresholds: the form's values over the microscope's."""
        given = {k: getattr(self, k) for k in CurationThresholds.model_fields}
        merged = defaults.model_dump() | {k: v for k, v in given.items() if v is not None}
        try:
            return CurationThresholds.model_validate(merged)
        except ValidationError as exc:
            raise SessionParamsError(
                f"curation thresholds: {exc.errors()[0]['msg']} (given: {merged})"
            ) from None


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
        **scope.curation.thresholds.model_dump(),
        "idle_timeout_minutes": s.idle_timeout_minutes,
        "max_hours": s.max_hours,
    }


_SCHEMA_KEYS = (
    "type", "items", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "title", "description",
)  # fmt: skip


def form_params(scope: MicroscopeConfig) -> dict[str, dict[str, Any]]:
    """The trigger form, field by field (``Param(**spec)``), generated from
    :class:`SessionParams` so the form and the validation can never disagree."""
    defaults = form_defaults(scope)
    form: dict[str, dict[str, Any]] = {}
    for name, prop in SessionParams.model_json_schema()["properties"].items():
        field = SessionParams.model_fields[name]
        spec: dict[str, Any] = {}
        if "anyOf" in prop:  # optional: JSON-schema null plus the real type's constraints
            members = [m for m in prop["anyOf"] if m.get("type") != "null"]
            spec["type"] = ["null", *(m["type"] for m in members)]
            for member in members:
                spec.update({k: v for k, v in member.items() if k != "type"})
        spec.update({k: v for k, v in prop.items() if k in _SCHEMA_KEYS and k != "type"})
        spec.setdefault("type", prop.get("type"))
        if name in defaults:
            default = defaults[name]
        elif field.is_required():
            default = ""
        else:
            default = field.get_default(call_default_factory=True)
        if default == "" and isinstance(spec["type"], list):
            default = None
        form[name] = {"default": default, **{k: v for k, v in spec.items() if v not in (None, "")}}
    return form


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


#: The session name's help in Airflow's trigger form, which flags a bad value only after Trigger,
#: at the top of its dialog. The link is relative to the UI's ``<base href>`` (Airflow's base URL,
#: whatever its ``[api] base_url``): the session view's start form (cryoflow.view.app, mounted at
#: ``cryoflow/view``). Airflow shows ``description_md`` only for a Param without ``description``.
START_FORM_HELP = (
    "{description} Airflow's form flags a bad value only after Trigger, at the top of this "
    "dialog; the [start form of the Sessions view](cryoflow/view/start/{microscope}) checks each "
    "value beside its field as you leave it."
)


def trigger_form_params(scope: MicroscopeConfig) -> dict[str, dict[str, Any]]:
    """Airflow's trigger form: :func:`form_params`, the session name's help leading to the
    session view's start form (which checks each value beside its field)."""
    specs = form_params(scope)
    name = specs["session_name"]
    name["description_md"] = START_FORM_HELP.format(
        description=name.pop("description", ""), microscope=scope.id
    )
    return specs


def open_session(
    facility: FacilityConfig,
    scope: MicroscopeConfig,
    params: SessionParams,
    *,
    now: datetime | None = None,
    reopen: bool = True,
) -> tuple[SessionHandle, list[str]]:
    """Create (or find) the session's tree and ledger row; idempotent across runs. A closed
    session is reopened only by a new trigger (``reopen``), never by a continuation batch."""
    now = now or datetime.now(UTC)
    ledger = Ledger(facility.storage.ledger_url)
    existing = ledger.find_session(scope.id, params.session_name)
    if existing is not None and existing.state == "closed" and not reopen:
        raise SessionClosedError(
            f"session {params.session_name} was closed ({existing.close_reason})"
        )
    source_root = session_root(scope.share, params.folder)  # a mounted path or smb://...
    paths = SessionPaths.for_session(facility.storage.gpfs_root, now.year, params.session_name)
    session_id = ledger.open_session(
        scope.id,
        params.session_name,
        dest_root=str(paths.root),
        source_root=str(source_root),
        # ``thresholds``: what the verdicts and the session view use for this session
        params={
            **params.model_dump(),
            "thresholds": params.thresholds(scope.curation.thresholds).model_dump(),
        },
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
    if reopen and (again := ledger.offer_again(session_id)):
        notes.append(f"{again} file(s) that failed or were incomplete are offered again")
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
        return {k: [_jsonable(v) for v in vs] for k, vs in self.__dict__.items()}


def _jsonable(value: Any) -> Any:
    """XCom is JSON: names that are not UTF-8 go in the ledger's lossless text form."""
    if isinstance(value, str):
        return to_text(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


NAME_MAX = 255


def versioned(path: Path, version: int) -> Path:
    """``name.v2.tiff`` beside ``name.tiff``: the n-th different copy of one source (the stem is
    shortened when the name would pass the 255-byte limit)."""
    if version <= 1:
        return path
    suffix, tag = path.suffix, f".v{version}"
    stem = os.fsencode(path.name[: len(path.name) - len(suffix)])
    room = NAME_MAX - len(os.fsencode(tag + suffix))
    return path.with_name(os.fsdecode(stem[:room]) + tag + suffix)


def _retry_at(facility: FacilityConfig, attempts: int) -> datetime:
    t = facility.transfer
    delay = min(t.retry_max_seconds, t.retry_seconds * 2 ** max(0, min(attempts - 1, 20)))
    return datetime.now(UTC) + timedelta(seconds=delay)


def ingest_event(
    facility: FacilityConfig,
    scope: MicroscopeConfig,
    handle: SessionHandle,
    event: dict[str, Any],
    batch: str,
    switches: Switches,
) -> BatchReport:
    """What one watch event asks for: record the files whose writer gave up before they were
    whole, then copy the finished ones."""
    ledger = Ledger(facility.storage.ledger_url)
    for warning in event.get("warnings", []):
        log.warning("%s", warning)
    for item in event.get("incomplete", []):
        rel = from_text(item["relpath"])
        ledger.mark_incomplete(
            handle.session_id,
            rel,
            kind=str(classify(rel, scope.layout)),
            size=item["size"],
            mtime_ns=item["mtime_ns"],
            reason=item["why"],
        )
        log.error(
            "INCOMPLETE %s: %s. Its writer stopped before the file was whole: not copied, not "
            "processed; offered again if it changes on the share or the session is triggered "
            "again",
            shown(rel), item["why"],
        )  # fmt: skip
    files = event.get("files", []) if event.get("status") == "ready" else []
    return transfer_batch(facility, scope, handle, files, batch, switches)


def transfer_batch(
    facility: FacilityConfig,
    scope: MicroscopeConfig,
    handle: SessionHandle,
    files: list[dict[str, Any]],
    batch: str,
    switches: Switches,
) -> BatchReport:
    """Copy a batch to ``<session>/raw`` with ``transfer.streams`` files in flight, each verified;
    one bad file never stops the rest.

    The ledger is written in few transactions: one for the batch's start, and one per group of
    verified copies (after their folders were fsync-ed), so that many small files do not cost
    several synchronous commits each. A verified movie owes its processing steps in the
    transaction that records it verified. A failed copy stays owed: it is offered again after a
    backoff, forever for a transient fault (disk full, read-only, share away), up to
    ``transfer.max_attempts`` tries for any other.
    """
    report = BatchReport(copied=[], skipped=[], failed=[], retry_later=[])
    ledger = Ledger(facility.storage.ledger_url)
    jobs: list[_CopyJob] = []
    # Over SMB one source (one connection) serves the batch's copy threads.
    smb = None
    if is_smb_root(handle.source_root):
        smb = source_for(handle.source_root, scope.share.conn_id)
    resolve = PathResolver(Path(handle.source_root)) if smb is None else None
    for item in files:
        rel = from_text(item["relpath"])
        try:
            src = (
                resolve(rel) if resolve is not None else SourceFile(smb, safe_relpath(rel))
            )
            dst = Path(handle.dest_root) / "raw" / safe_relpath(rel)
        except UnsafePathError as exc:
            report.failed.append({"relpath": rel, "error": shown(exc)})
            continue
        ready = datetime.fromisoformat(item["ready_at"]) if item.get("ready_at") else None
        start = CopyStart(
            rel, str(classify(rel, scope.layout)), item["size"], item["mtime_ns"], ready
        )
        jobs.append(_CopyJob(start, src, dst))
    if not jobs:
        return report
    claims = ledger.begin_copies(handle.session_id, [j.start for j in jobs], batch=batch)
    verified: list[tuple[Verified, dict[str, Any]]] = []

    def record() -> None:
        for folder in {Path(v.dest_path).parent for v, _ in verified}:
            fsync_dir(folder)  # the renames are durable before the ledger says "verified"
        ledger.mark_verified_many(v for v, _ in verified)
        report.copied.extend(entry for _, entry in verified)
        verified.clear()

    streams = max(1, min(facility.transfer.streams, len(jobs)))
    recorded_at = time.monotonic()
    work = list(zip(jobs, claims, strict=True))
    small = [(j, c) for j, c in work if j.start.size < SMALL_FILE_BYTES]
    large = [(j, c) for j, c in work if j.start.size >= SMALL_FILE_BYTES]
    with ThreadPoolExecutor(streams, thread_name_prefix="copy") as pool:
        # Futures report through one queue (``wait`` on the rest would cost O(n) per result).
        results: queue.SimpleQueue[Future] = queue.SimpleQueue()

        def submit(phase: str, fn: Any, *args: Any) -> None:
            pool.submit(lambda: (phase, fn(*args))).add_done_callback(results.put)

        def run(chunks: list[list[tuple[_CopyJob, CopyClaim]]]) -> None:
            """Copy chunk after chunk. A small file is written without its own fsync; once
            its chunk is written, one sync and a read-back from the storage verify the chunk
            while the next chunk is being written, then each file gets its final name.
            What is verified is recorded at least every RECORD_SECONDS."""
            nonlocal recorded_at
            pending, to_stage, index = 0, 0, 0
            staged: list[tuple[_CopyJob, CopyClaim, Staged, float]] = []
            while True:
                if to_stage == 0:  # the chunk is written: start the next, verify this one
                    if index < len(chunks):
                        for job, claim in chunks[index]:
                            submit("stage", _stage_one, facility, handle, job, claim, switches)
                        pending += len(chunks[index])
                        to_stage = len(chunks[index])
                        index += 1
                    if staged:
                        sync_filesystem(Path(handle.dest_root))
                        evicted = read_back_from_storage(s[2].tmp for s in staged)
                        for s in staged:
                            submit("finish", _finish_one, facility, handle, *s, switches,
                                   s[2].tmp in evicted)  # fmt: skip
                        pending += len(staged)
                        staged = []
                if not pending:
                    return
                try:
                    phase, outcome = results.get(timeout=RECORD_SECONDS).result()
                except queue.Empty:
                    if verified:
                        record()
                        recorded_at = time.monotonic()
                    continue
                pending -= 1
                to_stage -= phase == "stage"
                if isinstance(outcome[2], Staged):
                    staged.append((outcome[0], outcome[1], outcome[2], outcome[3]))
                elif outcome[2] is None:
                    getattr(report, outcome[0]).append(outcome[1])
                else:
                    verified.append((outcome[2], outcome[1]))
                if verified and (
                    len(verified) >= 64 or time.monotonic() - recorded_at >= RECORD_SECONDS
                ):
                    record()
                    recorded_at = time.monotonic()

        # Small files first: they are in the ledger before the movies' longer copies start.
        if resolve is not None:  # in a pool thread: on a CIFS mount the opens are round trips
            pool.submit(read_ahead, [j.src for j, _ in small])
        run([small[k : k + SMALL_CHUNK] for k in range(0, len(small), SMALL_CHUNK)])
        record()
        run([large])
    record()
    if smb is not None:
        smb.close()  # its connection (and receiver thread) would outlive the batch otherwise
    return report


# Verified copies reach the ledger in groups, at least this often.
RECORD_SECONDS = 0.5


@dataclass(frozen=True)
class _CopyJob:
    start: CopyStart
    src: Path | SourceFile
    dst: Path


# Below this size a file is not fsync-ed on its own: a chunk of small files shares one sync.
SMALL_FILE_BYTES = 4 << 20
SMALL_CHUNK = 64


def _stage_one(
    facility: FacilityConfig,
    handle: SessionHandle,
    job: _CopyJob,
    claim: CopyClaim,
    switches: Switches,
) -> tuple[Any, ...]:
    """One file of a batch, in a pool thread: (report bucket, entry, what to record verified),
    or, for a small file, (job, claim, Staged, start time) to finish after the batch's sync.
    Never raises for a file's own trouble; a failure is recorded at once."""
    rel = job.start.relpath
    if claim.already and job.dst.exists():
        return "skipped", rel, None
    started = time.monotonic()
    try:
        staged = stage_copy(
            job.src,
            versioned(job.dst, claim.version),
            file_mode=facility.permissions.file_mode,
            dir_mode=facility.permissions.dir_mode,
            chunk_bytes=facility.transfer.chunk_mib << 20,
            expected=(job.start.size, job.start.mtime_ns),
            durable=job.start.size >= SMALL_FILE_BYTES,
        )
    except TransferError as exc:
        return _failed(facility, claim, rel, exc)
    if isinstance(staged, CopyResult):  # identical copy already in place
        target = versioned(job.dst, claim.version)
        return _verified(facility, handle, job, claim, staged, target, started, switches)
    if job.start.size < SMALL_FILE_BYTES:
        return job, claim, staged, started
    return _finish_one(facility, handle, job, claim, staged, started, switches)


def _finish_one(
    facility: FacilityConfig,
    handle: SessionHandle,
    job: _CopyJob,
    claim: CopyClaim,
    staged: Staged,
    started: float,
    switches: Switches,
    evicted: bool = False,
) -> tuple[str, Any, Verified | None]:
    """Read the staged copy back and name it: the first free version of its name."""
    names = (versioned(job.dst, v) for v in range(claim.version, claim.version + 1000))
    try:
        result, target = commit_copy(staged, names, evicted=evicted)
    except TransferError as exc:
        return _failed(facility, claim, job.start.relpath, exc)
    return _verified(facility, handle, job, claim, result, target, started, switches)


def _failed(
    facility: FacilityConfig, claim: CopyClaim, rel: str, exc: TransferError
) -> tuple[str, Any, None]:
    ledger = Ledger(facility.storage.ledger_url)
    if isinstance(exc, SourceChangedError):
        ledger.release(claim.file_id, str(exc))
        log.info("%s", shown(exc))
        return "retry_later", rel, None
    attempts = ledger.attempts(claim.file_id)
    ledger.mark_failed(
        claim.file_id,
        shown(exc),
        transient=exc.transient,
        retry_after=_retry_at(facility, attempts),
    )
    if exc.transient:
        why = "transient fault: offered again, however long it takes"
    else:
        tries = facility.transfer.max_attempts
        why = f"try {attempts} of {tries}" + (
            ", now waits for a person" if attempts >= tries else ", offered again"
        )
    log.error("FAILED %s (%s): %s", shown(rel), why, shown(exc))
    return "failed", {"relpath": rel, "error": shown(exc)}, None


def _verified(
    facility: FacilityConfig,
    handle: SessionHandle,
    job: _CopyJob,
    claim: CopyClaim,
    result: CopyResult,
    target: Path,
    started: float,
    switches: Switches,
) -> tuple[str, Any, Verified]:
    rel, dst, kind = job.start.relpath, job.dst, job.start.kind
    seconds = time.monotonic() - started
    archived = _tag(facility, handle, target, result.checksum)
    if claim.replaces is not None or target != dst:
        log.warning(
            "%s changed on the share after it was verified: the new content is copied to %s, "
            "the earlier copy %s is kept",
            shown(rel), shown(target), shown(claim.replaces or dst),
        )  # fmt: skip
    mb = result.size / 1e6
    if result.copied:
        log.info(
            "copied %s (%.1f MB, %.0f MB/s, xxh3 %s)",
            shown(rel), mb, mb / max(seconds, 1e-6), result.checksum,
        )  # fmt: skip
    else:
        log.info("already in place and identical: %s", shown(rel))
    entry = {"relpath": rel, "file_id": claim.file_id, "kind": kind, "dest": str(target)}
    owe = tuple(first_steps(switches, kind))
    verified = Verified(claim.file_id, result.checksum, str(target), seconds, owe, archived)
    return "copied", entry, verified


def _tag(facility: FacilityConfig, handle: SessionHandle, path: Path, checksum: str) -> bool:
    """Archive attributes on the verified copy (the HSM policy migrates what carries them); True
    when they were set and read back. A file system without user xattrs only means the file
    stays on disk: logged, not failed."""
    archive = facility.archive
    if not archive.tagging:
        return False
    try:
        tag_verified(
            path,
            prefix=archive.xattr_prefix,
            session=Path(handle.dest_root).name,
            checksum=f"{CHECKSUM_ALGORITHM}:{checksum}",
            archive_class=archive.archive_class,
            verified_at=datetime.now(UTC),
        )
    except OSError as exc:
        log.warning("%s verified but not tagged for the archive: %s", shown(path), shown(exc))
        return False
    return True


def close_session(
    facility: FacilityConfig, handle: SessionHandle, reason: str, *, max_attempts: int
) -> dict[str, Any]:
    """Mark the session closed and write its summary (processing rewrites it when the last
    owed step is done)."""
    ledger = Ledger(facility.storage.ledger_url)
    ledger.close_session(handle.session_id, reason)
    archive, perms = facility.archive, facility.permissions
    if archive.aggregate:  # the share is done writing: bundle the small files for tape
        try:
            aggregate_small_files(
                Path(handle.dest_root),
                patterns=archive.aggregate_patterns,
                max_bytes=int(archive.aggregate_max_mib * (1 << 20)),
                file_mode=perms.file_mode,
                dir_mode=perms.dir_mode,
                tag_prefix=archive.xattr_prefix if archive.tagging else None,
                archive_class=archive.aggregate_class,
            )
        except (OSError, AggregateError) as exc:  # the files themselves are safe on disk
            log.error("Small-file tar of %s not written: %s", handle.dest_root, shown(exc))
    if archive.hsm_mode != "off":
        _hsm_step(facility, ledger, handle)
    return write_summary(facility, handle.session_id, max_attempts=max_attempts)


HSM_REPORT = "hsm_report.json"  # in <session>/logs/: what the HSM node said, for the summary
HSM_POLICY = "gpfs/hsm-migrate.pol"  # in the config folder: what goes to tape


def _hsm_step(facility: FacilityConfig, ledger: Ledger, handle: SessionHandle) -> None:
    """(Pre)migrate the session's verified raw files (and its small-file tar) on the HSM node
    and record what ``dsmls`` says of each. The session is closed whatever the node answers:
    a failure is recorded and logged, and the GPFS policy still migrates the tagged files."""
    from cryoflow.archive.hsm import run_hsm_step
    from cryoflow.archive.ilm_policy import file_facts, load_policy
    from cryoflow.hooks.hsm import HsmNodeHook

    archive = facility.archive
    candidates = [
        Path(f.dest_path)
        for f in ledger.files(handle.session_id, FileState.VERIFIED)
        if f.dest_path
    ]
    tar_dir = Path(handle.dest_root) / "archive"
    if tar_dir.is_dir():
        candidates += sorted(p for p in tar_dir.iterdir() if p.suffix == ".tar")
    started = datetime.now(UTC)
    try:
        # Exactly what the facility's ILM policy sends to tape (tagged raw files, the tar),
        # never the metadata and previews it keeps on disk: a stub of those needs a recall.
        policy = load_policy(config_dir() / HSM_POLICY)
        paths = [p for p in candidates if policy.selects(file_facts(p))]
        with HsmNodeHook(archive.hsm_ssh_conn_id or "") as node:
            report: dict[str, Any] = run_hsm_step(paths, archive, node.run).as_dict()
    except Exception as exc:  # noqa: BLE001 - SSH, the node, a command: the close goes on
        report = {"mode": archive.hsm_mode, "ok": False, "error": shown(exc)}
        log.error("HSM step (%s via %s) failed: %s", archive.hsm_mode,
                  archive.hsm_ssh_conn_id, shown(exc))  # fmt: skip
    else:
        files = report["files"]
        log.info("HSM step (%s): %s", archive.hsm_mode,
                 ", ".join(f"{n} {state}" for state, n in files.items() if n))  # fmt: skip
        if not report["ok"]:
            log.warning("HSM step incomplete: %d missing, %d skipped, %d failed commands",
                        len(report["missing"]), len(report["skipped"]),
                        sum(c["exit_status"] != 0 for c in report["commands"]))  # fmt: skip
    report["started_at"] = started.isoformat()
    report["finished_at"] = datetime.now(UTC).isoformat()
    target = Path(handle.dest_root) / "logs" / HSM_REPORT
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, facility.permissions.file_mode)
    with os.fdopen(fd, "w") as fh:
        json.dump(report, fh, indent=2)
    os.chmod(tmp, facility.permissions.file_mode)
    os.replace(tmp, target)


def _archive_summary(facility: FacilityConfig, ledger: Ledger, row: Any) -> dict[str, Any]:
    """Read from the files themselves: what carries the tags the HSM policy migrates on."""
    prefix = facility.archive.xattr_prefix
    copies = [Path(f.dest_path) for f in ledger.files(row.id, FileState.VERIFIED) if f.dest_path]
    hsm = Path(row.dest_root) / "logs" / HSM_REPORT
    return {
        "tags": tag_summary(copies, prefix).as_dict() if facility.archive.tagging else None,
        "small_files_tar": aggregate_status(Path(row.dest_root), prefix),
        # the HSM node's answer when the session closed (None: the step is off or not run yet)
        "hsm": json.loads(hsm.read_text()) if hsm.is_file() else None,
    }


def write_summary(
    facility: FacilityConfig, session_id: int, *, max_attempts: int
) -> dict[str, Any]:
    """``<session>/logs/session_summary.json`` from the ledger alone, written atomically."""
    ledger = Ledger(facility.storage.ledger_url)
    row = ledger.get_session(session_id)
    owed = ledger.owed_count(session_id, max_attempts)
    summary = {
        "session_id": session_id,
        "session": row.name,
        "microscope": row.microscope,
        "state": row.state,
        "closed_at": row.closed_at.isoformat() if row.closed_at else None,
        "reason": row.close_reason,
        "written_at": datetime.now(UTC).isoformat(),
        "processing_complete": owed == 0,
        "steps_owed": owed,
        "files": ledger.counts(session_id),
        # Not verified (yet): each with why, and for a failing copy whether it still retries.
        "not_copied": [
            {
                "relpath": to_text(f.relpath),
                "state": str(f.state),
                "why": f.error,
                "attempts": f.attempts,
                "transient": f.transient,
                "next_try": f.retry_after.isoformat() if f.retry_after else None,
                "waits_for_a_person": f.state == FileState.FAILED
                and not f.transient
                and f.attempts >= facility.transfer.max_attempts,
            }
            for f in ledger.still_owed(session_id)
        ],
        "processing": ledger.stage_counts(session_id),
        "archive": _archive_summary(facility, ledger, row),
    }
    target = Path(row.dest_root) / "logs" / "session_summary.json"
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, facility.permissions.file_mode)
    with os.fdopen(fd, "w") as fh:
        json.dump(summary, fh, indent=2)
    os.chmod(tmp, facility.permissions.file_mode)
    os.replace(tmp, target)
    ledger.mark_summary_written(session_id, final=row.state == "closed" and owed == 0)
    return summary
