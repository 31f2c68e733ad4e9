"""Pytest plugin: the real services of scripts/services.sh (Slurm + slurmdbd + sshd), once per run.

Loaded from tests/conftest.py (`pytest_plugins`). Under CI (CI=true) a service that cannot be
brought up FAILS the tests that need it; on a developer machine they are skipped with the
reason (not root, no apt, ...). Tests using these fixtures should carry `pytest.mark.services`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES_SH = ROOT / "scripts" / "services.sh"


@dataclass(frozen=True)
class SlurmServices:
    """Where the running services are and how to reach them."""

    state_dir: Path
    conn_id: str  # an Airflow SSH connection, exported as AIRFLOW_CONN_<ID> for the session
    conn_json: str
    remote_workdir: str  # writable by the SSH user, on the "cluster"
    key_file: Path
    known_hosts: Path

    @property
    def sshd_pidfile(self) -> Path:
        return Path("/run/sshd-cryoflow.pid")

    @property
    def sshd_config(self) -> Path:
        return Path("/etc/ssh/cryoflow_sshd_config")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"services unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"services unavailable: {reason}")


def _read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            values[key] = value
    return values


@pytest.fixture(scope="session")
def slurm_services() -> Iterator[SlurmServices]:
    """Run `scripts/services.sh up` (idempotent) and expose its Airflow connection."""
    if os.geteuid() != 0:
        _unavailable("scripts/services.sh must run as root (it starts system daemons)")
    state_dir = Path(os.environ.get("CRYOFLOW_SERVICES_DIR", "/var/lib/cryoflow-services"))
    try:
        done = subprocess.run(
            [str(SERVICES_SH), "up"], capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"scripts/services.sh up: {exc}")
    if done.returncode != 0:
        _unavailable(f"scripts/services.sh up exited {done.returncode}: {done.stderr[-2000:]}")
    env = _read_env(state_dir / "env")
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    conn_id = env["CRYOFLOW_SSH_CONN_ID"]
    try:
        yield SlurmServices(
            state_dir=state_dir,
            conn_id=conn_id,
            conn_json=env[f"AIRFLOW_CONN_{conn_id.upper()}"],
            remote_workdir=env["CRYOFLOW_SLURM_WORKDIR"],
            key_file=state_dir / "id_ed25519",
            known_hosts=state_dir / "known_hosts",
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def remote_job_root(slurm_services: SlurmServices) -> Iterator[str]:
    """A fresh directory under the cluster workdir for one test's jobs (removed afterwards).

    The "cluster" is this machine, so cleanup is a local rmtree of the user's directory."""
    path = f"{slurm_services.remote_workdir}/tests/{uuid.uuid4().hex[:12]}"
    yield path
    if path.startswith(slurm_services.remote_workdir + "/tests/"):
        shutil.rmtree(path, ignore_errors=True)


# --- Samba: a microscope PC's SMB share (scripts/services.sh samba) ---------------------------


@dataclass(frozen=True)
class SambaService:
    """smbd on loopback serving ``share`` from ``share_path``; ``stop``/``start`` take it away
    and bring it back (what a microscope PC that reboots or drops off the network does)."""

    host: str
    port: int
    share: str
    user: str
    password: str
    share_path: Path  # the folder behind the share, written locally as the microscope would
    log: Path

    def stop(self) -> None:
        subprocess.run([str(SERVICES_SH), "samba-down"], capture_output=True, check=True)

    def start(self) -> None:
        subprocess.run([str(SERVICES_SH), "samba"], capture_output=True, check=True, timeout=120)


@pytest.fixture(scope="session")
def samba_service() -> SambaService:
    """Run `scripts/services.sh samba` (idempotent; also part of `up`) and read its exports."""
    if os.geteuid() != 0:
        _unavailable("scripts/services.sh samba must run as root (it installs and starts smbd)")
    state_dir = Path(os.environ.get("CRYOFLOW_SERVICES_DIR", "/var/lib/cryoflow-services"))
    try:
        done = subprocess.run(
            [str(SERVICES_SH), "samba"], capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"scripts/services.sh samba: {exc}")
    if done.returncode != 0:
        _unavailable(f"scripts/services.sh samba exited {done.returncode}: {done.stderr[-2000:]}")
    env = _read_env(state_dir / "samba" / "env")
    return SambaService(
        host=env["CRYOFLOW_SMB_HOST"],
        port=int(env["CRYOFLOW_SMB_PORT"]),
        share=env["CRYOFLOW_SMB_SHARE"],
        user=env["CRYOFLOW_SMB_USER"],
        password=Path(env["CRYOFLOW_SMB_PASSWORD_FILE"]).read_text().strip(),
        share_path=Path(env["CRYOFLOW_SMB_SHARE_PATH"]),
        log=Path(env["CRYOFLOW_SMB_LOG"]),
    )
