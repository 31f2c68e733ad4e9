"""Copy one file to long-term storage so that a file under its final name is always complete.

Stream-copy with the checksum computed in the same pass, write to a hidden temporary name in the
destination folder, fsync, give it the experiment's mode and group, preserve mtime, read it back
and compare size and checksum, and only then rename it atomically to its final name and fsync the
folder. The
source is only ever opened for reading: a local path, or a :class:`SourceFile` of a share read
over SMB (opened denying writers; a writer that holds it makes the copy "changed, retry").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from cryoflow.dirs import make_dirs
from cryoflow.ingest.share.source import HeldForWriting, SourceFile

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
    def of(cls, exc: OSError, src: Path | SourceFile, dst: Path, doing: str) -> TransferError:
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
        buf = _buffer(os.fstat(fh.fileno()).st_size, chunk_bytes)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            hasher.update(view[:n])
    return hasher.hexdigest()


def _open_source(src: Path | SourceFile) -> Any:
    """The source for reading, unbuffered (``readinto`` straight into the copy buffer)."""
    if isinstance(src, SourceFile):
        try:
            return src.open()
        except HeldForWriting as exc:
            raise SourceChangedError(f"{exc}; will retry") from None
    return open(src, "rb", buffering=0)  # noqa: SIM115


def _source_checksum(src: Path | SourceFile, chunk_bytes: int = 8 << 20) -> str:
    if not isinstance(src, SourceFile):
        return file_checksum(src)
    hasher = xxhash.xxh3_128()
    with _open_source(src) as fh:
        buf = bytearray(chunk_bytes)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            hasher.update(view[:n])
    return hasher.hexdigest()


def _buffer(size: int, chunk_bytes: int) -> bytearray:
    """A read buffer no bigger than the file needs: zeroing 8 MiB for each 20 kB XML would
    cost more than copying it."""
    return bytearray(min(chunk_bytes, max(1 << 16, size + 1)))


def sync_filesystem(path: Path) -> None:
    """Flush the file system holding ``path`` (``syncfs``: not every mounted file system, as
    ``sync`` would on a busy GPFS client); many small files share this one flush."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC is None or _LIBC.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
    _LIBC.syncfs  # noqa: B018  (glibc and musl have it; checked once)
except (OSError, AttributeError):
    _LIBC = None


def read_ahead(paths: Iterable[Path]) -> None:
    """Ask the kernel to start reading these files now, all at once (``POSIX_FADV_WILLNEED``):
    a batch of small sources is then read with many requests in flight instead of one small
    read after another. A file that cannot be opened is left to the copy to report."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):
            pass
        finally:
            os.close(fd)


def read_back_from_storage(paths: Iterable[Path]) -> set[Path]:
    """For files just flushed (their pages clean): drop them from the page cache and ask the
    kernel to read them again from the storage, all at once. The read-back verification of many
    small files then finds them already read from the storage (many reads in flight) instead
    of waiting for one small read after another; what it reads is what the storage holds.
    Returns the paths this was done for (for the others the verification drops the cache)."""
    done: set[Path] = set()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue  # the verification that follows reports it
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            done.add(path)
        except (OSError, AttributeError):
            pass
        finally:
            os.close(fd)
    return done


def fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Staged:
    """A source copied to its hidden temporary name, checksummed, not yet verified or named."""

    src: Path | SourceFile
    dst: Path
    tmp: Path
    size: int
    mtime_ns: int
    checksum: str


def copy_verified(
    src: Path | SourceFile,
    dst: Path,
    *,
    file_mode: int = 0o640,
    dir_mode: int = 0o2770,
    gid: int | None = None,
    chunk_bytes: int = 8 << 20,
    expected: tuple[int, int] | None = None,
    sync_dir: bool = True,
) -> CopyResult:
    """Copy ``src`` to ``dst`` and verify it; idempotent for an identical file already in place.

    ``expected`` is the (size, mtime_ns) the watcher saw when it declared the file finished; if the
    source no longer matches, the microscope is still writing and nothing is copied. With
    ``sync_dir`` False the caller makes the rename durable (:func:`fsync_dir`, once per folder
    for many files) before it records the copy as verified.
    """
    staged = stage_copy(
        src,
        dst,
        file_mode=file_mode,
        dir_mode=dir_mode,
        gid=gid,
        chunk_bytes=chunk_bytes,
        expected=expected,
        durable=True,
    )
    if isinstance(staged, CopyResult):
        return staged
    result, _ = commit_copy(staged, [dst])
    if sync_dir:
        try:
            fsync_dir(dst.parent)
        except OSError as exc:
            raise TransferError.of(exc, src, dst, "copy") from exc
    return result


def stage_copy(
    src: Path | SourceFile,
    dst: Path,
    *,
    file_mode: int = 0o640,
    dir_mode: int = 0o2770,
    gid: int | None = None,
    chunk_bytes: int = 8 << 20,
    expected: tuple[int, int] | None = None,
    durable: bool = True,
) -> Staged | CopyResult:
    """The first half of a copy: stream ``src`` to the temporary name with its checksum.

    Returns a CopyResult (nothing copied) when an identical verified file is already in place.
    With ``durable`` False the temporary file is not fsync-ed: the caller syncs many small files
    at once (one ``sync`` instead of one ``fsync`` each) before :func:`commit_copy`.
    """
    try:
        return _stage(src, dst, file_mode, dir_mode, gid, chunk_bytes, expected, durable)
    except OSError as exc:
        raise TransferError.of(exc, src, dst, "copy") from exc


def commit_copy(
    staged: Staged, targets: Iterable[Path], *, evicted: bool = False
) -> tuple[CopyResult, Path]:
    """The second half: read the temporary file back (from storage, not the page cache) and
    give it the first of ``targets`` that is free (never replacing a file). The temporary file
    is removed on any failure. ``evicted``: :func:`read_back_from_storage` already dropped its
    cached pages after the flush (and asked for them again from the storage)."""
    tmp = staged.tmp
    try:
        # a final name only ever holds good data
        _verify(tmp, staged.size, staged.checksum, drop_cache=not evicted)
        for target in targets:
            try:
                _rename_no_clobber(tmp, target)
            except DestinationTakenError:
                continue
            result = CopyResult(staged.size, staged.mtime_ns, staged.checksum, copied=True)
            return result, target
        raise DestinationTakenError(f"{staged.dst}: already holds a different file; kept")
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise TransferError.of(exc, staged.src, staged.dst, "verify") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _stage(
    src: Path | SourceFile,
    dst: Path,
    file_mode: int,
    dir_mode: int,
    gid: int | None,
    chunk_bytes: int,
    expected: tuple[int, int] | None,
    durable: bool,
) -> Staged | CopyResult:
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
        with _open_source(src) as fin:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                buf = _buffer(before.st_size, chunk_bytes)
                view = memoryview(buf)
                while n := fin.readinto(buf):
                    hasher.update(view[:n])
                    written = 0
                    while written < n:
                        written += os.write(fd, view[written:n])
                    size += n
                if durable:
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
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return Staged(src, dst, tmp, size, before.st_mtime_ns, hasher.hexdigest())


def _rename_no_clobber(tmp: Path, dst: Path) -> None:
    """Give ``tmp`` its final name unless that name exists: ``renameat2(RENAME_NOREPLACE)``,
    one atomic call that refuses to replace; where the kernel or file system lacks it, a hard
    link (atomic, refuses too) and an unlink; without links, a checked rename."""
    if _renameat2_no_replace(tmp, dst):
        return
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


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _renameat2_no_replace(tmp: Path, dst: Path) -> bool:
    """True when renamed; False when this kernel or file system cannot say "no replace"."""
    rename = getattr(_LIBC, "renameat2", None)
    if rename is None:
        return False
    if rename(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise DestinationTakenError(f"{dst}: already holds a different file; kept")
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _existing_identical(src: Path | SourceFile, dst: Path, src_stat: Any) -> CopyResult | None:
    """A destination left by an earlier, interrupted run: keep it only if provably identical."""
    try:
        dst_stat = dst.stat()
    except FileNotFoundError:
        return None
    if (dst_stat.st_size, dst_stat.st_mtime_ns) != (src_stat.st_size, src_stat.st_mtime_ns):
        return None
    src_sum = _source_checksum(src)
    if file_checksum(dst, drop_cache=True) != src_sum:
        return None
    return CopyResult(src_stat.st_size, src_stat.st_mtime_ns, src_sum, copied=False)


def _verify(path: Path, size: int, checksum: str, *, drop_cache: bool = True) -> None:
    actual_size = path.stat().st_size
    if actual_size != size:
        raise TransferError(f"{path}: size {actual_size} after copy, expected {size}")
    actual = file_checksum(path, drop_cache=drop_cache)
    if actual != checksum:
        raise TransferError(f"{path}: checksum {actual} after copy, expected {checksum}")
