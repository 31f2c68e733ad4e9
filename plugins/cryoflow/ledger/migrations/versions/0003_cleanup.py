"""Share cleanup decisions: the cryoflow_cleanup table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cryoflow_cleanup",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("file_id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("microscope", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("run", sa.String(length=250), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["file_id"], ["cryoflow_files.id"]),
        sa.ForeignKeyConstraint(["session_id"], ["cryoflow_sessions.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_cryoflow_cleanup_file_id", "cryoflow_cleanup", ["file_id"])
    op.create_index(
        "ix_cryoflow_cleanup_microscope_file", "cryoflow_cleanup", ["microscope", "file_id"]
    )
    op.create_index("ix_cryoflow_cleanup_session_id", "cryoflow_cleanup", ["session_id"])


def downgrade() -> None:
    op.drop_table("cryoflow_cleanup")
