"""Polling the microscope share: what is there, what to ignore, and which files are finished.

Why polling: on a CIFS mount inotify never sees what the Windows side writes, so the only honest
signal that a detector finished a movie is that its size and mtime stopped changing. We walk the
tree with ``os.scandir`` (pruning ignored folders such as ``$RECYCLE.BIN`` instead of descending
into them) and diff snapshots over time.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

# Names Windows, EPU and copy tools leave behind that are never acquisition data.
IGNORED_NAMES = frozenset({"$RECYCLE.BIN", "System Volume Information", "Thumbs.db", "desktop.ini"})
IGNORED_PATTERNS = ("*downloading*", "~$*", "*.tmp", "*.part", "*.partial")


# A folder below the share's root: a link found in the listing is checked and refused or skipped,
# so one that takes a folder's place between listing and opening is not followed either.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


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


class PathResolver:
    """:func:`resolve_in` for many files under one root (a batch): each folder is resolved once,
    then each file costs one ``lstat`` (a file that is a symlink is resolved and checked on its
    own), instead of a walk of every component per file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = root.resolve()
        self._folders: dict[str, Path] = {}

    def __call__(self, relpath: str) -> Path:
        rel = safe_relpath(relpath)
        path = self.root / rel
        folder, _, name = rel.rpartition("/")
        real_folder = self._folders.get(folder)
        if real_folder is None:
            real_folder = (self.root / folder).resolve() if folder else self.real_root
            self._folders[folder] = real_folder
        real = real_folder / name
        if real.is_symlink():
            real = real.resolve()
        if real != self.real_root and self.real_root not in real.parents:
            raise UnsafePathError(f"{relpath!r} resolves outside {self.root}")
        return path


def _why(exc: OSError | RuntimeError) -> str:
    if isinstance(exc, RuntimeError):  # Path.resolve() on Python 3.11 for a symlink loop
        return "symlink loop"
    return exc.strerror or str(exc)


@dataclass(frozen=True)
class _Globs:
    """``fnmatchcase`` against a fixed set of patterns, the common shapes done with str methods.

    Why not one regex of ``fnmatch.translate``: that costs ~3 us a name (``.*`` backtracking), and
    a poll matches every entry of a 100 000-file share twice. ``*x``, ``x*``, ``*x*`` and ``x``
    (``x`` free of ``*?[``) are exactly ``endswith``, ``startswith``, ``in`` and ``==`` (~1 us for
    the lot); only other shapes go to the regex.
    """

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    infixes: tuple[str, ...]
    regex: Callable[[str], re.Match[str] | None] | None

    @classmethod
    def of(cls, patterns: Iterable[str]) -> _Globs:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        infixes: list[str] = []
        other: list[str] = []
        for pattern in patterns:
            core = pattern.strip("*")  # runs of * match like a single one
            lead, trail = pattern.startswith("*"), pattern.endswith("*")
            if any(c in core for c in "*?["):
                other.append(pattern)
            elif lead and trail:
                infixes.append(core)
            elif lead:
                suffixes.append(core)
            elif trail:
                prefixes.append(core)
            else:
                exact.add(core)
        regex = re.compile("|".join(map(fnmatch.translate, other))).match if other else None
        return cls(frozenset(exact), tuple(prefixes), tuple(suffixes), tuple(infixes), regex)

    def match(self, text: str) -> bool:
        if text in self.exact or text.startswith(self.prefixes) or text.endswith(self.suffixes):
            return True
        for infix in self.infixes:
            if infix in text:
                return True
        return self.regex is not None and self.regex(text) is not None


def _needs_the_path(pattern: str) -> bool:
    """Whether a walk that prunes ignored folders must still match ``pattern`` on the path.

    A pattern of the plain shapes (``x``, ``x*``, ``*x``, ``*x*`` with ``x`` free of ``*?[/``)
    can only match a path where it matches the entry's own name or an ancestor's path: an
    ancestor that matched was pruned, so on the name alone it decides the same. Any other
    pattern (a ``/``, or a ``*``, ``?`` or ``[`` inside, which match ``/`` too) is matched on
    the path as well.
    """
    return "/" in pattern or any(c in pattern.strip("*") for c in "*?[")


@dataclass(frozen=True)
class _Matcher:
    """IGNORED_PATTERNS plus excludes: case-insensitive on the name, case-sensitive on the path."""

    name: _Globs  # lower-cased patterns, tried on the lower-cased name
    path: _Globs  # patterns as written, tried on the share-relative path
    walk_path: _Globs  # the path patterns a pruning walk still needs (see _needs_the_path)

    def __call__(self, name: str, relpath: str) -> bool:
        return self.name.match(name.lower()) or self.path.match(relpath)

    def in_walk(self, name: str, relpath: str) -> bool:
        """``self(name, relpath)`` for an entry of a walk that pruned every ignored folder, at
        half the cost (a poll asks this of every entry of the share). A name that is not ASCII
        gets the full match: lower-casing it is not character by character (final sigma)."""
        if not name.isascii():
            return self(name, relpath)
        return self.name.match(name.lower()) or self.walk_path.match(relpath)

    def skips(self, name: str, relpath: str) -> bool:
        """What a pruning walk leaves out: hidden and system names (only the entry's own: its
        ancestors passed), then :meth:`in_walk`."""
        return name.startswith(".") or name in IGNORED_NAMES or self.in_walk(name, relpath)


@functools.lru_cache(maxsize=32)
def _matcher(extra_patterns: tuple[str, ...]) -> _Matcher:
    """Built once per exclude list, not once per poll (a watch polls every few seconds)."""
    patterns = (*IGNORED_PATTERNS, *extra_patterns)
    return _Matcher(
        _Globs.of(p.lower() for p in patterns),
        _Globs.of(patterns),
        _Globs.of(p for p in patterns if _needs_the_path(p)),
    )


def is_ignored(relpath: str, extra_patterns: Iterable[str] = ()) -> bool:
    """True for hidden files, Windows system folders, partial downloads and configured excludes."""
    parts = PurePosixPath(relpath).parts
    for part in parts:
        if part.startswith(".") or part in IGNORED_NAMES:
            return True
    name = parts[-1] if parts else relpath
    return _matcher(tuple(extra_patterns))(name, relpath)


@dataclass
class ScanResult:
    files: dict[str, FileStat] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # symlinks escaping the share
    errors: list[str] = field(default_factory=list)  # unreadable entries (skipped, reported)


def scan_tree(root: Path, exclude: Iterable[str] = ()) -> ScanResult:
    """List every regular file under ``root`` (relative POSIX paths), pruning ignored folders.

    Symlinks are followed only when they resolve inside ``root``; others are refused, and links to
    folders are never walked (no loops, no double listings). An entry that vanishes or cannot be
    read during the walk is skipped and reported, never fatal: the next poll sees it again.

    It runs every few seconds over up to 10^5 entries, so the loop stays on plain strings: an
    ignored folder is pruned, hence only each entry's own name is checked for hidden/system names
    (what ``is_ignored`` checks for every part), and only files kept are stat'ed. Each folder is
    opened once and listed and stat'ed through its descriptor (``fstatat``), so the kernel does not
    walk the whole path again for every file, as ``find`` does.
    """
    skips = _matcher(tuple(exclude)).skips
    result = ScanResult()
    files, errors = result.files, result.errors
    real_root = os.fspath(root.resolve())
    inside = os.path.join(real_root, "")  # real_root + "/", also when real_root is "/"
    stack: list[tuple[str, str]] = [(os.fspath(root), "")]
    while stack:
        directory, prefix = stack.pop()
        try:  # the session folder itself may be a link (to another disk, say)
            fd = os.open(directory, _DIR_FLAGS if prefix else _DIR_FLAGS & ~os.O_NOFOLLOW)
            try:
                entries = list(os.scandir(fd))  # exhausting it closes it (a duplicate of fd)
            except OSError:
                os.close(fd)
                raise
        except OSError as exc:
            errors.append(f"{prefix.rstrip('/') or '.'}: {_why(exc)}")
            continue
        try:
            for entry in entries:
                name = entry.name
                rel = prefix + name
                if skips(name, rel):
                    continue
                try:
                    if entry.is_symlink():
                        target = os.fspath(Path(directory, name).resolve())
                        if target != real_root and not target.startswith(inside):
                            result.refused.append(rel)
                            continue
                        if os.path.isdir(target) or not entry.is_file():
                            continue  # links to folders are never walked; dangling ones skipped
                    elif entry.is_dir():
                        stack.append((os.path.join(directory, name), f"{rel}/"))
                        continue
                    elif not entry.is_file():
                        continue  # fifo, socket, device
                    st = entry.stat()  # fstatat(fd, name): follows a link checked above
                except (OSError, RuntimeError) as exc:
                    errors.append(f"{rel}: {_why(exc)}")
                    continue
                files[rel] = FileStat(st.st_size, st.st_mtime_ns)
        finally:
            os.close(fd)
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

    def unchanged_for(self, rel: str, now: float) -> float:
        seen = self._seen.get(rel)
        return 0.0 if seen is None else now - seen.unchanged_since

    def stat_of(self, rel: str) -> FileStat | None:
        seen = self._seen.get(rel)
        return seen.stat if seen else None

    def snapshot(self, now: float) -> dict[str, list[int | float]]:
        """``{relpath: [size, mtime_ns, seconds unchanged so far]}``, JSON-able.

        A batch run ends and the next starts a new tracker; without this every file would sit out
        a full settle again. Durations, not timestamps: the monotonic clock of the next process
        has another origin.
        """
        return {
            rel: [seen.stat.size, seen.stat.mtime_ns, max(0.0, now - seen.unchanged_since)]
            for rel, seen in self._seen.items()
        }

    @classmethod
    def restore(
        cls, settle_seconds: float, snapshot: Mapping[str, Any] | None, now: float
    ) -> StabilityTracker:
        """A tracker that carries on from ``snapshot`` as taken by :meth:`snapshot`.

        The gap between the two runs is not credited (nobody watched the file then); a file whose
        size or mtime differs at the next ``observe`` restarts its settle as usual. The snapshot
        comes from stored state, so malformed entries are dropped rather than trusted.
        """
        tracker = cls(settle_seconds)
        if not isinstance(snapshot, Mapping):
            return tracker
        for rel, entry in snapshot.items():
            if not isinstance(rel, str) or not isinstance(entry, list | tuple) or len(entry) != 3:
                continue
            size, mtime_ns, unchanged = entry
            if not all(type(v) is int for v in (size, mtime_ns)) or size < 0:
                continue
            if type(unchanged) not in (int, float) or not 0 <= unchanged < math.inf:
                continue
            tracker._seen[rel] = _Seen(FileStat(size, mtime_ns), now - unchanged)
        return tracker
