#!/usr/bin/env bash
# The test command: set-up (venv, pinned deps), the real services the tests need, lint, pytest.
# Arguments are passed to pytest (e.g. scripts/test.sh -k transfer).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# setfacl/getfacl: collaborator ACLs on session folders are tested for real
if ! command -v setfacl >/dev/null && [[ $(id -u) == 0 ]]; then
  (apt-get install -y -qq acl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq acl; }) \
    || echo "test: could not install acl" >&2
fi
if ! scripts/services.sh up; then
  if [[ ${CI:-} == true ]]; then
    echo "test: services failed to start; in CI that is a failure" >&2
    exit 1
  fi
  echo "test: services unavailable; tests that need them will skip (they never skip under CI=true)" >&2
fi
# the UI tests' screenshots and JSON (tests/test_ui_*.py): kept in the checkout after the run, for
# CI to collect as artefacts; git-ignored, and no other user may read them (0750)
if [[ -z ${CRYOFLOW_ARTIFACTS:-} ]]; then
  export CRYOFLOW_ARTIFACTS=$PWD/artifacts/ui
  (umask 027 && mkdir -p "$CRYOFLOW_ARTIFACTS")
  chmod 0750 artifacts "$CRYOFLOW_ARTIFACTS"
fi
.venv/bin/ruff check plugins dags tests benchmarks docker
exec .venv/bin/python -m pytest "$@"
