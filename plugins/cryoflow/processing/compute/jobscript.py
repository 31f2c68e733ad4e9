"""One bash job-array script per batch and step, and the files it leaves behind.

Pure and Airflow-free: the Slurm hook uploads the script and `sbatch`es it, the local backend
runs the very same text with SLURM_ARRAY_TASK_ID set, and both read back the same files.

Why the script looks the way it does:
- every per-task argument goes through `shlex.quote` into a bash array inside a `case` on the
  array index, so a movie called ``mov $(touch x) `y`.tif`` reaches the tool verbatim and is
  never evaluated by a shell;
- stdout/stderr of array task ``%A_%a`` go to ``logs/%A_%a.out|.err`` (Slurm opens them; the
  local runner opens the same names), so researchers can read each movie's tool output;
- the task's exit code is written to ``exit/.<A>_<a>.tmp`` and renamed to ``exit/<A>_<a>``
  (rename is atomic), so a poll never reads a half-written value. A missing file means the task
  did not finish by itself (still running, cancelled, timed out, node lost): ask Slurm.
- outputs get the facility's modes, whatever umask Slurm or the runner passed on: the script
  sets ``umask`` from ``file_mode``/``dir_mode`` (:func:`job_umask`, 027 for 0640/2770) before
  anything runs, creates its own folders with ``dir_mode``, brings the task's log files (opened
  before the script ran) to ``file_mode``, and exports both modes (:data:`FILE_MODE_ENV`,
  :data:`DIR_MODE_ENV`) for the built-in engines, which apply them exactly. The group comes from
  the setgid session folders the outputs are written into.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryoflow.processing.compute.settings import SlurmBackend

__all__ = [
    "ACTIVE_STATES",
    "DEFAULT_DIR_MODE",
    "DEFAULT_FILE_MODE",
    "DIR_MODE_ENV",
    "EVENT_KEYS",
    "FILE_MODE_ENV",
    "SUCCESS_STATE",
    "TERMINAL_STATES",
    "ComputeClient",
    "JobLayout",
    "SubmittedJob",
    "TaskLogs",
    "TaskStatus",
    "build_array_script",
    "decode_tail",
    "job_umask",
    "parse_exit_name",
    "script_modes",
    "slurm_directives",
]

SCRIPT_NAME = "job.sh"
#: What a job trigger's event holds (the trigger writes it, the operator reads it on resume).
EVENT_KEYS = ("status", "job_id", "job_dir", "n_tasks", "backend", "tasks", "message")
LOG_PATTERN = "%A_%a"

#: The facility defaults (config ``permissions``): owner rw + group r; setgid, group rwx.
DEFAULT_FILE_MODE = 0o640
DEFAULT_DIR_MODE = 0o2770
#: Octal modes exported to every task; the built-in engines (engines/imageio.py) read them.
FILE_MODE_ENV = "CRYOFLOW_FILE_MODE"
DIR_MODE_ENV = "CRYOFLOW_DIR_MODE"
_MODES_LINE = re.compile(r"^# cryoflow modes: file_mode=([0-7]{1,4}) dir_mode=([0-7]{1,4})$", re.M)

SUCCESS_STATE = "COMPLETED"
# Slurm job states that end a task for good, plus LOST: we could not find the task anywhere
# (not queued, no accounting record, no exit file) for too long.
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
        "SPECIAL_EXIT",
        "LOST",
    }
)
# Anything else (PENDING, RUNNING, COMPLETING, CONFIGURING, SUSPENDED, REQUEUED, ...) and
# UNKNOWN (not visible yet: sacct lags behind sbatch) means "ask again later".
ACTIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "REQUEUED", "UNKNOWN"}
)

_STEP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_EXIT_NAME = re.compile(r"^(?P<job>[A-Za-z0-9][A-Za-z0-9.-]*)_(?P<index>\d+)$")


@dataclass(frozen=True)
class TaskStatus:
    """What a poll knows about one array task."""

    state: str
    exit_code: int | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == SUCCESS_STATE and self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "exit_code": self.exit_code}


@dataclass(frozen=True)
class SubmittedJob:
    """A submitted array: enough to poll it, cancel it and find its files (JSON-able)."""

    job_id: str
    job_dir: str
    n_tasks: int

    def __post_init__(self) -> None:
        if not _JOB_ID.match(self.job_id):
            raise ValueError(f"job id {self.job_id!r} is not a Slurm/local job id")
        if self.n_tasks < 1:
            raise ValueError(f"job {self.job_id}: n_tasks must be >= 1, got {self.n_tasks}")

    @property
    def layout(self) -> JobLayout:
        return JobLayout(self.job_dir)

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "job_dir": self.job_dir, "n_tasks": self.n_tasks}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SubmittedJob:
        return cls(str(data["job_id"]), str(data["job_dir"]), int(data["n_tasks"]))


@dataclass(frozen=True)
class JobLayout:
    """Where one submission's files live (POSIX paths, on the cluster or locally)."""

    job_dir: str

    def __post_init__(self) -> None:
        if not self.job_dir.startswith("/") or any(c in self.job_dir for c in " \t\n\r\x00:"):
            raise ValueError(
                f"job_dir {self.job_dir!r} must be absolute, without ':' or whitespace"
            )

    @property
    def script(self) -> str:
        return posixpath.join(self.job_dir, SCRIPT_NAME)

    @property
    def logs_dir(self) -> str:
        return posixpath.join(self.job_dir, "logs")

    @property
    def exit_dir(self) -> str:
        return posixpath.join(self.job_dir, "exit")

    def stdout(self, job_id: str, index: int) -> str:
        return posixpath.join(self.logs_dir, f"{job_id}_{index}.out")

    def stderr(self, job_id: str, index: int) -> str:
        return posixpath.join(self.logs_dir, f"{job_id}_{index}.err")

    def exit_file(self, job_id: str, index: int) -> str:
        return posixpath.join(self.exit_dir, f"{job_id}_{index}")


@dataclass(frozen=True)
class TaskLogs:
    """The tail of one array task's stdout and stderr."""

    stdout: str = ""
    stderr: str = ""


class ComputeClient(Protocol):
    """What the operator needs from a backend; Slurm-over-SSH and local both provide it."""

    def submit(self, script: str, layout: JobLayout, n_tasks: int) -> SubmittedJob: ...

    def poll(self, jobs: Sequence[SubmittedJob]) -> dict[str, list[TaskStatus]]: ...

    def cancel(self, jobs: Sequence[SubmittedJob]) -> None: ...

    def fetch_logs(
        self, job: SubmittedJob, indices: Sequence[int], max_bytes: int
    ) -> dict[int, TaskLogs]: ...

    def close(self) -> None: ...


def decode_tail(data: bytes, max_bytes: int) -> str:
    """Last `max_bytes` of a log as text, without a broken first line or character."""
    if len(data) > max_bytes:
        data = data[-max_bytes:]
        newline = data.find(b"\n")
        if 0 <= newline < len(data) - 1:
            data = data[newline + 1 :]
    return data.decode("utf-8", errors="replace")


def parse_exit_name(name: str) -> tuple[str, int] | None:
    """`12_3` -> ("12", 3); temp files and strangers -> None."""
    match = _EXIT_NAME.match(name)
    return (match["job"], int(match["index"])) if match else None


def job_umask(file_mode: int, dir_mode: int) -> int:
    """The umask under which a tool's new files get ``file_mode``'s rw bits and new folders at
    most ``dir_mode``'s search bits: 027 for 0640/2770. One umask cannot give both exactly (a
    folder made under 027 is 0750); the built-in engines and the script's own folders set
    ``dir_mode`` themselves."""
    return (0o666 & ~file_mode) | (0o111 & ~dir_mode)


def script_modes(script: str) -> tuple[int, int]:
    """``(file_mode, dir_mode)`` a script from :func:`build_array_script` was built with."""
    match = _MODES_LINE.search(script)
    if match is None:
        return DEFAULT_FILE_MODE, DEFAULT_DIR_MODE
    return int(match[1], 8), int(match[2], 8)


def slurm_directives(backend: SlurmBackend) -> list[str]:
    """The sbatch options a backend asks for (the array and log options are added per job)."""
    options = [f"--partition={backend.partition}", f"--time={backend.time_limit}"]
    options.append(f"--cpus-per-task={backend.cpus_per_task}")
    optional = {"--account": backend.account, "--qos": backend.qos, "--mem": backend.mem}
    optional["--gres"] = backend.gres
    options += [f"{flag}={value}" for flag, value in optional.items() if value is not None]
    return options + list(backend.extra_sbatch)


def build_array_script(
    *,
    step: str,
    tasks: Sequence[Sequence[str]],
    layout: JobLayout,
    stdin: Sequence[str | None] | None = None,
    env: Mapping[str, str] | None = None,
    modules: Sequence[str] = (),
    sbatch: Sequence[str] = (),
    max_parallel: int | None = None,
    workdir: str | None = None,
    file_mode: int = DEFAULT_FILE_MODE,
    dir_mode: int = DEFAULT_DIR_MODE,
) -> str:
    """Return the job-array script that runs `tasks[i]` as array task i.

    `tasks[i]` is an argv list (program first); `stdin[i]`, when given and not None, is fed to
    task i on standard input (tools such as CTFFIND read their answers there). `workdir` is the
    tasks' working directory (default: the job directory). `file_mode`/`dir_mode` are the
    facility's ``permissions``: what every file and folder the tasks write should end with.
    """
    _check_inputs(step, tasks, stdin, env, modules, sbatch, max_parallel)
    for name, mode in (("file_mode", file_mode), ("dir_mode", dir_mode)):
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise ValueError(f"step {step}: {name} must be a mode from 0 to 0o7777, got {mode!r}")
    n = len(tasks)
    array = f"0-{n - 1}" + (f"%{max_parallel}" if max_parallel else "")
    directives = [
        f"--job-name=cf-{step}",
        f"--array={array}",
        f"--output={posixpath.join(layout.logs_dir, LOG_PATTERN)}.out",
        f"--error={posixpath.join(layout.logs_dir, LOG_PATTERN)}.err",
        *sbatch,
    ]
    q = shlex.quote
    fmode, dmode = f"{file_mode:04o}", f"{dir_mode:04o}"
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives)]
    lines += [
        f"# cryoflow job script: step={step}, {n} task(s). Generated; do not edit.",
        f"# cryoflow modes: file_mode={fmode} dir_mode={dmode}",
        "set -u",
        f"umask {job_umask(file_mode, dir_mode):04o}",
        f"export {FILE_MODE_ENV}={fmode} {DIR_MODE_ENV}={dmode}",
        f"job_dir={q(layout.job_dir)}",
        'task_index="${SLURM_ARRAY_TASK_ID:?not run as an array task}"',
        'array_job_id="${SLURM_ARRAY_JOB_ID:?not run as an array task}"',
        "# Slurm (or the local runner) opened this task's logs with its own umask.",
        f'chmod {fmode} "$job_dir/logs/${{array_job_id}}_${{task_index}}".{{out,err}} 2>/dev/null',
        "finish() {",
        f'  mkdir -p -m {dmode} "$job_dir/exit"',
        '  printf \'%s\\n\' "$1" >"$job_dir/exit/.${array_job_id}_${task_index}.tmp" &&',
        '    mv -f "$job_dir/exit/.${array_job_id}_${task_index}.tmp" '
        '"$job_dir/exit/${array_job_id}_${task_index}"',
        '  exit "$1"',
        "}",
    ]
    lines += [f"export {name}={q(value)}" for name, value in (env or {}).items()]
    for module in modules:
        lines.append(
            f"module load {q(module)} || "
            f"{{ echo {q(f'cryoflow: module load {module} failed')} >&2; finish 127; }}"
        )
    lines.append(f"cd {q(workdir or layout.job_dir)} || finish 126")
    lines.append('case "$task_index" in')
    for index, argv in enumerate(tasks):
        body = f"args=({' '.join(q(a) for a in argv)})"
        text = stdin[index] if stdin is not None else None
        body += f"; stdin_text={q(text)}" if text is not None else "; unset stdin_text"
        lines.append(f"  {index}) {body} ;;")
    lines.append('  *) echo "cryoflow: no task $task_index in this script" >&2; finish 2 ;;')
    lines.append("esac")
    lines += [
        'if [[ -n "${stdin_text+set}" ]]; then',
        '  printf \'%s\' "$stdin_text" | "${args[@]}"',
        "else",
        '  "${args[@]}" </dev/null',
        "fi",
        'finish "$?"',
        "",
    ]
    return "\n".join(lines)


def _check_inputs(
    step: str,
    tasks: Sequence[Sequence[str]],
    stdin: Sequence[str | None] | None,
    env: Mapping[str, str] | None,
    modules: Sequence[str],
    sbatch: Sequence[str],
    max_parallel: int | None,
) -> None:
    if not _STEP.match(step):
        raise ValueError(f"step {step!r} must be 1-64 letters, digits, '_', '.', '-'")
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"step {step}: tasks must be a non-empty list of argument lists")
    for index, argv in enumerate(tasks):
        if isinstance(argv, str) or not argv:
            raise ValueError(
                f"step {step}: task {index} must be a non-empty argument list, got {argv!r}"
            )
        for arg in argv:
            if not isinstance(arg, str):
                raise ValueError(f"step {step}: task {index} argument {arg!r} is not a string")
            if "\x00" in arg:
                raise ValueError(f"step {step}: task {index} argument {arg!r} contains NUL")
    if stdin is not None:
        if len(stdin) != len(tasks):
            raise ValueError(
                f"step {step}: {len(stdin)} stdin texts for {len(tasks)} tasks (need one per task)"
            )
        for index, text in enumerate(stdin):
            if text is not None and (not isinstance(text, str) or "\x00" in text):
                raise ValueError(f"step {step}: stdin of task {index} must be text without NUL")
    for name, value in (env or {}).items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"step {step}: environment variable name {name!r} is invalid")
        if not isinstance(value, str) or "\x00" in value:
            raise ValueError(f"step {step}: environment value of {name} must be text without NUL")
    for module in modules:
        if not module or any(c.isspace() for c in module):
            raise ValueError(f"step {step}: module {module!r} must be one non-empty name")
    for option in sbatch:
        if not option.startswith("-") or any(c in option for c in "\n\r\x00"):
            raise ValueError(f"step {step}: sbatch option {option!r} must be one '--option=value'")
    if max_parallel is not None and max_parallel < 1:
        raise ValueError(f"step {step}: max_parallel must be >= 1, got {max_parallel}")
