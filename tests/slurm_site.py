"""Fixtures for tests that process on the real Slurm cluster of scripts/services.sh.

Loaded from tests/conftest.py (`pytest_plugins`): the built-in engines installed for the cluster
user, the experiment group, and a facility (share, GPFS, ledger, config) the cluster user reaches.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINES = Path("/opt/cryoflow-engines")


def _root_or_fail() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("processing on the test Slurm cluster needs root under CI")
        pytest.skip("needs root (cluster user, groups, engines install)")


@pytest.fixture(scope="module")
def cluster_engines() -> Path:
    """The built-in engines installed where the cluster user can run them."""
    _root_or_fail()
    subprocess.run([str(ROOT / "scripts" / "install-engines.sh"), str(ENGINES)], check=True)
    return ENGINES


@pytest.fixture(scope="module")
def experiment_group(slurm_services) -> str:
    """The experiment's group; the cluster account is a member, as the facility's service is.

    scripts/services.sh creates both before slurmd starts (a daemon caches a user's groups:
    a membership added later is missing from jobs until it restarts)."""
    groups = subprocess.run(["id", "-nG", "cryo"], capture_output=True, text=True).stdout.split()
    assert "cryoflow-exp" in groups, "scripts/services.sh up should have set up cryoflow-exp"
    return "cryoflow-exp"


@pytest.fixture
def slurm_site(slurm_services, cluster_engines, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """Share, GPFS and config for a facility whose compute is the test Slurm cluster."""
    base = Path("/srv/cryoflow-tests") / uuid.uuid4().hex[:10]
    cfg = base / "config"
    (cfg / "microscopes").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "data" / "config-slurm" / "facility.yaml", cfg)
    for scope in ("krios1", "krios2"):  # EPU + Falcon (EER), SerialEM + K3 (TIFF)
        shutil.copy(ROOT / "config" / "microscopes" / f"{scope}.yaml", cfg / "microscopes")
    for d in (base, base.parent):
        d.chmod(0o755)  # the cluster user must reach GPFS below it
    env = {
        "CRYOFLOW_CONFIG_DIR": str(cfg),
        "CRYOFLOW_SHARE_ROOT": str(base / "share"),
        "CRYOFLOW_GPFS_ROOT": str(base / "gpfs"),
        "CRYOFLOW_LEDGER_URL": f"sqlite:///{base}/ledger.db",
        "CRYOFLOW_ENGINES": str(cluster_engines),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    (base / "gpfs").mkdir()
    (base / "gpfs").chmod(0o755)
    yield {
        "base": base,
        "share": base / "share" / "krios2",
        "share_krios1": base / "share" / "krios1",
    }
    shutil.rmtree(base, ignore_errors=True)
