"""The session's folder tree on long-term storage, with the experiment's permissions.

``<gpfs_root>/<year>/<session>/{raw,processed,logs}``: directories are setgid and owned by the
experiment's Unix group (so every file created below inherits the group), with no world access;
collaborators get POSIX ACLs (default ACLs too, so new files inherit them) where the filesystem
supports them. ``setfacl`` is run with an argument list, never through a shell.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SUBDIRS = ("raw", "processed", "logs")


class PermissionSetupError(RuntimeError):
    """The experiment's group or a collaborator cannot be applied; names which and why."""


@dataclass(frozen=True)
class SessionPaths:
    root: Path
    raw: Path
    processed: Path
    logs: Path

    @classmethod
    def for_session(cls, gpfs_root: Path, year: int, session: str) -> SessionPaths:
        root = gpfs_root / f"{year:04d}" / session
        return cls(root=root, raw=root / "raw", processed=root / "processed", logs=root / "logs")

    def all(self) -> tuple[Path, ...]:
        return (self.root, self.raw, self.processed, self.logs)


def resolve_gid(group: str | None) -> int | None:
    """Group name (or numeric id) to gid; None keeps the service account's group."""
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise PermissionSetupError(f"unix_group: no such group {group!r} on this host") from None


def create_session_tree(
    paths: SessionPaths,
    *,
    gid: int | None,
    dir_mode: int,
    collaborators: list[str],
    acl: str,
) -> list[str]:
    """Create (or repair) the tree; returns notes for the task log (e.g. ACLs not supported)."""
    notes: list[str] = []
    for user in collaborators:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise PermissionSetupError(
                f"collaborators: no such user {user!r} on this host"
            ) from None
    for directory in paths.all():
        directory.mkdir(parents=True, exist_ok=True)
        if gid is not None:
            os.chown(directory, -1, gid)
        os.chmod(directory, dir_mode)
    if collaborators and acl != "off":
        error = _grant_acls(paths, collaborators)
        if error and acl == "required":
            raise PermissionSetupError(f"collaborator ACLs could not be set: {error}")
        if error:
            notes.append(f"collaborator ACLs not applied ({error}); group permissions only")
        else:
            notes.append(f"ACLs granted to {', '.join(collaborators)}")
    return notes


def _grant_acls(paths: SessionPaths, users: list[str]) -> str | None:
    setfacl = shutil.which("setfacl")
    if setfacl is None:
        return "setfacl is not installed"
    spec = ",".join(f"u:{u}:rwX,d:u:{u}:rwX" for u in users)
    for directory in paths.all():
        proc = subprocess.run(
            [setfacl, "-m", spec, "--", str(directory)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            return proc.stderr.strip() or f"setfacl exited {proc.returncode}"
    return None
