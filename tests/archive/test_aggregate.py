"""One tar per session of its small files: every member round-trips with its checksum, any
name survives, a corrupted member is found, and nothing is ever lost or half-written."""

from __future__ import annotations

import json
import os
import stat
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
import xxhash

from cryoflow.archive.aggregate import (
    EMBEDDED_MANIFEST,
    AggregateError,
    aggregate_small_files,
    aggregate_status,
    verify_aggregate,
)
from cryoflow.archive.tagging import read_tags, tag_verified
from cryoflow.ingest.transfer import CHECKSUM_ALGORITHM, PARTIAL_SUFFIX, file_checksum

PREFIX = "user.cryoflow."
NOT_UTF8 = [b"raw/caf\xe9/GridSquare_1.xml", b"raw/\xff\xfe.mdoc"]


def _write(root: Path, rel: str | bytes, data: bytes) -> Path:
    path = root / (os.fsdecode(rel) if isinstance(rel, bytes) else rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _session(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A session with small files worth a tar, and files that must stay out of it."""
    root = tmp_path / "2026" / "20261201_krios1_grid3"
    small = {
        "raw/EpuSession.dm": b"<EpuSessionInfo/>",
        "raw/Images-Disc1/GridSquare_1/GridSquare_20261201.xml": b"<MicroscopeImage/>" * 40,
        "raw/Images-Disc1/GridSquare_1/GridSquare_20261201.jpg": os.urandom(5000),
        "raw/Images-Disc1/GridSquare_1/FoilHoles/FoilHole_7.JPG": os.urandom(3000),
        "raw/Images-Disc1/GridSquare_1/Data/FoilHole_7_Data_8.xml": b"<x/>",
        "raw/serialem/grid3.mdoc": b"PixelSpacing = 0.83\n",
        "raw/serialem/grid3.nav": b"AdocVersion = 2.00\n",
        "raw/" + "n" * 200 + "/" + "a" * 240 + ".xml": b"long names need PAX",
        "raw/empty.xml": b"",
    }
    for rel, data in small.items():
        _write(root, rel, data)
    _write(root, "raw/Images-Disc1/GridSquare_1/Data/FoilHole_7_Data_8_fractions.tiff", b"I" * 9000)
    _write(root, "raw/atlas/Atlas_1.jpg", os.urandom(70_000))  # a match, but too large
    _write(root, "raw/Images-Disc1/.abc" + PARTIAL_SUFFIX, b"a copy in progress")
    _write(root, "processed/motioncor/FoilHole_7_preview.png", b"not raw")
    os.symlink(root / "raw/serialem/grid3.mdoc", root / "raw/serialem/link.mdoc")
    return root, small


def _aggregate(root: Path, **kwargs: object):
    return aggregate_small_files(root, max_bytes=64_000, **kwargs)  # type: ignore[arg-type]


def test_round_trip_with_checksums(tmp_path: Path) -> None:
    root, small = _session(tmp_path)

    result = _aggregate(root, file_mode=0o640)

    assert result.rebuilt and result.tagged and result.members == len(small)
    assert result.too_large == ["raw/atlas/Atlas_1.jpg"]
    tar = root / "archive" / "small-files.tar"
    manifest_path = root / "archive" / "small-files.manifest.json"
    assert result.tar == tar and result.manifest == manifest_path
    manifest = json.loads(manifest_path.read_text())
    assert [m["path"] for m in manifest["members"]] == sorted(small)
    for member in manifest["members"]:
        data = small[member["path"]]
        assert member["size"] == len(data)
        assert member["checksum"] == f"{CHECKSUM_ALGORITHM}:{xxhash.xxh3_128(data).hexdigest()}"
    assert manifest["checksum"] == f"{CHECKSUM_ALGORITHM}:{file_checksum(tar)}" == result.checksum
    assert manifest["size"] == tar.stat().st_size == result.bytes
    # extract with the standard library, elsewhere: every member byte for byte
    out = tmp_path / "restore"
    with tarfile.open(tar, encoding="utf-8", errors="surrogateescape") as archive:
        names = archive.getnames()
        archive.extractall(out, filter="data")
        long_name = next(n for n in names if len(n) > 255)
        assert archive.getmember(long_name).pax_headers["path"] == long_name  # PAX, not GNU
    assert names == [*sorted(small), EMBEDDED_MANIFEST]
    for rel, data in small.items():
        assert (out / rel).read_bytes() == data
    assert json.loads((out / EMBEDDED_MANIFEST).read_text())["members"] == manifest["members"]
    assert verify_aggregate(tar, manifest_path).ok
    # modes from the facility; tagged for migration with the tar's own verified checksum
    assert stat.S_IMODE(tar.stat().st_mode) == 0o640
    assert stat.S_IMODE(manifest_path.stat().st_mode) == 0o640
    tags = read_tags(tar, PREFIX)
    assert tags["archive_class"] == "aggregate" and tags["checksum"] == manifest["checksum"]
    assert tags["session"] == root.name
    assert read_tags(manifest_path, PREFIX) == {}  # the manifest stays on disk
    assert aggregate_status(root) == {
        "tar": "archive/small-files.tar",
        "members": len(small),
        "bytes": tar.stat().st_size,
        "checksum": manifest["checksum"],
        "created_at": manifest["created_at"],
        "tagged": True,
    }
    # originals kept, no temporary left
    for rel, data in small.items():
        assert (root / rel).read_bytes() == data
    assert not [p for p in (root / "archive").iterdir() if p.name.endswith(PARTIAL_SUFFIX)]


def test_a_corrupted_member_is_found(tmp_path: Path) -> None:
    root, _ = _session(tmp_path)
    result = _aggregate(root)
    assert result.tar is not None and result.manifest is not None
    victim = "raw/serialem/grid3.mdoc"
    with tarfile.open(result.tar) as archive:
        offset = archive.getmember(victim).offset_data
    with open(result.tar, "r+b") as fh:
        fh.seek(offset)
        first = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([first[0] ^ 0x01]))

    report = verify_aggregate(result.tar, result.manifest)

    assert not report.ok
    assert any(p.startswith(victim + ":") for p in report.problems)
    assert any("the manifest says xxh3_128:" in p for p in report.problems)  # the tar's own
    assert len(report.problems) == 2


def test_members_missing_or_unlisted_are_found(tmp_path: Path) -> None:
    root, _ = _session(tmp_path)
    result = _aggregate(root)
    assert result.tar is not None and result.manifest is not None
    manifest = json.loads(result.manifest.read_text())
    dropped = manifest["members"].pop(0)
    manifest["members"].append({**dropped, "path": "raw/never_there.xml"})

    problems = verify_aggregate(result.tar, manifest).problems

    assert f"{dropped['path']}: in the tar, not in the manifest" in problems
    assert "raw/never_there.xml: in the manifest, missing from the tar" in problems
    assert any("embedded manifest does not match" in p for p in problems)


def test_names_that_are_not_utf8_survive(tmp_path: Path) -> None:
    root = tmp_path / "session"
    for i, rel in enumerate(NOT_UTF8):
        _write(root, rel, b"payload %d" % i)

    result = _aggregate(root)

    assert result.tar is not None and result.manifest is not None
    assert verify_aggregate(result.tar, result.manifest).ok
    manifest = json.loads(result.manifest.read_text())  # valid JSON text: escaped as \xHH
    assert sorted(m["path"] for m in manifest["members"]) == [
        "raw/\\xff\\xfe.mdoc",
        "raw/caf\\xe9/GridSquare_1.xml",
    ]
    got: dict[bytes, bytes] = {}
    with tarfile.open(result.tar, encoding="utf-8", errors="surrogateescape") as archive:
        for member in archive:
            data = archive.extractfile(member)
            if data is not None:
                got[os.fsencode(member.name)] = data.read()
    assert got[NOT_UTF8[0]] == b"payload 0" and got[NOT_UTF8[1]] == b"payload 1"


def test_unchanged_is_not_rebuilt_and_a_new_file_is(tmp_path: Path) -> None:
    root, small = _session(tmp_path)
    first = _aggregate(root)
    assert first.tar is not None
    inode = first.tar.stat().st_ino

    again = _aggregate(root)

    assert not again.rebuilt and again.tagged and again.checksum == first.checksum
    assert first.tar.stat().st_ino == inode

    _write(root, "raw/Images-Disc1/GridSquare_2/GridSquare_2.xml", b"<new/>")
    third = _aggregate(root)

    assert third.rebuilt and third.members == len(small) + 1
    assert third.checksum != first.checksum
    assert read_tags(first.tar, PREFIX)["checksum"] == third.checksum


def test_a_source_that_no_longer_reads_as_verified_is_not_archived(tmp_path: Path) -> None:
    root, _ = _session(tmp_path)
    good = _aggregate(root)
    assert good.tar is not None
    before = good.tar.read_bytes()
    rotted = _write(root, "raw/Images-Disc1/GridSquare_1/GridSquare_20261201.xml", b"bit rot")
    tag_verified(
        rotted,
        prefix=PREFIX,
        session=root.name,
        checksum=f"{CHECKSUM_ALGORITHM}:{xxhash.xxh3_128(b'as verified').hexdigest()}",
        archive_class="raw",
        verified_at=datetime.now(UTC),
    )

    with pytest.raises(AggregateError, match="was verified as"):
        _aggregate(root)

    assert good.tar.read_bytes() == before  # the previous tar is untouched
    assert not [p for p in (root / "archive").iterdir() if p.name.endswith(PARTIAL_SUFFIX)]


def test_nothing_small_means_nothing_written(tmp_path: Path) -> None:
    root = tmp_path / "session"
    _write(root, "raw/m_fractions.tiff", b"I" * 100)

    result = _aggregate(root)

    assert result.tar is None and result.members == 0
    assert not (root / "archive").exists()
    assert aggregate_status(root) is None


def test_untagged_when_asked_not_to_tag(tmp_path: Path) -> None:
    root, _ = _session(tmp_path)

    result = _aggregate(root, tag_prefix=None)

    assert result.tar is not None and not result.tagged and result.tag_error is None
    assert read_tags(result.tar, PREFIX) == {}


def test_a_tar_that_is_not_the_manifests_is_rebuilt(tmp_path: Path) -> None:
    """As after a crash between renaming the tar and writing its manifest: same member list,
    but the tar on disk is not the one described and not tagged as it. It is re-read, found
    wrong and rebuilt, never tagged as if it were good."""
    root, small = _session(tmp_path)
    first = _aggregate(root)
    assert first.tar is not None and first.manifest is not None
    for name in os.listxattr(first.tar):
        os.removexattr(first.tar, name)
    with tarfile.open(first.tar) as archive:
        offset = archive.getmember("raw/serialem/grid3.nav").offset_data
    with open(first.tar, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"?")

    again = _aggregate(root)

    assert again.rebuilt and again.tagged and again.members == len(small)
    assert verify_aggregate(first.tar, first.manifest).ok


def test_a_closing_session_bundles_its_small_files_and_its_summary_says_so(site_env) -> None:
    """archive.aggregate on: the real copy, then close_session writes the tar (read back
    member by member) and the summary reports the tags read from the files and the tar."""
    from cryoflow.session import close_session
    from tests.archive.test_cleanup import CLEAN, OTHER, Session

    notes = {
        "Images-Disc1/GridSquare_1/GridSquare_20240101_120000.xml": b"<MicroscopeImage/>",
        "EpuSession.dm": b"<EpuSessionXml/>",
    }
    s = Session("aggregated")
    s.copy(CLEAN, OTHER, notes=notes)
    s.facility = s.facility.model_copy(
        update={"archive": s.facility.archive.model_copy(update={"aggregate": True})}
    )

    summary = close_session(s.facility, s.handle, "ended for the test", max_attempts=3)

    archive = summary["archive"]
    verified = [f for f in s.ledger.files(s.handle.session_id) if f.state == "verified"]
    assert archive["tags"]["tagged"] == len(verified) == 4 and archive["tags"]["untagged"] == 0
    assert all(f.archived_at is not None for f in verified)  # the ledger knows it too
    tar = archive["small_files_tar"]
    assert tar is not None and tar["members"] == 2 and tar["tagged"] is True
    root = Path(s.handle.dest_root)
    with tarfile.open(root / tar["tar"]) as bundle:
        got = {m.name: bundle.extractfile(m).read() for m in bundle.getmembers() if m.isfile()}
    # each note byte for byte under its raw/ path (and the manifest inside the tar too)
    assert {k: v for k, v in got.items() if k.startswith("raw/")} == {
        f"raw/{rel}": data for rel, data in notes.items()
    }
    assert (root / tar["tar"]).stat().st_mode & 0o007 == 0
    on_disk = json.loads((root / "logs" / "session_summary.json").read_text())
    assert on_disk["archive"]["small_files_tar"]["checksum"] == tar["checksum"]
