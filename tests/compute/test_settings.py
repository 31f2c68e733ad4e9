"""Compute backend settings: what the facility YAML may say, and clear errors when it is wrong."""

from __future__ import annotations

import pytest

from cryoflow.processing.compute.settings import LocalBackend, SlurmBackend, parse_backend

SLURM = {
    "kind": "slurm",
    "ssh_conn_id": "hpc_login",
    "partition": "gpu",
    "remote_workdir": "/gpfs/cryoflow/jobs/",
}


def test_slurm_mapping_validates_with_physical_defaults() -> None:
    backend = parse_backend({**SLURM, "gres": "gpu:1", "modules": ["motioncor2/1.6.4"]})
    assert isinstance(backend, SlurmBackend)
    assert backend.time_limit == "00:30:00"
    assert backend.cpus_per_task == 1
    assert backend.remote_workdir == "/gpfs/cryoflow/jobs"  # trailing slash dropped
    assert backend.modules == ["motioncor2/1.6.4"]


def test_local_mapping_validates() -> None:
    backend = parse_backend({"kind": "local", "workdir": "/tmp/cryoflow-jobs", "max_parallel": 3})
    assert isinstance(backend, LocalBackend)
    assert backend.max_parallel == 3


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"partion": "cpu"}, "compute.partion: Extra inputs are not permitted"),
        ({"time_limit": "1h"}, "time_limit '1h' is not a Slurm time"),
        ({"remote_workdir": "jobs"}, "remote_workdir 'jobs' must be an absolute path"),
        ({"remote_workdir": "/a/../etc"}, "remote_workdir '/a/../etc'"),
        ({"extra_sbatch": ["--constraint a100"]}, "extra_sbatch entry '--constraint a100'"),
        ({"gres": "gpu 1"}, "gres 'gpu 1'"),
        ({"max_parallel": 0}, "compute.max_parallel: Input should be greater than or equal to 1"),
        ({"kind": "pbs"}, "compute.kind: 'pbs' is not one of: slurm, local"),
        ({"kind": None}, "compute.kind: None is not one of"),
    ],
)
def test_bad_values_are_named_in_the_error(change: dict, expected: str) -> None:
    with pytest.raises(ValueError, match="invalid compute backend") as info:
        parse_backend({**SLURM, **change}, where="compute")
    assert expected in str(info.value)


def test_missing_kind_says_which_kinds_exist() -> None:
    with pytest.raises(ValueError, match=r"facility.yaml:compute: missing key 'kind' \(one of"):
        parse_backend({"partition": "gpu"}, where="facility.yaml:compute")
