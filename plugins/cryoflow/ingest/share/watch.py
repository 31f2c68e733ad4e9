"""The decision loop of a share watch, free of Airflow so it can be tested and reused.

One ``ShareWatch.poll()`` scans the session folder, feeds the stability tracker and says whether a
batch is ready, the session is over, or to keep waiting. The Airflow trigger only sleeps between
polls and turns the outcome into a TriggerEvent.

A quiet file is ready only once its format says it is whole (``completeness``): a writer that
pauses mid-movie for longer than the settle time must not get its half file copied as a movie.
Over SMB it must also not be held open for writing by the microscope PC (``source``).

A share that is offline raises :class:`ShareOffline` out of ``poll`` (the trigger pauses and
tries again): nothing is concluded from it. So is a session folder that is gone or lists empty
while the ledger has files from it: an unmounted CIFS share, or an empty folder put in its
place, must never read as "every file was deleted".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from cryoflow.ingest.share.completeness import Completeness, check_complete
from cryoflow.ingest.share.layout import FileKind, Layout, classify
from cryoflow.ingest.share.scan import FileStat, StabilityTracker
from cryoflow.ingest.share.source import HeldForWriting, LocalSource, ShareOffline, ShareSource
from cryoflow.names import shown, to_text


@dataclass(frozen=True)
class WatchSettings:
    root: Path
    exclude: tuple[str, ...] = ()
    settle_seconds: float = 30.0
    # A file whose format proves it finished (``_proven_whole``) is ready after this long
    # unchanged instead of ``settle_seconds``; None: every file sits out the settle time.
    whole_settle_seconds: float | None = None
    batch_max_files: int = 200
    batch_window_seconds: float = 60.0
    idle_timeout_seconds: float = 3600.0
    deadline: datetime | None = None
    layout: str = "epu"
    expected_frames: int | None = None  # frames per movie (the session form), TIFF/MRC only
    incomplete_after_seconds: float = 600.0
    # A movie whole by its format but with fewer frames than expected goes after this long
    # unchanged (its writer is not pausing: the form's frame count is wrong), with a warning.
    short_after_seconds: float = 30.0


@dataclass
class Outcome:
    status: str  # "wait" | "ready" | "ended"
    reason: str = ""
    files: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pending: int = 0
    # Unchanged for ``incomplete_after_seconds`` and still not whole: the writer gave up.
    incomplete: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        """JSON-safe: relpaths in the ledger's lossless text form, messages escaped."""
        return {
            "status": self.status,
            "reason": self.reason,
            "files": self.files,
            "refused": [shown(r) for r in self.refused],
            "errors": [shown(e) for e in self.errors[:50]],
            "pending": self.pending,
            "incomplete": self.incomplete,
            "warnings": [shown(w) for w in self.warnings],
        }


class ShareWatch:
    """Tracks one session folder across polls.

    ``done`` maps relpaths already dealt with (verified, or given up on) to the (size, mtime_ns)
    they had then; such a file is offered again only if it changed on the share.
    """

    def __init__(
        self,
        settings: WatchSettings,
        done: Mapping[str, tuple[int, int] | None],
        started: float,
        tracker: StabilityTracker | None = None,
        backing_off: Mapping[str, float] | None = None,
        checker: Callable[[Path, int | None], Completeness] | None = None,
        source: ShareSource | None = None,
    ) -> None:
        self.settings = settings
        self.source: ShareSource = source or LocalSource(settings.root)
        self.done = done
        self.tracker = tracker or StabilityTracker(settings.settle_seconds)
        self.last_activity = started
        self.first_ready_at: float | None = None
        # Failed copies owed again from this (monotonic) time on, not before: a backoff.
        self.backing_off = dict(backing_off or {})
        self.checker = checker or self._check_source
        self._verdicts: dict[str, tuple[FileStat, Completeness]] = {}
        # Frames per movie: the form's count until a whole movie shows another one.
        self.frames = settings.expected_frames
        self._held: dict[str, str] = {}  # quiet, not whole (yet): relpath -> why
        self._offline_since: float | None = None

    def _check_source(self, path: Path, frames: int | None) -> Completeness:
        if isinstance(self.source, LocalSource):
            return check_complete(path, expected_frames=frames)
        return self.source.check_complete(path.relative_to(self.settings.root).as_posix(), frames)

    def _is_done(self, rel: str, stat: FileStat, now: float) -> bool:
        if now < self.backing_off.get(rel, 0.0):
            return True
        return self.done.get(rel) == (stat.size, stat.mtime_ns)

    def _counts_frames(self, rel: str) -> bool:
        """The frame count applies to TIFF and MRC movies; an EER holds raw frames, not the
        fractions the form counts, and other files have no frames."""
        if PurePosixPath(rel).suffix.lower() == ".eer":
            return False
        return classify(rel, Layout(self.settings.layout)) is FileKind.MOVIE

    def _completeness(self, rel: str, stat: FileStat) -> Completeness:
        """Whole by its format: checked once per size and mtime (a header and the page table,
        never the data). The frame count is compared by the caller."""
        cached = self._verdicts.get(rel)
        if cached is not None and cached[0] == stat:
            return cached[1]
        verdict = self.checker(self.settings.root / rel, None)
        self._verdicts[rel] = (stat, verdict)
        return verdict

    def _proven_whole(self, rel: str, stat: FileStat) -> bool:
        """Whole by its format *and* unable to grow: a movie with the session's frame count, an
        EER with the frames its metadata promises, well-formed XML. Only these may skip the
        settle time: a TIFF or MRC whose count is not known could still get frames appended."""
        s = self.settings
        if s.whole_settle_seconds is None or s.whole_settle_seconds >= s.settle_seconds:
            return False
        verdict = self._verdict(rel, stat)
        if verdict is None or not verdict.complete:
            return False
        if verdict.final:
            return True
        frames, expected = verdict.frames, self.frames
        return (
            frames is not None
            and expected is not None
            and frames >= expected
            and self._counts_frames(rel)
        )

    def _verdict(self, rel: str, stat: FileStat) -> Completeness | None:
        """The format's verdict, or None while its writer still has the file open."""
        try:
            held = self.source.held_for_writing(rel)
            return None if held else self._completeness(rel, stat)
        except HeldForWriting:
            return None

    def _readiness(self, rel: str, stat: FileStat, now: float) -> tuple[str, str]:
        """("ready" | "held" | "abandoned", why) for a file quiet for the settle time."""
        s = self.settings
        verdict = self._verdict(rel, stat)
        if verdict is None:  # its writer still has it open: not finished, however quiet
            return "held", "open for writing on the share"
        quiet = self.tracker.unchanged_for(rel, now)
        if not verdict.complete:
            return ("abandoned" if quiet >= s.incomplete_after_seconds else "held"), verdict.reason
        frames, expected = verdict.frames, self.frames
        if frames is None or expected is None or frames >= expected or not self._counts_frames(rel):
            return "ready", ""
        why = f"{frames} of {expected} frames"
        if quiet < s.short_after_seconds:
            return "held", why  # most likely its writer is between two frames
        return "ready", why

    def poll(self, now: float, wall: datetime | None = None) -> Outcome:
        s = self.settings
        wall = wall or datetime.now(UTC)
        try:
            if not self.source.exists():
                self._suspect("is gone")
                self._resumed(now)
                # The session folder may not exist yet when the operator starts the run early.
                return self._idle_or_wait(
                    now, wall, errors=[f"{self.source}: folder does not exist (yet)"]
                )
            scan = self.source.scan(s.exclude)
            if not scan.files:
                self._suspect("lists no files")
        except ShareOffline:
            if self._offline_since is None:
                self._offline_since = now
            if s.deadline is not None and wall >= s.deadline:
                return Outcome("ended", reason=f"session end time {s.deadline.isoformat()} reached")
            raise
        self._resumed(now)
        todo = {rel: st for rel, st in scan.files.items() if not self._is_done(rel, st, now)}
        for rel in [r for r in self._verdicts if r not in todo]:
            del self._verdicts[rel]
        obs = self.tracker.observe(todo, now)
        ready, settling, abandoned, warnings = set(), set(obs.settling), [], []
        errors = list(scan.errors)
        self._held = {}
        quick = s.whole_settle_seconds
        if quick is not None:  # settling, but quiet long enough for a file proven whole
            for rel in sorted(obs.settling - obs.changed):
                if self.tracker.unchanged_for(rel, now) < quick:
                    continue
                try:
                    if self._proven_whole(rel, todo[rel]):
                        ready.add(rel)
                        settling.discard(rel)
                except ShareOffline:
                    raise
                except OSError:  # vanished or unreadable: the settle path decides later
                    continue
        for rel in obs.ready:
            try:
                state, why = self._readiness(rel, todo[rel], now)
            except ShareOffline:
                raise
            except OSError as exc:  # vanished or unreadable since the scan: the next poll sees
                errors.append(f"{rel}: {exc.strerror or exc}")
                settling.add(rel)
                continue
            if state == "ready":
                ready.add(rel)
                if why:  # whole, but shorter than expected for longer than a writer pauses
                    warnings.append(
                        f"{rel}: {why}; copied as a whole movie: the session's movies have "
                        f"{self._completeness(rel, todo[rel]).frames} frames from now on"
                    )
                    self.frames = self._completeness(rel, todo[rel]).frames
            elif state == "abandoned":
                abandoned.append({**self._entry(rel, todo[rel], wall), "why": why})
            else:
                settling.add(rel)  # quiet but not whole: its writer may only be pausing
                self._held[rel] = why
        if obs.changed:
            self.last_activity = now
        if ready and self.first_ready_at is None:
            self.first_ready_at = now
        batch_due = bool(abandoned) or (
            ready
            and (
                len(ready) >= s.batch_max_files
                or now - (self.first_ready_at or now) >= s.batch_window_seconds
                or not settling  # nothing else is on its way: no reason to hold the batch back
            )
        )
        if batch_due:
            chosen = sorted(ready)[: s.batch_max_files]
            files = [self._entry(rel, todo[rel], wall) for rel in chosen]
            return Outcome(
                "ready",
                reason=f"{len(files)} file(s) complete",
                files=files,
                refused=scan.refused,
                errors=errors,
                pending=len(todo) - len(files) - len(abandoned),
                incomplete=abandoned,
                warnings=warnings,
            )
        out = self._idle_or_wait(now, wall, errors=errors, pending=len(todo))
        out.refused, out.pending, out.warnings = scan.refused, len(todo), warnings
        if out.status == "ended":  # what was still not whole is recorded, never just dropped
            out.incomplete = [
                {**self._entry(rel, todo[rel], wall), "why": f"{why} when the session ended"}
                for rel, why in sorted(self._held.items())
            ]
        return out

    def _suspect(self, what: str) -> None:
        """The folder ``what`` while the ledger has files from it: offline, not emptied."""
        if self.done:
            raise ShareOffline(
                str(self.source),
                f"the session folder {what} while {len(self.done)} of its files are in the "
                "ledger (share unmounted, offline or replaced?); nothing is concluded until "
                "they show again",
            )

    def _resumed(self, now: float) -> None:
        """Back after being offline: the idle clock did not run meanwhile (nobody could see)."""
        if self._offline_since is not None:
            self.last_activity += now - self._offline_since
            self._offline_since = None

    def carry_over(self, now: float, outcome: Outcome) -> dict[str, list[int | float]]:
        """The stability state the next batch run's watch starts from: what is still on its
        way. The files ``outcome`` hands over (to copy, or as incomplete) are the ledger's from
        now on; kept here they would count twice (the session view reads this state as the
        movies still settling on the share)."""
        handed = {f["relpath"] for f in (*outcome.files, *outcome.incomplete)}
        return {
            rel: entry
            for rel, entry in self.tracker.snapshot(now).items()
            if to_text(rel) not in handed
        }

    @staticmethod
    def _entry(rel: str, stat: FileStat, wall: datetime) -> dict[str, Any]:
        return {
            "relpath": to_text(rel),
            "size": stat.size,
            "mtime_ns": stat.mtime_ns,
            "ready_at": wall.isoformat(),
        }

    def _idle_or_wait(
        self, now: float, wall: datetime, errors: list[str], pending: int = 0
    ) -> Outcome:
        """The end time ends a session whatever is on its way; idleness only once nothing is
        (a quiet file not yet whole, or still settling, is on its way)."""
        s = self.settings
        if s.deadline is not None and wall >= s.deadline:
            return Outcome("ended", reason=f"session end time {s.deadline.isoformat()} reached")
        idle = now - self.last_activity >= s.idle_timeout_seconds
        if self.first_ready_at is None and idle and not pending:
            minutes = s.idle_timeout_seconds / 60
            return Outcome("ended", reason=f"no new files for {minutes:g} min (idle timeout)")
        return Outcome("wait", errors=errors)
