"""Slurm over SSH: submit job arrays, poll them in one call, cancel them, fetch their logs.

The connection is an ordinary Airflow SSH connection (host, login, key file, `host_key` extra:
host key checking stays on). `SlurmHook` is the synchronous client the operator uses; the
command lines it sends and the parsing of the answers live in
:mod:`cryoflow.processing.compute.slurm`
(no Airflow there), shared with the async trigger.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import paramiko
from airflow.providers.ssh.hooks.ssh import SSHHook
from airflow.sdk.bases.hook import BaseHook

from cryoflow.processing.compute.jobscript import (
    SCRIPT_NAME,
    JobLayout,
    SubmittedJob,
    TaskLogs,
    TaskStatus,
    decode_tail,
)
from cryoflow.processing.compute.slurm import (
    SlurmCommandError,
    SlurmError,
    SlurmTransientError,
    build_cancel_command,
    build_poll_command,
    is_invalid_job,
    is_transient,
    parse_poll_output,
    parse_sbatch_output,
    reconcile,
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
                remote.write(script.encode("utf-8", "surrogateescape"))  # names byte for byte
            sftp.chmod(tmp, 0o640)  # sbatch reads it; nothing of ours is world-readable
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
        if rc != 0 and not is_invalid_job(out + err):  # already gone is fine
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
