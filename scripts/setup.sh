#!/usr/bin/env bash
# Creates .venv with the pinned dependency set and installs cryoflow (editable) into it.
# Idempotent and quick when nothing changed. Used by scripts/demo.sh, scripts/test.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.cryoflow-installed
want=$( (cat requirements.lock docker/requirements-stack.txt pyproject.toml; echo bytecode) |
  sha256sum | cut -d' ' -f1)
# Bytecode of the bundle's own code: uv installs no .pyc and machines that set
# PYTHONDONTWRITEBYTECODE never write one, so every task start (a DAG parse) would compile
# plugins/ from source again (seconds on a busy 2-core node).
compile() { .venv/bin/python -m compileall -q "$@" >/dev/null; }
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  compile plugins dags
  exit 0
fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
# python-ldap (LDAP / Active Directory sign-in through the FAB auth manager) builds from source
# and needs the OpenLDAP and SASL headers: install them when root and missing.
if [[ ! -e /usr/include/ldap.h || ! -e /usr/include/sasl/sasl.h ]]; then
  if [[ $(id -u) == 0 ]]; then
    ldap_dev=(apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends
      libldap2-dev libsasl2-dev)
    DEBIAN_FRONTEND=noninteractive "${ldap_dev[@]}" >/dev/null 2>&1 || {
      apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null &&
        DEBIAN_FRONTEND=noninteractive "${ldap_dev[@]}" >/dev/null
    } || echo "setup: could not install libldap2-dev libsasl2-dev (python-ldap will not build)" >&2
  else
    echo "setup: libldap2-dev and libsasl2-dev are missing: python-ldap needs them (run as root)" >&2
  fi
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
# requirements-stack.txt: the CeleryExecutor of the deployed stack, run for real by the tests
.venv/bin/uv pip install --quiet --python .venv/bin/python -r requirements.lock \
  -r docker/requirements-stack.txt
.venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps -e .
# ... and of Airflow and the rest (~30 s once): a task, the scheduler or a test's Python
# process imports Airflow from .pyc instead of compiling it each time.
compile -j0 .venv/lib/python*/site-packages plugins dags
echo "$want" > "$stamp"
echo "setup: .venv ready ($(.venv/bin/python -c 'import airflow; print("airflow", airflow.__version__)'))"
