"""Slurm over SSH against the real single-node cluster of scripts/services.sh."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from cryoflow.hooks.slurm import SlurmCommandError, SlurmHook, build_poll_command
from cryoflow.processing.compute.jobscript import (
    JobLayout,
    SubmittedJob,
    TaskStatus,
    build_array_script,
)
from cryoflow.triggers.first_event import FirstEventTrigger
from cryoflow.triggers.slurm_job import SlurmJobTrigger
from tests.services_fixtures import SERVICES_SH, SlurmServices

pytestmark = pytest.mark.services

HOSTILE = "mov $(touch pwned_marker) `touch pwned_marker2`.tif"


@pytest.fixture
def hook(slurm_services: SlurmServices):
    hook = SlurmHook(slurm_services.conn_id, command_timeout_s=30)
    yield hook
    hook.close()


def _backend(services: SlurmServices, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "slurm",
        "ssh_conn_id": services.conn_id,
        "partition": "cpu",
        "remote_workdir": services.remote_workdir,
        **extra,
    }


def _submit(
    hook: SlurmHook, root: str, name: str, tasks: list[list[str]], **kwargs: Any
) -> SubmittedJob:
    layout = JobLayout(f"{root}/{name}")
    kwargs.setdefault("sbatch", ["--partition=cpu", "--time=2"])
    script = build_array_script(step=name, tasks=tasks, layout=layout, **kwargs)
    return hook.submit(script, layout, len(tasks))


def _wait(hook: SlurmHook, jobs: list[SubmittedJob], timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while True:
        polled = hook.poll(jobs)
        if all(s.terminal for statuses in polled.values() for s in statuses):
            return polled
        assert time.monotonic() < deadline, f"jobs not done after {timeout_s}s: {polled}"
        time.sleep(0.3)


def _trigger(services: SlurmServices, job: SubmittedJob, **kwargs: Any) -> SlurmJobTrigger:
    kwargs.setdefault("poll_interval_s", 0.3)
    return SlurmJobTrigger(
        backend=_backend(services),
        job_id=job.job_id,
        job_dir=job.job_dir,
        n_tasks=job.n_tasks,
        **kwargs,
    )


async def _events(trigger: SlurmJobTrigger, timeout_s: float = 40) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        return [event.payload async for event in trigger.run()]

    return await asyncio.wait_for(collect(), timeout_s)


def test_array_over_ssh_states_exit_codes_logs_and_no_injection(
    hook: SlurmHook, remote_job_root: str
) -> None:
    tasks = [
        ["printf", "%s\n", HOSTILE],
        ["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"],
        ["cat"],
    ]
    job = _submit(hook, remote_job_root, "quoting", tasks, stdin=[None, None, "answer\n$(x)\n"])

    statuses = _wait(hook, [job])[job.job_id]

    assert statuses == [
        TaskStatus("COMPLETED", 0),
        TaskStatus("FAILED", 3),
        TaskStatus("COMPLETED", 0),
    ]
    logs = hook.fetch_logs(job, range(3), max_bytes=4000)
    assert logs[0].stdout == HOSTILE + "\n"
    assert (logs[1].stdout, logs[1].stderr) == ("to-stdout\n", "to-stderr\n")
    assert logs[2].stdout == "answer\n$(x)\n"
    home = Path(remote_job_root).parents[1]
    assert not list(Path(job.job_dir).rglob("pwned_marker*"))
    assert not list(home.glob("pwned_marker*"))


def test_one_poll_call_covers_many_jobs_and_gpu_tasks_see_their_gpu(
    hook: SlurmHook, remote_job_root: str
) -> None:
    show = ["sh", "-c", 'echo "gpu=${CUDA_VISIBLE_DEVICES:-none}"']
    jobs = [
        _submit(hook, remote_job_root, "cpu1", [show] * 2),
        _submit(hook, remote_job_root, "cpu2", [show, ["false"]]),
        _submit(hook, remote_job_root, "gpu", [show], sbatch=["--partition=gpu", "--gres=gpu:1"]),
    ]
    assert build_poll_command(jobs).count("sacct ") == 1

    before = hook.commands_run
    polled = hook.poll(jobs)
    assert hook.commands_run - before == 1  # one SSH round trip for all three jobs
    assert sorted(polled) == sorted(job.job_id for job in jobs)
    assert [len(polled[job.job_id]) for job in jobs] == [2, 2, 1]

    polled = _wait(hook, jobs)
    assert [s.state for s in polled[jobs[1].job_id]] == ["COMPLETED", "FAILED"]
    assert hook.fetch_logs(jobs[0], [0], 100)[0].stdout == "gpu=none\n"
    assert hook.fetch_logs(jobs[2], [0], 100)[0].stdout == "gpu=0\n"


def test_bad_partition_is_a_permanent_error(hook: SlurmHook, remote_job_root: str) -> None:
    with pytest.raises(SlurmCommandError, match="(?i)invalid partition"):
        _submit(hook, remote_job_root, "bad", [["true"]], sbatch=["--partition=nosuch"])


def test_trigger_yields_one_final_event_with_per_index_results(
    hook: SlurmHook, slurm_services: SlurmServices, remote_job_root: str
) -> None:
    job = _submit(hook, remote_job_root, "trig", [["true"], ["sh", "-c", "exit 3"]])

    events = asyncio.run(_events(_trigger(slurm_services, job)))

    assert events == [
        {
            "status": "failed",
            "job_id": job.job_id,
            "job_dir": job.job_dir,
            "n_tasks": 2,
            "backend": "slurm",
            "tasks": {
                "0": {"state": "COMPLETED", "exit_code": 0},
                "1": {"state": "FAILED", "exit_code": 3},
            },
            "message": f"job {job.job_id} ended",
        }
    ]


def test_a_run_following_several_arrays_hears_of_the_first_that_ends(
    hook: SlurmHook, slurm_services: SlurmServices, remote_job_root: str
) -> None:
    """A processing run has arrays in flight at once (CTF of one batch, MotionCor2 of the
    next): the array that ends first is reported while the one followed first still runs,
    and the others are left running (followed again by the next deferral)."""
    long = _submit(hook, remote_job_root, "long", [["sleep", "30"]])
    short = _submit(hook, remote_job_root, "short", [["true"], ["true"]])
    try:
        first = FirstEventTrigger(
            triggers=[_trigger(slurm_services, j).serialize() for j in (long, short)]
        )
        t0 = time.monotonic()
        events = asyncio.run(_events(first))  # type: ignore[arg-type]
        assert time.monotonic() - t0 < 20
        assert [(e["status"], e["job_id"]) for e in events] == [("success", short.job_id)]
        assert events[0]["tasks"] == {str(i): {"state": "COMPLETED", "exit_code": 0}
                                      for i in range(2)}  # fmt: skip
        assert not hook.poll([long])[long.job_id][0].terminal  # the other one goes on
    finally:
        subprocess.run(["scancel", long.job_id], check=False)


def test_trigger_serialize_round_trips(slurm_services: SlurmServices) -> None:
    job = SubmittedJob("123", "/home/cryo/x", 4)
    trigger = _trigger(slurm_services, job, max_failures=7, lost_after_polls=3)
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    rebuilt = getattr(__import__(module, fromlist=[name]), name)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    # a trigger stored by the release that still woke its task loads after an upgrade
    stored = getattr(__import__(module, fromlist=[name]), name)(**kwargs, wake_after_s=15.0)
    assert stored.serialize() == (classpath, kwargs)


class _CountingTrigger(SlurmJobTrigger):
    """The real trigger, counting its connections and complete polls."""

    connects = 0
    polls = 0

    async def _connect(self):
        type(self).connects += 1
        return await super()._connect()

    async def _poll(self, conn):
        statuses = await super()._poll(conn)
        type(self).polls += 1
        return statuses


def _kill_sshd(services: SlurmServices) -> None:
    """Stop the listening sshd AND its per-connection processes: every SSH session drops."""
    pid = int(services.sshd_pidfile.read_text())
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for victim in [pid, *map(int, children)]:
        os.kill(victim, signal.SIGTERM)


def test_trigger_reconnects_after_sshd_dies_and_comes_back(
    hook: SlurmHook, slurm_services: SlurmServices, remote_job_root: str
) -> None:
    job = _submit(hook, remote_job_root, "drop", [["sleep", "4"], ["true"]])
    hook.close()
    trigger = _CountingTrigger.__new__(_CountingTrigger)
    _CountingTrigger.connects = _CountingTrigger.polls = 0
    trigger.__init__(  # type: ignore[misc]
        backend=_backend(slurm_services),
        job_id=job.job_id,
        job_dir=job.job_dir,
        n_tasks=2,
        poll_interval_s=0.3,
        backoff_base_s=0.4,
        backoff_max_s=1.0,
        max_failures=30,
    )

    async def scenario() -> list[dict[str, Any]]:
        collecting = asyncio.create_task(_events(trigger))
        while _CountingTrigger.polls < 1:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(_kill_sshd, slurm_services)
        await asyncio.sleep(1.5)  # polls fail meanwhile: connection lost, then refused
        up = await asyncio.to_thread(subprocess.run, [str(SERVICES_SH), "up"], capture_output=True)
        assert up.returncode == 0, up.stderr
        return await collecting

    events = asyncio.run(scenario())

    assert len(events) == 1
    assert events[0]["status"] == "success"
    assert events[0]["tasks"]["0"] == {"state": "COMPLETED", "exit_code": 0}
    assert _CountingTrigger.connects >= 2  # it had to open a new connection


def test_trigger_gives_up_with_an_error_event_when_ssh_stays_down(
    monkeypatch: pytest.MonkeyPatch, slurm_services: SlurmServices
) -> None:
    dead = {**json.loads(slurm_services.conn_json), "port": 1}  # nothing listens there
    monkeypatch.setenv("AIRFLOW_CONN_CRYOFLOW_DEAD_SSH", json.dumps(dead))
    trigger = SlurmJobTrigger(
        backend={**_backend(slurm_services), "ssh_conn_id": "cryoflow_dead_ssh"},
        job_id="999999",
        job_dir="/home/cryo/none",
        n_tasks=1,
        max_failures=2,
        backoff_base_s=0.05,
    )

    events = asyncio.run(_events(trigger, timeout_s=20))

    assert len(events) == 1
    assert events[0]["status"] == "error"
    assert "after 3 failed polls" in events[0]["message"]


def test_job_unknown_to_slurm_is_declared_lost_not_followed_forever(
    slurm_services: SlurmServices,
) -> None:
    # Never submitted: not queued, no accounting record, no exit file (like a job cancelled
    # while accounting was down).
    job = SubmittedJob("999999", "/home/cryo/never", 2)
    trigger = _trigger(slurm_services, job, poll_interval_s=0.1, lost_after_polls=3)

    events = asyncio.run(_events(trigger, timeout_s=20))

    assert [e["status"] for e in events] == ["failed"]
    assert events[0]["tasks"] == {str(i): {"state": "LOST", "exit_code": None} for i in range(2)}


def test_host_key_checking_is_on_and_a_wrong_key_fails_fast(
    monkeypatch: pytest.MonkeyPatch, slurm_services: SlurmServices
) -> None:
    host_key = (slurm_services.state_dir / "host_key.pub").read_text().strip()
    other_key = " ".join(slurm_services.key_file.with_suffix(".pub").read_text().split()[:2])
    assert host_key in slurm_services.conn_json and other_key != host_key
    monkeypatch.setenv(
        "AIRFLOW_CONN_CRYOFLOW_IMPOSTOR_SSH", slurm_services.conn_json.replace(host_key, other_key)
    )
    with pytest.raises(SlurmCommandError, match="(?i)host key"):
        SlurmHook("cryoflow_impostor_ssh").run("true")

    _CountingTrigger.connects = 0
    trigger = _CountingTrigger(
        backend={**_backend(slurm_services), "ssh_conn_id": "cryoflow_impostor_ssh"},
        job_id="999999",
        job_dir="/home/cryo/none",
        n_tasks=1,
        backoff_base_s=5,  # a retry would blow the timeout below
    )
    events = asyncio.run(_events(trigger, timeout_s=4))
    assert [e["status"] for e in events] == ["error"]
    assert "HostKeyNotVerifiable" in events[0]["message"]
    assert _CountingTrigger.connects == 1


def test_trigger_on_kill_cancels_the_job(
    hook: SlurmHook, slurm_services: SlurmServices, remote_job_root: str
) -> None:
    job = _submit(hook, remote_job_root, "cancel", [["sleep", "60"]] * 2)
    deadline = time.monotonic() + 15
    while {s.state for s in hook.poll([job])[job.job_id]} != {"RUNNING"}:
        assert time.monotonic() < deadline, "tasks never started"
        time.sleep(0.2)

    asyncio.run(asyncio.wait_for(_trigger(slurm_services, job).on_kill(), 30))

    deadline = time.monotonic() + 15
    while _queued(job):
        assert time.monotonic() < deadline, f"job {job.job_id} still in squeue after scancel"
        time.sleep(0.2)
    states = {s.state for s in _wait(hook, [job])[job.job_id]}
    assert states == {"CANCELLED"}


def _queued(job: SubmittedJob) -> bool:
    out = subprocess.run(
        ["squeue", "-h", "-r", "-j", job.job_id, "-o", "%i"], capture_output=True, text=True
    ).stdout
    return bool(out.strip())
