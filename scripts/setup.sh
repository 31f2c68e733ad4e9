#!/usr/bin/env bash
# Creates .venv with the pinned dependency set and installs cryoflow (editable) into it.
# Idempotent and quick when nothing changed. Used by scripts/demo.sh, scripts/test.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.cryoflow-installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
.venv/bin/uv pip install --quiet --python .venv/bin/python -r requirements.lock
.venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps -e .
echo "$want" > "$stamp"
echo "setup: .venv ready ($(.venv/bin/python -c 'import airflow; print("airflow", airflow.__version__)'))"
