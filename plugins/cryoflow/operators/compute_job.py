"""Run one processing step over a batch of movies as ONE job array, without holding a worker.

`ComputeArrayOperator` builds the job script (cryoflow.compute.jobscript), submits it to the
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

from cryoflow.compute.jobscript import (
    ComputeClient,
    JobLayout,
    SubmittedJob,
    TaskStatus,
    build_array_script,
    slurm_directives,
)
from cryoflow.compute.local import LocalCompute
from cryoflow.compute.settings import LocalBackend, SlurmBackend, parse_backend
from cryoflow.hooks.slurm import SlurmHook, SlurmTransientError
from cryoflow.triggers.slurm_job import EVENT_KEYS, SlurmJobTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["ComputeArrayOperator", "ComputeJobError", "ComputeJobFailed", "compute_client"]

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
        return SlurmHook(settings.ssh_conn_id)
    return LocalCompute(settings)


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
    def client(self) -> ComputeClient:
        # Built lazily: parsing a DAG file must not touch a connection.
        return compute_client(self.backend)

    # -- submit and defer --------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, dict[str, Any]]:
        tasks = _argv_lists(self.tasks, self.step)
        layout = JobLayout(self._job_dir(context))
        script = self._script(tasks, layout)
        job = self._retrying("submit", lambda: self.client.submit(script, layout, len(tasks)))
        self._job = job
        context["ti"].xcom_push(key=XCOM_KEY, value={**job.to_dict(), "backend": self.backend.kind})
        self.log.info(
            "Step %s: %s job %s, %d task(s), files in %s",
            self.step, self.backend.kind, job.job_id, job.n_tasks, job.job_dir,
        )  # fmt: skip
        try:
            statuses = self.client.poll([job])[job.job_id]
        except SlurmTransientError as exc:  # the trigger will ask again
            self.log.warning("First status check of job %s failed: %s", job.job_id, exc)
            statuses = []
        if statuses and all(s.terminal for s in statuses):
            return self._finish(job, statuses, status="done")
        self.defer(
            trigger=SlurmJobTrigger(
                backend=self.backend.model_dump(mode="json"),
                job_id=job.job_id,
                job_dir=job.job_dir,
                n_tasks=job.n_tasks,
                max_failures=self.trigger_max_failures,
            ),
            method_name="execute_complete",
            timeout=self.job_timeout,
        )
        raise AssertionError("defer() returned")  # pragma: no cover

    def _script(self, tasks: list[list[str]], layout: JobLayout) -> str:
        stdin = None if self.stdin is None else list(self.stdin)
        if isinstance(self.backend, SlurmBackend):
            return build_array_script(
                step=self.step,
                tasks=tasks,
                layout=layout,
                stdin=stdin,
                env=self.env,
                modules=self.backend.modules,
                sbatch=slurm_directives(self.backend),
                max_parallel=self.backend.max_parallel,
            )
        return build_array_script(
            step=self.step, tasks=tasks, layout=layout, stdin=stdin, env=self.env
        )

    def _job_dir(self, context: Context) -> str:
        """`<workdir>/<dag>/<run>/<task>[-<map index>]/<step>-try<n>`: readable, unique."""
        ti = context["ti"]
        root = (
            self.backend.remote_workdir
            if isinstance(self.backend, SlurmBackend)
            else self.backend.workdir
        )
        mapped = ti.map_index is not None and ti.map_index >= 0
        task = _safe(ti.task_id) + (f"-{ti.map_index}" if mapped else "")
        parts = [_safe(ti.dag_id), _safe(ti.run_id), task, f"{_safe(self.step)}-try{ti.try_number}"]
        return "/".join([root.rstrip("/"), *parts])

    # -- resume --------------------------------------------------------------------------------

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None
    ) -> dict[str, dict[str, Any]]:
        if not event or any(key not in event for key in EVENT_KEYS):
            raise ComputeJobError(f"malformed trigger event for step {self.step}: {event!r}")
        job = SubmittedJob(str(event["job_id"]), str(event["job_dir"]), int(event["n_tasks"]))
        self._job = job
        statuses = [
            TaskStatus(event["tasks"][str(i)]["state"], event["tasks"][str(i)]["exit_code"])
            if str(i) in event["tasks"]
            else TaskStatus("UNKNOWN", None)
            for i in range(job.n_tasks)
        ]
        return self._finish(job, statuses, status=event["status"], message=event["message"])

    def _finish(
        self, job: SubmittedJob, statuses: list[TaskStatus], *, status: str, message: str = ""
    ) -> dict[str, dict[str, Any]]:
        logs = self._fetch_logs(job)
        for index, task in enumerate(statuses):
            self.log.info(
                "--- %s task %d (job %s_%d): %s, exit code %s ---",
                self.step, index, job.job_id, index, task.state, task.exit_code,
            )  # fmt: skip
            if index in logs:
                for name, text in (("stdout", logs[index].stdout), ("stderr", logs[index].stderr)):
                    for line in text.rstrip("\n").splitlines():
                        self.log.info("[%d %s] %s", index, name, line)
        if status == "error":
            # A retry resubmits the batch: stop this job first so two jobs never write the
            # same outputs (best effort: SSH may still be down).
            self._cancel_job(job)
            raise ComputeJobError(
                f"step {self.step}: lost track of job {job.job_id} ({message}); job files in "
                f"{job.job_dir}"
            )
        results = {str(i): s.to_dict() for i, s in enumerate(statuses)}
        failed = [i for i, s in enumerate(statuses) if not s.succeeded]
        if failed and len(failed) == len(statuses):
            first = failed[0]
            tail = (logs[first].stderr or logs[first].stdout) if first in logs else ""
            last_lines = "\n".join(tail.rstrip("\n").splitlines()[-10:])
            raise ComputeJobFailed(
                f"step {self.step}: all {len(statuses)} task(s) of job {job.job_id} failed; "
                f"task {first} ({job.job_id}_{first}) ended {statuses[first].state} with exit "
                f"code {statuses[first].exit_code}; last log lines:\n{last_lines}"
            )
        if failed:
            self.log.warning(
                "Step %s, job %s: %d of %d task(s) failed: indices %s",
                self.step, job.job_id, len(failed), len(statuses), failed,
            )  # fmt: skip
        return results

    def _fetch_logs(self, job: SubmittedJob) -> dict[int, Any]:
        try:
            return self._retrying(
                "fetch logs",
                lambda: self.client.fetch_logs(job, range(job.n_tasks), self.log_tail_bytes),
            )
        except Exception as exc:  # logs help people; results must not depend on them
            self.log.warning("Could not fetch logs of job %s: %s", job.job_id, exc)
            return {}

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
        self._cancel_job(job)

    def _cancel_job(self, job: SubmittedJob) -> None:
        try:
            self.client.cancel([job])
            self.log.info("Cancelled %s job %s", self.backend.kind, job.job_id)
        except Exception as exc:
            self.log.warning("Could not cancel job %s: %s", job.job_id, exc)

    def _job_from_xcom(self, context: Context | None) -> SubmittedJob | None:
        try:
            ti = context["ti"] if context else self.task_instance  # type: ignore[attr-defined]
            data = ti.xcom_pull(task_ids=ti.task_id, key=XCOM_KEY, map_indexes=ti.map_index)
            return SubmittedJob.from_dict(data) if data else None
        except Exception as exc:
            self.log.warning("Could not read the submitted job from XCom: %s", exc)
            return None

    def _retrying(self, what: str, action: Callable[[], _T]) -> _T:
        for attempt in range(1, self.submit_attempts + 1):
            try:
                return action()
            except SlurmTransientError as exc:
                if attempt == self.submit_attempts:
                    raise ComputeJobError(
                        f"step {self.step}: {what} failed {attempt} times: {exc}"
                    ) from exc
                delay = self.retry_delay_s * 2 ** (attempt - 1)
                self.log.warning("%s failed (%s); retry %d in %.0fs", what, exc, attempt, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


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
