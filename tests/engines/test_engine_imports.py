"""The built-in engines run on compute nodes where scripts/install-engines.sh installs only the
numeric stack (and pydantic): they must import without Airflow, SQLAlchemy or xxhash."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

# Not in what scripts/install-engines.sh installs:
BLOCKED = ("airflow", "sqlalchemy", "xxhash", "paramiko", "smbprotocol", "yaml")
ENGINES = ("motioncor", "ctffind", "dogpicker", "synthetic")

CODE = f"""
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not installed on compute nodes")
sys.meta_path.insert(0, Block())
for engine in {ENGINES!r}:
    importlib.import_module(f"cryoflow.processing.engines.{{engine}}")
print("ok")
"""


def test_engines_import_with_only_their_own_dependencies() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CODE],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "plugins"), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
