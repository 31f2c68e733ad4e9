"""Local backend: the same job script, run detached with bounded concurrency, and cancellable."""

from __future__ import annotations

import time
from pathlib import Path

from cryoflow.compute.jobscript import JobLayout, SubmittedJob, TaskStatus, build_array_script
from cryoflow.compute.local import LocalCompute
from cryoflow.compute.settings import LocalBackend


def _wait(client: LocalCompute, job: SubmittedJob, timeout_s: float = 20) -> list[TaskStatus]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        statuses = client.poll([job])[job.job_id]
        if all(s.terminal for s in statuses):
            return statuses
        time.sleep(0.1)
    raise AssertionError(f"job {job.job_id} still running after {timeout_s}s: {statuses}")


def test_runs_every_task_at_most_max_parallel_at_once(tmp_path: Path) -> None:
    client = LocalCompute(LocalBackend(workdir=str(tmp_path), max_parallel=2))
    layout = JobLayout(str(tmp_path / "job"))
    # Each task records when it started and ended; index 3 fails with exit code 3.
    record = 'date +%s.%N; sleep 0.4; date +%s.%N; [ "$SLURM_ARRAY_TASK_ID" != 3 ] || exit 3'
    script = build_array_script(step="t", tasks=[["sh", "-c", record]] * 5, layout=layout)
    job = client.submit(script, layout, 5)

    statuses = _wait(client, job)

    assert [s.state for s in statuses] == ["COMPLETED"] * 3 + ["FAILED", "COMPLETED"]
    assert [s.exit_code for s in statuses] == [0, 0, 0, 3, 0]
    logs = client.fetch_logs(job, range(5), max_bytes=1000)
    intervals = [tuple(map(float, logs[i].stdout.split())) for i in range(5)]
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running, peak = 0, 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak == 2


def test_cancel_stops_running_tasks_and_reports_cancelled(tmp_path: Path) -> None:
    client = LocalCompute(LocalBackend(workdir=str(tmp_path), max_parallel=1))
    layout = JobLayout(str(tmp_path / "job"))
    script = build_array_script(
        step="t", tasks=[["sh", "-c", "echo started; exec sleep 30"]] * 2, layout=layout
    )
    job = client.submit(script, layout, 2)
    deadline = time.monotonic() + 10
    while client.poll([job])[job.job_id][0].state != "RUNNING":
        assert time.monotonic() < deadline, "task 0 never started"
        time.sleep(0.05)

    started = time.monotonic()
    client.cancel([job])

    assert time.monotonic() - started < 5
    assert [s.state for s in client.poll([job])[job.job_id]] == ["CANCELLED", "CANCELLED"]
    pid = int((Path(job.job_dir) / "runner.pid").read_text().split()[0])
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX"


def test_runner_killed_from_outside_leaves_its_tasks_lost(tmp_path: Path) -> None:
    import os
    import signal

    client = LocalCompute(LocalBackend(workdir=str(tmp_path), max_parallel=1))
    layout = JobLayout(str(tmp_path / "job"))
    script = build_array_script(step="t", tasks=[["sleep", "30"]], layout=layout)
    job = client.submit(script, layout, 1)
    pid = int((Path(job.job_dir) / "runner.pid").read_text().split()[0])
    os.killpg(pid, signal.SIGKILL)  # what a machine crash or OOM killer would leave behind

    assert _wait(client, job, timeout_s=5) == [TaskStatus("LOST", None)]
