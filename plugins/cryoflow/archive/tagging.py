"""Tag verified raw files for TSM HSM migration: user extended attributes the GPFS ILM policy
selects on (``XATTR('user.cryoflow.archive_class')``), set only after the copy was verified and
read back to prove they are there."""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryoflow.names import to_text

TAGS = ("session", "checksum", "archive_class", "verified_at")


class TaggingError(OSError):
    """The attributes could not be set, did not read back as written, or would contradict the
    checksum the file already carries."""


def tag_verified(
    path: Path,
    *,
    prefix: str,
    session: str,
    checksum: str,
    archive_class: str,
    verified_at: datetime,
) -> dict[str, str]:
    """Set the archive attributes on a verified file and read them back.

    A file that already carries a different checksum is refused and left as it is: a verified
    copy is never rewritten in place, so a second checksum for the same path means something
    else changed the file, and the tape copy must not be labelled with the new one."""
    wanted = {
        "session": session,
        "checksum": checksum,
        "archive_class": archive_class,
        "verified_at": verified_at.isoformat(),
    }
    # One open file for the twelve attribute calls: a path resolved twelve times costs more
    # than the copy of a small file. O_NOFOLLOW: a verified copy is never a symlink.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise TaggingError(exc.errno, f"cannot open to tag: {exc.strerror}", str(path)) from exc
    try:
        before = _read_tags(fd, prefix, ("checksum",)).get("checksum")
        if before is not None and before != checksum:
            raise TaggingError(
                errno.EEXIST,
                f"already tagged with checksum {before}, refusing {checksum}",
                str(path),
            )
        for name, value in wanted.items():
            try:
                # fsencode: a session name that is not UTF-8 round-trips byte for byte
                os.setxattr(fd, f"{prefix}{name}", os.fsencode(value))
            except OSError as exc:
                why = f"cannot set {prefix}{name}: {exc.strerror}"
                raise TaggingError(exc.errno, why, str(path)) from exc
        found = _read_tags(fd, prefix, TAGS)
    finally:
        os.close(fd)
    if found != wanted:
        raise TaggingError(
            errno.EIO, f"archive attributes read back as {found}, wrote {wanted}", str(path)
        )
    return found


def _read_tags(fd: int, prefix: str, names: Iterable[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for name in names:
        try:
            raw = os.getxattr(fd, f"{prefix}{name}")
        except OSError:
            continue
        tags[name] = os.fsdecode(raw)
    return tags


def read_tags(path: Path, prefix: str) -> dict[str, str]:
    """The archive attributes a file carries (missing ones are absent from the result)."""
    tags: dict[str, str] = {}
    for name in TAGS:
        try:
            raw = os.getxattr(path, f"{prefix}{name}", follow_symlinks=False)
        except OSError:
            continue
        tags[name] = os.fsdecode(raw)
    return tags


@dataclass
class TagSummary:
    """What the session summary says about tagging: how many files carry all four attributes,
    per archive class, and which do not (so a person can see what will never reach tape)."""

    tagged: int = 0
    untagged: int = 0
    partial: int = 0
    by_class: Counter[str] = field(default_factory=Counter)
    not_tagged: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tagged": self.tagged,
            "untagged": self.untagged,
            "partially_tagged": self.partial,
            "by_class": dict(sorted(self.by_class.items())),
            "not_tagged": self.not_tagged,
        }


def tag_summary(paths: Iterable[Path], prefix: str, *, list_at_most: int = 50) -> TagSummary:
    """Read the attributes of ``paths`` back from the file system (not from what the copy
    meant to set) and count them; at most ``list_at_most`` untagged names are listed."""
    summary = TagSummary()
    for path in paths:
        tags = read_tags(path, prefix)
        if len(tags) == len(TAGS):
            summary.tagged += 1
            summary.by_class[tags["archive_class"]] += 1
            continue
        if tags:
            summary.partial += 1
        else:
            summary.untagged += 1
        if len(summary.not_tagged) < list_at_most:
            summary.not_tagged.append(to_text(str(path)))
    return summary
