"""Folders with exact modes; free of third-party imports, since the built-in engines use it on
compute nodes where only their own dependencies are installed."""

from __future__ import annotations

import os
from pathlib import Path


def make_dirs(directory: Path, mode: int) -> None:
    """Create missing folders with exactly ``mode`` (the umask must not widen or narrow it)."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue  # another worker made it first
        os.chmod(folder, mode)
