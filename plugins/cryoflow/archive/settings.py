"""Settings of archive tagging (facility-wide) and share cleanup (per microscope)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchiveConfig(_Model):
    """User extended attributes set on every verified raw file, read by the GPFS ILM policy
    (``config/gpfs/hsm-migrate.pol``: its names and values must agree with these), the optional
    per-session tar of small files, and the optional HSM command step."""

    tagging: bool = Field(True, description="Tag verified raw files for HSM migration.")
    xattr_prefix: str = Field("user.cryoflow.", description="Prefix of the attribute names.")
    archive_class: str = Field("raw", description="Value of the archive-class attribute.")
    aggregate: bool = Field(
        False, description="Bundle a session's small raw files into one tar (tape hates them)."
    )
    aggregate_class: str = Field(
        "aggregate", description="Archive class of the per-session tar of small files."
    )
    aggregate_patterns: tuple[str, ...] = Field(
        ("*.xml", "*.mdoc", "*.jpg", "*.jpeg", "*.png", "*.dm", "*.nav"),
        min_length=1,
        description="File names (fnmatch, any case) that go into the per-session tar.",
    )
    aggregate_max_mib: float = Field(
        64.0, gt=0, description="A matching file larger than this stays out of the tar."
    )
    hsm_mode: Literal["off", "status", "premigrate", "migrate"] = Field(
        "off",
        description="HSM command step: off, status (dsmls only), premigrate or migrate "
        "(dsmmigrate, then dsmls).",
    )
    hsm_ssh_conn_id: str | None = Field(
        None, min_length=1, description="Airflow SSH connection to a node with the HSM client."
    )
    hsm_command_prefix: tuple[str, ...] = Field(
        (), description='Words put before each HSM command, e.g. ["sudo", "-n"].'
    )
    hsm_migrate_command: tuple[str, ...] = Field(("dsmmigrate",), min_length=1)
    hsm_ls_command: tuple[str, ...] = Field(("dsmls",), min_length=1)
    hsm_max_command_bytes: int = Field(
        65536, ge=1024, description="Longest command line sent; more files go in more commands."
    )

    @field_validator("hsm_mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML reads a bare off as false

    @model_validator(mode="after")
    def _hsm_needs_a_node(self) -> ArchiveConfig:
        if self.hsm_mode != "off" and not self.hsm_ssh_conn_id:
            raise ValueError(f"hsm_mode {self.hsm_mode!r} needs hsm_ssh_conn_id (the HSM node)")
        return self


class CleanupConfig(_Model):
    """Freeing the microscope's disk: only what is proven safe at the destination."""

    mode: Literal["off", "dry-run", "delete"] = Field(
        "off", description="off, dry-run (report only) or delete."
    )
    min_age_hours: float = Field(
        48.0, ge=0, description="Only files verified at least this long ago."
    )
    reread_checksum: bool = Field(
        True, description="Re-read the destination's checksum just before deleting."
    )
    max_files_per_run: int = Field(
        2000,
        ge=1,
        description="Most files one run examines (never examined or least recently first), "
        "so a run's checksum re-reads stay bounded.",
    )
