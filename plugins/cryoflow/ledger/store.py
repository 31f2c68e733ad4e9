"""The session ledger: one row per session, per file and per processing stage.

It is the one record of what happened and of what is still owed after any crash, retry or kill:
a file is "verified" only after its copy was checksummed at the destination, and a verified movie
gets a ``pending`` stage row for each processing step it owes. Processing runs claim owed rows,
record the job that took them, and settle them from the outputs; nothing that recovery needs
lives in a run's XCom. Queries are keyed by indexes so per-batch work does not grow with the
session. SQLite by default (WAL, so the triggerer can read while a worker writes), PostgreSQL in
deployment; the same code for both.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from cryoflow.names import from_text, to_text


def _values(enum_cls: type[enum.Enum]) -> list[str]:
    return [member.value for member in enum_cls]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class FsName(TypeDecorator[str]):
    """A file-system name or path as text, lossless for names that are not valid UTF-8."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else to_text(value)

    def process_result_value(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else from_text(value)


class FileState(enum.StrEnum):
    COPYING = "copying"
    VERIFIED = "verified"
    FAILED = "failed"  # owed: offered again after ``retry_after`` (see ``done_files``)
    INCOMPLETE = "incomplete"  # its writer stopped before the file was whole: not copied


class StageState(enum.StrEnum):
    PENDING = "pending"  # owed: no run has it
    SUBMITTED = "submitted"  # claimed by a processing run (job_id once its job is submitted)
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
    # An operator asked to end the session (the end_session DAG); the watch and the copy obey.
    end_requested: Mapped[str | None] = mapped_column(Text)
    # Stability of files still settling, carried from one batch run's watch to the next.
    watch_state: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    summary_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The summary was written after the session closed and owed nothing more.
    summary_final: Mapped[bool] = mapped_column(default=False)
    # Curation alerts: {kind: {active, since, message, notified, ...}}
    # (cryoflow.processing.curation).
    curation_alerts: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class FileRow(Base):
    __tablename__ = "cryoflow_files"
    __table_args__ = (
        UniqueConstraint("session_id", "relpath", "version"),
        Index("ix_cryoflow_files_session_kind", "session_id", "kind", "state"),
        Index("ix_cryoflow_files_session_touched", "session_id", "copy_started_at"),
        Index("ix_cryoflow_files_session_state", "session_id", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("cryoflow_sessions.id"), index=True)
    relpath: Mapped[str] = mapped_column(FsName)
    # A source that changed after it was verified is copied again beside the first copy (never
    # over it): version 2, 3 ... of the same relpath, each with its own row and destination.
    version: Mapped[int] = mapped_column(Integer, default=1)
    kind: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str | None] = mapped_column(String(64))
    dest_path: Mapped[str | None] = mapped_column(FsName)
    state: Mapped[FileState] = mapped_column(
        Enum(FileState, native_enum=False, length=16, values_callable=_values)
    )
    batch: Mapped[str | None] = mapped_column(String(250))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    # A failure is "transient" (disk full, read-only, share away: never gives up) or not (counts
    # towards transfer.max_attempts); either way the file is offered again after retry_after.
    transient: Mapped[bool] = mapped_column(default=False)
    retry_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ready_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    copy_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    copy_seconds: Mapped[float | None] = mapped_column(Float)
    # Curation verdict of a movie, decided when its last step is settled (None: not yet).
    accepted: Mapped[bool | None] = mapped_column()
    reject_reason: Mapped[str | None] = mapped_column(Text)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the verified copy's archive tags were set and read back (None: not tagged).
    archived_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StageRow(Base):
    __tablename__ = "cryoflow_stages"
    __table_args__ = (
        UniqueConstraint("file_id", "stage"),
        Index("ix_cryoflow_stages_owed", "microscope", "stage", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    file_id: Mapped[int] = mapped_column(ForeignKey("cryoflow_files.id"), index=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("cryoflow_sessions.id"), index=True)
    microscope: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(32))
    state: Mapped[StageState] = mapped_column(
        Enum(StageState, native_enum=False, length=16, values_callable=_values)
    )
    job_id: Mapped[str | None] = mapped_column(String(64))
    job_dir: Mapped[str | None] = mapped_column(Text)
    array_index: Mapped[int | None] = mapped_column(Integer)
    claimed_by: Mapped[str | None] = mapped_column(String(300))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    results: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")  # first: switching to WAL may wait for a writer
    cur.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a commit does not wait for fsync; a power cut can lose the last commits but
    # never corrupts the ledger, and a lost "verified" is found again (identical copy in place).
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


AIRFLOW_CONN_PREFIX = "airflow-conn://"


def resolve_url(url: str) -> str:
    """The SQLAlchemy URL of a ledger URL. ``airflow-conn://<conn_id>`` names an Airflow
    Connection, read through the task SDK (in tasks, the triggerer and plain processes alike):
    the password stays out of the configuration, and Airflow masks it in task logs. A
    ``postgres``/``postgresql`` Connection is used with psycopg 3. Any other URL is itself.
    Never log the result: log ``engine.url``, which hides the password."""
    if not url.startswith(AIRFLOW_CONN_PREFIX):
        return url
    conn_id = url.removeprefix(AIRFLOW_CONN_PREFIX).strip("/")
    from airflow.sdk import BaseHook  # in tasks, the triggerer and plain processes alike

    uri = BaseHook.get_connection(conn_id).get_uri()
    scheme, sep, rest = uri.partition("://")
    if sep and scheme in ("postgres", "postgresql"):
        uri = f"postgresql+psycopg://{rest}"
    return uri


_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(url: str) -> Engine:
    """One engine per URL and process. The first use in a process brings the ledger's schema
    to the newest migration (:func:`cryoflow.ledger.schema.upgrade`: one query when it is
    there already, locked against other processes when it is not)."""
    engine = _ENGINES.get(url)
    if engine is not None:
        return engine
    with _ENGINES_LOCK:
        engine = _ENGINES.get(url)
        if engine is None:
            from cryoflow.ledger.schema import upgrade

            engine = create_engine(resolve_url(url), pool_pre_ping=True)
            if engine.dialect.name == "sqlite":
                event.listen(engine, "connect", _sqlite_pragmas)
            try:
                upgrade(engine)
            except BaseException:
                engine.dispose()  # the next call tries again (a database away for a while)
                raise
            _ENGINES[url] = engine
    return engine


class CopyStart(NamedTuple):
    relpath: str
    kind: str
    size: int
    mtime_ns: int
    ready_at: datetime | None = None


class Verified(NamedTuple):
    file_id: int
    checksum: str
    dest_path: str
    copy_seconds: float
    owe: tuple[str, ...] = ()
    archived: bool = False  # its archive tags were set and read back


class CopyClaim(NamedTuple):
    file_id: int
    already: bool  # verified before with the same size and mtime: nothing to copy
    version: int
    replaces: str | None  # destination of the earlier, different verified copy (kept)


def _aware(when: datetime) -> datetime:
    """SQLite hands back naive datetimes; all ledger times are UTC."""
    return when if when.tzinfo else when.replace(tzinfo=UTC)



def _owed(max_attempts: int) -> Any:
    """Stage rows a run may claim: pending, or failed with attempts left. IN on the indexed
    state first (done rows, the bulk, are never read), then attempts."""
    return StageRow.state.in_((StageState.PENDING, StageState.FAILED)) & or_(
        StageRow.state == StageState.PENDING, StageRow.attempts < max_attempts
    )

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
            else:
                row.params = params  # the latest form values serve processing
                if row.state == "closed":  # reopened by a new trigger of the same session
                    row.state, row.close_reason, row.closed_at = "open", None, None
                    row.end_requested, row.summary_at, row.summary_final = None, None, False
            return row.id

    def find_session(self, microscope: str, name: str) -> SessionRow | None:
        with self._tx() as s:
            return s.scalar(
                select(SessionRow).where(
                    SessionRow.microscope == microscope, SessionRow.name == name
                )
            )

    def request_end(self, session_id: int, reason: str) -> bool:
        """Ask an open session to end; its watch and copy stop at their next step."""
        with self._tx() as s:
            row = s.get(SessionRow, session_id)
            if row is None or row.state == "closed":
                return False
            row.end_requested = reason
            return True

    def end_requested(self, session_id: int) -> str | None:
        with self._tx() as s:
            return s.scalar(select(SessionRow.end_requested).where(SessionRow.id == session_id))

    def save_watch_state(self, session_id: int, state: dict[str, Any]) -> None:
        with self._tx() as s:
            s.execute(
                update(SessionRow).where(SessionRow.id == session_id).values(watch_state=state)
            )

    def watch_state(self, session_id: int) -> dict[str, Any]:
        with self._tx() as s:
            state = s.scalar(select(SessionRow.watch_state).where(SessionRow.id == session_id))
            return state or {}

    def mark_summary_written(self, session_id: int, *, final: bool) -> None:
        with self._tx() as s:
            s.execute(
                update(SessionRow)
                .where(SessionRow.id == session_id)
                .values(summary_at=utcnow(), summary_final=final)
            )

    def sessions_to_summarize(self, microscope: str) -> list[SessionRow]:
        """Closed sessions whose summary was written while processing still owed work."""
        with self._tx() as s:
            return list(
                s.scalars(
                    select(SessionRow).where(
                        SessionRow.microscope == microscope,
                        SessionRow.state == "closed",
                        SessionRow.summary_final.is_(False),
                    )
                )
            )

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

    def done_files(
        self, session_id: int, max_attempts: int, *, touched_since: datetime | None = None
    ) -> dict[str, tuple[int, int] | None]:
        """Files the watcher must not offer again unless they change on the share: verified,
        reported incomplete, or failed ``max_attempts`` times for a reason that is not transient
        (those wait for a person; the summary lists them), as relpath -> (size, mtime_ns).

        With ``touched_since``, only the rows whose last copy started since then (an index
        range: what changed lately), and those no longer done map to None (a person offered
        them again), so a cache of the first answer can be kept exact."""
        files = FileRow.__table__.c  # plain columns, no ORM objects: 100,000 rows stay cheap
        done = or_(
            files.state.in_([FileState.VERIFIED, FileState.INCOMPLETE]),
            (files.state == FileState.FAILED)
            & (files.attempts >= max_attempts)
            & files.transient.is_(False),
        )
        query = select(files.relpath, files.size, files.mtime_ns, done.label("done"))
        query = query.where(files.session_id == session_id)
        if touched_since is not None:
            query = query.where(files.copy_started_at >= touched_since)
        else:
            query = query.where(done)
        with self._tx() as s:  # by version: the latest copy of a relpath speaks last
            rows = s.execute(query.order_by(files.version, files.id))
            return {rel: (size, mtime) if ok else None for rel, size, mtime, ok in rows}

    def offer_again(self, session_id: int) -> int:
        """A new trigger of a session offers again what waits for a person: copies that used
        up their attempts and files reported incomplete (a form that expected more frames)."""
        with self._tx() as s:
            result = s.execute(
                update(FileRow)
                .where(
                    FileRow.session_id == session_id,
                    FileRow.state.in_([FileState.FAILED, FileState.INCOMPLETE]),
                )
                .values(
                    state=FileState.FAILED,
                    attempts=0,
                    transient=True,
                    retry_after=None,
                    copy_started_at=utcnow(),
                )
            )
            return result.rowcount or 0

    def backing_off(self, session_id: int, now: datetime | None = None) -> dict[str, datetime]:
        """Failed files still owed, with the time before which they are not offered again."""
        files = FileRow.__table__.c
        with self._tx() as s:
            rows = s.execute(
                select(files.relpath, files.retry_after).where(
                    files.session_id == session_id,
                    files.state == FileState.FAILED,
                    files.retry_after > (now or utcnow()),
                )
            )
            return {rel: _aware(when) for rel, when in rows}

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
    ) -> CopyClaim:
        """Record that a copy starts. A relpath verified before with other content starts a new
        version (its own row and destination): a verified copy is never overwritten."""
        item = CopyStart(relpath, kind, size, mtime_ns, ready_at)
        return self.begin_copies(session_id, [item], batch=batch)[0]

    def begin_copies(
        self, session_id: int, items: Iterable[CopyStart], *, batch: str
    ) -> list[CopyClaim]:
        """:meth:`begin_copy` for a whole batch: one query for the batch's existing rows, one
        transaction (a batch of small files must not cost a commit per file)."""
        items = list(items)
        with self._tx() as s:
            latest: dict[str, FileRow] = {}
            names = sorted({item.relpath for item in items})
            for chunk in (names[i : i + 500] for i in range(0, len(names), 500)):
                rows = s.scalars(
                    select(FileRow)
                    .where(FileRow.session_id == session_id, FileRow.relpath.in_(chunk))
                    .order_by(FileRow.version)
                )
                latest.update((row.relpath, row) for row in rows)  # the highest version wins
            claims = [self._begin(s, session_id, item, batch, latest) for item in items]
            s.flush()
            return [claim if isinstance(claim, CopyClaim) else claim() for claim in claims]

    @staticmethod
    def _begin(
        s: Session,
        session_id: int,
        item: CopyStart,
        batch: str,
        latest: dict[str, FileRow],
    ) -> CopyClaim | Callable[[], CopyClaim]:
        """A claim, or (for a new row, whose id exists only after the flush) how to make it."""
        row = latest.get(item.relpath)
        replaces = None
        if row is not None and row.state == FileState.VERIFIED:
            if row.size == item.size and row.mtime_ns == item.mtime_ns:
                return CopyClaim(row.id, True, row.version, None)
            replaces = row.dest_path
            version = row.version + 1
            row = None
        else:
            version = row.version if row is not None else 1
        if row is None:
            row = FileRow(session_id=session_id, relpath=item.relpath, version=version, attempts=0)
            s.add(row)
            latest[item.relpath] = row
        row.kind, row.size, row.mtime_ns, row.batch = item.kind, item.size, item.mtime_ns, batch
        row.state, row.error, row.retry_after = FileState.COPYING, None, None
        row.attempts = (row.attempts or 0) + 1
        row.ready_at = row.ready_at or item.ready_at
        row.copy_started_at = utcnow()
        return lambda: CopyClaim(row.id, False, row.version, replaces)

    def mark_verified(
        self,
        file_id: int,
        *,
        checksum: str,
        dest_path: str,
        copy_seconds: float,
        owe: Iterable[str] = (),
        archived: bool = False,
    ) -> None:
        """The copy is checksummed at its destination; in the same transaction the movie
        starts to owe the processing steps in ``owe`` (so no crash can lose them)."""
        self.mark_verified_many(
            [Verified(file_id, checksum, dest_path, copy_seconds, tuple(owe), archived)]
        )

    def mark_verified_many(self, copies: Iterable[Verified]) -> None:
        """:meth:`mark_verified` for many copies in one transaction (one bulk UPDATE; rows are
        loaded only for the movies that start to owe steps)."""
        copies = list(copies)
        if not copies:
            return
        now = utcnow()
        with self._tx() as s:
            s.execute(
                update(FileRow),
                [
                    {
                        "id": v.file_id,
                        "state": FileState.VERIFIED,
                        "checksum": v.checksum,
                        "dest_path": v.dest_path,
                        "verified_at": now,
                        "archived_at": now if v.archived else None,
                        "copy_seconds": v.copy_seconds,
                        "error": None,
                        "transient": False,
                        "retry_after": None,
                    }
                    for v in copies
                ],
            )
            for v in copies:
                if v.owe:
                    self._owe(s, s.get(FileRow, v.file_id), v.owe)

    @staticmethod
    def _owe(s: Session, file: FileRow, stages: Iterable[str]) -> None:
        microscope = s.scalar(select(SessionRow.microscope).where(SessionRow.id == file.session_id))
        for stage in stages:
            row = s.scalar(
                select(StageRow).where(StageRow.file_id == file.id, StageRow.stage == stage)
            )
            if row is None:
                s.add(
                    StageRow(
                        file_id=file.id,
                        session_id=file.session_id,
                        microscope=microscope,
                        stage=stage,
                        state=StageState.PENDING,
                        attempts=0,
                        results={},
                    )
                )
            elif row.state != StageState.DONE:
                row.state, row.claimed_by, row.job_id = StageState.PENDING, None, None

    def attempts(self, file_id: int) -> int:
        with self._tx() as s:
            return s.scalar(select(FileRow.attempts).where(FileRow.id == file_id)) or 0

    def mark_failed(
        self, file_id: int, error: str, *, transient: bool, retry_after: datetime
    ) -> None:
        """The copy failed; the file stays owed and is offered again after ``retry_after``."""
        with self._tx() as s:
            row = s.get(FileRow, file_id)
            row.state, row.error = FileState.FAILED, error[:4000]
            row.transient, row.retry_after = transient, retry_after

    def release(self, file_id: int, note: str) -> None:
        """The source was still changing: not an attempt that counts, offer it again later."""
        with self._tx() as s:
            row = s.get(FileRow, file_id)
            row.state, row.error, row.transient = FileState.FAILED, note[:4000], True
            row.attempts = max(0, (row.attempts or 1) - 1)

    def mark_incomplete(
        self, session_id: int, relpath: str, *, kind: str, size: int, mtime_ns: int, reason: str
    ) -> int:
        """Its writer stopped before the file was whole (a crash on the microscope PC): kept
        out of processing and reported; offered again only if the file changes."""
        with self._tx() as s:
            row = s.scalar(
                select(FileRow)
                .where(FileRow.session_id == session_id, FileRow.relpath == relpath)
                .order_by(FileRow.version.desc())
                .limit(1)
            )
            if row is None or row.state == FileState.VERIFIED:
                version = row.version + 1 if row is not None else 1
                row = FileRow(session_id=session_id, relpath=relpath, version=version, attempts=0)
                s.add(row)
            row.kind, row.size, row.mtime_ns = kind, size, mtime_ns
            row.state, row.error, row.retry_after = FileState.INCOMPLETE, reason[:4000], None
            row.copy_started_at = utcnow()  # the watch's cache reads what changed since
            s.flush()
            return row.id

    def still_owed(self, session_id: int) -> list[FileRow]:
        """Files not verified: failing (with why and when next), incomplete, or mid-copy."""
        with self._tx() as s:
            return list(
                s.scalars(
                    select(FileRow)
                    .where(
                        FileRow.session_id == session_id,
                        FileRow.state != FileState.VERIFIED,
                    )
                    .order_by(FileRow.id)
                )
            )

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
        then_owe: Iterable[str] = (),
    ) -> None:
        """Settle one movie's stage; on DONE the movie starts to owe ``then_owe`` (same
        transaction: a crash between the two cannot lose the downstream steps)."""
        with self._tx() as s:
            file = s.get(FileRow, file_id)
            row = s.scalar(
                select(StageRow).where(StageRow.file_id == file_id, StageRow.stage == stage)
            )
            if row is None:
                microscope = s.scalar(
                    select(SessionRow.microscope).where(SessionRow.id == file.session_id)
                )
                row = StageRow(
                    file_id=file_id,
                    session_id=file.session_id,
                    microscope=microscope,
                    stage=stage,
                    attempts=0,
                )
                s.add(row)
            if state == StageState.SUBMITTED:
                row.attempts = (row.attempts or 0) + 1
            row.state, row.job_id = state, job_id or row.job_id
            row.array_index = array_index if array_index is not None else row.array_index
            row.results = results if results is not None else (row.results or {})
            row.error = error
            if state in (StageState.DONE, StageState.FAILED):
                row.claimed_by = None
            if state == StageState.DONE:
                self._owe(s, file, then_owe)

    def claim(
        self,
        microscope: str,
        stage: str,
        claimer: str,
        *,
        limit: int,
        max_attempts: int,
        after: str | None = None,
    ) -> list[tuple[StageRow, FileRow]]:
        """Take up to ``limit`` owed rows of ``stage`` (pending, or failed with attempts left)
        for ``claimer``; ``after`` requires that stage DONE first. One conditional UPDATE, so two
        runs never take the same movie (PostgreSQL re-checks the state under the row lock;
        SQLite serialises writers)."""
        owed = _owed(max_attempts)
        candidates = (
            select(StageRow.id)
            .where(StageRow.microscope == microscope, StageRow.stage == stage, owed)
            .order_by(StageRow.id)
        )
        if after is not None:  # the movie's own upstream row: a lookup, not a scan
            up = StageRow.__table__.alias("up")
            candidates = candidates.where(
                select(up.c.id)
                .where(
                    up.c.file_id == StageRow.file_id,
                    up.c.stage == after,
                    up.c.state == StageState.DONE,
                )
                .exists()
            )
        got: list[tuple[StageRow, FileRow]] = []
        for _ in range(5):  # another run won some candidates: take the next ones
            with self._tx() as s:
                ids = list(s.scalars(candidates.limit(limit - len(got))))
                if not ids:
                    break
                s.execute(
                    update(StageRow)
                    .where(StageRow.id.in_(ids), owed)
                    .values(
                        state=StageState.SUBMITTED,
                        claimed_by=claimer,
                        claimed_at=utcnow(),
                        job_id=None,
                        job_dir=None,
                        array_index=None,
                        attempts=StageRow.attempts + 1,
                    )
                    .execution_options(synchronize_session=False)
                )
                rows = s.execute(
                    select(StageRow, FileRow)
                    .join(FileRow, FileRow.id == StageRow.file_id)
                    .where(StageRow.id.in_(ids), StageRow.claimed_by == claimer)
                    .order_by(StageRow.id)
                )
                got += [(st, f) for st, f in rows]
            if len(got) >= limit:
                break
        return got

    def set_job(self, stage_ids: list[int], job_id: str, job_dir: str) -> None:
        """Record the job that took the claimed rows, index i = stage_ids[i] (durably, before
        the run defers: a killed run's movies are settled from this job's fate)."""
        with self._tx() as s:
            for index, stage_id in enumerate(stage_ids):
                s.execute(
                    update(StageRow)
                    .where(StageRow.id == stage_id)
                    .values(job_id=job_id, job_dir=job_dir, array_index=index)
                )

    def adopt(self, stage_ids: list[int], claimer: str, was: str) -> int:
        """Hand still-running claims of ``was`` (an earlier try of the same run) to
        ``claimer``, which follows their job from now on; rows claimed by anyone else meanwhile
        are left alone. Returns how many changed hands."""
        with self._tx() as s:
            result = s.execute(
                update(StageRow)
                .where(
                    StageRow.id.in_(stage_ids),
                    StageRow.state == StageState.SUBMITTED,
                    StageRow.claimed_by == was,
                )
                .values(claimed_by=claimer)
            )
            return int(result.rowcount or 0)

    def claimed(
        self,
        microscope: str,
        stage: str | None = None,
        *,
        claimer: str | None = None,
        job_id: str | None = None,
    ) -> list[tuple[StageRow, FileRow]]:
        """Claimed rows not settled yet (their job may still run, or their run died), in
        array order; narrowed to one stage, one claimer or one job."""
        query = (
            select(StageRow, FileRow)
            .join(FileRow, FileRow.id == StageRow.file_id)
            .where(StageRow.microscope == microscope, StageRow.state == StageState.SUBMITTED)
        )
        if stage is not None:
            query = query.where(StageRow.stage == stage)
        if claimer is not None:
            query = query.where(StageRow.claimed_by == claimer)
        if job_id is not None:
            query = query.where(StageRow.job_id == job_id)
        with self._tx() as s:
            rows = s.execute(query.order_by(StageRow.job_id, StageRow.array_index, StageRow.id))
            return [(st, f) for st, f in rows]

    def release_stage(self, stage_id: int, note: str) -> None:
        """A claim whose job never ran: owed again, and the attempt does not count."""
        with self._tx() as s:
            row = s.get(StageRow, stage_id)
            if row is not None and row.state == StageState.SUBMITTED:
                row.state, row.claimed_by, row.error = StageState.PENDING, None, note[:2000]
                row.attempts = max(0, (row.attempts or 1) - 1)

    def has_owed(self, microscope: str, stage: str, max_attempts: int) -> bool:
        """Whether :meth:`claim` would find work of ``stage`` now (one indexed lookup)."""
        with self._tx() as s:
            found = s.scalar(
                select(StageRow.id)
                .where(
                    StageRow.microscope == microscope,
                    StageRow.stage == stage,
                    _owed(max_attempts),
                )
                .limit(1)
            )
        return found is not None

    def owed_count(self, session_id: int, max_attempts: int) -> int:
        """Stage rows of the session still to be done (pending, claimed, failed with tries left)."""
        with self._tx() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(StageRow)
                    .where(
                        StageRow.session_id == session_id,
                        or_(
                            StageRow.state.in_((StageState.PENDING, StageState.SUBMITTED)),
                            (StageRow.state == StageState.FAILED)
                            & (StageRow.attempts < max_attempts),
                        ),
                    )
                )
                or 0
            )

    def stage_counts(self, session_id: int) -> dict[str, dict[str, int]]:
        """{stage: {state: movies}} for a session: what processing achieved so far."""
        with self._tx() as s:
            rows = s.execute(
                select(StageRow.stage, StageRow.state, func.count())
                .where(StageRow.session_id == session_id)
                .group_by(StageRow.stage, StageRow.state)
            )
            counts: dict[str, dict[str, int]] = {}
            for stage, state, n in rows:
                counts.setdefault(stage, {})[str(state)] = n
            return counts

    def recent_movies_without(
        self, session_ids: Iterable[int], stage: str, since: datetime
    ) -> list[FileRow]:
        """Verified movies of these sessions copied since ``since`` that have no ``stage`` row.

        For what arrives after its movie (the mdoc a batch later): a range of the touched index
        and one unique-index probe per movie, so the cost follows the window, not the session.
        """
        ids = list(session_ids)
        if not ids:
            return []
        has_stage = (
            select(StageRow.id)
            .where(StageRow.file_id == FileRow.id, StageRow.stage == stage)
            .exists()
        )
        with self._tx() as s:
            return list(
                s.scalars(
                    select(FileRow)
                    .where(
                        FileRow.session_id.in_(ids),
                        FileRow.copy_started_at >= since,
                        FileRow.kind == "movie",
                        FileRow.state == FileState.VERIFIED,
                        ~has_stage,
                    )
                    .order_by(FileRow.id)
                )
            )

    def stages(self, file_ids: Iterable[int]) -> list[StageRow]:
        with self._tx() as s:
            return list(s.scalars(select(StageRow).where(StageRow.file_id.in_(list(file_ids)))))

    def ctf_table(
        self,
        session_id: int,
        file_ids: Iterable[int] | None = None,
        *,
        accepted_only: bool = False,
    ) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
        """(file id, motioncor results, CTF results) of the movies with both done, for the
        session's STAR files: all of them in one query (a new file), or just the given ones (a
        processing run appends its batch); ``accepted_only``: the movies curation accepted."""
        mc = StageRow.__table__.alias("mc")
        ctf = StageRow.__table__.alias("ctf")
        query = select(mc.c.file_id, mc.c.results, ctf.c.results).join(
            ctf, ctf.c.file_id == mc.c.file_id
        )
        if accepted_only:
            files = FileRow.__table__
            query = query.join(files, files.c.id == mc.c.file_id).where(files.c.accepted.is_(True))
        with self._tx() as s:
            rows = s.execute(
                query.where(
                    # the batch's movies by their ids (unique index file_id, stage), or the session
                    ctf.c.file_id.in_(list(file_ids))
                    if file_ids is not None
                    else mc.c.session_id == session_id,
                    mc.c.stage == "motioncor",
                    mc.c.state == StageState.DONE,
                    ctf.c.stage == "ctf",
                    ctf.c.state == StageState.DONE,
                ).order_by(mc.c.file_id)
            )
            return [(fid, a or {}, b or {}) for fid, a, b in rows]

    # ----------------------------------------------------------------- curation

    def set_verdicts(self, verdicts: Iterable[tuple[int, bool, str | None]]) -> None:
        """Record (file id, accepted, reject reason) of movies, in one transaction."""
        now = utcnow()
        with self._tx() as s:
            for file_id, accepted, reason in verdicts:
                s.execute(
                    update(FileRow)
                    .where(FileRow.id == file_id)
                    .values(accepted=accepted, reject_reason=reason, decided_at=now)
                )

    def recent_verdicts(self, session_id: int, window: int) -> list[bool]:
        """The verdicts of the session's last ``window`` decided movies, newest first."""
        with self._tx() as s:
            return list(
                s.scalars(
                    select(FileRow.accepted)
                    .where(FileRow.session_id == session_id, FileRow.accepted.is_not(None))
                    .order_by(FileRow.decided_at.desc(), FileRow.id.desc())
                    .limit(window)
                )
            )

    def last_movie_at(self, session_id: int, kind: str) -> datetime | None:
        """When the session's newest file of ``kind`` was first seen ready (or its copy began)."""
        with self._tx() as s:
            when = s.scalar(
                select(func.max(func.coalesce(FileRow.ready_at, FileRow.copy_started_at))).where(
                    FileRow.session_id == session_id, FileRow.kind == kind
                )
            )
            if isinstance(when, str):  # SQLite's max() of a coalesce loses the column type
                when = datetime.fromisoformat(when)
            return None if when is None else _aware(when)

    def save_alerts(self, session_id: int, alerts: dict[str, Any]) -> None:
        with self._tx() as s:
            row = s.get(SessionRow, session_id)
            row.curation_alerts = alerts

    def latest_file(self, session_id: int, kind: str) -> list[FileRow]:
        """Verified files of one kind, newest first (index on session, kind, state)."""
        with self._tx() as s:
            return list(
                s.scalars(
                    select(FileRow)
                    .where(
                        FileRow.session_id == session_id,
                        FileRow.kind == kind,
                        FileRow.state == FileState.VERIFIED,
                    )
                    .order_by(FileRow.id.desc())
                    .limit(1000)
                )
            )

    # --- share cleanup

    @staticmethod
    def _newer_version(*where: Any) -> Any:
        """EXISTS a later version of the same relpath of the same session (optionally more)."""
        newer = FileRow.__table__.alias("newer")
        return (
            select(newer.c.id)
            .where(
                newer.c.session_id == FileRow.session_id,
                newer.c.relpath == FileRow.relpath,
                newer.c.version > FileRow.version,
                *(cond(newer.c) for cond in where),
            )
            .exists()
        )

    @staticmethod
    def _cleanup_done() -> Any:
        """EXISTS a decision that took the file out of cleanup: deleted, or gone from the share."""
        return (
            select(CleanupRow.id)
            .where(CleanupRow.file_id == FileRow.id, CleanupRow.action.in_(("deleted", "gone")))
            .exists()
        )

    def cleanup_candidates(
        self, microscope: str, *, verified_before: datetime, limit: int
    ) -> list[tuple[FileRow, SessionRow, bool]]:
        """What share cleanup examines: verified files of the microscope's closed sessions,
        verified before ``verified_before``, not deleted (or found gone) by cleanup yet, each
        relpath's latest verified version only, as (file, session, a newer version that is not
        verified exists). Never examined first, then the least recently examined, oldest first."""
        verified_later = self._newer_version(lambda c: c.state == FileState.VERIFIED)
        last_checked = (
            select(func.max(CleanupRow.checked_at))
            .where(CleanupRow.file_id == FileRow.id)
            .scalar_subquery()
        )
        query = (
            select(FileRow, SessionRow, self._newer_version().label("newer"))
            .join(SessionRow, SessionRow.id == FileRow.session_id)
            .where(
                SessionRow.microscope == microscope,
                SessionRow.state == "closed",
                FileRow.state == FileState.VERIFIED,
                FileRow.verified_at <= verified_before,
                ~verified_later,
                ~self._cleanup_done(),
            )
            .order_by(last_checked.nulls_first(), FileRow.verified_at, FileRow.id)
            .limit(limit)
        )
        with self._tx() as s:
            return [(f, sess, bool(newer)) for f, sess, newer in s.execute(query)]

    def cleanup_waiting(
        self, microscope: str, *, verified_before: datetime
    ) -> dict[str, tuple[int, int]]:
        """Verified files cleanup does not examine yet, as (files, bytes): those of sessions
        still running, and those verified after ``verified_before`` (too young)."""
        base = (
            select(func.count(), func.coalesce(func.sum(FileRow.size), 0))
            .join(SessionRow, SessionRow.id == FileRow.session_id)
            .where(
                SessionRow.microscope == microscope,
                FileRow.state == FileState.VERIFIED,
                ~self._newer_version(lambda c: c.state == FileState.VERIFIED),
                ~self._cleanup_done(),
            )
        )
        with self._tx() as s:
            running = s.execute(base.where(SessionRow.state != "closed")).one()
            young = s.execute(
                base.where(SessionRow.state == "closed", FileRow.verified_at > verified_before)
            ).one()
        return {
            "session-running": (int(running[0]), int(running[1])),
            "too-young": (int(young[0]), int(young[1])),
        }

    def running_sessions(self, microscope: str) -> dict[int, str]:
        """Sessions of the microscope that are not closed: id -> source_root."""
        with self._tx() as s:
            rows = s.execute(
                select(SessionRow.id, SessionRow.source_root).where(
                    SessionRow.microscope == microscope, SessionRow.state != "closed"
                )
            )
            return {sid: root for sid, root in rows}

    def record_cleanup(
        self,
        *,
        file_id: int,
        session_id: int,
        microscope: str,
        action: str,
        reason: str,
        detail: str,
        size: int,
        run: str = "",
    ) -> None:
        """One file's cleanup decision. The same action and reason as the file's last decision
        only update when it was last confirmed, so the table grows with changes, not runs."""
        now = utcnow()
        with self._tx() as s:
            last = s.scalar(
                select(CleanupRow)
                .where(CleanupRow.file_id == file_id)
                .order_by(CleanupRow.id.desc())
                .limit(1)
            )
            if last is not None and (last.action, last.reason) == (action, reason):
                last.checked_at, last.detail, last.run = now, detail[:4000], run[:250]
                return
            s.add(
                CleanupRow(
                    file_id=file_id,
                    session_id=session_id,
                    microscope=microscope,
                    action=action,
                    reason=reason,
                    detail=detail[:4000],
                    size=size,
                    run=run[:250],
                    decided_at=now,
                    checked_at=now,
                )
            )

    def cleanup_decisions(
        self, *, microscope: str | None = None, session_id: int | None = None
    ) -> list[CleanupRow]:
        """Every recorded cleanup decision, oldest first."""
        query = select(CleanupRow)
        if microscope is not None:
            query = query.where(CleanupRow.microscope == microscope)
        if session_id is not None:
            query = query.where(CleanupRow.session_id == session_id)
        with self._tx() as s:
            return list(s.scalars(query.order_by(CleanupRow.id)))


class CleanupRow(Base):
    """A share cleanup decision about one verified file: deleted from the share, kept (with
    why), would be deleted (dry-run), or found gone from the share. A new row when the decision
    changes; ``checked_at`` is when the same decision was last confirmed."""

    __tablename__ = "cryoflow_cleanup"
    __table_args__ = (Index("ix_cryoflow_cleanup_microscope_file", "microscope", "file_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    file_id: Mapped[int] = mapped_column(ForeignKey("cryoflow_files.id"), index=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("cryoflow_sessions.id"), index=True)
    microscope: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16))  # deleted | kept | would-delete | gone
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")
    size: Mapped[int] = mapped_column(BigInteger)
    run: Mapped[str] = mapped_column(String(250), default="")
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    checked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
