"""Helpers for the UI tests: a live ``airflow standalone`` and a headless Chromium driving it.

The browser is driven through chromedriver's W3C WebDriver HTTP protocol with ``httpx`` (already in
the pinned set), so the tests need no extra Python package: only Debian's ``chromium`` and
``chromium-driver`` (``scripts/services.sh chromium`` installs them).

``live_airflow`` starts a standalone for one test module; ``shared_airflow`` (a session-scoped
fixture: import it) starts one that every UI test module of the run shares, ``live_airflow``
calls with the same settings included.

Under CI (CI=true) a browser or an Airflow that cannot be started FAILS the test; elsewhere it
is skipped with the reason, as for the other services (tests/services_fixtures.py).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES_SH = ROOT / "scripts" / "services.sh"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The flags measured to work for headless Chromium on this machine kind (ENVIRONMENT-NOTES).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--window-size=1400,2000",
)
# W3C WebDriver: the key of an element reference in JSON
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"

T = TypeVar("T")


def unavailable(reason: str) -> None:
    """Skip locally, fail under CI (where the test must run)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"UI test prerequisites unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"UI test prerequisites unavailable: {reason}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    what: str,
    check: Callable[[], T],
    timeout: float,
    interval: float = 0.25,
    stop_on: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``check`` until it returns something truthy (exceptions count as not yet, but for
    those of ``stop_on``: they end the wait at once)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except stop_on:
            raise
        except Exception as exc:  # noqa: BLE001 - polled; the last one is reported
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}: {last!r}")
        time.sleep(interval)


# --- the browser ---------------------------------------------------------------------------------


def ensure_chromium() -> None:
    """Chromium and chromedriver present, installed by scripts/services.sh when root."""
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return
    if os.geteuid() != 0:
        unavailable(f"{CHROMIUM} / {CHROMEDRIVER} missing (as root: scripts/services.sh chromium)")
    try:
        done = subprocess.run(
            [str(SERVICES_SH), "chromium"], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        unavailable(f"scripts/services.sh chromium: {exc}")
    if done.returncode != 0 or not Path(CHROMEDRIVER).exists():
        unavailable(f"scripts/services.sh chromium exited {done.returncode}: {done.stderr[-2000:]}")


class WebDriverError(RuntimeError):
    pass


@dataclass
class Element:
    browser: Browser
    id: str

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        return self.browser._call(method, f"/element/{self.id}{path}", payload)

    def click(self) -> None:
        self._call("POST", "/click", {})

    def clear(self) -> None:
        self._call("POST", "/clear", {})

    def send_keys(self, text: str) -> None:
        self._call("POST", "/value", {"text": text})

    @property
    def text(self) -> str:
        return self._call("GET", "/text")

    def attribute(self, name: str) -> str | None:
        return self._call("GET", f"/attribute/{name}")

    def prop(self, name: str) -> Any:
        return self._call("GET", f"/property/{name}")

    def find(self, css: str) -> Element:
        found = self._call("POST", "/element", {"using": "css selector", "value": css})
        return Element(self.browser, found[ELEMENT_KEY])

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))
        return path


class Browser:
    """One chromedriver process and one headless Chromium session."""

    def __init__(self, profile_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [CHROMEDRIVER, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        self.session_id = ""
        try:
            wait_for("chromedriver", lambda: self.http.get("/status").json()["value"]["ready"], 20)
            caps = {
                "capabilities": {
                    "alwaysMatch": {
                        "browserName": "chrome",
                        "goog:chromeOptions": {
                            "binary": CHROMIUM,
                            "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"],
                        },
                    }
                }
            }
            value = self._raw("POST", "/session", caps)
            self.session_id = value["sessionId"]
        except BaseException:
            self.close()
            raise

    def _raw(self, method: str, path: str, payload: Any = None) -> Any:
        resp = self.http.request(method, path, json=payload)
        body = resp.json()
        value = body.get("value")
        if resp.status_code >= 400 or (isinstance(value, dict) and "error" in value):
            raise WebDriverError(f"{method} {path}: {resp.status_code} {json.dumps(value)[:1000]}")
        return value

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        return self._raw(method, f"/session/{self.session_id}{path}", payload)

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    @property
    def url(self) -> str:
        return self._call("GET", "/url")

    def find_all(self, css: str) -> list[Element]:
        found = self._call("POST", "/elements", {"using": "css selector", "value": css})
        return [Element(self, f[ELEMENT_KEY]) for f in found]

    def find(self, css: str) -> Element:
        found = self._call("POST", "/element", {"using": "css selector", "value": css})
        return Element(self, found[ELEMENT_KEY])

    def find_xpath(self, xpath: str) -> list[Element]:
        found = self._call("POST", "/elements", {"using": "xpath", "value": xpath})
        return [Element(self, f[ELEMENT_KEY]) for f in found]

    def wait_css(self, css: str, timeout: float = 30) -> Element:
        return wait_for(f"element {css!r}", lambda: self.find_all(css)[0], timeout)

    def wait_xpath(self, xpath: str, timeout: float = 30) -> Element:
        return wait_for(f"element {xpath!r}", lambda: self.find_xpath(xpath)[0], timeout)

    def script(self, source: str, *args: Any) -> Any:
        def arg(a: Any) -> Any:
            return {ELEMENT_KEY: a.id} if isinstance(a, Element) else a

        return self._call(
            "POST", "/execute/sync", {"script": source, "args": [arg(a) for a in args]}
        )

    def switch_to_frame(self, frame: Element | None) -> None:
        """Into an iframe's document, or back to the top document (``None``)."""
        ref = {ELEMENT_KEY: frame.id} if frame is not None else None
        self._call("POST", "/frame", {"id": ref})

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))
        return path

    def full_screenshot(self, path: Path) -> Path:
        """The whole page, not only the window: the window is stretched to the page's height."""
        height = self.script(
            "return Math.max(document.body.scrollHeight,"
            " ...[...document.querySelectorAll('*')].map(e => e.scrollHeight));"
        )
        self._call("POST", "/window/rect", {"width": 1400, "height": min(int(height) + 200, 8000)})
        try:
            return self.screenshot(path)
        finally:
            self._call("POST", "/window/rect", {"width": 1400, "height": 2000})

    def close(self) -> None:
        if self.session_id:
            with suppress(Exception):
                self.http.delete(f"/session/{self.session_id}", timeout=20)
            self.session_id = ""
        with suppress(Exception):
            self.http.close()
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the UI tests write their screenshots and JSON: ``$CRYOFLOW_ARTIFACTS`` (scripts/test.sh
    sets it to ``artifacts/ui/`` in the checkout, git-ignored, left in place after the run for CI
    to collect), else a folder in pytest's tmp dir (pytest prunes all but its last three). A
    folder created here is 0750: not readable by other users."""
    configured = os.environ.get("CRYOFLOW_ARTIFACTS")
    path = Path(configured) if configured else tmp_path_factory.mktemp("ui") / "screenshots"
    path.mkdir(mode=0o750, parents=True, exist_ok=True)
    return path


# --- a live Airflow ------------------------------------------------------------------------------


@dataclass
class LiveAirflow:
    base_url: str
    home: Path
    log: Path
    password: str
    proc: subprocess.Popen

    def api(self) -> httpx.Client:
        token = httpx.post(
            f"{self.base_url}/auth/token",
            json={"username": "admin", "password": self.password},
            timeout=30,
        )
        token.raise_for_status()
        return httpx.Client(
            base_url=f"{self.base_url}/api/v2",
            headers={"Authorization": f"Bearer {token.json()['access_token']}"},
            timeout=30,
        )


def login(b: Browser, airflow: LiveAirflow) -> None:
    """Through Airflow's login page, as a person does."""
    b.get(f"{airflow.base_url}/")
    b.wait_css("input[name=username]").send_keys("admin")
    b.find("input[name=password]").send_keys(airflow.password)
    b.find("button[type=submit]").click()
    wait_for("the login to go through", lambda: "/auth/login" not in b.url, 30)


def session_runs(airflow: LiveAirflow, dag_id: str, session: str) -> list[dict]:
    """The runs of ``dag_id`` (the last 100) whose conf names ``session``."""
    with airflow.api() as api:
        resp = api.get(f"/dags/{dag_id}/dagRuns", params={"limit": 100})
        resp.raise_for_status()
    return [
        r for r in resp.json()["dag_runs"] if (r.get("conf") or {}).get("session_name") == session
    ]


# --- the session view's start form (plugins/cryoflow/view/start_form.py) ---------------------


def open_start_form(b: Browser, airflow: LiveAirflow, microscope: str) -> None:
    """The view's "start a session" page of ``microscope``, once its form is there."""
    b.get(f"{airflow.base_url}/cryoflow/view/start/{microscope}")
    b.wait_css("form.start #f-session_name", 30)


def fill_start_field(b: Browser, field: str, value: str) -> Element:
    """Type ``value`` into a field of the start form as a person does, then leave the field with
    Tab (the form checks a field as it is left)."""
    el = b.find(f"#f-{field}")
    el.clear()
    el.send_keys(value + "\ue004")  # Tab
    return el


def start_field_flag(b: Browser, field: str) -> str:
    """Wait for the message beside ``field``, check that it sits in that field's own block and
    that its input is marked invalid; return the message."""
    message = wait_for(f"{field} flagged", lambda: b.find(f"#err-{field}").text, 10)
    assert b.find(f"#f-{field}").attribute("aria-invalid") == "true"
    block = b.script(
        "return document.getElementById(arguments[0]).closest('.field').dataset.field",
        f"err-{field}",
    )
    assert block == field, (field, block)
    return message


def start_field_cleared(b: Browser, field: str) -> None:
    wait_for(f"the flag beside {field} to clear", lambda: b.find(f"#err-{field}").text == "", 10)
    assert b.find(f"#f-{field}").attribute("aria-invalid") == "false"


def submit_start_form(b: Browser, expect: str, timeout: float = 30) -> str:
    """Click "Start session"; wait for ``expect`` in the answer beside the button; return it."""
    b.find("button.start").click()
    return wait_for(
        f"{expect!r} beside the start button",
        lambda: (t := b.find("#start-result").text) and expect in t and t,
        timeout,
    )


def airflow_env(home: Path, port: int, site: dict[str, str]) -> dict[str, str]:
    """The environment of scripts/demo.sh, for a fresh home, on ``port``."""
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "PATH": f"{venv_bin}:{env.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": "cryoflow-ui-tests-only",
            "AIRFLOW__API__SECRET_KEY": "cryoflow-ui-tests-only",
            # other standalones (a demo, a colleague's test) may hold the default 8793/8794
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "10",
            "CRYOFLOW_CONFIG_DIR": str(ROOT / "config"),
            **site,
        }
    )
    return env


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                members.append(int(stat.parent.name))
    return members


def stop_process_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """Stop standalone as scripts/demo.sh does: SIGINT to the whole group (the parent ignores it,
    its components shut down gracefully), SIGTERM to the parent once they are gone (or after
    ``grace``), SIGKILL to whatever is left of the group."""
    pgid = proc.pid  # started with start_new_session: its own group
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGINT)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and set(_group_members(pgid)) - {proc.pid}:
            time.sleep(0.25)
        proc.terminate()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    # children that outlived the parent (they keep the ports) go too
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(5)


#: The site settings that name a place (a folder, the ledger): an Airflow started for one set of
#: them serves a test that brings its own (see ``shared_airflow``).
SITE_PATHS = frozenset(
    {"CRYOFLOW_SHARE_ROOT", "CRYOFLOW_GPFS_ROOT", "CRYOFLOW_LEDGER_URL", "CRYOFLOW_LOCAL_WORKDIR"}
)


@dataclass
class _Shared:
    airflow: LiveAirflow
    site: dict[str, str]


#: The test session's shared standalone while ``shared_airflow`` holds it.
_shared: _Shared | None = None


def demo_site(root: Path) -> dict[str, str]:
    """scripts/demo.sh's CRYOFLOW_* settings with every place under ``root`` (created)."""
    for d in ("share/krios1", "share/krios2", "gpfs", "jobs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return {
        "CRYOFLOW_CONFIG_DIR": str(ROOT / "config"),
        "CRYOFLOW_SHARE_ROOT": str(root / "share"),
        "CRYOFLOW_GPFS_ROOT": str(root / "gpfs"),
        "CRYOFLOW_LEDGER_URL": f"sqlite:///{root}/ledger.db",
        "CRYOFLOW_SETTLE_SECONDS": "5",
        "CRYOFLOW_POLL_SECONDS": "2",
        "CRYOFLOW_BATCH_WINDOW_SECONDS": "15",
        "CRYOFLOW_LOCAL_WORKDIR": str(root / "jobs"),
        "CRYOFLOW_GPU_BACKEND": "local",
        "CRYOFLOW_CPU_BACKEND": "local",
        "CRYOFLOW_MOTIONCOR2": "cryoflow-motioncor2",
        "CRYOFLOW_CTFFIND": "cryoflow-ctffind",
        "CRYOFLOW_DOGPICKER": "cryoflow-dogpicker",
    }


def _same_settings(a: dict[str, str], b: dict[str, str]) -> bool:
    """The same site but for its places."""
    return {k: v for k, v in a.items() if k not in SITE_PATHS} == {
        k: v for k, v in b.items() if k not in SITE_PATHS
    }


def _uses_harness(item: pytest.Item) -> bool:
    """Whether a test's module uses this harness (imported something of it)."""
    if "shared_airflow" in getattr(item, "fixturenames", ()):
        return True
    module = getattr(item, "module", None)
    return module is not None and any(
        getattr(v, "__module__", None) == __name__ for v in vars(module).values()
    )


class _StopAfter:
    """A pytest plugin, registered for the run: ``stop`` once ``last`` has been torn down
    (its module's fixtures included), not at the very end of a long test session."""

    def __init__(self, last: pytest.Item, stop: Callable[[], None]) -> None:
        self.last, self.stop = last, stop

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Iterator[None]:
        try:
            return (yield)
        finally:
            if item is self.last:
                self.stop()


@pytest.fixture(scope="session")
def shared_airflow(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveAirflow]:
    """One ``airflow standalone`` (``demo_site`` settings) shared by the UI test modules.

    Use it by importing it into a test module. While it runs, ``live_airflow`` called with the
    same settings (other places allowed, as tests/test_ui_trigger_form.py's own fixture does)
    yields it in place of starting another standalone, so UI test modules share one start-up.
    It is stopped after the last test of the session whose module uses this harness (the rest of
    a full test run does not share the CPUs with it). ``shared_site`` gives its settings."""
    global _shared
    ensure_chromium()  # first: no Airflow start when the browser is missing
    root = tmp_path_factory.mktemp("ui-shared-airflow")
    site = demo_site(root)
    stack = ExitStack()

    def stop() -> None:
        global _shared
        _shared = None
        stack.close()

    airflow = stack.enter_context(live_airflow(root / "airflow", site))
    _shared = _Shared(airflow, site)
    users = [item for item in request.session.items if _uses_harness(item)]
    plugin = _StopAfter(users[-1], stop) if users else None
    if plugin is not None:
        request.config.pluginmanager.register(plugin)
    try:
        yield airflow
    finally:
        stop()
        if plugin is not None:
            request.config.pluginmanager.unregister(plugin)


def shared_site() -> dict[str, str]:
    """The CRYOFLOW_* settings of the running ``shared_airflow``."""
    assert _shared is not None, "shared_airflow is not running"
    return dict(_shared.site)


#: How many ports ``live_airflow`` tries: the port is picked free, but another process may take
#: it in the seconds before the API server binds it ("[Errno 98] ... address already in use": the
#: api-server dies, the standalone lives on without it).
PORT_TRIES = 3


class _Exited(RuntimeError):
    pass


class _PortTaken(RuntimeError):
    pass


def _port_taken(log: Path, offset: int) -> str:
    """The line of the standalone's log (from ``offset``: this try) where a component could not
    bind its port; empty if none."""
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return next((ln.strip() for ln in text.splitlines() if "address already in use" in ln), "")


def _start_standalone(home: Path, port: int, site: dict[str, str], log: Path) -> subprocess.Popen:
    # unbuffered: the log shows a component's failure as it happens (see _port_taken)
    env = {**airflow_env(home, port, site), "PYTHONUNBUFFERED": "1"}
    airflow = shutil.which("airflow", path=env["PATH"]) or "airflow"
    with log.open("ab") as out:
        # the parent ignores SIGINT (as in scripts/demo.sh): see stop_process_group
        return subprocess.Popen(
            ["bash", "-c", 'trap "" INT; exec "$0" standalone', airflow],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip


@contextmanager
def live_airflow(home: Path, site: dict[str, str], timeout: float = 240) -> Iterator[LiveAirflow]:
    """``airflow standalone`` on a free port with scripts/demo.sh's settings (it migrates the fresh
    SQLite database itself); yields once the API server answers. ~30 s on a quiet 2-core machine,
    minutes when the machine is busy (``timeout``). A port taken by another process before the
    standalone bound it is seen in its log within a second or so, and the standalone started
    again on another port (``PORT_TRIES`` in all).

    While ``shared_airflow`` runs with the same settings but for the places, that one is
    yielded (and left running) instead."""
    if _shared is not None and _same_settings(_shared.site, site):
        yield _shared.airflow
        return
    home.mkdir(parents=True, exist_ok=True)
    log = home / "standalone.log"  # every try's output, one after the other
    log.touch()
    pw_file = home / "simple_auth_manager_passwords.json.generated"
    lost: list[str] = []
    for _ in range(PORT_TRIES):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        offset = log.stat().st_size
        proc = _start_standalone(home, port, site, log)

        def healthy(proc: subprocess.Popen = proc, base: str = base, offset: int = offset) -> bool:
            if proc.poll() is not None:
                raise _Exited(f"standalone exited {proc.returncode}")
            if taken := _port_taken(log, offset):
                raise _PortTaken(taken)
            return httpx.get(f"{base}/api/v2/monitor/health", timeout=5).status_code == 200

        try:
            wait_for(f"Airflow UI on {base}", healthy, timeout, stop_on=(_Exited, _PortTaken))
            password = wait_for(
                "admin password", lambda: json.loads(pw_file.read_text())["admin"], 30
            )
        except _PortTaken as exc:
            stop_process_group(proc)
            lost.append(f"port {port}: {exc}")
            continue
        except (AssertionError, _Exited) as exc:
            stop_process_group(proc)
            unavailable(f"airflow standalone: {exc}\n{log.read_text()[-3000:]}")
        except BaseException:
            stop_process_group(proc)
            raise
        break
    else:
        unavailable(
            f"airflow standalone: {PORT_TRIES} tries, and each time another process took a port "
            "it was given before it bound it (the API server's port, then the log line):\n"
            + "\n".join(lost)
            + f"\nsee {log}"
        )
    try:
        yield LiveAirflow(base_url=base, home=home, log=log, password=password, proc=proc)
    finally:
        stop_process_group(proc)
