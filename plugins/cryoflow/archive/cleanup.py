"""Share cleanup: free the microscope's disk of files whose copy is proven safe on GPFS.

Off unless a microscope's ``cleanup.mode`` says otherwise; ``dry-run`` decides and reports but
deletes nothing. A file on the share is deleted only when every check below holds, in this order,
re-checked at the moment of deletion (anything else keeps it, with the reason recorded):

1. the ledger has its copy VERIFIED, in a CLOSED session of this microscope, at least
   ``min_age_hours`` ago, and it is the relpath's latest version (a newer version that is not
   verified keeps it);
2. the session is not running, and no running session's folder holds the file;
3. the relpath stays inside the session's folder (no ``..``, no symlink out of it);
4. the share still has what was verified: a regular file of the same size and mtime (a file that
   changed is new data);
5. the destination is a regular file inside the session's tree, of the ledger's size, carrying
   the archive attributes, the checksum one equal to ``xxh3_128:<ledger checksum>``;
6. with ``reread_checksum``, the destination read again now (page cache dropped) has the
   ledger's checksum;
7. just before the unlink: the session is still closed and the share's file unchanged.

Only the source is ever deleted, never anything at the destination. Every decision is one log
line and one row of the ledger's ``cryoflow_cleanup`` table
(:class:`~cryoflow.ledger.store.CleanupRow`); the session view sums each file's latest decision
(``ViewQueries.disk``). The share is reached through :class:`SourceFiles` (stat and unlink by
relpath): a mounted share or SMB. Nothing here imports Airflow.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from cryoflow.archive.settings import CleanupConfig
from cryoflow.archive.tagging import TAGS, read_tags
from cryoflow.ingest.share.scan import UnsafePathError, resolve_in, safe_relpath
from cryoflow.ingest.transfer import CHECKSUM_ALGORITHM, file_checksum
from cryoflow.ledger.store import FileRow, Ledger, SessionRow
from cryoflow.names import shown

if TYPE_CHECKING:
    from cryoflow.config import FacilityConfig, MicroscopeConfig

log = logging.getLogger(__name__)

Mode = Literal["off", "dry-run", "delete"]


class Action(enum.StrEnum):
    DELETED = "deleted"
    WOULD_DELETE = "would-delete"  # dry-run: every check passed, nothing deleted
    KEPT = "kept"
    GONE = "gone"  # no longer on the share (deleted by someone else): not examined again


class Reason(enum.StrEnum):
    SAFE = "verified-at-destination"
    SESSION_RUNNING = "session-running"
    NEWER_VERSION = "newer-version-not-verified"
    UNSAFE_PATH = "unsafe-path"
    SOURCE_MISSING = "source-missing"
    SOURCE_NOT_FILE = "source-not-a-file"
    SOURCE_CHANGED = "source-changed"
    SOURCE_ERROR = "source-unreadable"
    NO_DESTINATION = "no-destination-recorded"
    DEST_OUTSIDE = "destination-outside-session"
    DEST_MISSING = "destination-missing"
    DEST_NOT_FILE = "destination-not-a-file"
    DEST_SIZE = "destination-size"
    DEST_UNTAGGED = "destination-untagged"
    DEST_TAGS = "destination-tags-differ"
    DEST_CHECKSUM = "destination-checksum"
    DEST_ERROR = "destination-unreadable"
    DELETE_FAILED = "delete-failed"


#: kept for a reason that means a verified copy on GPFS is damaged or gone: logged as a warning
DAMAGE = frozenset(r for r in Reason if r.name.startswith("DEST_"))


# --------------------------------------------------------------------------- the share


@dataclass(frozen=True)
class SourceStat:
    size: int
    mtime_ns: int
    regular: bool  # a regular file (not a symlink, folder or device)


class SourceFiles(Protocol):
    """The files of one session folder on the microscope share, addressed by relpath.

    ``stat`` returns None for a file that is not there and raises :class:`UnsafePathError` for a
    relpath that leads outside the folder; both refuse to follow symlinks. A share over SMB
    implements the same three calls."""

    def location(self, relpath: str) -> str: ...

    def stat(self, relpath: str) -> SourceStat | None: ...

    def unlink(self, relpath: str) -> None: ...

    def close(self) -> None: ...


class LocalSourceFiles:
    """A session folder on a mounted share (CIFS) or any local folder.

    The relpath is checked with :func:`resolve_in`, then walked from the folder one component at
    a time with ``O_NOFOLLOW``, and the file is stat'ed and unlinked relative to its parent's
    descriptor: a folder swapped for a symlink between the check and the unlink is refused, not
    followed."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def location(self, relpath: str) -> str:
        return str(self.root / relpath)

    @contextlib.contextmanager
    def _parent(self, relpath: str) -> Iterator[tuple[int, str]]:
        path = resolve_in(self.root, relpath)
        parts = path.relative_to(self.root).parts
        if not parts:
            raise UnsafePathError(f"{relpath!r} is the session folder itself")
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        try:
            for part in parts[:-1]:
                try:
                    child = os.open(part, flags, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafePathError(f"{relpath!r}: {part!r} is not a folder") from exc
                    raise
                os.close(fd)
                fd = child
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def stat(self, relpath: str) -> SourceStat | None:
        try:
            with self._parent(relpath) as (fd, name):
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            if not self.root.is_dir():  # a share that is not mounted is not "gone"
                raise OSError(
                    errno.ENODEV, "session folder not found (is the share mounted?)", str(self.root)
                ) from None
            return None
        return SourceStat(st.st_size, st.st_mtime_ns, stat.S_ISREG(st.st_mode))

    def unlink(self, relpath: str) -> None:
        with self._parent(relpath) as (fd, name):
            os.unlink(name, dir_fd=fd)

    def close(self) -> None:
        """Nothing held between calls."""


class SmbSourceFiles:
    """A session folder read directly over SMB (:class:`cryoflow.ingest.share.smb.SmbSource`).

    Each folder on the way to the file is looked up in its parent's listing and must be a plain
    folder (no reparse point: a link or junction on the Windows side is refused, not followed);
    the file's own entry gives size, mtime and whether it is a plain file. A share that is away
    raises (``ShareOffline``): the file is kept, never taken for gone."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def location(self, relpath: str) -> str:
        return self.source.location(relpath)

    def _entry(self, relpath: str) -> Any | None:
        from cryoflow.ingest.share.smb import FILE_ATTRIBUTE_DIRECTORY, FILE_ATTRIBUTE_REPARSE_POINT

        rel = safe_relpath(relpath)
        parts = rel.split("/")
        for i in range(1, len(parts)):
            folder = self.source._entry("/".join(parts[:i]))
            if folder is None:
                return None
            attrs = folder.smb_info.file_attributes
            if attrs & FILE_ATTRIBUTE_REPARSE_POINT or not attrs & FILE_ATTRIBUTE_DIRECTORY:
                raise UnsafePathError(f"{relpath!r}: {parts[i - 1]!r} is not a folder")
        return self.source._entry(rel)

    def stat(self, relpath: str) -> SourceStat | None:
        from cryoflow.ingest.share.smb import FILE_ATTRIBUTE_DIRECTORY, FILE_ATTRIBUTE_REPARSE_POINT

        entry = self._entry(relpath)
        if entry is None:
            if not self.source.exists():  # the session folder itself is gone: not "deleted"
                raise OSError(errno.ENODEV, "session folder not found", self.source.root)
            return None
        info = entry.smb_info
        odd = FILE_ATTRIBUTE_DIRECTORY | FILE_ATTRIBUTE_REPARSE_POINT
        return SourceStat(
            info.end_of_file, self.source.mtime_ns(info), not info.file_attributes & odd
        )

    def unlink(self, relpath: str) -> None:
        self.source.remove(safe_relpath(relpath))

    def close(self) -> None:
        self.source.close()


def local_sources(session: SessionRow) -> SourceFiles:
    return LocalSourceFiles(session.source_root)


def sources_for(scope: MicroscopeConfig) -> Callable[[SessionRow], SourceFiles]:
    """How cleanup reaches each session's folder: by the folder the session recorded, not
    the microscope's current ``share.kind`` (sessions from before a switch from a CIFS mount
    to SMB keep their mounted path): a mounted share as local paths, an SMB share through the
    microscope's Airflow Connection."""
    from cryoflow.ingest.share.source import is_smb_root, source_for

    conn_id = scope.share.conn_id

    def sources(session: SessionRow) -> SourceFiles:
        if not is_smb_root(session.source_root):
            return local_sources(session)
        if not conn_id:
            raise ValueError(
                f"session {session.name!r} was read over SMB ({session.source_root}) but "
                f"microscope {scope.id!r} names no share.conn_id to reach it"
            )
        return SmbSourceFiles(source_for(session.source_root, conn_id))

    return sources


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    file_id: int
    session_id: int
    session: str
    relpath: str
    size: int
    action: Action
    reason: Reason
    detail: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["action"], data["reason"] = str(self.action), str(self.reason)
        data["relpath"] = shown(self.relpath)
        return data


@dataclass
class CleanupReport:
    microscope: str
    mode: Mode
    decisions: list[Decision] = field(default_factory=list)
    #: verified files not examined (yet): "session-running" / "too-young" -> (files, bytes)
    waiting: dict[str, tuple[int, int]] = field(default_factory=dict)
    note: str = ""

    def of(self, action: Action) -> list[Decision]:
        return [d for d in self.decisions if d.action == action]

    @property
    def deleted(self) -> list[Decision]:
        return self.of(Action.DELETED)

    @property
    def would_delete(self) -> list[Decision]:
        return self.of(Action.WOULD_DELETE)

    @property
    def kept(self) -> list[Decision]:
        return self.of(Action.KEPT)

    def to_dict(self, limit: int = 500) -> dict[str, Any]:
        """JSON for the task's return value (XCom); at most ``limit`` files per list (the log
        and the ledger hold every one)."""
        out: dict[str, Any] = {"microscope": self.microscope, "mode": self.mode}
        for action in Action:
            rows = self.of(action)
            key = str(action).replace("-", "_")
            out[key] = [d.to_dict() for d in rows[:limit]]
            out[f"{key}_files"] = len(rows)
            out[f"{key}_bytes"] = sum(d.size for d in rows)
        out["waiting"] = {k: {"files": n, "bytes": b} for k, (n, b) in self.waiting.items()}
        out["note"] = self.note
        return out


def effective_mode(configured: Mode, dry_run: bool) -> Mode:
    """A run asked for a dry run never deletes; ``off`` stays off."""
    if configured == "delete" and dry_run:
        return "dry-run"
    return configured


def _under(path: str, root: str) -> bool:
    path, root = os.path.normpath(path), os.path.normpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _Cleanup:
    """One run over one microscope's candidates."""

    def __init__(
        self,
        ledger: Ledger,
        microscope: str,
        config: CleanupConfig,
        *,
        mode: Mode,
        xattr_prefix: str,
        sources: Callable[[SessionRow], SourceFiles],
        run_id: str,
    ) -> None:
        self.ledger, self.microscope, self.config = ledger, microscope, config
        self.mode, self.prefix, self.sources, self.run_id = mode, xattr_prefix, sources, run_id
        self._folders: dict[int, SourceFiles] = {}

    def folder(self, session: SessionRow) -> SourceFiles:
        if session.id not in self._folders:
            self._folders[session.id] = self.sources(session)
        return self._folders[session.id]

    def close(self) -> None:
        """Every session folder's connection (one per session over SMB) is let go."""
        for folder in self._folders.values():
            try:
                folder.close()
            except OSError as exc:  # the run's decisions are recorded already
                log.debug("closing %s: %s", shown(folder.location("")), exc)
        self._folders.clear()

    def running(self, session_id: int, location: str) -> str | None:
        """Why the file belongs to a running session (read from the ledger now), or None."""
        running = self.ledger.running_sessions(self.microscope)
        if session_id in running:
            return "its session is open again"
        for other, root in running.items():
            if _under(location, root):
                return f"it lies in the folder of running session {other} ({shown(root)})"
        return None

    def decide(self, file: FileRow, session: SessionRow, newer: bool) -> Decision:
        src = self.folder(session)
        rel = file.relpath

        def made(action: Action, reason: Reason, detail: str) -> Decision:
            return Decision(
                file.id, session.id, session.name, rel, file.size, action, reason, detail
            )

        def keep(reason: Reason, detail: str) -> Decision:
            return made(Action.KEPT, reason, detail)

        location = src.location(rel)
        if why := self.running(session.id, location):
            return keep(Reason.SESSION_RUNNING, why)
        if newer:
            return keep(Reason.NEWER_VERSION, "a later version of this file is not verified yet")
        if not file.dest_path or not file.checksum:
            return keep(Reason.NO_DESTINATION, "the ledger has no destination or checksum")
        found = self.source_matches(src, file)
        if isinstance(found, tuple):
            return made(*found)
        problem = self.destination_problem(file, session)
        if problem is not None:
            return keep(*problem)
        # the checks took time (a checksum re-read of GBs): confirm right before the unlink
        if why := self.running(session.id, location):
            return keep(Reason.SESSION_RUNNING, why)
        found = self.source_matches(src, file)
        if isinstance(found, tuple):
            action, reason, detail = found
            return made(action, reason, f"{detail} (while it was being checked)")
        checks = "size, archive tags" + (
            f", {CHECKSUM_ALGORITHM} re-read" if self.config.reread_checksum else ""
        )
        detail = f"destination {shown(file.dest_path)}: {checks} match the ledger"
        if self.mode == "dry-run":
            return made(Action.WOULD_DELETE, Reason.SAFE, detail)
        try:
            src.unlink(rel)
        except FileNotFoundError:
            return made(Action.GONE, Reason.SOURCE_MISSING, "vanished from the share")
        except (OSError, UnsafePathError) as exc:
            return keep(Reason.DELETE_FAILED, f"unlink failed: {shown(exc)}")
        return made(Action.DELETED, Reason.SAFE, detail)

    @staticmethod
    def source_matches(src: SourceFiles, file: FileRow) -> tuple[Action, Reason, str] | None:
        """None when the share still holds exactly what was verified; else the decision."""
        try:
            st = src.stat(file.relpath)
        except UnsafePathError as exc:
            return Action.KEPT, Reason.UNSAFE_PATH, f"not followed: {shown(exc)}"
        except OSError as exc:
            return Action.KEPT, Reason.SOURCE_ERROR, shown(exc)
        if st is None:
            return Action.GONE, Reason.SOURCE_MISSING, "no longer on the share"
        if not st.regular:
            return Action.KEPT, Reason.SOURCE_NOT_FILE, "not a regular file on the share"
        if (st.size, st.mtime_ns) != (file.size, file.mtime_ns):
            return (
                Action.KEPT,
                Reason.SOURCE_CHANGED,
                f"the share has {st.size} bytes, mtime {st.mtime_ns}; verified were "
                f"{file.size} bytes, mtime {file.mtime_ns}: new data",
            )
        return None

    def destination_problem(self, file: FileRow, session: SessionRow) -> tuple[Reason, str] | None:
        dst = Path(file.dest_path or "")
        where = shown(dst)
        if not _under(str(dst), session.dest_root):
            return Reason.DEST_OUTSIDE, f"{where} is outside {shown(session.dest_root)}"
        try:
            st = os.stat(dst, follow_symlinks=False)
        except FileNotFoundError:
            return Reason.DEST_MISSING, f"{where} does not exist"
        except OSError as exc:
            return Reason.DEST_ERROR, shown(exc)
        if not stat.S_ISREG(st.st_mode):
            return Reason.DEST_NOT_FILE, f"{where} is not a regular file"
        if st.st_size != file.size:
            return Reason.DEST_SIZE, f"{where} has {st.st_size} bytes, the ledger {file.size}"
        tags = read_tags(dst, self.prefix)
        missing = [f"{self.prefix}{name}" for name in TAGS if name not in tags]
        if missing:
            return Reason.DEST_UNTAGGED, f"{where} lacks {', '.join(missing)}"
        want = f"{CHECKSUM_ALGORITHM}:{file.checksum}"
        if tags["checksum"] != want:
            return Reason.DEST_TAGS, f"{where} is tagged {tags['checksum']!r}, the ledger {want}"
        if tags["session"] != Path(session.dest_root).name:
            return Reason.DEST_TAGS, f"{where} is tagged for session {tags['session']!r}"
        if self.config.reread_checksum:
            try:
                got = file_checksum(dst, drop_cache=True)
            except OSError as exc:
                return Reason.DEST_ERROR, shown(exc)
            if got != file.checksum:
                return (
                    Reason.DEST_CHECKSUM,
                    f"{where} reads {CHECKSUM_ALGORITHM} {got} now, verified {file.checksum}",
                )
        return None

    def record(self, decision: Decision) -> None:
        self.ledger.record_cleanup(
            file_id=decision.file_id,
            session_id=decision.session_id,
            microscope=self.microscope,
            action=str(decision.action),
            reason=str(decision.reason),
            detail=decision.detail,
            size=decision.size,
            run=self.run_id,
        )


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _log(decision: Decision, location: str) -> None:
    head = f"{shown(location)} ({_mb(decision.size)}, session {shown(decision.session)})"
    if decision.action == Action.DELETED:
        log.info("DELETED %s: %s", head, decision.detail)
    elif decision.action == Action.WOULD_DELETE:
        log.info("WOULD DELETE %s: %s", head, decision.detail)
    elif decision.action == Action.GONE:
        log.info("GONE %s: %s", head, decision.detail)
    else:
        level = logging.WARNING if decision.reason in DAMAGE else logging.INFO
        log.log(level, "KEPT %s: %s: %s", head, decision.reason, decision.detail)


def run_cleanup(
    ledger: Ledger,
    microscope: str,
    config: CleanupConfig,
    *,
    xattr_prefix: str,
    mode: Mode | None = None,
    sources: Callable[[SessionRow], SourceFiles] = local_sources,
    now: datetime | None = None,
    run_id: str = "",
) -> CleanupReport:
    """One cleanup pass over a microscope's share (``mode`` overrides ``config.mode``)."""
    mode = mode or config.mode
    report = CleanupReport(microscope, mode)
    if mode == "off":
        report.note = "cleanup is off (cleanup.mode: off): nothing examined, nothing deleted"
        log.info("Share cleanup of %s: %s", microscope, report.note)
        return report
    cutoff = (now or datetime.now(UTC)) - timedelta(hours=config.min_age_hours)
    report.waiting = ledger.cleanup_waiting(microscope, verified_before=cutoff)
    run = _Cleanup(
        ledger,
        microscope,
        config,
        mode=mode,
        xattr_prefix=xattr_prefix,
        sources=sources,
        run_id=run_id,
    )
    candidates = ledger.cleanup_candidates(
        microscope, verified_before=cutoff, limit=config.max_files_per_run
    )
    running, young = report.waiting["session-running"], report.waiting["too-young"]
    log.info(
        "Share cleanup of %s (%s): %d file(s) to examine, verified before %s; not examined: "
        "%d file(s) (%s) of running sessions, %d (%s) verified less than %g h ago",
        microscope, mode, len(candidates), cutoff.isoformat(timespec="seconds"),
        running[0], _mb(running[1]), young[0], _mb(young[1]), config.min_age_hours,
    )  # fmt: skip
    try:
        for file, session, newer in candidates:
            decision = run.decide(file, session, newer)
            run.record(decision)
            _log(decision, run.folder(session).location(file.relpath))
            report.decisions.append(decision)
    finally:
        run.close()
    done = Action.DELETED if mode == "delete" else Action.WOULD_DELETE
    freed = report.of(done)
    report.note = (
        f"{len(freed)} file(s), {_mb(sum(d.size for d in freed))} "
        f"{'deleted' if mode == 'delete' else 'would be deleted (dry-run)'}; "
        f"{len(report.kept)} kept, {len(report.of(Action.GONE))} gone from the share"
    )
    if len(candidates) >= config.max_files_per_run:
        report.note += f"; more remain (max_files_per_run {config.max_files_per_run})"
    log.info("Share cleanup of %s (%s): %s", microscope, mode, report.note)
    return report


def cleanup_microscope(
    facility: FacilityConfig,
    scope: MicroscopeConfig,
    *,
    dry_run: bool = False,
    run_id: str = "",
    now: datetime | None = None,
) -> CleanupReport:
    """The DAG's task: the microscope's configured cleanup, a dry run if asked."""
    return run_cleanup(
        Ledger(facility.storage.ledger_url),
        scope.id,
        scope.cleanup,
        xattr_prefix=facility.archive.xattr_prefix,
        mode=effective_mode(scope.cleanup.mode, dry_run),
        sources=sources_for(scope),
        now=now,
        run_id=run_id,
    )
