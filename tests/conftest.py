"""Test environment: an isolated Airflow home (SQLite) that loads this bundle's dags/ and plugins/.

Airflow reads its configuration when first imported, so the environment is set here, before any
test module imports it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.mkdtemp(prefix="cryoflow-airflow-"))

os.environ.update(
    {
        "AIRFLOW_HOME": str(_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME}/airflow.db",
        "AIRFLOW__API_AUTH__JWT_SECRET": "cryoflow-tests-only",
        "AIRFLOW__API__SECRET_KEY": "cryoflow-tests-only",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "CRYOFLOW_CONFIG_DIR": str(ROOT / "config"),
        # processing runs end when done (dag.test() waits for them); tests/triggers checks
        # the lingering trigger itself
        "CRYOFLOW_PROCESS_LINGER_SECONDS": "0",
    }
)

pytest_plugins = ["tests.services_fixtures", "tests.slurm_site"]


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Migrate the test Airflow database once per test session."""
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        check=True,
        capture_output=True,
        env=os.environ.copy(),
    )
    return _HOME


@pytest.fixture
def site_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Point the shipped config at throw-away share, GPFS and ledger, with fast timings."""
    share = tmp_path / "share"
    gpfs = tmp_path / "gpfs"
    for d in (share / "krios1", share / "krios2", gpfs):
        d.mkdir(parents=True)
    env = {
        "CRYOFLOW_SHARE_ROOT": str(share),
        "CRYOFLOW_GPFS_ROOT": str(gpfs),
        "CRYOFLOW_LEDGER_URL": f"sqlite:///{tmp_path}/ledger.db",
        "CRYOFLOW_SETTLE_SECONDS": "1.0",
        "CRYOFLOW_POLL_SECONDS": "0.25",
        "CRYOFLOW_BATCH_WINDOW_SECONDS": "0",
        "CRYOFLOW_LOCAL_WORKDIR": str(tmp_path / "jobs"),
        "CRYOFLOW_GPU_BACKEND": "local",
        "CRYOFLOW_CPU_BACKEND": "local",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {"share": share, "gpfs": gpfs, "root": tmp_path}
