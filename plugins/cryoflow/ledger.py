"""The session ledger: one row per session, per file and per processing stage.

It is the record of what happened and of what is still owed after any crash: a file is "verified"
only after its copy was checksummed at the destination, so a restarted task re-reads the ledger and
never copies a verified file twice. SQLite by default (WAL, so the triggerer can read while a
worker writes), PostgreSQL in deployment; the same code for both.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


def _values(enum_cls: type[enum.Enum]) -> list[str]:
    return [member.value for member in enum_cls]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class FileState(enum.StrEnum):
    COPYING = "copying"
    VERIFIED = "verified"
    FAILED = "failed"


class StageState(enum.StrEnum):
    SUBMITTED = "submitted"
    DONE = "done"
    FAILED = "failed"


class SessionRow(Base):
    __tablename__ = "cryoflow_sessions"
    __table_args__ = (UniqueConstraint("microscope", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    microscope: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    dest_root: Mapped[str] = mapped_column(Text)
    source_root: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="open")
    close_reason: Mapped[str | None] = mapped_column(Text)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class FileRow(Base):
    __tablename__ = "cryoflow_files"
    __table_args__ = (UniqueConstraint("session_id", "relpath"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("cryoflow_sessions.id"), index=True)
    relpath: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str | None] = mapped_column(String(64))
    dest_path: Mapped[str | None] = mapped_column(Text)
    state: Mapped[FileState] = mapped_column(
        Enum(FileState, native_enum=False, length=16, values_callable=_values)
    )
    batch: Mapped[str | None] = mapped_column(String(250))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    ready_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    copy_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    copy_seconds: Mapped[float | None] = mapped_column(Float)


class StageRow(Base):
    __tablename__ = "cryoflow_stages"
    __table_args__ = (UniqueConstraint("file_id", "stage"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    file_id: Mapped[int] = mapped_column(ForeignKey("cryoflow_files.id"), index=True)
    stage: Mapped[str] = mapped_column(String(32))
    state: Mapped[StageState] = mapped_column(
        Enum(StageState, native_enum=False, length=16, values_callable=_values)
    )
    job_id: Mapped[str | None] = mapped_column(String(64))
    array_index: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    results: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


_ENGINES: dict[str, Engine] = {}


def get_engine(url: str) -> Engine:
    """One engine per URL and process; creates the tables on first use."""
    engine = _ENGINES.get(url)
    if engine is None:
        engine = create_engine(url, pool_pre_ping=True)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(engine)
        _ENGINES[url] = engine
    return engine


class Ledger:
    """Small, explicit operations on the ledger; each is one transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._sessions = sessionmaker(get_engine(url), expire_on_commit=False)

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # ----------------------------------------------------------------- sessions

    def open_session(
        self,
        microscope: str,
        name: str,
        *,
        dest_root: str,
        source_root: str,
        params: dict[str, Any],
    ) -> int:
        """Create the session row, or return the existing one (a session may span many runs)."""
        with self._tx() as s:
            row = s.scalar(
                select(SessionRow).where(
                    SessionRow.microscope == microscope, SessionRow.name == name
                )
            )
            if row is None:
                row = SessionRow(
                    microscope=microscope,
                    name=name,
                    dest_root=dest_root,
                    source_root=source_root,
                    params=params,
                )
                s.add(row)
                s.flush()
            elif row.state == "closed":
                row.state, row.close_reason, row.closed_at = "open", None, None  # reopened
            return row.id

    def get_session(self, session_id: int) -> SessionRow:
        with self._tx() as s:
            row = s.get(SessionRow, session_id)
            if row is None:
                raise KeyError(f"no session with id {session_id}")
            return row

    def close_session(self, session_id: int, reason: str) -> None:
        with self._tx() as s:
            row = s.get(SessionRow, session_id)
            if row is not None and row.state != "closed":
                row.state, row.close_reason, row.closed_at = "closed", reason, utcnow()

    # ----------------------------------------------------------------- files

    def verified_relpaths(self, session_id: int) -> set[str]:
        with self._tx() as s:
            rows = s.scalars(
                select(FileRow.relpath).where(
                    FileRow.session_id == session_id, FileRow.state == FileState.VERIFIED
                )
            )
            return set(rows)

    def done_files(self, session_id: int, max_attempts: int) -> dict[str, tuple[int, int]]:
        """Files the watcher must not offer again: verified, or failed ``max_attempts`` times
        (those wait for a person; the close summary lists them)."""
        with self._tx() as s:
            rows = s.execute(
                select(
                    FileRow.relpath, FileRow.size, FileRow.mtime_ns, FileRow.state, FileRow.attempts
                ).where(FileRow.session_id == session_id)
            )
            return {
                rel: (size, mtime)
                for rel, size, mtime, state, attempts in rows
                if state == FileState.VERIFIED
                or (state == FileState.FAILED and attempts >= max_attempts)
            }

    def files(self, session_id: int, state: FileState | None = None) -> list[FileRow]:
        with self._tx() as s:
            query = select(FileRow).where(FileRow.session_id == session_id)
            if state is not None:
                query = query.where(FileRow.state == state)
            return list(s.scalars(query.order_by(FileRow.id)))

    def begin_copy(
        self,
        session_id: int,
        relpath: str,
        *,
        kind: str,
        size: int,
        mtime_ns: int,
        batch: str,
        ready_at: datetime | None = None,
    ) -> tuple[int, bool]:
        """Record that a copy starts; returns (file id, already verified with the same content)."""
        with self._tx() as s:
            row = s.scalar(
                select(FileRow).where(FileRow.session_id == session_id, FileRow.relpath == relpath)
            )
            if row is None:
                row = FileRow(session_id=session_id, relpath=relpath, attempts=0)
                s.add(row)
            elif row.state == FileState.VERIFIED and row.size == size and row.mtime_ns == mtime_ns:
                return row.id, True
            row.kind, row.size, row.mtime_ns, row.batch = kind, size, mtime_ns, batch
            row.state, row.error = FileState.COPYING, None
            row.attempts = (row.attempts or 0) + 1
            row.ready_at = row.ready_at or ready_at
            row.copy_started_at = utcnow()
            s.flush()
            return row.id, False

    def mark_verified(
        self, file_id: int, *, checksum: str, dest_path: str, copy_seconds: float
    ) -> None:
        with self._tx() as s:
            row = s.get(FileRow, file_id)
            row.state, row.checksum, row.dest_path = FileState.VERIFIED, checksum, dest_path
            row.verified_at, row.copy_seconds, row.error = utcnow(), copy_seconds, None

    def mark_failed(self, file_id: int, error: str) -> None:
        with self._tx() as s:
            row = s.get(FileRow, file_id)
            row.state, row.error = FileState.FAILED, error[:4000]

    def release(self, file_id: int, note: str) -> None:
        """The source was still changing: not an attempt that counts, offer it again later."""
        with self._tx() as s:
            row = s.get(FileRow, file_id)
            row.state, row.error = FileState.FAILED, note[:4000]
            row.attempts = max(0, (row.attempts or 1) - 1)

    def counts(self, session_id: int) -> dict[str, int]:
        with self._tx() as s:
            rows = s.execute(
                select(FileRow.state, func.count())
                .where(FileRow.session_id == session_id)
                .group_by(FileRow.state)
            )
            return {str(state): n for state, n in rows}

    # ----------------------------------------------------------------- stages

    def record_stage(
        self,
        file_id: int,
        stage: str,
        state: StageState,
        *,
        job_id: str | None = None,
        array_index: int | None = None,
        results: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        with self._tx() as s:
            row = s.scalar(
                select(StageRow).where(StageRow.file_id == file_id, StageRow.stage == stage)
            )
            if row is None:
                row = StageRow(file_id=file_id, stage=stage, attempts=0)
                s.add(row)
            if state == StageState.SUBMITTED:
                row.attempts = (row.attempts or 0) + 1
            row.state, row.job_id, row.array_index = state, job_id or row.job_id, array_index
            row.results = results if results is not None else (row.results or {})
            row.error = error

    def stage_counts(self, session_id: int) -> dict[str, dict[str, int]]:
        """{stage: {state: movies}} for a session: what processing achieved so far."""
        with self._tx() as s:
            rows = s.execute(
                select(StageRow.stage, StageRow.state, func.count())
                .join(FileRow, FileRow.id == StageRow.file_id)
                .where(FileRow.session_id == session_id)
                .group_by(StageRow.stage, StageRow.state)
            )
            counts: dict[str, dict[str, int]] = {}
            for stage, state, n in rows:
                counts.setdefault(stage, {})[str(state)] = n
            return counts

    def stages(self, file_ids: Iterable[int]) -> list[StageRow]:
        with self._tx() as s:
            return list(s.scalars(select(StageRow).where(StageRow.file_id.in_(list(file_ids)))))
