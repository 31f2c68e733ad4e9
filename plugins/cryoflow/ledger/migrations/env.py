"""Alembic environment of the ledger. It runs only on a connection handed over by
:mod:`cryoflow.ledger.schema` (which holds the migration lock): use
``python -m cryoflow.ledger.schema upgrade|current|check|revision``, not the ``alembic`` command.

Airflow imports every ``.py`` file under ``plugins/`` when it loads plugins; outside a migration
this module therefore does nothing.
"""

from __future__ import annotations

from alembic import context


def _run() -> None:
    from cryoflow.ledger.schema import VERSION_TABLE, include_name
    from cryoflow.ledger.store import Base

    connection = context.config.attributes.get("connection")
    if connection is None or context.is_offline_mode():
        raise RuntimeError(
            "the ledger's migrations run through cryoflow.ledger.schema (python -m "
            "cryoflow.ledger.schema upgrade --url URL), which locks the database first"
        )
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,  # not alembic_version: the database may be Airflow's too
        include_name=include_name,
        compare_type=True,
        render_as_batch=True,  # new revisions alter tables the way SQLite can
    )
    with context.begin_transaction():
        context.run_migrations()


try:
    context.config  # noqa: B018 - set only while Alembic runs this file
except (AttributeError, NameError):  # imported by Airflow's plugin loader, not by Alembic
    pass
else:
    _run()
