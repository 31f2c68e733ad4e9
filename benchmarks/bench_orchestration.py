"""Orchestration overhead of ComputeArrayOperator on the real Slurm-over-SSH of services.sh.

Each batch runs the operator's real path with a compute step that does nothing (`true`):
execute() (build script, SFTP upload, sbatch, XCom, first status check) -> TaskDeferred ->
the trigger's run() polling over asyncssh -> execute_complete() (fetch every task's logs over
SFTP, parse, per-index results). Compute time is ~0, so wall time per task is the overhead.

The "cluster" is this machine, so the exit-code files' mtimes split the wall time into
  submit  : execute() until it defers,
  slurm   : sbatch returned -> last task's exit file written (Slurm scheduling + launching),
  detect  : last exit file -> trigger event (poll interval, sacct/squeue, parsing),
  finish  : execute_complete() (log fetch + results).

Usage (as root; brings the services up if needed):
  .venv/bin/python benchmarks/bench_orchestration.py [--sizes 1 10 50] [--repeats 3]
      [--poll-interval 1.0] [--max-parallel 8] [--concurrent 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))


@dataclass
class _TaskInstance:
    dag_id: str = "bench"
    task_id: str = "step"
    run_id: str = "bench"
    map_index: int = -1
    try_number: int = 1
    xcoms: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value

    def xcom_pull(self, task_ids: str, key: str, map_indexes: int) -> Any:
        return self.xcoms.get(key)


@dataclass
class Sample:
    n: int
    wall: float
    submit: float
    slurm: float
    detect: float
    finish: float
    polls: int
    poll_s: float  # mean duration of one status poll (one SSH exec: sacct + squeue + exit files)
    deferred: bool = True  # False: done at execute()'s first status check (submit = wall)

    @property
    def ours(self) -> float:
        """Our share of the wall time: everything but Slurm's own scheduling and the compute."""
        return self.submit + self.detect + self.finish


def _services_env() -> dict[str, str]:
    done = subprocess.run([str(ROOT / "scripts" / "services.sh"), "up"], capture_output=True)
    if done.returncode:
        sys.exit(f"scripts/services.sh up failed:\n{done.stderr.decode()[-2000:]}")
    state = Path(os.environ.get("CRYOFLOW_SERVICES_DIR", "/var/lib/cryoflow-services"))
    env = {}
    for line in (state / "env").read_text().splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export":
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


def _operator(backend: dict[str, Any], n: int, task_id: str):
    from cryoflow.operators.compute_job import ComputeArrayOperator

    return ComputeArrayOperator(
        task_id=task_id, backend=backend, step="bench", tasks=[["true"]] * n, log_tail_bytes=2000
    )


def _last_exit_mtime(job_dir: str) -> float:
    return max(p.stat().st_mtime for p in Path(job_dir, "exit").iterdir())


async def _run_batch(backend: dict[str, Any], n: int, label: str) -> Sample:
    from airflow.sdk.exceptions import TaskDeferred

    from cryoflow.triggers.slurm_job import SlurmJobTrigger

    class CountingTrigger(SlurmJobTrigger):
        polls = 0
        seconds = 0.0

        async def _poll(self, conn):  # the real poll, counted and timed
            started = time.perf_counter()
            statuses = await super()._poll(conn)
            CountingTrigger.seconds += time.perf_counter() - started
            CountingTrigger.polls += 1
            return statuses

    ti = _TaskInstance(task_id=label)
    op = _operator(backend, n, label)
    t0 = time.time()
    try:
        result = await asyncio.to_thread(op.execute, {"ti": ti})
    except TaskDeferred as deferred:
        _, kwargs = deferred.trigger.serialize()
    else:  # all done at the operator's first status check: no deferral needed
        wall = time.time() - t0
        assert len(result) == n
        return Sample(n, wall, wall, 0.0, 0.0, 0.0, 0, 0.0, deferred=False)
    t_submitted = time.time()
    trigger = CountingTrigger(**kwargs)
    event = None
    async for fired in trigger.run():
        event = fired.payload
    t_event = time.time()
    assert event is not None and event["status"] == "success", event
    resumed = _operator(backend, n, label)
    result = await asyncio.to_thread(resumed.execute_complete, {"ti": ti}, event)
    t_done = time.time()
    assert len(result) == n
    last_exit = _last_exit_mtime(event["job_dir"])
    return Sample(
        n=n,
        wall=t_done - t0,
        submit=t_submitted - t0,
        slurm=last_exit - t_submitted,
        detect=t_event - last_exit,
        finish=t_done - t_event,
        polls=CountingTrigger.polls,
        poll_s=CountingTrigger.seconds / max(1, CountingTrigger.polls),
    )


def _report(title: str, samples: list[Sample]) -> None:
    n = samples[0].n
    keys = [k for k in Sample.__annotations__ if k != "deferred"] + ["ours"]
    mean = {k: statistics.mean(getattr(s, k) for s in samples) for k in keys}
    per_task = mean["wall"] / n
    print(
        f"{title} n={n:>3} | wall {mean['wall']:6.2f}s = submit {mean['submit']:4.2f}"
        f" + slurm {mean['slurm']:5.2f} + detect {mean['detect']:4.2f}"
        f" + finish {mean['finish']:4.2f} | {mean['polls']:4.1f} polls of {mean['poll_s']:.3f}s"
        f" | per task: wall {per_task * 1000:6.0f} ms, ours {mean['ours'] / n * 1000:6.0f} ms"
        f" | {3600 / per_task:6.0f} tasks/h"
        + (
            f" ({sum(not s.deferred for s in samples)} never deferred)"
            if any(not s.deferred for s in samples)
            else ""
        )
    )


async def _concurrent(backend: dict[str, Any], batches: int, n: int) -> tuple[float, int]:
    t0 = time.time()
    samples = await asyncio.gather(*(_run_batch(backend, n, f"conc{i}") for i in range(batches)))
    return time.time() - t0, sum(s.n for s in samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--max-parallel", type=int, default=8)
    parser.add_argument("--concurrent", type=int, default=4, help="batches of 10 at once; 0=off")
    args = parser.parse_args()

    os.environ.update(_services_env())
    root = f"{os.environ['CRYOFLOW_SLURM_WORKDIR']}/bench/{uuid.uuid4().hex[:8]}"
    backend = {
        "kind": "slurm",
        "ssh_conn_id": os.environ["CRYOFLOW_SSH_CONN_ID"],
        "partition": "cpu",
        "time_limit": "5",
        "remote_workdir": root,
        "max_parallel": args.max_parallel,
        "poll_interval_s": args.poll_interval,
    }
    import logging

    import structlog

    import cryoflow.operators.compute_job  # noqa: F401  (Airflow configures logging on import)

    logging.disable(logging.WARNING)  # keep the figures readable: task logs are INFO
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))

    print(
        f"# Slurm over SSH (127.0.0.1:2222), single node 8 CPUs, compute step `true`, "
        f"poll interval {args.poll_interval}s, %K={args.max_parallel}, {args.repeats} repeats"
    )
    for n in args.sizes:
        samples = [asyncio.run(_run_batch(backend, n, f"b{n}r{r}")) for r in range(args.repeats)]
        _report("sequential", samples)
    if args.concurrent:
        wall, tasks = asyncio.run(_concurrent(backend, args.concurrent, 10))
        print(
            f"concurrent {args.concurrent} batches x 10 deferred at once (one event loop): "
            f"{wall:.2f}s wall, {tasks / wall * 3600:.0f} tasks/h"
        )
    subprocess.run(["rm", "-rf", root], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
