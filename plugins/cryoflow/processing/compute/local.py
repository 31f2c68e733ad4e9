"""Local compute backend: run a job script's array tasks on this machine (embedded demo).

"Submitting" starts a detached runner (`python -m cryoflow.processing.compute.local run ...`,
its own
session, so it outlives the Airflow worker that started it and one `killpg` cancels it with all
its tasks). The runner executes the *same* script the Slurm backend uploads, once per array
index with SLURM_ARRAY_TASK_ID/SLURM_ARRAY_JOB_ID set, at most `max_parallel` at a time, with
stdout/stderr in `logs/<A>_<a>.out|.err`; the script itself writes `exit/<A>_<a>` atomically.
Status, cancel and log reading are plain file reads, cheap enough for the triggerer.

Files besides the script's own: `runner.pid` ("<pid> <start ticks> <host>", guards against pid
reuse), `runner.alive` (touched every few seconds while the runner lives: the job's state is read
from its folder, so a triggerer or worker on another host than the runner's sees it too; a
`cancelled` file stops the runner from any host), `started/<A>_<a>` (task launched),
`runner.log`. All of
them, the job folders and the task logs get the modes the script was built with
(:func:`~cryoflow.processing.compute.jobscript.script_modes`): new folders are chmod-ed to
``dir_mode``,
files are created with ``file_mode``, and the runner runs under the script's umask.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from cryoflow.dirs import make_dirs
from cryoflow.processing.compute.jobscript import (
    JobLayout,
    SubmittedJob,
    TaskLogs,
    TaskStatus,
    decode_tail,
    job_umask,
    script_modes,
)
from cryoflow.processing.compute.settings import LocalBackend

__all__ = ["LocalCompute", "run_array"]

_PLUGINS_DIR = Path(__file__).resolve().parents[3]


class LocalCompute:
    """The local backend's client: same methods as the Slurm hook (see ComputeClient)."""

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend

    def submit(self, script: str, layout: JobLayout, n_tasks: int) -> SubmittedJob:
        job_dir = Path(layout.job_dir)
        file_mode, dir_mode = script_modes(script)
        for sub in (job_dir / "logs", job_dir / "exit", job_dir / "started"):
            make_dirs(sub, dir_mode)
        _write_atomic(Path(layout.script), script, file_mode)  # run as `bash job.sh`: no +x
        job = SubmittedJob(f"local-{secrets.token_hex(6)}", layout.job_dir, n_tasks)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PLUGINS_DIR), env.get("PYTHONPATH", "")) if p
        )
        with _open_append(job_dir / "runner.log", file_mode) as runner_log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cryoflow.processing.compute.local", "run", layout.job_dir,
                 job.job_id, str(n_tasks), str(self.backend.max_parallel)],
                stdin=subprocess.DEVNULL,
                stdout=runner_log,
                stderr=runner_log,
                start_new_session=True,
                close_fds=True,
                env=env,
                umask=job_umask(file_mode, dir_mode),  # started/*, the task logs
            )  # fmt: skip
        pid_line = f"{proc.pid} {_start_ticks(proc.pid)} {socket.gethostname()}\n"
        _write_atomic(job_dir / "runner.pid", pid_line, file_mode)
        return job

    def poll(self, jobs: Sequence[SubmittedJob]) -> dict[str, list[TaskStatus]]:
        return {job.job_id: _poll_one(job) for job in jobs}

    def cancel(self, jobs: Sequence[SubmittedJob]) -> None:
        for job in jobs:
            job_dir = Path(job.job_dir)
            file_mode, _ = _job_modes(job.layout)
            _write_atomic(job_dir / "cancelled", f"{time.time():.3f}\n", file_mode)
            pid = _runner_pid(job_dir)
            if pid is None:
                continue
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _runner_pid(job_dir) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if _runner_pid(job_dir) is not None:
                _signal_group(pid, signal.SIGKILL)

    def fetch_logs(
        self, job: SubmittedJob, indices: Sequence[int], max_bytes: int
    ) -> dict[int, TaskLogs]:
        layout = job.layout
        return {
            i: TaskLogs(
                stdout=_read_tail(Path(layout.stdout(job.job_id, i)), max_bytes),
                stderr=_read_tail(Path(layout.stderr(job.job_id, i)), max_bytes),
            )
            for i in indices
        }

    def close(self) -> None:
        """Nothing held open; present for interface symmetry with the Slurm hook."""


def _poll_one(job: SubmittedJob) -> list[TaskStatus]:
    layout = job.layout
    job_dir = Path(job.job_dir)
    alive = _runner_alive(job_dir)
    cancelled = (job_dir / "cancelled").exists()
    statuses = []
    for i in range(job.n_tasks):
        code = _read_exit(Path(layout.exit_file(job.job_id, i)))
        if code is not None:
            statuses.append(TaskStatus("COMPLETED" if code == 0 else "FAILED", code))
        elif cancelled:
            statuses.append(TaskStatus("CANCELLED", None))
        elif alive:
            started = (job_dir / "started" / f"{job.job_id}_{i}").exists()
            statuses.append(TaskStatus("RUNNING" if started else "PENDING", None))
        else:
            # Runner gone without an exit file: killed from outside, or the machine restarted.
            statuses.append(TaskStatus("LOST", None))
    return statuses


def _read_exit(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # cannot happen with the rename protocol; treat as "not yet"


def _read_tail(path: Path, max_bytes: int) -> str:
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - max_bytes - 1024))
            return decode_tail(fh.read(), max_bytes)
    except FileNotFoundError:
        return ""


def _start_ticks(pid: int) -> str:
    """Process start time in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]


# The runner touches runner.alive this often; older than STALE_AFTER_S, it is gone.
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0


def _runner_alive(job_dir: Path) -> bool:
    """Whether the runner still runs: on its own host from /proc (exact), elsewhere from its
    heartbeat file (the job folder is on shared storage)."""
    try:
        host = (job_dir / "runner.pid").read_text().split()[2]
    except (OSError, IndexError):
        host = socket.gethostname()  # written by this host (or an older runner)
    if host == socket.gethostname():
        return _runner_pid(job_dir) is not None
    try:
        age = time.time() - (job_dir / "runner.alive").stat().st_mtime
    except OSError:
        return False
    return age < STALE_AFTER_S


def _runner_pid(job_dir: Path) -> int | None:
    """The runner's pid if it is still running on this host (not a zombie, not recycled)."""
    try:
        pid_text, ticks, *host = (job_dir / "runner.pid").read_text().split()
        if host and host[0] != socket.gethostname():
            return None
        stat = Path(f"/proc/{int(pid_text)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X") or fields[19] != ticks:
        return None
    return int(pid_text)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as fh:  # names as bytes
        fh.write(text)
        os.fchmod(fh.fileno(), mode)  # exactly `mode`, whatever the umask
    os.replace(tmp, path)


def _open_append(path: Path, mode: int) -> IO[bytes]:
    """Open for appending; a new file gets exactly ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    if os.fstat(fd).st_size == 0:
        os.fchmod(fd, mode)
    return os.fdopen(fd, "ab")


def _job_modes(layout: JobLayout) -> tuple[int, int]:
    """``(file_mode, dir_mode)`` of a submitted job, from its script."""
    try:
        return script_modes(Path(layout.script).read_text(errors="surrogateescape"))
    except OSError:
        return script_modes("")


def run_array(job_dir: str, job_id: str, n_tasks: int, max_parallel: int) -> int:
    """The detached runner: run each array index of the job script, bounded concurrency."""
    layout = JobLayout(job_dir)
    stop = False
    running: dict[int, subprocess.Popen[bytes]] = {}  # pid -> task

    def _on_term(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True
        for child in list(running.values()):
            _terminate(child.pid)

    signal.signal(signal.SIGTERM, _on_term)
    heartbeat = threading.Thread(target=_heartbeat, args=(Path(job_dir),), daemon=True)
    heartbeat.start()
    next_index = 0
    while (next_index < n_tasks and not stop) or running:
        while next_index < n_tasks and len(running) < max_parallel and not stop:
            proc = _launch(layout, job_id, next_index)
            running[proc.pid] = proc
            next_index += 1
        try:
            pid, status = os.wait()  # blocks until any task ends (no polling loop)
        except ChildProcessError:
            break
        proc = running.pop(pid, None)
        if proc is not None:
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    with contextlib.suppress(OSError):
        (Path(job_dir) / "runner.alive").unlink()
    return 0


def _heartbeat(job_dir: Path) -> None:
    """Show other hosts that the runner lives; obey a cancel written from any host."""
    alive = job_dir / "runner.alive"
    while True:
        with contextlib.suppress(OSError):
            alive.touch()
        if (job_dir / "cancelled").exists():
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(HEARTBEAT_S)


def _launch(layout: JobLayout, job_id: str, index: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        SLURM_ARRAY_JOB_ID=job_id,
        SLURM_ARRAY_TASK_ID=str(index),
        SLURM_JOB_ID=f"{job_id}_{index}",
    )
    Path(layout.job_dir, "started", f"{job_id}_{index}").touch()
    with (
        open(layout.stdout(job_id, index), "ab") as out,
        open(layout.stderr(job_id, index), "ab") as err,
    ):
        proc = subprocess.Popen(
            ["/bin/bash", layout.script],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=layout.job_dir,
            env=env,
        )
    return proc


def _terminate(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cryoflow.processing.compute.local")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job script's array tasks (started by submit)")
    run.add_argument("job_dir")
    run.add_argument("job_id")
    run.add_argument("n_tasks", type=int)
    run.add_argument("max_parallel", type=int)
    args = parser.parse_args(argv)
    return run_array(args.job_dir, args.job_id, args.n_tasks, args.max_parallel)


if __name__ == "__main__":
    sys.exit(main())
