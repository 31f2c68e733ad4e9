"""Curation: per-movie verdicts on cryoflow_files, alerts on cryoflow_sessions.

``cryoflow_files.accepted`` (NULL: not decided yet), ``reject_reason`` and ``decided_at``;
``cryoflow_sessions.curation_alerts`` (JSON). Existing rows stay undecided, without alerts.
Columns are only added (nullable), so no table is rebuilt.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("cryoflow_files", sa.Column("accepted", sa.Boolean(), nullable=True))
    op.add_column("cryoflow_files", sa.Column("reject_reason", sa.Text(), nullable=True))
    op.add_column(
        "cryoflow_files", sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("cryoflow_sessions", sa.Column("curation_alerts", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cryoflow_sessions") as batch:
        batch.drop_column("curation_alerts")
    with op.batch_alter_table("cryoflow_files") as batch:
        batch.drop_column("decided_at")
        batch.drop_column("reject_reason")
        batch.drop_column("accepted")
