"""Copy one file to long-term storage so that a file under its final name is always complete.

Stream-copy with the checksum computed in the same pass, write to a hidden temporary name in the
destination folder, fsync, give it the experiment's mode and group, preserve mtime, read it back
and compare size and checksum, and only then rename it atomically to its final name and fsync the
folder. The
source is only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

import xxhash

CHECKSUM_ALGORITHM = "xxh3_128"
PARTIAL_SUFFIX = ".cryoflow-partial"

# Faults that clear by themselves or by a person freeing space, remounting or reconnecting: the
# file stays owed and is tried again, however long it takes; it never uses up its attempts.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "ESTALE", "ENOENT", "EIO", "EAGAIN",
        "EBUSY", "ETIMEDOUT", "ENOTCONN", "ECONNRESET", "ECONNABORTED", "EHOSTDOWN",
        "EHOSTUNREACH", "ENETDOWN", "ENETUNREACH", "ENODEV", "ENXIO", "EINTR",
    )
    if hasattr(errno, name)
)  # fmt: skip


class TransferError(RuntimeError):
    """The copy did not produce a verified file; the message names source, destination and, for
    a system error, the errno."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_

    @property
    def transient(self) -> bool:
        return self.errno in TRANSIENT_ERRNOS

    @classmethod
    def of(cls, exc: OSError, src: Path, dst: Path, doing: str) -> TransferError:
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        why = exc.strerror or str(exc)
        return cls(f"{doing} {src} -> {dst}: {why} [{code}]", exc.errno)


class SourceChangedError(TransferError):
    """The source changed while it was being copied (the microscope was still writing it)."""


class DestinationTakenError(TransferError):
    """The final name already holds a different file; it is never overwritten."""


@dataclass(frozen=True)
class CopyResult:
    size: int
    mtime_ns: int
    checksum: str
    copied: bool  # False when an identical verified file was already in place


def partial_path(dst: Path) -> Path:
    """The temporary name used while copying: hidden (scanners and users ignore it), short (a
    255-byte name must still fit) and the same for every try (a retry overwrites what a killed
    copy left, nothing piles up)."""
    digest = xxhash.xxh64(os.fsencode(dst.name)).hexdigest()
    return dst.with_name(f".{digest}{PARTIAL_SUFFIX}")


def file_checksum(path: Path, chunk_bytes: int = 8 << 20, drop_cache: bool = False) -> str:
    """xxh3-128 of a whole file, optionally asking the kernel to drop it from the page cache first
    so that a verification reads what the storage holds, not what we just wrote."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as fh:
        if drop_cache:
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(chunk_bytes)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            hasher.update(view[:n])
    return hasher.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_verified(
    src: Path,
    dst: Path,
    *,
    file_mode: int = 0o640,
    dir_mode: int = 0o2770,
    gid: int | None = None,
    chunk_bytes: int = 8 << 20,
    expected: tuple[int, int] | None = None,
) -> CopyResult:
    """Copy ``src`` to ``dst`` and verify it; idempotent for an identical file already in place.

    ``expected`` is the (size, mtime_ns) the watcher saw when it declared the file finished; if the
    source no longer matches, the microscope is still writing and nothing is copied.
    """
    try:
        return _copy_verified(src, dst, file_mode, dir_mode, gid, chunk_bytes, expected)
    except OSError as exc:
        raise TransferError.of(exc, src, dst, "copy") from exc


def _copy_verified(
    src: Path,
    dst: Path,
    file_mode: int,
    dir_mode: int,
    gid: int | None,
    chunk_bytes: int,
    expected: tuple[int, int] | None,
) -> CopyResult:
    before = src.stat()
    if expected is not None and (before.st_size, before.st_mtime_ns) != expected:
        raise SourceChangedError(f"{src}: changed since it was found complete; will retry")

    existing = _existing_identical(src, dst, before)
    if existing is not None:
        return existing

    make_dirs(dst.parent, dir_mode)
    tmp = partial_path(dst)
    hasher = xxhash.xxh3_128()
    size = 0
    try:
        with open(src, "rb", buffering=0) as fin:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                buf = bytearray(chunk_bytes)
                view = memoryview(buf)
                while n := fin.readinto(buf):
                    hasher.update(view[:n])
                    written = 0
                    while written < n:
                        written += os.write(fd, view[written:n])
                    size += n
                os.fsync(fd)
                if gid is not None:
                    os.fchown(fd, -1, gid)
                os.fchmod(fd, file_mode)
            finally:
                os.close(fd)
        after = src.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or (
            size != before.st_size
        ):
            raise SourceChangedError(f"{src}: changed while being copied; will retry")
        os.utime(tmp, ns=(after.st_atime_ns, after.st_mtime_ns))
        checksum = hasher.hexdigest()
        _verify(tmp, size, checksum)  # before the rename: a final name only ever holds good data
        _rename_no_clobber(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return CopyResult(size=size, mtime_ns=before.st_mtime_ns, checksum=checksum, copied=True)


def _rename_no_clobber(tmp: Path, dst: Path) -> None:
    """Give ``tmp`` its final name unless that name exists (a hard link is atomic and refuses
    to replace; a filesystem without links falls back to a checked rename)."""
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise DestinationTakenError(f"{dst}: already holds a different file; kept") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if dst.exists():
            raise DestinationTakenError(f"{dst}: already holds a different file; kept") from None
        os.rename(tmp, dst)
        return
    tmp.unlink()


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


def _existing_identical(src: Path, dst: Path, src_stat: os.stat_result) -> CopyResult | None:
    """A destination left by an earlier, interrupted run: keep it only if provably identical."""
    try:
        dst_stat = dst.stat()
    except FileNotFoundError:
        return None
    if (dst_stat.st_size, dst_stat.st_mtime_ns) != (src_stat.st_size, src_stat.st_mtime_ns):
        return None
    src_sum = file_checksum(src)
    if file_checksum(dst, drop_cache=True) != src_sum:
        return None
    return CopyResult(src_stat.st_size, src_stat.st_mtime_ns, src_sum, copied=False)


def _verify(path: Path, size: int, checksum: str) -> None:
    actual_size = path.stat().st_size
    if actual_size != size:
        raise TransferError(f"{path}: size {actual_size} after copy, expected {size}")
    actual = file_checksum(path, drop_cache=True)
    if actual != checksum:
        raise TransferError(f"{path}: checksum {actual} after copy, expected {checksum}")
