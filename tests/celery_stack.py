"""The deployed stack's shape on one machine: Airflow with the CeleryExecutor, for real.

PostgreSQL (Airflow's metadata and the ledger, one fresh database each) and Redis (the broker)
are the ones this machine kind runs on loopback. The api-server, scheduler, dag-processor,
triggerer and each Celery worker are separate processes, each in its own process group, so a test
can kill one worker outright (SIGKILL to its group: the worker, its pool and the task it runs) as
a node failure would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.test_ledger import PG_ADMIN_URL
from tests.ui_browser import LiveAirflow, airflow_env, free_port, wait_for

REDIS_URL = os.environ.get("CRYOFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def _required(what: str, exc: Exception) -> None:
    """A missing service: a failure under CI, a skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required in CI: {exc}", pytrace=False)
    pytest.skip(f"{what} unavailable: {exc}")


@contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards); yields its psycopg URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any connection problem reads the same
        admin.dispose()
        _required(f"PostgreSQL at {PG_ADMIN_URL}", exc)
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def redis_database() -> str:
    """A Redis database of its own for the broker (an empty one, so no stale messages)."""
    import redis

    for db in range(15, 0, -1):
        try:
            client = redis.Redis.from_url(f"{REDIS_URL}/{db}", socket_timeout=5)
            if client.dbsize() == 0 and client.set("cryoflow-test-claim", "1", nx=True, ex=3600):
                return f"{REDIS_URL}/{db}"
        except redis.RedisError as exc:
            _required(f"Redis at {REDIS_URL}", exc)
    _required(f"Redis at {REDIS_URL}", RuntimeError("no empty database among 1..15"))
    raise AssertionError("unreachable")


@dataclass
class Component:
    name: str
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def group(self) -> list[int]:
        """Live pids of the component: its process group and every descendant. Airflow's task
        supervisor puts each task process in a process group of its own (``setpgid``), so the
        worker's group alone misses the process that does the work."""
        parents: dict[int, int] = {}
        groups: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if fields[0] not in "ZX":
                    pid = int(stat.parent.name)
                    parents[pid], groups[pid] = int(fields[1]), int(fields[2])
        found = {pid for pid, pgrp in groups.items() if pgrp == self.proc.pid}
        if self.proc.pid in parents:
            found.add(self.proc.pid)
        grew = True
        while grew:
            more = {pid for pid, ppid in parents.items() if ppid in found} - found
            found |= more
            grew = bool(more)
        return sorted(found)

    def kill(self) -> None:
        """A node failure: SIGKILL to every process of the component at once (its group and
        each descendant's group), nothing shuts down cleanly."""
        pids = self.group()
        groups = {self.proc.pid}
        for pid in pids:
            with suppress(OSError):
                groups.add(os.getpgid(pid))
        for pgrp in groups:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(pgrp, signal.SIGKILL)
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@dataclass
class CeleryStack:
    airflow: LiveAirflow
    env: dict[str, str]
    ledger_url: str
    components: dict[str, Component] = field(default_factory=dict)

    def worker_running(self, pid: int) -> Component | None:
        """The worker whose process tree holds ``pid`` (a task instance's ``pid``, as the API
        reports it). Not a process title: a Celery pool process keeps the title of the last
        task it was handed, also one it never ran."""
        for name, comp in self.components.items():
            if name.startswith("worker") and comp.alive() and pid in comp.group():
                return comp
        return None

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"--- {c.name} ({c.log}) ---\n{c.log.read_text(errors='replace')[-tail:]}"
            for c in self.components.values()
            if c.log.exists()
        )


def _start(name: str, argv: list[str], env: dict[str, str], home: Path) -> Component:
    log = home / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    return Component(name, proc, log)


@contextmanager
def celery_stack(
    home: Path, site: dict[str, str], workers: dict[str, str], timeout: float = 300
) -> Iterator[CeleryStack]:
    """Airflow on PostgreSQL + Redis with the CeleryExecutor: api-server, scheduler,
    dag-processor, triggerer and one Celery worker per entry of ``workers`` (name -> its
    comma-separated queues), each a process of its own. ``site`` holds the CRYOFLOW_* settings;
    the ledger is a PostgreSQL database of its own (``CeleryStack.ledger_url``)."""
    home.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        meta = stack.enter_context(postgres_database("cryoflow_celery_meta"))
        ledger = stack.enter_context(postgres_database("cryoflow_celery_ledger"))
        broker = redis_database()
        port = free_port()
        env = airflow_env(home, port, {**site, "CRYOFLOW_LEDGER_URL": ledger})
        env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta,
                "AIRFLOW__CELERY__BROKER_URL": broker,
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{meta}",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
                # a killed worker's task is noticed in seconds, not the default 5 minutes
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            }
        )
        airflow = shutil.which("airflow", path=env["PATH"]) or "airflow"
        migrate = subprocess.run(
            [airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=600
        )
        assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
        result = CeleryStack(
            airflow=None,  # type: ignore[arg-type] - set once the API answers
            env=env,
            ledger_url=ledger,
        )

        def stop_all() -> None:
            """SIGTERM to every component at once (each shuts down warm), SIGKILL what is left
            of their groups after a grace period."""
            comps = list(result.components.values())
            for comp in comps:
                with suppress(ProcessLookupError):
                    os.killpg(comp.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(c.group() for c in comps):
                time.sleep(0.25)
            for comp in comps:
                comp.kill()

        stack.callback(stop_all)
        commands = {
            "api-server": [airflow, "api-server", "--port", str(port), "--host", "127.0.0.1"],
            "scheduler": [airflow, "scheduler"],
            "dag-processor": [airflow, "dag-processor"],
            "triggerer": [airflow, "triggerer"],
        }
        for name, queues in workers.items():
            commands[name] = [
                airflow, "celery", "worker", "--queues", queues, "--concurrency", "2",
                "--celery-hostname", f"{name}@%h",
            ]  # fmt: skip
        for name, argv in commands.items():
            own = dict(env)
            if name.startswith("worker"):  # each worker serves its task logs on its own port
                own["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(free_port())
            result.components[name] = _start(name, argv, own, home)
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            for comp in result.components.values():
                if not comp.alive():
                    raise RuntimeError(f"{comp.name} exited: {comp.log.read_text()[-2000:]}")
            return httpx.get(f"{base}/api/v2/monitor/health", timeout=5).status_code == 200

        wait_for(f"the api-server on {base}", healthy, timeout, interval=1)
        pw_file = home / "simple_auth_manager_passwords.json.generated"
        password = wait_for("admin password", lambda: json.loads(pw_file.read_text())["admin"], 60)
        result.airflow = LiveAirflow(
            base_url=base,
            home=home,
            log=result.components["scheduler"].log,
            password=password,
            proc=result.components["api-server"].proc,
        )
        yield result


def wait_workers_ready(stack: CeleryStack, names: list[str], timeout: float = 180) -> None:
    """Wait until each named worker says it is ready (it consumes its queues then)."""

    def ready() -> bool:
        for name in names:
            comp = stack.components[name]
            if not comp.alive():
                raise RuntimeError(f"{name} exited: {comp.log.read_text()[-2000:]}")
        return all(
            f"{name}@" in (log := stack.components[name].log.read_text(errors="replace"))
            and " ready." in log
            for name in names
        )

    wait_for(f"Celery workers {names} to be ready", ready, timeout, interval=1)
