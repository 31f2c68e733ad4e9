"""Slurm over SSH: submit job arrays, poll them in one call, cancel them, fetch their logs.

The connection is an ordinary Airflow SSH connection (host, login, key file, `host_key` extra:
host key checking stays on). `SlurmHook` is the synchronous client the operator uses; the
command builders and parsers below are plain functions so the async trigger sends exactly the
same commands and reads the answers the same way.

Polling asks about every job of a session at once: one SSH exec runs `sacct` (accounting, the
only source for finished tasks' states), `squeue` (live states; sacct lags: for ~1 s after
submit it knows nothing, then shows a collapsed `ID_[2-9%2] PENDING` row even while tasks run,
and may miss finished tasks for several seconds) and lists the exit-code files the job script
writes. `reconcile` merges the three; see its docstring for the precedence.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import paramiko
from airflow.providers.ssh.hooks.ssh import SSHHook
from airflow.sdk.bases.hook import BaseHook

from cryoflow.compute.jobscript import (
    SCRIPT_NAME,
    JobLayout,
    SubmittedJob,
    TaskLogs,
    TaskStatus,
    decode_tail,
    parse_exit_name,
)

__all__ = [
    "SlurmCommandError",
    "SlurmError",
    "SlurmHook",
    "SlurmTransientError",
    "build_cancel_command",
    "build_poll_command",
    "parse_poll_output",
    "parse_sbatch_output",
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


class SlurmHook(BaseHook):
    """Talk to a Slurm login node over SSH (paramiko, via the SSH provider's SSHHook).

    Keeps one SSH connection for all calls and reopens it when it dropped; every SSH or
    controller hiccup surfaces as SlurmTransientError so callers can retry just those.
    """

    conn_name_attr = "ssh_conn_id"
    default_conn_name = "slurm_ssh_default"
    conn_type = "ssh"
    hook_name = "Slurm over SSH"

    def __init__(
        self,
        ssh_conn_id: str = default_conn_name,
        *,
        command_timeout_s: float = 60.0,
        conn_timeout_s: int | None = None,
    ) -> None:
        super().__init__()
        self.ssh_conn_id = ssh_conn_id
        self.command_timeout_s = command_timeout_s
        self.conn_timeout_s = conn_timeout_s
        self.commands_run = 0  # for tests and benchmarks: each is one SSH round trip

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return SSHHook.get_ui_field_behaviour()

    @cached_property
    def ssh_hook(self) -> SSHHook:
        # The SSH provider resolves the connection (key file, host_key extra) and connects.
        return SSHHook(
            ssh_conn_id=self.ssh_conn_id,
            conn_timeout=self.conn_timeout_s,
            cmd_timeout=self.command_timeout_s,
            conn_retry_attempts=1,
        )

    def get_conn(self) -> paramiko.SSHClient:
        try:
            return self.ssh_hook.get_conn()
        except (paramiko.AuthenticationException, paramiko.BadHostKeyException) as exc:
            raise SlurmCommandError(f"SSH via {self.ssh_conn_id!r} refused: {exc}") from exc
        except paramiko.SSHException as exc:
            if "known_hosts" in str(exc):  # host key checking is on and the key is unknown
                raise SlurmCommandError(f"SSH via {self.ssh_conn_id!r}: {exc}") from exc
            raise SlurmTransientError(f"SSH connect via {self.ssh_conn_id!r}: {exc}") from exc
        except (OSError, EOFError) as exc:
            raise SlurmTransientError(f"SSH connect via {self.ssh_conn_id!r}: {exc}") from exc

    def run(self, command: str, timeout_s: float | None = None) -> tuple[int, str, str]:
        """Run one command; return (exit status, stdout, stderr)."""
        client = self.get_conn()
        self.commands_run += 1
        try:
            _, stdout, stderr = client.exec_command(
                command, timeout=timeout_s or self.command_timeout_s
            )
            stdout.channel.shutdown_write()
            out = stdout.read().decode("utf-8", errors="replace")
            err = stderr.read().decode("utf-8", errors="replace")
            return stdout.channel.recv_exit_status(), out, err
        except (TimeoutError, paramiko.SSHException, OSError, EOFError) as exc:
            self._drop()
            raise SlurmTransientError(f"SSH command failed ({exc!r}): {command[:120]}") from exc

    @contextmanager
    def _sftp(self, what: str) -> Iterator[paramiko.SFTPClient]:
        """An SFTP session on the shared connection; errors mapped to transient/permanent."""
        try:
            sftp = self.get_conn().open_sftp()
            try:
                yield sftp
            finally:
                sftp.close()
        except (TimeoutError, ConnectionError, paramiko.SSHException, EOFError) as exc:
            self._drop()
            raise SlurmTransientError(f"{what} failed: {exc!r}") from exc
        except OSError as exc:  # remote file errors (permission denied, no such directory)
            raise SlurmCommandError(f"{what} failed on the cluster: {exc}") from exc

    def submit(self, script: str, layout: JobLayout, n_tasks: int) -> SubmittedJob:
        """Upload the script (SFTP, temp name then rename) and sbatch it."""
        dirs = f"{shlex.quote(layout.logs_dir)} {shlex.quote(layout.exit_dir)}"
        self._check(self.run(f"mkdir -p {dirs}"), "mkdir")
        tmp = f"{layout.script}.tmp"
        with self._sftp(f"upload of {layout.script}") as sftp:
            with sftp.open(tmp, "w") as remote:
                remote.write(script.encode())
            sftp.chmod(tmp, 0o755)
            sftp.posix_rename(tmp, layout.script)
        command = f"cd {shlex.quote(layout.job_dir)} && sbatch --parsable {SCRIPT_NAME}"
        rc, out, err = self.run(command)
        self._check((rc, out, err), "sbatch")
        job = SubmittedJob(parse_sbatch_output(out), layout.job_dir, n_tasks)
        self.log.info("Submitted Slurm job %s (%d tasks) in %s", job.job_id, n_tasks, job.job_dir)
        return job

    def poll(self, jobs: Sequence[SubmittedJob]) -> dict[str, list[TaskStatus]]:
        """States of all array tasks of all `jobs`, in ONE SSH command."""
        if not jobs:
            return {}
        rc, out, err = self.run(build_poll_command(jobs))
        answer = parse_poll_output(out + ("\n" + err if err else ""))
        if answer.accounting_error:
            self.log.debug("no sacct, used squeue + exit files: %s", answer.accounting_error)
        return reconcile(answer, jobs)

    def cancel(self, jobs: Sequence[SubmittedJob]) -> None:
        if not jobs:
            return
        rc, out, err = self.run(build_cancel_command(job.job_id for job in jobs))
        if rc != 0 and not _INVALID_JOB.search(out + err):  # already gone is fine
            self._check((rc, out, err), "scancel")
        self.log.info("Cancelled Slurm job(s) %s", ", ".join(job.job_id for job in jobs))

    def fetch_logs(
        self, job: SubmittedJob, indices: Sequence[int], max_bytes: int
    ) -> dict[int, TaskLogs]:
        """Tail of each array task's stdout/stderr (SFTP; missing files read as empty)."""
        layout = job.layout
        logs: dict[int, TaskLogs] = {}
        with self._sftp(f"fetching logs of job {job.job_id}") as sftp:
            for index in indices:
                logs[index] = TaskLogs(
                    stdout=_sftp_tail(sftp, layout.stdout(job.job_id, index), max_bytes),
                    stderr=_sftp_tail(sftp, layout.stderr(job.job_id, index), max_bytes),
                )
        return logs

    def close(self) -> None:
        self._drop()

    def _drop(self) -> None:
        hook = self.__dict__.get("ssh_hook")
        if hook is not None and hook.client is not None:
            try:
                hook.client.close()
            finally:
                hook.client = None

    @staticmethod
    def _check(result: tuple[int, str, str], what: str) -> None:
        rc, out, err = result
        if rc == 0:
            return
        message = f"{what} failed (rc {rc}): {(err or out).strip()[:500]}"
        raise (SlurmTransientError if is_transient(err + out) else SlurmCommandError)(message)


def _sftp_tail(sftp: paramiko.SFTPClient, path: str, max_bytes: int) -> str:
    try:
        with sftp.open(path, "rb") as remote:
            size = remote.stat().st_size or 0
            remote.seek(max(0, size - max_bytes - 1024))
            return decode_tail(remote.read(), max_bytes)
    except FileNotFoundError:  # paramiko maps SFTP "no such file" to this
        return ""
