"""Run one processing step over a batch of movies as ONE job array, without holding a worker.

`ComputeArrayOperator` builds the job script (cryoflow.processing.compute.jobscript), submits it
to the
configured backend (Slurm over SSH, or local for the embedded demo: a config choice, the code
path is the same), records the job in XCom, checks once and defers to `SlurmJobTrigger`. When
the trigger fires, `execute_complete` fetches every array task's stdout/stderr into the task
log and returns ``{"<index>": {"state", "exit_code"}}``. Some failed indices do not fail the
task (failures are recorded per movie downstream); all failed, or a trigger error, does.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, TaskDeferralError, TaskDeferralTimeout

from cryoflow.processing.compute.jobscript import (
    DEFAULT_DIR_MODE,
    DEFAULT_FILE_MODE,
    EVENT_KEYS,
    ComputeClient,
    JobLayout,
    SubmittedJob,
    TaskStatus,
    build_array_script,
    slurm_directives,
)
from cryoflow.processing.compute.local import LocalCompute
from cryoflow.processing.compute.settings import LocalBackend, SlurmBackend, parse_backend
from cryoflow.processing.compute.slurm import SlurmTransientError

if TYPE_CHECKING:
    from airflow.sdk import Context

    from cryoflow.triggers.slurm_job import SlurmJobTrigger

__all__ = [
    "ArrayJobs",
    "ComputeArrayOperator",
    "ComputeJobError",
    "ComputeJobFailed",
    "compute_client",
    "statuses_from_event",
]

XCOM_KEY = "compute_job"
_T = TypeVar("_T")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class ComputeJobError(Exception):
    """The job could not be followed to its end (submit failed, trigger gave up): retryable."""


class ComputeJobFailed(AirflowFailException):
    """Every array task failed: rerunning the same inputs will not help, so no retry."""


def compute_client(settings: SlurmBackend | LocalBackend) -> ComputeClient:
    """The client for a backend: Slurm over SSH or local (same methods, see ComputeClient)."""
    if isinstance(settings, SlurmBackend):
        # Imported here, as the trigger below: paramiko/asyncssh cost every task start (each
        # parses the DAG file) ~0.5 s, and most resumes only read a trigger event.
        from cryoflow.hooks.slurm import SlurmHook

        return SlurmHook(settings.ssh_conn_id)
    return LocalCompute(settings)


class ArrayJobs:
    """Submit, follow and read back job arrays on one backend: the part every operator that
    runs tools on a backend shares (:class:`ComputeArrayOperator`, the processing operator).

    :param log: the operator's logger (task log).
    :param env: environment for every task; ``LC_ALL=C`` so tool output parses the same.
    """

    def __init__(
        self,
        backend: SlurmBackend | LocalBackend,
        log: Any,
        *,
        env: Mapping[str, str] | None = None,
        log_tail_bytes: int = 2000,
        submit_attempts: int = 3,
        retry_delay_s: float = 5.0,
        trigger_max_failures: int = 5,
        file_mode: int = DEFAULT_FILE_MODE,
        dir_mode: int = DEFAULT_DIR_MODE,
    ) -> None:
        self.backend = backend
        self.modes = {"file_mode": file_mode, "dir_mode": dir_mode}
        self.log = log
        self.env = dict(env) if env is not None else {"LC_ALL": "C"}
        self.log_tail_bytes = log_tail_bytes
        self.submit_attempts = max(1, submit_attempts)
        self.retry_delay_s = retry_delay_s
        self.trigger_max_failures = trigger_max_failures
        self.last_logs: dict[int, Any] = {}

    @cached_property
    def client(self) -> ComputeClient:
        # Built lazily: parsing a DAG file must not touch a connection.
        return compute_client(self.backend)

    def submit(
        self, step: str, tasks: list[list[str]], stdin: list[str] | None, job_dir: str
    ) -> SubmittedJob:
        layout = JobLayout(job_dir)
        script = self._script(step, tasks, stdin, layout)
        job = self._retrying(step, "submit", lambda: self.client.submit(script, layout, len(tasks)))
        self.log.info(
            "Step %s: %s job %s, %d task(s), files in %s",
            step, self.backend.kind, job.job_id, job.n_tasks, job.job_dir,
        )  # fmt: skip
        return job

    def poll_once(self, job: SubmittedJob) -> list[TaskStatus]:
        """One status check (empty when it could not be made: the trigger asks again)."""
        try:
            return self.client.poll([job])[job.job_id]
        except SlurmTransientError as exc:
            self.log.warning("Status check of job %s failed: %s", job.job_id, exc)
            return []

    def trigger(self, job: SubmittedJob) -> SlurmJobTrigger:
        from cryoflow.triggers.slurm_job import SlurmJobTrigger

        return SlurmJobTrigger(
            backend=self.backend.model_dump(mode="json"),
            job_id=job.job_id,
            job_dir=job.job_dir,
            n_tasks=job.n_tasks,
            max_failures=self.trigger_max_failures,
        )

    def job_root(self) -> str:
        root = (
            self.backend.remote_workdir
            if isinstance(self.backend, SlurmBackend)
            else self.backend.workdir
        )
        return root.rstrip("/")

    def _script(
        self, step: str, tasks: list[list[str]], stdin: list[str] | None, layout: JobLayout
    ) -> str:
        if isinstance(self.backend, SlurmBackend):
            return build_array_script(
                step=step,
                tasks=tasks,
                layout=layout,
                stdin=stdin,
                env=self.env,
                modules=self.backend.modules,
                sbatch=slurm_directives(self.backend),
                max_parallel=self.backend.max_parallel,
                **self.modes,
            )
        return build_array_script(
            step=step, tasks=tasks, layout=layout, stdin=stdin, env=self.env, **self.modes
        )

    def finish(
        self,
        step: str,
        job: SubmittedJob,
        statuses: list[TaskStatus],
        *,
        status: str,
        message: str = "",
        labels: Sequence[str] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Bring every task's stdout/stderr into the task log; per-index results. A trigger
        that lost the job cancels it (a rerun must never race it) and raises."""
        logs = self._fetch_logs(step, job)
        for index, task in enumerate(statuses):
            label = f" {labels[index]}" if labels and index < len(labels) else ""
            self.log.info(
                "--- %s task %d (job %s_%d)%s: %s, exit code %s ---",
                step, index, job.job_id, index, label, task.state, task.exit_code,
            )  # fmt: skip
            if index in logs:
                for name, text in (("stdout", logs[index].stdout), ("stderr", logs[index].stderr)):
                    for line in text.rstrip("\n").splitlines():
                        self.log.info("[%d %s] %s", index, name, line)
        if status == "error":
            self.cancel(job)
            raise ComputeJobError(
                f"step {step}: lost track of job {job.job_id} ({message}); job files in "
                f"{job.job_dir}"
            )
        failed = [i for i, s in enumerate(statuses) if not s.succeeded]
        if failed:
            self.log.warning(
                "Step %s, job %s: %d of %d task(s) failed: indices %s",
                step, job.job_id, len(failed), len(statuses), failed,
            )  # fmt: skip
        self.last_logs = logs
        return {str(i): s.to_dict() for i, s in enumerate(statuses)}

    def _fetch_logs(self, step: str, job: SubmittedJob) -> dict[int, Any]:
        try:
            return self._retrying(
                step,
                "fetch logs",
                lambda: self.client.fetch_logs(job, range(job.n_tasks), self.log_tail_bytes),
            )
        except Exception as exc:  # logs help people; results must not depend on them
            self.log.warning("Could not fetch logs of job %s: %s", job.job_id, exc)
            return {}

    def cancel(self, job: SubmittedJob) -> None:
        try:
            self.client.cancel([job])
            self.log.info("Cancelled %s job %s", self.backend.kind, job.job_id)
        except Exception as exc:
            self.log.warning("Could not cancel job %s: %s", job.job_id, exc)

    def _retrying(self, step: str, what: str, action: Callable[[], _T]) -> _T:
        for attempt in range(1, self.submit_attempts + 1):
            try:
                return action()
            except SlurmTransientError as exc:
                if attempt == self.submit_attempts:
                    raise ComputeJobError(
                        f"step {step}: {what} failed {attempt} times: {exc}"
                    ) from exc
                delay = self.retry_delay_s * 2 ** (attempt - 1)
                self.log.warning("%s failed (%s); retry %d in %.0fs", what, exc, attempt, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


def statuses_from_event(event: dict[str, Any] | None, step: str) -> tuple[SubmittedJob, list]:
    """The job and per-index statuses a :class:`SlurmJobTrigger` event reports."""
    if not event or any(key not in event for key in EVENT_KEYS):
        raise ComputeJobError(f"malformed trigger event for step {step}: {event!r}")
    job = SubmittedJob(str(event["job_id"]), str(event["job_dir"]), int(event["n_tasks"]))
    statuses = [
        TaskStatus(event["tasks"][str(i)]["state"], event["tasks"][str(i)]["exit_code"])
        if str(i) in event["tasks"]
        else TaskStatus("UNKNOWN", None)
        for i in range(job.n_tasks)
    ]
    return job, statuses


class ComputeArrayOperator(BaseOperator):
    """Submit `tasks` (one argv list per movie) as a job array and wait deferred.

    :param backend: backend settings (a `SlurmBackend`/`LocalBackend` or its YAML mapping).
    :param step: step name (e.g. "motioncor"): job name and part of the job directory.
    :param tasks: per-task argument lists, program first (templated; may be an XComArg).
    :param stdin: optional per-task standard input texts, None for none (templated).
    :param env: environment for every task (templated); default ``{"LC_ALL": "C"}`` so tool
        output parses the same everywhere.
    :param job_timeout: give up (and cancel the job) when it has not ended after this long.
    :param log_tail_bytes: how much of each task's stdout and stderr lands in the task log.
    :param submit_attempts: tries for transient SSH/Slurm errors while submitting or reading.
    """

    template_fields: Sequence[str] = ("step", "tasks", "stdin", "env")
    template_fields_renderers = {"tasks": "json", "stdin": "json", "env": "json"}
    ui_color = "#dfe8f6"

    def __init__(
        self,
        *,
        backend: SlurmBackend | LocalBackend | Mapping[str, Any],
        step: str,
        tasks: Any,
        stdin: Any = None,
        env: Mapping[str, str] | None = None,
        job_timeout: timedelta | None = None,
        log_tail_bytes: int = 2000,
        submit_attempts: int = 3,
        retry_delay_s: float = 5.0,
        trigger_max_failures: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backend = parse_backend(dict(backend) if isinstance(backend, Mapping) else backend)
        self.step = step
        self.tasks = tasks
        self.stdin = stdin
        self.env = dict(env) if env is not None else {"LC_ALL": "C"}
        self.job_timeout = job_timeout
        self.log_tail_bytes = log_tail_bytes
        self.submit_attempts = max(1, submit_attempts)
        self.retry_delay_s = retry_delay_s
        self.trigger_max_failures = trigger_max_failures
        self._job: SubmittedJob | None = None

    @cached_property
    def jobs(self) -> ArrayJobs:
        return ArrayJobs(
            self.backend,
            self.log,
            env=self.env,
            log_tail_bytes=self.log_tail_bytes,
            submit_attempts=self.submit_attempts,
            retry_delay_s=self.retry_delay_s,
            trigger_max_failures=self.trigger_max_failures,
        )

    @property
    def client(self) -> ComputeClient:
        return self.jobs.client

    # -- submit and defer --------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, dict[str, Any]]:
        tasks = _argv_lists(self.tasks, self.step)
        stdin = None if self.stdin is None else list(self.stdin)
        job = self.jobs.submit(self.step, tasks, stdin, self._job_dir(context))
        self._job = job
        context["ti"].xcom_push(key=XCOM_KEY, value={**job.to_dict(), "backend": self.backend.kind})
        statuses = self.jobs.poll_once(job)
        if statuses and all(s.terminal for s in statuses):
            return self._finish(job, statuses, status="done")
        self.defer(
            trigger=self.jobs.trigger(job),
            method_name="execute_complete",
            timeout=self.job_timeout,
        )
        raise AssertionError("defer() returned")  # pragma: no cover

    def _job_dir(self, context: Context) -> str:
        """`<workdir>/<dag>/<run>/<task>[-<map index>]/<step>-try<n>`: readable, unique."""
        ti = context["ti"]
        mapped = ti.map_index is not None and ti.map_index >= 0
        task = _safe(ti.task_id) + (f"-{ti.map_index}" if mapped else "")
        parts = [_safe(ti.dag_id), _safe(ti.run_id), task, f"{_safe(self.step)}-try{ti.try_number}"]
        return "/".join([self.jobs.job_root(), *parts])

    # -- resume --------------------------------------------------------------------------------

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None
    ) -> dict[str, dict[str, Any]]:
        job, statuses = statuses_from_event(event, self.step)
        self._job = job
        assert event is not None
        return self._finish(job, statuses, status=event["status"], message=event["message"])

    def _finish(
        self, job: SubmittedJob, statuses: list[TaskStatus], *, status: str, message: str = ""
    ) -> dict[str, dict[str, Any]]:
        results = self.jobs.finish(self.step, job, statuses, status=status, message=message)
        failed = [i for i, s in enumerate(statuses) if not s.succeeded]
        if failed and len(failed) == len(statuses):
            logs = self.jobs.last_logs
            first = failed[0]
            tail = (logs[first].stderr or logs[first].stdout) if first in logs else ""
            last_lines = "\n".join(tail.rstrip("\n").splitlines()[-10:])
            raise ComputeJobFailed(
                f"step {self.step}: all {len(statuses)} task(s) of job {job.job_id} failed; "
                f"task {first} ({job.job_id}_{first}) ended {statuses[first].state} with exit "
                f"code {statuses[first].exit_code}; last log lines:\n{last_lines}"
            )
        return results

    # -- kill, timeout ---------------------------------------------------------------------

    def resume_execution(
        self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context
    ) -> Any:
        try:
            return super().resume_execution(next_method, next_kwargs, context)
        except (TaskDeferralTimeout, TaskDeferralError):  # outlived job_timeout, or trigger died
            self._cancel(context)
            raise

    def on_kill(self) -> None:
        self._cancel(None)

    def _cancel(self, context: Context | None) -> None:
        job = self._job or self._job_from_xcom(context)
        if job is None:
            self.log.info("No submitted job to cancel")
            return
        self.jobs.cancel(job)

    def _job_from_xcom(self, context: Context | None) -> SubmittedJob | None:
        try:
            ti = context["ti"] if context else self.task_instance  # type: ignore[attr-defined]
            data = ti.xcom_pull(task_ids=ti.task_id, key=XCOM_KEY, map_indexes=ti.map_index)
            return SubmittedJob.from_dict(data) if data else None
        except Exception as exc:
            self.log.warning("Could not read the submitted job from XCom: %s", exc)
            return None


def _argv_lists(tasks: Any, step: str) -> list[list[str]]:
    """Validate the rendered `tasks` (possibly from XCom) into a list of argv lists."""
    if isinstance(tasks, str | bytes) or not isinstance(tasks, Sequence) or not tasks:
        raise ValueError(f"step {step}: tasks must be a non-empty list of argument lists")
    result = []
    for index, argv in enumerate(tasks):
        if isinstance(argv, str | bytes) or not isinstance(argv, Sequence) or not argv:
            raise ValueError(f"step {step}: task {index} must be a non-empty list of strings")
        if not all(isinstance(arg, str) for arg in argv):
            raise ValueError(f"step {step}: task {index} has a non-string argument: {argv!r}")
        result.append(list(argv))
    return result


def _safe(value: str) -> str:
    return _UNSAFE.sub("_", value).strip("._")[:80] or "x"
