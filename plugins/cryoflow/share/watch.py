"""The decision loop of a share watch, free of Airflow so it can be tested and reused.

One ``ShareWatch.poll()`` scans the session folder, feeds the stability tracker and says whether a
batch is ready, the session is over, or to keep waiting. The Airflow trigger only sleeps between
polls and turns the outcome into a TriggerEvent.

A quiet file is ready only once its format says it is whole (``completeness``): a writer that
pauses mid-movie for longer than the settle time must not get its half file copied as a movie.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from cryoflow.names import shown, to_text
from cryoflow.share.completeness import Completeness, check_complete
from cryoflow.share.layout import FileKind, Layout, classify
from cryoflow.share.scan import FileStat, StabilityTracker, scan_tree


@dataclass(frozen=True)
class WatchSettings:
    root: Path
    exclude: tuple[str, ...] = ()
    settle_seconds: float = 30.0
    batch_max_files: int = 200
    batch_window_seconds: float = 60.0
    idle_timeout_seconds: float = 3600.0
    deadline: datetime | None = None
    layout: str = "epu"
    expected_frames: int | None = None  # frames per movie (the session form), TIFF/MRC only
    incomplete_after_seconds: float = 600.0


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
    ) -> None:
        self.settings = settings
        self.done = done
        self.tracker = tracker or StabilityTracker(settings.settle_seconds)
        self.last_activity = started
        self.first_ready_at: float | None = None
        # Failed copies owed again from this (monotonic) time on, not before: a backoff.
        self.backing_off = dict(backing_off or {})
        self.checker = checker or (lambda p, n: check_complete(p, expected_frames=n))
        self._verdicts: dict[str, tuple[FileStat, Completeness]] = {}

    def _is_done(self, rel: str, stat: FileStat, now: float) -> bool:
        if now < self.backing_off.get(rel, 0.0):
            return True
        return self.done.get(rel) == (stat.size, stat.mtime_ns)

    def _expected_frames(self, rel: str) -> int | None:
        """The form's frame count applies to TIFF and MRC movies; an EER holds raw frames,
        not the fractions the form counts, and other files have no frames."""
        s = self.settings
        if s.expected_frames is None or PurePosixPath(rel).suffix.lower() == ".eer":
            return None
        return s.expected_frames if classify(rel, Layout(s.layout)) is FileKind.MOVIE else None

    def _completeness(self, rel: str, stat: FileStat) -> Completeness:
        """Checked once per size and mtime (a header and the page table, not the data)."""
        cached = self._verdicts.get(rel)
        if cached is not None and cached[0] == stat:
            return cached[1]
        verdict = self.checker(self.settings.root / rel, self._expected_frames(rel))
        self._verdicts[rel] = (stat, verdict)
        return verdict

    def poll(self, now: float, wall: datetime | None = None) -> Outcome:
        s = self.settings
        wall = wall or datetime.now(UTC)
        if not s.root.is_dir():
            # The session folder may not exist yet when the operator starts the run early.
            return self._idle_or_wait(now, wall, errors=[f"{s.root}: folder does not exist (yet)"])
        scan = scan_tree(s.root, s.exclude)
        todo = {rel: st for rel, st in scan.files.items() if not self._is_done(rel, st, now)}
        for rel in [r for r in self._verdicts if r not in todo]:
            del self._verdicts[rel]
        obs = self.tracker.observe(todo, now)
        ready, settling, abandoned = set(), set(obs.settling), []
        errors = list(scan.errors)
        for rel in obs.ready:
            try:
                verdict = self._completeness(rel, todo[rel])
            except OSError as exc:  # vanished or unreadable since the scan: the next poll sees
                errors.append(f"{rel}: {exc.strerror or exc}")
                settling.add(rel)
                continue
            if verdict.complete:
                ready.add(rel)
            elif self.tracker.unchanged_for(rel, now) >= s.incomplete_after_seconds:
                abandoned.append({**self._entry(rel, todo[rel], wall), "why": verdict.reason})
            else:
                settling.add(rel)  # quiet but not whole: its writer may only be pausing
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
            )
        out = self._idle_or_wait(now, wall, errors=errors)
        out.refused, out.pending = scan.refused, len(todo)
        return out

    @staticmethod
    def _entry(rel: str, stat: FileStat, wall: datetime) -> dict[str, Any]:
        return {
            "relpath": to_text(rel),
            "size": stat.size,
            "mtime_ns": stat.mtime_ns,
            "ready_at": wall.isoformat(),
        }

    def _idle_or_wait(self, now: float, wall: datetime, errors: list[str]) -> Outcome:
        s = self.settings
        if s.deadline is not None and wall >= s.deadline:
            return Outcome("ended", reason=f"session end time {s.deadline.isoformat()} reached")
        if self.first_ready_at is None and now - self.last_activity >= s.idle_timeout_seconds:
            minutes = s.idle_timeout_seconds / 60
            return Outcome("ended", reason=f"no new files for {minutes:g} min (idle timeout)")
        return Outcome("wait", errors=errors)
