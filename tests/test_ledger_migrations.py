"""The ledger's schema comes from its Alembic migrations, on SQLite and PostgreSQL: a new ledger
gets exactly the models' schema, a ledger made before migrations is recognised and upgraded in
place with its rows, processes opening a ledger together migrate it once, and a ledger already
at the newest revision costs no lock."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import multiprocessing
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.operations import Operations
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.exc import IntegrityError

from cryoflow.ledger import schema as ledger_schema
from cryoflow.ledger.schema import VERSION_TABLE, LedgerSchemaError
from cryoflow.ledger.store import _ENGINES, Base, Ledger, get_engine, resolve_url
from tests.test_ledger import _postgres_url

TABLES = ("cryoflow_cleanup", "cryoflow_stages", "cryoflow_files", "cryoflow_sessions")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database; no engine of this process knows it yet."""
    if request.param == "sqlite":
        db = f"sqlite:///{tmp_path}/ledger.db"
        yield db
        if db in _ENGINES:
            _ENGINES.pop(db).dispose()
    else:
        yield from _postgres_url()


def _raw(url: str) -> Engine:
    """An engine of the test's own, not get_engine's (which migrates)."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", lambda c, _r: c.execute("PRAGMA foreign_keys=ON"))
    return engine


def _migrate_to(url: str, revision: str, *, keep_version: bool = True) -> None:
    """Run the migrations up to ``revision``; without the version table after it, the database
    looks like one that create_all made at that revision, before migrations existed."""
    engine = _raw(url)
    with ledger_schema._migration_lock(engine) as conn:
        command.upgrade(ledger_schema.alembic_config(conn), revision)
        if not keep_version:
            conn.execute(text(f"DROP TABLE {VERSION_TABLE}"))
    engine.dispose()


def _revision(url: str) -> str | None:
    engine = _raw(url)
    with engine.connect() as conn:
        revision = ledger_schema.current_revision(conn)
    engine.dispose()
    return revision


def _shape(engine: Engine) -> dict[str, Any]:
    """Unique constraints (by columns) and indexes (by name) of the ledger's tables: checked on
    their own, since comparing metadata does not see an unnamed unique constraint on SQLite."""
    insp = inspect(engine)
    shape = {}
    for table in sorted(insp.get_table_names()):
        if not ledger_schema.include_name(table, "table", None):
            continue
        uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints(table)}
        indexes = {
            (i["name"], tuple(i["column_names"]), bool(i["unique"]))
            for i in insp.get_indexes(table)
            if not i.get("duplicates_constraint")  # PostgreSQL's index behind a UNIQUE
        }
        fks = {
            (tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
            for f in insp.get_foreign_keys(table)
        }
        shape[table] = (uniques, indexes, fks)
    return shape


def _models_shape(url: str, tmp_path: Path) -> dict[str, Any]:
    """_shape of what create_all makes from today's models, on the same kind of database."""
    if url.startswith("sqlite"):
        engine = create_engine(f"sqlite:///{tmp_path}/models.db")
        Base.metadata.create_all(engine)
        try:
            return _shape(engine)
        finally:
            engine.dispose()
    shape: dict[str, Any] = {}
    for other in _postgres_url():  # to its end: the generator drops the database
        engine = create_engine(other)
        Base.metadata.create_all(engine)
        shape = _shape(engine)
        engine.dispose()
    return shape


def _check_at_head(url: str, tmp_path: Path) -> None:
    engine = _raw(url)
    try:
        with engine.connect() as conn:
            assert ledger_schema.current_revision(conn) == ledger_schema.head_revision()
            assert ledger_schema.schema_diff(conn) == []
        assert _shape(engine) == _models_shape(url, tmp_path)
        assert not inspect(engine).has_table("alembic_version")  # Airflow's name is left alone
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- new ledgers


def test_new_ledger_gets_the_models_schema_from_the_migrations(url: str, tmp_path: Path) -> None:
    get_engine(url)
    _check_at_head(url, tmp_path)
    ledger = Ledger(url)  # and it works
    sid = ledger.open_session("krios1", "s1", dest_root="/d", source_root="/s", params={})
    assert ledger.get_session(sid).name == "s1"


def test_sqlite_pragmas_are_kept(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/ledger.db"
    with get_engine(db).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    _ENGINES.pop(db).dispose()


def test_in_memory_sqlite_ledger_is_migrated_too() -> None:
    engine = get_engine("sqlite://")
    try:
        with engine.connect() as conn:
            assert ledger_schema.current_revision(conn) == ledger_schema.head_revision()
            assert ledger_schema.schema_diff(conn) == []
    finally:
        _ENGINES.pop("sqlite://").dispose()


def test_downgrade_to_nothing_and_up_again(url: str, tmp_path: Path) -> None:
    _migrate_to(url, "head")
    engine = _raw(url)
    with ledger_schema._migration_lock(engine) as conn:
        command.downgrade(ledger_schema.alembic_config(conn), "base")
    assert set(inspect(engine).get_table_names()) <= {VERSION_TABLE}
    engine.dispose()
    get_engine(url)
    _check_at_head(url, tmp_path)


# --------------------------------------------------------------------------- existing ledgers


def _old_rows(url: str) -> None:
    """Rows as the 54d6be7 code wrote them: a session, two files, a stage of each."""
    engine = _raw(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO cryoflow_sessions (id, microscope, name, dest_root, source_root, "
                "params, state, opened_at, summary_final) VALUES (1, 'krios1', 's1', '/d', '/s', "
                "'{}', 'open', '2026-12-01 10:00:00+00:00', false)"
            )
        )
        for fid, rel in ((1, "a.tif"), (2, "b.tif")):
            conn.execute(
                text(
                    "INSERT INTO cryoflow_files (id, session_id, relpath, kind, size, mtime_ns, "
                    "checksum, state, attempts) VALUES (:id, 1, :rel, 'movie', 10, 5, 'x', "
                    "'verified', 1)"
                ),
                {"id": fid, "rel": rel},
            )
            conn.execute(
                text(
                    "INSERT INTO cryoflow_stages (file_id, session_id, microscope, stage, state, "
                    "attempts, results, updated_at) VALUES (:id, 1, 'krios1', 'motioncor', "
                    "'pending', 0, '{}', '2026-12-01 10:00:00+00:00')"
                ),
                {"id": fid},
            )
        if engine.dialect.name == "postgresql":  # ids given above: move the sequences on
            for table in ("cryoflow_sessions", "cryoflow_files"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 10)"))
    engine.dispose()


@pytest.mark.parametrize("stamped", [False, True], ids=["made-by-create_all", "stamped"])
def test_ledger_of_54d6be7_upgrades_in_place_keeping_its_rows(
    url: str, tmp_path: Path, stamped: bool
) -> None:
    _migrate_to(url, "0001", keep_version=stamped)
    _old_rows(url)
    get_engine(url)
    _check_at_head(url, tmp_path)
    engine = _raw(url)
    with engine.begin() as conn:
        files = conn.execute(
            text(
                "SELECT id, relpath, state, version, transient, retry_after FROM cryoflow_files "
                "ORDER BY id"
            )
        ).all()
        assert [tuple(f) for f in files] == [
            (1, "a.tif", "verified", 1, False, None),
            (2, "b.tif", "verified", 1, False, None),
        ]
        stages = conn.execute(text("SELECT file_id, state FROM cryoflow_stages ORDER BY file_id"))
        assert [tuple(s) for s in stages] == [(1, "pending"), (2, "pending")]
        if engine.dialect.name == "sqlite":  # the rebuilt files table is still referred to
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
    # the new unique constraint: a second version of a relpath, never the same version twice
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO cryoflow_files (session_id, relpath, version, kind, size, mtime_ns, "
                "state, attempts, transient) VALUES (1, 'a.tif', 2, 'movie', 11, 6, 'copying', "
                "0, false)"
            )
        )
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO cryoflow_files (session_id, relpath, version, kind, size, mtime_ns, "
                "state, attempts, transient) VALUES (1, 'a.tif', 2, 'movie', 12, 7, 'copying', "
                "0, false)"
            )
        )
    engine.dispose()
    # and the ledger's own code reads the old rows
    ledger = Ledger(url)
    assert ledger.done_files(1, 3) == {"a.tif": (10, 5), "b.tif": (10, 5)}
    assert ledger.stage_counts(1) == {"motioncor": {"pending": 2}}


def test_a_failed_upgrade_leaves_the_ledger_as_it_was(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step runs in the one locked transaction: a failure in the last one undoes the
    table rebuild of the one before."""
    _migrate_to(url, "0001")
    _old_rows(url)
    create_table = Operations.create_table

    def failing(self: Operations, name: str, *args: Any, **kw: Any) -> Any:
        if name == "cryoflow_cleanup":
            raise RuntimeError("disk full")
        return create_table(self, name, *args, **kw)

    monkeypatch.setattr(Operations, "create_table", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        get_engine(url)
    assert _revision(url) == "0001"
    engine = _raw(url)
    assert sorted(inspect(engine).get_table_names()) == sorted(
        [VERSION_TABLE, "cryoflow_files", "cryoflow_sessions", "cryoflow_stages"]
    )
    assert "version" not in {c["name"] for c in inspect(engine).get_columns("cryoflow_files")}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM cryoflow_files")).scalar() == 2
    engine.dispose()
    monkeypatch.undo()
    get_engine(url)  # and the next process upgrades it
    assert _revision(url) == ledger_schema.head_revision()


def test_ledger_of_d6ee2c8_is_stamped_at_0002_and_upgraded(url: str, tmp_path: Path) -> None:
    _migrate_to(url, "0002", keep_version=False)
    get_engine(url)
    _check_at_head(url, tmp_path)


def test_ledger_made_by_todays_create_all_is_stamped_without_changes(
    url: str, tmp_path: Path
) -> None:
    engine = _raw(url)
    Base.metadata.create_all(engine)
    before = _shape(engine)
    engine.dispose()
    get_engine(url)
    _check_at_head(url, tmp_path)
    engine = _raw(url)
    assert _shape(engine) == before
    engine.dispose()


def test_ledger_from_before_an_index_existed_gets_it(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/ledger.db"  # the schema before commit 1ad92a0
    _migrate_to(db, "0001", keep_version=False)
    engine = _raw(db)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_cryoflow_files_session_touched"))
    engine.dispose()
    get_engine(db)
    _check_at_head(db, tmp_path)
    _ENGINES.pop(db).dispose()


def test_tables_cryoflow_did_not_make_are_refused_untouched(url: str) -> None:
    engine = _raw(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE cryoflow_sessions (id INTEGER PRIMARY KEY, name TEXT)"))
    with pytest.raises(LedgerSchemaError, match="cryoflow_sessions lacks"):
        get_engine(url)
    assert url not in _ENGINES  # not kept: the next call tries again
    assert set(inspect(engine).get_table_names()) == {"cryoflow_sessions"}
    engine.dispose()


def _logged(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> str:
    """What was logged: through logging, or to standard output once Airflow's logging is set
    up (it is after anything imported the task SDK)."""
    out = capsys.readouterr()
    return caplog.text + out.out + out.err


def test_a_newer_cryoflows_revision_is_left_alone(
    url: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    _migrate_to(url, "head")
    engine = _raw(url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    with caplog.at_level(logging.WARNING, logger="cryoflow.ledger.schema"):
        get_engine(url)
    assert "does not know" in _logged(caplog, capsys)
    assert _revision(url) == "9999"


def test_at_head_costs_no_lock_and_no_ddl(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _migrate_to(url, "head")

    def no_lock(engine: Engine) -> None:
        raise AssertionError("took the migration lock of a ledger already at head")

    monkeypatch.setattr(ledger_schema, "_migration_lock", no_lock)
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", seen)
    try:
        get_engine(url)
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    assert len([s for s in statements if "cryoflow" in s]) <= 2, statements
    assert not [s for s in statements if s.lstrip().upper().startswith(("CREATE", "ALTER"))]


# --------------------------------------------------------------------------- processes


def _open_in_process(url: str, barrier: Any, results: Any, n: int) -> None:
    try:
        barrier.wait(timeout=60)
        ledger = Ledger(url)
        sid = ledger.open_session("krios1", f"s{n}", dest_root="/d", source_root="/s", params={})
        results.put((n, "ok", sid))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((n, "error", repr(exc)))


def test_processes_opening_a_new_ledger_together_all_succeed(url: str, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    n = 3
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_open_in_process, args=(url, barrier, results, i)) for i in range(n)
    ]
    for proc in procs:
        proc.start()
    outcomes = sorted(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert [(i, status) for i, status, _ in outcomes] == [(i, "ok") for i in range(n)], outcomes
    assert len({sid for _, _, sid in outcomes}) == n
    engine = _raw(url)
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar() == 1
    engine.dispose()
    _check_at_head(url, tmp_path)


# --------------------------------------------------------------------------- Airflow


def test_ledger_url_from_an_airflow_connection(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for pg_url in _postgres_url():
        database = pg_url.rsplit("/", 1)[1]
        conn_id = f"cryoflow_ledger_{uuid.uuid4().hex[:6]}"
        # PostgreSQL here trusts local connections: the password is sent, and ignored
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id.upper()}",
            f"postgresql://postgres:n0t-4-l0g@127.0.0.1:5432/{database}",
        )
        url = f"airflow-conn://{conn_id}"
        assert resolve_url(url) == (
            f"postgresql+psycopg://postgres:n0t-4-l0g@127.0.0.1:5432/{database}"
        )
        with caplog.at_level(logging.DEBUG):
            engine = get_engine(url)
            sid = Ledger(url).open_session(
                "krios1", "s1", dest_root="/d", source_root="/s", params={}
            )
        assert sid == 1 and engine.url.database == database
        logged = _logged(caplog, capsys)
        assert "n0t-4-l0g" not in logged
        assert "postgres:***@127.0.0.1" in logged  # the URL it logged, password hidden
        _ENGINES.pop(url).dispose()


def test_other_urls_are_themselves() -> None:
    assert resolve_url("sqlite:////var/lib/ledger.db") == "sqlite:////var/lib/ledger.db"


def test_env_py_is_harmless_when_airflow_loads_plugins() -> None:
    """Airflow imports every .py file under plugins/ as a plugin module."""
    path = Path(ledger_schema.MIGRATIONS_DIR, "env.py")
    loader = importlib.machinery.SourceFileLoader("env", str(path))
    spec = importlib.util.spec_from_loader("env", loader)
    assert spec is not None
    loader.exec_module(importlib.util.module_from_spec(spec))
    for revision in Path(ledger_schema.MIGRATIONS_DIR, "versions").glob("0*.py"):
        loader = importlib.machinery.SourceFileLoader(revision.stem, str(revision))
        spec = importlib.util.spec_from_loader(revision.stem, loader)
        assert spec is not None
        loader.exec_module(importlib.util.module_from_spec(spec))


def test_migrations_are_shipped_as_package_data() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert (
        "script.py.mako"
        in project["tool"]["setuptools"]["package-data"]["cryoflow.ledger.migrations"]
    )
    assert any(dep.startswith("alembic==") for dep in project["project"]["dependencies"])
    for package in ("ledger/migrations", "ledger/migrations/versions"):
        assert (root / "plugins" / "cryoflow" / package / "__init__.py").is_file()
