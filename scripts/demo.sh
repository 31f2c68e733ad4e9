#!/usr/bin/env bash
# The product on embedded defaults: Airflow standalone (SQLite) running this DAG bundle, a simulated
# EPU microscope writing movies into a local "share", local compute, GPFS = a local folder.
# Everything lives under .demo/ (CRYOFLOW_DEMO_DIR). Ctrl-C stops it all cleanly.
#   DEMO_MOVIES=20 DEMO_INTERVAL=8 PORT=8080 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
scripts/setup.sh

DEMO=${CRYOFLOW_DEMO_DIR:-$REPO/.demo}
PORT=${PORT:-8080}
MOVIES=${DEMO_MOVIES:-20}
INTERVAL=${DEMO_INTERVAL:-8}
mkdir -p "$DEMO"/{airflow,share/krios1,share/krios2,gpfs,truth,jobs}
# Nothing the demo writes is for other local users: the JWT signing key, the generated admin
# password, logs and data are owner-only (a shared login host must not hand out admin tokens).
umask 077
[[ -f $DEMO/secret ]] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DEMO/secret"
chmod 600 "$DEMO/secret"
chmod go-rwx "$DEMO"  # others cannot enter it at all (what an older demo left open)
chmod -R go-rwx "$DEMO/airflow" 2>/dev/null || true

export PATH=$REPO/.venv/bin:$PATH
export AIRFLOW_HOME=$DEMO/airflow
export AIRFLOW__CORE__DAGS_FOLDER=$REPO/dags
export AIRFLOW__CORE__PLUGINS_FOLDER=$REPO/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM=4
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT=$PORT
# Tasks reach the API server's execution API at this URL; Airflow's default is
# http://localhost:8080/execution/ whatever [api] port says, so any other PORT needs it.
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$PORT/execution/
export AIRFLOW__API_AUTH__JWT_SECRET=$(cat "$DEMO/secret")
export AIRFLOW__API__SECRET_KEY=$(cat "$DEMO/secret")
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=5
export AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL=10
export CRYOFLOW_CONFIG_DIR=$REPO/config
export CRYOFLOW_SHARE_ROOT=$DEMO/share
export CRYOFLOW_GPFS_ROOT=$DEMO/gpfs
export CRYOFLOW_LEDGER_URL=sqlite:///$DEMO/ledger.db
export CRYOFLOW_SETTLE_SECONDS=${CRYOFLOW_SETTLE_SECONDS:-5}
export CRYOFLOW_POLL_SECONDS=${CRYOFLOW_POLL_SECONDS:-2}
export CRYOFLOW_BATCH_WINDOW_SECONDS=${CRYOFLOW_BATCH_WINDOW_SECONDS:-15}
export CRYOFLOW_LOCAL_WORKDIR=$DEMO/jobs
export CRYOFLOW_GPU_BACKEND=local CRYOFLOW_CPU_BACKEND=local
export CRYOFLOW_MOTIONCOR2=cryoflow-motioncor2 CRYOFLOW_CTFFIND=cryoflow-ctffind
export CRYOFLOW_DOGPICKER=cryoflow-dogpicker

log() { printf '[demo] %s\n' "$*"; }

# Another server on PORT would answer the health check below in place of ours.
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  log "port $PORT is already in use: stop what listens there or pick another, e.g. PORT=8097 $0"
  exit 1
fi

airflow db migrate >"$DEMO/migrate.log" 2>&1 || { cat "$DEMO/migrate.log"; exit 1; }

AF_PID= SIM_PID=
stop() {
  trap - INT TERM EXIT
  log "stopping ..."
  [[ -n $SIM_PID ]] && kill -TERM "$SIM_PID" 2>/dev/null || true
  if [[ -n $AF_PID ]] && kill -0 "$AF_PID" 2>/dev/null; then
    # standalone's components only all exit when the whole process group gets SIGINT (SIGTERM to
    # the parent alone orphans them, ports held); the parent ignores it and is stopped once they
    # are gone (it does not reap them: zombies do not count).
    kill -INT -- "-$AF_PID" 2>/dev/null || true
    for _ in $(seq 60); do
      pgrep -g "$AF_PID" -r R,S,D,T,t,I 2>/dev/null | grep -qvx "$AF_PID" || break
      sleep 0.5
    done
    kill -TERM "$AF_PID" 2>/dev/null || true
    for _ in $(seq 10); do kill -0 "$AF_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$AF_PID" 2>/dev/null || true
  fi
  log "stopped; data stays in $DEMO"
}
trap stop INT TERM EXIT

log "starting Airflow standalone on port $PORT (log: $DEMO/standalone.log)"
# In its own session and process group (Ctrl-C in the terminal reaches only this script; stop()
# signals the group). The standalone parent ignores SIGINT on purpose: on SIGINT it would SIGTERM
# its components while they shut down gracefully; they set their own SIGINT handlers.
( trap '' INT; exec setsid airflow standalone ) >"$DEMO/standalone.log" 2>&1 &
AF_PID=$!
for i in $(seq 180); do
  curl -fsS "http://127.0.0.1:$PORT/api/v2/monitor/health" >/dev/null 2>&1 && break
  kill -0 "$AF_PID" 2>/dev/null || { tail -30 "$DEMO/standalone.log"; exit 1; }
  ((i < 180)) || { log "no answer on port $PORT after 180 s"; tail -30 "$DEMO/standalone.log"; exit 1; }
  sleep 1
done
for i in $(seq 60); do
  airflow dags list 2>/dev/null | grep -q session_krios1 && break
  if ((i == 60)); then
    log "session_krios1 did not appear; import errors:"; airflow dags list-import-errors; exit 1
  fi
  sleep 2
done

SESSION=demo_$(date +%Y%m%d_%H%M%S)
log "enabling session_krios1 and starting session $SESSION (as an operator would in the UI)"
airflow dags unpause session_krios1 >/dev/null
airflow dags trigger session_krios1 --run-id "${SESSION}__start" \
  --conf "{\"session_name\": \"$SESSION\", \"project\": \"demo\", \"sample\": \"simulated particles\", \"pixel_size_A\": 2.0, \"frames\": 16, \"dose_per_frame\": 1.0, \"idle_timeout_minutes\": 3}" >/dev/null

log "simulated Krios 1 writes $MOVIES movies into $DEMO/share/krios1/$SESSION"
cryoflow-simulate --layout epu --out "$DEMO/share/krios1/$SESSION" --truth-dir "$DEMO/truth/$SESSION" \
  --movies "$MOVIES" --interval "$INTERVAL" --write-seconds 4 --frames 16 --size 1024x1024 \
  --pixel-size 2.0 --dose-per-frame 1.0 --content synthetic --particles 40 --contrast 1.0 \
  --session-name "$SESSION" >"$DEMO/simulator.log" 2>&1 &
SIM_PID=$!

PASSWORD=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['admin'])" \
  "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated" 2>/dev/null || echo '(see standalone.log)')
cat <<MSG

  Airflow UI:   http://127.0.0.1:$PORT      login: admin / $PASSWORD
  Session DAG:  session_krios1, run ids ${SESSION}__*   (one run per batch of movies)
  Processing:   process_krios1 (started by each batch; MotionCor2 -> CTFFIND, picking)
  Share:        $DEMO/share/krios1/$SESSION
  GPFS copy:    $DEMO/gpfs/$(date +%Y)/$SESSION/{raw,processed,logs}
  Ledger:       $DEMO/ledger.db (SQLite)

  Start another session: DAGs -> session_krios1 -> Trigger, fill in the form.
  End a session now: DAGs -> end_session_krios1 -> Trigger with the session name.
  Ctrl-C stops Airflow and the simulator.

MSG
wait "$AF_PID"
