"""Where a session's files are read from: a mounted folder or an SMB share, behind one protocol.

Why one protocol: the watch (list, settle, completeness) and the copy (stream with checksum) must
not care whether the microscope PC's share is a CIFS mount or is spoken to directly over SMB 2/3,
but two things only the SMB side can say need a place in it:

- ``held_for_writing``: the Windows side still has the file open for writing. A CIFS mount cannot
  tell (settling decides, as before); over SMB an open that denies writers fails with a sharing
  violation while a writer holds the file.
- :class:`ShareOffline`: the share cannot be reached (server down, network, credentials refused
  or expired). It is raised, never turned into "no files", so a watch pauses instead of
  concluding that every file was deleted.

A session folder is addressed by the ``source_root`` string the ledger keeps: a local path for a
mounted share, ``smb://server:port/share/folder`` for SMB (no credentials; those come from an
Airflow Connection named in the microscope's YAML). :func:`source_for` turns it back into a
source.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, Protocol, runtime_checkable
from urllib.parse import quote

from cryoflow.ingest.share.completeness import Completeness, check_complete
from cryoflow.ingest.share.scan import ScanResult, resolve_in, safe_relpath, scan_tree

if TYPE_CHECKING:
    from cryoflow.config import ShareConfig
    from cryoflow.ingest.share.smb import SmbCredentials

SMB_SCHEME = "smb://"


class ShareOffline(OSError):  # noqa: N818  (an outcome, not a bug: the name says what it means)
    """The share cannot be reached; it says nothing about its files.

    An ``OSError`` with ``EHOSTDOWN``: a copy that meets it is a transient fault (offered again,
    however long it takes), a watch pauses and tries again with backoff.
    """

    def __init__(self, share: str, why: str) -> None:
        super().__init__(errno.EHOSTDOWN, f"share {share} is offline: {why}")
        self.share = share
        self.why = why

    def __str__(self) -> str:
        return str(self.strerror)


class HeldForWriting(OSError):  # noqa: N818
    """Another client (the microscope PC) has the file open for writing: it is not finished."""

    def __init__(self, location: str) -> None:
        super().__init__(errno.EBUSY, f"{location}: open for writing on the share")

    def __str__(self) -> str:
        return str(self.strerror)


class SourceStat(NamedTuple):
    """What the copy needs of a source file (the field names of ``os.stat_result``)."""

    st_size: int
    st_mtime_ns: int
    st_atime_ns: int


@runtime_checkable
class ShareSource(Protocol):
    """One session folder of a microscope share, files addressed by share-relative POSIX path.

    ``str(source)`` names it in messages and never holds credentials.
    """

    def location(self, relpath: str) -> str:
        """Where a file is, for messages (no credentials)."""
        ...

    def exists(self) -> bool:
        """The session folder is there (False: not created yet). Raises ShareOffline."""
        ...

    def scan(self, exclude: Iterable[str] = ()) -> ScanResult:
        """Every regular file, ignored names pruned, as :func:`scan_tree` does."""
        ...

    def stat(self, relpath: str) -> SourceStat:
        """Size and times, in the same units and precision as :meth:`scan`."""
        ...

    def open(self, relpath: str) -> BinaryIO:
        """Read-only, unbuffered binary stream (read/readinto/seek/close)."""
        ...

    def held_for_writing(self, relpath: str) -> bool:
        """Another client has the file open for writing."""
        ...

    def check_complete(self, relpath: str, expected_frames: int | None = None) -> Completeness:
        """Whether the file says it is whole (:mod:`cryoflow.ingest.share.completeness`)."""
        ...


class LocalSource:
    """A session folder on a mounted share (CIFS) or any local folder: today's functions."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def location(self, relpath: str) -> str:
        return str(self.root / relpath)

    def exists(self) -> bool:
        return self.root.is_dir()

    def scan(self, exclude: Iterable[str] = ()) -> ScanResult:
        return scan_tree(self.root, exclude)

    def stat(self, relpath: str) -> SourceStat:
        st = resolve_in(self.root, relpath).stat()
        return SourceStat(st.st_size, st.st_mtime_ns, st.st_atime_ns)

    def open(self, relpath: str) -> BinaryIO:
        return open(resolve_in(self.root, relpath), "rb", buffering=0)  # noqa: SIM115

    def held_for_writing(self, relpath: str) -> bool:
        return False  # a mount cannot tell; size and mtime settling decide

    def check_complete(self, relpath: str, expected_frames: int | None = None) -> Completeness:
        return check_complete(self.root / relpath, expected_frames=expected_frames)


@dataclass(frozen=True)
class SourceFile:
    """One file of a source, as the copy reads it (``transfer.stage_copy`` accepts it where it
    takes a local path): ``stat()``, ``open()``, and ``str()`` for messages."""

    source: ShareSource
    relpath: str

    def stat(self) -> SourceStat:
        return self.source.stat(self.relpath)

    def open(self) -> BinaryIO:
        return self.source.open(self.relpath)

    @property
    def name(self) -> str:
        return PurePosixPath(self.relpath).name

    def __str__(self) -> str:
        return self.source.location(self.relpath)


def is_smb_root(source_root: str) -> bool:
    return source_root.startswith(SMB_SCHEME)


def smb_root(server: str, port: int, share: str, folder: str) -> str:
    """``smb://server:port/share/folder``, the names percent-quoted (a folder may hold ``#``,
    ``?``, ``%`` or spaces)."""
    inside = "/".join(quote(part, safe="") for part in PurePosixPath(folder).parts if part != ".")
    return f"{SMB_SCHEME}{server}:{port}/{quote(share, safe='')}" + (f"/{inside}" if inside else "")


def session_root(share: ShareConfig, folder: str) -> str:
    """The ``source_root`` of a session folder, as the ledger keeps it."""
    if share.kind == "smb":
        inside = PurePosixPath(share.path.as_posix()) / safe_relpath(folder)
        return smb_root(str(share.server), share.port, str(share.share_name), inside.as_posix())
    return str(resolve_in(share.path, folder))


def source_for(
    source_root: str,
    conn_id: str | None = None,
    *,
    credentials: Callable[[], SmbCredentials] | None = None,
    timeout_seconds: float = 30.0,
) -> ShareSource:
    """The source a ``source_root`` names. For SMB the credentials come from the Airflow
    Connection ``conn_id`` (or ``credentials``, a callable returning ``SmbCredentials``), read
    when the share is first reached, not here."""
    if not is_smb_root(source_root):
        return LocalSource(source_root)
    from cryoflow.ingest.share.smb import SmbSource, airflow_credentials

    if credentials is None:
        if not conn_id:
            raise ValueError(
                f"{source_root}: an SMB share needs share.conn_id (an Airflow Connection)"
            )
        name = conn_id

        def credentials() -> SmbCredentials:
            return airflow_credentials(name)

    return SmbSource.from_root(source_root, credentials, timeout_seconds=timeout_seconds)
