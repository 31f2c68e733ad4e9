"""Process whatever the ledger says a microscope's movies owe: one task per processing run.

A processing run is started by ingest (an asset event per copied batch) and never waited on.
It claims the owed MotionCor2 work of every session of its microscope in the ledger, submits it
as one job array and defers; when the array ends it records each movie, claims the CTFFIND and
picking work that became owed, submits both arrays at once and defers again (on CTFFIND first,
then picking, which has usually ended by then). Deferred, it follows all its arrays at once and
the ledger (:class:`~cryoflow.triggers.first_event.FirstEventTrigger`): it resumes when any array
ends, or when MotionCor2 work became owed since (a later batch), which it takes at once instead
of leaving it for a run slot. When nothing is pending it refreshes each
touched session's STAR files (``micrographs_ctf_all.star``: every movie with a CTF;
``micrographs_ctf.star``: those curation accepted, see ``cryoflow.processing.curation``),
evaluates the
sessions' curation alerts and, for a closed session that owes nothing more, its summary.
Claims are settled from the ledger and the jobs' fate, never from XCom: a run that was killed
leaves claims with job ids; the next run records the movies whose outputs exist and offers the
others again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from cryoflow.config import CurationThresholds, load_site
from cryoflow.ledger.store import FileRow, Ledger, StageRow
from cryoflow.operators.compute_job import ArrayJobs, _safe, statuses_from_event
from cryoflow.processing import batch, curation
from cryoflow.processing.compute.jobscript import SubmittedJob, TaskStatus
from cryoflow.processing.compute.settings import parse_backend
from cryoflow.processing.steps import STAGES
from cryoflow.session import SessionHandle, SessionParams, write_summary

if TYPE_CHECKING:
    from airflow.sdk import Context

HOLD_POLL_SECONDS = 2.0
#: A deferral's first event is held this long after its trigger starts (Airflow 3.3.2 fails a
#: task resumed before its deferring workload's exit was seen; that exit takes 0.1-1 s here,
#: several seconds on a loaded node).
RESUME_NOT_BEFORE_SECONDS = 4.0


def _import_in_background() -> None:
    """Start importing starfile (and pandas under it) in a thread. Each resume is a new
    process, and that import takes 3 s of CPU on a 2-core node (up to 10 s under load): done
    when the results it reads and writes (picks, STAR files) arrive, it no longer delays them
    or the next batch's submission."""
    import importlib
    import threading

    threading.Thread(
        target=importlib.import_module, args=("starfile",), name="import-starfile", daemon=True
    ).start()

#: ledger stage -> facility.software key
SOFTWARE = {"motioncor": "motioncor2", "ctf": "ctffind", "picking": "dogpicker"}
#: How long after its movie a metadata file (mdoc, EPU XML) is still looked for.
METADATA_WINDOW = timedelta(minutes=30)


@dataclass(frozen=True)
class Work:
    """One claimed stage row: which movie, of which session (JSON-able for the deferral)."""

    stage_id: int
    file_id: int
    session_id: int
    relpath: str
    dest: str

    @classmethod
    def of(cls, stage: StageRow, file: FileRow) -> Work:
        return cls(stage.id, file.id, file.session_id, file.relpath, file.dest_path or "")


class ProcessOwedOperator(BaseOperator):
    """Claim and process the owed steps of one microscope's movies (see the module doc)."""

    template_fields: Sequence[str] = ()
    ui_color = "#e8f2d9"

    def __init__(self, *, microscope_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.microscope_id = microscope_id
        self._touched: set[int] = set()
        self._new_ctf: dict[int, list[int]] = {}  # session -> movies whose CTF this run did
        self._new_accepted: dict[int, list[int]] = {}  # session -> movies this run accepted
        self._thresholds: dict[int, CurationThresholds] = {}  # session -> its thresholds

    # -- configuration, sessions -----------------------------------------------------------

    @cached_property
    def site(self) -> Any:
        return load_site()

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.site.facility.storage.ledger_url)

    @cached_property
    def _sessions(self) -> dict[int, tuple[SessionHandle, SessionParams]]:
        return {}

    def session(self, session_id: int) -> tuple[SessionHandle, SessionParams]:
        if session_id not in self._sessions:
            row = self.ledger.get_session(session_id)
            handle = SessionHandle(session_id, row.source_root, row.dest_root, None)
            params = SessionParams.model_validate(row.params)
            self._sessions[session_id] = (handle, params)
            stored = (row.params or {}).get("thresholds")  # open_session resolved them
            curation_cfg = self.site.microscopes[self.microscope_id].curation
            self._thresholds[session_id] = (
                CurationThresholds.model_validate(stored)
                if isinstance(stored, dict)
                else params.thresholds(curation_cfg.thresholds)  # a session from before
            )
        return self._sessions[session_id]

    def thresholds(self, session_id: int) -> CurationThresholds:
        self.session(session_id)
        return self._thresholds[session_id]

    @cached_property
    def _backends(self) -> dict[str, ArrayJobs]:
        return {}

    def jobs(self, stage: str) -> ArrayJobs:
        """The step's backend; one client (one SSH connection) per backend and process."""
        facility = self.site.facility
        name = facility.software[SOFTWARE[stage]].backend
        if name not in self._backends:
            perms = facility.permissions
            self._backends[name] = ArrayJobs(
                parse_backend(facility.compute[name]),
                self.log,
                file_mode=perms.file_mode,
                dir_mode=perms.dir_mode,
            )
        return self._backends[name]

    def _movies(self, work: list[Work]) -> tuple[list[batch.MoviePaths], list[SessionParams]]:
        movies, params = [], []
        for w in work:
            handle, p = self.session(w.session_id)
            movies.append(batch.movie_paths(handle, w.file_id, w.relpath, w.dest))
            params.append(p)
        return movies, params

    @staticmethod
    def _claimer(context: Context) -> str:
        ti = context["ti"]
        return f"{ti.dag_id}/{ti.run_id}#{ti.try_number}"

    # -- entry -----------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        _import_in_background()
        for stage in STAGES:
            self._settle_stale(context, stage)
        return self._run(context)

    def _settle_stale(self, context: Context, stage: str) -> None:
        """Claims no live run of ours holds: a dead run's, or an earlier try of this run's."""
        mine = self._claimer(context)
        run_prefix = mine.rsplit("#", 1)[0] + "#"
        grace = timedelta(seconds=self.site.facility.processing.claim_grace_seconds)
        now = datetime.now(UTC)
        by_job: dict[tuple[str, str], list[tuple[StageRow, FileRow]]] = {}
        for st, f in self.ledger.claimed(self.microscope_id, stage):
            if st.claimed_by == mine:
                continue
            claimed = st.claimed_at.replace(tzinfo=st.claimed_at.tzinfo or UTC)
            if not (st.claimed_by or "").startswith(run_prefix) and now - claimed <= grace:
                continue  # maybe a live run (one started by hand beside this one): it records it
            if st.job_id is None:
                self.ledger.release_stage(st.id, f"claimed by {st.claimed_by}, never submitted")
                continue
            by_job.setdefault((st.job_id, st.job_dir or ""), []).append((st, f))
        for (job_id, job_dir), rows in by_job.items():
            n_tasks = max(st.array_index or 0 for st, _ in rows) + 1
            job = SubmittedJob(job_id, job_dir, n_tasks)
            statuses = self.jobs(stage).poll_once(job)
            if not statuses:
                continue
            mine_rows = [(st, f) for st, f in rows if st.array_index is not None]
            if not all(statuses[st.array_index].terminal for st, _ in mine_rows):
                earlier_try = {st.claimed_by for st, _ in mine_rows if
                               (st.claimed_by or "").startswith(run_prefix)}  # fmt: skip
                if earlier_try:  # this run's own job, from a try that died: follow it on
                    for was in sorted(earlier_try):
                        ids = [st.id for st, _ in mine_rows if st.claimed_by == was]
                        n = self.ledger.adopt(ids, mine, was)
                        self.log.info(
                            "%s job %s of try %s still runs: this try follows its %d movie(s)",
                            stage, job_id, was, n,
                        )  # fmt: skip
                    continue
                self.log.info(
                    "%s job %s of an earlier run still runs: its %d movie(s) stay with it",
                    stage, job_id, len(mine_rows),
                )  # fmt: skip
                continue
            work = [Work.of(st, f) for st, f in mine_rows]
            states = {
                str(i): statuses[st.array_index].to_dict() for i, (st, _) in enumerate(mine_rows)
            }
            self.log.info(
                "Settling %d %s movie(s) of job %s left by %s",
                len(work), stage, job_id, rows[0][0].claimed_by,
            )  # fmt: skip
            self._record(stage, work, states, {"job_id": job_id})

    # -- the steps -------------------------------------------------------------------------

    def _claim(self, context: Context, stage: str, after: str | None = None) -> list[Work]:
        cfg = self.site.facility.processing
        rows = self.ledger.claim(
            self.microscope_id,
            stage,
            self._claimer(context),
            limit=cfg.batch_max_movies,
            max_attempts=cfg.max_attempts,
            after=after,
        )
        return [Work.of(st, f) for st, f in rows]

    def _job_dir(self, context: Context, jobs: ArrayJobs, stage: str) -> str:
        ti = context["ti"]
        # A run submits a step more than once (it takes new work as it comes): the time keeps
        # each array's folder its own.
        when = datetime.now(UTC).strftime("%H%M%S%f")
        parts = [_safe(ti.dag_id), _safe(ti.run_id), f"{stage}-try{ti.try_number}-{when}"]
        return "/".join([jobs.job_root(), *parts])

    def _submit(self, context: Context, stage: str, work: list[Work]) -> None:
        """Plan and submit one array for ``work``; the job is recorded in the ledger (claim
        rows get job id and array index) before the run defers: resuming, retrying or a later
        run all find it there."""
        movies, params = self._movies(work)
        facility = self.site.facility
        stdin: list[str] | None = None
        tasks: list[list[str]] = []
        if stage == "motioncor":
            layout = self.site.microscopes[self.microscope_id].layout
            by_index: dict[int, list[str]] = {}
            for session_id in dict.fromkeys(w.session_id for w in work):
                idx = [i for i, w in enumerate(work) if w.session_id == session_id]
                handle, p = self.session(session_id)
                group = [movies[i] for i in idx]
                for warning in batch.record_acquisition(self.ledger, handle, group, layout, p):
                    self.log.warning("%s", warning)
                perms = facility.permissions
                gain = batch.gain_reference(
                    self.ledger, handle, p, perms.dir_mode, perms.file_mode
                )
                self.log.info("Session %s gain reference: %s", handle.session_id, gain or "none")
                argvs = batch.plan_motioncor(facility, p, handle, group, gain)
                by_index.update(zip(idx, argvs, strict=True))
            tasks = [by_index[i] for i in range(len(work))]
        elif stage == "ctf":
            self._late_metadata(work, movies)
            stdin = []
            for m, p in zip(movies, params, strict=True):
                t, answers = batch.plan_ctffind(facility, p, [m])
                tasks += t
                stdin += answers
        else:
            self._late_metadata(work, movies)
            for m, p in zip(movies, params, strict=True):
                tasks += batch.plan_dogpicker(facility, p, [m])
        for m, argv in zip(movies, tasks, strict=True):
            self.log.info("%s: %s", m.relpath, " ".join(argv))
        jobs = self.jobs(stage)
        job = jobs.submit(SOFTWARE[stage], tasks, stdin, self._job_dir(context, jobs, stage))
        self.ledger.set_job([w.stage_id for w in work], job.job_id, job.job_dir)

    def _late_metadata(self, work: list[Work], movies: list[batch.MoviePaths]) -> None:
        """The mdoc/XML of a movie may land a batch after the movie: record it now."""
        have = {st.file_id for st in self.ledger.stages(w.file_id for w in work)
                if st.stage == "acquisition"}  # fmt: skip
        self._read_metadata(
            (w.session_id, m) for w, m in zip(work, movies, strict=True) if w.file_id not in have
        )

    def _read_metadata(self, movies: Iterable[tuple[int, batch.MoviePaths]]) -> None:
        """Record the acquisition metadata of ``(session id, movie)`` pairs, where present."""
        layout = self.site.microscopes[self.microscope_id].layout
        for session_id, m in movies:
            handle, p = self.session(session_id)
            for warning in batch.record_acquisition(self.ledger, handle, [m], layout, p):
                self.log.warning("%s", warning)

    def _catch_up_metadata(self) -> None:
        """Read the metadata of recent movies that had none when they were processed.

        SerialEM writes a movie's .mdoc after the movie, and it needs its own settle and copy:
        it often lands a batch later, after the movie's MotionCor2 and CTF were submitted. The
        sessions still open or still to be summarized are looked at, for movies copied within
        ``METADATA_WINDOW``; each run looks again until the file is there.
        """
        ids = (
            set(self.ledger.running_sessions(self.microscope_id))
            | {row.id for row in self.ledger.sessions_to_summarize(self.microscope_id)}
            | self._touched
        )
        since = datetime.now(UTC) - METADATA_WINDOW
        for f in self.ledger.recent_movies_without(sorted(ids), "acquisition", since):
            # Informational only (the view, the summary): a movie or session it cannot read
            # is reported, never allowed to stop the run.
            try:
                handle, _ = self.session(f.session_id)
                m = batch.movie_paths(handle, f.id, f.relpath, f.dest_path or "")
                self._read_metadata([(f.session_id, m)])
            except Exception as exc:  # noqa: BLE001
                self.log.warning("%s: acquisition metadata not read: %s", f.relpath, exc)

    def _record(
        self, stage: str, work: list[Work], states: dict[str, dict[str, Any]], job: dict
    ) -> None:
        movies, params = self._movies(work)
        ok, problems = batch.record_step(self.ledger, stage, movies, states, job, params)
        self.log.info("%s: %d of %d movie(s) done", stage, len(ok), len(movies))
        by_file = {w.file_id: w.session_id for w in work}
        if stage == "ctf":
            for m in ok:
                self._new_ctf.setdefault(by_file[m.file_id], []).append(m.file_id)
        for problem in problems:
            self.log.error("%s", problem)
        # curation: movies whose last step is now settled get their verdict
        verdicts = curation.decide(
            self.ledger,
            by_file,
            lambda file_id: self.thresholds(by_file[file_id]),
            self.site.facility.processing.max_attempts,
        )
        rejected = 0
        for file_id, accepted, reason in verdicts:
            if accepted:
                self._new_accepted.setdefault(by_file[file_id], []).append(file_id)
            else:
                rejected += 1
                self.log.info("Rejected %s: %s", self._label(work, file_id), reason)
        if verdicts:
            self.log.info("Curation: %d accepted, %d rejected", len(verdicts) - rejected, rejected)
        self._touched.update(w.session_id for w in work)

    @staticmethod
    def _label(work: list[Work], file_id: int) -> str:
        return next((w.relpath for w in work if w.file_id == file_id), str(file_id))

    def _my_jobs(self, context: Context) -> list[tuple[str, SubmittedJob, list[Work]]]:
        """This try's submitted, unsettled jobs, from the ledger: the earliest claimed first
        (of one claim, CTF before picking)."""
        jobs: dict[str, tuple[str, str, list[Work]]] = {}
        claimed: dict[str, datetime] = {}
        for st, f in self.ledger.claimed(self.microscope_id, claimer=self._claimer(context)):
            if st.job_id is not None:
                jobs.setdefault(st.job_id, (st.stage, st.job_dir or "", []))[2].append(
                    Work.of(st, f)
                )
                at = st.claimed_at.replace(tzinfo=st.claimed_at.tzinfo or UTC)
                claimed[st.job_id] = min(claimed.get(st.job_id, at), at)
        order = {stage: i for i, stage in enumerate(STAGES)}
        found = [
            (stage, SubmittedJob(job_id, job_dir, len(work)), work)
            for job_id, (stage, job_dir, work) in jobs.items()
        ]
        return sorted(found, key=lambda item: (claimed[item[1].job_id], order[item[0]]))

    def _take_new_work(self, context: Context) -> bool:
        """Claim and submit MotionCor2 work that became owed since this run started (a later
        batch): it starts at this run's next look instead of waiting for a run of its own.
        Not after ``processing.takes_new_work_minutes``: the run then ends with its jobs."""
        if not self._may_take_new_work(context):
            return False
        work = self._claim(context, "motioncor")
        if work:
            self.log.info("Taking %d newly owed movie(s) for motioncor", len(work))
            self._submit(context, "motioncor", work)
        return bool(work)

    def _may_take_new_work(self, context: Context) -> bool:
        return self._new_work_seconds_left(context) >= 0

    def _new_work_seconds_left(self, context: Context) -> float:
        """Until ``processing.takes_new_work_minutes`` after the run started (negative after)."""
        started = context["dag_run"].start_date or datetime.now(UTC)
        limit = timedelta(minutes=self.site.facility.processing.takes_new_work_minutes)
        left = started.replace(tzinfo=started.tzinfo or UTC) + limit - datetime.now(UTC)
        return left.total_seconds()

    def work_owed(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Back from lingering: take what became owed, or end the run."""
        _import_in_background()
        if isinstance(event, dict) and event.get("status") == "owed" and self._take_new_work(
            context
        ):
            return self._wait(context)
        return self._finish(context)

    def _wait(self, context: Context, *, watch_owed: bool = True) -> dict[str, Any]:
        """Record every array that has ended; follow the rest, and the ledger's newly owed
        MotionCor2 work, until one of them needs the run (resume in :meth:`step_done`). Ends
        the run when nothing is pending and nothing new is owed (after lingering)."""
        pending = self._my_jobs(context)
        if not pending:
            if self._take_new_work(context):
                return self._wait(context)
            cfg = self.site.facility.processing
            if cfg.linger_seconds > 0 and self._may_take_new_work(context):
                self.defer(
                    trigger=self._first_of([self._owed_trigger(cfg.linger_seconds).serialize()]),
                    method_name="work_owed",
                )
            return self._finish(context)
        # Short arrays end within seconds: follow them here for a few seconds before deferring.
        # A deferral costs a task restart (seconds on a busy node), and Airflow 3.3.2 can fail
        # a task whose trigger fires while its deferring workload is still exiting.
        hold_until = time.monotonic() + self.site.facility.processing.hold_worker_seconds
        while True:
            for stage, job, work in pending:
                statuses = self.jobs(stage).poll_once(job)
                if statuses and all(s.terminal for s in statuses):
                    return self._resume(context, stage, job, work, statuses, "done", "")
            if watch_owed and self._owed_now(context) and self._take_new_work(context):
                pending = self._my_jobs(context)
                hold_until = time.monotonic() + self.site.facility.processing.hold_worker_seconds
            if time.monotonic() + HOLD_POLL_SECONDS > hold_until:
                break
            time.sleep(HOLD_POLL_SECONDS)
        followed = [self.jobs(stage).trigger(job).serialize() for stage, job, _ in pending]
        if watch_owed and self._may_take_new_work(context):
            left = self._new_work_seconds_left(context)
            followed.append(self._owed_trigger(max(1.0, left)).serialize())
        self.defer(trigger=self._first_of(followed), method_name="step_done")
        raise AssertionError("defer() returned")  # pragma: no cover

    @staticmethod
    def _first_of(triggers: list[tuple[str, dict[str, Any]]]) -> Any:
        """Every deferral of a run: its triggers together, none firing before this process
        has had time to exit (see cryoflow.triggers.first_event)."""
        from cryoflow.triggers.first_event import FirstEventTrigger

        return FirstEventTrigger(triggers=triggers, not_before_s=RESUME_NOT_BEFORE_SECONDS)

    def _owed_trigger(self, timeout_s: float) -> Any:
        from cryoflow.triggers.owed_work import OwedWorkTrigger

        cfg = self.site.facility.processing
        return OwedWorkTrigger(
            ledger_url=self.site.facility.storage.ledger_url,
            microscope=self.microscope_id,
            max_attempts=cfg.max_attempts,
            timeout_s=timeout_s,
        )

    def _owed_now(self, context: Context) -> bool:
        cfg = self.site.facility.processing
        return self._may_take_new_work(context) and self.ledger.has_owed(
            self.microscope_id, "motioncor", cfg.max_attempts
        )

    def step_done(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        _import_in_background()
        status = event.get("status") if isinstance(event, dict) else None
        if status in ("owed", "idle"):  # new work owed, or the time for taking it is over
            if status == "owed" and not self._take_new_work(context):
                # owed, yet not claimable by this run: follow the arrays alone this time, not
                # resume again at once
                self.log.warning("MotionCor2 work is owed but none could be claimed")
                return self._wait(context, watch_owed=False)
            return self._wait(context)
        job, statuses = statuses_from_event(event, "processing")
        assert event is not None
        rows = self.ledger.claimed(
            self.microscope_id, claimer=self._claimer(context), job_id=job.job_id
        )
        if not rows:
            self.log.warning("Job %s: its movies were settled elsewhere meanwhile", job.job_id)
            return self._wait(context)
        stage = rows[0][0].stage
        work = [Work.of(st, f) for st, f in rows]
        return self._resume(context, stage, job, work, statuses, event["status"], event["message"])

    def _resume(
        self,
        context: Context,
        stage: str,
        job: SubmittedJob,
        work: list[Work],
        statuses: list[TaskStatus],
        status: str,
        message: str,
    ) -> dict[str, Any]:
        self._take_new_work(context)  # first: a later batch's MotionCor2 waits on nothing here
        labels = [w.relpath for w in work]
        states = self.jobs(stage).finish(
            SOFTWARE[stage], job, statuses, status=status, message=message, labels=labels
        )
        self._record(stage, work, states, job.to_dict())
        if stage == "motioncor":
            self._claim_downstream(context)
        if stage in ("ctf", "picking"):
            self._write_star()
            self._alerts(context)  # a run may last a whole session: alerts cannot wait its end
            self._catch_up_metadata()
        return self._wait(context)

    def _run(self, context: Context) -> dict[str, Any]:
        work = self._claim(context, "motioncor")
        if work:
            self._submit(context, "motioncor", work)
        else:
            self._claim_downstream(context)
        return self._wait(context)

    def _claim_downstream(self, context: Context) -> None:
        """CTFFIND and picking of every movie whose MotionCor2 is done, submitted together: both
        need only the motion-corrected sum, and waiting for one array before submitting the
        next would add a whole poll, resume and submission to every run (and hold its slot
        meanwhile). CTF is submitted first: a FIFO-scheduled cluster starts it first, and the
        run follows it first, so the result people look at first is recorded first."""
        for stage in ("ctf", "picking"):
            work = self._claim(context, stage, after="motioncor")
            if work:
                self._submit(context, stage, work)

    # -- the end of a run ------------------------------------------------------------------

    def _write_star(self) -> None:
        """Append this run's new CTF results to each session's micrographs_ctf_all.star and
        the movies it accepted to micrographs_ctf.star (RELION's import)."""
        mode = self.site.facility.permissions.file_mode
        for pending, accepted_only in ((self._new_ctf, False), (self._new_accepted, True)):
            for session_id, file_ids in sorted(pending.items()):
                handle, p = self.session(session_id)
                path = batch.write_micrographs_ctf_star(
                    self.ledger, handle, p, mode, file_ids, accepted_only=accepted_only
                )
                self.log.info(
                    "Session %s: %d movie(s) added to %s", session_id, len(file_ids), path
                )
            pending.clear()

    def _alerts(self, context: Context) -> None:
        """Evaluate each running (or touched) session's curation alerts; send new ones."""
        cfg = self.site.microscopes[self.microscope_id].curation.alert
        send = (
            curation.notifier_sender(cfg.notifier, dict(context))
            if cfg.notifier is not None
            else None
        )
        ids = set(self.ledger.running_sessions(self.microscope_id)) | self._touched
        for session_id in sorted(ids):
            row = self.ledger.get_session(session_id)
            alerts = curation.update_alerts(self.ledger, row, cfg, send)
            for kind, state in alerts.items():
                if state.get("active"):
                    self.log.warning("Session %s alert %s: %s", row.name, kind, state["message"])

    def _finish(self, context: Context) -> dict[str, Any]:
        """Refresh results of touched sessions; a closed session owing nothing gets its final
        summary (also when its owed work ended in an earlier run)."""
        self._write_star()
        self._alerts(context)
        self._catch_up_metadata()  # before the summaries, which count it
        max_attempts = self.site.facility.processing.max_attempts
        for row in self.ledger.sessions_to_summarize(self.microscope_id):
            if self.ledger.owed_count(row.id, max_attempts) == 0:
                summary = write_summary(self.site.facility, row.id, max_attempts=max_attempts)
                self.log.info(
                    "Session %s is closed and fully processed: summary %s",
                    row.name, Path(row.dest_root) / "logs" / "session_summary.json",
                )  # fmt: skip
                self.log.info("Processing counts: %s", summary["processing"])
        if not self._touched:
            self.log.info("Nothing owed: no movie of %s waits for processing", self.microscope_id)
        return {"sessions": sorted(self._touched)}

    def on_kill(self) -> None:
        # The deferred SlurmJobTrigger cancels its own job when killed; claims are settled by
        # the next run from the ledger.
        self.log.info("Killed: the next processing run settles this run's claims")


__all__ = ["ProcessOwedOperator"]
