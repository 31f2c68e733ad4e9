"""Creates and upgrades the ledger's schema: Alembic migrations (``cryoflow/ledger/migrations``),
run by :func:`upgrade` when a process first opens a ledger
(:func:`cryoflow.ledger.store.get_engine`).

- When the ledger is at the newest revision, :func:`upgrade` costs one query.
- Otherwise it takes a lock first, so that processes starting together migrate once and the others
  wait for it: on PostgreSQL a transaction-level advisory lock, with every migration step in that
  transaction (PostgreSQL's DDL is transactional); on SQLite an exclusive transaction
  (``BEGIN EXCLUSIVE``) on the database file, holding the whole migration.
- A ledger made by ``create_all`` before migrations existed (its tables, no version table) is
  recognised by its columns as one of the schemas that code made (revisions 0001 to
  0004), stamped at that revision and upgraded from there, rows kept. One whose columns match none
  of them is refused with the difference, untouched.
- The revision lives in ``cryoflow_alembic_version``, not ``alembic_version``: the ledger may share
  a PostgreSQL database with Airflow's own tables.

By hand (``--url`` defaults to the facility configuration's ``storage.ledger_url``)::

    python -m cryoflow.ledger.schema current|upgrade|check [--url URL]
    python -m cryoflow.ledger.schema revision -m "what changes"   # a new revision from the models
"""

from __future__ import annotations

import argparse
import logging
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Index, MetaData, Table, create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
VERSION_TABLE = "cryoflow_alembic_version"
TABLE_PREFIX = "cryoflow_"
# pg_advisory_xact_lock key (a signed 64-bit integer) of ledger migrations; advisory locks are
# per database, so ledgers in other databases of the same server do not wait for each other.
PG_LOCK_KEY = zlib.crc32(b"cryoflow ledger migrations")
# How long a process waits for another one's migration of a SQLite ledger (busy_timeout, ms).
SQLITE_LOCK_WAIT_MS = 15 * 60 * 1000


class LedgerSchemaError(RuntimeError):
    """The ledger's tables are none that cryoflow made: not migrated, a person must look."""


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Only the ledger's own tables are compared (the database may hold Airflow's too)."""
    if type_ == "table":
        return bool(name) and name.startswith(TABLE_PREFIX) and name != VERSION_TABLE
    return True


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the ledger; ``connection`` is what env.py migrates."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    return config


@cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _script().get_current_head()
    assert head is not None, f"no revisions in {MIGRATIONS_DIR}"
    return head


def current_revision(connection: Connection) -> str | None:
    """The ledger's revision, None when it has no version table (new, or from before)."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    revisions = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars()
    found = list(revisions)
    if len(found) > 1:
        raise LedgerSchemaError(f"{VERSION_TABLE} holds several revisions: {found}")
    return found[0] if found else None


def schema_diff(connection: Connection) -> list[Any]:
    """What differs between the ledger's tables and the models (empty: they agree), as
    ``alembic check`` reports it."""
    from cryoflow.ledger.store import Base

    context = MigrationContext.configure(
        connection,
        opts={"version_table": VERSION_TABLE, "include_name": include_name, "compare_type": True},
    )
    return list(compare_metadata(context, Base.metadata))


def safe_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def upgrade(engine: Engine) -> None:
    """Bring the ledger at ``engine`` to the newest revision (see the module's docstring)."""
    head = head_revision()
    with engine.connect() as conn:
        if current_revision(conn) == head:
            return
    started = time.monotonic()
    with _migration_lock(engine) as conn:
        before = current_revision(conn)  # again: another process may have migrated meanwhile
        if before == head:
            return
        if before is not None and not _known(before):
            log.warning(
                "Ledger %s is at revision %s, which this cryoflow does not know (its newest is "
                "%s): a newer cryoflow migrated it; not migrating",
                safe_url(engine), before, head,
            )  # fmt: skip
            return
        if before is None:
            before = _adopt(conn, safe_url(engine))
        command.upgrade(alembic_config(conn), "head")
    log.info(
        "Ledger %s: schema %s -> %s in %.1f s",
        safe_url(engine), before or "(new)", head, time.monotonic() - started,
    )  # fmt: skip


def _known(revision: str) -> bool:
    try:
        return _script().get_revision(revision) is not None
    except CommandError:  # an id of a newer cryoflow's revision
        return False


# --------------------------------------------------------------------------- the lock


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that no other process's migration holds at the same time;
    committed when the block ends (rolled back when it raises)."""
    url = engine.url
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
            yield conn
    elif engine.dialect.name == "sqlite" and not _sqlite_in_memory(url.database, url.query):
        migrator = create_engine(url, poolclass=NullPool)
        event.listen(migrator, "connect", _sqlite_migration_pragmas)
        event.listen(migrator, "begin", lambda conn: conn.exec_driver_sql("BEGIN EXCLUSIVE"))
        try:
            with migrator.begin() as conn:
                yield conn
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise LedgerSchemaError(f"migration broke foreign keys: {broken[:10]}")
        finally:
            migrator.dispose()
    else:  # an in-memory SQLite database is this process's alone
        with engine.begin() as conn:
            yield conn


def _sqlite_in_memory(database: str | None, query: Any) -> bool:
    return database in (None, "", ":memory:") or query.get("mode") == "memory"


def _sqlite_migration_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # the driver begins nothing by itself: BEGIN EXCLUSIVE does
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={SQLITE_LOCK_WAIT_MS}")  # first: waits for the others
    cur.execute("PRAGMA journal_mode=WAL")
    # A table rebuilt in batch mode is dropped and renamed while others refer to it; foreign
    # keys are checked once at the end instead (PRAGMA foreign_key_check).
    cur.execute("PRAGMA foreign_keys=OFF")
    cur.close()


# --------------------------------------------------------------------------- before migrations


def _ledger_tables(conn: Connection) -> set[str]:
    return {t for t in inspect(conn).get_table_names() if include_name(t, "table", None)}


@cache
def _schema_at(revision: str) -> dict[str, tuple[frozenset[str], dict[str, list[str]]]]:
    """{table: (column names, {index name: columns})} of the ledger at ``revision``, read from
    a scratch in-memory database migrated to it."""
    scratch = create_engine("sqlite://")
    try:
        with scratch.begin() as conn:
            command.upgrade(alembic_config(conn), revision)
            insp = inspect(conn)
            return {
                table: (
                    frozenset(c["name"] for c in insp.get_columns(table)),
                    {i["name"]: list(i["column_names"]) for i in insp.get_indexes(table)},
                )
                for table in _ledger_tables(conn)
            }
    finally:
        scratch.dispose()


def _adopt(conn: Connection, where: str) -> str | None:
    """Stamp a ledger that ``create_all`` made before migrations at the revision whose schema
    it has; None for a new, empty database."""
    tables = _ledger_tables(conn)
    if not tables:
        return None
    insp = inspect(conn)
    files = set()
    if "cryoflow_files" in tables:
        files = {c["name"] for c in insp.get_columns("cryoflow_files")}
    revision = (
        "0005"
        if "archived_at" in files
        else "0004"
        if "accepted" in files
        else "0003"
        if "cryoflow_cleanup" in tables
        else "0002"
        if "version" in files
        else "0001"
    )
    expected = _schema_at(revision)
    found = {t: frozenset(c["name"] for c in insp.get_columns(t)) for t in tables}
    problems = [f"table {t} missing" for t in sorted(expected.keys() - found.keys())]
    problems += [f"table {t} unexpected" for t in sorted(found.keys() - expected.keys())]
    for table in sorted(expected.keys() & found.keys()):
        if missing := sorted(expected[table][0] - found[table]):
            problems.append(f"{table} lacks {', '.join(missing)}")
        if extra := sorted(found[table] - expected[table][0]):
            problems.append(f"{table} has unknown {', '.join(extra)}")
    if problems:
        raise LedgerSchemaError(
            f"ledger {where} has tables but no {VERSION_TABLE}, and they are not the schema of "
            f"revision {revision} that cryoflow made before migrations: {'; '.join(problems)}"
        )
    # Ledgers made before the indexes of their revision existed (e.g. before commit 1ad92a0)
    # get them now; a missing index is the only difference tolerated.
    for table, (_, indexes) in expected.items():
        have = {i["name"] for i in insp.get_indexes(table)}
        for name, columns in indexes.items():
            if name not in have:
                reflected = Table(table, MetaData(), autoload_with=conn)
                Index(name, *(reflected.c[c] for c in columns)).create(conn)
                log.warning("Ledger %s: created the missing index %s", where, name)
    command.stamp(alembic_config(conn), revision)
    log.warning(
        "Ledger %s predates migrations: its tables are revision %s's; stamped it", where, revision
    )
    return revision


# --------------------------------------------------------------------------- by hand


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cryoflow.ledger.schema", description=__doc__)
    parser.add_argument("action", choices=["current", "upgrade", "check", "revision"])
    parser.add_argument("--url", help="ledger URL (default: the facility's storage.ledger_url)")
    parser.add_argument("-m", "--message", help="revision: what the new revision changes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from cryoflow.ledger.store import resolve_url

    url = args.url
    if url is None:
        from cryoflow.config import load_site

        url = load_site().facility.storage.ledger_url
    engine = create_engine(resolve_url(url))
    try:
        if args.action == "upgrade":
            upgrade(engine)
        with engine.connect() as conn:
            current = current_revision(conn)
            print(f"{safe_url(engine)}: revision {current} (newest {head_revision()})")
            if args.action == "check":
                diff = schema_diff(conn)
                for item in diff:
                    print(f"  differs from the models: {item}")
                return 1 if diff or current != head_revision() else 0
        if args.action == "revision":
            if not args.message:
                parser.error("revision needs -m MESSAGE")
            with _migration_lock(engine) as conn:
                rev_id = f"{int(head_revision()) + 1:04d}"
                command.revision(
                    alembic_config(conn), args.message, autogenerate=True, rev_id=rev_id
                )
        return 0
    finally:
        engine.dispose()


if __name__ == "__main__":
    raise SystemExit(main())
