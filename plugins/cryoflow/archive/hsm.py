"""The optional HSM command step: run ``dsmmigrate`` / ``dsmls`` (IBM Storage Protect for Space
Management, formerly TSM HSM) on an HSM node over SSH and record what state each file is in.

The GPFS policy (``config/gpfs/hsm-migrate.pol``) does the bulk migration; this step gives a
session's tagged files a tape copy right away (``premigrate``: data stays on disk) or frees disk
(``migrate``), and always asks ``dsmls`` afterwards, so the session summary says what is on tape
as the HSM client reports it, not as we hoped. Every path is shell-quoted; the commands are
strings for a ``runner(command) -> (exit status, stdout, stderr)`` such as the project's SSH
hook's ``run``, so nothing here opens a connection itself.

``dsmls`` prints, after a banner and a two-line header, one line per file: actual size (bytes,
``<dir>`` for a folder in some versions), resident size (bytes), resident blocks (KB), file
state (``r`` resident, ``p`` premigrated, ``m`` migrated, ``-`` folder or special file; a migrated
file may add its recall mode, ``(p)`` partial or ``(s)`` streaming) and the name. A line ending
in ``:`` names the folder whose entries follow (relative names are joined to it).
"""

from __future__ import annotations

import re
import shlex
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryoflow.archive.settings import ArchiveConfig
from cryoflow.names import shown, to_text

Runner = Callable[[str], tuple[int, str, str]]

_ENTRY = re.compile(
    r"^\s*(?P<actual><dir>|\d+)\s+(?P<resident>\d+)\s+(?P<blocks>\d+)\s+"
    r"(?P<state>[mpr-])(?:\s*\((?P<recall>[a-z])\))?\s+(?P<name>\S.*?)\r?$"
)
_HEADER = re.compile(r"^\s*Actual\s+Resident\s+Resident\s+File\s+File\s*$")
_HEADER2 = re.compile(r"^\s*Size\s+Size\s+Blk\s*\(KB\)\s+State\s+Name\s*$")
_MESSAGE = re.compile(r"^\s*(?P<code>AN[RS]\d{4}[EISW])\b")


class HsmState(StrEnum):
    RESIDENT = "resident"
    PREMIGRATED = "premigrated"
    MIGRATED = "migrated"


_STATES = {"r": HsmState.RESIDENT, "p": HsmState.PREMIGRATED, "m": HsmState.MIGRATED}


class HsmCommandError(ValueError):
    """A path cannot be put on a command line safely (relative, or too long on its own)."""


@dataclass(frozen=True)
class DsmlsEntry:
    path: str
    actual_size: int | None  # None for <dir>
    resident_size: int
    resident_kb: int
    state: HsmState | None  # None: a folder or special file ("-")
    recall_mode: str | None = None


@dataclass
class DsmlsListing:
    entries: list[DsmlsEntry] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  # ANSnnnnX lines, as printed
    unparsed: list[str] = field(default_factory=list)  # never dropped silently

    def states(self) -> dict[str, HsmState]:
        return {e.path: e.state for e in self.entries if e.state is not None}


def parse_dsmls(output: str) -> DsmlsListing:
    """Parse ``dsmls`` output; lines that are neither banner, header, entry nor message are
    kept in ``unparsed`` so a changed format shows up in the summary instead of vanishing."""
    listing = DsmlsListing()
    header_seen = False
    folder = ""
    for line in output.splitlines():
        if not line.strip():
            continue
        if _HEADER.match(line) or _HEADER2.match(line):
            header_seen = True
            continue
        if _MESSAGE.match(line):
            listing.messages.append(line.strip())
            continue
        match = _ENTRY.match(line)
        if match is None:
            if header_seen:  # before the header: the client's banner
                listing.unparsed.append(line)
            continue
        name, state = match["name"], match["state"]
        if state == "-" and name.endswith(":"):
            folder = name[:-1].rstrip("/")
            continue
        if not name.startswith("/") and folder:
            name = f"{folder}/{name}"
        actual = None if match["actual"] == "<dir>" else int(match["actual"])
        listing.entries.append(
            DsmlsEntry(
                path=name,
                actual_size=actual,
                resident_size=int(match["resident"]),
                resident_kb=int(match["blocks"]),
                state=_STATES.get(state),
                recall_mode=match["recall"],
            )
        )
    return listing


def command_lines(
    words: Sequence[str], paths: Sequence[str], *, prefix: Sequence[str] = (), max_bytes: int
) -> list[str]:
    """``prefix + words + paths`` as shell command lines of at most ``max_bytes`` each (more
    paths, more commands), every word quoted with :func:`shlex.quote`."""
    head = shlex.join([*prefix, *words])
    commands: list[str] = []
    current = head
    for path in paths:
        if not path.startswith("/"):
            raise HsmCommandError(f"{shown(path)}: only absolute paths go to the HSM node")
        word = " " + shlex.quote(path)
        if len(head) + len(word) > max_bytes:
            raise HsmCommandError(f"{shown(path)}: longer than a whole command may be")
        if len(current) + len(word) > max_bytes:
            commands.append(current)
            current = head
        current += word
    if current != head:
        commands.append(current)
    return commands


@dataclass
class HsmReport:
    mode: str
    commands: list[dict[str, Any]] = field(default_factory=list)
    states: dict[str, HsmState] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # asked for, not in dsmls's answer
    skipped: list[str] = field(default_factory=list)  # names no command line can carry
    messages: list[str] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        failed = any(c["exit_status"] != 0 for c in self.commands)
        return not (failed or self.missing or self.skipped or self.unparsed)

    def as_dict(self) -> dict[str, Any]:
        counts = Counter(str(s) for s in self.states.values())
        return {
            "mode": self.mode,
            "ok": self.ok,
            "files": {str(s): counts.get(str(s), 0) for s in HsmState},
            "missing": [to_text(p) for p in self.missing],
            "skipped": [to_text(p) for p in self.skipped],
            "messages": self.messages,
            "unparsed": [to_text(line) for line in self.unparsed],
            "commands": self.commands,
        }


def run_hsm_step(paths: Sequence[Path], config: ArchiveConfig, runner: Runner) -> HsmReport:
    """(Pre)migrate ``paths`` as ``config.hsm_mode`` says, then record their ``dsmls`` state.

    A name that is not UTF-8 cannot travel in an SSH command string: it is reported under
    ``skipped`` (the GPFS policy still migrates it). Errors of the runner itself (SSH down)
    propagate, so the task retries."""
    report = HsmReport(config.hsm_mode)
    if config.hsm_mode == "off":
        return report
    sendable: list[str] = []
    for path in paths:
        text = str(path)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            report.skipped.append(text)
            continue
        sendable.append(text)
    size, prefix = config.hsm_max_command_bytes, config.hsm_command_prefix
    if config.hsm_mode in ("premigrate", "migrate"):
        words = [*config.hsm_migrate_command]
        if config.hsm_mode == "premigrate":
            words.append("-premigrate")
        for command in command_lines(words, sendable, prefix=prefix, max_bytes=size):
            _, out, err = _run(report, runner, command)  # of its output, only messages matter
            lines = (out + "\n" + err).splitlines()
            report.messages += [line.strip() for line in lines if _MESSAGE.match(line)]
    wanted = set(sendable)
    for command in command_lines(config.hsm_ls_command, sendable, prefix=prefix, max_bytes=size):
        _, out, err = _run(report, runner, command)
        listing = parse_dsmls(out + "\n" + err)
        report.messages += listing.messages
        report.unparsed += listing.unparsed
        report.states.update({p: s for p, s in listing.states().items() if p in wanted})
    report.missing = sorted(wanted - set(report.states))
    return report


def _run(report: HsmReport, runner: Runner, command: str) -> tuple[int, str, str]:
    status, out, err = runner(command)
    report.commands.append(
        {"command": to_text(command), "exit_status": status, "stderr": to_text(err[-2000:])}
    )
    return status, out, err
