"""The Docker Swarm stack (docker-compose.yml) and its image (docker/), checked without an engine.

The stack file must pass every check of ``docker/check_stack.py`` (the Compose Specification,
references, pinned images, no secret values, healthchecks, restart/placement policies, one worker
and triggerer per microscope queue); a broken copy of it, made in memory, must be reported. The
image's pins, its helpers (``cryoflow-secret``, ``cryoflow-entrypoint``) and Airflow's reading of
the ``*_CMD`` settings are exercised for real.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import ROOT

# tests/data/compose-spec.json: the Compose Specification's JSON schema, vendored verbatim from
# github.com/compose-spec/compose-spec, schema/compose-spec.json, as of commit
# a08f8d51631b7127ddac3d2c65537db429d0f1d0 (2025-10-21, its last change; repository head
# 170098ba07d9f53c383a41bfd4c5166b0a4529a6).
SCHEMA_COMMIT = "a08f8d51631b7127ddac3d2c65537db429d0f1d0"
DOCKER = ROOT / "docker"
STACK = ROOT / "docker-compose.yml"


def _module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


check = _module("cryoflow_check_stack", DOCKER / "check_stack.py")
secret = _module("cryoflow_secret_cli", DOCKER / "cryoflow_secret.py")
constraints = _module("cryoflow_merge_constraints", DOCKER / "merge_constraints.py")

SCOPES = check.microscope_ids()
ENV = check.read_env_file(DOCKER / "stack.env.example")


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return check.load_stack(STACK)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return check.load_schema()


def _problems(stack: dict[str, Any], schema: dict[str, Any], **kw: Any) -> list[str]:
    args: dict[str, Any] = {"schema": schema, "env": ENV, "scopes": SCOPES, **kw}
    return check.problems(stack, **args)


# -- the shipped stack --------------------------------------------------------------------------


def test_the_stack_passes_every_check(stack, schema) -> None:
    assert _problems(stack, schema) == []


def test_the_vendored_schema_is_the_compose_specification(schema) -> None:
    import jsonschema

    assert schema["title"] == "Compose Specification" and schema["$id"] == "compose_spec.json"
    jsonschema.Draft7Validator.check_schema(schema)
    # what the stack relies on is in it: Swarm jobs, secrets with owner and mode, placement
    service = schema["definitions"]["service"]["properties"]
    assert {"secrets", "configs", "healthcheck", "deploy", "stop_grace_period"} <= set(service)
    deployment = schema["definitions"]["deployment"]["properties"]
    assert {"placement", "restart_policy", "update_config", "rollback_config"} <= set(deployment)


def test_every_microscope_has_its_queue_worker_and_triggerer(stack) -> None:
    assert sorted(p.stem for p in (ROOT / "config" / "microscopes").glob("*.yaml")) == SCOPES
    services = stack["services"]
    for scope in SCOPES:
        for kind in ("worker", "triggerer"):
            service = services[f"{kind}-{scope}"]
            assert f"microscope-{scope}" in service["command"]
            constraints_ = service["deploy"]["placement"]["constraints"]
            assert f"node.labels.cryoflow.share.{scope} == true" in constraints_
            assert "node.labels.cryoflow.gpfs == true" in constraints_
            sources = [m["source"] for m in service["volumes"] if m["type"] == "bind"]
            assert any(s.endswith(f"}}/{scope}") for s in sources)


def test_the_secrets_are_the_issues_list_and_external(stack) -> None:
    assert set(stack["secrets"]) == {
        "fernet_key", "jwt_secret", "api_secret_key", "db_password", "ssh_key",
        "smb_password", "ldap_bind_password",
    }  # fmt: skip
    for name, spec in stack["secrets"].items():
        assert spec == {"external": True, "name": f"cryoflow_{name}"}
    # every Airflow component shares the JWT secret and the Fernet key
    for name, service in stack["services"].items():
        if service["image"] == stack["x-airflow-image"]:
            targets = {s["target"] for s in service["secrets"]}
            assert {"fernet_key", "jwt_secret", "api_secret_key", "db_password"} <= targets, name


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI on this machine")
def test_docker_stack_config_accepts_it_offline() -> None:
    """Docker's own stack loader (its v3 schema, merges, interpolation); needs no engine."""
    env = {**os.environ, **ENV, "DOCKER_HOST": "unix:///nonexistent.sock"}
    proc = subprocess.run(
        ["docker", "stack", "config", "-c", str(STACK)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "image: registry.example.org/cryoem/cryoflow:0.1.0" in proc.stdout
    # a required deploy-time variable left unset stops the deploy with its message
    env.pop("CRYOFLOW_TAG")
    proc = subprocess.run(
        ["docker", "stack", "config", "-c", str(STACK)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode != 0 and "CRYOFLOW_TAG" in proc.stderr


# -- a broken stack is reported -------------------------------------------------------------------


def _drop_top_secret(s: dict) -> None:
    del s["secrets"]["db_password"]


def _undefined_network(s: dict) -> None:
    s["services"]["scheduler"]["networks"] = ["backend", "frontend"]


def _undefined_volume(s: dict) -> None:
    s["services"]["redis"]["volumes"] = [{"type": "volume", "source": "cache", "target": "/c"}]


def _undefined_config(s: dict) -> None:
    del s["configs"]["postgres_init"]


def _bad_key(s: dict) -> None:
    deploy = s["services"]["scheduler"]["deploy"] = dict(s["services"]["scheduler"]["deploy"])
    deploy["placment"] = {"constraints": ["node.role == manager"]}


def _bad_type(s: dict) -> None:
    s["services"]["redis"]["ports"] = "6379:6379"


def _secret_in_environment(s: dict) -> None:
    s["services"]["scheduler"]["environment"] = {
        **s["services"]["scheduler"]["environment"],
        "AIRFLOW__CORE__FERNET_KEY": "${CRYOFLOW_FERNET}",
    }


def _password_in_url(s: dict) -> None:
    s["services"]["scheduler"]["environment"] = {
        **s["services"]["scheduler"]["environment"],
        "CRYOFLOW_LEDGER_URL": "postgresql+psycopg://cryoflow:hunter2@postgres/cryoflow",
    }


def _password_in_connection(s: dict) -> None:
    env = dict(s["services"]["worker"]["environment"])
    conn = json.loads(env["AIRFLOW_CONN_SLURM_GPU_LOGIN"])
    conn["password"] = "hunter2"
    env["AIRFLOW_CONN_SLURM_GPU_LOGIN"] = json.dumps(conn)
    s["services"]["worker"]["environment"] = env


def _cmd_secret_not_mounted(s: dict) -> None:
    service = s["services"]["scheduler"]
    service["secrets"] = [x for x in service["secrets"] if x["source"] != "db_password"]


def _secret_from_file(s: dict) -> None:
    s["secrets"]["fernet_key"] = {"file": "./fernet.key"}


def _unpinned_image(s: dict) -> None:
    s["services"]["redis"]["image"] = "redis:latest"


def _no_image(s: dict) -> None:
    del s["services"]["redis"]["image"]


def _no_healthcheck(s: dict) -> None:
    del s["services"]["dag-processor"]["healthcheck"]


def _no_restart_policy(s: dict) -> None:
    deploy = s["services"]["postgres"]["deploy"]
    del deploy["restart_policy"]


def _worker_off_its_share(s: dict) -> None:
    placement = s["services"]["worker-krios1"]["deploy"]["placement"]
    placement["constraints"] = ["node.labels.cryoflow.gpfs == true"]


def _gpfs_mount_off_gpfs_nodes(s: dict) -> None:
    s["services"]["scheduler"]["volumes"] = [
        *s["services"]["scheduler"]["volumes"],
        s["x-mount-gpfs"],
    ]


def _worker_without_share(s: dict) -> None:
    service = s["services"]["worker-krios2"]
    service["volumes"] = [m for m in service["volumes"] if "SHARE_ROOT" not in m.get("source", "")]


def _no_default_triggerer(s: dict) -> None:
    del s["services"]["triggerer"]


def _unknown_queue(s: dict) -> None:
    s["services"]["worker"]["command"] = ["celery", "worker", "--queues", "krios1"]


def _different_defaults(s: dict) -> None:
    s["services"]["scheduler"]["environment"] = {
        **s["services"]["scheduler"]["environment"],
        "CRYOFLOW_GPFS_ROOT": "${CRYOFLOW_GPFS_ROOT:-/gpfs/other}",
    }


BROKEN: list[tuple[Callable[[dict], None], str]] = [
    (_drop_top_secret, "service postgres: secret 'db_password' is not defined in secrets:"),
    (_undefined_network, "service scheduler: network 'frontend' is not defined in networks:"),
    (_undefined_volume, "service redis: volume 'cache' is not defined in volumes:"),
    (_undefined_config, "service postgres: config 'postgres_init' is not defined in configs:"),
    (_bad_key, "schema: services/scheduler/deploy: 'placment' does not match any of the regexes"),
    (_bad_type, "schema: services/redis/ports: '6379:6379' is not of type 'array'"),
    (_secret_in_environment, "environment AIRFLOW__CORE__FERNET_KEY: a secret's value"),
    (_password_in_url, "environment CRYOFLOW_LEDGER_URL: a URL with a password"),
    (_password_in_connection, "AIRFLOW_CONN_SLURM_GPU_LOGIN: the connection holds password"),
    (_cmd_secret_not_mounted, "reads secret 'db_password', which the service does not mount"),
    (_secret_from_file, "secrets: 'fernet_key' must be external"),
    (_unpinned_image, "service redis: image 'redis:latest' is not pinned"),
    (_no_image, "service redis: no image"),
    (_no_healthcheck, "service dag-processor: no healthcheck"),
    (_no_restart_policy, "service postgres: no deploy.restart_policy.condition"),
    (_worker_off_its_share, "service worker-krios1: mounts the share of krios1 but is not placed"),
    (_gpfs_mount_off_gpfs_nodes, "service scheduler: mounts GPFS"),
    (_worker_without_share, "serves queue 'microscope-krios2' but does not mount the share"),
    (_no_default_triggerer, "queue 'default': no triggerer serves it"),
    (_unknown_queue, "service worker: queue 'krios1' is neither 'default' nor a microscope's"),
    (_different_defaults, "variable CRYOFLOW_GPFS_ROOT: different defaults"),
]


@pytest.mark.parametrize(("breakage", "expected"), BROKEN, ids=[b.__name__ for b, _ in BROKEN])
def test_a_broken_stack_is_reported(stack, schema, breakage, expected) -> None:
    broken = copy.deepcopy(stack)
    breakage(broken)
    found = _problems(broken, schema)
    assert any(expected in p for p in found), "\n".join(found) or "no problem reported"


def test_a_new_microscope_without_its_services_is_reported(stack, schema) -> None:
    found = _problems(copy.deepcopy(stack), schema, scopes=[*SCOPES, "krios3"])
    assert "queue 'microscope-krios3': no worker serves it" in found
    assert "queue 'microscope-krios3': no triggerer serves it" in found


def test_a_required_variable_left_unset_is_reported(stack, schema) -> None:
    env = {k: v for k, v in ENV.items() if k != "CRYOFLOW_TAG"}
    found = _problems(stack, schema, env=env)
    assert any("CRYOFLOW_TAG is required" in p for p in found), found


def test_the_checker_runs_as_a_command() -> None:
    proc = subprocess.run(
        [sys.executable, str(DOCKER / "check_stack.py")], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "0 problem(s)" in proc.stdout, proc.stdout + proc.stderr


# -- the image --------------------------------------------------------------------------------


def _pins(path: Path) -> dict[str, str]:
    return {k: v for k, (_, v) in constraints.read_pins(path.read_text()).items()}


def test_the_image_is_the_official_airflow_of_the_pinned_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (airflow_pin,) = [d for d in project["dependencies"] if d.startswith("apache-airflow[")]
    version = airflow_pin.split("==")[1]
    python = re.match(r">=(\d+\.\d+),", project["requires-python"]).group(1)
    dockerfile = (DOCKER / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG AIRFLOW_IMAGE=(\S+)$", dockerfile, re.M)
    assert base == f"apache/airflow:slim-{version}-python{python}"
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["${AIRFLOW_IMAGE}"] * 2
    assert _pins(ROOT / "requirements.lock")["apache-airflow"] == version


def test_the_images_pins_are_complete_and_do_not_overlap() -> None:
    lock = _pins(ROOT / "requirements.lock")
    text = (DOCKER / "requirements-stack.txt").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    stack_pins = _pins(DOCKER / "requirements-stack.txt")
    assert len(stack_pins) == len(lines), "every line of requirements-stack.txt is a == pin"
    assert set(stack_pins).isdisjoint(lock), "requirements-stack.txt repeats requirements.lock"
    assert stack_pins["celery"] == "5.6.3"  # 5.7 breaks providers-celery 3.26
    assert "apache-airflow-providers-celery" in stack_pins
    for needed in ("apache-airflow-providers-fab", "python-ldap", "psycopg", "asyncpg"):
        assert needed in lock, f"the stack needs {needed} in requirements.lock"


def test_what_the_dockerfile_copies_is_in_the_build_context() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    sources = []
    for line in dockerfile.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    assert sources, "no COPY found"
    allowed = [
        ln[1:].rstrip("/")
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.startswith("!")
    ]
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), source


def test_merged_constraints_keep_the_images_and_let_our_pins_win() -> None:
    image = "# comment\nCelery==5.7.0\nrich==14.0.0\nsome_pkg==1.0\n"
    pins = constraints.read_pins("celery[redis]==5.6.3\nsome-pkg==1.0\nxxhash==4.1.0\n")
    text, notes = constraints.merge(image, pins)
    assert text.splitlines() == [
        "# comment", "celery==5.6.3", "rich==14.0.0", "some-pkg==1.0",
        "# pinned by cryoflow, not in the image's constraints", "xxhash==4.1.0",
    ]  # fmt: skip
    assert notes == ["celery: image 5.7.0 -> cryoflow 5.6.3"]


# -- cryoflow-secret and cryoflow-entrypoint ------------------------------------------------------


FERNET_KEY = base64.urlsafe_b64encode(b"cryoflow-tests-only-fernet-key!!").decode()


@pytest.fixture
def secrets_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "secrets"
    folder.mkdir()
    (folder / "db_password").write_text("p@ss:w/rd\\x\n")  # as `echo` leaves it
    (folder / "fernet_key").write_text(FERNET_KEY)
    (folder / "jwt_secret").write_text("jwt-shared-by-all\r\n")
    (folder / "api_secret_key").write_text("api-secret\n")
    monkeypatch.setenv("CRYOFLOW_SECRETS_DIR", str(folder))
    return folder


def test_cryoflow_secret_prints_exactly_the_value(secrets_dir, capsys) -> None:
    assert secret.main(["jwt_secret"]) == 0
    assert capsys.readouterr().out == "jwt-shared-by-all"
    assert secret.main(["db-url", "airflow"]) == 0
    url = capsys.readouterr().out
    assert url == "postgresql+psycopg://cryoflow:p%40ss%3Aw%2Frd%5Cx@postgres:5432/airflow"
    from sqlalchemy.engine import make_url

    assert make_url(url).password == "p@ss:w/rd\\x"
    assert secret.main(["db-url", "airflow", "--scheme", "db+postgresql+psycopg"]) == 0
    assert capsys.readouterr().out.startswith("db+postgresql+psycopg://cryoflow:p%40ss")


def test_cryoflow_secret_errors_name_the_file_never_a_value(secrets_dir) -> None:
    with pytest.raises(SystemExit, match=r"cannot read .*/ssh_key"):
        secret.main(["ssh_key"])
    with pytest.raises(SystemExit, match="not a secret name"):
        secret.main(["../etc/passwd"])
    (secrets_dir / "empty").write_text("\n")
    with pytest.raises(SystemExit, match="empty$"):
        secret.main(["empty"])


def test_cryoflow_secret_writes_a_pgpass_only_its_owner_reads(secrets_dir, tmp_path) -> None:
    path = tmp_path / "run" / "pgpass"
    assert secret.main(["pgpass", str(path)]) == 0
    assert path.read_text() == "postgres:5432:*:cryoflow:p@ss\\:w/rd\\\\x\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _bin_with_cryoflow_secret(tmp_path: Path) -> Path:
    """A folder for PATH with cryoflow-secret in it, as the image installs it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "cryoflow-secret"
    wrapper.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{DOCKER / "cryoflow_secret.py"}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return bin_dir


def test_airflow_reads_the_stacks_cmd_settings_through_cryoflow_secret(
    stack, secrets_dir, tmp_path
) -> None:
    """Each *_CMD of the stack names an option Airflow runs commands for, and gets the value."""
    bin_dir = _bin_with_cryoflow_secret(tmp_path)
    cmds = {k: v for k, v in stack["x-airflow-env"].items() if k.endswith("_CMD")}
    # the test session's plain values (conftest) would win over the *_CMD ones
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update(cmds)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    code = textwrap.dedent(
        """
        import json, sys
        from airflow.configuration import conf

        options = [
            tuple(k.removeprefix("AIRFLOW__").removesuffix("_CMD").lower().split("__"))
            for k in sys.argv[1:]
        ]
        core = [o for o in options if o[0] != "celery"]
        sensitive = {tuple(x) for x in conf.sensitive_config_values}
        print(json.dumps({
            "sensitive": [o in sensitive for o in core],
            "values": {f"{s}.{k}": conf.get(s, k) for s, k in core},
        }))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *cmds],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(result["sensitive"]), result
    assert result["values"] == {
        "core.fernet_key": FERNET_KEY,
        "database.sql_alchemy_conn": (
            "postgresql+psycopg://cryoflow:p%40ss%3Aw%2Frd%5Cx@postgres:5432/airflow"
        ),
        "api_auth.jwt_secret": "jwt-shared-by-all",
        "api.secret_key": "api-secret",
    }
    # [celery] result_backend is the Celery provider's (sensitive there; not installed here)
    assert "AIRFLOW__CELERY__RESULT_BACKEND_CMD" in cmds


def _entrypoint(tmp_path: Path, secrets_dir: Path, fail_checks: int, **env: str):
    bin_dir = _bin_with_cryoflow_secret(tmp_path)
    counter = tmp_path / "checks"
    counter.write_text("0")
    # a stand-in `airflow`: check-migrations fails FAIL times, then answers that all is migrated
    (bin_dir / "airflow").write_text(
        "#!/bin/sh\n"
        f'n=$(cat "{counter}"); echo $((n + 1)) > "{counter}"\n'
        f'[ "$1 $2" = "db check-migrations" ] && [ "$n" -lt {fail_checks} ] && exit 1\n'
        "exit 0\n"
    )
    (bin_dir / "official-entrypoint").write_text('#!/bin/sh\necho "official: $*"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    full_env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "CRYOFLOW_SECRETS_DIR": str(secrets_dir),
        "PGPASSFILE": str(tmp_path / "run" / "pgpass"),
        "CRYOFLOW_AIRFLOW_ENTRYPOINT": str(bin_dir / "official-entrypoint"),
        "CRYOFLOW_MIGRATION_POLL_S": "0",
        **env,
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(DOCKER / "entrypoint.sh"), *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=60,
        )

    return run, counter


def test_the_entrypoint_writes_pgpass_waits_for_migrations_then_hands_over(
    tmp_path, secrets_dir
) -> None:
    run, counter = _entrypoint(tmp_path, secrets_dir, fail_checks=2)
    proc = run("scheduler")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "official: scheduler"
    assert counter.read_text().strip() == "3"  # two failed checks, then migrated
    assert "waiting for the database migration" in proc.stderr
    pgpass = tmp_path / "run" / "pgpass"
    assert stat.S_IMODE(pgpass.stat().st_mode) == 0o600 and ":cryoflow:" in pgpass.read_text()
    # the migration job itself and bash commands do not wait
    counter.write_text("0")
    assert run("bash", "-c", "true").stdout.strip() == "official: bash -c true"
    assert counter.read_text().strip() == "0"


def test_the_entrypoint_gives_up_on_an_unmigrated_database(tmp_path, secrets_dir) -> None:
    run, _ = _entrypoint(tmp_path, secrets_dir, fail_checks=10**6, CRYOFLOW_MIGRATION_WAIT_S="0")
    proc = run("celery", "worker")
    assert proc.returncode == 1 and "run the airflow-migrate job" in proc.stderr
    assert "official" not in proc.stdout


# -- the deployment guide names what the stack has ------------------------------------------------


def test_the_deployment_guide_covers_every_service_secret_and_label(stack) -> None:
    guide = (ROOT / "docs" / "deployment.md").read_text()
    for name in stack["services"]:
        assert f"`{name}`" in guide, name
    for name in stack["secrets"]:
        assert f"docker secret create cryoflow_{name}" in guide, name
    labels = {"cryoflow.gpfs", "cryoflow.db", *(f"cryoflow.share.{s}" for s in SCOPES)}
    for label in labels:
        assert f"{label}=true" in guide, label
    for command in ("docker stack deploy", "docker service rollback", "docker service update"):
        assert command in guide


# -- routing: tasks that touch a share or GPFS go to queues whose workers mount them --------------


def test_share_tasks_run_on_their_microscopes_queue(stack) -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    served = {}
    for name, service in stack["services"].items():
        role = check._queues(service.get("command") or [])
        if role and role[0] == "worker":
            for queue in role[1]:
                served[queue] = name
    wrong = []
    for dag in bag.dags.values():
        for task in dag.tasks:
            scope = getattr(task, "microscope_id", None)
            touches_share = type(task).__name__ in ("SessionBatchOperator", "ShareCleanupOperator")
            expected = f"microscope-{scope}" if touches_share else "default"
            if task.queue != expected or expected not in served:
                wrong.append(f"{dag.dag_id}.{task.task_id}: queue {task.queue!r}, not {expected!r}")
    assert wrong == []
