"""Running the bundle's real DAGs with ``dag.test()``, chained as the scheduler would.

A session is a chain of batch runs of ``session_<id>`` (each run triggers the next one), and each
batch's asset event starts a run of ``process_<id>``; ``dag.test()`` runs exactly one DagRun, so
the driver below runs batch after batch (and, if asked, a processing run after each) until a run
closes the session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
INGEST_TASK = "watch_and_copy"


def load_dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag(dag_id)


@dataclass
class SessionRuns:
    runs: list[Any] = field(default_factory=list)
    processing: list[Any] = field(default_factory=list)

    def batch(self, run: Any) -> dict[str, Any]:
        """What one batch run copied (its task's "batch" XCom)."""
        ti = run.get_task_instance(INGEST_TASK)
        return ti.xcom_pull(task_ids=INGEST_TASK, key="batch") or {}


def closed_by(run: Any) -> str | None:
    ti = run.get_task_instance(INGEST_TASK)
    value = ti.xcom_pull(task_ids=INGEST_TASK)
    return value.get("closed") if isinstance(value, dict) else None


def run_session(
    dag: Any, conf: dict[str, Any], max_runs: int = 40, process: Any = None
) -> SessionRuns:
    """Run batch after batch of one session until a run closes it; with ``process`` (the
    microscope's processing DAG) a processing run follows each batch, as its asset event would
    start it."""
    result = SessionRuns()
    for _ in range(max_runs):
        run = dag.test(run_conf=conf)
        result.runs.append(run)
        assert str(run.state) == "success", f"run {run.run_id} ended {run.state}"
        if process is not None:
            proc = process.test()
            assert str(proc.state) == "success", f"processing {proc.run_id} ended {proc.state}"
            result.processing.append(proc)
        if closed_by(run):
            return result
    raise AssertionError(f"session did not close within {max_runs} runs")
