"""One session DAG per microscope, generated from config/ (wiring only; logic lives in plugins/).

A run is one batch of a session: open (idempotent) -> wait for finished files (deferred, no worker
slot) -> copy them to GPFS verified -> either trigger the next batch run of the same session or
close it. See README "Why continuation runs".
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Param

from cryoflow.config import FacilityConfig, MicroscopeConfig, load_site
from cryoflow.operators.compute_job import ComputeArrayOperator
from cryoflow.operators.processing_tasks import plan_step, record_step, session_results
from cryoflow.operators.session_tasks import (
    close_session,
    open_session,
    plan_continuation,
    plan_next,
    transfer_batch,
)
from cryoflow.operators.watch_share import WatchShareOperator
from cryoflow.session import SESSION_NAME_PATTERN, UNIX_NAME_PATTERN, form_defaults


def session_form(scope: MicroscopeConfig) -> dict[str, Param]:
    d = form_defaults(scope)
    return {
        "session_name": Param(
            "",
            type="string",
            pattern=SESSION_NAME_PATTERN,
            title="Session name",
            description="Letters, digits, . _ - (max 64).",
        ),
        "source_folder": Param(
            "",
            type="string",
            title="Folder on the share",
            description="Where EPU/SerialEM writes; empty = the session name.",
        ),
        "project": Param("", type="string", title="Project / proposal"),
        "unix_group": Param(
            "",
            type="string",
            pattern=r"^$|" + UNIX_NAME_PATTERN,
            title="Unix group of the experiment",
            description="Owns the data on GPFS; empty = the service's group.",
        ),
        "collaborators": Param(
            [],
            type="array",
            items={"type": "string"},
            title="Collaborators (Unix users, granted ACLs)",
        ),
        "sample": Param("", type="string", title="Sample"),
        "pixel_size_A": Param(
            d["pixel_size_A"],
            type="number",
            exclusiveMinimum=0.1,
            maximum=20,
            title="Pixel size (Å)",
        ),
        "kv": Param(d["kv"], type="number", minimum=60, maximum=400, title="Voltage (kV)"),
        "cs_mm": Param(d["cs_mm"], type="number", minimum=0, maximum=10, title="Cs (mm)"),
        "amp_contrast": Param(
            d["amp_contrast"], type="number", minimum=0, maximum=0.99, title="Amplitude contrast"
        ),
        "dose_per_frame": Param(
            d["dose_per_frame"],
            type="number",
            exclusiveMinimum=0,
            maximum=50,
            title="Dose per frame (e/Å²)",
        ),
        "frames": Param(d["frames"], type="integer", minimum=1, maximum=2000, title="Frames"),
        "gain_reference": Param(d["gain_reference"], type="string", title="Gain reference file"),
        "motioncor": Param(d["motioncor"], type="boolean", title="Motion correction"),
        "ctf": Param(d["ctf"], type="boolean", title="CTF estimation"),
        "picking": Param(d["picking"], type="boolean", title="Particle picking"),
        "particle_diameter_A": Param(
            d["particle_diameter_A"],
            type="number",
            minimum=10,
            maximum=2000,
            title="Particle diameter (Å)",
        ),
        "idle_timeout_minutes": Param(
            d["idle_timeout_minutes"],
            type="number",
            exclusiveMinimum=0,
            title="End after idle (minutes)",
        ),
        "max_hours": Param(
            d["max_hours"], type="number", exclusiveMinimum=0, title="Longest session (hours)"
        ),
        "end_time": Param("", type="string", title="End time (ISO, optional)"),
    }


def processing(facility: FacilityConfig, scope_id: str, session, moved) -> None:
    """MotionCor2 -> (CTFFIND, DoG picker), each one job array per batch, results to the ledger."""

    def step(stage: str, software: str, task_id: str, inputs):
        plan = plan_step.override(task_id=f"plan_{stage}")(stage, scope_id, session, inputs)
        job = ComputeArrayOperator(
            task_id=task_id,
            backend=facility.compute[facility.software[software].backend],
            step=stage,
            tasks=plan["tasks"],
            stdin=plan["stdin"],
            retries=1,
        )
        plan >> job
        return record_step.override(task_id=f"record_{stage}")(stage, plan, job.output)

    aligned = step("motioncor", "motioncor2", "motioncor", moved)
    ctf = step("ctf", "ctffind", "ctffind", aligned)
    picks = step("picking", "dogpicker", "dogpicker", aligned)
    [ctf, picks] >> session_results(session)


def build(scope: MicroscopeConfig, facility: FacilityConfig) -> DAG:
    with DAG(
        dag_id=f"session_{scope.id}",
        description=f"{scope.name}: share -> GPFS -> pre-processing",
        doc_md=scope.description or None,
        schedule=None,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        is_paused_upon_creation=True,
        max_active_runs=3,  # batch n+1 is copied while batch n is still being processed
        params=session_form(scope),
        tags=["microscope", scope.id, *scope.tags],
        default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    ) as dag:
        session = open_session(scope.id)
        wait = WatchShareOperator(
            task_id="wait_for_files", microscope_id=scope.id, session=session, retries=0
        )
        moved = transfer_batch(scope.id, session, wait.output)
        decide = plan_next(wait.output)
        moved >> decide
        cont = plan_continuation()
        next_batch = TriggerDagRunOperator(
            task_id="next_batch",
            trigger_dag_id=dag.dag_id,
            trigger_run_id=cont["run_id"],
            conf=cont["conf"],
            skip_when_already_exists=True,
        )
        decide >> cont >> next_batch
        decide >> close_session(session, wait.output, scope.id)
        processing(facility, scope.id, session, moved)
    return dag


_site = load_site()
for _scope in _site.microscopes.values():
    globals()[f"session_{_scope.id}"] = build(_scope, _site.facility)
