"""The session view as a person sees it: a real headless Chromium against a live Airflow.

``airflow standalone`` (LocalExecutor, the local compute backend, the built-in engines: the demo's
settings, ``tests.ui_browser.demo_site``) runs a real session, one flow from the form to the view:
the simulator writes three small synthetic EPU movies into the share; Chromium logs in through the
login page and starts the session from the view's start form, where a bad session name is first
flagged beside its field; then only the session name and the pixel size are filled in, every
optional field is left empty and every other value is the microscope's default. The pixel size is
the one value the simulated movies need: they are simulated at 2 Å/px (512 px wide, 15 particles
of 150 Å: cheap to process) where krios1 records 0.73 Å/px, and processing uses the form's value.
Their frame count and dose are krios1's defaults. The test waits until the ledger has the movies'
CTF and picking done, opens the "Sessions" entry of the navigation and the session's page, and
checks what it shows against the ledger: the counts per stage, the SVG plots of drift, defocus,
astigmatism, fit resolution and particles, and the thumbnails (each image decoded by the
browser). The view's API refuses a request without a token (401) and answers one with a token
(200).

The standalone is ``shared_airflow``: tests/test_ui_trigger_form.py run in the same pytest session
after this module uses it too (one start-up). Screenshots and JSON go to $CRYOFLOW_ARTIFACTS:
scripts/test.sh (so CI) sets it to artifacts/ui/ in the checkout, where they stay after the run
for CI to collect; without it, to a folder in pytest's tmp dir (``tests.ui_browser.artifacts_dir``).
Needs Debian's chromium + chromium-driver; skipped without them, a failure under CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cryoflow.config import load_site
from cryoflow.ingest.share.layout import FileKind
from cryoflow.ledger.store import Ledger, StageState
from cryoflow.session import form_params
from tests.conftest import ROOT
from tests.ui_browser import (
    Browser,
    LiveAirflow,
    artifacts_dir,
    fill_start_field,
    login,
    open_start_form,
    session_runs,
    shared_airflow,  # noqa: F401 - the session-wide standalone, a fixture
    shared_site,
    start_field_cleared,
    start_field_flag,
    submit_start_form,
    wait_for,
)

pytestmark = pytest.mark.slow

MICROSCOPE = "krios1"
DAG_ID = f"session_{MICROSCOPE}"
PROCESS_DAG = f"process_{MICROSCOPE}"
MOVIES = 3
#: the simulated movies' pixel size (Å): the one form value they need (see the module doc)
PIXEL_SIZE = 2.0
#: how long the movies may take from the trigger to CTF and picks in the ledger (measured: 72 s on
#: a quiet 2-core machine, 117 s beside a CI run)
PROCESSING_TIMEOUT = 240
#: the cards of the session page that count movies, and the ledger's count of each
CARDS = ("Seen on the share", "Copied", "Motion-corrected", "CTF", "Picked")
METRICS = ("total_drift", "defocus", "astigmatism", "fit_resolution", "particles")


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifacts_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def airflow(shared_airflow: LiveAirflow) -> Iterator[LiveAirflow]:  # noqa: F811 - the fixture
    with shared_airflow.api() as api:
        for dag_id in (DAG_ID, PROCESS_DAG):
            wait_for(
                f"{dag_id} in the API (import errors: see {shared_airflow.log})",
                lambda dag_id=dag_id: api.get(f"/dags/{dag_id}").status_code == 200,
                180,
                interval=1,
            )
    try:
        yield shared_airflow
    finally:
        # the start form switched the DAG on: runs other tests trigger on the shared Airflow
        # (the trigger form test's) stay queued
        with shared_airflow.api() as api:
            api.patch(f"/dags/{DAG_ID}", json={"is_paused": True})


@pytest.fixture(scope="module")
def simulated_session(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three simulated movies on krios1's share, as its EPU would write them; the session name."""
    site = shared_site()
    detector = load_site().microscopes[MICROSCOPE].detector
    name = f"view_{time.strftime('%Y%m%d_%H%M%S')}"
    share = Path(site["CRYOFLOW_SHARE_ROOT"]) / MICROSCOPE / name
    truth = tmp_path_factory.mktemp("truth")
    # small, but with particles and a CTF the engines find (synthetic content, as scripts/demo.sh)
    subprocess.run(
        [sys.executable, "-m", "cryoflow.simulator", "--layout", "epu", "--out", str(share),
         "--truth-dir", str(truth), "--movies", str(MOVIES), "--interval", "0",
         "--write-seconds", "0", "--frames", str(detector.frames), "--size", "512x512",
         "--pixel-size", str(PIXEL_SIZE), "--dose-per-frame", str(detector.dose_per_frame),
         "--format", "tiff", "--content", "synthetic", "--particles", "15", "--contrast", "1.0",
         "--seed", "3", "--session-name", name],
        check=True, capture_output=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")},
    )  # fmt: skip
    return name


@pytest.fixture(scope="module")
def browser(airflow: LiveAirflow, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    work = tmp_path_factory.mktemp("chromium-view")
    b = Browser(work / "profile", work / "chromedriver.log")
    try:
        login(b, airflow)
        yield b
    finally:
        b.close()


# --- helpers -----------------------------------------------------------------------------------


def start_session(b: Browser, airflow: LiveAirflow, name: str, artifacts: Path) -> dict[str, Any]:
    """Start ``name`` from the view's start form as an operator does; the run's conf.

    A bad session name is flagged beside its field first; then the name and the pixel size are
    typed in and nothing else is touched: the optional fields stay empty."""
    open_start_form(b, airflow, MICROSCOPE)
    specs = form_params(load_site().microscopes[MICROSCOPE])
    # optional (JSON-schema null allowed) and empty unless the operator types something
    empty = [
        n
        for n, sp in specs.items()
        if isinstance(sp["type"], list) and "null" in sp["type"] and sp["default"] is None
    ]
    assert empty, specs
    shown = b.script(
        "return Object.fromEntries([...document.querySelectorAll('form.start input')]"
        ".map(i => [i.name, i.type === 'checkbox' ? i.checked : i.value]));"
    )
    assert set(shown) == set(specs), shown
    assert all(shown[n] == "" for n in empty), shown  # the optional fields start empty
    fill_start_field(b, "session_name", f"{name} !")
    assert "must match" in start_field_flag(b, "session_name")
    b.screenshot(artifacts / "view_00_start_bad_name_flagged.png")
    fill_start_field(b, "session_name", name)
    start_field_cleared(b, "session_name")
    fill_start_field(b, "pixel_size_A", f"{PIXEL_SIZE:g}")
    b.full_screenshot(artifacts / "view_00_start_form_filled.png")
    submit_start_form(b, "started")
    b.screenshot(artifacts / "view_00_started.png")
    (run,) = session_runs(airflow, DAG_ID, name)
    conf = run["conf"]
    assert all(conf[n] is None for n in empty), conf  # left empty: null, the defaults apply
    # the two values typed in; the rest as the form showed them: the microscope's defaults
    typed = {"session_name": name, "pixel_size_A": PIXEL_SIZE}
    assert conf == {n: sp["default"] for n, sp in specs.items()} | typed, conf
    return conf


def processed(ledger: Ledger, name: str) -> dict[str, Any] | None:
    """The ledger's counts of ``name`` once all its movies have CTF and picks, else None."""
    session = ledger.find_session(MICROSCOPE, name)
    if session is None:
        return None
    stages = ledger.stage_counts(session.id)
    done = {st: stages.get(st, {}).get(str(StageState.DONE), 0) for st in stages}
    if done.get("ctf", 0) < MOVIES or done.get("picking", 0) < MOVIES:
        return None
    movies = [f for f in ledger.files(session.id) if f.kind == str(FileKind.MOVIE)]
    return {
        "name": name,
        "id": session.id,
        "stages": stages,
        "counts": {
            "Seen on the share": len(movies),
            "Copied": sum(f.state == "verified" for f in movies),
            "Motion-corrected": done.get("motioncor", 0),
            "CTF": done["ctf"],
            "Picked": done["picking"],
        },
    }


def cards(b: Browser) -> dict[str, str]:
    return b.script(
        "return Object.fromEntries([...document.querySelectorAll('.card[data-count]')]"
        ".map(c => [c.dataset.count, c.querySelector('.big').innerText.trim()]));"
    )


def images(b: Browser) -> list[dict[str, Any]]:
    return b.script(
        "return [...document.querySelectorAll('.tiles img')].map(i => ({alt: i.alt,"
        " src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth,"
        " height: i.naturalHeight, tile: i.closest('.tile').dataset.fileId}));"
    )


# --- tests -------------------------------------------------------------------------------------


def test_view_api_refuses_a_request_without_a_token(airflow: LiveAirflow) -> None:
    url = f"{airflow.base_url}/cryoflow/view/api/microscopes"
    anonymous = httpx.get(url, timeout=30)
    assert anonymous.status_code == 401, anonymous.text
    # a page opened without signing in is refused too (an HTML answer with a sign-in link)
    page = httpx.get(
        f"{airflow.base_url}/cryoflow/view/", headers={"Accept": "text/html"}, timeout=30
    )
    assert page.status_code == 401
    bad = httpx.get(url, headers={"Authorization": "Bearer not-a-token"}, timeout=30)
    assert bad.status_code in (401, 403), bad.text
    with airflow.api() as api:
        # the same 30 s as above: on a busy 2-core runner the first signed-in call (the
        # view's first ledger query in this API server) once took longer than httpx's 5 s
        signed_in = httpx.get(
            url, headers={"Authorization": api.headers["Authorization"]}, timeout=30
        )
    assert signed_in.status_code == 200, signed_in.text
    assert MICROSCOPE in [m["id"] for m in signed_in.json()["microscopes"]]


def test_session_view_shows_what_the_ledger_holds(
    airflow: LiveAirflow, simulated_session: str, browser: Browser, artifacts: Path
) -> None:
    b, name = browser, simulated_session
    conf = start_session(b, airflow, name, artifacts)
    (artifacts / "view_00_run_conf.json").write_text(json.dumps(conf, indent=1, sort_keys=True))
    ledger = Ledger(shared_site()["CRYOFLOW_LEDGER_URL"])
    started = time.monotonic()
    processed_session = wait_for(
        f"the ledger to hold CTF and picks of {MOVIES} movies of {name} "
        f"(see {airflow.log} and the task logs under {airflow.home}/logs)",
        lambda: processed(ledger, name),
        PROCESSING_TIMEOUT,
        interval=2,
    )
    processed_session["processing_seconds"] = time.monotonic() - started
    (artifacts / "view_01_ledger.json").write_text(
        json.dumps(processed_session, indent=1, sort_keys=True, default=str)
    )

    # the navigation's entry: the view's index inside the Airflow UI, listing the session
    b.get(f"{airflow.base_url}/")
    nav = "//*[self::a or self::button][normalize-space()='Sessions']"
    try:
        entry = b.wait_xpath(nav, 60)
    except AssertionError:
        b.screenshot(artifacts / "view_02_no_nav_entry.png")
        texts = b.script(
            "return [...document.querySelectorAll('a,button')].map(e => e.outerHTML.slice(0, 300))"
        )
        (artifacts / "view_02_nav_entries.json").write_text(json.dumps(texts, indent=1))
        raise
    entry.click()
    wait_for("the plugin's page", lambda: "/plugin/cryoflow-sessions" in b.url, 30)
    frame = b.wait_css("iframe", 60)
    assert frame.attribute("src").rstrip("/").endswith("/cryoflow/view")
    b.switch_to_frame(frame)
    try:
        link = b.wait_xpath(f"//a[normalize-space()='{name}']", 30)
        row = b.script("return arguments[0].closest('tr').innerText", link)
    finally:
        b.switch_to_frame(None)
    b.screenshot(artifacts / "view_02_nav_sessions.png")
    counts = processed_session["counts"]
    # Session, State, Opened, Closed, Movies, Copied, MC, CTF, Picked, Owed
    cells = row.split("\t")
    assert cells[0].strip() == name, row
    assert [c.strip() for c in cells[4:9]] == [
        str(counts[k]) for k in ("Seen on the share", "Copied", "Motion-corrected", "CTF", "Picked")
    ], row

    # the session's page
    b.get(f"{airflow.base_url}/cryoflow/view/sessions/{MICROSCOPE}/{name}")
    b.wait_css(".cards", 30)
    assert b.find("h1").text.startswith(name)
    shown = cards(b)
    for label in CARDS:
        assert shown[label] == str(counts[label]), (label, shown, counts)
    assert counts["CTF"] == counts["Picked"] == MOVIES
    assert shown["Failed"] == "0", shown

    # the plots: for each metric an SVG over time and a histogram, with their titles
    plots = b.script(
        "return Object.fromEntries([...document.querySelectorAll('.pair[data-metric]')].map(p =>"
        " [p.dataset.metric, [...p.querySelectorAll('svg')].map(s => ({"
        "  title: (s.querySelector('.plot-title') || {}).textContent,"
        "  w: s.getBoundingClientRect().width,"
        "  marks: s.querySelectorAll('polyline,polygon,circle,rect.bar').length,"
        "  empty: s.textContent.includes('no results yet')"
        " }))]));"
    )
    (artifacts / "view_03_plots.json").write_text(json.dumps(plots, indent=1))
    assert set(METRICS) <= set(plots), plots
    for metric in METRICS:
        pair = plots[metric]
        assert len(pair) == 2, (metric, pair)
        for svg in pair:
            assert svg["title"] and svg["w"] > 100, (metric, svg)
            assert not svg["empty"] and svg["marks"] > 0, (metric, svg)
    assert b.script("return document.querySelectorAll('svg').length") >= 2 * len(METRICS) + 1

    # the thumbnails: micrograph, power spectrum and picks of each movie, decoded by the browser
    b.script("document.querySelector('.tiles').scrollIntoView()")  # they load lazily

    def loaded() -> list[dict[str, Any]] | None:
        imgs = images(b)
        return imgs if imgs and all(i["complete"] for i in imgs) else None

    imgs = wait_for("the thumbnails to load", loaded, 60, interval=0.5)
    (artifacts / "view_04_thumbnails.json").write_text(json.dumps(imgs, indent=1))
    assert len({i["tile"] for i in imgs}) == MOVIES, imgs
    assert sorted(i["alt"] for i in imgs) == sorted(
        ["micrograph", "power spectrum", "picks"] * MOVIES
    ), imgs
    broken = [i for i in imgs if not i["width"] or not i["height"]]
    assert not broken, broken

    # the movie table: one row per movie with its results
    rows = b.find_all("table.movies tr[data-file-id]")
    assert len(rows) == MOVIES
    b.script("window.scrollTo(0, 0)")
    b.screenshot(artifacts / "view_05_session_top.png")
    b.full_screenshot(artifacts / "view_06_session_whole.png")
    tiles = b.find(".tiles")
    b.script("arguments[0].scrollIntoView()", tiles)
    tiles.screenshot(artifacts / "view_07_thumbnails.png")
