"""Local backend: the same job script, run detached with bounded concurrency, and cancellable."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cryoflow.processing.compute.jobscript import (
    JobLayout,
    SubmittedJob,
    TaskStatus,
    build_array_script,
)
from cryoflow.processing.compute.local import LocalCompute
from cryoflow.processing.compute.settings import LocalBackend


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


def test_a_job_is_followed_from_another_host_through_its_folder(tmp_path: Path) -> None:
    """The triggerer may run on another host than the runner: the job's state comes from its
    folder (heartbeat), not from /proc, and a cancel written there stops the runner."""
    client = LocalCompute(LocalBackend(workdir=str(tmp_path), max_parallel=1))
    layout = JobLayout(str(tmp_path / "job"))
    script = build_array_script(
        step="t", tasks=[["sh", "-c", "echo started; exec sleep 30"]] * 2, layout=layout
    )
    job = client.submit(script, layout, 2)
    job_dir = Path(layout.job_dir)
    deadline = time.monotonic() + 10
    while client.poll([job])[job.job_id][0].state != "RUNNING":
        assert time.monotonic() < deadline, "task 0 never started"
        time.sleep(0.05)
    pid, ticks, _host = (job_dir / "runner.pid").read_text().split()
    (job_dir / "runner.pid").write_text(f"{pid} {ticks} another-host\n")  # as seen from there
    assert [s.state for s in client.poll([job])[job.job_id]] == ["RUNNING", "PENDING"]
    alive = job_dir / "runner.alive"
    old = time.time() - 3600
    os.utime(alive, (old, old))  # a runner whose heartbeat stopped: gone
    assert [s.state for s in client.poll([job])[job.job_id]] == ["LOST", "LOST"]
    # a cancel written from the other host (no signal can reach the runner): it stops itself
    (job_dir / "cancelled").write_text("0\n")
    deadline = time.monotonic() + 15
    while alive.exists():  # removed when the runner ends
        assert time.monotonic() < deadline, "the runner did not obey the cancel file"
        time.sleep(0.1)
    assert [s.state for s in client.poll([job])[job.job_id]][1] == "CANCELLED"
