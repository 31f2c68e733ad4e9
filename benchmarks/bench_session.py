"""A whole session, measured: live Airflow + Slurm latency, task instances, ledger and poll cost.

One run prints the figures the orchestration design promises, each next to its goal:

1. landing -> CTF-in-ledger latency per movie through a REAL Airflow 3.3 (``airflow standalone``:
   scheduler, triggerer, dag-processor, api-server; own AIRFLOW_HOME in a temp dir) and the real
   Slurm over SSH of ``scripts/services.sh``, at the timing defaults of the shipped
   config/facility.yaml (settle, poll, batch window, Slurm poll interval); a SerialEM session of
   small synthetic movies is started through the REST API v2 as an operator would;
2. task instances (both DAGs, all states, the closing empty run included) per 1,000 movies at
   400 and 1,000 movies/h (simulator interval 9 s and 3.6 s) through the same Airflow;
3. ledger time of one batch of 10 movies in a session already holding 1,000 and 100,000 files
   (SQLite, and PostgreSQL when postgresql+psycopg://postgres@127.0.0.1:5432 answers);
4. one poll of a 10,000 and a 100,000 file share (benchmarks/bench_watch.py).

Needs root (services, engines for the cluster user, files under /srv). Takes ~20 minutes.
Usage:
  .venv/bin/python benchmarks/bench_session.py [--quick] [--parts 1,3,4] [--keep]
    --quick  fewer movies (8 at 400/h, 12 at 1,000/h) and 1,000 / 20,000 ledger files
    --parts  which parts to run (1 and 2 share one Airflow: either runs both sessions)
    --keep   keep the data folder and AIRFLOW_HOME (logs) for inspection
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from cryoflow.ledger.store import FileRow, FileState, Ledger, StageRow, StageState, get_engine  # noqa: E402
from cryoflow.triggers.share_watch import DONE_FILES  # noqa: E402

BIN = ROOT / ".venv" / "bin"
ENGINES = Path("/opt/cryoflow-engines")
SERVICES_ENV = Path("/var/lib/cryoflow-services/env")
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
SCOPE = "krios2"
MAX_ATTEMPTS = 3
GOALS = {"latency": 60.0, "ti400": 1.0, "ti1000": 0.5, "empty": 3, "poll": 1.0, "ledger": 1.5}


def log(msg: str) -> None:
    load = os.getloadavg()
    print(f"[{time.strftime('%H:%M:%S')} load {load[0]:.2f}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def as_utc(t: datetime | None) -> datetime | None:
    return None if t is None else t if t.tzinfo else t.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- the test facility


def shipped_default(value: Any) -> str:
    """``${VAR:-30}`` -> "30": the shipped default, whatever this shell's environment says."""
    m = re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", str(value).strip())
    return m.group(1) if m else str(value)


def bench_config(base: Path, services: dict[str, str]) -> tuple[Path, dict[str, float]]:
    """config/facility.yaml's timings and resources; test-cluster paths, connection, engines."""
    shipped = yaml.safe_load((ROOT / "config" / "facility.yaml").read_text())
    transfer = {k: float(shipped_default(v)) for k, v in shipped["transfer"].items()}
    compute = {}
    for name, backend in shipped["compute"].items():
        if backend["kind"] != "slurm":
            continue
        b = {k: v for k, v in backend.items() if k not in ("account", "modules", "mem", "gres")}
        if b["partition"] == "gpu":
            b["gres"] = "gpu:1"
        b["ssh_conn_id"] = services["CRYOFLOW_SSH_CONN_ID"]
        b["remote_workdir"] = services["CRYOFLOW_SLURM_WORKDIR"]
        compute[name] = b
    software = {
        step: {
            **spec,
            "binary": str(ENGINES / "bin" / f"cryoflow-{step}"),
            "backend": shipped_default(spec["backend"]),
        }
        for step, spec in shipped["software"].items()
    }
    facility = {
        "name": "cryoflow benchmark (shipped timings, test cluster)",
        "storage": {"gpfs_root": str(base / "gpfs"), "ledger_url": f"sqlite:///{base}/ledger.db"},
        "permissions": shipped.get("permissions", {}),
        "transfer": transfer,
        "compute": compute,
        "software": software,
    }
    if "processing" in shipped:
        facility["processing"] = shipped["processing"]
    cfg = base / "config"
    (cfg / "microscopes").mkdir(parents=True)
    (cfg / "facility.yaml").write_text(yaml.safe_dump(facility, sort_keys=False))
    shutil.copy(ROOT / "config" / "microscopes" / f"{SCOPE}.yaml", cfg / "microscopes")
    timing = {**{f"transfer.{k}": v for k, v in transfer.items() if "seconds" in k}}
    timing.update({f"{n}.poll_interval_s": float(b["poll_interval_s"]) for n, b in compute.items()})
    return cfg, timing


def services_env() -> dict[str, str]:
    env = {}
    for line in SERVICES_ENV.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = shlex.split(line[7:])[0].partition("=")
            env[key] = value
    return env


# --------------------------------------------------------------------------- live Airflow


class Airflow:
    """``airflow standalone`` in its own process group; REST API v2 as an operator's client."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        secret = secrets.token_hex(32)
        self.env = {
            **env,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secret,
            "AIRFLOW__API__SECRET_KEY": secret,
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        }
        self.proc: subprocess.Popen | None = None
        self.token = ""
        self.db = home / "airflow.db"

    def start(self) -> None:
        t0 = time.monotonic()
        out = subprocess.run(
            [BIN / "airflow", "db", "migrate"], env=self.env, capture_output=True, text=True
        )
        if out.returncode:
            raise RuntimeError(
                f"airflow db migrate failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
            )
        with open(self.home / "standalone.log", "wb") as fh:
            self.proc = subprocess.Popen(
                [BIN / "airflow", "standalone"],
                env=self.env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=2).close()
                break
            if self.proc.poll() is not None or time.monotonic() - t0 > 240:
                tail = (self.home / "standalone.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"airflow standalone did not come up:\n{tail}")
            time.sleep(1)
        pw_file = self.home / "simple_auth_manager_passwords.json.generated"
        while not pw_file.exists():
            time.sleep(0.5)
        password = json.loads(pw_file.read_text())["admin"]
        self.token = self.api(
            "POST", "/auth/token", {"username": "admin", "password": password}, auth=False
        )["access_token"]
        log(f"Airflow standalone up on {self.url} in {time.monotonic() - t0:.0f} s")

    def api(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from None

    def wait_for_dags(self, *dag_ids: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        for dag_id in dag_ids:
            while True:
                try:
                    self.api("GET", f"/api/v2/dags/{dag_id}")
                    break
                except RuntimeError:
                    errors = self.api("GET", "/api/v2/importErrors").get("import_errors", [])
                    if errors or time.monotonic() > deadline:
                        raise RuntimeError(f"{dag_id} not parsed: {errors}") from None
                    time.sleep(2)

    def active_runs(self, dag_id: str) -> int:
        q = "state=queued&state=running&limit=1"
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns?{q}")["total_entries"]

    def queued_asset_events(self) -> int | None:
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as conn:
                return conn.execute("SELECT count(*) FROM asset_dag_run_queue").fetchone()[0]
        except sqlite3.Error:
            return None

    def stop(self) -> None:
        """SIGINT to the whole group (standalone's children only all exit so), TERM, KILL; then
        any process still carrying this AIRFLOW_HOME in its environment is killed by its id."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            log("stopping Airflow (SIGINT to its process group)")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        mark = f"AIRFLOW_HOME={self.home}".encode()
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
                    left.append(pid)
        if left:
            log(f"killed {len(left)} leftover Airflow process(es): {' '.join(left)}")


def simulate(base: Path, share: Path, name: str, movies: int, interval: float) -> subprocess.Popen:
    flags = (
        f"--layout serialem --movies {movies} --interval {interval} --write-seconds 3 --frames 8"
        " --size 512x512 --pixel-size 1.0 --dose-per-frame 1.0 --content synthetic"
        " --particles 20 --diameter 40"
    )
    args = [
        *flags.split(),
        "--out",
        share,
        "--truth-dir",
        base / "truth" / name,
        "--session-name",
        name,
    ]
    out = open(base / f"simulator_{name}.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [BIN / "cryoflow-simulate", *map(str, args)],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    return proc


def run_session(af: Airflow, ctx: dict, name: str, movies: int, interval: float) -> dict:
    """Trigger a session through the API, let the simulator write it, wait until it is closed
    and nothing is owed or running any more."""
    share = ctx["share"] / SCOPE / name
    conf = {
        "session_name": name,
        "project": "bench",
        "unix_group": "cryoflow-exp",
        "pixel_size_A": 1.0,
        "frames": 8,
        "dose_per_frame": 1.0,
        "particle_diameter_A": 40.0,
        "idle_timeout_minutes": 1.0,
    }
    window = [datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")]
    af.api(
        "POST",
        f"/api/v2/dags/session_{SCOPE}/dagRuns",
        {"dag_run_id": f"{name}__start", "logical_date": None, "conf": conf},
    )
    log(f"session {name}: triggered; simulator writes {movies} movies every {interval} s")
    t0 = time.monotonic()
    sim = simulate(ctx["base"], share, name, movies, interval)
    ctx["procs"].append(sim)
    ledger, loads, quiet = Ledger(ctx["ledger_url"]), [], 0
    deadline = t0 + movies * interval + 900
    while True:
        time.sleep(5)
        loads.append(os.getloadavg()[0])
        if sim.poll():
            tail = (ctx["base"] / f"simulator_{name}.log").read_text()[-2000:]
            raise RuntimeError(f"simulator exited {sim.returncode}:\n{tail}")
        row = ledger.find_session(SCOPE, name)
        done = (
            sim.poll() is not None
            and row is not None
            and row.state == "closed"
            and ledger.owed_count(row.id, MAX_ATTEMPTS) == 0
            and af.active_runs(f"process_{SCOPE}") == 0
            and af.active_runs(f"session_{SCOPE}") == 0
            and af.queued_asset_events() == 0
        )
        quiet = quiet + 1 if done else 0
        if quiet >= 3:
            break
        if time.monotonic() > deadline:
            log(f"session {name}: NOT finished after {time.monotonic() - t0:.0f} s; going on")
            break
    log(f"session {name}: finished in {time.monotonic() - t0:.0f} s")
    window.append(datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"))
    return {
        "name": name,
        "movies": movies,
        "interval": interval,
        "share": share,
        "wall": time.monotonic() - t0,
        "load": loads,
        "window": window,
    }


# --------------------------------------------------------------------------- figures, parts 1-2


def latencies(ledger_url: str, session: dict) -> dict[str, Any]:
    """Per movie: final mtime on the share -> ready -> verified -> motioncor done -> ctf done."""
    ledger = Ledger(ledger_url)
    row = ledger.find_session(SCOPE, session["name"])
    movies = [f for f in ledger.files(row.id) if f.kind == "movie"] if row else []
    stages = {(s.file_id, s.stage): s for s in ledger.stages([f.id for f in movies])}
    rows, missing = [], []
    for f in movies:
        mc, ctf = stages.get((f.id, "motioncor")), stages.get((f.id, "ctf"))
        if not (mc and ctf and mc.state == StageState.DONE and ctf.state == StageState.DONE):
            missing.append(f"{f.relpath}: motioncor {mc and mc.state}, ctf {ctf and ctf.state}")
            continue
        src = session["share"] / f.relpath
        mtime_ns = src.stat().st_mtime_ns if src.exists() else f.mtime_ns
        t = [mtime_ns / 1e9] + [
            as_utc(x).timestamp()
            for x in (f.ready_at, f.verified_at, mc.updated_at, ctf.updated_at)
        ]
        rows.append([b - a for a, b in zip(t, t[1:], strict=False)] + [t[4] - t[0]])
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 5
    return {
        "n": len(rows),
        "missing": missing,
        "steps": [median(list(c)) for c in cols[:4]],
        "complete_verified": median([r[0] + r[1] for r in rows]),
        "median": median(list(cols[4])),
        "max": max(cols[4], default=float("nan")),
        "stage_counts": ledger.stage_counts(row.id) if row else {},
    }


def task_instances(db: Path, session: str, window: list[str]) -> dict[str, Any]:
    """TIs of the session's batch runs, of the processing runs its asset events started and of
    those its timetable started meanwhile (a processing run consuming only the empty closing
    run's event counts to that run)."""
    prefix = f"{session}__"
    with sqlite3.connect(db) as conn:
        tis = conn.execute("SELECT dag_id, run_id, task_id, state, try_number FROM task_instance")
        tis = [t for t in tis.fetchall()]
        runs = conn.execute(
            "SELECT run_id, queued_at FROM dag_run WHERE dag_id = ?", (f"process_{SCOPE}",)
        ).fetchall()
        consumed: dict[str, set[str]] = {}
        for run_id, source in conn.execute(
            "SELECT dr.run_id, ae.source_run_id FROM dag_run dr "
            "JOIN dagrun_asset_event dae ON dae.dag_run_id = dr.id "
            "JOIN asset_event ae ON ae.id = dae.event_id WHERE dr.dag_id = ?",
            (f"process_{SCOPE}",),
        ):
            consumed.setdefault(run_id, set()).add(source or "")
        empty = set()
        for run_id, value in conn.execute(
            "SELECT run_id, value FROM xcom WHERE dag_id = ? AND key = 'batch'",
            (f"session_{SCOPE}",),
        ):
            with contextlib.suppress(TypeError, ValueError, AttributeError):
                report = json.loads(value) if isinstance(value, str | bytes) else value
                report = json.loads(report) if isinstance(report, str) else report
                if run_id.startswith(prefix) and not report.get("copied"):
                    empty.add(run_id)
    ours = {r for r, src in consumed.items() if any(s.startswith(prefix) for s in src)}
    timed = {r for r, q in runs if r not in consumed and window[0] <= str(q) <= window[1]}
    empty_proc = {r for r in ours if consumed[r] <= empty}
    sess = [t for t in tis if t[0] == f"session_{SCOPE}" and t[1].startswith(prefix)]
    proc = [t for t in tis if t[0] == f"process_{SCOPE}" and t[1] in ours | timed]
    per_empty = [1 + sum(1 for r in empty_proc if consumed[r] == {e}) for e in empty]
    return {
        "session": len(sess),
        "process": len(proc),
        "tries": sum(t[4] for t in sess + proc),
        "states": Counter(str(t[3]) for t in sess + proc),
        "empty_runs": len(empty),
        "empty_ti": max(per_empty, default=0),
        "session_runs": len({t[1] for t in sess}),
        "process_runs": len(ours),
        "timetable_runs": len(timed),
        "bad": [t for t in sess + proc if t[3] != "success" or t[4] > 1],
    }


def log_problems(home: Path, bad: list[tuple]) -> None:
    """Failed or retried TIs with their log tail; every error-level line of every task log."""
    for dag_id, run_id, task_id, state, tries in bad:
        print(f"  TI {dag_id} {run_id} {task_id}: state {state}, try {tries}")
        for path in sorted(home.glob(f"logs/dag_id={dag_id}/run_id={run_id}/task_id={task_id}/*")):
            for line in path.read_text(errors="replace").splitlines()[-12:]:
                print(f"    {path.name}: {line[:300]}")
    errors: Counter[str] = Counter()
    for path in home.glob("logs/dag_id=*/**/*.log*"):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                rec = json.loads(line)
                if rec.get("level") in ("error", "critical"):
                    errors[f"{path.parts[-4][7:]}: {str(rec.get('event'))[:200]}"] += 1
    if errors:
        print("  error-level lines in task logs (count, dag: event):")
        for text, n in errors.most_common(15):
            print(f"    {n:>4} {text}")


# --------------------------------------------------------------------------- part 3: ledger


MC_RESULTS = {
    "total_drift_A": 12.3,
    "early_drift_A": 4.1,
    "late_drift_A": 1.2,
    "frames": 8,
    "shifts_px": [[0.1 * i, -0.05 * i] for i in range(8)],
    "aligned": "/gpfs/x.mrc",
}
CTF_RESULTS = {
    "defocus1_A": 15000.0,
    "defocus2_A": 14800.0,
    "astigmatism_A": 200.0,
    "astig_angle_deg": 33.0,
    "cc": 0.12,
    "fit_resolution_A": 4.2,
    "diag": "/gpfs/x.ctf",
}


def prefill(url: str, n: int) -> int:
    """A session with ``n`` verified movies (motioncor + ctf done) and a gain reference."""
    from sqlalchemy import insert, text

    ledger = Ledger(url)
    sid = ledger.open_session(
        SCOPE, "prefilled", dest_root="/gpfs/s", source_root="/share/s", params={}
    )
    now = datetime.now(UTC)
    files = [
        {
            "id": i,
            "session_id": sid,
            "relpath": f"Grid1_{i:06d}.tif",
            "kind": "movie",
            "size": 30_000_000,
            "mtime_ns": i,
            "checksum": f"{i:032x}",
            "dest_path": f"/g/{i}",
            "state": FileState.VERIFIED,
            "batch": "prefill",
            "attempts": 1,
            "ready_at": now,
            # a 100,000-file session was copied over days, not in the last minutes
            "copy_started_at": now - timedelta(hours=100) * (1 - i / (n + 1)),
            "verified_at": now,
            "copy_seconds": 0.3,
        }
        for i in range(1, n + 2)
    ]
    files[-1].update(relpath="CountRef_Grid1.dm4", kind="gain_reference")
    stages = [
        {
            "file_id": f["id"],
            "session_id": sid,
            "microscope": SCOPE,
            "stage": st,
            "state": StageState.DONE,
            "job_id": "1",
            "array_index": 0,
            "attempts": 1,
            "results": res,
            "updated_at": now,
        }
        for f in files[:-1]
        for st, res in (("motioncor", MC_RESULTS), ("ctf", CTF_RESULTS))
    ]
    with get_engine(url).begin() as conn:
        for table, rows in ((FileRow.__table__, files), (StageRow.__table__, stages)):
            for i in range(0, len(rows), 20_000):
                conn.execute(insert(table), rows[i : i + 20_000])
        if conn.dialect.name == "postgresql":  # explicit ids leave the sequence behind
            conn.execute(
                text("SELECT setval('cryoflow_files_id_seq', max(id)) FROM cryoflow_files")
            )
    if get_engine(url).dialect.name == "postgresql":
        # what autovacuum does after a bulk load: the planner needs statistics to use indexes
        with get_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
    return sid


def ledger_batch(url: str, n: int, reps: int = 3) -> dict[str, float]:
    """Median ms per operation of one batch of 10 new movies, and the total."""
    t0 = time.monotonic()
    sid = prefill(url, n)
    log(
        f"  ledger {url.split(':')[0]} prefilled with {n:,} movies in {time.monotonic() - t0:.1f} s"
    )
    ledger = Ledger(url)
    ledger.counts(sid)  # warm
    runs: list[dict[str, float]] = []
    for rep in range(reps):
        ms: Counter[str] = Counter()

        @contextlib.contextmanager
        def timed(op: str):
            t = time.perf_counter()
            yield
            ms[op] += (time.perf_counter() - t) * 1e3  # noqa: B023 (used within the rep)

        if rep == 0:  # the session's first watch in this triggerer reads the whole list
            t = time.perf_counter()
            DONE_FILES.get(ledger, sid, MAX_ATTEMPTS)
            log(
                f"  first watch of the session: done list of {n:,} read in "
                f"{(time.perf_counter() - t) * 1e3:.0f} ms (once per triggerer process)"
            )
        with timed("done files (watch start, cached)"):
            DONE_FILES.get(ledger, sid, MAX_ATTEMPTS)
        for k in range(10):
            with timed("begin_copy x10"):
                fid, *_ = ledger.begin_copy(
                    sid,
                    f"new_{rep}_{k}.tif",
                    kind="movie",
                    size=1,
                    mtime_ns=k,
                    batch=f"b{rep}",
                    ready_at=datetime.now(UTC),
                )
            with timed("mark_verified x10"):
                ledger.mark_verified(
                    fid, checksum="0" * 32, dest_path="/g/new", copy_seconds=0.1, owe=["motioncor"]
                )
        with timed("latest_file gain_reference"):
            ledger.latest_file(sid, "gain_reference")
        for stage, after, res in (
            ("motioncor", None, MC_RESULTS),
            ("ctf", "motioncor", CTF_RESULTS),
        ):
            with timed(f"claim {stage}"):
                claimed = ledger.claim(
                    SCOPE, stage, f"bench#{rep}", limit=200, max_attempts=MAX_ATTEMPTS, after=after
                )
            assert len(claimed) == 10, (stage, len(claimed))
            new_ids = [f.id for _st, f in claimed]
            for i, (_st, f) in enumerate(claimed):
                with timed(f"record_stage {stage} x10"):
                    ledger.record_stage(
                        f.id,
                        stage,
                        StageState.DONE,
                        job_id="2",
                        array_index=i,
                        results=res,
                        then_owe=["ctf"] if after is None else (),
                    )
        with timed("ctf_table of the batch (STAR append)"):
            rows = ledger.ctf_table(sid, new_ids)  # what a processing run appends
        assert len(rows) == 10, len(rows)
        runs.append(dict(ms))
    result = {op: median([r[op] for r in runs]) for op in runs[0]}
    result["total"] = median([sum(r.values()) for r in runs])
    return result


def postgres_db() -> str | None:
    try:
        import psycopg

        with psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
            connect_timeout=3,
            autocommit=True,
        ) as conn:
            name = f"cryoflow_bench_{secrets.token_hex(4)}"
            conn.execute(f'CREATE DATABASE "{name}"')
            return name
    except Exception as exc:  # noqa: BLE001 (any failure: no PostgreSQL figures)
        log(f"PostgreSQL not used: {exc}")
        return None


def drop_postgres(name: str) -> None:
    import psycopg

    from cryoflow.ledger import store as ledger_module

    engine = ledger_module._ENGINES.pop(PG_URL.format(db=name), None)
    if engine is not None:
        engine.dispose()
    with psycopg.connect(
        "host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def part_ledger(sizes: list[int], tmp: Path) -> dict[str, dict[int, dict[str, float]]]:
    out: dict[str, dict[int, dict[str, float]]] = {"sqlite": {}}
    for n in sizes:
        out["sqlite"][n] = ledger_batch(f"sqlite:///{tmp}/ledger_{n}.db", n)
    for n in sizes:
        name = postgres_db()
        if name is None:
            break
        try:
            out.setdefault("postgresql", {})[n] = ledger_batch(PG_URL.format(db=name), n)
        finally:
            drop_postgres(name)
    for backend, by_n in out.items():
        print(f"\nLedger work of one batch of 10 movies ({backend}), median of 3, ms:")
        print(f"  {'operation':<32}" + "".join(f"{f'N={n:,}':>14}" for n in by_n))
        for op in next(iter(by_n.values())):
            print(f"  {op:<32}" + "".join(f"{r[op]:>14.1f}" for r in by_n.values()))
    return out


# --------------------------------------------------------------------------- part 4: poll


def part_poll(sizes: list[int]) -> dict[int, tuple[float, float]]:
    """bench_watch.py's main (its printed table parsed), or a minimal scan_tree vs find."""
    path = ROOT / "benchmarks" / "bench_watch.py"
    buf = io.StringIO()
    try:
        spec = importlib.util.spec_from_file_location("bench_watch", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with contextlib.redirect_stdout(buf):
            module.main(["--sizes", ",".join(map(str, sizes))])
        print(buf.getvalue(), end="")
        out = {}
        for line in buf.getvalue().splitlines():
            cols = line.split()
            if cols and cols[0].isdigit():
                out[int(cols[0])] = (float(cols[2]), float(cols[3]))
        if out:
            return out
    except Exception as exc:  # noqa: BLE001 (fall back to the minimal poll below)
        log(f"bench_watch.py not usable ({exc}); minimal scan_tree vs find")
    from cryoflow.ingest.share.scan import scan_tree

    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_poll_") as tmp:
        for n in sizes:
            root = Path(tmp) / str(n)
            for i in range(n):
                d = root / f"GridSquare_{i // 300}" / "Data"
                d.mkdir(parents=True, exist_ok=True)
                (d / f"FoilHole_{i}_fractions.tiff").write_bytes(b"x")
            times = []
            for fn in (
                lambda r=root: scan_tree(r, ("*.jpg",)),
                lambda r=root: subprocess.run(
                    ["find", r, "-type", "f", "-printf", "%s %T@\\n"], stdout=subprocess.DEVNULL
                ),
            ):
                fn()
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            out[n] = (times[0], times[1])
            print(f"  {n:>8} files: scan_tree {times[0]:.3f} s, find {times[1]:.3f} s")
    return out


# --------------------------------------------------------------------------- main


def part_airflow(args: argparse.Namespace, ctx: dict) -> dict[str, Any]:
    subprocess.run([ROOT / "scripts" / "services.sh", "up"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([ROOT / "scripts" / "install-engines.sh", ENGINES], check=True)
    services = services_env()
    cfg, timing = bench_config(ctx["base"], services)
    print(
        "Shipped timings used (config/facility.yaml defaults): "
        + ", ".join(f"{k} {v:g} s" for k, v in timing.items())
    )
    ctx["ledger_url"] = f"sqlite:///{ctx['base']}/ledger.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CRYOFLOW"))}
    env.update(
        services,
        CRYOFLOW_CONFIG_DIR=str(cfg),
        CRYOFLOW_SHARE_ROOT=str(ctx["share"]),
        CRYOFLOW_GPFS_ROOT=str(ctx["base"] / "gpfs"),
        CRYOFLOW_LEDGER_URL=ctx["ledger_url"],
    )
    af = ctx["airflow"] = Airflow(ctx["home"], env)
    af.start()
    af.wait_for_dags(f"session_{SCOPE}", f"process_{SCOPE}")
    for dag_id in (f"session_{SCOPE}", f"process_{SCOPE}"):
        af.api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
    stamp = time.strftime("%H%M%S")
    n400, n1000 = (8, 12) if args.quick else (20, 40)
    sessions = [
        run_session(af, ctx, f"bench_{stamp}_r400", n400, 9.0),
        run_session(af, ctx, f"bench_{stamp}_r1000", n1000, 3.6),
    ]
    af.stop()
    results = {}
    for s in sessions:
        lat, tis = latencies(ctx["ledger_url"], s), task_instances(af.db, s["name"], s["window"])
        results[s["interval"]] = {**s, "lat": lat, "tis": tis}
        per_h = 3600 / s["interval"]
        print(
            f"\nSession {s['name']}: {s['movies']} movies at {per_h:.0f}/h, {s['wall']:.0f} s, "
            f"load average during it min/median/max {min(s['load'], default=0):.2f}/"
            f"{median(s['load']):.2f}/{max(s['load'], default=0):.2f}"
        )
        print(
            f"  landing -> CTF in ledger: median {lat['median']:.1f} s, max {lat['max']:.1f} s "
            f"over {lat['n']} movies"
        )
        st = lat["steps"]
        print(
            f"  breakdown (medians): complete->verified {lat['complete_verified']:.1f} s "
            f"(complete->ready {st[0]:.1f}, ready->verified {st[1]:.1f}), "
            f"verified->motioncor done {st[2]:.1f} s, motioncor->ctf done {st[3]:.1f} s"
        )
        for m in lat["missing"]:
            print(f"  NOT processed: {m}")
        print(f"  ledger stages: {lat['stage_counts']}")
        print(
            f"  task instances: session_{SCOPE} {tis['session']} in {tis['session_runs']} runs "
            f"({tis['session'] / s['movies']:.2f}/movie), process_{SCOPE} {tis['process']} in "
            f"{tis['process_runs']} asset + {tis['timetable_runs']} timetable runs "
            f"({tis['process'] / s['movies']:.2f}/movie); total "
            f"{(tis['session'] + tis['process']) / s['movies']:.2f}/movie = "
            f"{1000 * (tis['session'] + tis['process']) / s['movies']:.0f} per 1,000 movies; "
            f"tries {tis['tries']}; states {dict(tis['states'])}"
        )
        print(
            f"  empty runs {tis['empty_runs']}: at most {tis['empty_ti']} TI(s) each, with a "
            "processing run that only its asset event started"
        )
        log_problems(ctx["home"], tis["bad"])
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="1,2,3,4")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    if os.geteuid() != 0:
        raise SystemExit("needs root (services, engines for the cluster user, /srv)")

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    base = Path("/srv/cryoflow-bench") / secrets.token_hex(5)
    base.mkdir(parents=True)
    for d in (base, base.parent):
        d.chmod(0o755)  # the cluster user reaches GPFS below it
    (base / "gpfs").mkdir(mode=0o755)
    home = Path(tempfile.mkdtemp(prefix="cryoflow-bench-airflow-"))
    ctx: dict[str, Any] = {"base": base, "share": base / "share", "home": home, "procs": []}
    log(f"bench_session: {os.cpu_count()} CPUs; data {base}; AIRFLOW_HOME {home}")
    res: dict[str, Any] = {}
    ok = False
    try:
        if parts & {"1", "2"}:
            res["airflow"] = part_airflow(args, ctx)
        if "3" in parts:
            log("part 3: ledger work per batch")
            res["ledger"] = part_ledger([1_000, 20_000 if args.quick else 100_000], base)
        if "4" in parts:
            log("part 4: one poll of the share")
            res["poll"] = part_poll([10_000, 100_000])
        ok = True
    finally:
        for proc in ctx["procs"]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if "airflow" in ctx:
            ctx["airflow"].stop()
        if not ok and "ledger_url" in ctx:  # aborted: cancel the Slurm jobs this run left
            with contextlib.suppress(Exception):
                jobs = {st.job_id for st, _ in Ledger(ctx["ledger_url"]).claimed(SCOPE)}
                jobs.discard(None)
                if jobs:
                    subprocess.run(["scancel", *sorted(jobs)], check=False)
        if args.keep:
            log(f"kept {base} and {home}")
        else:
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(home, ignore_errors=True)
    summary(res)
    return 0


def summary(res: dict[str, Any]) -> None:
    rows = []
    af = res.get("airflow", {})
    if 9.0 in af:
        lat = af[9.0]["lat"]
        rows.append(
            (
                "landing -> CTF latency, median",
                f"{lat['median']:.1f} s",
                "<= 60 s",
                lat["median"] <= GOALS["latency"],
            )
        )
        rows.append(
            (
                "landing -> CTF latency, max",
                f"{lat['max']:.1f} s",
                "<= 60 s",
                lat["max"] <= GOALS["latency"],
            )
        )
    for interval, key, goal in (
        (9.0, "ti400", "<= 1 TI/movie"),
        (3.6, "ti1000", "<= 0.5 TI/movie"),
    ):
        if interval in af:
            s = af[interval]
            per = (s["tis"]["session"] + s["tis"]["process"]) / s["movies"]
            rows.append(
                (
                    f"TIs per movie at {3600 / interval:.0f}/h ({s['movies']} movies)",
                    f"{per:.2f} ({1000 * per:.0f}/1000)",
                    goal,
                    per <= GOALS[key],
                )
            )
    if af:
        empty = max(s["tis"]["empty_ti"] for s in af.values())
        rows.append(
            (
                "TIs caused by an empty run",
                str(empty),
                "<= 3",
                0 < empty <= GOALS["empty"],
            )
        )
    for n, (scan, find) in sorted(res.get("poll", {}).items()):
        rows.append(
            (
                f"one poll of {n:,} files (scan_tree; find)",
                f"{scan:.3f} s; {find:.3f} s",
                "< 1 s" if n >= 100_000 else "-",
                scan < GOALS["poll"] if n >= 100_000 else None,
            )
        )
    for backend, by_n in res.get("ledger", {}).items():
        (n1, a), (n2, b) = sorted(by_n.items())[0], sorted(by_n.items())[-1]
        ratio = b["total"] / a["total"]
        rows.append(
            (
                f"ledger per batch {backend}, N={n1:,} vs {n2:,}",
                f"{a['total']:.0f} vs {b['total']:.0f} ms (x{ratio:.1f})",
                "independent of N",
                ratio <= GOALS["ledger"],
            )
        )
    print(f"\n{'figure':<46} {'measured':<28} {'goal':<18} met")
    for name, value, goal, met in rows:
        print(f"{name:<46} {value:<28} {goal:<18} {'-' if met is None else 'yes' if met else 'NO'}")
    load = os.getloadavg()
    print(
        f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        f"({os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    sys.exit(main())
