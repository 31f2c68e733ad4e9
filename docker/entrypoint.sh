#!/usr/bin/env bash
# cryoflow's step in front of the official image's /entrypoint (installed as cryoflow-entrypoint,
# run under dumb-init). It then execs /entrypoint, which waits for the database, sets the umask
# and runs the Airflow command given.
#
# 1. The ledger's URL carries no password: libpq reads it from $PGPASSFILE, written here from the
#    db_password secret into a tmpfs (memory only, mode 0600).
# 2. Airflow components wait until the metadata database is migrated to this image's Airflow
#    version (the airflow-migrate job does that), so a new image never runs on an old schema.
#    CRYOFLOW_WAIT_FOR_MIGRATIONS=false for the migration job itself.
set -euo pipefail

# An arbitrary uid (user: in the stack) has no passwd entry: Airflow lives in ~airflow/.local.
if ! whoami &>/dev/null; then
  export HOME="${AIRFLOW_USER_HOME_DIR:-/home/airflow}"
fi

secrets="${CRYOFLOW_SECRETS_DIR:-/run/secrets}"
if [[ -n "${PGPASSFILE:-}" && -r "${secrets}/db_password" ]]; then
  cryoflow-secret pgpass "${PGPASSFILE}"
fi

command="${1:-}"
[[ "${command}" == airflow ]] && command="${2:-}"
if [[ "${CRYOFLOW_WAIT_FOR_MIGRATIONS:-true}" == true ]] \
  && [[ ! "${command}" =~ ^(bash|python|version|db|)$ ]]; then
  wait_s="${CRYOFLOW_MIGRATION_WAIT_S:-900}"
  deadline=$((SECONDS + wait_s))
  until out=$(airflow db check-migrations --migration-wait-timeout 60 2>&1); do
    if ((SECONDS >= deadline)); then
      echo "cryoflow-entrypoint: the Airflow database is not at this image's schema after" \
        "${wait_s} s; run the airflow-migrate job (docs/deployment.md). Last answer:" >&2
      echo "${out}" | tail -n 5 >&2
      exit 1
    fi
    echo "cryoflow-entrypoint: waiting for the database migration ..." >&2
    sleep "${CRYOFLOW_MIGRATION_POLL_S:-10}"
  done
fi

exec "${CRYOFLOW_AIRFLOW_ENTRYPOINT:-/entrypoint}" "$@"
