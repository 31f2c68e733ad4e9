"""Slurm's command lines and answers, free of Airflow (as Airflow's SSH provider keeps
``utils/remote_job.py``): the hook and the async trigger send exactly these commands and read the
answers the same way.

Polling asks about every job at once: one SSH exec runs `sacct` (accounting, the only source for
finished tasks' states), `squeue` (live states; sacct lags: for ~1 s after submit it knows
nothing, then shows a collapsed `ID_[2-9%2] PENDING` row even while tasks run, and may miss
finished tasks for several seconds) and lists the exit-code files the job script writes.
`reconcile` merges the three; see its docstring for the precedence.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryoflow.processing.compute.jobscript import SubmittedJob, TaskStatus, parse_exit_name

__all__ = [
    "PollAnswer",
    "SlurmCommandError",
    "SlurmError",
    "SlurmTransientError",
    "build_cancel_command",
    "build_poll_command",
    "is_invalid_job",
    "is_transient",
    "parse_poll_output",
    "parse_sbatch_output",
    "reconcile",
]


class SlurmError(Exception):
    """A Slurm command failed."""


class SlurmTransientError(SlurmError):
    """Worth retrying: SSH dropped, controller busy or unreachable, command timed out."""


class SlurmCommandError(SlurmError):
    """Will fail again if retried: invalid partition, bad option, permission denied."""


# Messages Slurm commands print when the controller is busy, restarting or unreachable.
_TRANSIENT = re.compile(
    r"socket timed out|unable to contact slurm controller|temporarily unavailable|"
    r"temporarily unable|try again|zero bytes were transmitted|connection refused|"
    r"communication connection failure|not responding|connection reset|slurmctld.*busy|"
    r"unable to establish|protocol authentication error|munge",
    re.IGNORECASE,
)
_INVALID_JOB = re.compile(r"invalid job id specified", re.IGNORECASE)
_SACCT_ROW = re.compile(r"^(?P<job>[0-9]+)(?:_(?P<task>\d+|\[[^\]]*\]))?\|(?P<state>[A-Z_]+)")
_SECTION = "@@cryoflow"


def is_transient(message: str) -> bool:
    return bool(_TRANSIENT.search(message))


def is_invalid_job(message: str) -> bool:
    """Slurm no longer knows the job (long finished or never existed)."""
    return bool(_INVALID_JOB.search(message))


def parse_sbatch_output(stdout: str) -> str:
    """`sbatch --parsable` prints "jobid" or "jobid;cluster"."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    job_id = lines[-1].split(";", 1)[0] if lines else ""
    if not job_id.isdigit():
        raise SlurmCommandError(f"sbatch printed no job id: {stdout.strip()!r}")
    return job_id


def build_cancel_command(job_ids: Iterable[str]) -> str:
    return "scancel " + " ".join(shlex.quote(j) for j in job_ids)


def build_poll_command(jobs: Sequence[SubmittedJob]) -> str:
    """One shell command reporting sacct rows, squeue rows and exit files for all `jobs`."""
    if not jobs:
        raise ValueError("build_poll_command needs at least one job")
    ids = shlex.quote(",".join(job.job_id for job in jobs))
    exit_dirs = " ".join(shlex.quote(job.layout.exit_dir) for job in jobs)
    s = _SECTION
    return (
        f"echo {s}:sacct; sacct -X --parsable2 --noheader --format=JobID,State,ExitCode "
        f"-j {ids} 2>&1; echo {s}:rc:$?; "
        f"echo {s}:squeue; squeue -h -r -o '%i|%T' -j {ids} 2>&1; echo {s}:rc:$?; "
        f"echo {s}:exit; grep -r -s -H '' {exit_dirs}; echo {s}:end"
    )


@dataclass
class PollAnswer:
    """The three sources of one poll, parsed (see reconcile)."""

    accounting: dict[tuple[str, int], tuple[str, int | None]] = field(default_factory=dict)
    # Collapsed rows such as `12_[2-5%2]`: not-yet-started tasks, PENDING or (when the whole
    # array was cancelled before they started) CANCELLED.
    ranges: dict[str, list[tuple[set[int], str]]] = field(default_factory=dict)
    accounting_error: str | None = None
    queued: dict[tuple[str, int], str] = field(default_factory=dict)
    queued_jobs: set[str] = field(default_factory=set)
    exit_codes: dict[tuple[str, int], int] = field(default_factory=dict)


def parse_poll_output(stdout: str) -> PollAnswer:
    """Parse `build_poll_command`'s output; raise SlurmTransientError if squeue failed."""
    sections: dict[str, list[str]] = {}
    rcs: dict[str, int] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith(f"{_SECTION}:rc:") and current:
            rcs[current] = int(line.rsplit(":", 1)[1] or 1)
        elif line.startswith(f"{_SECTION}:"):
            current = line.split(":", 1)[1]
            sections.setdefault(current, [])
        elif current:
            sections[current].append(line)
    if "end" not in sections:
        raise SlurmTransientError(f"poll output cut short: {stdout[-500:]!r}")
    answer = PollAnswer()
    _parse_sacct(sections.get("sacct", []), rcs.get("sacct", 1), answer)
    _parse_squeue(sections.get("squeue", []), rcs.get("squeue", 1), answer)
    for line in sections.get("exit", []):
        path, _, value = line.rpartition(":")
        key = parse_exit_name(posixpath.basename(path))
        if key and value.strip().lstrip("-").isdigit():
            answer.exit_codes[key] = int(value)
    return answer


def _parse_sacct(lines: list[str], rc: int, answer: PollAnswer) -> None:
    if rc != 0:
        answer.accounting_error = " ".join(lines).strip() or f"sacct exited {rc}"
        return
    for line in lines:
        match = _SACCT_ROW.match(line)
        if not match:
            continue
        job, task, state = match["job"], match["task"], match["state"]
        exit_code = _sacct_exit(line.rsplit("|", 1)[-1]) if line.count("|") >= 2 else None
        if task is None:
            continue
        if task.startswith("["):
            answer.ranges.setdefault(job, []).append((_expand_range(task), state))
        else:
            answer.accounting[(job, int(task))] = (state, exit_code)


def _parse_squeue(lines: list[str], rc: int, answer: PollAnswer) -> None:
    text = " ".join(lines)
    if rc != 0 and not _INVALID_JOB.search(text):
        # Without squeue a running task and a vanished one look the same: the poll is
        # incomplete. Controller trouble is the usual cause; try again later.
        raise SlurmTransientError(f"squeue failed (rc {rc}): {text.strip()[:300]}")
    for line in lines:
        job_part, _, state = line.partition("|")
        job, _, task = job_part.partition("_")
        if job.isdigit() and task.isdigit() and state:
            answer.queued[(job, int(task))] = state.split()[0]
            answer.queued_jobs.add(job)
        elif job.isdigit():
            answer.queued_jobs.add(job)


def _sacct_exit(value: str) -> int | None:
    code, _, sig = value.strip().partition(":")
    if not code.isdigit():
        return None
    return 128 + int(sig) if sig.isdigit() and int(sig) else int(code)


def _expand_range(task: str) -> set[int]:
    """`[2-5,7%2]` -> {2, 3, 4, 5, 7}."""
    indices: set[int] = set()
    for part in task.strip("[]").split("%", 1)[0].split(","):
        low, _, high = part.partition("-")
        if low.isdigit():
            indices.update(range(int(low), int(high or low) + 1))
    return indices


def reconcile(answer: PollAnswer, jobs: Sequence[SubmittedJob]) -> dict[str, list[TaskStatus]]:
    """Per job, per array index: the best-known state.

    Precedence: a terminal sacct row (final; the exit file, if any, gives the tool's exit code)
    > a live squeue row (so a task is not called done while Slurm still cleans it up) > an exit
    file (finished by itself; accounting may lag or be off) > a non-terminal sacct row > a
    collapsed sacct range (PENDING, or CANCELLED before start) > UNKNOWN (seen nowhere yet).
    """
    result: dict[str, list[TaskStatus]] = {}
    for job in jobs:
        statuses = []
        for index in range(job.n_tasks):
            key = (job.job_id, index)
            acct = answer.accounting.get(key)
            exit_code = answer.exit_codes.get(key)
            if acct and TaskStatus(acct[0]).terminal:
                code = exit_code if exit_code is not None else acct[1]
                statuses.append(TaskStatus(acct[0], code))
            elif key in answer.queued:
                statuses.append(TaskStatus(answer.queued[key], None))
            elif exit_code is not None:
                statuses.append(TaskStatus("COMPLETED" if exit_code == 0 else "FAILED", exit_code))
            elif acct:
                statuses.append(TaskStatus(acct[0], None))
            elif (state := _range_state(answer, job.job_id, index)) is not None:
                statuses.append(TaskStatus(state, None))
            else:
                statuses.append(TaskStatus("UNKNOWN", None))
        result[job.job_id] = statuses
    return result


def _range_state(answer: PollAnswer, job_id: str, index: int) -> str | None:
    for indices, state in answer.ranges.get(job_id, ()):
        if index in indices:
            return state if TaskStatus(state).terminal else "PENDING"
    return None
