"""The operator's "end this session now", usable at any moment of a session.

It records the request in the ledger. The running batch obeys it wherever it is: a watch that
waits ends at its next poll, a copy finishes the files it has, then the batch closes the session
instead of starting another. If no batch answers within ``wait_minutes`` (none is running, or
it is stuck), this task closes the session itself, so the request is never lost.
"""

from __future__ import annotations

import logging
import time

from airflow.sdk import get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from cryoflow.config import load_site
from cryoflow.ledger.store import Ledger
from cryoflow.session import SessionHandle, close_session

log = logging.getLogger(__name__)


@task
def end_session(microscope: str, wait_minutes: float = 5.0, poll_seconds: float = 2.0) -> dict:
    """End ``microscope``'s session named by the run's ``session_name`` param (the DAG is the
    microscope's own ``end_session_<id>``)."""
    name = get_current_context()["params"]["session_name"]
    site = load_site()
    ledger = Ledger(site.facility.storage.ledger_url)
    row = ledger.find_session(microscope, name)
    if row is None:
        raise AirflowFailException(f"no session {name!r} on microscope {microscope!r}")
    if row.state == "closed":
        log.info("Session %s was already closed (%s)", name, row.close_reason)
        return {"session": name, "closed": row.close_reason}
    ledger.request_end(row.id, "ended by an operator")
    log.info("Asked session %s to end; waiting for its batch to close it", name)
    deadline = time.monotonic() + wait_minutes * 60
    while time.monotonic() < deadline:
        row = ledger.get_session(row.id)
        if row.state == "closed":
            log.info("Session %s closed by its batch: %s", name, row.close_reason)
            return {"session": name, "closed": row.close_reason}
        time.sleep(poll_seconds)
    log.warning("No batch of %s answered in %g min: closing it here", name, wait_minutes)
    handle = SessionHandle(row.id, row.source_root, row.dest_root, None)
    summary = close_session(
        site.facility,
        handle,
        "ended by an operator",
        max_attempts=site.facility.processing.max_attempts,
    )
    return {"session": name, "closed": summary["reason"]}
