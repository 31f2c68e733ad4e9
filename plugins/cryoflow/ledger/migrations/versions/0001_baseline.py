"""Baseline: the ledger of commit 54d6be7.

The tables, constraints and indexes that ``Base.metadata.create_all`` made at commit 54d6be7,
the last schema before migrations; a ledger made by that code is stamped at this revision (see
``cryoflow.ledger.schema``) and upgraded from here.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cryoflow_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("microscope", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("dest_root", sa.Text(), nullable=False),
        sa.Column("source_root", sa.Text(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("close_reason", sa.Text(), nullable=True),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_requested", sa.Text(), nullable=True),
        sa.Column("watch_state", sa.JSON(), nullable=True),
        sa.Column("summary_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("summary_final", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("microscope", "name"),
    )
    op.create_table(
        "cryoflow_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("relpath", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("checksum", sa.String(length=64), nullable=True),
        sa.Column("dest_path", sa.Text(), nullable=True),
        # FileState, a non-native enum without CHECK: VARCHAR(16), values checked in Python
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("batch", sa.String(length=250), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("copy_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("copy_seconds", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["session_id"], ["cryoflow_sessions.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("session_id", "relpath"),
    )
    op.create_index("ix_cryoflow_files_session_id", "cryoflow_files", ["session_id"])
    op.create_index(
        "ix_cryoflow_files_session_kind", "cryoflow_files", ["session_id", "kind", "state"]
    )
    op.create_index(
        "ix_cryoflow_files_session_touched", "cryoflow_files", ["session_id", "copy_started_at"]
    )
    op.create_table(
        "cryoflow_stages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("file_id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("microscope", sa.String(length=64), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=False),
        # StageState, a non-native enum without CHECK, as FileState
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("job_dir", sa.Text(), nullable=True),
        sa.Column("array_index", sa.Integer(), nullable=True),
        sa.Column("claimed_by", sa.String(length=300), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("results", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["file_id"], ["cryoflow_files.id"]),
        sa.ForeignKeyConstraint(["session_id"], ["cryoflow_sessions.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("file_id", "stage"),
    )
    op.create_index("ix_cryoflow_stages_file_id", "cryoflow_stages", ["file_id"])
    op.create_index("ix_cryoflow_stages_owed", "cryoflow_stages", ["microscope", "stage", "state"])
    op.create_index("ix_cryoflow_stages_session_id", "cryoflow_stages", ["session_id"])


def downgrade() -> None:
    op.drop_table("cryoflow_stages")  # its indexes go with it
    op.drop_table("cryoflow_files")
    op.drop_table("cryoflow_sessions")
