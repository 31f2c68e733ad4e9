"""One tar per session of its small raw files (EPU XML, SerialEM mdoc and nav, thumbnails):
tape drives stream large files well and stall on thousands of small ones, so these go to tape
as one file while the originals stay on disk (the ILM policy excludes them from migration).

Layout: ``<session>/archive/small-files.tar`` (PAX format, members named by their path under the
session, e.g. ``raw/Images-Disc1/GridSquare_1/GridSquare_1.xml``, plus a copy of the manifest as
its last member so a tape copy restored anywhere describes itself) and, beside it,
``small-files.manifest.json``: each member's path, size, mtime and xxh3-128 checksum, and the
tar's own size and checksum. Both are written under a hidden temporary name, fsynced, verified
by re-reading and renamed; the tar is tagged for migration only then. Nothing is ever deleted.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import stat
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

from cryoflow.archive.tagging import read_tags, tag_verified
from cryoflow.ingest.transfer import CHECKSUM_ALGORITHM, PARTIAL_SUFFIX, make_dirs
from cryoflow.names import from_text, shown, to_text

TAR_NAME = "small-files.tar"
MANIFEST_NAME = "small-files.manifest.json"
EMBEDDED_MANIFEST = "cryoflow-manifest.json"  # never a raw path: those all start with raw/
FORMAT = "cryoflow-small-files/1"
DEFAULT_PATTERNS = ("*.xml", "*.mdoc", "*.jpg", "*.jpeg", "*.png", "*.dm", "*.nav")


class AggregateError(RuntimeError):
    """The tar could not be built or did not verify; the previous tar, if any, is untouched."""


@dataclass
class AggregateResult:
    tar: Path | None
    manifest: Path | None
    members: int = 0
    bytes: int = 0
    checksum: str | None = None  # of the tar, "xxh3_128:HEX"
    rebuilt: bool = False  # False: nothing new since the tar on disk was made
    too_large: list[str] = field(default_factory=list)  # matched, but stay out (and on disk)
    tagged: bool = False
    tag_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tar": to_text(str(self.tar)) if self.tar else None,
            "members": self.members,
            "bytes": self.bytes,
            "checksum": self.checksum,
            "rebuilt": self.rebuilt,
            "too_large": self.too_large,
            "tagged": self.tagged,
            "tag_error": self.tag_error,
        }


@dataclass
class VerifyReport:
    checked: int = 0
    tar_checksum: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def aggregate_small_files(
    session_root: Path,
    *,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    max_bytes: int = 64 << 20,
    file_mode: int = 0o640,
    dir_mode: int = 0o2770,
    tag_prefix: str | None = "user.cryoflow.",
    archive_class: str = "aggregate",
) -> AggregateResult:
    """Bundle the small files under ``<session_root>/raw`` that match ``patterns`` (any case)
    and are at most ``max_bytes`` into one verified tar; rebuild it only when that set changed.

    With ``tag_prefix``, a source that carries a verified checksum must still read as that
    checksum (a copy that rotted on disk is not archived as if it were good), and the tar is
    tagged ``archive_class`` after it verified. A file system without user attributes only
    means the tar is not tagged: reported in ``tag_error``."""
    archive_dir = session_root / "archive"
    tar_path, manifest_path = archive_dir / TAR_NAME, archive_dir / MANIFEST_NAME
    wanted, too_large = _candidates(session_root, patterns, max_bytes)
    result = AggregateResult(None, None, too_large=[to_text(p) for p in too_large])
    if not wanted:
        return result
    previous = _read_manifest(manifest_path)
    if previous is not None and _reusable(previous, tar_path, wanted, tag_prefix):
        result.tar, result.manifest, result.checksum = tar_path, manifest_path, previous["checksum"]
        result.members, result.bytes = len(previous["members"]), previous["size"]
    else:
        make_dirs(archive_dir, dir_mode)
        manifest = _build(session_root, wanted, tar_path, tag_prefix, file_mode)
        _write_json(manifest_path, manifest, file_mode)
        _fsync_dir(archive_dir)
        result.tar, result.manifest, result.rebuilt = tar_path, manifest_path, True
        result.checksum, result.members = manifest["checksum"], len(manifest["members"])
        result.bytes = manifest["size"]
    if tag_prefix is not None:
        _tag(result, session_root.name, tag_prefix, archive_class)
    return result


def verify_aggregate(tar: Path, manifest: Path | Mapping[str, Any]) -> VerifyReport:
    """Re-read the whole tar once and check it against the manifest: the tar's checksum (when
    the manifest has one), every member's presence, type, size and checksum, no member that the
    manifest does not list, and the embedded copy of the member list."""
    expected = _read_manifest(manifest)
    report = VerifyReport()
    if expected is None:
        report.problems.append(f"{shown(manifest)}: not a {FORMAT} manifest")
        return report
    members = {from_text(m["path"]): m for m in expected["members"]}
    seen: set[str] = set()
    embedded: Any = None
    tar_hash = xxhash.xxh3_128()
    try:
        with open(tar, "rb") as raw:
            reader = _Hashing(raw, tar_hash)
            with _open_tar(reader, "r|") as archive:
                for info in archive:
                    data = archive.extractfile(info) if info.isreg() else None
                    if info.name == EMBEDDED_MANIFEST and data is not None:
                        embedded = json.loads(data.read())
                        continue
                    want = members.get(info.name)
                    if want is None:
                        report.problems.append(
                            f"{shown(info.name)}: in the tar, not in the manifest"
                        )
                        continue
                    seen.add(info.name)
                    report.checked += 1
                    if data is None:
                        report.problems.append(f"{shown(info.name)}: not a regular file")
                        continue
                    digest = _digest(data)
                    if info.size != want["size"] or digest != want["checksum"]:
                        report.problems.append(
                            f"{shown(info.name)}: {info.size} bytes {digest}, the manifest says "
                            f"{want['size']} bytes {want['checksum']}"
                        )
            while reader.read(1 << 20):  # the end-of-archive blocks count in the checksum
                pass
    except (OSError, tarfile.TarError, ValueError) as exc:
        report.problems.append(f"{shown(tar)}: cannot be read: {shown(exc)}")
        return report
    report.tar_checksum = f"{CHECKSUM_ALGORITHM}:{tar_hash.hexdigest()}"
    if expected.get("checksum") and expected["checksum"] != report.tar_checksum:
        report.problems.append(
            f"{shown(tar)}: reads {report.tar_checksum}, the manifest says {expected['checksum']}"
        )
    for name in sorted(set(members) - seen):
        report.problems.append(f"{shown(name)}: in the manifest, missing from the tar")
    if embedded is None or embedded.get("members") != expected["members"]:
        report.problems.append(f"{shown(tar)}: its embedded manifest does not match")
    return report


def aggregate_status(
    session_root: Path, tag_prefix: str = "user.cryoflow."
) -> dict[str, Any] | None:
    """For the session summary, from disk alone: the tar the manifest describes and whether it
    carries its tags (so it will go to tape); None when the session has no tar."""
    archive_dir = session_root / "archive"
    manifest = _read_manifest(archive_dir / MANIFEST_NAME)
    tar = archive_dir / TAR_NAME
    if manifest is None or not tar.exists():
        return None
    tags = read_tags(tar, tag_prefix)
    return {
        "tar": f"archive/{TAR_NAME}",
        "members": len(manifest["members"]),
        "bytes": manifest["size"],
        "checksum": manifest["checksum"],
        "created_at": manifest["created_at"],
        "tagged": tags.get("checksum") == manifest["checksum"],
    }


# -- building


def _candidates(
    session_root: Path, patterns: Sequence[str], max_bytes: int
) -> tuple[list[tuple[str, os.stat_result]], list[str]]:
    lowered = [p.lower() for p in patterns]
    wanted: list[tuple[str, os.stat_result]] = []
    too_large: list[str] = []
    for rel, st in _regular_files(session_root, "raw"):
        name = rel.rsplit("/", 1)[-1]
        if name.endswith(PARTIAL_SUFFIX) or not any(
            fnmatch.fnmatchcase(name.lower(), p) for p in lowered
        ):
            continue
        if st.st_size > max_bytes:
            too_large.append(rel)
        else:
            wanted.append((rel, st))
    return sorted(wanted, key=lambda item: item[0]), sorted(too_large)


def _regular_files(root: Path, sub: str) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to root with '/', lstat) of every regular file below root/sub; symlinks
    and anything that vanishes meanwhile are skipped."""
    for folder, dirs, files in os.walk(root / sub, followlinks=False):
        dirs.sort()
        rel_folder = Path(folder).relative_to(root).as_posix()
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield f"{rel_folder}/{name}", st


def _reusable(
    manifest: Mapping[str, Any],
    tar: Path,
    wanted: list[tuple[str, os.stat_result]],
    tag_prefix: str | None,
) -> bool:
    """The tar on disk already holds exactly ``wanted``: same members, sizes and mtimes, and
    the tar is the one the manifest describes (its tags say so, or a re-read proves it, e.g.
    after a crash between writing the tar and its manifest)."""
    have = [(from_text(m["path"]), m["size"], m["mtime_ns"]) for m in manifest["members"]]
    if have != [(rel, st.st_size, st.st_mtime_ns) for rel, st in wanted]:
        return False
    try:
        if tar.stat().st_size != manifest["size"]:
            return False
    except FileNotFoundError:
        return False
    if (
        tag_prefix is not None
        and read_tags(tar, tag_prefix).get("checksum") == manifest["checksum"]
    ):
        return True
    return verify_aggregate(tar, manifest).ok


def _build(
    session_root: Path,
    wanted: list[tuple[str, os.stat_result]],
    tar_path: Path,
    tag_prefix: str | None,
    file_mode: int,
) -> dict[str, Any]:
    tmp = tar_path.with_name(f".{tar_path.name}{PARTIAL_SUFFIX}")
    members: list[dict[str, Any]] = []
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            with _open_tar(out, "w") as archive:
                for rel, st in wanted:
                    members.append(_add(archive, session_root, rel, st, tag_prefix))
                embedded = json.dumps({"format": FORMAT, "members": members}, indent=1).encode()
                info = tarfile.TarInfo(EMBEDDED_MANIFEST)
                info.size, info.mode = len(embedded), 0o640
                info.mtime = int(datetime.now(UTC).timestamp())
                archive.addfile(info, io.BytesIO(embedded))
            out.flush()
            os.fsync(out.fileno())
            os.fchmod(out.fileno(), file_mode)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "session": to_text(session_root.name),
            "tar": TAR_NAME,
            "algorithm": CHECKSUM_ALGORITHM,
            "created_at": datetime.now(UTC).isoformat(),
            "size": tmp.stat().st_size,
            "checksum": None,
            "members": members,
        }
        check = verify_aggregate(tmp, manifest)
        if not check.ok:
            raise AggregateError(f"{shown(tmp)} did not verify: {'; '.join(check.problems)}")
        manifest["checksum"] = check.tar_checksum
        os.replace(tmp, tar_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return manifest


def _add(
    archive: tarfile.TarFile, root: Path, rel: str, seen: os.stat_result, tag_prefix: str | None
) -> dict[str, Any]:
    source = root / rel
    with open(source, "rb") as fh:
        st = os.fstat(fh.fileno())
        info = tarfile.TarInfo(rel)
        info.size, info.mode = st.st_size, st.st_mode & 0o7777
        info.mtime = st.st_mtime_ns // 1_000_000_000
        info.uid, info.gid = st.st_uid, st.st_gid
        hasher = xxhash.xxh3_128()
        archive.addfile(info, _Hashing(fh, hasher))
        after = os.fstat(fh.fileno())
    same = (seen.st_ino, seen.st_size, seen.st_mtime_ns)
    if (st.st_ino, st.st_size, st.st_mtime_ns) != same or (
        after.st_size,
        after.st_mtime_ns,
    ) != same[1:]:
        raise AggregateError(f"{shown(source)} changed while the tar was being built")
    digest = f"{CHECKSUM_ALGORITHM}:{hasher.hexdigest()}"
    if tag_prefix is not None:
        verified = read_tags(source, tag_prefix).get("checksum")
        if verified is not None and verified != digest:
            raise AggregateError(
                f"{shown(source)} reads {digest}, but was verified as {verified}: not archived"
            )
    return {
        "path": to_text(rel),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "checksum": digest,
    }


def _tag(result: AggregateResult, session: str, prefix: str, archive_class: str) -> None:
    assert result.tar is not None and result.checksum is not None
    tags = read_tags(result.tar, prefix)
    if tags.get("checksum") == result.checksum and tags.get("archive_class") == archive_class:
        result.tagged = True  # unchanged tar, tagged when it was built and verified
        return
    try:
        tag_verified(
            result.tar,
            prefix=prefix,
            session=session,
            checksum=result.checksum,
            archive_class=archive_class,
            verified_at=datetime.now(UTC),
        )
        result.tagged = True
    except OSError as exc:
        result.tag_error = shown(exc)


# -- small helpers


def _open_tar(fileobj: Any, mode: str) -> tarfile.TarFile:
    """PAX, so that long names and names that are not UTF-8 survive byte for byte."""
    return tarfile.open(
        fileobj=fileobj,
        mode=mode,
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    )


class _Hashing(io.RawIOBase):
    """A read-only stream that hashes what passes through it."""

    def __init__(self, inner: BinaryIO, hasher: Any) -> None:
        self.inner, self.hasher = inner, hasher

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.hasher.update(data)
        return data


def _digest(stream: BinaryIO) -> str:
    hasher = xxhash.xxh3_128()
    while chunk := stream.read(1 << 20):
        hasher.update(chunk)
    return f"{CHECKSUM_ALGORITHM}:{hasher.hexdigest()}"


def _read_manifest(path: Path | Mapping[str, Any]) -> dict[str, Any] | None:
    if not isinstance(path, Path):
        return dict(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def _write_json(target: Path, data: Mapping[str, Any], file_mode: int) -> None:
    tmp = target.with_name(f".{target.name}{PARTIAL_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
        os.fchmod(fh.fileno(), file_mode)
    os.replace(tmp, target)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
