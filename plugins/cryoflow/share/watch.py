"""The decision loop of a share watch, free of Airflow so it can be tested and reused.

One ``ShareWatch.poll()`` scans the session folder, feeds the stability tracker and says whether a
batch is ready, the session is over, or to keep waiting. The Airflow trigger only sleeps between
polls and turns the outcome into a TriggerEvent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


@dataclass
class Outcome:
    status: str  # "wait" | "ready" | "ended"
    reason: str = ""
    files: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pending: int = 0

    def payload(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "files": self.files,
            "refused": self.refused,
            "errors": self.errors[:50],
            "pending": self.pending,
        }


class ShareWatch:
    """Tracks one session folder across polls.

    ``done`` maps relpaths already dealt with (verified, or given up on) to the (size, mtime_ns)
    they had then; such a file is offered again only if it changed on the share.
    """

    def __init__(
        self,
        settings: WatchSettings,
        done: dict[str, tuple[int, int]],
        started: float,
        tracker: StabilityTracker | None = None,
    ) -> None:
        self.settings = settings
        self.done = done
        self.tracker = tracker or StabilityTracker(settings.settle_seconds)
        self.last_activity = started
        self.first_ready_at: float | None = None

    def _is_done(self, rel: str, stat: FileStat) -> bool:
        return self.done.get(rel) == (stat.size, stat.mtime_ns)

    def poll(self, now: float, wall: datetime | None = None) -> Outcome:
        s = self.settings
        wall = wall or datetime.now(UTC)
        if not s.root.is_dir():
            # The session folder may not exist yet when the operator starts the run early.
            return self._idle_or_wait(now, wall, errors=[f"{s.root}: folder does not exist (yet)"])
        scan = scan_tree(s.root, s.exclude)
        todo = {rel: st for rel, st in scan.files.items() if not self._is_done(rel, st)}
        obs = self.tracker.observe(todo, now)
        ready = obs.ready
        if obs.changed:
            self.last_activity = now
        if ready and self.first_ready_at is None:
            self.first_ready_at = now
        batch_due = ready and (
            len(ready) >= s.batch_max_files
            or now - (self.first_ready_at or now) >= s.batch_window_seconds
            or not obs.settling  # nothing else is on its way: no reason to hold the batch back
        )
        if batch_due:
            chosen = sorted(ready)[: s.batch_max_files]
            files = [
                {
                    "relpath": rel,
                    "size": todo[rel].size,
                    "mtime_ns": todo[rel].mtime_ns,
                    "ready_at": wall.isoformat(),
                }
                for rel in chosen
            ]
            return Outcome(
                "ready",
                reason=f"{len(files)} file(s) complete",
                files=files,
                refused=scan.refused,
                errors=scan.errors,
                pending=len(todo) - len(files),
            )
        out = self._idle_or_wait(now, wall, errors=scan.errors)
        out.refused, out.pending = scan.refused, len(todo)
        return out

    def _idle_or_wait(self, now: float, wall: datetime, errors: list[str]) -> Outcome:
        s = self.settings
        if s.deadline is not None and wall >= s.deadline:
            return Outcome("ended", reason=f"session end time {s.deadline.isoformat()} reached")
        if self.first_ready_at is None and now - self.last_activity >= s.idle_timeout_seconds:
            minutes = s.idle_timeout_seconds / 60
            return Outcome("ended", reason=f"no new files for {minutes:g} min (idle timeout)")
        return Outcome("wait", errors=errors)
