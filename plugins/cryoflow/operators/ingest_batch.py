"""One batch of a session's ingest as ONE task: watch (deferred), copy verified, continue or close.

A DAG run of ``session_<microscope>`` is one batch. The task opens the session (idempotent),
defers to :class:`ShareWatchTrigger` until files are finished or the session ends, copies the
batch to GPFS verified by checksum (each verified movie owes its processing steps in the ledger
from then on), and then either triggers the next batch run of the same session or closes the
session. Its asset event starts processing, which ingest never waits for.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, DagRunTriggerException

from cryoflow.config import FacilityConfig, MicroscopeConfig, load_site
from cryoflow.ledger.store import Ledger
from cryoflow.session import (
    SessionClosedError,
    SessionHandle,
    SessionParams,
    SessionParamsError,
    close_session,
    ingest_event,
    open_session,
)
from cryoflow.triggers.share_watch import ShareWatchTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

BATCH_XCOM = "batch"


def batch_run_id(session_name: str, now: datetime | None = None) -> str:
    """``<session>__batch_<time>``: a session's batches sit together in the grid view."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S.%f")
    return f"{session_name}__batch_{stamp}"


def watch_trigger(
    facility: FacilityConfig,
    scope: MicroscopeConfig,
    params: SessionParams,
    handle: SessionHandle,
) -> ShareWatchTrigger:
    """The watch of one session folder, with the facility's and the microscope's settings."""
    transfer = facility.transfer
    return ShareWatchTrigger(
        root=handle.source_root,
        ledger_url=facility.storage.ledger_url,
        session_id=handle.session_id,
        exclude=list(scope.share.exclude),
        settle_seconds=scope.share.settle_seconds or transfer.settle_seconds,
        whole_settle_seconds=transfer.whole_settle_seconds,
        poll_seconds=transfer.poll_seconds,
        batch_max_files=transfer.batch_max_files,
        batch_window_seconds=transfer.batch_window_seconds,
        idle_timeout_seconds=params.idle_timeout_minutes * 60.0,
        deadline=handle.deadline,
        max_attempts=transfer.max_attempts,
        layout=str(scope.layout),
        expected_frames=params.frames,
        incomplete_after_seconds=transfer.incomplete_after_seconds,
        short_after_seconds=transfer.short_after_seconds,
        smb_conn_id=scope.share.conn_id if scope.share.kind == "smb" else None,
    )


class SessionBatchOperator(BaseOperator):
    """Watch, copy and continue one session (see the module doc)."""

    template_fields: Sequence[str] = ()
    ui_color = "#d9ecf2"

    def __init__(self, *, microscope_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.microscope_id = microscope_id

    def _site(self) -> tuple[Any, Any]:
        site = load_site()
        return site.facility, site.microscopes[self.microscope_id]

    @staticmethod
    def _params(context: Context) -> SessionParams:
        try:
            return SessionParams.from_form(dict(context["params"]))
        except SessionParamsError as exc:  # a form mistake: retrying cannot help
            raise AirflowFailException(str(exc)) from None

    def execute(self, context: Context) -> dict[str, Any] | None:
        facility, scope = self._site()
        params = self._params(context)
        continuation = context["ti"].run_id.startswith(f"{params.session_name}__batch_")
        try:
            handle, notes = open_session(facility, scope, params, reopen=not continuation)
        except SessionClosedError as exc:
            self.log.info("Nothing to do: %s", exc)
            return {"closed": str(exc)}
        for note in notes:
            self.log.info("%s", note)
        self.log.info(
            "Session %s: %s -> %s", params.session_name, handle.source_root, handle.dest_root
        )
        trigger = watch_trigger(facility, scope, params, handle)
        self.log.info("Waiting for finished files in %s", handle.source_root)
        self.defer(trigger=trigger, method_name="copy_batch")

    def copy_batch(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        facility, scope = self._site()
        params = self._params(context)
        ledger = Ledger(facility.storage.ledger_url)
        row = ledger.find_session(scope.id, params.session_name)
        if row is None:
            raise AirflowFailException(f"session {params.session_name} is not in the ledger")
        handle = SessionHandle(row.id, row.source_root, row.dest_root, None)
        event = event or {}
        for rel in event.get("refused", []):
            self.log.warning("Refused (points outside the share): %s", rel)
        report: dict[str, Any] = {"copied": [], "skipped": [], "failed": [], "retry_later": []}
        files = event.get("files", []) if event.get("status") == "ready" else []
        if files:
            self.log.info("%d file(s) ready, %d more still arriving", len(files), event["pending"])
        if files or event.get("incomplete"):
            result = ingest_event(
                facility, scope, handle, event, batch=context["ti"].run_id, switches=params
            )
            report = result.to_dict()
            self.log.info(
                "Batch: %d copied, %d already there, %d failed (offered again later), "
                "%d still changing",
                len(result.copied), len(result.skipped), len(result.failed),
                len(result.retry_later),
            )  # fmt: skip
        context["ti"].xcom_push(key=BATCH_XCOM, value=report)

        reason = event.get("reason") if event.get("status") == "ended" else None
        reason = reason or ledger.end_requested(handle.session_id)
        if not reason and ledger.get_session(handle.session_id).state == "closed":
            reason = "closed by an operator"
        if reason:
            max_attempts = facility.processing.max_attempts
            summary = close_session(facility, handle, reason, max_attempts=max_attempts)
            self.log.info("Session closed (%s): files %s", reason, summary["files"])
            self.log.info(
                "Summary written; processing still owes %d step(s) and rewrites it when done",
                summary["steps_owed"],
            )
            return {"closed": reason, **report}
        next_run = batch_run_id(params.session_name)
        self.log.info("Next batch: %s", next_run)
        raise DagRunTriggerException(
            trigger_dag_id=context["ti"].dag_id,
            dag_run_id=next_run,
            conf=dict(context["params"]),
            reset_dag_run=False,
            skip_when_already_exists=True,
            wait_for_completion=False,
            allowed_states=["success"],
            failed_states=["failed"],
            poke_interval=60,
            deferrable=False,
            note=f"batch of session {params.session_name}",
        )
