"""Running the bundle's real session DAGs with ``dag.test()``, chained as the scheduler would.

A session is a chain of batch runs (each run triggers the next one); ``dag.test()`` runs exactly one
DagRun, so the driver below runs batch after batch until a run closes the session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def load_dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag(dag_id)


@dataclass
class SessionRuns:
    runs: list[Any] = field(default_factory=list)

    def states(self, task_id: str) -> list[str]:
        return [str(run.get_task_instance(task_id).state) for run in self.runs]

    def xcom(self, run: Any, task_id: str) -> Any:
        return run.get_task_instance(task_id).xcom_pull(task_ids=task_id)


def run_session(dag: Any, conf: dict[str, Any], max_runs: int = 40) -> SessionRuns:
    """Run batch after batch of one session until a run closes it."""
    result = SessionRuns()
    for _ in range(max_runs):
        run = dag.test(run_conf=conf)
        result.runs.append(run)
        assert str(run.state) == "success", f"run {run.run_id} ended {run.state}"
        if str(run.get_task_instance("close_session").state) == "success":
            return result
    raise AssertionError(f"session did not close within {max_runs} runs")
