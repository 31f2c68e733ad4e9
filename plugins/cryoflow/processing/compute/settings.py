"""Compute backend settings, as they appear under `compute:` in the facility YAML.

Which backend runs a step is configuration, not code: the operator and the trigger take one of
these models and pick the matching client. `kind` discriminates the union so a YAML mapping
validates into exactly one model, and unknown keys are errors (a typo such as `partion:` must
not silently fall back to a default partition).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

__all__ = [
    "ComputeBackend",
    "LocalBackend",
    "SlurmBackend",
    "parse_backend",
]

# Slurm accepts "minutes", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS".
_TIME_LIMIT = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2})$")
_MEM = re.compile(r"^\d+[KMGT]?$")
_GRES = re.compile(r"^[A-Za-z0-9_]+(:[A-Za-z0-9_.-]+)*(,[A-Za-z0-9_]+(:[A-Za-z0-9_.-]+)*)*$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_MODULE = re.compile(r"^[A-Za-z0-9_.+/@:-]+$")
_SAFE_PATH = re.compile(r"^/[^\s:\x00]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlurmBackend(_Strict):
    """A Slurm cluster reached over SSH (the Airflow connection holds host, user, key, host key)."""

    kind: Literal["slurm"] = "slurm"
    ssh_conn_id: str = Field(min_length=1, description="Airflow SSH connection id")
    partition: str
    account: str | None = None
    qos: str | None = None
    time_limit: str = Field("00:30:00", description="per array task, Slurm time format")
    mem: str | None = Field(None, description="per node, e.g. 8G")
    cpus_per_task: int = Field(1, ge=1, le=1024)
    gres: str | None = Field(None, description="e.g. gpu:1")
    modules: list[str] = Field(default_factory=list, description="`module load` before each task")
    max_parallel: int = Field(8, ge=1, le=10_000, description="%K of --array: tasks at once")
    poll_interval_s: float = Field(30.0, gt=0, le=3600)
    remote_workdir: str = Field(description="absolute directory on the cluster for job files")
    extra_sbatch: list[str] = Field(default_factory=list, description='e.g. ["--constraint=a100"]')

    @field_validator("partition", "account", "qos")
    @classmethod
    def _slurm_name(cls, value: str | None) -> str | None:
        if value is not None and not _SLURM_NAME.match(value):
            raise ValueError(f"{value!r} is not a valid Slurm name (letters, digits, _.+-)")
        return value

    @field_validator("time_limit")
    @classmethod
    def _time_limit(cls, value: str) -> str:
        if not _TIME_LIMIT.match(value):
            raise ValueError(
                f"time_limit {value!r} is not a Slurm time (MM, MM:SS, HH:MM:SS or D-HH:MM:SS)"
            )
        return value

    @field_validator("mem")
    @classmethod
    def _mem(cls, value: str | None) -> str | None:
        if value is not None and not _MEM.match(value):
            raise ValueError(f"mem {value!r} must be a number with an optional K/M/G/T suffix")
        return value

    @field_validator("gres")
    @classmethod
    def _gres(cls, value: str | None) -> str | None:
        if value is not None and not _GRES.match(value):
            raise ValueError(f"gres {value!r} must look like 'gpu:1' or 'gpu:a100:2'")
        return value

    @field_validator("modules")
    @classmethod
    def _modules(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _MODULE.match(name):
                raise ValueError(f"module {name!r} is not a module name (e.g. 'motioncor2/1.6.4')")
        return value

    @field_validator("remote_workdir")
    @classmethod
    def _workdir(cls, value: str) -> str:
        if not _SAFE_PATH.match(value) or "/../" in f"{value}/":
            raise ValueError(
                f"remote_workdir {value!r} must be an absolute path without spaces, ':' or '..'"
            )
        return value.rstrip("/") or "/"

    @field_validator("extra_sbatch")
    @classmethod
    def _extra(cls, value: list[str]) -> list[str]:
        for option in value:
            if not option.startswith("-") or any(c in option for c in "\n\r\x00 \t"):
                raise ValueError(
                    f"extra_sbatch entry {option!r} must be one sbatch option such as "
                    "'--constraint=a100' (no whitespace)"
                )
        return value


class LocalBackend(_Strict):
    """Runs array tasks on this machine (embedded demo, no Slurm), with the same job script."""

    kind: Literal["local"] = "local"
    max_parallel: int = Field(2, ge=1, le=256)
    workdir: str = Field(description="absolute local directory for job files")
    poll_interval_s: float = Field(2.0, gt=0, le=3600)

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str) -> str:
        if not _SAFE_PATH.match(value) or "/../" in f"{value}/":
            raise ValueError(
                f"workdir {value!r} must be an absolute path without spaces, ':' or '..'"
            )
        return value.rstrip("/") or "/"


ComputeBackend = Annotated[SlurmBackend | LocalBackend, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[SlurmBackend | LocalBackend] = TypeAdapter(ComputeBackend)


def parse_backend(
    data: SlurmBackend | LocalBackend | dict[str, Any], *, where: str = "compute"
) -> SlurmBackend | LocalBackend:
    """Validate a backend mapping; errors name the YAML location (`where`) and each bad key."""
    if isinstance(data, SlurmBackend | LocalBackend):
        return data
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(err, where) for err in exc.errors())
        raise ValueError(f"invalid compute backend: {problems}") from None


def _describe(err: Any, where: str) -> str:
    if err["type"] == "union_tag_not_found":
        return f"{where}: missing key 'kind' (one of: slurm, local)"
    if err["type"] == "union_tag_invalid":
        return f"{where}.kind: {err['input'].get('kind')!r} is not one of: slurm, local"
    key = ".".join(str(part) for part in err["loc"][1:])
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}.{key}: {message}" if key else f"{where}: {message}"
