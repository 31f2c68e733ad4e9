"""Per microscope, generated from config/: an ingest DAG and a processing DAG (wiring only).

``session_<id>``: one run per batch of a session, one task: wait for finished files (deferred,
no worker slot), copy them to GPFS verified, then trigger the next batch run or close. Its asset
event starts ``process_<id>``, which processes whatever the ledger says is owed and is never
waited on, so copying goes on at the microscope's pace however long the clusters take.
``end_session_<id>``: an operator ends a session of that microscope at any moment (one DAG per
microscope: the right to end is given per microscope, as the right to start is). See README
"Why this design".
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param

from cryoflow.config import MicroscopeConfig, load_site, share_queue
from cryoflow.operators.end_session import end_session
from cryoflow.operators.ingest_batch import SessionBatchOperator
from cryoflow.operators.process_owed import ProcessOwedOperator
from cryoflow.session import SESSION_NAME_PATTERN, trigger_form_params

START = datetime(2026, 1, 1)


def verified_asset(scope: MicroscopeConfig) -> Asset:
    """Updated by every batch of the microscope's sessions; schedules its processing."""
    return Asset(name=f"{scope.id}_verified", uri=f"cryoflow://{scope.id}/verified")


def ingest_dag(scope: MicroscopeConfig) -> DAG:
    with DAG(
        dag_id=f"session_{scope.id}",
        description=f"{scope.name}: share -> GPFS, verified (one run per batch)",
        doc_md=scope.description or None,
        schedule=None,
        start_date=START,
        catchup=False,
        is_paused_upon_creation=True,
        max_active_runs=1,  # one watch per microscope share at a time
        params={name: Param(**spec) for name, spec in trigger_form_params(scope).items()},
        tags=["microscope", scope.id, *scope.tags],
        default_args={"retries": 3, "retry_delay": timedelta(seconds=30)},
    ) as dag:
        SessionBatchOperator(
            task_id="watch_and_copy",
            microscope_id=scope.id,
            queue=share_queue(scope),  # workers that mount this microscope's share and GPFS
            outlets=[verified_asset(scope)],
        )
    return dag


def processing_dag(scope: MicroscopeConfig) -> DAG:
    with DAG(
        dag_id=f"process_{scope.id}",
        description=f"{scope.name}: MotionCor2 -> CTFFIND, picking for every owed movie",
        # every batch's asset event; and every 10 minutes, so what a killed run left is
        # settled even when no batch follows (one task instance when nothing is owed)
        schedule=AssetOrTimeSchedule(
            timetable=CronTriggerTimetable("*/10 * * * *", timezone="UTC"),
            assets=[verified_asset(scope)],
        ),
        start_date=START,
        catchup=False,
        is_paused_upon_creation=False,  # runs only when ingest copied something
        # One run at a time: it takes each new batch's movies itself (on every resume, and
        # while lingering), so later batches' asset events only queue behind it.
        max_active_runs=1,
        tags=["processing", scope.id],
        default_args={"retries": 2, "retry_delay": timedelta(seconds=20)},
    ) as dag:
        ProcessOwedOperator(task_id="process", microscope_id=scope.id)
    return dag


def end_session_dag(scope: MicroscopeConfig) -> DAG:
    with DAG(
        dag_id=f"end_session_{scope.id}",
        description=f"{scope.name}: end a running session now (stop watching, copy what is "
        "complete, close)",
        schedule=None,
        start_date=START,
        catchup=False,
        is_paused_upon_creation=False,
        params={
            "session_name": Param(
                "", type="string", pattern=SESSION_NAME_PATTERN, title="Session name"
            ),
        },
        tags=["operator", scope.id],
    ) as dag:
        end_session(microscope=scope.id)
    return dag


_site = load_site()
for _scope in _site.microscopes.values():
    globals()[f"session_{_scope.id}"] = ingest_dag(_scope)
    globals()[f"process_{_scope.id}"] = processing_dag(_scope)
    globals()[f"end_session_{_scope.id}"] = end_session_dag(_scope)
