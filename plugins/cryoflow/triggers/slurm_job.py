"""Follow a submitted job array from the triggerer until every array task has ended.

The deferred task holds no worker slot while its job queues and runs. The trigger stays
light: one status command per poll over one held SSH connection (asyncssh, through the SSH
provider's async hook) for Slurm, or a few local file reads for the local backend; no file
transfers (the operator fetches logs after it resumes). Backend choice is configuration:
the same trigger follows both, given the backend settings as a plain dict.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncssh
from airflow.providers.ssh.hooks.ssh import SSHHookAsync
from airflow.triggers.base import BaseTrigger, TriggerEvent

from cryoflow.processing.compute.jobscript import SubmittedJob, TaskStatus
from cryoflow.processing.compute.local import LocalCompute
from cryoflow.processing.compute.settings import LocalBackend, SlurmBackend, parse_backend
from cryoflow.processing.compute.slurm import (
    SlurmTransientError,
    build_cancel_command,
    build_poll_command,
    parse_poll_output,
    reconcile,
)

if TYPE_CHECKING:
    from asyncssh import SSHClientConnection

__all__ = ["SlurmJobTrigger"]

# Connection-level trouble worth a reconnect: refused/reset sockets, SSH protocol errors and
# disconnects, timeouts, and Slurm's own "controller busy/unreachable" answers. A refused key or
# an unverifiable host key will not heal by retrying: those end the trigger at once.
_RETRYABLE = (OSError, asyncssh.Error, TimeoutError, SlurmTransientError)
_PERMANENT = (asyncssh.PermissionDenied, asyncssh.HostKeyNotVerifiable)


class SlurmJobTrigger(BaseTrigger):
    """Poll one job array (Slurm over SSH, or local) and fire ONE final event.

    Event payload (fixed keys, JSON): ``status`` ("success": every task COMPLETED with exit 0;
    "failed": all tasks ended, at least one did not succeed; "error": the trigger gave up),
    ``job_id``, ``job_dir``, ``n_tasks``, ``backend`` ("slurm"|"local"), ``tasks``
    ({"<index>": {"state", "exit_code"}}; the last known states on "error"), ``message``.

    :param backend: backend settings as a dict (``SlurmBackend``/``LocalBackend`` dumped).
    :param poll_interval_s: seconds between polls; None uses the backend's ``poll_interval_s``.
    :param max_failures: consecutive failed polls (since the last complete one) tolerated.
    :param backoff_base_s: first reconnect delay; doubles per failure up to ``backoff_max_s``,
        with jitter so many triggers do not reconnect in lockstep.
    :param lost_after_polls: polls in a row in which unfinished tasks are seen nowhere (not
        queued, no accounting record, no exit file) before they are declared LOST.
    :param missing_polls: progress so far towards ``lost_after_polls`` (kept on re-serialize).
    :param wake_after_s: ignored; accepted so that a trigger stored by an earlier release (which
        woke its task periodically) still loads after an upgrade and fires its final event.
    """

    def __init__(
        self,
        *,
        backend: dict[str, Any],
        job_id: str,
        job_dir: str,
        n_tasks: int,
        poll_interval_s: float | None = None,
        max_failures: int = 5,
        command_timeout_s: float = 60.0,
        backoff_base_s: float = 2.0,
        backoff_max_s: float = 60.0,
        lost_after_polls: int = 10,
        missing_polls: int = 0,
        wake_after_s: float | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.job_id = job_id
        self.job_dir = job_dir
        self.n_tasks = n_tasks
        self.poll_interval_s = poll_interval_s
        self.max_failures = max_failures
        self.command_timeout_s = command_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.lost_after_polls = lost_after_polls
        self.missing_polls = missing_polls
        self._settings = parse_backend(backend, where="trigger backend")
        self._job = SubmittedJob(job_id, job_dir, n_tasks)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "backend": self.backend,
                "job_id": self.job_id,
                "job_dir": self.job_dir,
                "n_tasks": self.n_tasks,
                "poll_interval_s": self.poll_interval_s,
                "max_failures": self.max_failures,
                "command_timeout_s": self.command_timeout_s,
                "backoff_base_s": self.backoff_base_s,
                "backoff_max_s": self.backoff_max_s,
                "lost_after_polls": self.lost_after_polls,
                "missing_polls": self.missing_polls,
            },
        )

    # -- backend access (the only place that knows which backend runs) ----------------------

    async def _connect(self) -> SSHClientConnection | None:
        if not isinstance(self._settings, SlurmBackend):
            return None
        hook = SSHHookAsync(ssh_conn_id=self._settings.ssh_conn_id)
        return await asyncio.wait_for(hook.get_conn(), timeout=self.command_timeout_s)

    async def _poll(self, conn: SSHClientConnection | None) -> list[TaskStatus]:
        if isinstance(self._settings, LocalBackend):
            polled = await asyncio.to_thread(LocalCompute(self._settings).poll, [self._job])
            return polled[self.job_id]
        assert conn is not None
        result = await conn.run(
            build_poll_command([self._job]), check=False, timeout=self.command_timeout_s
        )
        out = _text(result.stdout) + "\n" + _text(result.stderr)
        return reconcile(parse_poll_output(out), [self._job])[self.job_id]

    async def on_kill(self) -> None:
        """The user killed the deferred task (mark failed/success, clear): cancel the job."""
        self.log.info("Task killed while deferred: cancelling job %s", self.job_id)
        if isinstance(self._settings, LocalBackend):
            await asyncio.to_thread(LocalCompute(self._settings).cancel, [self._job])
            return
        conn = await self._connect()
        assert conn is not None
        try:
            result = await conn.run(
                build_cancel_command([self.job_id]), check=False, timeout=self.command_timeout_s
            )
            if result.exit_status:
                self.log.warning("scancel %s: %s", self.job_id, _text(result.stderr).strip())
        finally:
            await _close(conn)

    # -- the loop -------------------------------------------------------------------------

    def _delay(self, failures: int) -> float:
        capped = min(self.backoff_max_s, self.backoff_base_s * 2 ** (failures - 1))
        return capped / 2 + random.uniform(0, capped / 2)

    def _event(self, status: str, tasks: list[TaskStatus] | None, message: str) -> TriggerEvent:
        return TriggerEvent(
            {
                "status": status,
                "job_id": self.job_id,
                "job_dir": self.job_dir,
                "n_tasks": self.n_tasks,
                "backend": self._settings.kind,
                "tasks": {str(i): t.to_dict() for i, t in enumerate(tasks or [])},
                "message": message,
            }
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        interval = self.poll_interval_s or self._settings.poll_interval_s
        conn: SSHClientConnection | None = None
        connected = False
        failures = 0  # consecutive, since the last *complete* poll
        last: list[TaskStatus] | None = None
        try:
            while True:
                try:
                    if not connected:
                        conn = await self._connect()
                        connected = True
                    statuses = await self._poll(conn)
                except _PERMANENT:
                    raise
                except _RETRYABLE as exc:
                    failures += 1
                    if conn is not None:
                        await _close(conn)
                    conn, connected = None, False
                    if failures > self.max_failures:
                        message = (
                            f"gave up on job {self.job_id} after {failures} failed polls in a "
                            f"row; last error: {exc!r}"
                        )
                        self.log.error(message)
                        yield self._event("error", last, message)
                        return
                    delay = self._delay(failures)
                    self.log.warning(
                        "Poll of job %s failed (%d/%d), retrying in %.1fs: %r",
                        self.job_id, failures, self.max_failures, delay, exc,
                    )  # fmt: skip
                    await asyncio.sleep(delay)
                    continue
                failures = 0
                statuses = self._declare_lost(statuses)
                if last is None or [s.state for s in statuses] != [s.state for s in last]:
                    self.log.info("Job %s: %s", self.job_id, _summary(statuses))
                last = statuses
                if all(s.terminal for s in statuses):
                    ok = all(s.succeeded for s in statuses)
                    yield self._event(
                        "success" if ok else "failed", statuses, f"job {self.job_id} ended"
                    )
                    return
                await asyncio.sleep(interval)
        except Exception as exc:  # anything unexpected still ends with the one final event
            self.log.exception("Trigger for job %s failed", self.job_id)
            yield self._event("error", last, f"trigger error for job {self.job_id}: {exc!r}")
        finally:
            if conn is not None:
                await _close(conn)

    def _declare_lost(self, statuses: list[TaskStatus]) -> list[TaskStatus]:
        """Tasks nobody has heard of for `lost_after_polls` polls, while nothing else of the
        job is queued or running, are LOST (e.g. cancelled with accounting down)."""
        open_states = {s.state for s in statuses if not s.terminal}
        if open_states != {"UNKNOWN"}:
            self.missing_polls = 0
            return statuses
        self.missing_polls += 1
        if self.missing_polls < self.lost_after_polls:
            return statuses
        return [TaskStatus("LOST", None) if s.state == "UNKNOWN" else s for s in statuses]


def _summary(statuses: list[TaskStatus]) -> str:
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status.state] = counts.get(status.state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def _text(value: str | bytes | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value or ""


async def _close(conn: SSHClientConnection) -> None:
    try:
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), timeout=5)
    except Exception:  # teardown is best effort: nothing to recover
        pass
