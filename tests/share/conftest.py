"""One share, two backends: the same folder read as a mounted path and over SMB.

``share_backend`` is parametrised ["mount", "smb"]: a test writes its files into ``root`` (a local
folder, as the microscope PC would) and reads them through ``source``. For "smb", ``root`` is a
fresh folder behind the Samba share of ``scripts/services.sh samba`` and ``source`` an
:class:`SmbSource` for it (skipped locally without root, a failure under CI=true).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cryoflow.ingest.share.smb import SmbCredentials, SmbSource
from cryoflow.ingest.share.source import LocalSource, ShareSource
from tests.services_fixtures import SambaService


@dataclass
class Backend:
    kind: str  # "mount" | "smb"
    root: Path  # where the "microscope" writes, locally
    source: ShareSource
    samba: SambaService | None = None
    folder: str = ""  # smb: the folder within the share

    def sub(self, rel: str) -> Backend:
        """The same backend for a folder below ``root`` (that may not exist yet)."""
        if self.samba is None:
            return Backend(self.kind, self.root / rel, LocalSource(self.root / rel))
        folder = f"{self.folder}/{rel}"
        return Backend(
            self.kind, self.root / rel, smb_source(self.samba, folder), self.samba, folder
        )


def smb_source(samba: SambaService, folder: str, **kw: object) -> SmbSource:
    creds = SmbCredentials(samba.user, samba.password)
    return SmbSource(
        samba.host, samba.share, folder, port=samba.port, credentials=lambda: creds, **kw
    )


def smb_folder(samba: SambaService) -> tuple[Path, str]:
    """A fresh folder behind the share, writable by the SMB test user (another client writes)."""
    folder = f"t-{uuid.uuid4().hex[:12]}"
    root = samba.share_path / folder
    root.mkdir()
    shutil.chown(root, samba.user, samba.user)
    return root, folder


@pytest.fixture(params=["mount", "smb"])
def share_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "mount":
        yield Backend("mount", tmp_path, LocalSource(tmp_path))
        return
    request.applymarker(pytest.mark.services)
    samba: SambaService = request.getfixturevalue("samba_service")
    root, folder = smb_folder(samba)
    source = smb_source(samba, folder)
    try:
        yield Backend("smb", root, source, samba, folder)
    finally:
        source.close()
        shutil.rmtree(root, ignore_errors=True)
