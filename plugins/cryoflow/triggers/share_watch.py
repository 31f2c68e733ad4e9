"""Deferrable watch of a microscope share: a waiting session holds no worker slot.

The filesystem walk and the ledger reads run in a thread (a CIFS mount can stall for seconds; the
triggerer's event loop must not), under a timeout that reports a hung mount instead of hanging.
The trigger yields exactly one event: a batch of finished files, or the end of the session (idle
timeout, end time, or an operator's end request in the ledger). Errors never end a session: the
watch reports them and tries again with backoff. A share that is offline (SMB server down,
network, credentials refused; or a session folder that vanished or lists empty while the ledger
has files from it) pauses the watch with one clear warning; it resumes by itself.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from cryoflow.ingest.share.scan import StabilityTracker
from cryoflow.ingest.share.source import ShareOffline, ShareSource, source_for
from cryoflow.ingest.share.watch import Outcome, ShareWatch, WatchSettings
from cryoflow.ledger.store import Ledger, utcnow


class DoneFilesCache:
    """The done files of recent sessions, kept in the triggerer between batch runs.

    A batch's watch must know which of the share's files are done. Reading the whole list
    from the ledger at every batch would grow with the session; instead the first watch of a
    session (in this process) reads it once and each later one reads only the rows whose copy
    started since the last read (less a margin for a copy that was still running), through an
    index. An entry that later went stale only matters if the file changed on the share, and
    then its size or mtime differs and it is offered again anyway.
    """

    MARGIN = timedelta(minutes=30)

    def __init__(self, max_sessions: int = 64) -> None:
        self.max_sessions = max_sessions
        self._entries: OrderedDict[tuple[str, int], tuple[dict, datetime]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ledger: Ledger, session_id: int, max_attempts: int) -> dict:
        key = (ledger.url, session_id)
        now = utcnow()
        with self._lock:
            cached = self._entries.get(key)
        if cached is None:
            done = ledger.done_files(session_id, max_attempts)
        else:
            done, read_at = cached
            since = read_at - self.MARGIN
            for rel, stat in ledger.done_files(
                session_id, max_attempts, touched_since=since
            ).items():
                if stat is None:
                    done.pop(rel, None)
                else:
                    done[rel] = stat
        with self._lock:
            self._entries[key] = (done, now)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_sessions:
                self._entries.popitem(last=False)
        return done


DONE_FILES = DoneFilesCache()

# In the saved watch state beside the relpaths (which never start with "/"): frames per movie.
FRAMES_KEY = "/frames"


class ShareWatchTrigger(BaseTrigger):
    def __init__(
        self,
        *,
        root: str,
        ledger_url: str,
        session_id: int,
        exclude: list[str] | None = None,
        settle_seconds: float = 30.0,
        whole_settle_seconds: float | None = None,
        poll_seconds: float = 10.0,
        batch_max_files: int = 200,
        batch_window_seconds: float = 60.0,
        idle_timeout_seconds: float = 3600.0,
        deadline: str | None = None,
        max_attempts: int = 3,
        poll_timeout_seconds: float = 60.0,
        backoff_max_seconds: float = 60.0,
        layout: str = "epu",
        expected_frames: int | None = None,
        incomplete_after_seconds: float = 600.0,
        short_after_seconds: float = 30.0,
        smb_conn_id: str | None = None,
    ) -> None:
        super().__init__()
        self.root = root
        self.ledger_url = ledger_url
        self.session_id = session_id
        self.exclude = list(exclude or [])
        self.settle_seconds = settle_seconds
        self.whole_settle_seconds = whole_settle_seconds
        self.poll_seconds = poll_seconds
        self.batch_max_files = batch_max_files
        self.batch_window_seconds = batch_window_seconds
        self.idle_timeout_seconds = idle_timeout_seconds
        self.deadline = deadline
        self.max_attempts = max_attempts
        self.poll_timeout_seconds = poll_timeout_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.layout = layout
        self.expected_frames = expected_frames
        self.incomplete_after_seconds = incomplete_after_seconds
        self.short_after_seconds = short_after_seconds
        self.smb_conn_id = smb_conn_id  # an smb:// root: the Airflow Connection to log in with
        self._source: ShareSource | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "root": self.root,
                "ledger_url": self.ledger_url,
                "session_id": self.session_id,
                "exclude": self.exclude,
                "settle_seconds": self.settle_seconds,
                "whole_settle_seconds": self.whole_settle_seconds,
                "poll_seconds": self.poll_seconds,
                "batch_max_files": self.batch_max_files,
                "batch_window_seconds": self.batch_window_seconds,
                "idle_timeout_seconds": self.idle_timeout_seconds,
                "deadline": self.deadline,
                "max_attempts": self.max_attempts,
                "poll_timeout_seconds": self.poll_timeout_seconds,
                "backoff_max_seconds": self.backoff_max_seconds,
                "layout": self.layout,
                "expected_frames": self.expected_frames,
                "incomplete_after_seconds": self.incomplete_after_seconds,
                "short_after_seconds": self.short_after_seconds,
                "smb_conn_id": self.smb_conn_id,
            },
        )

    def _settings(self) -> WatchSettings:
        return WatchSettings(
            root=Path(self.root),
            exclude=tuple(self.exclude),
            settle_seconds=self.settle_seconds,
            whole_settle_seconds=self.whole_settle_seconds,
            batch_max_files=self.batch_max_files,
            batch_window_seconds=self.batch_window_seconds,
            idle_timeout_seconds=self.idle_timeout_seconds,
            deadline=datetime.fromisoformat(self.deadline) if self.deadline else None,
            layout=self.layout,
            expected_frames=self.expected_frames,
            incomplete_after_seconds=self.incomplete_after_seconds,
            short_after_seconds=self.short_after_seconds,
        )

    # -- work done in a thread (blocking filesystem and database calls) --------------------

    def _start(self) -> ShareWatch:
        ledger = Ledger(self.ledger_url)
        done = DONE_FILES.get(ledger, self.session_id, self.max_attempts)
        now = time.monotonic()
        settings = self._settings()
        state = ledger.watch_state(self.session_id)
        tracker = StabilityTracker.restore(settings.settle_seconds, state, now)
        wall = utcnow()
        backing_off = {
            rel: now + (when - wall).total_seconds()
            for rel, when in ledger.backing_off(self.session_id, wall).items()
        }
        self.log.info(
            "Watching %s (%d files already done, %d failed copies waiting to be tried again)",
            self.root, len(done), len(backing_off),
        )  # fmt: skip
        self._source = source_for(self.root, self.smb_conn_id)
        watch = ShareWatch(
            settings,
            done,
            started=now,
            tracker=tracker,
            backing_off=backing_off,
            source=self._source,
        )
        learned = state.get(FRAMES_KEY)
        if isinstance(learned, list) and learned and type(learned[0]) is int and learned[0] > 0:
            watch.frames = learned[0]  # what the session's movies showed, over the form's
        return watch

    def _poll(self, watch: ShareWatch) -> Outcome:
        ledger = Ledger(self.ledger_url)
        requested = ledger.end_requested(self.session_id)
        if requested:
            return Outcome("ended", reason=requested)
        now = time.monotonic()
        outcome = watch.poll(now)
        if outcome.status != "wait":
            # Files still settling keep their stability for the next batch run's watch.
            state: dict[str, Any] = dict(watch.carry_over(now, outcome))
            if watch.frames is not None:
                state[FRAMES_KEY] = [watch.frames]
            ledger.save_watch_state(self.session_id, state)
        return outcome

    # -- the loop --------------------------------------------------------------------------

    async def _in_thread(self, what: str, fn: Any, *args: Any) -> Any:
        """Run a blocking call in a thread; while it has not returned after the poll timeout,
        report it (a hung CIFS mount) and keep waiting for the same call, never piling up
        threads on a dead mount."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        waited = 0.0
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), self.poll_timeout_seconds)
            except TimeoutError:
                waited += self.poll_timeout_seconds
                self.log.error(
                    "%s of %s has not returned after %.1f s: is the share's mount hung?",
                    what, self.root, waited,
                )  # fmt: skip

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            async for event in self._events():
                yield event
        finally:  # also when cancelled: an SMB connection must not outlive its watch
            close = getattr(self._source, "close", None)
            if close is not None:
                await asyncio.to_thread(close)

    async def _events(self) -> AsyncIterator[TriggerEvent]:
        failures = 0
        offline: str | None = None
        watch: ShareWatch | None = None
        reported: set[str] = set()
        while True:
            try:
                if watch is None:
                    watch = await self._in_thread("Opening the watch", self._start)
                outcome = await self._in_thread("A poll", self._poll, watch)
            except ShareOffline as exc:  # pause: no file is concluded gone, nothing is copied
                failures += 1
                delay = min(self.backoff_max_seconds, self.poll_seconds * 2 ** min(failures, 10))
                if str(exc) != offline:  # once per cause, not on every try
                    self.log.warning(
                        "PAUSED: %s. The watch of %s waits and resumes by itself (next try in "
                        "%.1f s); no file is taken as deleted meanwhile",
                        exc, self.root, delay,
                    )  # fmt: skip
                offline = str(exc)
                await asyncio.sleep(delay)
                continue
            except Exception as exc:  # share or ledger trouble: report, back off, go on
                failures += 1
                delay = min(self.backoff_max_seconds, self.poll_seconds * 2 ** min(failures, 10))
                self.log.warning(
                    "Watch of %s failed (%d in a row), next try in %.1f s: %s",
                    self.root, failures, delay, exc,
                )  # fmt: skip
                await asyncio.sleep(delay)
                continue
            if offline is not None:
                self.log.warning("RESUMED: the share of %s answers again", self.root)
                offline = None
            if failures:
                self.log.info("Watch of %s works again after %d failure(s)", self.root, failures)
                failures = 0
            for err in outcome.errors[:20]:
                if err not in reported:  # once each, not on every poll
                    self.log.warning("Could not read: %s", err)
            reported = set(outcome.errors[:20])
            if outcome.status != "wait":
                yield TriggerEvent(outcome.payload())
                return
            await asyncio.sleep(self.poll_seconds)
