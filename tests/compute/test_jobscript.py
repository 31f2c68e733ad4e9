"""The job-array script: quoting, per-task stdin, exit-code files, directives (run with bash)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from cryoflow.processing.compute.jobscript import (
    JobLayout,
    build_array_script,
    job_umask,
    script_modes,
    slurm_directives,
)
from cryoflow.processing.compute.settings import parse_backend

HOSTILE = "mov $(touch pwned_marker) `touch pwned_marker2`.tif"


def _run_task(
    script: Path, index: int, job_id: str = "77", umask: int = -1
) -> subprocess.CompletedProcess[str]:
    """Run one array task the way Slurm would: the script with the array variables set."""
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(index), "SLURM_ARRAY_JOB_ID": job_id}
    return subprocess.run(
        ["/bin/bash", str(script)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        umask=umask,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write(tmp_path: Path, **kwargs) -> tuple[JobLayout, Path]:
    layout = JobLayout(str(tmp_path))
    script = Path(layout.script)
    script.write_text(build_array_script(step="test", layout=layout, **kwargs))
    return layout, script


def test_hostile_file_name_reaches_the_tool_verbatim_and_runs_nothing(tmp_path: Path) -> None:
    layout, script = _write(tmp_path, tasks=[["printf", "%s|", HOSTILE, "it's", "a\nb", "*"]])
    done = _run_task(script, 0)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{HOSTILE}|it's|a\nb|*|"
    assert not list(tmp_path.rglob("pwned_marker*"))
    assert not list(Path.cwd().glob("pwned_marker*"))


def test_each_index_runs_its_own_task_with_its_own_stdin(tmp_path: Path) -> None:
    stdin_text = "line one\n$(touch pwned_marker)\n"
    layout, script = _write(
        tmp_path, tasks=[["echo", "zero"], ["cat"], ["cat"]], stdin=[None, stdin_text, None]
    )
    assert _run_task(script, 0).stdout == "zero\n"
    assert _run_task(script, 1).stdout == stdin_text
    assert _run_task(script, 2).stdout == ""  # no stdin given: /dev/null, never a hang
    assert not (tmp_path / "pwned_marker").exists()


def test_exit_code_lands_in_its_file_and_no_temp_file_remains(tmp_path: Path) -> None:
    layout, script = _write(tmp_path, tasks=[["true"], ["sh", "-c", "exit 3"]])
    assert _run_task(script, 0).returncode == 0
    assert _run_task(script, 1).returncode == 3
    assert Path(layout.exit_file("77", 0)).read_text() == "0\n"
    assert Path(layout.exit_file("77", 1)).read_text() == "3\n"
    assert sorted(p.name for p in Path(layout.exit_dir).iterdir()) == ["77_0", "77_1"]


def test_index_outside_the_batch_fails_loudly(tmp_path: Path) -> None:
    _, script = _write(tmp_path, tasks=[["true"]])
    done = _run_task(script, 5)
    assert done.returncode == 2
    assert "no task 5" in done.stderr


def test_environment_and_failing_module_load(tmp_path: Path) -> None:
    layout, script = _write(tmp_path, tasks=[["sh", "-c", "echo $LC_ALL"]], env={"LC_ALL": "C"})
    assert _run_task(script, 0).stdout == "C\n"
    layout, script = _write(tmp_path, tasks=[["true"]], modules=["nosuchtool/1.0"])
    done = _run_task(script, 0, job_id="78")
    assert done.returncode == 127  # no `module` command here: the task fails, it does not run
    assert "module load nosuchtool/1.0 failed" in done.stderr
    assert Path(layout.exit_file("78", 0)).read_text() == "127\n"


def test_sbatch_header_carries_the_backend_settings(tmp_path: Path) -> None:
    backend = parse_backend(
        {
            "kind": "slurm",
            "ssh_conn_id": "hpc",
            "partition": "gpu",
            "gres": "gpu:1",
            "mem": "8G",
            "account": "cryoem",
            "remote_workdir": "/gpfs/jobs",
            "extra_sbatch": ["--constraint=a100"],
        }
    )
    layout = JobLayout(str(tmp_path))
    text = build_array_script(
        step="motioncor",
        tasks=[["true"]] * 12,
        layout=layout,
        sbatch=slurm_directives(backend),
        max_parallel=4,
    )
    lines = text.splitlines()
    header = [line for line in lines[1:] if line.startswith("#SBATCH ")]
    assert lines[1 : 1 + len(header)] == header  # directives come before any command
    for option in (
        "--array=0-11%4",
        "--partition=gpu",
        "--gres=gpu:1",
        "--mem=8G",
        "--account=cryoem",
        "--time=00:30:00",
        "--constraint=a100",
        "--job-name=cf-motioncor",
        f"--output={tmp_path}/logs/%A_%a.out",
        f"--error={tmp_path}/logs/%A_%a.err",
    ):
        assert f"#SBATCH {option}" in header


TOOL = 'printf x >out.txt && mkdir -p made && echo "$CRYOFLOW_FILE_MODE $CRYOFLOW_DIR_MODE"'


def test_outputs_get_the_facility_modes_whatever_umask_the_job_came_with(tmp_path: Path) -> None:
    layout, script = _write(tmp_path, tasks=[["sh", "-c", TOOL]])
    logs = Path(layout.logs_dir)
    logs.mkdir()
    for name in ("77_0.out", "77_0.err"):  # Slurm opens them before the script runs
        (logs / name).touch()
        os.chmod(logs / name, 0o644)

    done = _run_task(script, 0, umask=0o022)  # what a 0644/0755 default would give

    assert done.returncode == 0, done.stderr
    assert done.stdout == "0640 2770\n"  # exported for the built-in engines
    assert _mode(tmp_path / "out.txt") == 0o640
    assert _mode(tmp_path / "made") == 0o750  # no world; one umask cannot also give g+w
    assert _mode(Path(layout.exit_dir)) == 0o2770
    assert _mode(Path(layout.exit_file("77", 0))) == 0o640
    assert [_mode(logs / name) for name in ("77_0.out", "77_0.err")] == [0o640, 0o640]


def test_group_writable_modes_give_a_group_writable_umask(tmp_path: Path) -> None:
    layout, script = _write(tmp_path, tasks=[["sh", "-c", TOOL]], file_mode=0o660, dir_mode=0o2770)
    done = _run_task(script, 0, umask=0o022)
    assert done.stdout == "0660 2770\n"
    assert (_mode(tmp_path / "out.txt"), _mode(tmp_path / "made")) == (0o660, 0o770)
    assert script_modes(script.read_text()) == (0o660, 0o2770)
    assert job_umask(0o640, 0o2770) == 0o027
    assert job_umask(0o600, 0o2700) == 0o077


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": []}, "non-empty list"),
        ({"tasks": [[]]}, "task 0 must be a non-empty argument list"),
        ({"tasks": ["echo hi"]}, "task 0 must be a non-empty argument list"),
        ({"tasks": [["echo", 3]]}, "argument 3 is not a string"),
        ({"tasks": [["echo", "a\x00b"]]}, "contains NUL"),
        ({"tasks": [["true"]], "stdin": ["a", "b"]}, "2 stdin texts for 1 tasks"),
        ({"tasks": [["true"]], "env": {"BAD-NAME": "x"}}, "'BAD-NAME' is invalid"),
        ({"tasks": [["true"]], "sbatch": ["partition=gpu"]}, "must be one '--option=value'"),
        ({"tasks": [["true"]], "file_mode": "0640"}, "file_mode must be a mode"),
        ({"tasks": [["true"]], "dir_mode": 0o12770}, "dir_mode must be a mode"),
    ],
)
def test_bad_input_is_rejected_with_the_reason(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match="step test") as info:
        build_array_script(step="test", layout=JobLayout(str(tmp_path)), **kwargs)
    assert message in str(info.value)
