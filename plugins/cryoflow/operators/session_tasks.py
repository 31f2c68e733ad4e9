"""TaskFlow tasks of a session run: thin calls into :mod:`cryoflow.session`."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from airflow.sdk import get_current_context, task

from cryoflow.config import load_site
from cryoflow.session import (
    SessionHandle,
    SessionParams,
)
from cryoflow.session import (
    close_session as _close,
)
from cryoflow.session import (
    open_session as _open,
)
from cryoflow.session import (
    transfer_batch as _transfer,
)

log = logging.getLogger(__name__)

NEXT_TASK = "plan_continuation"
CLOSE_TASK = "close_session"


class BatchTransferError(RuntimeError):
    """Some files of the batch could not be copied; the others were."""


def _site(microscope_id: str):
    site = load_site()
    return site.facility, site.microscopes[microscope_id]


@task
def open_session(microscope_id: str) -> dict[str, Any]:
    """Validate the form, create the session tree on GPFS and its ledger row."""
    facility, scope = _site(microscope_id)
    params = SessionParams.from_form(dict(get_current_context()["params"]))
    handle, notes = _open(facility, scope, params)
    for note in notes:
        log.info("%s", note)
    log.info("Session %s: %s -> %s", params.session_name, handle.source_root, handle.dest_root)
    return handle.to_dict()


@task
def transfer_batch(
    microscope_id: str, session: dict[str, Any], event: dict[str, Any] | None
) -> dict[str, Any]:
    """Copy the batch's files to the session's raw folder, each verified by checksum."""
    files = (event or {}).get("files", [])
    if not files:
        log.info("No files in this batch")
        return {"copied": [], "skipped": [], "failed": [], "retry_later": []}
    facility, scope = _site(microscope_id)
    run_id = get_current_context()["run_id"]
    report = _transfer(facility, scope, SessionHandle.from_dict(session), files, batch=run_id)
    log.info(
        "Batch: %d copied, %d already there, %d failed, %d still changing",
        len(report.copied),
        len(report.skipped),
        len(report.failed),
        len(report.retry_later),
    )
    if report.failed:
        # The verified files are recorded; a retry of this task only redoes the failed ones.
        names = ", ".join(f["relpath"] for f in report.failed[:10])
        raise BatchTransferError(f"{len(report.failed)} file(s) failed: {names}")
    return report.to_dict()


@task.branch(trigger_rule="all_done")
def plan_next(event: dict[str, Any] | None) -> str:
    """Continue with another batch run, or close: the watch said the session ended, or an
    operator ended it by marking ``wait_for_files`` as success (then there is no event)."""
    if event is None:
        log.info("wait_for_files was ended by hand: closing the session")
        return CLOSE_TASK
    return CLOSE_TASK if event.get("status") == "ended" else NEXT_TASK


@task(multiple_outputs=True)
def plan_continuation() -> dict[str, Any]:
    """The next batch run of the same session: same form values, a readable run id."""
    params = dict(get_current_context()["params"])
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return {"run_id": f"{params['session_name']}__batch_{stamp}", "conf": params}


@task
def close_session(
    session: dict[str, Any], event: dict[str, Any] | None, microscope_id: str
) -> dict:
    """Close the session in the ledger and write its summary to <session>/logs."""
    facility, _ = _site(microscope_id)
    reason = (event or {}).get("reason") or "ended by an operator"
    summary = _close(facility, SessionHandle.from_dict(session), reason)
    log.info("Session closed (%s): %s", reason, summary["files"])
    return summary
