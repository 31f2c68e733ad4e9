"""The session view as Airflow serves it: the plugin mounted by Airflow's real ``create_app()``
(plugins manager, simple auth manager, JWT middleware), requests through FastAPI's TestClient.

Tokens are made the way Airflow's simple auth manager makes them (``generate_jwt``, signed with
the test environment's ``[api_auth] jwt_secret``), so every request passes through Airflow's own
authentication and authorisation.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pytest

from cryoflow.ledger.store import Ledger, StageState
from tests.conftest import ROOT
from tests.view.test_queries import DRIFT, fill

PREFIX = "/cryoflow/view"
_SYNCED: set[str] = set()


@pytest.fixture(scope="module")
def airflow_app(airflow_db: Path) -> Any:
    from airflow.api_fastapi.app import create_app, purge_cached_app

    purge_cached_app()
    app = create_app()
    yield app
    purge_cached_app()


@pytest.fixture(scope="module")
def client(airflow_app: Any) -> Any:
    from fastapi.testclient import TestClient

    return TestClient(airflow_app)


def token(role: str | None, name: str | None = None, **kw: Any) -> str:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    user = SimpleAuthManagerUser(username=name or f"{role}-user", role=role)
    return get_auth_manager().generate_jwt(user, **kw)


def bearer(role: str | None, **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, **kw)}"}


@pytest.fixture
def site(site_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The shipped config on throw-away folders and ledger; a session s1 of krios1 whose movies
    are all processed; answers not cached between requests."""
    monkeypatch.setenv("CRYOFLOW_VIEW_CACHE_SECONDS", "0")
    ledger = Ledger(os.environ["CRYOFLOW_LEDGER_URL"])
    root = site_env["gpfs"] / "2026" / "s1"
    sid, ids = fill(ledger, "s1")
    return {**site_env, "ledger": ledger, "sid": sid, "ids": ids, "root": root}


def _serialize_dags() -> None:
    """Write the bundle's DAGs to the Airflow database, as the DAG processor would."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    if "done" in _SYNCED:
        return
    manager = DagBundlesManager()
    manager.sync_bundles_to_db()
    for bundle in manager.get_all_dag_bundles():
        if not bundle.is_initialized:
            bundle.initialize()
        bag = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path,
                           bundle_name=bundle.name)  # fmt: skip
        assert not bag.import_errors, bag.import_errors
        sync_bag_to_db(bag, bundle.name, bundle.version)
    _SYNCED.add("done")


def _urls(session: str = "s1", file_id: int = 1) -> list[tuple[str, str]]:
    base = f"{PREFIX}/api/sessions/krios1/{session}"
    return [
        ("GET", f"{PREFIX}/"),
        ("GET", f"{PREFIX}/sessions/krios1/{session}"),
        ("GET", f"{PREFIX}/view.js"),
        ("GET", f"{PREFIX}/icon.svg"),
        ("GET", f"{PREFIX}/api/microscopes"),
        ("GET", base),
        ("GET", f"{base}/plots"),
        ("GET", f"{base}/movies"),
        ("GET", f"{base}/movies/{file_id}/micrograph.png"),
        ("POST", f"{base}/end"),
    ]


# ----------------------------------------------------------------------------- registration


def test_the_plugin_is_mounted_and_in_the_navigation(client: Any, airflow_app: Any) -> None:
    from starlette.routing import Mount

    mounts = [r.path for r in airflow_app.routes if isinstance(r, Mount)]
    assert PREFIX in mounts
    plugins = client.get("/api/v2/plugins", headers=bearer("admin")).json()["plugins"]
    (ours,) = [p for p in plugins if p["name"] == "cryoflow_session_view"]
    assert ours["fastapi_apps"][0]["url_prefix"] == PREFIX
    (nav,) = ours["external_views"]
    assert nav["destination"] == "nav" and nav["url_route"] == "cryoflow-sessions"
    assert nav["href"] == f"{PREFIX}/"
    # the plugins manager did not execute the view's modules as top-level modules (the
    # .airflowignore beside them): they load as cryoflow.view.* in the API server only
    view_dir = ROOT / "plugins" / "cryoflow" / "view"
    stray = [
        name for name, module in list(sys.modules.items())
        if getattr(module, "__file__", None) and Path(module.__file__).parent == view_dir
        and not name.startswith("cryoflow.view")
    ]  # fmt: skip
    assert stray == []


# ----------------------------------------------------------------------------- refusal


def test_every_endpoint_refuses_a_request_without_a_valid_airflow_token(
    client: Any, site: dict[str, Any]
) -> None:
    from datetime import timedelta

    expired = token("admin", expiration_time_in_seconds=-int(timedelta(hours=1).total_seconds()))
    for method, url in _urls(file_id=site["ids"][0]):
        kw: dict[str, Any] = {"json": {"confirm": "s1"}} if method == "POST" else {}
        # no credential at all
        assert client.request(method, url, **kw).status_code == 401, url
        # a token Airflow did not sign
        bad = {"Authorization": "Bearer eyJhbGciOiJIUzUxMiJ9.e30.c2lnbmF0dXJl"}
        assert client.request(method, url, headers=bad, **kw).status_code == 403, url
        # a forged UI cookie, and an expired token
        client.cookies.set("_token", "not-a-jwt")
        assert client.request(method, url, **kw).status_code == 403, url
        client.cookies.clear()
        assert client.request(method, url, headers={"Authorization": f"Bearer {expired}"},
                              **kw).status_code == 401, url  # fmt: skip


def test_a_browser_without_a_session_gets_a_sign_in_page(client: Any, site: dict) -> None:
    r = client.get(f"{PREFIX}/sessions/krios1/s1", headers={"Accept": "text/html"})
    assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
    assert "/auth/login" in r.text and "Sign in" in r.text


def test_a_user_without_dag_access_is_forbidden(client: Any, site: dict[str, Any]) -> None:
    nobody = bearer(None, name="nobody")  # authenticated, but no role: no DAG access
    assert client.get(f"{PREFIX}/api/sessions/krios1/s1", headers=nobody).status_code == 403
    assert client.get(f"{PREFIX}/sessions/krios1/s1", headers=nobody).status_code == 403
    ids = site["ids"]
    r = client.get(f"{PREFIX}/api/sessions/krios1/s1/movies/{ids[0]}/micrograph.png",
                   headers=nobody)  # fmt: skip
    assert r.status_code == 403
    listing = client.get(f"{PREFIX}/api/microscopes", headers=nobody)
    assert listing.status_code == 200 and listing.json() == {"microscopes": []}


# ----------------------------------------------------------------------------- reading


def test_a_viewer_reads_the_session_counts_and_rates(client: Any, site: dict[str, Any]) -> None:
    # the watch last saw one more movie (and its XML) still settling on the share
    site["ledger"].save_watch_state(site["sid"], {
        "Images-Disc1/GridSquare_2/Data/FoilHole_9_Data_2_9_fractions.tiff": [5, 1, 0.5],
        "Images-Disc1/GridSquare_2/Data/FoilHole_9_Data_2_9.xml": [5, 1, 0.5],
        "/frames": [40],
    })  # fmt: skip
    r = client.get(f"{PREFIX}/api/sessions/krios1/s1", headers=bearer("viewer"))
    assert r.status_code == 200, r.text
    body = r.json()
    n = len(DRIFT)
    c = body["counts"]
    assert (c["copied"], c["motion_corrected"], c["ctf"], c["picked"]) == (n,) * 4
    assert c["seen"] == n + 1 and c["settling"] == 1
    assert c["owed"] == 1 and c["failed"] == 0  # the settling movie is owed its copy
    assert body["rates"]["per_hour"]["acquired"] == n  # all acquired in the last hour
    assert body["thresholds"]["max_total_drift_A"] == 30.0
    assert body["thresholds_from"] == "facility defaults"
    assert body["can_end"] is False  # a viewer may not trigger end_session
    assert "watch_state" not in body["session"]

    listing = client.get(f"{PREFIX}/api/microscopes", headers=bearer("viewer")).json()
    scopes = {m["id"]: m for m in listing["microscopes"]}
    assert set(scopes) == {"krios1", "krios2"}
    assert [s["name"] for s in scopes["krios1"]["sessions"]] == ["s1"]
    assert scopes["krios1"]["sessions"][0]["counts"]["picking"] == n

    plots = client.get(f"{PREFIX}/api/sessions/krios1/s1/plots", headers=bearer("viewer"))
    metrics = plots.json()["metrics"]
    assert metrics["total_drift"]["series"]["mean"] == DRIFT
    assert metrics["total_drift"]["histogram"]["over_high"] == 2

    assert client.get(f"{PREFIX}/api/sessions/krios1/nope", headers=bearer("viewer")).status_code \
        == 404  # fmt: skip
    assert client.get(f"{PREFIX}/api/sessions/krios9/s1", headers=bearer("viewer")).status_code \
        == 404  # fmt: skip


def test_the_page_through_the_ui_cookie(client: Any, site: dict[str, Any]) -> None:
    client.cookies.set("_token", token("viewer"))
    try:
        r = client.get(f"{PREFIX}/sessions/krios1/s1")
        index = client.get(f"{PREFIX}/")
        script = client.get(f"{PREFIX}/view.js")
    finally:
        client.cookies.clear()
    assert r.status_code == 200, r.text
    html = r.text
    assert "Content-Security-Policy" in r.headers and "frame-ancestors 'self'" in r.headers[
        "Content-Security-Policy"
    ]
    assert 'data-count="Copied"' in html and f">{len(DRIFT)}<" in html
    # the plots carry the thresholds: drift max 30 Å, defocus 0.5..3 µm, fit 6 Å, particles 20
    for metric, value in (("max", "30"), ("min", "0.5"), ("max", "3"), ("max", "6"),
                          ("min", "20")):  # fmt: skip
        assert f'data-threshold="{metric}" data-value="{value}"' in html
    assert html.count("<svg") == 11  # 5 series + 5 histograms + rates
    assert "End session now" not in html  # a viewer gets no end button
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no CDN
    assert f'href="{PREFIX}/sessions/krios1/s1"' in index.text
    assert script.status_code == 200 and "fetch(" in script.text


def test_each_movie_shows_its_curation_verdict(client: Any, site: dict[str, Any]) -> None:
    ids = site["ids"]
    site["ledger"].set_verdicts([(ids[-1], False, "fit 9.1 Å > 6 Å"), (ids[-2], True, None)])
    html = client.get(f"{PREFIX}/sessions/krios1/s1", headers=bearer("viewer")).text

    def row(file_id: int) -> str:
        start = html.index(f"<tr data-file-id='{file_id}'>")
        return html[start : html.index("</tr>", start)]

    assert "<th class='l'>Verdict</th>" in html
    assert "data-verdict='rejected'" in row(ids[-1]) and "fit 9.1 Å &gt; 6 Å" in row(ids[-1])
    assert "data-verdict='accepted'" in row(ids[-2])
    assert "pending" in row(ids[0]) and "data-verdict" not in row(ids[0])  # not decided yet
    movies = client.get(f"{PREFIX}/api/sessions/krios1/s1/movies", headers=bearer("viewer"))
    by_id = {m["file_id"]: m for m in movies.json()["movies"]}  # the JSON carries it too
    assert by_id[ids[-1]]["accepted"] is False
    assert by_id[ids[-1]]["reject_reason"] == "fit 9.1 Å > 6 Å"
    assert by_id[ids[0]]["accepted"] is None


def test_the_page_shows_what_went_to_tape_and_what_disk_is_safe_to_free(
    client: Any, site: dict[str, Any]
) -> None:
    from sqlalchemy import text

    from cryoflow.ledger.store import get_engine

    ledger, sid = site["ledger"], site["sid"]
    root = site["root"]
    (root / "logs").mkdir(parents=True)
    with get_engine(ledger.url).begin() as c:  # the session's folder is a real one here
        c.execute(text("UPDATE cryoflow_sessions SET dest_root = :r WHERE id = :i"),
                  {"r": str(root), "i": sid})  # fmt: skip
    url = f"{PREFIX}/sessions/krios1/s1"
    running = client.get(url, headers=bearer("viewer")).text
    assert "Archive and disk" in running and "reported when the session closes" in running
    files = [f for f in ledger.files(sid) if f.state == "verified"]
    total = sum(f.size for f in files)
    summary = {"archive": {
        "tags": {"tagged": len(files) - 1, "untagged": 1, "partially_tagged": 0,
                 "by_class": {"raw": len(files) - 1}, "not_tagged": ["x.xml"]},
        "small_files_tar": None,
        "hsm": {"mode": "premigrate", "ok": True, "files": {"resident": 0, "premigrated": 3,
                "migrated": 2, "other": 0}, "missing": [], "skipped": [], "messages": [],
                "unparsed": [], "commands": []},
    }}  # fmt: skip
    (root / "logs" / "session_summary.json").write_text(json.dumps(summary))
    ledger.close_session(sid, "idle")
    html = client.get(url, headers=bearer("viewer")).text
    section = html[html.index("Archive and disk") :]
    assert f"{len(files) - 1} files" in section and "1 not" in section  # one file lost its tags
    assert "3 premigrated, 2 migrated" in section
    # krios1's cleanup: files verified > 48 h ago may go; these were verified just now
    unchecked = "Not checked by cleanup yet (verified more than 48 h ago, closed)</td>"
    assert unchecked + "<td class='l'>0 B" in section
    body = client.get(f"{PREFIX}/api/sessions/krios1/s1", headers=bearer("viewer")).json()
    assert body["archive"]["disk"] == {"verified_bytes": total, "freed_bytes": 0,
        "safe_to_free_bytes": 0, "kept_bytes": 0, "unchecked_bytes": 0}  # fmt: skip
    with get_engine(ledger.url).begin() as c:  # verified three days ago: cleanup may look now
        c.execute(text("UPDATE cryoflow_files SET verified_at = :t WHERE session_id = :i"),
                  {"t": datetime.now(UTC) - timedelta(days=3), "i": sid})  # fmt: skip
    disk = client.get(f"{PREFIX}/api/sessions/krios1/s1", headers=bearer("viewer")).json()
    # old enough, but nothing is safe before cleanup checked the copies (tests/archive:
    # a dry run's decisions, a damaged copy kept)
    assert disk["archive"]["disk"]["unchecked_bytes"] == total
    assert disk["archive"]["disk"]["safe_to_free_bytes"] == 0
    body = disk
    assert body["archive"]["summary"]["hsm"]["files"]["migrated"] == 2


def test_the_sessions_curation_alert_shows_on_its_page(client: Any, site: dict[str, Any]) -> None:
    message = "9 of the last 25 movies accepted (36%; alert below 50%)"
    site["ledger"].save_alerts(site["sid"], {
        "low_acceptance": {"active": True, "message": message, "since": "2026-12-02T07:00:00Z"},
        "no_new_movie": {"active": False, "message": "no new movie for 2 min"},
    })  # fmt: skip
    r = client.get(f"{PREFIX}/sessions/krios1/s1", headers=bearer("viewer"))
    assert r.status_code == 200, r.text
    assert 'data-alert="low_acceptance"' in r.text and message in r.text
    assert 'data-alert="no_new_movie"' not in r.text  # not active
    body = client.get(f"{PREFIX}/api/sessions/krios1/s1", headers=bearer("viewer")).json()
    assert body["session"]["curation_alerts"]["low_acceptance"]["active"] is True


def test_movies_link_to_the_task_logs_that_processed_them(
    client: Any, site: dict[str, Any], airflow_db: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    ledger: Ledger = site["ledger"]
    ids = site["ids"]
    run_id = f"asset_triggered__2026-12-02T05:35:00.{len(ids):06d}+00:00"
    claimed = datetime.now(UTC)
    with create_session() as s:
        s.add(DagRun(dag_id="process_krios1", run_id=run_id, run_type="asset_triggered",
                     start_date=claimed - timedelta(minutes=1), state="success"))  # fmt: skip
    # the newest movie's motion correction: settled, its job folder named after the run
    from cryoflow.operators.compute_job import _safe

    job_dir = f"/scratch/jobs/process_krios1/{_safe(run_id)}/motioncor-try2"
    stage = next(st for st in ledger.stages([ids[-1]]) if st.stage == "motioncor")
    ledger.set_job([stage.id], "4242", job_dir)
    from sqlalchemy import update

    from cryoflow.ledger.store import StageRow, get_engine

    with get_engine(ledger.url).begin() as c:
        c.execute(update(StageRow).where(StageRow.id == stage.id).values(claimed_at=claimed))
    # the one before: claimed by a run right now (not settled)
    ctf = next(st for st in ledger.stages([ids[-2]]) if st.stage == "ctf")
    with get_engine(ledger.url).begin() as c:
        c.execute(update(StageRow).where(StageRow.id == ctf.id).values(
            state="submitted", claimed_by="process_krios1/manual__x#1", claimed_at=claimed))

    r = client.get(f"{PREFIX}/api/sessions/krios1/s1/movies?limit=2", headers=bearer("viewer"))
    movies = r.json()["movies"]
    assert [m["file_id"] for m in movies] == [ids[-1], ids[-2]]
    from urllib.parse import quote

    assert movies[0]["stages"]["motioncor"]["log"] == (
        f"/dags/process_krios1/runs/{quote(run_id, safe='')}/tasks/process?try_number=2"
    )
    assert movies[1]["stages"]["ctf"]["log"] == (
        "/dags/process_krios1/runs/manual__x/tasks/process?try_number=1"
    )
    # a job without a recorded job folder: the processing DAG's runs
    assert movies[0]["stages"]["ctf"]["log"] == "/dags/process_krios1/runs"
    assert r.json()["next_before"] == ids[-2]


# ----------------------------------------------------------------------------- thumbnails


def _mrc(path: Path, shape: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)
    data[shape[0] // 3 : shape[0] // 2, shape[1] // 3 : shape[1] // 2] += 5
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)


def _processed(site: dict[str, Any], file_id: int, *, aligned: str | None = None) -> Path:
    """Outputs of one movie under the session's processed/, recorded as processing does."""
    from sqlalchemy import update

    from cryoflow.ledger.store import SessionRow, get_engine

    root: Path = site["root"]
    ledger: Ledger = site["ledger"]
    with get_engine(ledger.url).begin() as c:
        c.execute(update(SessionRow).where(SessionRow.id == site["sid"])
                  .values(dest_root=str(root)))  # fmt: skip
    mc = root / "processed" / "motioncor" / "Data"
    _mrc(mc / f"m{file_id}.mrc", (1024, 1000), 1)
    _mrc(mc / f"m{file_id}_DW.mrc", (1024, 1000), 2)
    _mrc(root / "processed" / "ctffind" / f"m{file_id}_ctf.mrc", (256, 256), 3)
    picks = root / "processed" / "picks" / f"m{file_id}_DW_dogpicker.star"
    picks.parent.mkdir(parents=True, exist_ok=True)
    picks.write_text("data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n"
                     "100.0 200.0\n512.0 512.0\n900.0 80.0\n")  # fmt: skip
    ledger.record_stage(file_id, "motioncor", StageState.DONE, results={
        "total_drift_A": 5.0, "aligned": aligned or str(mc / f"m{file_id}.mrc")})  # fmt: skip
    ledger.record_stage(file_id, "ctf", StageState.DONE, results={
        "defocus1_A": 1e4, "defocus2_A": 1e4, "astigmatism_A": 0.0,
        "diag": str(root / "processed" / "ctffind" / f"m{file_id}_ctf.mrc")})  # fmt: skip
    ledger.record_stage(file_id, "picking", StageState.DONE,
                        results={"particles": 3, "picks": str(picks)})  # fmt: skip
    return root


def test_thumbnails_are_made_once_and_cached(client: Any, site: dict[str, Any]) -> None:
    from PIL import Image

    fid = site["ids"][0]
    root = _processed(site, fid)
    shown = {}
    for kind in ("micrograph", "spectrum", "picks"):
        r = client.get(f"{PREFIX}/api/sessions/krios1/s1/movies/{fid}/{kind}.png",
                       headers=bearer("viewer"))  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(r.content))
        assert max(image.size) <= 512
        shown[kind] = image
        cached = root / "processed" / "thumbnails" / f"{fid}_{kind}.png"
        assert cached.read_bytes() == r.content
        assert stat.S_IMODE(cached.stat().st_mode) == 0o640
    assert shown["micrograph"].size == (500, 512)  # 1024 x 1000 binned by 2
    assert shown["picks"].mode == "RGB" and shown["micrograph"].mode == "L"
    # yellow circles where the picks are (x = column, y = row, binned by 2)
    rgb = np.asarray(shown["picks"])
    ring = rgb[max(0, 100 - 50) : 100 + 50, 50 - 50 + 1 : 50 + 50]
    assert (ring == [255, 200, 0]).all(axis=-1).any()
    # made once: a second request serves the cached file (its mtime does not change)
    cached = root / "processed" / "thumbnails" / f"{fid}_micrograph.png"
    before = cached.stat().st_mtime_ns
    again = client.get(f"{PREFIX}/api/sessions/krios1/s1/movies/{fid}/micrograph.png",
                       headers=bearer("viewer"))  # fmt: skip
    assert again.status_code == 200 and cached.stat().st_mtime_ns == before
    # a movie without outputs yet, and a kind that does not exist
    other = site["ids"][1]
    assert client.get(f"{PREFIX}/api/sessions/krios1/s1/movies/{other}/micrograph.png",
                      headers=bearer("viewer")).status_code == 404  # fmt: skip
    assert client.get(f"{PREFIX}/api/sessions/krios1/s1/movies/{fid}/raw.png",
                      headers=bearer("viewer")).status_code == 422  # fmt: skip
    assert client.get(f"{PREFIX}/api/sessions/krios1/s1/movies/999999/micrograph.png",
                      headers=bearer("viewer")).status_code == 404  # fmt: skip


def test_a_thumbnail_never_reads_outside_the_sessions_processed_folder(
    client: Any, site: dict[str, Any], tmp_path: Path
) -> None:
    fid = site["ids"][0]
    outside = tmp_path / "secret.mrc"
    _mrc(outside, (64, 64), 4)
    root = _processed(site, fid, aligned=str(outside))
    r = client.get(f"{PREFIX}/api/sessions/krios1/s1/movies/{fid}/micrograph.png",
                   headers=bearer("viewer"))  # fmt: skip
    assert r.status_code == 404 and "outside" in r.json()["detail"]
    # nor through a symlink inside it
    link = root / "processed" / "motioncor" / "Data" / "link.mrc"
    link.symlink_to(outside)
    _processed(site, fid, aligned=str(link))
    r = client.get(f"{PREFIX}/api/sessions/krios1/s1/movies/{fid}/micrograph.png",
                   headers=bearer("viewer"))  # fmt: skip
    assert r.status_code == 404
    assert not (root / "processed" / "thumbnails" / f"{fid}_micrograph.png").exists()


# ----------------------------------------------------------------------------- ending


@pytest.fixture
def dags(site: dict[str, Any], airflow_db: Path) -> Iterator[None]:
    _serialize_dags()
    yield


def test_ending_a_session_triggers_end_session_as_the_user(
    client: Any, site: dict[str, Any], dags: None
) -> None:
    from airflow.models import Log
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    url = f"{PREFIX}/api/sessions/krios1/s1/end"
    # a viewer may read but not trigger
    assert client.post(url, json={"confirm": "s1"}, headers=bearer("viewer")).status_code == 403
    op = bearer("user", name="operator-ann")
    assert client.get(f"{PREFIX}/api/sessions/krios1/s1", headers=op).json()["can_end"] is True
    page = client.get(f"{PREFIX}/sessions/krios1/s1", headers=op)
    assert "End session now" in page.text and f'data-end-url="{url}"' in page.text
    assert client.post(url, json={"confirm": "s2"}, headers=op).status_code == 400
    assert client.post(url, content="confirm=s1", headers={
        **op, "Content-Type": "application/x-www-form-urlencoded"}).status_code == 422
    r = client.post(url, json={"confirm": "s1"}, headers=op)
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    assert r.json()["url"].endswith(f"/dags/end_session_krios1/runs/{run_id}".replace("+", "%2B")
                                    .replace(":", "%3A"))  # fmt: skip
    with create_session() as s:
        run = s.scalar(select(DagRun).where(DagRun.dag_id == "end_session_krios1",
                                            DagRun.run_id == run_id))  # fmt: skip
        assert run is not None and run.conf == {"session_name": "s1"}
        assert run.triggering_user_name == "operator-ann"
        assert str(run.run_type) in ("manual", "DagRunType.MANUAL")
        audit = s.scalars(select(Log).where(Log.dag_id == "end_session_krios1",
                                            Log.run_id == run_id)).all()  # fmt: skip
        assert [a.owner for a in audit] == ["operator-ann"]
    # a closed session cannot be ended again
    site["ledger"].close_session(site["sid"], "idle")
    assert client.post(url, json={"confirm": "s1"}, headers=op).status_code == 409


# ----------------------------------------------------------------------------- starting


def test_the_start_form_flags_each_bad_value_by_its_field_and_starts_with_the_defaults(
    client: Any, site: dict[str, Any], dags: None
) -> None:
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    page_url, api = f"{PREFIX}/start/krios1", f"{PREFIX}/api/start/krios1"
    viewer = client.get(page_url, headers=bearer("viewer")).text
    assert "needs the right to trigger session_krios1" in viewer and "<form" not in viewer
    refused = client.post(api, json={"session_name": "x1"}, headers=bearer("viewer"))
    assert refused.status_code == 403
    op = bearer("user", name="operator-ann")
    form = client.get(page_url, headers=op).text
    assert f'data-start-url="{PREFIX}/api/start/krios1"' in form
    # the microscope's defaults are in the fields; optional ones are marked and not required
    assert 'name="pixel_size_A"' in form and 'value="0.73"' in form
    start = form.index('data-field="project"')
    project = form[start : form.index("</div></div>", start)]
    assert "(optional)" in project and "required" not in project
    assert 'data-exclusiveminimum="0.1"' in form  # the browser checks the same bounds

    bad = {"session_name": "bad name!", "pixel_size_A": "0", "frames": "2.5", "project": "",
           "end_time": "tomorrow", "collaborators": "ann, Bob!"}  # fmt: skip
    r = client.post(api, json=bad, headers=op)
    assert r.status_code == 422, r.text
    fields = r.json()["fields"]
    assert set(fields) >= {"session_name", "pixel_size_A", "frames"}, fields
    assert "greater than 0.1" in fields["pixel_size_A"]
    assert "project" not in fields  # an optional field left empty is fine
    def runs_of(name: str) -> list[tuple[dict, str]]:  # other tests share this database
        with create_session() as s:
            runs = s.scalars(select(DagRun).where(DagRun.dag_id == "session_krios1")).all()
            return [(r.conf, r.triggering_user_name) for r in runs
                    if (r.conf or {}).get("session_name") == name]  # fmt: skip

    assert not runs_of("bad name!")

    r = client.post(api, json={"session_name": "from_the_view", "project": ""}, headers=op)
    assert r.status_code == 200, r.text
    assert r.json()["view"].endswith("/sessions/krios1/from_the_view")
    ((conf, by),) = runs_of("from_the_view")
    assert conf == {"session_name": "from_the_view", "project": None}
    assert by == "operator-ann"
    with create_session() as s:
        assert s.get(DagModel, "session_krios1").is_paused is False  # switched on to start
