"""Deferrable watch of a microscope share: a waiting session holds no worker slot.

The filesystem walk and the ledger read run in a thread (a CIFS mount can stall for seconds; the
triggerer's event loop must not). The trigger yields exactly one event: a batch of finished files,
the end of the session, or an error after repeated failures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from cryoflow.ledger import Ledger
from cryoflow.share.watch import ShareWatch, WatchSettings


class ShareWatchTrigger(BaseTrigger):
    def __init__(
        self,
        *,
        root: str,
        ledger_url: str,
        session_id: int,
        exclude: list[str] | None = None,
        settle_seconds: float = 30.0,
        poll_seconds: float = 10.0,
        batch_max_files: int = 200,
        batch_window_seconds: float = 60.0,
        idle_timeout_seconds: float = 3600.0,
        deadline: str | None = None,
        max_attempts: int = 3,
        max_consecutive_errors: int = 30,
    ) -> None:
        super().__init__()
        self.root = root
        self.ledger_url = ledger_url
        self.session_id = session_id
        self.exclude = list(exclude or [])
        self.settle_seconds = settle_seconds
        self.poll_seconds = poll_seconds
        self.batch_max_files = batch_max_files
        self.batch_window_seconds = batch_window_seconds
        self.idle_timeout_seconds = idle_timeout_seconds
        self.deadline = deadline
        self.max_attempts = max_attempts
        self.max_consecutive_errors = max_consecutive_errors

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "root": self.root,
                "ledger_url": self.ledger_url,
                "session_id": self.session_id,
                "exclude": self.exclude,
                "settle_seconds": self.settle_seconds,
                "poll_seconds": self.poll_seconds,
                "batch_max_files": self.batch_max_files,
                "batch_window_seconds": self.batch_window_seconds,
                "idle_timeout_seconds": self.idle_timeout_seconds,
                "deadline": self.deadline,
                "max_attempts": self.max_attempts,
                "max_consecutive_errors": self.max_consecutive_errors,
            },
        )

    def _settings(self) -> WatchSettings:
        return WatchSettings(
            root=Path(self.root),
            exclude=tuple(self.exclude),
            settle_seconds=self.settle_seconds,
            batch_max_files=self.batch_max_files,
            batch_window_seconds=self.batch_window_seconds,
            idle_timeout_seconds=self.idle_timeout_seconds,
            deadline=datetime.fromisoformat(self.deadline) if self.deadline else None,
        )

    def _load_done(self) -> dict[str, tuple[int, int]]:
        return Ledger(self.ledger_url).done_files(self.session_id, self.max_attempts)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        errors = 0
        try:
            done = await asyncio.to_thread(self._load_done)
        except Exception as exc:  # the ledger is unreachable: report, the task fails clearly
            yield TriggerEvent({"status": "error", "reason": f"ledger unreachable: {exc}"})
            return
        watch = ShareWatch(self._settings(), done, started=time.monotonic())
        self.log.info("Watching %s (%d files already done)", self.root, len(done))
        while True:
            try:
                outcome = await asyncio.to_thread(watch.poll, time.monotonic())
                errors = 0
            except OSError as exc:
                errors += 1
                self.log.warning("Share poll failed (%d in a row): %s", errors, exc)
                if errors >= self.max_consecutive_errors:
                    yield TriggerEvent(
                        {"status": "error", "reason": f"share unreadable {errors} times: {exc}"}
                    )
                    return
            else:
                if outcome.status != "wait":
                    yield TriggerEvent(outcome.payload())
                    return
            await asyncio.sleep(self.poll_seconds)
