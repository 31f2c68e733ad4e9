"""Reading Slurm's answers: sbatch, and the sacct + squeue + exit-file poll with sacct's lag.

The samples are outputs recorded from Slurm 22.05 (services.sh cluster) in the situations named.
"""

from __future__ import annotations

import pytest

from cryoflow.processing.compute.jobscript import SubmittedJob, TaskStatus
from cryoflow.processing.compute.slurm import (
    SlurmCommandError,
    SlurmTransientError,
    build_poll_command,
    is_transient,
    parse_poll_output,
    parse_sbatch_output,
    reconcile,
)

JOB = SubmittedJob("1", "/home/cryo/jobs/a", 6)


def _poll(sacct: str, squeue: str, exits: str = "", sacct_rc: int = 0, squeue_rc: int = 0) -> str:
    return (
        f"@@cryoflow:sacct\n{sacct}@@cryoflow:rc:{sacct_rc}\n"
        f"@@cryoflow:squeue\n{squeue}@@cryoflow:rc:{squeue_rc}\n"
        f"@@cryoflow:exit\n{exits}@@cryoflow:end\n"
    )


def _states(text: str, job: SubmittedJob = JOB) -> list[TaskStatus]:
    return reconcile(parse_poll_output(text), [job])[job.job_id]


def test_sbatch_parsable_with_and_without_cluster() -> None:
    assert parse_sbatch_output("1234\n") == "1234"
    assert parse_sbatch_output("1234;cryoflow\n") == "1234"
    with pytest.raises(SlurmCommandError, match="no job id"):
        parse_sbatch_output("sbatch: error: something\n")


def test_collapsed_pending_row_and_squeue_give_live_states() -> None:
    # 2 tasks done, sacct still shows the rest collapsed as PENDING while squeue sees 2 running.
    text = _poll(
        "1_0|COMPLETED|0:0\n1_1|COMPLETED|0:0\n1_[2-5%2]|PENDING|0:0\n",
        "1_4|PENDING\n1_5|PENDING\n1_2|RUNNING\n1_3|RUNNING\n",
        "/home/cryo/jobs/a/exit/1_0:0\n/home/cryo/jobs/a/exit/1_1:0\n",
    )
    assert [s.state for s in _states(text)] == ["COMPLETED"] * 2 + ["RUNNING"] * 2 + ["PENDING"] * 2


def test_task_missing_from_accounting_is_finished_by_its_exit_file() -> None:
    # Recorded: 1_4 finished but sacct had no row for it yet; squeue no longer lists it.
    text = _poll(
        "1_0|COMPLETED|0:0\n1_1|COMPLETED|0:0\n1_2|COMPLETED|0:0\n1_3|FAILED|3:0\n"
        "1_5|RUNNING|0:0\n",
        "1_5|RUNNING\n",
        "/home/cryo/jobs/a/exit/1_3:3\n/home/cryo/jobs/a/exit/1_4:0\n"
        "/home/cryo/jobs/a/exit/.1_5.tmp:0\n",  # a temp file mid-rename is ignored
    )
    states = _states(text)
    assert states[3] == TaskStatus("FAILED", 3)
    assert states[4] == TaskStatus("COMPLETED", 0)
    assert states[5] == TaskStatus("RUNNING", None)


def test_accounting_down_falls_back_to_squeue_and_exit_files() -> None:
    sacct_down = (
        "sacct: error: slurm_persist_conn_open_without_init: failed to open persistent "
        "connection to host:127.0.0.1:6819: Connection refused\n"
        "sacct: error: Problem talking to the database: Connection refused\n"
    )
    text = _poll(sacct_down, "1_1|RUNNING\n", "/home/cryo/jobs/a/exit/1_0:0\n", sacct_rc=1)
    answer = parse_poll_output(text)
    assert "Connection refused" in (answer.accounting_error or "")
    states = reconcile(answer, [SubmittedJob("1", "/home/cryo/jobs/a", 3)])["1"]
    # Index 2: no accounting, not queued, no exit file: unknown, the trigger keeps asking.
    assert [s.state for s in states] == ["COMPLETED", "RUNNING", "UNKNOWN"]


def test_array_cancelled_before_start_is_cancelled_not_pending() -> None:
    text = _poll("27_[0-1]|CANCELLED|0:0\n", "slurm_load_jobs error: Invalid job id specified\n",
                 squeue_rc=1)  # fmt: skip
    job = SubmittedJob("27", "/home/cryo/jobs/c", 2)
    assert _states(text, job) == [TaskStatus("CANCELLED", None)] * 2


def test_signals_and_timeouts_from_accounting() -> None:
    text = _poll("5_0|FAILED|0:9\n5_1|TIMEOUT|0:0\n5_2|OUT_OF_MEMORY|0:125\n", "")
    job = SubmittedJob("5", "/x", 3)
    assert _states(text, job) == [
        TaskStatus("FAILED", 137),
        TaskStatus("TIMEOUT", 0),
        TaskStatus("OUT_OF_MEMORY", 253),
    ]


def test_controller_down_is_transient() -> None:
    text = _poll(
        "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n",
        squeue_rc=1,
    )  # fmt: skip
    with pytest.raises(SlurmTransientError, match="Unable to contact slurm controller"):
        parse_poll_output(text)
    assert is_transient("sbatch: error: Batch job submission failed: Socket timed out on send/recv")
    assert not is_transient("sbatch: error: invalid partition specified: nosuch")


def test_output_cut_short_is_transient() -> None:
    with pytest.raises(SlurmTransientError, match="cut short"):
        parse_poll_output("@@cryoflow:sacct\n1_0|RUNNING|0:0\n")


def test_poll_command_quotes_paths_and_lists_every_job() -> None:
    jobs = [SubmittedJob("11", "/home/cryo/jobs/a", 1), SubmittedJob("12", "/home/cryo/jobs/b", 2)]
    command = build_poll_command(jobs)
    assert command.count("sacct ") == 1 and command.count("squeue ") == 1
    assert "-j 11,12" in command
    assert "/home/cryo/jobs/a/exit /home/cryo/jobs/b/exit" in command
