"""Per microscope, generated from config/: a share cleanup DAG ``cleanup_<id>`` (wiring only).

One run, one task: delete from the microscope share only files whose copy is verified in the
ledger and proven intact on GPFS just before (see ``cryoflow.archive.cleanup``). Paused when
created; each microscope's ``cleanup.mode`` (off by default, dry-run, delete) decides what a
scheduled run does; a run triggered by hand is a dry run unless ``dry_run`` is switched off.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, CronTriggerTimetable, Param

from cryoflow.config import MicroscopeConfig, load_site, share_queue
from cryoflow.operators.share_cleanup import ShareCleanupOperator

START = datetime(2026, 1, 1)
SCHEDULE = "23 * * * *"  # hourly, off the hour


def cleanup_dag(scope: MicroscopeConfig) -> DAG:
    cfg = scope.cleanup
    with DAG(
        dag_id=f"cleanup_{scope.id}",
        description=(
            f"{scope.name}: free the share of files verified on GPFS (cleanup.mode: {cfg.mode}, "
            f"after {cfg.min_age_hours:g} h)"
        ),
        schedule=CronTriggerTimetable(SCHEDULE, timezone="UTC"),
        start_date=START,
        catchup=False,
        is_paused_upon_creation=True,
        max_active_runs=1,  # one cleanup of a share at a time
        params={
            "dry_run": Param(
                True,
                type="boolean",
                title="Dry run",
                description="Report what would be deleted, delete nothing (manual runs only; "
                "scheduled runs follow cleanup.mode).",
            )
        },
        tags=["cleanup", scope.id],
        default_args={"retries": 1, "retry_delay": timedelta(minutes=5)},
    ) as dag:
        ShareCleanupOperator(task_id="cleanup", microscope_id=scope.id, queue=share_queue(scope))
    return dag


_site = load_site()
for _scope in _site.microscopes.values():
    globals()[f"cleanup_{_scope.id}"] = cleanup_dag(_scope)
