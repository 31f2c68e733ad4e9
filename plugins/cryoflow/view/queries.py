"""Read-only aggregate queries over the ledger for the session view (no Airflow here).

Counts and rates are aggregated in SQL (GROUP BY over the ledger's indexes); the per-movie
results (drift, defocus, astigmatism, CTF fit resolution, particles) are read as scalars extracted
from the stage rows' JSON in SQL (one scan per stage, never the rows' objects), and downsampled to
at most ``points`` buckets and binned into histograms here, server side, so a page for a session
of 20,000 movies carries a few kilobytes of numbers. Every query works on SQLite and PostgreSQL.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import and_, case, create_engine, event, func, select
from sqlalchemy.engine import Connection, Engine

from cryoflow.config import CurationThresholds
from cryoflow.ledger.store import (
    CleanupRow,
    FileRow,
    FileState,
    SessionRow,
    StageRow,
    StageState,
    get_engine,
)
from cryoflow.processing.steps import MOVIE_KIND, STAGES

FILES = FileRow.__table__.c
STAGE_ROWS = StageRow.__table__.c
SESSIONS = SessionRow.__table__.c

#: Defaults for the lines drawn on the plots, used where the session's params carry no
#: ``thresholds`` mapping (sessions opened before curation): the one definition,
#: :class:`cryoflow.config.CurationThresholds`. Units are the plots' units: Å, µm of defocus,
#: particles per micrograph.
DEFAULT_THRESHOLDS: dict[str, float] = CurationThresholds().model_dump()


@dataclass(frozen=True)
class Metric:
    """One per-movie quantity the page plots, read from one stage's ``results``."""

    key: str
    stage: str
    fields: tuple[str, ...]
    title: str
    unit: str
    low: str | None = None  # threshold key of the lower bound
    high: str | None = None  # threshold key of the upper bound
    integer: bool = False
    derive: Callable[[np.ndarray], np.ndarray] | None = None  # (n, len(fields)) -> (n,)


def _mean_defocus_um(cols: np.ndarray) -> np.ndarray:
    return cols.mean(axis=1) / 1e4


METRICS: tuple[Metric, ...] = (
    Metric("total_drift", "motioncor", ("total_drift_A",), "Total drift", "Å",
           high="max_total_drift_A"),
    Metric("defocus", "ctf", ("defocus1_A", "defocus2_A"), "Defocus", "µm",
           low="min_defocus_um", high="max_defocus_um", derive=_mean_defocus_um),
    Metric("astigmatism", "ctf", ("astigmatism_A",), "Astigmatism", "Å",
           high="max_astigmatism_A", derive=lambda c: np.abs(c[:, 0])),
    Metric("fit_resolution", "ctf", ("fit_resolution_A",), "CTF fit resolution", "Å",
           high="max_fit_resolution_A"),
    Metric("particles", "picking", ("particles",), "Particles per micrograph", "",
           low="min_particles", integer=True),
)  # fmt: skip

#: The scalar results of each stage the movie table shows (lists such as shifts are left out).
SHOWN_RESULTS = {
    "motioncor": ("total_drift_A", "early_drift_A", "late_drift_A", "frames"),
    "ctf": ("defocus1_A", "defocus2_A", "astigmatism_A", "astig_angle_deg", "cc",
            "fit_resolution_A"),
    "picking": ("particles",),
}  # fmt: skip

_NS_PER_MS = 1_000_000


def thresholds_for(params: dict[str, Any] | None) -> dict[str, float]:
    """The facility defaults, overridden by numeric entries of the session's ``thresholds``."""
    merged = dict(DEFAULT_THRESHOLDS)
    given = (params or {}).get("thresholds")
    if isinstance(given, dict):
        for key, value in given.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if key in merged and number and math.isfinite(value):
                merged[key] = float(value)
    return merged


def _aware(when: datetime | None) -> datetime | None:
    if when is None:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _iso(when: datetime | None) -> str | None:
    when = _aware(when)
    return when.isoformat() if when else None


def _hour(column: Any, dialect: str) -> Any:
    """A ledger timestamp (UTC) cut to its hour, in SQL: cheap to group by (no per-row date
    arithmetic on SQLite, where the column holds 'YYYY-MM-DD HH:MM:SS.ffffff' text)."""
    if dialect == "sqlite":
        return func.substr(column, 1, 13)
    # in UTC, whatever the connection's time zone (a zone of +05:30 would shift the hours)
    return func.date_trunc("hour", func.timezone("UTC", column))


def _epoch_hour(value: Any) -> int | None:
    """What :func:`_hour` returned, as hours since the epoch."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(f"{value}:00")
    return int(_aware(value).timestamp()) // 3600  # type: ignore[union-attr]


def _since(column: Any, cut: datetime) -> Any:
    """``column >= cut``; the bound value in UTC (SQLite's DateTime stores the UTC wall time as
    text, and SQLAlchemy formats the bound value the same way)."""
    return column >= cut.astimezone(UTC)


def read_engine(url: str) -> Engine:
    """The view's own engine for the ledger: read-only, one per URL and process. On SQLite it
    also gets a larger page cache and memory-mapped reads (the view scans a session's rows)."""
    engine = _READ_ENGINES.get(url)
    if engine is not None:
        return engine
    get_engine(url)  # the ledger's tables exist, as every component of the bundle ensures
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_read_pragmas)
    elif engine.dialect.name == "postgresql":
        event.listen(engine, "connect", _postgresql_read_only)
    _READ_ENGINES[url] = engine
    return engine


_READ_ENGINES: dict[str, Engine] = {}


def _sqlite_read_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    for pragma in ("busy_timeout=30000", "query_only=ON", "cache_size=-32768",
                   "mmap_size=268435456"):  # fmt: skip
        cur.execute(f"PRAGMA {pragma}")
    cur.close()


def _postgresql_read_only(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    cur.close()
    dbapi_conn.commit()


# ----------------------------------------------------------------------------- aggregation


def downsample(t_ms: np.ndarray, values: np.ndarray, points: int = 500) -> dict[str, list]:
    """At most ``points`` buckets of equal time over the values' span, each with its count,
    mean, min and max (a bucket of one movie is that movie's value), columnar for JSON."""
    ok = ~np.isnan(values)
    t, v = t_ms[ok], values[ok]
    if t.size == 0:
        return {"t": [], "n": [], "mean": [], "min": [], "max": []}
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    if t.size <= points:
        vals = [round(float(x), 4) for x in v]
        return {"t": [int(x) for x in t], "n": [1] * t.size, "mean": vals, "min": vals,
                "max": vals}  # fmt: skip
    t0, span = float(t[0]), float(t[-1] - t[0]) + 1.0
    bucket = np.minimum(((t - t0) * points / span).astype(np.int64), points - 1)
    counts = np.bincount(bucket, minlength=points)
    present = np.flatnonzero(counts)
    starts = np.searchsorted(bucket, present)  # sorted by time, so by bucket
    n = counts[present]
    sums = np.add.reduceat(v, starts)
    tsum = np.add.reduceat(t, starts)
    return {
        "t": [int(x) for x in tsum / n],
        "n": [int(x) for x in n],
        "mean": [round(float(x), 4) for x in sums / n],
        "min": [round(float(x), 4) for x in np.minimum.reduceat(v, starts)],
        "max": [round(float(x), 4) for x in np.maximum.reduceat(v, starts)],
    }


def histogram(
    values: np.ndarray,
    *,
    bins: int = 40,
    low: float | None = None,
    high: float | None = None,
    integer: bool = False,
) -> dict[str, Any]:
    """Counts over the values' range and the thresholds; when a few wild outliers stretch that
    range more than threefold, over the central 99 % instead (they must not squash the rest into
    one bar) and what lies outside is counted apart (``below``, ``above``). Also how many lie
    beyond each threshold (``under_low``, ``over_high``)."""
    v = values[~np.isnan(values)]
    out: dict[str, Any] = {"n": int(v.size), "edges": [], "counts": [], "below": 0, "above": 0}
    if v.size == 0:
        out.update(median=None, mean=None, p5=None, p95=None, under_low=0, over_high=0,
                   within=0)  # fmt: skip
        return out
    lo, hi = float(v.min()), float(v.max())
    if v.size >= 100:
        plo, phi = (float(x) for x in np.percentile(v, [0.5, 99.5]))
        if hi - lo > 3 * (phi - plo):
            lo, hi = plo, phi
    for thr in (low, high):
        if thr is not None:
            lo, hi = min(lo, thr), max(hi, thr)
    if integer:
        lo, hi = math.floor(lo), math.ceil(hi) + 1
        width = max(1, math.ceil((hi - lo) / bins))
        edges = np.arange(lo, hi + width, width, dtype=float)
    else:
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
    inside = v[(v >= edges[0]) & (v <= edges[-1])]
    counts, _ = np.histogram(inside, edges)
    under = int((v < low).sum()) if low is not None else 0
    over = int((v > high).sum()) if high is not None else 0
    outside = (v < low if low is not None else False) | (v > high if high is not None else False)
    out.update(
        edges=[round(float(e), 4) for e in edges],
        counts=[int(c) for c in counts],
        below=int((v < edges[0]).sum()),
        above=int((v > edges[-1]).sum()),
        median=round(float(np.median(v)), 4),
        mean=round(float(v.mean()), 4),
        p5=round(float(np.percentile(v, 5)), 4),
        p95=round(float(np.percentile(v, 95)), 4),
        under_low=under,
        over_high=over,
        within=int(v.size - np.count_nonzero(outside)),
    )
    return out


# ----------------------------------------------------------------------------- queries


class ViewQueries:
    """The session view's reads of one ledger. The list entries of closed, fully processed
    sessions are kept (they change only when a new trigger reopens the session)."""

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or read_engine(url)
        self.dialect = self.engine.dialect.name
        self._closed: dict[int, tuple[Any, dict[str, Any]]] = {}

    def clear_cache(self) -> None:
        self._closed.clear()

    # -- sessions ------------------------------------------------------------------------

    def session(self, microscope: str, name: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(
                select(SessionRow.__table__).where(
                    SESSIONS.microscope == microscope, SESSIONS.name == name
                )
            ).mappings().first()  # fmt: skip
        return _session_dict(row) if row is not None else None

    def sessions(self, microscope: str, *, recent: int = 10) -> list[dict[str, Any]]:
        """The microscope's sessions still open (newest first), then the ``recent`` latest
        closed ones, each with its headline counts."""
        cols = SessionRow.__table__
        with self.engine.connect() as c:
            running = c.execute(
                select(cols)
                .where(SESSIONS.microscope == microscope, SESSIONS.state != "closed")
                .order_by(SESSIONS.opened_at.desc(), SESSIONS.id.desc())
            ).mappings().all()  # fmt: skip
            closed = c.execute(
                select(cols)
                .where(SESSIONS.microscope == microscope, SESSIONS.state == "closed")
                .order_by(SESSIONS.closed_at.desc(), SESSIONS.id.desc())
                .limit(recent)
            ).mappings().all()  # fmt: skip
            rows = [_session_dict(r) for r in (*running, *closed)]
            fresh = [r["id"] for r in rows if self._marker(r) is None
                     or self._closed.get(r["id"], (None,))[0] != self._marker(r)]  # fmt: skip
            headline = self._headlines(c, fresh) if fresh else {}
        for r in rows:
            if r["id"] in headline:
                r["counts"] = headline[r["id"]]
                if (marker := self._marker(r)) is not None:
                    self._closed[r["id"]] = (marker, r["counts"])
            else:
                r["counts"] = self._closed[r["id"]][1]
        return rows

    @staticmethod
    def _marker(row: dict[str, Any]) -> tuple[Any, Any] | None:
        """What identifies the final counts of a closed, fully processed session (None while
        they may still change)."""
        if row["state"] != "closed" or not row["summary_final"]:
            return None
        return (row["summary_at"], row["closed_at"])

    def _headlines(self, c: Connection, ids: list[int]) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {
            i: {"movies": 0, "copied": 0, "owed": 0, **{st: 0 for st in STAGES}} for i in ids
        }
        files = c.execute(
            select(FILES.session_id, FILES.state, func.count())
            .where(FILES.session_id.in_(ids), FILES.kind == MOVIE_KIND)
            .group_by(FILES.session_id, FILES.state)
        )
        for sid, state, n in files:
            out[sid]["movies"] += n
            if state == FileState.VERIFIED:
                out[sid]["copied"] += n
        stages = c.execute(
            select(STAGE_ROWS.session_id, STAGE_ROWS.stage, STAGE_ROWS.state, func.count())
            .where(STAGE_ROWS.session_id.in_(ids), STAGE_ROWS.stage.in_(STAGES))
            .group_by(STAGE_ROWS.session_id, STAGE_ROWS.stage, STAGE_ROWS.state)
        )
        for sid, stage, state, n in stages:
            if state == StageState.DONE:
                out[sid][stage] += n
            elif state in (StageState.PENDING, StageState.SUBMITTED):
                out[sid]["owed"] += n
        return out

    # -- counts and rates ----------------------------------------------------------------

    def summary(
        self,
        session_id: int,
        *,
        end: datetime,
        max_attempts: int = 3,
        transfer_max_attempts: int = 5,
        settling_movies: int = 0,
        window_minutes: int = 60,
        max_hours: int = 240,
    ) -> dict[str, Any]:
        """The session's counts and rates from three GROUP BY queries (two over the files'
        (session, kind, state) index, one over the session's stage rows).

        Counts, per movie: seen on the share (in the ledger, plus ``settling_movies`` the watch
        sees that are not in it yet), copied, done per processing step, owed (copies and steps
        still to do: pending, claimed, or failed with tries left) and failed (waiting for a
        person: copies out of tries, incomplete files, steps out of tries).

        Rates, movies per hour: acquired (the movie's mtime on the share), copied (verified) and
        done per processing step, over the ``window_minutes`` before ``end`` and over the
        session (first acquisition to ``end``), and hour by hour (at most ``max_hours``)."""
        hour_ns = 3600 * 1_000_000_000
        cut = end - timedelta(minutes=window_minutes)
        cut_ns = int(cut.timestamp() * 1e9)
        end_ns = int(end.timestamp() * 1e9)
        waits = and_(
            FILES.state == FileState.FAILED,
            FILES.attempts >= transfer_max_attempts,
            FILES.transient.is_(False),
        )
        retry = and_(STAGE_ROWS.state == StageState.FAILED, STAGE_ROWS.attempts < max_attempts)
        # the hour (and whether in the window) only matters for done rows: the others fall
        # into one group per state
        done = STAGE_ROWS.state == StageState.DONE
        done_hour = case((done, _hour(STAGE_ROWS.updated_at, self.dialect)), else_=None)
        in_window = and_(
            done,
            _since(STAGE_ROWS.updated_at, cut),
            ~_since(STAGE_ROWS.updated_at, end + timedelta(microseconds=1)),
        )
        verified_hour = _hour(FILES.verified_at, self.dialect)
        verified_in = and_(
            _since(FILES.verified_at, cut),
            ~_since(FILES.verified_at, end + timedelta(microseconds=1)),
        )
        movies = and_(FILES.session_id == session_id, FILES.kind == MOVIE_KIND)
        with self.engine.connect() as c:
            file_rows = c.execute(
                select(FILES.state, case((waits, 1), else_=0).label("waits"), func.count())
                .where(movies)
                .group_by(FILES.state, "waits")
            ).all()
            # grouped by their labels: PostgreSQL sees two bound parameters in two copies of
            # an expression as two different expressions
            acquired = c.execute(
                select(
                    (FILES.mtime_ns // hour_ns).label("hour"),
                    func.count(),
                    func.sum(case((FILES.mtime_ns.between(cut_ns, end_ns), 1), else_=0)),
                    func.min(FILES.mtime_ns),
                )
                .where(movies)
                .group_by("hour")
            ).all()
            copied = c.execute(
                select(
                    verified_hour.label("hour"),
                    func.count(),
                    func.sum(case((verified_in, 1), else_=0)),
                )
                .where(movies, FILES.state == FileState.VERIFIED)
                .group_by("hour")
            ).all()
            stage_rows = c.execute(
                select(
                    STAGE_ROWS.stage,
                    STAGE_ROWS.state,
                    case((retry, 1), else_=0).label("retry"),
                    done_hour.label("hour"),
                    func.count(),
                    func.sum(case((in_window, 1), else_=0)),
                )
                .where(STAGE_ROWS.session_id == session_id)
                .group_by(STAGE_ROWS.stage, STAGE_ROWS.state, "retry", "hour")
            ).all()
            archived = self._archived(c, session_id)

        # -- counts
        files = {s.value: 0 for s in FileState}
        copy_waits = 0
        for state, waiting, n in file_rows:
            files[str(state)] += n
            copy_waits += n if waiting else 0
        blank = {"done": 0, "pending": 0, "submitted": 0, "failed": 0, "retrying": 0}
        stages: dict[str, dict[str, int]] = {st: dict(blank) for st in STAGES}
        series: dict[str, dict[int, int]] = {"acquired": {}, "copied": {}}
        series.update({st: {} for st in STAGES})
        window: dict[str, int] = dict.fromkeys(series, 0)
        for stage, state, retrying, hour, n, recent in stage_rows:
            d = stages.setdefault(stage, dict(blank))
            key = "retrying" if str(state) == StageState.FAILED and retrying else str(state)
            d[key] += n
            if stage in STAGES and (h := _epoch_hour(hour)) is not None:
                series[stage][h] = series[stage].get(h, 0) + n
                window[stage] += int(recent or 0)
        for d in stages.values():
            d["owed"] = d["pending"] + d["submitted"] + d["retrying"]
        if archived is None and "archive" in stages:
            archived = stages["archive"]["done"]
        copy_owed = files[FileState.COPYING] + files[FileState.FAILED] - copy_waits
        counts = {
            "seen": sum(files.values()) + settling_movies,
            "settling": settling_movies,
            "copying": files[FileState.COPYING],
            "copied": files[FileState.VERIFIED],
            "copy_failed_retrying": files[FileState.FAILED] - copy_waits,
            "copy_failed": copy_waits,
            "incomplete": files[FileState.INCOMPLETE],
            "motion_corrected": stages["motioncor"]["done"],
            "ctf": stages["ctf"]["done"],
            "picked": stages["picking"]["done"],
            "archived": archived,
            "failed": copy_waits
            + files[FileState.INCOMPLETE]
            + sum(stages[st]["failed"] for st in STAGES),
            "owed": copy_owed + settling_movies + sum(stages[st]["owed"] for st in STAGES),
            "stages": {st: stages[st] for st in (*STAGES, *sorted(set(stages) - set(STAGES)))},
        }

        # -- rates
        first_ns = None
        for hour, n, recent, earliest in acquired:
            series["acquired"][int(hour)] = n
            window["acquired"] += int(recent or 0)
            first_ns = earliest if first_ns is None else min(first_ns, earliest)
        for hour, n, recent in copied:
            if (h := _epoch_hour(hour)) is not None:
                series["copied"][h] = series["copied"].get(h, 0) + n
                window["copied"] += int(recent or 0)
        end_h = int((end - timedelta(microseconds=1)).timestamp()) // 3600
        first_s = first_ns / 1e9 if first_ns is not None else None
        if first_s is None:
            hours_seen = [h for s_ in series.values() for h in s_]
            first_s = min(hours_seen) * 3600 if hours_seen else end.timestamp()
        span_h = max((end.timestamp() - first_s) / 3600.0, 1 / 60)
        per_hour = {k: round(n * 60 / window_minutes, 1) for k, n in window.items()}
        mean = {k: round(sum(s_.values()) / span_h, 1) for k, s_ in series.items()}
        first_h = max(int(first_s) // 3600, end_h - max_hours + 1)
        hours = list(range(first_h, end_h + 1))
        hourly: dict[str, list[int]] = {"t": [h * 3_600_000 for h in hours]}
        for k, s_ in series.items():
            hourly[k] = [s_.get(h, 0) for h in hours]
        rates = {
            "end": end.astimezone(UTC).isoformat(),
            "window_minutes": window_minutes,
            "per_hour": per_hour,
            "session_per_hour": mean,
            "session_hours": round(span_h, 2),
            "hourly": hourly,
        }
        return {"counts": counts, "rates": rates}

    def counts(self, session_id: int, **kw: Any) -> dict[str, Any]:
        """The counts of :meth:`summary`."""
        return self.summary(session_id, end=datetime.now(UTC), **kw)["counts"]

    def rates(self, session_id: int, *, end: datetime, **kw: Any) -> dict[str, Any]:
        """The rates of :meth:`summary`."""
        return self.summary(session_id, end=end, **kw)["rates"]

    def disk(self, session_id: int, *, min_age_hours: float, closed: bool) -> dict[str, int]:
        """The microscope's disk as far as this session goes, in bytes, from each verified
        file's latest share-cleanup decision: freed (deleted, or found gone), safe to free
        (every check at the destination passed at cleanup's last run: a dry run's "would
        delete", the session closed), kept (a check failed or a rule holds it: the cleanup
        log says which), and not checked yet (verified longer ago than ``min_age_hours``, the
        session closed, no decision). Only cleanup's checks make a file safe: a verified file
        whose copy was damaged since is "kept", never counted as safe."""
        cut = datetime.now(UTC) - timedelta(hours=min_age_hours)
        verified = and_(FILES.session_id == session_id, FILES.state == FileState.VERIFIED)
        cl = CleanupRow.__table__.c
        latest = (
            select(cl.file_id, cl.action)
            .where(
                cl.id.in_(
                    select(func.max(cl.id))
                    .where(cl.session_id == session_id)
                    .group_by(cl.file_id)
                )
            )
            .subquery()
        )
        bytes_ = func.coalesce(func.sum(FILES.size), 0)
        with self.engine.connect() as c:
            total = c.scalar(select(bytes_).where(verified))
            by_action = dict(
                c.execute(
                    select(latest.c.action, bytes_)
                    .join(latest, latest.c.file_id == FILES.id)
                    .where(verified)
                    .group_by(latest.c.action)
                ).all()
            )
            unchecked = 0
            if closed:
                unchecked = c.scalar(
                    select(bytes_).where(
                        verified, FILES.verified_at < cut.astimezone(UTC),
                        FILES.id.not_in(select(latest.c.file_id)),
                    )
                )  # fmt: skip
        return {
            "verified_bytes": int(total or 0),
            "freed_bytes": int(by_action.get("deleted", 0) + by_action.get("gone", 0)),
            "safe_to_free_bytes": int(by_action.get("would-delete", 0)) if closed else 0,
            "kept_bytes": int(by_action.get("kept", 0)),
            "unchecked_bytes": int(unchecked or 0),
        }

    def _archived(self, c: Connection, session_id: int) -> int:
        """Movies whose archive tags were set and read back after verification."""
        return int(
            c.scalar(
                select(func.count()).where(
                    FILES.session_id == session_id,
                    FILES.kind == MOVIE_KIND,
                    FILES.archived_at.is_not(None),
                )
            )
            or 0
        )

    # -- per-movie results ---------------------------------------------------------------

    def stage_values(self, session_id: int, stage: str, fields: Iterable[str]) -> np.ndarray:
        """(n, 1 + len(fields)) floats of the session's movies done with ``stage``: the movie's
        acquisition time (mtime, ms) then each result field (NaN where absent or null)."""
        fields = list(fields)
        results = STAGE_ROWS.results
        query = (
            select(FILES.mtime_ns // _NS_PER_MS, *(results[f].as_float() for f in fields))
            .select_from(StageRow.__table__.join(FileRow.__table__, FILES.id == STAGE_ROWS.file_id))
            .where(
                STAGE_ROWS.session_id == session_id,
                STAGE_ROWS.stage == stage,
                STAGE_ROWS.state == StageState.DONE,
            )
        )
        with self.engine.connect() as c:
            rows = c.execute(query).all()
        if not rows:
            return np.empty((0, 1 + len(fields)))
        # tuples first: numpy inspects SQLAlchemy Row objects one by one (100x slower)
        return np.array([tuple(r) for r in rows], dtype=float)

    def plots(
        self,
        session_id: int,
        thresholds: dict[str, float],
        *,
        points: int = 500,
        bins: int = 40,
    ) -> dict[str, Any]:
        """Per metric: the downsampled series over acquisition time and the histogram, with the
        thresholds that apply. One scan per stage."""
        by_stage: dict[str, list[Metric]] = {}
        for m in METRICS:
            by_stage.setdefault(m.stage, []).append(m)
        out: dict[str, Any] = {}
        for stage, metrics in by_stage.items():
            fields = list(dict.fromkeys(f for m in metrics for f in m.fields))
            data = self.stage_values(session_id, stage, fields)
            t = data[:, 0]
            for m in metrics:
                cols = data[:, [1 + fields.index(f) for f in m.fields]]
                values = m.derive(cols) if m.derive else cols[:, 0]
                low = thresholds.get(m.low) if m.low else None
                high = thresholds.get(m.high) if m.high else None
                out[m.key] = {
                    "title": m.title,
                    "unit": m.unit,
                    "stage": stage,
                    "low": low,
                    "high": high,
                    "missing": int(np.isnan(values).sum()),
                    "series": downsample(t, values, points),
                    "histogram": histogram(values, bins=bins, low=low, high=high,
                                           integer=m.integer),
                }  # fmt: skip
        return out

    # -- movies --------------------------------------------------------------------------

    def movies(
        self,
        session_id: int,
        *,
        limit: int = 50,
        before: int | None = None,
        processed_only: bool = False,
    ) -> list[dict[str, Any]]:
        """The session's copied movies, newest first (by ledger id: the index on session, kind
        and state is walked backwards, so the query stops after ``limit``), with each processing
        step's state, job and scalar results."""
        query = select(
            FILES.id, FILES.relpath, FILES.version, FILES.mtime_ns, FILES.verified_at,
            FILES.dest_path, FILES.accepted, FILES.reject_reason,
        ).where(
            FILES.session_id == session_id,
            FILES.kind == MOVIE_KIND,
            FILES.state == FileState.VERIFIED,
        )  # fmt: skip
        if before is not None:
            query = query.where(FILES.id < before)
        if processed_only:
            mc = StageRow.__table__.alias("mc")
            query = query.where(
                select(mc.c.id)
                .where(
                    mc.c.file_id == FILES.id,
                    mc.c.stage == "motioncor",
                    mc.c.state == StageState.DONE,
                )
                .exists()
            )
        query = query.order_by(FILES.id.desc()).limit(limit)
        with self.engine.connect() as c:
            files = c.execute(query).all()
            ids = [f.id for f in files]
            stages = c.execute(
                select(
                    STAGE_ROWS.file_id, STAGE_ROWS.stage, STAGE_ROWS.state, STAGE_ROWS.job_id,
                    STAGE_ROWS.job_dir, STAGE_ROWS.array_index, STAGE_ROWS.claimed_by,
                    STAGE_ROWS.claimed_at, STAGE_ROWS.attempts, STAGE_ROWS.error,
                    STAGE_ROWS.updated_at, STAGE_ROWS.results,
                ).where(STAGE_ROWS.file_id.in_(ids), STAGE_ROWS.stage.in_(STAGES))
            ).all() if ids else []  # fmt: skip
        by_file: dict[int, dict[str, Any]] = {i: {} for i in ids}
        for st in stages:
            shown = SHOWN_RESULTS.get(st.stage, ())
            results = st.results or {}
            by_file[st.file_id][st.stage] = {
                "state": str(st.state),
                "job_id": st.job_id,
                "job_dir": st.job_dir,
                "array_index": st.array_index,
                "claimed_by": st.claimed_by,
                "claimed_at": _iso(st.claimed_at),
                "attempts": st.attempts,
                "error": st.error,
                "updated_at": _iso(st.updated_at),
                "results": {k: results[k] for k in shown if k in results},
            }
        return [
            {
                "file_id": f.id,
                "relpath": f.relpath,
                "version": f.version,
                "acquired_at": datetime.fromtimestamp(f.mtime_ns / 1e9, UTC).isoformat(),
                "verified_at": _iso(f.verified_at),
                # curation's verdict (None: not decided yet, its steps are not all settled)
                "accepted": f.accepted,
                "reject_reason": f.reject_reason,
                "stages": {st: by_file[f.id][st] for st in STAGES if st in by_file[f.id]},
            }
            for f in files
        ]

    def movie_outputs(self, session_id: int, file_id: int) -> dict[str, Any] | None:
        """One movie's output paths as its stage results record them (aligned sum, CTF
        diagnostic, picks), or None if the movie is not one of this session's."""
        with self.engine.connect() as c:
            found = c.execute(
                select(FILES.id, FILES.relpath, FILES.dest_path).where(
                    FILES.id == file_id, FILES.session_id == session_id,
                    FILES.kind == MOVIE_KIND,
                )
            ).first()  # fmt: skip
            if found is None:
                return None
            rows = c.execute(
                select(STAGE_ROWS.stage, STAGE_ROWS.state, STAGE_ROWS.results).where(
                    STAGE_ROWS.file_id == file_id, STAGE_ROWS.stage.in_(STAGES)
                )
            ).all()
        done = {st: res or {} for st, state, res in rows if state == StageState.DONE}
        return {
            "file_id": found.id,
            "relpath": found.relpath,
            "aligned": done.get("motioncor", {}).get("aligned"),
            "diag": done.get("ctf", {}).get("diag"),
            "picks": done.get("picking", {}).get("picks"),
        }


def _session_dict(row: Any) -> dict[str, Any]:
    params = row["params"] or {}
    return {
        "id": row["id"],
        "microscope": row["microscope"],
        "name": row["name"],
        "state": row["state"],
        "dest_root": row["dest_root"],
        "source_root": row["source_root"],
        "opened_at": _iso(row["opened_at"]),
        "closed_at": _iso(row["closed_at"]),
        "close_reason": row["close_reason"],
        "end_requested": row["end_requested"],
        "summary_at": _iso(row["summary_at"]),
        "summary_final": bool(row["summary_final"]),
        "params": params,
        "watch_state": row["watch_state"] or {},
        "curation_alerts": row.get("curation_alerts") or {},
    }


def settling_movies(watch_state: dict[str, Any] | None, layout: Any) -> int:
    """Movies the share watch last saw still settling (its saved state: ``{relpath: [size,
    mtime_ns, seconds unchanged]}``; keys starting with "/" are its own notes), by the
    microscope's naming layout. They are on the share but not in the ledger yet."""
    from cryoflow.ingest.share.layout import FileKind, classify

    count = 0
    for rel, entry in (watch_state or {}).items():
        if rel.startswith("/") or not isinstance(entry, list):
            continue
        try:
            count += classify(rel, layout) == FileKind.MOVIE
        except ValueError:
            continue
    return count


def session_end(session: dict[str, Any], now: datetime | None = None) -> datetime:
    """The moment rates are measured back from: now for a running session; for a closed one
    its close time or, when processing went on after it, the last summary (written when the
    last owed step was done), so steps finished after the close still count."""
    if session["state"] == "closed" and session["closed_at"]:
        times = [session["closed_at"], session.get("summary_at")]
        return max(datetime.fromisoformat(t) for t in times if t)
    return now or datetime.now(UTC)


class TTLCache:
    """A few seconds of memory for expensive answers about running sessions (the page is
    refreshed by several people at once); closed sessions' answers are kept until they change."""

    def __init__(self, seconds: float = 15.0, size: int = 64) -> None:
        self.seconds, self.size = seconds, size
        self._data: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any, make: Callable[[], Any], *, forever: bool = False) -> Any:
        """The cached answer for ``key``, or ``make()``'s (kept ``seconds``, or until it is
        evicted with ``forever``); with ``seconds`` 0 nothing is kept."""
        if self.seconds <= 0:
            return make()
        now = time.monotonic()
        hit = self._data.get(key)
        if hit is not None and (hit[0] == math.inf or now - hit[0] < self.seconds):
            return hit[1]
        value = make()
        if len(self._data) >= self.size:
            oldest = min(self._data, key=lambda k: self._data[k][0])
            self._data.pop(oldest, None)
        self._data[key] = (math.inf if forever else now, value)
        return value

    def clear(self) -> None:
        self._data.clear()


__all__ = [
    "DEFAULT_THRESHOLDS",
    "METRICS",
    "TTLCache",
    "ViewQueries",
    "downsample",
    "histogram",
    "read_engine",
    "session_end",
    "settling_movies",
    "thresholds_for",
]
