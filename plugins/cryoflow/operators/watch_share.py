"""Deferrable operator that waits for the next batch of finished files on a microscope share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context

from cryoflow.config import load_site
from cryoflow.session import SessionHandle
from cryoflow.triggers.share_watch import ShareWatchTrigger


class ShareWatchError(RuntimeError):
    """The share or the ledger could not be read for too long."""


class WatchShareOperator(BaseOperator):
    """Defers to :class:`ShareWatchTrigger`; returns the trigger's payload (files or end)."""

    template_fields: Sequence[str] = ("session",)
    ui_color = "#d9ecf2"

    def __init__(self, *, microscope_id: str, session: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.microscope_id = microscope_id
        self.session = session

    def execute(self, context: Context) -> None:
        site = load_site()
        facility, scope = site.facility, site.microscopes[self.microscope_id]
        handle = SessionHandle.from_dict(self.session)
        params = context["params"]
        transfer = facility.transfer
        trigger = ShareWatchTrigger(
            root=handle.source_root,
            ledger_url=facility.storage.ledger_url,
            session_id=handle.session_id,
            exclude=list(scope.share.exclude),
            settle_seconds=scope.share.settle_seconds or transfer.settle_seconds,
            poll_seconds=transfer.poll_seconds,
            batch_max_files=transfer.batch_max_files,
            batch_window_seconds=transfer.batch_window_seconds,
            idle_timeout_seconds=float(params["idle_timeout_minutes"]) * 60.0,
            deadline=handle.deadline,
        )
        self.log.info("Waiting for finished files in %s", handle.source_root)
        self.defer(trigger=trigger, method_name="execute_complete")

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        status = event.get("status")
        for rel in event.get("refused", []):
            self.log.warning("Refused (points outside the share): %s", rel)
        for err in event.get("errors", []):
            self.log.warning("Could not read: %s", err)
        if status == "error":
            raise ShareWatchError(event.get("reason", "share watch failed"))
        if status == "ready":
            self.log.info(
                "%d file(s) ready, %d more still arriving", len(event["files"]), event["pending"]
            )
        elif status == "ended":
            self.log.info("Session ends: %s", event.get("reason"))
        else:
            raise ShareWatchError(f"unexpected trigger event {event!r}")
        return event
