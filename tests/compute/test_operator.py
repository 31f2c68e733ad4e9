"""ComputeArrayOperator: submit, defer to the trigger, resume with per-index results and logs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.bases.operator import TRIGGER_FAIL_REPR, TriggerFailureReason
from airflow.sdk.exceptions import TaskDeferralTimeout, TaskDeferred

from cryoflow.operators.compute_job import (
    XCOM_KEY,
    ComputeArrayOperator,
    ComputeJobError,
    ComputeJobFailed,
)
from cryoflow.processing.compute.jobscript import SubmittedJob
from cryoflow.processing.compute.local import LocalCompute
from cryoflow.processing.compute.settings import LocalBackend
from cryoflow.triggers.slurm_job import SlurmJobTrigger
from tests.services_fixtures import SlurmServices


@dataclass
class _TaskInstance:
    """The few TaskInstance attributes the operator reads (a real TI needs a running API)."""

    dag_id: str = "krios1_session"
    task_id: str = "ctffind"
    run_id: str = "manual__2026-11-24T10:00:00+00:00"
    map_index: int = -1
    try_number: int = 1
    xcoms: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value

    def xcom_pull(self, task_ids: str, key: str, map_indexes: int) -> Any:
        return self.xcoms.get(key)


def _defer(op: ComputeArrayOperator, context: dict[str, Any]) -> SlurmJobTrigger:
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    assert deferred.value.method_name == "execute_complete"
    trigger = deferred.value.trigger
    assert isinstance(trigger, SlurmJobTrigger)
    return trigger


def _fire(trigger: SlurmJobTrigger) -> dict[str, Any]:
    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("trigger ended without an event")

    return asyncio.run(asyncio.wait_for(first(), 60))


def _local(tmp_path: Path, **kwargs: Any) -> ComputeArrayOperator:
    kwargs.setdefault("task_id", "ctffind")
    backend = {"kind": "local", "workdir": str(tmp_path), "max_parallel": 2, "poll_interval_s": 0.2}
    return ComputeArrayOperator(backend=backend, step="ctffind", **kwargs)


def test_defers_then_returns_per_index_results_and_logs_task_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    op = _local(
        tmp_path,
        tasks=[["sh", "-c", "sleep 0.5; echo fit ok"], ["sh", "-c", "echo bad movie >&2; exit 3"]],
    )
    ti = _TaskInstance()
    trigger = _defer(op, {"ti": ti})

    job = ti.xcoms[XCOM_KEY]
    assert job["backend"] == "local" and job["n_tasks"] == 2
    assert job["job_dir"].startswith(f"{tmp_path}/krios1_session/manual__2026-11-24T10_00_00_00_00")
    assert trigger.job_id == job["job_id"]
    classpath, kwargs = trigger.serialize()
    assert kwargs["backend"]["kind"] == "local"

    event = _fire(trigger)
    assert event["status"] == "failed"
    fresh = _local(tmp_path, tasks=[["true"]])  # resumed on a worker: a fresh operator object
    capsys.readouterr()

    result = fresh.execute_complete({"ti": ti}, event)

    assert result == {
        "0": {"state": "COMPLETED", "exit_code": 0},
        "1": {"state": "FAILED", "exit_code": 3},
    }
    task_log = capsys.readouterr().out  # Airflow's task logger (structlog) writes to stdout
    assert "[0 stdout] fit ok" in task_log
    assert "[1 stderr] bad movie" in task_log


def test_all_tasks_failing_fails_the_task_naming_job_index_and_log(tmp_path: Path) -> None:
    op = _local(tmp_path, tasks=[["sh", "-c", "echo 'cannot read header of mov1.tif' >&2; exit 2"]])
    ti = _TaskInstance()
    event = _fire(_defer(op, {"ti": ti}))
    job_id = ti.xcoms[XCOM_KEY]["job_id"]

    with pytest.raises(ComputeJobFailed) as failure:
        op.execute_complete({"ti": ti}, event)

    message = str(failure.value)
    assert f"job {job_id}" in message
    assert f"task 0 ({job_id}_0) ended FAILED with exit code 2" in message
    assert "cannot read header of mov1.tif" in message


def test_trigger_error_and_malformed_events_raise(tmp_path: Path) -> None:
    op = _local(tmp_path, tasks=[["true"]])
    error = {
        "status": "error",
        "job_id": "42",
        "job_dir": str(tmp_path / "gone"),
        "n_tasks": 1,
        "backend": "local",
        "tasks": {},
        "message": "gave up after 6 failed polls",
    }
    with pytest.raises(ComputeJobError, match="lost track of job 42 .*gave up"):
        op.execute_complete({"ti": _TaskInstance()}, error)
    with pytest.raises(ComputeJobError, match="malformed trigger event"):
        op.execute_complete({"ti": _TaskInstance()}, {"status": "success"})


def test_on_kill_and_timeout_cancel_the_job(tmp_path: Path) -> None:
    backend = LocalBackend(workdir=str(tmp_path), max_parallel=1)
    for how in ("on_kill", "timeout"):
        op = _local(tmp_path, task_id=f"t_{how}", tasks=[["sleep", "30"]])
        ti = _TaskInstance(task_id=f"t_{how}")
        _defer(op, {"ti": ti})
        job = SubmittedJob.from_dict(ti.xcoms[XCOM_KEY])
        if how == "on_kill":
            op.on_kill()
        else:  # the deferral timed out: Airflow resumes the task with the trigger failure
            resumed = _local(tmp_path, task_id=f"t_{how}", tasks=[["true"]])
            with pytest.raises(TaskDeferralTimeout):
                resumed.resume_execution(
                    TRIGGER_FAIL_REPR, {"error": TriggerFailureReason.TRIGGER_TIMEOUT}, {"ti": ti}
                )
        assert [s.state for s in LocalCompute(backend).poll([job])[job.job_id]] == ["CANCELLED"]


def test_bad_tasks_from_xcom_fail_before_anything_is_submitted(tmp_path: Path) -> None:
    op = _local(tmp_path, tasks=[["motioncor2", 5]])
    with pytest.raises(ValueError, match="step ctffind: task 0 has a non-string argument"):
        op.execute({"ti": _TaskInstance()})
    assert not any(tmp_path.iterdir())


@pytest.mark.services
def test_slurm_round_trip_through_operator_and_trigger(
    slurm_services: SlurmServices, remote_job_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = {
        "kind": "slurm",
        "ssh_conn_id": slurm_services.conn_id,
        "partition": "cpu",
        "time_limit": "2",
        "remote_workdir": remote_job_root,
        "max_parallel": 3,
        "poll_interval_s": 0.3,
    }
    tasks = [["sh", "-c", f"sleep 2; echo movie {i}; exit {3 if i == 2 else 0}"] for i in range(3)]
    op = ComputeArrayOperator(task_id="motioncor", backend=backend, step="motioncor", tasks=tasks)
    ti = _TaskInstance(task_id="motioncor", map_index=4)
    trigger = _defer(op, {"ti": ti})
    assert ti.xcoms[XCOM_KEY]["job_dir"].endswith("/motioncor-4/motioncor-try1")
    event = _fire(trigger)
    capsys.readouterr()

    result = op.execute_complete({"ti": ti}, event)

    assert [result[str(i)]["state"] for i in range(3)] == ["COMPLETED", "COMPLETED", "FAILED"]
    assert result["2"]["exit_code"] == 3
    assert "[1 stdout] movie 1" in capsys.readouterr().out
