"""The shipped GPFS policy, judged on a real session tree with real extended attributes: it
selects exactly the tagged raw files (and the session's verified tar), nothing else; and the
evaluator refuses policy text it cannot judge rather than misjudging it."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cryoflow.archive.aggregate import DEFAULT_PATTERNS, aggregate_small_files
from cryoflow.archive.ilm_policy import (
    FileFacts,
    PolicyError,
    file_facts,
    load_policy,
    parse_policy,
)
from cryoflow.archive.settings import ArchiveConfig
from cryoflow.archive.tagging import tag_verified
from cryoflow.config import load_facility
from cryoflow.ingest.transfer import CHECKSUM_ALGORITHM, file_checksum

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "gpfs" / "hsm-migrate.pol"
ARCHIVE = ArchiveConfig()
SESSION = "20261201_krios1_grid3"


def _write(path: Path, data: bytes = b"x" * 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tag(path: Path, archive_class: str = ARCHIVE.archive_class) -> Path:
    tag_verified(
        path,
        prefix=ARCHIVE.xattr_prefix,
        session=SESSION,
        checksum=f"{CHECKSUM_ALGORITHM}:{file_checksum(path)}",
        archive_class=archive_class,
        verified_at=datetime.now(UTC),
    )
    return path


def _session_tree(gpfs: Path) -> tuple[Path, set[Path]]:
    """An EPU session as the copy and the processing leave it; returns (root, what must go to
    tape)."""
    root = gpfs / "2026" / SESSION
    raw = root / "raw" / "Images-Disc1" / "GridSquare_123"
    must = {
        _tag(_write(raw / "Data" / "FoilHole_1_Data_2_fractions.tiff")),
        _tag(_write(raw / "Data" / "FoilHole_1_Data_3_EER.eer")),
        _tag(_write(raw / "Data" / "FoilHole_1_Data_4.mrc")),
        _tag(_write(root / "raw" / "gain" / "CountRef.gain")),
        _tag(_write(raw / "Data" / "FoilHole_1_Data_5.v2.tiff")),  # a changed source's copy
        _tag(_write(root / "raw" / "Images_Disc%1" / "odd_name [1].tif")),  # LIKE wildcards
        _tag(_write(root / "raw" / os.fsdecode(b"caf\xe9") / "m.tiff")),  # not UTF-8
    }
    # verified and tagged by the copy, but previews and small metadata stay on disk
    _tag(_write(raw / "GridSquare_20261201_101010.jpg"))
    _tag(_write(raw / "GridSquare_20261201_101010.xml"))
    _tag(_write(raw / "FoilHoles" / "FoilHole_1_20261201.JPG"))
    _tag(_write(raw / "Data" / "FoilHole_1_Data_2.xml"))
    _tag(_write(root / "raw" / "serialem" / "grid3.mdoc"))
    _tag(_write(root / "raw" / "serialem" / "grid3.nav"))
    _tag(_write(root / "raw" / "EpuSession.dm"))
    # raw, but not (yet) verified: never tagged
    _write(raw / "Data" / "FoilHole_1_Data_6_fractions.tiff")
    # tagged, but with another class, or outside raw/
    _tag(_write(raw / "Data" / "FoilHole_1_Data_7_fractions.tiff"), "scratch")
    _tag(_write(root / "stray_fractions.tiff"))
    # processed outputs and previews, logs: even a tagged one (a tool copied the attributes)
    processed = root / "processed" / "motioncor"
    _write(processed / "FoilHole_1_Data_2_fractions.mrc")
    _write(processed / "FoilHole_1_Data_2_fractions_preview.png")
    _tag(_write(processed / "FoilHole_1_Data_3_EER.mrc"))
    _tag(_write(root / "processed" / "raw" / "copied_with_xattrs.tiff"))
    _write(root / "logs" / "session_summary.json", b"{}")
    _tag(_write(root / "logs" / "raw" / "job.log"))
    # the HSM client's own files
    _tag(_write(gpfs / ".SpaceMan" / "raw" / "candidates"))
    # the session's tar of small files: built, verified and tagged for real
    result = aggregate_small_files(
        root, patterns=ARCHIVE.aggregate_patterns, archive_class=ARCHIVE.aggregate_class
    )
    assert result.tagged and result.tar is not None
    must.add(result.tar)
    return root, must


def _all_files(top: Path) -> list[Path]:
    return sorted(
        Path(folder) / name
        for folder, _, names in os.walk(top)
        for name in names
        if os.path.isfile(Path(folder) / name)
    )


def test_the_shipped_policy_selects_exactly_the_tagged_raw_files(tmp_path: Path) -> None:
    policy = load_policy(SHIPPED)
    gpfs = tmp_path / "gpfs"
    _, must = _session_tree(gpfs)
    files = _all_files(gpfs)
    assert len(files) > len(must) + 15  # the tree really has the files that must stay

    selected = {path for path in files if policy.selects(file_facts(path))}

    assert selected == must
    for path in must:  # each by the rule meant for it, to the external pool
        decision = policy.decide(file_facts(path))
        assert decision.pool == "hsm"
        assert decision.rule == (
            "small-files-tar-to-tape" if path.suffix == ".tar" else "raw-to-tape"
        )


def test_the_policy_keeps_on_disk_exactly_what_goes_into_the_tar() -> None:
    """The EXCLUDE list of previews and metadata is the aggregate's default name list: what
    stays off tape individually is what the tar carries."""
    policy = load_policy(SHIPPED)
    tagged = {"user.cryoflow.archive_class": "raw"}
    for archive in (ARCHIVE, load_facility(ROOT / "config" / "facility.yaml").archive):
        assert tuple(archive.aggregate_patterns) == DEFAULT_PATTERNS
    for pattern in DEFAULT_PATTERNS:
        for name in (pattern.replace("*", "x"), pattern.replace("*", "X").upper()):
            facts = FileFacts(f"/gpfs/2026/s/raw/{name}", tagged)
            assert policy.decide(facts).rule == "keep-previews-and-metadata", name
    for name in ("m.tiff", "m.tif", "m.eer", "m.mrc", "CountRef.gain", "m.dm4", "m.xml.bz2"):
        assert policy.selects(FileFacts(f"/gpfs/2026/s/raw/{name}", tagged)), name


def test_the_policy_uses_the_configured_names_and_values() -> None:
    """The policy hard-codes attribute names and values; they must be the defaults of
    ArchiveConfig and whatever config/facility.yaml sets."""
    policy = load_policy(SHIPPED)
    text = SHIPPED.read_text()
    for archive in (ARCHIVE, load_facility(ROOT / "config" / "facility.yaml").archive):
        assert policy.xattr_names == {archive.xattr_prefix + "archive_class"}
        assert f"= '{archive.archive_class}'" in text
        assert f"= '{archive.aggregate_class}'" in text
    assert policy.external_pools == {"hsm": "/var/mmfs/etc/mmpolicyExec-hsm"}


def test_a_missing_attribute_is_null_and_null_is_not_true() -> None:
    """SQL three-valued logic, as GPFS: NOT (XATTR(...) = 'raw') is unknown, not true, for a
    file without the attribute, so it does not select an untagged file."""
    policy = parse_policy(
        "RULE EXTERNAL POOL 'hsm' EXEC '/x'\n"
        "RULE 'not-raw' MIGRATE TO POOL 'hsm' WHERE NOT (XATTR('user.c') = 'raw')\n"
    )
    assert not policy.selects(FileFacts("/a/untagged"))
    assert not policy.selects(FileFacts("/a/raw", {"user.c": "raw"}))
    assert policy.selects(FileFacts("/a/other", {"user.c": "other"}))


def test_rules_apply_in_order_and_the_first_match_decides() -> None:
    policy = parse_policy(
        "RULE EXTERNAL POOL 'hsm' EXEC '/x'\n"
        "RULE 'keep' EXCLUDE WHERE NAME LIKE 'k_ep%'\n"
        "RULE 'go' MIGRATE TO POOL 'hsm' WHERE PATH_NAME LIKE '/a/%' OR FILE_SIZE > 10\n"
    )
    assert policy.decide(FileFacts("/a/keep.tiff")).rule == "keep"
    assert policy.decide(FileFacts("/a/kxep")).rule == "keep"
    assert policy.decide(FileFacts("/a/kep")).rule == "go"  # _ is exactly one character
    assert policy.decide(FileFacts("/b/big", size=11)).rule == "go"
    assert policy.decide(FileFacts("/b/small", size=10)).rule is None


_POOL = "RULE EXTERNAL POOL 'hsm' EXEC '/x'\n"


@pytest.mark.parametrize(
    ("rule", "complaint"),
    [
        ("RULE 'm' MIGRATE TO POOL 'hsm' FOR FILESET ('f') WHERE NAME = 'a'", "no clause"),
        ("RULE 'm' WHEN DAYOFWEEK(CURRENT_DATE) = 1 MIGRATE TO POOL 'hsm'", "knows only"),
        ("RULE 'd' DELETE WHERE NAME LIKE '%.tmp'", "knows only"),
        ("RULE 'm' MIGRATE TO POOL 'hsm' WHERE XATTR('user.c', 1, 3) = 'raw'", "expected \\)"),
        ("RULE 'm' MIGRATE TO POOL 'hsm' WHERE MYSTERY(NAME) = 'a'", "unknown name"),
        ("RULE 'm' MIGRATE TO POOL 'hsm' WHERE ACCESS_TIME < CURRENT_TIMESTAMP", "only inside"),
        ("RULE 'm' MIGRATE TO POOL 'hsm' WHERE NAME LIKE 'a!%' ESCAPE '!'", "ESCAPE"),
        ("RULE 'm' MIGRATE TO POOL 'hsm' WHERE NAME LIKE LOWER(NAME)", "literal LIKE"),
        ("RULE 'm' MIGRATE TO POOL 'system' WHERE NAME = 'a'", "not an EXTERNAL POOL"),
        ("RULE 'm' MIGRATE TO POOL 'hsm' WHERE NAME = 'a';", "cannot read"),
        ("define(is_raw, XATTR('user.c') = 'raw')", "expected RULE"),
        ("RULE 'm' MIGRATE TO POOL 'hsm' WHERE [NAME] = 'a'", "cannot read"),
        ("RULE 'm' MIGRATE THRESHOLD(190,80) TO POOL 'hsm'", "above 100"),
        ("/* never closed", "never closed"),
    ],
)
def test_what_the_evaluator_cannot_judge_is_an_error(rule: str, complaint: str) -> None:
    with pytest.raises(PolicyError, match=complaint) as caught:
        parse_policy(_POOL + rule + "\n")
    assert "line 2" in str(caught.value)


def test_an_edit_of_the_shipped_policy_it_cannot_judge_breaks_loudly() -> None:
    text = SHIPPED.read_text().replace(
        "AND PATH_NAME LIKE '%/raw/%'", "AND PATH_NAME LIKE '%/raw/%' AND MISC_ATTRIBUTES = 'x'"
    )
    assert text != SHIPPED.read_text()
    with pytest.raises(PolicyError, match="MISC_ATTRIBUTES"):
        parse_policy(text)
