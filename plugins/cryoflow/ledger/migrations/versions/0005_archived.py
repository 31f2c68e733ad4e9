"""Archive: when a verified copy's archive tags were set and read back (cryoflow_files).

``cryoflow_files.archived_at`` (NULL: not tagged, or tagging is off or failed): the session
view's "archived" count and the sign that the GPFS policy will take the file to tape. Existing
rows stay NULL (their tags are on the files; the summary reads them from there). Only a nullable
column is added, so no table is rebuilt.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "cryoflow_files", sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("cryoflow_files") as batch:
        batch.drop_column("archived_at")
