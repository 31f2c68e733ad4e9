"""Polling the microscope share: what is there, what to ignore, and which files are finished.

Why polling: on a CIFS mount inotify never sees what the Windows side writes, so the only honest
signal that a detector finished a movie is that its size and mtime stopped changing. We walk the
tree with ``os.scandir`` (pruning ignored folders such as ``$RECYCLE.BIN`` instead of descending
into them) and diff snapshots over time.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

# Names Windows, EPU and copy tools leave behind that are never acquisition data.
IGNORED_NAMES = frozenset({"$RECYCLE.BIN", "System Volume Information", "Thumbs.db", "desktop.ini"})
IGNORED_PATTERNS = ("*downloading*", "~$*", "*.tmp", "*.part", "*.partial")


class UnsafePathError(ValueError):
    """A path would escape the share (``..``, absolute, NUL, or a symlink pointing outside)."""


@dataclass(frozen=True)
class FileStat:
    """What a poll sees of one file."""

    size: int
    mtime_ns: int


def safe_relpath(relpath: str) -> str:
    """Validate a share-relative POSIX path; it is data, never interpreted by a shell."""
    if not relpath or "\x00" in relpath:
        raise UnsafePathError(f"invalid path {relpath!r}")
    pure = PurePosixPath(relpath)
    if pure.is_absolute() or any(part in ("..", "") for part in pure.parts) or "\\" in relpath:
        raise UnsafePathError(f"path escapes the share: {relpath!r}")
    return pure.as_posix()


def resolve_in(root: Path, relpath: str) -> Path:
    """Join a relative path to ``root`` and refuse anything that lands outside it."""
    path = root / safe_relpath(relpath)
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise UnsafePathError(f"{relpath!r} resolves outside {root}")
    return path


def is_ignored(relpath: str, extra_patterns: Iterable[str] = ()) -> bool:
    """True for hidden files, Windows system folders, partial downloads and configured excludes."""
    parts = PurePosixPath(relpath).parts
    for part in parts:
        if part.startswith(".") or part in IGNORED_NAMES:
            return True
    name = parts[-1] if parts else relpath
    for pattern in (*IGNORED_PATTERNS, *extra_patterns):
        if fnmatch.fnmatchcase(name.lower(), pattern.lower()) or fnmatch.fnmatchcase(
            relpath, pattern
        ):
            return True
    return False


@dataclass
class ScanResult:
    files: dict[str, FileStat] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # symlinks escaping the share
    errors: list[str] = field(default_factory=list)  # unreadable entries (skipped, reported)


def scan_tree(root: Path, exclude: Iterable[str] = ()) -> ScanResult:
    """List every regular file under ``root`` (relative POSIX paths), pruning ignored folders.

    Symlinks are followed only when they resolve inside ``root``; others are refused. An entry that
    vanishes or cannot be read during the walk is skipped and reported, never fatal: the next poll
    sees it again.
    """
    exclude = tuple(exclude)
    result = ScanResult()
    real_root = root.resolve()
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            result.errors.append(f"{prefix or '.'}: {exc.strerror}")
            continue
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            if is_ignored(rel, exclude):
                continue
            try:
                if entry.is_symlink():
                    target = Path(entry.path).resolve()
                    if target != real_root and real_root not in target.parents:
                        result.refused.append(rel)
                        continue
                    if target.is_dir():
                        continue  # never walk through links: no loops, no double listings
                if entry.is_dir():
                    stack.append((Path(entry.path), f"{rel}/"))
                elif entry.is_file():
                    st = entry.stat()
                    result.files[rel] = FileStat(st.st_size, st.st_mtime_ns)
            except OSError as exc:
                result.errors.append(f"{rel}: {exc.strerror}")
    return result


@dataclass(frozen=True)
class Observation:
    ready: set[str]  # unchanged for the settle time: finished
    settling: set[str]  # seen, not finished yet
    changed: set[str]  # new or different since the previous scan


@dataclass
class _Seen:
    stat: FileStat
    unchanged_since: float


class StabilityTracker:
    """Decides when a file is finished: size and mtime unchanged for ``settle_seconds``.

    Time is the watcher's own monotonic clock, never the file's mtime, because the Windows PC's
    clock and the mount's attribute caching cannot be trusted to agree with ours.
    """

    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._seen: dict[str, _Seen] = {}

    def observe(self, files: dict[str, FileStat], now: float) -> Observation:
        """Feed one scan taken at ``now``."""
        obs = Observation(set(), set(), set())
        for rel in list(self._seen):
            if rel not in files:
                del self._seen[rel]  # deleted or renamed on the share
        for rel, stat in files.items():
            seen = self._seen.get(rel)
            if seen is None or seen.stat != stat:
                self._seen[rel] = _Seen(stat, now)
                obs.changed.add(rel)
                obs.settling.add(rel)
            elif now - seen.unchanged_since >= self.settle_seconds:
                obs.ready.add(rel)
            else:
                obs.settling.add(rel)
        return obs

    def stat_of(self, rel: str) -> FileStat | None:
        seen = self._seen.get(rel)
        return seen.stat if seen else None
