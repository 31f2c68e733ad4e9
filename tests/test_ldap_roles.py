"""Sign-in through the directory (FAB auth manager + LDAP) and what each role may do.

Against a real OpenLDAP server (Debian's slapd, ``scripts/services.sh ldap``: loopback :3890,
memberof overlay, people in groups) and a real Airflow API server started with the FAB auth
manager, ``config/auth/webserver_config.py``, a fresh SQLite database (``airflow db migrate``),
the roles of ``cryoflow.auth_roles`` and the bundle's DAGs serialized. One Airflow serves the
whole module; every check goes through the REST API with the token of ``POST /auth/token``
(an LDAP bind as the person). At the end every file under the Airflow home and slapd's log is
searched for each password used, the wrong one included.

Needs root (slapd); skipped without it, a failure under CI=true. The unit tests at the top
(role definitions, the sync against a stand-in security manager) need nothing.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from cryoflow import auth_roles
from tests.conftest import ROOT
from tests.ui_browser import (
    SERVICES_SH,
    airflow_env,
    free_port,
    stop_process_group,
    unavailable,
    wait_for,
)

FAB_AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
WEBSERVER_CONFIG = ROOT / "config" / "auth" / "webserver_config.py"
MICROSCOPES = ("krios1", "krios2")
WRONG_PASSWORD = f"wrong-{uuid.uuid4().hex}"  # searched for in the logs too


# --- the role definitions (no services) ----------------------------------------------------


def test_roles_come_from_the_microscope_files() -> None:
    assert auth_roles.microscope_ids(ROOT / "config") == sorted(MICROSCOPES)
    roles = auth_roles.role_definitions(auth_roles.microscope_ids(ROOT / "config"))
    assert set(roles) == {"Researcher", "Operator_krios1", "Operator_krios2"}


def test_researcher_reads_and_changes_nothing() -> None:
    perms = set(auth_roles.role_definitions(MICROSCOPES)["Researcher"])
    for resource in ("DAGs", "DAG Runs", "Task Instances", "Task Logs", "Plugins"):
        assert ("can_read", resource) in perms
    assert {a for a, _ in perms} <= {"can_read", "menu_access"}


def test_an_operator_runs_only_its_own_microscopes_dags() -> None:
    perms = set(auth_roles.role_definitions(MICROSCOPES)["Operator_krios1"])
    for dag_id in ("session_krios1", "process_krios1", "end_session_krios1"):
        assert ("can_edit", f"DAG:{dag_id}") in perms
        assert ("can_create", f"DAG Run:{dag_id}") in perms
    granted = {r for a, r in perms if a in ("can_edit", "can_create", "can_delete")}
    assert not any("krios2" in r for r in granted)
    # nothing global that would open every DAG
    assert not granted & {"DAGs", "DAG Runs", "Task Instances"}


def test_groups_map_to_roles() -> None:
    mapping = auth_roles.ldap_roles_mapping("CN={group},OU=Groups,DC=f,DC=x", MICROSCOPES)
    assert mapping == {
        "CN=cryo-researchers,OU=Groups,DC=f,DC=x": ["Researcher"],
        "CN=cryo-admins,OU=Groups,DC=f,DC=x": ["Admin"],
        "CN=cryo-operators-krios1,OU=Groups,DC=f,DC=x": ["Operator_krios1"],
        "CN=cryo-operators-krios2,OU=Groups,DC=f,DC=x": ["Operator_krios2"],
    }
    with pytest.raises(ValueError, match="group"):
        auth_roles.ldap_roles_mapping("CN=cryo-admins,DC=x", MICROSCOPES)


@dataclass(eq=False)
class _Named:
    name: str


@dataclass(eq=False)
class _Perm:
    action: _Named
    resource: _Named


@dataclass(eq=False)
class _Role:
    name: str
    permissions: list[_Perm] = field(default_factory=list)


class _FakeSecurityManager:
    """The part of FAB's security manager that cryoflow.auth_roles.sync_roles uses."""

    def __init__(self) -> None:
        self.roles = {"Admin": _Role("Admin"), "Public": _Role("Public")}
        self.perms: dict[tuple[str, str], _Perm] = {}
        self.synced = 0

    def sync_roles(self) -> None:
        self.synced += 1

    def find_role(self, name: str) -> _Role | None:
        return self.roles.get(name)

    def add_role(self, name: str) -> _Role:
        return self.roles.setdefault(name, _Role(name))

    def get_all_roles(self) -> list[_Role]:
        return list(self.roles.values())

    def get_permission(self, action: str, resource: str) -> _Perm | None:
        return self.perms.get((action, resource))

    def create_permission(self, action: str, resource: str) -> _Perm:
        return self.perms.setdefault((action, resource), _Perm(_Named(action), _Named(resource)))

    def add_permission_to_role(self, role: _Role, perm: _Perm) -> None:
        if perm not in role.permissions:
            role.permissions.append(perm)

    def remove_permission_from_role(self, role: _Role, perm: _Perm) -> None:
        role.permissions.remove(perm)


def _granted(role: _Role) -> set[tuple[str, str]]:
    return {(p.action.name, p.resource.name) for p in role.permissions}


def test_sync_creates_then_keeps_each_role_exact() -> None:
    sm = _FakeSecurityManager()
    roles = auth_roles.role_definitions(MICROSCOPES)
    first = auth_roles.sync_roles(sm, roles)
    assert all(change["created"] for change in first.values())
    for name, perms in roles.items():
        assert _granted(sm.roles[name]) == set(perms)
    # a permission added by hand goes again; a second sync changes nothing else
    sm.add_permission_to_role(sm.roles["Researcher"], sm.create_permission("can_edit", "DAGs"))
    second = auth_roles.sync_roles(sm, roles)
    assert second["Researcher"] == {
        "created": False, "added": [], "removed": [("can_edit", "DAGs")]
    }  # fmt: skip
    assert second["Operator_krios1"] == {"created": False, "added": [], "removed": []}
    assert _granted(sm.roles["Researcher"]) == set(roles["Researcher"])
    assert sm.synced == 2 and _granted(sm.roles["Admin"]) == set()  # FAB's own: not touched


# --- a live directory and Airflow ------------------------------------------------------------


def _read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            values[key] = value
    return values


@dataclass
class Directory:
    env: dict[str, str]  # CRYOFLOW_LDAP_* for webserver_config.py
    users: dict[str, dict[str, Any]]  # uid -> dn, password, groups
    secrets: list[str]  # every password of the directory
    log: Path


@pytest.fixture(scope="module")
def directory() -> Directory:
    if os.geteuid() != 0:
        unavailable("scripts/services.sh ldap must run as root (it installs and starts slapd)")
    try:
        import airflow.providers.fab  # noqa: F401
        import ldap  # noqa: F401
    except ImportError as exc:
        unavailable(f"the FAB provider / python-ldap is not installed (scripts/setup.sh): {exc}")
    state = Path(os.environ.get("CRYOFLOW_SERVICES_DIR", "/var/lib/cryoflow-services"))
    try:
        done = subprocess.run(
            [str(SERVICES_SH), "ldap"], capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        unavailable(f"scripts/services.sh ldap: {exc}")
    if done.returncode != 0:
        unavailable(f"scripts/services.sh ldap exited {done.returncode}: {done.stderr[-2000:]}")
    env = _read_env(state / "ldap" / "env")
    users = json.loads(Path(env["CRYOFLOW_LDAP_USERS_FILE"]).read_text())
    secrets = [u["password"] for u in users.values()]
    secrets += [(state / "ldap" / name).read_text().strip() for name in ("bind_password", "rootpw")]
    return Directory(env=env, users=users, secrets=secrets, log=Path(env["CRYOFLOW_LDAP_LOG"]))


@dataclass
class FabAirflow:
    base_url: str
    home: Path
    proc: subprocess.Popen
    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, directory: Directory, uid: str) -> str:
        if uid not in self.tokens:
            resp = httpx.post(
                f"{self.base_url}/auth/token",
                json={"username": uid, "password": directory.users[uid]["password"]},
                timeout=60,
            )
            assert resp.status_code == 201, f"sign-in of {uid}: {resp.status_code} {resp.text}"
            self.tokens[uid] = resp.json()["access_token"]
        return self.tokens[uid]

    def stop(self) -> None:
        stop_process_group(self.proc)


def _run(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 300) -> None:
    with log.open("ab") as out:
        done = subprocess.run(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{tail}")


@pytest.fixture(scope="module")
def fab_airflow(
    directory: Directory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FabAirflow]:
    """An API server with the FAB auth manager and LDAP sign-in (no scheduler: runs stay queued)."""
    root = tmp_path_factory.mktemp("fab-airflow")
    home = root / "home"
    home.mkdir()
    for d in ("share/krios1", "share/krios2", "gpfs", "jobs"):
        (root / d).mkdir(parents=True)
    port = free_port()
    env = airflow_env(home, port, {
        "CRYOFLOW_SHARE_ROOT": str(root / "share"),
        "CRYOFLOW_GPFS_ROOT": str(root / "gpfs"),
        "CRYOFLOW_LEDGER_URL": f"sqlite:///{root}/ledger.db",
        "CRYOFLOW_LOCAL_WORKDIR": str(root / "jobs"),
        **directory.env,
    })  # fmt: skip
    env.update({
        "AIRFLOW__CORE__AUTH_MANAGER": FAB_AUTH_MANAGER,
        # as deployed: the file copied into the Airflow home (FAB's default [fab] config_file)
        "AIRFLOW__FAB__CONFIG_FILE": str(home / "webserver_config.py"),
        "AIRFLOW__API__WORKERS": "1",
    })  # fmt: skip
    shutil.copy(WEBSERVER_CONFIG, home / "webserver_config.py")
    airflow = shutil.which("airflow", path=env["PATH"]) or "airflow"
    setup_log = home / "setup.log"
    started = time.monotonic()
    _run([airflow, "db", "migrate"], env, setup_log)
    _run([sys.executable, "-m", "cryoflow.auth_roles"], env, setup_log)
    _run([airflow, "dags", "reserialize"], env, setup_log)
    log = home / "api-server.log"
    with log.open("wb") as out:
        # the parent ignores SIGINT: stop_process_group stops the group (as for standalone)
        proc = subprocess.Popen(
            ["bash", "-c", 'trap "" INT; exec "$0" api-server --host 127.0.0.1 --port "$1"',
             airflow, str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    live = FabAirflow(base_url=f"http://127.0.0.1:{port}", home=home, proc=proc)
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"api-server exited {proc.returncode}")
            return httpx.get(f"{live.base_url}/api/v2/monitor/health", timeout=5).is_success

        try:
            wait_for(f"the API server on {live.base_url}", healthy, 180)
        except (AssertionError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n{log.read_text()[-3000:]}") from None
        print(f"FAB Airflow ready in {time.monotonic() - started:.0f} s")
        yield live
    finally:
        live.stop()


def _api(live: FabAirflow, directory: Directory, uid: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{live.base_url}/api/v2",
        headers={"Authorization": f"Bearer {live.token(directory, uid)}"},
        timeout=60,
    )


def _trigger(api: httpx.Client, dag_id: str) -> httpx.Response:
    conf: dict[str, Any] = {"session_name": f"auth-{uuid.uuid4().hex[:8]}"}
    if dag_id.startswith("process_"):
        conf = {}
    return api.post(f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})


def _pause(api: httpx.Client, dag_id: str, paused: bool) -> httpx.Response:
    return api.patch(f"/dags/{dag_id}", json={"is_paused": paused})


@pytest.mark.services
@pytest.mark.slow
def test_a_wrong_password_is_refused(fab_airflow: FabAirflow, directory: Directory) -> None:
    for uid, password in (
        ("researcher", WRONG_PASSWORD),
        ("op-krios1", directory.users["op-krios2"]["password"]),  # another person's
        ("researcher", ""),  # an LDAP "unauthenticated bind" must not count as a sign-in
        ("no-such-person", WRONG_PASSWORD),
    ):
        resp = httpx.post(
            f"{fab_airflow.base_url}/auth/token",
            json={"username": uid, "password": password}, timeout=60,
        )  # fmt: skip
        assert resp.status_code in (400, 401), f"{uid}: {resp.status_code}"
        assert "access_token" not in resp.text


@pytest.mark.services
@pytest.mark.slow
def test_each_person_signs_in_with_the_roles_of_their_groups(
    fab_airflow: FabAirflow, directory: Directory
) -> None:
    for uid in directory.users:  # every one signs in (visitor too: with no role but Public)
        fab_airflow.token(directory, uid)
    with _api(fab_airflow, directory, "cryo-admin") as admin:
        resp = httpx.get(
            f"{fab_airflow.base_url}/auth/fab/v1/users",
            headers=admin.headers, params={"limit": 100}, timeout=60,
        )  # fmt: skip
    assert resp.status_code == 200, resp.text
    roles = {u["username"]: {r["name"] for r in u["roles"]} for u in resp.json()["users"]}
    assert roles["op-krios1"] == {"Operator_krios1", "Public"}
    assert roles["op-krios2"] == {"Operator_krios2", "Public"}
    assert roles["researcher"] == {"Researcher", "Public"}
    assert roles["cryo-admin"] == {"Admin", "Public"}
    assert roles["visitor"] == {"Public"}


@pytest.mark.services
@pytest.mark.slow
def test_a_researcher_reads_but_cannot_trigger(
    fab_airflow: FabAirflow, directory: Directory
) -> None:
    with _api(fab_airflow, directory, "researcher") as api:
        resp = api.get("/dags", params={"limit": 100})
        assert resp.status_code == 200, resp.text
        dag_ids = {d["dag_id"] for d in resp.json()["dags"]}
        assert {"session_krios1", "session_krios2", "end_session_krios1", "process_krios1"} <= (
            dag_ids
        )
        assert api.get("/dags/session_krios1/dagRuns").status_code == 200
        assert api.get("/dags/~/dagRuns/~/taskInstances").status_code == 200
        assert _trigger(api, "session_krios1").status_code == 403
        assert _trigger(api, "end_session_krios1").status_code == 403
        assert _pause(api, "session_krios1", False).status_code == 403
        assert api.get("/plugins").status_code == 200  # the UI's "Sessions" entry
        view = api.get(f"{fab_airflow.base_url}/cryoflow/view/api/microscopes")
        assert view.status_code == 200, view.text
        assert {m["id"] for m in view.json()["microscopes"]} == set(MICROSCOPES)


@pytest.mark.services
@pytest.mark.slow
def test_an_operator_runs_only_their_microscope(
    fab_airflow: FabAirflow, directory: Directory
) -> None:
    with _api(fab_airflow, directory, "op-krios1") as api:
        assert api.get("/dags", params={"limit": 100}).status_code == 200
        assert _pause(api, "session_krios1", False).status_code == 200
        assert _pause(api, "session_krios2", False).status_code == 403
        resp = _trigger(api, "session_krios1")
        assert resp.status_code == 200, resp.text
        assert _trigger(api, "session_krios2").status_code == 403
        assert _trigger(api, "process_krios1").status_code == 200
        assert _trigger(api, "process_krios2").status_code == 403
        assert _trigger(api, "end_session_krios1").status_code == 200  # ends their sessions
        assert _trigger(api, "end_session_krios2").status_code == 403  # not another's
        assert _pause(api, "session_krios1", True).status_code == 200
        assert api.get("/dags/session_krios2/dagRuns").status_code == 200  # reads all
    with _api(fab_airflow, directory, "op-krios2") as api:
        assert _trigger(api, "session_krios2").status_code == 200
        assert _trigger(api, "session_krios1").status_code == 403
        assert _pause(api, "session_krios1", False).status_code == 403


@pytest.mark.services
@pytest.mark.slow
def test_an_admin_may_do_everything(fab_airflow: FabAirflow, directory: Directory) -> None:
    with _api(fab_airflow, directory, "cryo-admin") as api:
        for scope in MICROSCOPES:
            assert _pause(api, f"session_{scope}", False).status_code == 200
            resp = _trigger(api, f"session_{scope}")
            assert resp.status_code == 200, resp.text
        assert api.get("/connections").status_code == 200
        assert api.get("/config").status_code in (200, 403)  # 403: [api] expose_config off


@pytest.mark.services
@pytest.mark.slow
def test_no_group_no_access(fab_airflow: FabAirflow, directory: Directory) -> None:
    with _api(fab_airflow, directory, "visitor") as api:
        assert api.get("/dags").status_code == 403
        assert _trigger(api, "session_krios1").status_code == 403
        view = api.get(f"{fab_airflow.base_url}/cryoflow/view/api/microscopes")
        assert view.status_code in (200, 403)
        if view.status_code == 200:
            assert view.json()["microscopes"] == []


@pytest.mark.services
@pytest.mark.slow
def test_no_password_in_any_log(fab_airflow: FabAirflow, directory: Directory) -> None:
    """Last of the module: stops Airflow (its logs complete), then reads every file of its home
    (logs, the api-server's output, the SQLite database) and slapd's log."""
    for uid in directory.users:
        fab_airflow.token(directory, uid)  # every password has been used at least once
    fab_airflow.stop()
    files = [p for p in fab_airflow.home.rglob("*") if p.is_file()]
    files.append(directory.log)
    assert any(p.name == "api-server.log" for p in files)
    assert directory.log.stat().st_size > 0
    secrets = [*directory.secrets, WRONG_PASSWORD]
    leaks = [
        f"{path}: password #{index}"  # which one by its index, never the password itself
        for path in files
        for index, secret in enumerate(secrets)
        if secret.encode() in path.read_bytes()
    ]
    assert not leaks, f"{len(files)} files searched; passwords found: {leaks}"
