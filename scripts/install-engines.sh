#!/usr/bin/env bash
# Install cryoflow's built-in engines (cryoflow-motioncor2, cryoflow-ctffind, cryoflow-dogpicker)
# into PREFIX for compute nodes: a facility without MotionCor2/CTFFIND installs these on its
# cluster and names PREFIX/bin/cryoflow-* as the binaries in config/facility.yaml.
# Only the numeric stack is installed (pinned by requirements.lock), not Airflow.
#   scripts/install-engines.sh /opt/cryoflow-engines [/usr/bin/python3]
set -euo pipefail
PREFIX=${1:?usage: scripts/install-engines.sh PREFIX [PYTHON]}
PY=${2:-/usr/bin/python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
"$REPO/scripts/setup.sh" >/dev/null
UV=$REPO/.venv/bin/uv
want=$(cat "$REPO/requirements.lock" "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [[ -f $PREFIX/.cryoflow-engines && $(cat "$PREFIX/.cryoflow-engines") == "$want" ]] \
  && cmp -s <(cd "$REPO/plugins" && find cryoflow -name '*.py' -newer "$PREFIX/.cryoflow-engines") /dev/null; then
  exit 0
fi
[[ -x $PREFIX/bin/python ]] || "$UV" venv --quiet --python "$PY" "$PREFIX"
"$UV" pip install --quiet --python "$PREFIX/bin/python" -c "$REPO/requirements.lock" \
  numpy scipy mrcfile tifffile imagecodecs starfile pandas pillow pydantic
"$UV" pip install --quiet --python "$PREFIX/bin/python" --no-deps --reinstall-package cryoem-acquisition-pipeline "$REPO"
# .pyc for every module: uv installs none, and a node with PYTHONDONTWRITEBYTECODE set would
# compile numpy and scipy again for each task (the engines' start time)
"$PREFIX/bin/python" -m compileall -q -j0 "$PREFIX/lib" >/dev/null
chmod -R a+rX "$PREFIX"
echo "$want" > "$PREFIX/.cryoflow-engines"
echo "engines installed in $PREFIX/bin: $(cd "$PREFIX/bin" && ls cryoflow-* | tr '\n' ' ')"
