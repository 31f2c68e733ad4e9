"""TaskFlow tasks around each processing step: plan the job array, record what it produced.

Between a ``plan_*`` and its ``record_*`` task runs a :class:`ComputeArrayOperator` (deferred while
the jobs queue and run). The logic lives in :mod:`cryoflow.processing`.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from cryoflow import processing
from cryoflow.config import load_site
from cryoflow.ledger import Ledger
from cryoflow.session import SessionHandle, SessionParams

log = logging.getLogger(__name__)

#: processing stage -> (form switch, compute task id)
STEPS = {
    "motioncor": ("motioncor", "motioncor"),
    "ctf": ("ctf", "ctffind"),
    "picking": ("picking", "dogpicker"),
}


class ProcessingFailed(AirflowFailException):
    """Every movie of the batch failed a step (recorded in the ledger); rerunning cannot help."""


def _context() -> tuple[Any, SessionParams]:
    site = load_site()
    params = SessionParams.from_form(dict(get_current_context()["params"]))
    return site.facility, params


@task(multiple_outputs=True)
def plan_step(stage: str, microscope_id: str, session: dict[str, Any], inputs: Any) -> dict:
    """One argument list per movie for ``stage``; skipped when switched off or nothing to do."""
    facility, params = _context()
    switch, _ = STEPS[stage]
    if not getattr(params, switch) or (stage != "motioncor" and not params.motioncor):
        raise AirflowSkipException(f"{stage} is switched off for this session")
    handle = SessionHandle.from_dict(session)
    if stage == "motioncor":
        movies = processing.batch_movies(handle, (inputs or {}).get("copied", []))
    else:
        movies = [processing.MoviePaths.from_dict(m) for m in (inputs or {}).get("movies", [])]
    if not movies:
        raise AirflowSkipException(f"no movies for {stage} in this batch")
    stdin = None
    if stage == "motioncor":
        ledger = Ledger(facility.storage.ledger_url)
        layout = load_site().microscopes[microscope_id].layout
        for warning in processing.record_acquisition(ledger, handle, movies, layout, params):
            log.warning("%s", warning)
        gain = processing.gain_reference(ledger, handle, params, facility.permissions.dir_mode)
        log.info("Gain reference: %s", gain or "none found (movies assumed gain-corrected)")
        tasks = processing.plan_motioncor(facility, params, handle, movies, gain)
    elif stage == "ctf":
        tasks, stdin = processing.plan_ctffind(facility, params, movies)
    else:
        tasks = processing.plan_dogpicker(facility, params, movies)
    for m, argv in zip(movies, tasks, strict=True):
        log.info("%s: %s", m.relpath, " ".join(argv))
    return {"tasks": tasks, "stdin": stdin, "movies": [m.to_dict() for m in movies]}


@task(trigger_rule="all_done")
def record_step(stage: str, plan: dict[str, Any] | None, states: dict | None) -> dict[str, Any]:
    """Read each movie's outputs into the ledger; fail (after recording) if any movie failed."""
    if not plan:
        raise AirflowSkipException(f"{stage} did not run in this batch")
    facility, params = _context()
    ti = get_current_context()["ti"]
    job = ti.xcom_pull(task_ids=STEPS[stage][1], key="compute_job")
    movies = [processing.MoviePaths.from_dict(m) for m in plan["movies"]]
    ok, problems = processing.record_step(
        Ledger(facility.storage.ledger_url), stage, movies, states or {}, job, params
    )
    log.info("%s: %d of %d movie(s) done", stage, len(ok), len(movies))
    for problem in problems:
        log.error("%s", problem)
    result = {"movies": [m.to_dict() for m in ok], "failed": len(problems)}
    if problems and not ok:
        raise ProcessingFailed(f"{stage}: every movie failed; first: {problems[0]}")
    return result


@task(trigger_rule="all_done")
def session_results(session: dict[str, Any]) -> str | None:
    """Refresh the session's RELION ``micrographs_ctf.star`` with every CTF result so far."""
    facility, params = _context()
    path = processing.write_micrographs_ctf_star(
        Ledger(facility.storage.ledger_url),
        SessionHandle.from_dict(session),
        params,
        facility.permissions.file_mode,
    )
    log.info("micrographs_ctf.star: %s", path or "no CTF results yet")
    return str(path) if path else None
