"""The HSM command step: quoted command lines for dsmmigrate/dsmls, and dsmls output parsed
into per-file states, with nothing it did not understand dropped silently."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from cryoflow.archive.hsm import (
    HsmCommandError,
    HsmState,
    command_lines,
    parse_dsmls,
    run_hsm_step,
)
from cryoflow.archive.settings import ArchiveConfig

RAW = "/gpfs/slac/cryoem/exp/2026/20261201_krios1_grid3/raw/Images-Disc1/GridSquare_1/Data"

# dsmls as the Storage Protect for Space Management client prints it: banner, the two header
# lines (Actual Size, Resident Size, Resident Blk (KB), File State, File Name), then a line per
# file. Columns and states as IBM documents them (r resident, p premigrated, m migrated with an
# optional recall mode "(p)" or "(s)", "-" for folders); sizes and names are this session's.
DSMLS = f"""\
IBM Spectrum Protect
Command Line Space Management Client Interface
  Client Version 8, Release 1, Level 21.0
  Client date/time: 12/01/2026 22:14:07
(c) Copyright by IBM Corporation and other(s) 1990, 2024. All Rights Reserved.

      Actual     Resident     Resident  File   File
        Size         Size     Blk (KB)  State  Name
   264241152            0            0   m      {RAW}/FoilHole_1_Data_2_fractions.tiff
   264241152    264241152       258048   p      {RAW}/FoilHole_1_Data_3_fractions.tiff
   264241152    264241152       258048   r      {RAW}/FoilHole_1_Data_4_fractions.tiff
   536870912      1048576         1024   m (p)  {RAW}/FoilHole_1_Data_5_EER.eer
   264241152            0            0   m      {RAW}/FoilHole 1 Data 6 with spaces.tiff
       <dir>         4096            4   -      {RAW}/:
     8388608      8388608         8192   r      CountRef.gain
"""


def test_dsmls_output_gives_each_files_state() -> None:
    listing = parse_dsmls(DSMLS)

    assert listing.states() == {
        f"{RAW}/FoilHole_1_Data_2_fractions.tiff": HsmState.MIGRATED,
        f"{RAW}/FoilHole_1_Data_3_fractions.tiff": HsmState.PREMIGRATED,
        f"{RAW}/FoilHole_1_Data_4_fractions.tiff": HsmState.RESIDENT,
        f"{RAW}/FoilHole_1_Data_5_EER.eer": HsmState.MIGRATED,
        f"{RAW}/FoilHole 1 Data 6 with spaces.tiff": HsmState.MIGRATED,
        f"{RAW}/CountRef.gain": HsmState.RESIDENT,  # relative name, in the folder above it
    }
    eer = next(e for e in listing.entries if e.path.endswith(".eer"))
    assert (eer.actual_size, eer.resident_size, eer.resident_kb) == (536870912, 1048576, 1024)
    assert eer.recall_mode == "p"
    assert listing.unparsed == [] and listing.messages == []


def test_messages_and_lines_it_does_not_understand_are_kept() -> None:
    output = DSMLS + (
        "ANS9086E Illustrative error text for a path that vanished\n   264241152  mangled line\n"
    )

    listing = parse_dsmls(output)

    assert listing.messages == ["ANS9086E Illustrative error text for a path that vanished"]
    assert listing.unparsed == ["   264241152  mangled line"]


def test_every_path_is_quoted_and_long_lists_are_split() -> None:
    nasty = [
        f"{RAW}/a b.tiff",
        f"{RAW}/$(rm -rf ~).tiff",
        f"{RAW}/it's; reboot.tiff",
        f"{RAW}/new\nline.tiff",
        f"{RAW}/-premigrate.tiff",
    ]

    commands = command_lines(
        ["dsmmigrate", "-premigrate"], nasty, prefix=["sudo", "-n"], max_bytes=300
    )

    assert len(commands) > 1 and all(len(c) <= 300 for c in commands)
    words = [shlex.split(c) for c in commands]
    assert all(w[:4] == ["sudo", "-n", "dsmmigrate", "-premigrate"] for w in words)
    assert [p for w in words for p in w[4:]] == nasty  # a shell gives back exactly these


def test_relative_or_oversized_paths_are_refused() -> None:
    with pytest.raises(HsmCommandError, match="absolute"):
        command_lines(["dsmls"], ["raw/x.tiff"], max_bytes=4096)
    with pytest.raises(HsmCommandError, match="longer"):
        command_lines(["dsmls"], ["/" + "x" * 5000], max_bytes=4096)


class _Node:
    """Stands in for the SSH hook's run(): records commands, answers dsmls like the node."""

    def __init__(self, answer: str) -> None:
        self.answer, self.commands = answer, []

    def __call__(self, command: str) -> tuple[int, str, str]:
        self.commands.append(command)
        if "dsmmigrate" in command:
            return 0, "ANS9101I Illustrative: migrated 3 files\n", ""
        return 0, self.answer, ""


def _config(mode: str) -> ArchiveConfig:
    return ArchiveConfig(hsm_mode=mode, hsm_ssh_conn_id="hsm_node", hsm_command_prefix=("sudo",))


def test_premigrate_then_record_what_dsmls_says() -> None:
    paths = [
        Path(f"{RAW}/FoilHole_1_Data_2_fractions.tiff"),
        Path(f"{RAW}/FoilHole_1_Data_3_fractions.tiff"),
        Path(f"{RAW}/not_in_the_answer.tiff"),
        Path(os.fsdecode(RAW.encode() + b"/caf\xe9.tiff")),
    ]
    node = _Node(DSMLS)

    report = run_hsm_step(paths, _config("premigrate"), node)

    assert [shlex.split(c)[:3] for c in node.commands] == [
        ["sudo", "dsmmigrate", "-premigrate"],
        ["sudo", "dsmls", str(paths[0])],
    ]
    assert report.states == {str(paths[0]): HsmState.MIGRATED, str(paths[1]): HsmState.PREMIGRATED}
    assert report.missing == [str(paths[2])]
    assert report.skipped == [str(paths[3])]  # cannot travel in an SSH command string
    assert not report.ok
    summary = report.as_dict()
    assert summary["files"] == {"resident": 0, "premigrated": 1, "migrated": 1}
    assert summary["skipped"] == [RAW + "/caf\\xe9.tiff"]
    assert summary["messages"] == ["ANS9101I Illustrative: migrated 3 files"]
    assert [c["exit_status"] for c in summary["commands"]] == [0, 0]


def test_status_only_runs_dsmls_and_off_runs_nothing() -> None:
    node = _Node(DSMLS)
    paths = [Path(f"{RAW}/FoilHole_1_Data_4_fractions.tiff")]

    report = run_hsm_step(paths, _config("status"), node)

    assert len(node.commands) == 1 and shlex.split(node.commands[0])[:2] == ["sudo", "dsmls"]
    assert report.ok and report.states == {str(paths[0]): HsmState.RESIDENT}

    idle = _Node(DSMLS)
    assert run_hsm_step(paths, ArchiveConfig(), idle).as_dict()["mode"] == "off"
    assert idle.commands == []


def test_a_failing_command_is_recorded_and_not_ok() -> None:
    def node(command: str) -> tuple[int, str, str]:
        return 12, "", "ANS1017E Illustrative: session rejected\n"

    report = run_hsm_step([Path(f"{RAW}/m.tiff")], _config("migrate"), node)

    assert not report.ok
    assert report.commands[0]["exit_status"] == 12
    assert "ANS1017E Illustrative: session rejected" in report.messages
    assert report.missing == [f"{RAW}/m.tiff"]


def test_a_mode_without_a_node_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="hsm_ssh_conn_id"):
        ArchiveConfig(hsm_mode="migrate")
    assert ArchiveConfig(hsm_mode=False).hsm_mode == "off"  # YAML's bare off
