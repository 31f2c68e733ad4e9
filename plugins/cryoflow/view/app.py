"""The session view's FastAPI app, mounted by ``plugins/cryoflow_view_plugin.py`` in Airflow's
API server at ``/cryoflow/view`` (under ``[api] base_url``).

Authentication and authorisation are Airflow's own, on every route (pages, JSON, thumbnails, the
script): the app-wide dependency is Airflow's ``get_user`` (``airflow.api_fastapi.core_api.
security``), which reads the bearer token or the UI's ``_token`` cookie and answers 401 when there
is none or it expired and 403 when it is not valid; then the configured auth manager (simple, FAB
with LDAP, ...) decides with ``is_authorized_dag``: reading a microscope's sessions needs read
access to its DAG ``session_<microscope>``, ending a session needs the right to create runs of
the microscope's ``end_session_<microscope>`` (what triggering it through Airflow's REST API
needs).

"End session" triggers ``end_session_<microscope>`` through Airflow's own trigger route function
(the one behind ``POST /api/v2/dags/<dag_id>/dagRuns``: the DAG's params are validated, the run
records the user as its triggering user) and writes an audit-log entry, so it shows in Airflow
like any manual trigger; the DAG then asks the session to end through the ledger.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import GetUserDep, get_user
from airflow.configuration import conf
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, status
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from cryoflow.config import SAFE_ID, ConfigError, SiteConfig, load_site
from cryoflow.session import SESSION_NAME_PATTERN
from cryoflow.view import page, start_form, thumbnails
from cryoflow.view.queries import (
    TTLCache,
    ViewQueries,
    session_end,
    settling_movies,
    thresholds_for,
)

log = logging.getLogger(__name__)

#: Where the plugin mounts this app, below Airflow's base URL.
PREFIX = "/cryoflow/view"
#: The UI route of the view's navigation entry (``<ui>/plugin/<route>``).
UI_ROUTE = "cryoflow-sessions"
#: The task of ``process_<microscope>`` (dags/microscope_sessions.py) whose log holds each job
#: array task's output, headed by its movie.
PROCESS_TASK = "process"
END_DAG = "end_session_{microscope}"


def end_dag(microscope: str) -> str:
    """The DAG that ends ``microscope``'s sessions (one per microscope: rights per microscope)."""
    return END_DAG.format(microscope=microscope)


CSP = (
    "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
)


def airflow_ui_base() -> str:
    """The Airflow UI's path, ending in "/" (the path of ``[api] base_url``)."""
    path = urlsplit(conf.get("api", "base_url", fallback="") or "").path or "/"
    return path if path.endswith("/") else path + "/"


# ----------------------------------------------------------------------------- site and view


def _cache_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("CRYOFLOW_VIEW_CACHE_SECONDS", "15")))
    except ValueError:
        return 15.0


_site_lock = threading.Lock()
_sites: dict[tuple[tuple[str, str], ...], tuple[float, SiteConfig]] = {}
SITE_SECONDS = 60.0


def get_site() -> SiteConfig:
    """The site configuration (``CRYOFLOW_CONFIG_DIR``), read again after a minute or when the
    ``CRYOFLOW_*`` environment differs."""
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("CRYOFLOW_")))
    now = time.monotonic()
    with _site_lock:
        hit = _sites.get(key)
        if hit is not None and now - hit[0] < SITE_SECONDS:
            return hit[1]
        try:
            site = load_site()
        except (ConfigError, OSError) as exc:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, f"site configuration: {exc}"
            ) from None
        _sites.clear()
        _sites[key] = (now, site)
        return site


@dataclass
class View:
    """One ledger's queries and answer cache."""

    site: SiteConfig
    queries: ViewQueries
    cache: TTLCache


_views: dict[str, View] = {}
_views_lock = threading.Lock()


def get_view(site: Annotated[SiteConfig, Depends(get_site)]) -> View:
    url = site.facility.storage.ledger_url
    with _views_lock:
        view = _views.get(url)
        if view is None or view.cache.seconds != _cache_seconds():
            view = View(site, ViewQueries(url), TTLCache(_cache_seconds()))
            _views[url] = view
        view.site = site
        return view


SiteDep = Annotated[SiteConfig, Depends(get_site)]
ViewDep = Annotated[View, Depends(get_view)]


# ----------------------------------------------------------------------------- authorisation


def _team(dag_id: str) -> str | None:
    if not conf.getboolean("core", "multi_team", fallback=False):
        return None
    from airflow.models.dag import DagModel

    return DagModel.get_team_name(dag_id)


def may(
    user: BaseUser, method: Literal["GET", "POST", "PUT"], dag_id: str,
    entity: DagAccessEntity | None = None,
) -> bool:  # fmt: skip
    """The auth manager's answer for ``method`` on ``dag_id`` (or one of its entities)."""
    return get_auth_manager().is_authorized_dag(
        method=method,
        access_entity=entity,
        details=DagDetails(id=dag_id, team_name=_team(dag_id)),
        user=user,
    )


def readable_scope(
    microscope: Annotated[str, Path(pattern=SAFE_ID)],
    user: GetUserDep,
    site: SiteDep,
) -> str:
    """A microscope whose session DAG the user may read (403 otherwise)."""
    if not may(user, "GET", f"session_{microscope}"):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"no read access to the DAG session_{microscope}"
        )
    if microscope not in site.microscopes:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no microscope {microscope!r}")
    return microscope


ScopeDep = Annotated[str, Depends(readable_scope)]


def readable_session(
    microscope: ScopeDep,
    name: Annotated[str, Path(pattern=SESSION_NAME_PATTERN)],
    view: ViewDep,
) -> dict[str, Any]:
    found = view.queries.session(microscope, name)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no session {name!r} on {microscope}")
    return found


SessionOf = Annotated[dict[str, Any], Depends(readable_session)]


# ----------------------------------------------------------------------------- the app

app = FastAPI(
    title="cryoflow session view",
    # every route needs an Airflow user; the routes add the auth manager's decision
    dependencies=[Depends(get_user)],
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@app.middleware("http")
async def _headers(request: Request, call_next: Any) -> Any:
    response = await call_next(request)
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if response.headers.get("content-type", "").startswith("text/html"):
        response.headers["Content-Security-Policy"] = CSP
    return response


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """JSON for the API; for a page opened in a browser, a small page (with a sign-in link
    when the user is not signed in). The status is the same either way."""
    path = request.scope.get("path", "")
    html = "text/html" in request.headers.get("accept", "") and "/api/" not in path
    if not html:
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
    login = None
    if exc.status_code in (401, 403):
        try:
            login = get_auth_manager().get_url_login(next_url=f"{airflow_ui_base()}plugin/"
                                                              f"{UI_ROUTE}")  # fmt: skip
        except Exception:  # noqa: BLE001 - a link on an error page must not fail it
            login = None
    body = page.error_page(exc.status_code, str(exc.detail), login)
    return HTMLResponse(body, exc.status_code, headers=exc.headers)


def _links(request: Request) -> page.Links:
    root = (request.scope.get("root_path") or "").rstrip("/")

    def session(scope: str, name: str) -> str:
        return f"{root}/sessions/{quote(scope)}/{quote(name)}"

    def thumbnail(scope: str, name: str, file_id: int, kind: str) -> str:
        return f"{root}/api/sessions/{quote(scope)}/{quote(name)}/movies/{file_id}/{kind}.png"

    def end(scope: str, name: str) -> str:
        return f"{root}/api/sessions/{quote(scope)}/{quote(name)}/end"

    return page.Links(
        index=f"{root}/", session=session, thumbnail=thumbnail, script=f"{root}/view.js",
        end=end, airflow=airflow_ui_base(),
    )  # fmt: skip


# ----------------------------------------------------------------------------- data


def _microscopes(user: BaseUser, view: View) -> list[dict[str, Any]]:
    out = []
    for scope_id, scope in sorted(view.site.microscopes.items()):
        dag_id = f"session_{scope_id}"
        if not may(user, "GET", dag_id):
            continue
        out.append({
            "id": scope_id, "name": scope.name, "dag_id": dag_id,
            "sessions": view.queries.sessions(scope_id),
        })  # fmt: skip
    return out


def _final(session: dict[str, Any]) -> bool:
    """Nothing about a closed, fully processed session changes any more (until it reopens)."""
    return session["state"] == "closed" and session["summary_final"]


def _summary(view: View, session: dict[str, Any]) -> dict[str, Any]:
    site = view.site
    key = ("summary", session["id"], session["state"], session["closed_at"], session["summary_at"])

    def make() -> dict[str, Any]:
        settling = 0
        if session["state"] != "closed":
            layout = site.microscopes[session["microscope"]].layout
            settling = settling_movies(session["watch_state"], layout)
        return view.queries.summary(
            session["id"],
            end=session_end(session),
            max_attempts=site.facility.processing.max_attempts,
            transfer_max_attempts=site.facility.transfer.max_attempts,
            settling_movies=settling,
        )

    return view.cache.get(key, make, forever=_final(session))


def _archive(view: View, session: dict[str, Any]) -> dict[str, Any]:
    """What went to the archive (the session summary's ``archive``: tags read back from the
    files, the small-file tar, the HSM node's answer) and the microscope's disk it frees."""
    scope = view.site.microscopes[session["microscope"]]
    summary = pathlib.Path(session["dest_root"]) / "logs" / "session_summary.json"
    try:
        archived = json.loads(summary.read_text()).get("archive")
    except (OSError, ValueError, AttributeError):
        archived = None  # not written yet, or GPFS away from this API server
    disk = view.queries.disk(
        session["id"],
        min_age_hours=scope.cleanup.min_age_hours,
        closed=session["state"] == "closed",
    )
    return {
        "summary": archived,
        "disk": disk,
        "cleanup": {"mode": scope.cleanup.mode, "min_age_hours": scope.cleanup.min_age_hours},
    }


def _thresholds(session: dict[str, Any]) -> tuple[dict[str, float], str]:
    given = isinstance((session["params"] or {}).get("thresholds"), dict)
    return thresholds_for(session["params"]), "session" if given else "facility defaults"


def _plots(view: View, session: dict[str, Any], points: int = 500, bins: int = 40) -> dict:
    thresholds, _ = _thresholds(session)
    key = ("plots", session["id"], session["state"], session["closed_at"], session["summary_at"],
           points, bins, tuple(sorted(thresholds.items())))  # fmt: skip
    return view.cache.get(
        key,
        lambda: view.queries.plots(session["id"], thresholds, points=points, bins=bins),
        forever=_final(session),
    )


def _run_of(claimed_by: str | None) -> tuple[str, str, int] | None:
    """``dag_id/run_id#try`` as a processing run claims rows (operators/process_owed.py)."""
    if not claimed_by or "/" not in claimed_by or "#" not in claimed_by:
        return None
    head, _, try_text = claimed_by.rpartition("#")
    dag_id, _, run_id = head.partition("/")
    try:
        return dag_id, run_id, int(try_text)
    except ValueError:
        return None


def _job_dir_run(job_dir: str | None) -> tuple[str, str, int] | None:
    """The (safe) dag id, run id and try a job folder was named after:
    ``<job root>/<dag_id>/<run_id>/<stage>-try<n>[-<when>]`` (operators/process_owed.py)."""
    if not job_dir:
        return None
    parts = job_dir.rstrip("/").split("/")
    if len(parts) < 3 or "-try" not in parts[-1]:
        return None
    try:
        return parts[-3], parts[-2], int(parts[-1].rsplit("-try", 1)[1].split("-")[0])
    except ValueError:
        return None


def add_log_links(
    movies: list[dict[str, Any]], microscope: str, db: Any, ui: str | None = None
) -> None:
    """Give each stage of each movie the Airflow UI address of the task log that processed it.

    A claimed row names its run (``claimed_by``); a settled row keeps its job folder, named after
    the run with unsafe characters replaced, so the run is found among the processing DAG's runs
    of that time whose safe name matches. Without a match: the DAG's runs page."""
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    from cryoflow.operators.compute_job import _safe

    ui = ui or airflow_ui_base()
    dag_id = f"process_{microscope}"
    wanted: list[tuple[dict[str, Any], str, str, int]] = []
    times: list[datetime] = []
    for m in movies:
        for d in m["stages"].values():
            run = _run_of(d.get("claimed_by"))
            if run is not None:
                d["log"] = _task_log_url(ui, run[0], run[1], run[2])
                continue
            found = _job_dir_run(d.get("job_dir"))
            if found is None or not d.get("claimed_at"):
                d["log"] = f"{ui}dags/{quote(dag_id, safe='')}/runs" if d.get("job_id") else None
                continue
            wanted.append((d, found[0], found[1], found[2]))
            times.append(datetime.fromisoformat(d["claimed_at"]))
    if not wanted:
        return
    lo, hi = min(times) - timedelta(hours=12), max(times) + timedelta(minutes=5)
    runs = db.scalars(
        select(DagRun.run_id).where(
            DagRun.dag_id == dag_id, DagRun.start_date >= lo, DagRun.start_date <= hi
        )
    ).all()
    by_safe = {_safe(run_id): run_id for run_id in runs}
    for d, safe_dag, safe_run, try_number in wanted:
        run_id = by_safe.get(safe_run) if safe_dag == _safe(dag_id) else None
        d["log"] = (
            _task_log_url(ui, dag_id, run_id, try_number)
            if run_id
            else f"{ui}dags/{quote(dag_id, safe='')}/runs"
        )


def _task_log_url(ui: str, dag_id: str, run_id: str, try_number: int) -> str:
    return (
        f"{ui}dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}/tasks/"
        f"{PROCESS_TASK}?try_number={try_number}"
    )


def _movies(
    view: View, session: dict[str, Any], db: Any, *, limit: int, before: int | None,
    processed_only: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    movies = view.queries.movies(
        session["id"], limit=limit, before=before, processed_only=processed_only
    )
    add_log_links(movies, session["microscope"], db)
    return movies


# ----------------------------------------------------------------------------- pages


@app.get("/", response_class=HTMLResponse, name="index")
def index(request: Request, user: GetUserDep, view: ViewDep) -> HTMLResponse:
    """The microscopes the user may read, each with its running and recent sessions."""
    body = page.index_page(_microscopes(user, view), _links(request), user=user.get_name())
    return HTMLResponse(body)


@app.get("/sessions/{microscope}/{name}", response_class=HTMLResponse, name="session_page")
def session_page(
    request: Request,
    user: GetUserDep,
    session: SessionOf,
    view: ViewDep,
    db: SessionDep,
    before: Annotated[int | None, Query(ge=1)] = None,
) -> HTMLResponse:
    """One session: counts, rates, plots, the latest micrographs and the movies."""
    thresholds, source = _thresholds(session)
    movies = _movies(view, session, db, limit=50, before=before, processed_only=False)
    links = _links(request)
    older = None
    if len(movies) == 50:
        older = f"{links.session(session['microscope'], session['name'])}?before=" \
                f"{movies[-1]['file_id']}"  # fmt: skip
    body = page.session_page(
        session=session,
        scope_name=view.site.microscopes[session["microscope"]].name,
        summary=_summary(view, session),
        plot_data=_plots(view, session),
        thresholds=thresholds,
        threshold_source=source,
        latest=_movies(view, session, db, limit=6, before=None, processed_only=True),
        movies=movies,
        older=older,
        links=links,
        can_end=session["state"] != "closed"
        and may(user, "POST", end_dag(session["microscope"]), DagAccessEntity.RUN),
        archive=_archive(view, session),
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    )
    return HTMLResponse(body)


@app.get("/view.js", name="script")
def script() -> Response:
    return Response(page.SCRIPT, media_type="text/javascript",
                    headers={"Cache-Control": "private, max-age=300"})  # fmt: skip


@app.get("/icon.svg", name="icon")
def icon() -> Response:
    return Response(page.ICON, media_type="image/svg+xml",
                    headers={"Cache-Control": "private, max-age=86400"})  # fmt: skip


# ----------------------------------------------------------------------------- JSON


@app.get("/api/microscopes")
def api_microscopes(user: GetUserDep, view: ViewDep) -> JSONResponse:
    """Per readable microscope: its running sessions, then the recent closed ones."""
    return JSONResponse({"microscopes": _microscopes(user, view)})


@app.get("/api/sessions/{microscope}/{name}")
def api_session(user: GetUserDep, session: SessionOf, view: ViewDep) -> JSONResponse:
    """The session, its counts per step and its rates against the acquisition rate."""
    thresholds, source = _thresholds(session)
    shown = {k: v for k, v in session.items() if k != "watch_state"}
    return JSONResponse({
        "session": shown,
        **_summary(view, session),
        "thresholds": thresholds,
        "thresholds_from": source,
        "archive": _archive(view, session),
        "can_end": session["state"] != "closed"
        and may(user, "POST", end_dag(session["microscope"]), DagAccessEntity.RUN),
    })  # fmt: skip


@app.get("/api/sessions/{microscope}/{name}/plots")
def api_plots(
    session: SessionOf,
    view: ViewDep,
    points: Annotated[int, Query(ge=10, le=2000)] = 500,
    bins: Annotated[int, Query(ge=5, le=200)] = 40,
) -> JSONResponse:
    """Per metric: the series over acquisition time (at most ``points`` buckets) and the
    histogram (``bins``), with the thresholds."""
    return JSONResponse({"metrics": _plots(view, session, points, bins)})


@app.get("/api/sessions/{microscope}/{name}/movies")
def api_movies(
    session: SessionOf,
    view: ViewDep,
    db: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[int | None, Query(ge=1)] = None,
    processed: bool = False,
) -> JSONResponse:
    """The copied movies, newest first (``before``: a file id, for the next page), with each
    step's state, results, job and task-log link."""
    movies = _movies(view, session, db, limit=limit, before=before, processed_only=processed)
    more = movies[-1]["file_id"] if len(movies) == limit else None
    return JSONResponse({"movies": movies, "next_before": more})


@app.get("/api/sessions/{microscope}/{name}/movies/{file_id}/{kind}.png", name="thumbnail")
def api_thumbnail(
    session: SessionOf,
    view: ViewDep,
    file_id: int,
    kind: Literal["micrograph", "spectrum", "picks"],
) -> Response:
    """A movie's thumbnail, made once and cached under the session's processed/thumbnails."""
    outputs = view.queries.movie_outputs(session["id"], file_id)
    if outputs is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no movie {file_id} in this session")
    params = session["params"] or {}
    diameter_px = None
    if params.get("particle_diameter_A") and params.get("pixel_size_A"):
        diameter_px = float(params["particle_diameter_A"]) / float(params["pixel_size_A"])
    perms = view.site.facility.permissions
    try:
        data = thumbnails.thumbnail(
            session["dest_root"], outputs, kind, file_mode=perms.file_mode,
            dir_mode=perms.dir_mode, diameter_px=diameter_px,
        )  # fmt: skip
    except thumbnails.ThumbnailError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    return Response(data, media_type="image/png",
                    headers={"Cache-Control": "private, max-age=3600"})  # fmt: skip


class EndRequest(BaseModel):
    """The operator types the session's name to confirm (a JSON body: a form on another site
    cannot send one without CORS, which this app does not allow)."""

    confirm: str


@app.post("/api/sessions/{microscope}/{name}/end")
def api_end(
    body: EndRequest,
    request: Request,
    user: GetUserDep,
    session: SessionOf,
    db: SessionDep,
) -> dict[str, Any]:
    """End a running session now: trigger ``end_session_<microscope>`` as Airflow's REST API
    would."""
    dag_id = end_dag(session["microscope"])
    if not may(user, "POST", dag_id, DagAccessEntity.RUN):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"no permission to trigger the DAG {dag_id}")
    if body.confirm != session["name"]:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the confirmation is not the session name")
    if session["state"] == "closed":
        raise HTTPException(status.HTTP_409_CONFLICT, f"session {session['name']} is closed")
    run = trigger_end_session(db, request, user, session["microscope"], session["name"])
    log.info("%s triggered %s run %s for %s/%s", user.get_name(), dag_id, run.run_id,
             session["microscope"], session["name"])  # fmt: skip
    return {
        "dag_id": dag_id,
        "dag_run_id": run.run_id,
        "url": f"{airflow_ui_base()}dags/{dag_id}/runs/{quote(run.run_id, safe='')}",
    }


_dag_bag: Any = None


def trigger_end_session(db: Any, request: Request, user: BaseUser, microscope: str,
                        name: str) -> Any:  # fmt: skip
    """Create the ``end_session_<microscope>`` run (see :func:`trigger_as_user`)."""
    return trigger_as_user(db, request, user, end_dag(microscope), {"session_name": name})


def trigger_as_user(db: Any, request: Request, user: BaseUser, dag_id: str,
                    conf: dict[str, Any]) -> Any:  # fmt: skip
    """Create a run of ``dag_id`` with Airflow's own trigger route function (DAG lookup,
    import-error and run-type checks, params validation, triggering user), plus the audit-log
    entry its route decorator would write."""
    global _dag_bag
    from airflow.api_fastapi.core_api.datamodels.dag_run import TriggerDAGRunPostBody
    from airflow.api_fastapi.core_api.routes.public.dag_run import trigger_dag_run
    from airflow.models import Log
    from airflow.models.dagbag import DBDagBag

    if _dag_bag is None:
        _dag_bag = DBDagBag()
    run = trigger_dag_run(
        dag_id=dag_id,
        body=TriggerDAGRunPostBody(
            logical_date=None, conf=conf, note=f"From the session view by {user.get_name()}"
        ),
        dag_bag=_dag_bag,
        user=user,
        session=db,
        request=request,
    )
    db.add(
        Log(
            event="trigger_dag_run",
            owner=user.get_name(),
            owner_display_name=user.get_name(),
            extra=json.dumps({"via": "cryoflow session view", "conf": conf, "method": "POST"}),
            dag_id=dag_id,
            run_id=run.run_id,
        )
    )
    db.flush()
    return run


# ----------------------------------------------------------------------------- starting


@app.get("/start/{microscope}", response_class=HTMLResponse, name="start_page")
def start_page(request: Request, user: GetUserDep, view: ViewDep, microscope: ScopeDep) -> (
    HTMLResponse
):  # fmt: skip
    """The trigger form of ``session_<microscope>``, each bad value flagged beside its field."""
    dag_id = f"session_{microscope}"
    scope = view.site.microscopes[microscope]
    links = _links(request)
    if may(user, "POST", dag_id, DagAccessEntity.RUN):
        form = start_form.form_html(scope, f"{links.index}api/start/{quote(microscope)}")
    else:
        form = f'<p class="muted">Starting a session needs the right to trigger {dag_id}.</p>'
    return HTMLResponse(page.start_page(scope.name, microscope, form, links))


@app.post("/api/start/{microscope}")
def api_start(
    body: dict[str, Any], request: Request, user: GetUserDep, view: ViewDep,
    db: SessionDep, microscope: ScopeDep,
) -> JSONResponse:  # fmt: skip
    """Start a session: 422 with ``fields`` (field -> what is wrong) when a value is bad, else
    the run of ``session_<microscope>`` triggered as the user (its DAG switched on first, as an
    operator does at session start)."""
    dag_id = f"session_{microscope}"
    if not may(user, "POST", dag_id, DagAccessEntity.RUN):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"no permission to trigger the DAG {dag_id}")
    scope = view.site.microscopes[microscope]
    values = start_form.clean_values(scope, body)
    errors = start_form.field_errors(scope, values)
    if errors:
        return JSONResponse({"fields": errors}, status_code=status.HTTP_422_UNPROCESSABLE_ENTITY)
    from airflow.models.dag import DagModel
    from sqlalchemy import update

    if may(user, "PUT", dag_id):
        db.execute(update(DagModel).where(DagModel.dag_id == dag_id).values(is_paused=False))
    run = trigger_as_user(db, request, user, dag_id, start_form.conf_of(values))
    log.info("%s started session %s on %s (run %s)", user.get_name(), values["session_name"],
             microscope, run.run_id)  # fmt: skip
    return JSONResponse({
        "dag_id": dag_id,
        "dag_run_id": run.run_id,
        "session": values["session_name"],
        "url": f"{airflow_ui_base()}dags/{dag_id}/runs/{quote(run.run_id, safe='')}",
        "view": _links(request).session(microscope, values["session_name"]),
    })  # fmt: skip


__all__ = ["PREFIX", "UI_ROUTE", "add_log_links", "app", "get_site", "get_view"]
