"""Files: versions, transient failures, retry_after (commit d6ee2c8).

Versions of a relpath (unique: session, relpath, version), transient failures and their
retry_after, and the (session_id, state) index, as the models had them at commit d6ee2c8.

Existing rows become version 1, not transient, with no retry_after. On SQLite the table is
rebuilt (batch mode) to change its unique constraint; the rows are copied across.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite's unique constraints made by create_all have no names; batch mode reflects the table
# with this naming convention so that the old one can be named, and dropped. The new one is
# named as PostgreSQL names an unnamed one (what create_all made there).
_CONVENTION = {"uq": "uq_%(table_name)s_%(column_0_N_name)s"}
_NEW_UNIQUE = "cryoflow_files_session_id_relpath_version_key"


def _unique_named(columns: list[str]) -> str:
    """The name of cryoflow_files' unique constraint on exactly these columns (an unnamed one
    on SQLite: the name the naming convention gives it in batch mode)."""
    for uq in sa.inspect(op.get_bind()).get_unique_constraints("cryoflow_files"):
        if uq["column_names"] == columns:
            return uq["name"] or "uq_cryoflow_files_" + "_".join(columns)
    raise RuntimeError(f"cryoflow_files has no unique constraint on {columns}")


def upgrade() -> None:
    old_unique = _unique_named(["session_id", "relpath"])
    with op.batch_alter_table("cryoflow_files", naming_convention=_CONVENTION) as batch:
        batch.add_column(
            sa.Column("version", sa.Integer(), nullable=False, server_default=sa.text("1"))
        )
        batch.add_column(
            sa.Column("transient", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("retry_after", sa.DateTime(timezone=True), nullable=True))
        batch.drop_constraint(old_unique, type_="unique")
        batch.create_unique_constraint(_NEW_UNIQUE, ["session_id", "relpath", "version"])
    op.create_index("ix_cryoflow_files_session_state", "cryoflow_files", ["session_id", "state"])


def downgrade() -> None:
    """Fails (unique violation) while a relpath has more than one version."""
    op.drop_index("ix_cryoflow_files_session_state", table_name="cryoflow_files")
    new_unique = _unique_named(["session_id", "relpath", "version"])
    with op.batch_alter_table("cryoflow_files", naming_convention=_CONVENTION) as batch:
        batch.drop_constraint(new_unique, type_="unique")
        batch.create_unique_constraint(
            "cryoflow_files_session_id_relpath_key", ["session_id", "relpath"]
        )
        batch.drop_column("retry_after")
        batch.drop_column("transient")
        batch.drop_column("version")
