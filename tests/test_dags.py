"""The DAG bundle as the DAG processor sees it: one DAG per microscope file, no import errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_every_microscope_yields_an_ingest_and_a_processing_dag(airflow_db) -> None:
    bag = _bag()
    assert bag.import_errors == {}
    scopes = sorted(p.stem for p in (ROOT / "config" / "microscopes").glob("*.yaml"))
    kinds = ("process", "session", "cleanup", "end_session")
    expected = [f"{kind}_{s}" for kind in kinds for s in scopes]
    assert sorted(bag.dag_ids) == sorted(expected)
    dag = bag.get_dag("session_krios2")
    assert dag.is_paused_upon_creation is True
    # a batch run is one task instance, and one watch per share at a time
    assert dag.task_ids == ["watch_and_copy"] and dag.max_active_runs == 1
    # the trigger form is the session; its defaults come from the microscope's YAML
    assert dag.params["pixel_size_A"] == 0.832
    assert dag.params["frames"] == 50
    name = dag.params.get_param("session_name")
    assert name.schema["pattern"].startswith("^[A-Za-z0-9]")
    # its help (Markdown: shown only without a plain description) leads to the session view's
    # start form, which flags each bad value beside its field; relative to the UI's <base href>
    assert name.description is None
    assert "(cryoflow/view/start/krios2)" in name.schema["description_md"]
    assert "beside its field" in name.schema["description_md"]
    # optional text fields may stay empty in the form (a typed Param is otherwise required)
    assert dag.params.get_param("unix_group").schema["type"] == ["null", "string"]
    assert dag.params["unix_group"] is None
    # curation thresholds: optional numbers (never required), defaults from curation: in the YAML
    assert dag.params.get_param("max_total_drift_A").schema["type"] == ["null", "number"]
    assert dag.params["max_total_drift_A"] == 30 and dag.params["min_particles"] == 20
    # the form's bounds are the model's
    assert dag.params.get_param("kv").schema["maximum"] == 400
    # processing is started by ingest's asset event, never waited on, and runs unpaused
    proc = bag.get_dag("process_krios2")
    assert proc.task_ids == ["process"] and proc.is_paused_upon_creation is False
    (outlet,) = dag.get_task("watch_and_copy").outlets
    assert outlet.uri == "cryoflow://krios2/verified"
    assert [a.uri for a in proc.timetable.asset_condition.objects] == [outlet.uri]
    # and a periodic run settles what a killed run left when no batch follows
    assert proc.timetable.timetable.expression == "*/10 * * * *"
    # share cleanup: one task, paused when created, hourly, a dry run when triggered by hand
    cleanup = bag.get_dag("cleanup_krios2")
    assert cleanup.task_ids == ["cleanup"] and cleanup.is_paused_upon_creation is True
    assert cleanup.max_active_runs == 1 and cleanup.timetable.expression == "23 * * * *"
    assert cleanup.params["dry_run"] is True
    assert "cleanup.mode: off" in cleanup.description  # the shipped default


def test_bad_microscope_file_is_an_import_error_naming_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "config"
    shutil.copytree(ROOT / "config", cfg)
    path = cfg / "microscopes" / "krios1.yaml"
    path.write_text(path.read_text().replace("kv: 300", "kv: three hundred"))
    monkeypatch.setenv("CRYOFLOW_CONFIG_DIR", str(cfg))
    errors = _bag().import_errors
    # every DAG file generated from config/ reports it (session/processing and cleanup)
    assert sorted(Path(f).name for f in errors) == ["microscope_sessions.py", "share_cleanup.py"]
    for message in errors.values():
        assert "krios1.yaml" in message and "optics.kv" in message and "three hundred" in message
        # the message is the error, not a deep traceback
        assert message.strip().splitlines()[-1].count("cryoflow") <= 1


def test_session_form_rejects_unsafe_session_names(airflow_db, site_env) -> None:
    from tests.airflow_helpers import load_dag

    dag = load_dag("session_krios1")
    with pytest.raises(Exception, match="session_name"):
        dag.test(run_conf={"session_name": "../../etc"})


DAG_FILES = ("microscope_sessions.py", "share_cleanup.py")


def _parse_dag_files(before: str = "", after: str = "") -> subprocess.CompletedProcess[str]:
    """What the DAG processor does: import the files with plugins/ on sys.path, in a fresh
    interpreter (``before``/``after``: code around the import)."""
    parse = f"[runpy.run_path('dags/' + f) for f in {DAG_FILES!r}]\n"
    code = f"import runpy, sys\n{before}{parse}{after}"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "plugins")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_dag_file_parses_in_a_plain_interpreter() -> None:
    _parse_dag_files()


#: Not needed to define the DAGs; each costs every task start (a start parses the DAG file)
#: 0.2-1.8 s on this machine's cores, more under load: imported where they are used.
HEAVY_AT_PARSE = (
    "pandas", "starfile", "mrcfile", "tifffile", "asyncssh", "paramiko", "smbprotocol"
)  # fmt: skip


def test_dag_files_leave_heavy_libraries_to_the_tasks_that_use_them() -> None:
    proc = _parse_dag_files(
        before="import airflow.sdk\nbefore = set(sys.modules)\n",
        after="print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))\n",
    )
    loaded = set(proc.stdout.split())
    assert not loaded & set(HEAVY_AT_PARSE), sorted(loaded & set(HEAVY_AT_PARSE))
