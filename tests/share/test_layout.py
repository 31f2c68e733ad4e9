"""File kinds on EPU and SerialEM shares, from the names those programs really write."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryoflow.ingest.share.layout import (
    FileKind,
    Layout,
    MovieFormat,
    classify,
    metadata_for_movie,
    movie_format,
    movie_key,
    movie_stem,
)

DATA = Path(__file__).resolve().parents[1] / "data"
GS = "Images-Disc1/GridSquare_25590846"
ACQ = "FoilHole_25598436_Data_25597084_25597086_20210625_171939"

EPU_CASES = [
    (f"{GS}/Data/{ACQ}_fractions.tiff", FileKind.MOVIE),  # K3
    (f"{GS}/Data/{ACQ}_Fractions.mrc", FileKind.MOVIE),  # Falcon 3
    (f"{GS}/Data/{ACQ}_Fractions.tiff", FileKind.MOVIE),  # Falcon 4 TIFF
    (f"{GS}/Data/{ACQ}_EER.eer", FileKind.MOVIE),  # Falcon 4 EER
    (f"{GS}/Data/{ACQ}.xml", FileKind.MOVIE_METADATA),
    (f"{GS}/Data/{ACQ}.jpg", FileKind.OTHER_METADATA),
    (f"{GS}/Data/{ACQ}.mrc", FileKind.OTHER),  # EPU's integrated image, not a movie
    (f"{GS}/GridSquare_20210625_152355.xml", FileKind.OTHER_METADATA),
    (f"{GS}/GridSquare_20210625_152355.jpg", FileKind.OTHER_METADATA),
    (f"{GS}/FoilHoles/FoilHole_25598436_20210625_171921.xml", FileKind.OTHER_METADATA),
    ("Metadata/GridSquare_25590846.dm", FileKind.OTHER_METADATA),
    ("EpuSession.dm", FileKind.OTHER_METADATA),
    ("Atlas/Atlas.dm", FileKind.OTHER_METADATA),
    ("Atlas/Atlas_1.mrc", FileKind.OTHER_METADATA),
    ("Atlas/Tile_25590001_0_1.mrc", FileKind.OTHER_METADATA),
    ("20220406_175020_EER_GainReference.gain", FileKind.GAIN_REFERENCE),
    (f"{GS}/Data/{ACQ}-gain-ref.MRC", FileKind.GAIN_REFERENCE),  # K2
    (f"{GS}/Data/{ACQ}_gain.tiff", FileKind.GAIN_REFERENCE),  # K3
    ("Thumbs.db", FileKind.OTHER),
    (f"{GS}/Data/.{ACQ}.xml.x1y2.part", FileKind.OTHER),  # someone's temp file
]

SERIALEM_CASES = [
    ("apoF_g2_00007_Mar14_10.02.31.tif", FileKind.MOVIE),
    ("apoF_g2_00007_Mar14_10.02.31.tif.mdoc", FileKind.MOVIE_METADATA),
    ("lyso_00005.tif", FileKind.MOVIE),
    ("lyso_00005.tif.mdoc", FileKind.MOVIE_METADATA),
    ("frames/lyso_00012.eer", FileKind.MOVIE),
    ("frames/lyso_00012.mrc", FileKind.MOVIE),
    ("frames/lyso_00012.mrc.mdoc", FileKind.MOVIE_METADATA),
    ("apoF_g2.mrc", FileKind.OTHER),  # the summed-image stack
    ("apoF_g2.mrc.mdoc", FileKind.OTHER_METADATA),
    ("CountRef_apoF_g2_00001_Mar14_08.55.02.dm4", FileKind.GAIN_REFERENCE),
    ("SuperRef_lyso_00001.dm4", FileKind.GAIN_REFERENCE),
    ("CountRef_lyso_00001.mrc", FileKind.GAIN_REFERENCE),
    ("20220406_175020_EER_GainReference.gain", FileKind.GAIN_REFERENCE),
    ("again_00001.tif", FileKind.MOVIE),  # "gain" inside a user's root name
    ("session.nav", FileKind.OTHER_METADATA),
    ("defects_lyso_0001.txt", FileKind.OTHER_METADATA),
    ("TS_01.mrc.mdoc", FileKind.OTHER_METADATA),
]


@pytest.mark.parametrize(("relpath", "kind"), EPU_CASES)
def test_epu_names_are_classified(relpath: str, kind: FileKind) -> None:
    assert classify(relpath, Layout.EPU) is kind


@pytest.mark.parametrize(("relpath", "kind"), SERIALEM_CASES)
def test_serialem_names_are_classified(relpath: str, kind: FileKind) -> None:
    assert classify(relpath, Layout.SERIALEM) is kind


def test_layout_accepts_its_string_value() -> None:
    assert classify(f"{GS}/Data/{ACQ}.xml", "epu") is FileKind.MOVIE_METADATA


@pytest.mark.parametrize("movie", [f"{GS}/Data/{ACQ}_fractions.tiff", f"{GS}/Data/{ACQ}_EER.eer"])
def test_epu_movie_metadata_is_the_xml_beside_it(movie: str) -> None:
    (xml,) = metadata_for_movie(movie, Layout.EPU)
    assert xml == f"{GS}/Data/{ACQ}.xml"
    assert classify(xml, Layout.EPU) is FileKind.MOVIE_METADATA
    assert movie_stem(movie, Layout.EPU) == ACQ


def test_one_acquisition_has_one_key_whatever_its_container() -> None:
    keys = {
        movie_key(f"{GS}/Data/{ACQ}{suffix}", Layout.EPU)
        for suffix in ("_fractions.tiff", "_Fractions.mrc", "_EER.eer")
    }
    assert keys == {f"{GS}/Data/{ACQ}"}


def test_serialem_keys_keep_the_folder_so_repeated_names_differ() -> None:
    a = movie_key("grid1/lyso_00001.tif", Layout.SERIALEM)
    b = movie_key("grid2/lyso_00001.tif", Layout.SERIALEM)
    assert a != b
    assert a == "grid1/lyso_00001"
    assert movie_key("lyso_00001.tif", Layout.SERIALEM) == "lyso_00001"


@pytest.mark.parametrize(
    "movie",
    [
        "odd names/[grid 2] ü $(rm -rf x) `y`; 'q' \"z\"_00001_Mar14_10.02.31.tif",
        "grid*?/a&b|c>d_00002.tif",
        "наноч 粒子/session 1_00003.mrc",
    ],
)
def test_shell_metacharacters_and_unicode_are_plain_data(movie: str) -> None:
    assert classify(movie, Layout.SERIALEM) is FileKind.MOVIE
    (mdoc,) = metadata_for_movie(movie, Layout.SERIALEM)
    assert mdoc == movie + ".mdoc"
    assert classify(mdoc, Layout.SERIALEM) is FileKind.MOVIE_METADATA
    assert movie_key(movie, Layout.SERIALEM) == movie.rsplit(".", 1)[0]


def test_epu_odd_session_folder_names_do_not_matter() -> None:
    movie = f"my [EPU] $session ü/{GS}/Data/{ACQ}_fractions.tiff"
    (xml,) = metadata_for_movie(movie, Layout.EPU)
    assert xml == f"my [EPU] $session ü/{GS}/Data/{ACQ}.xml"


def test_asking_for_a_non_movie_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="EpuSession.dm"):
        metadata_for_movie("EpuSession.dm", Layout.EPU)
    with pytest.raises(ValueError, match="apoF_g2.mrc"):
        movie_key("apoF_g2.mrc", Layout.SERIALEM)


@pytest.mark.parametrize("bad", ["", "/abs/path/x_00001.tif"])
def test_paths_must_be_relative(bad: str) -> None:
    with pytest.raises(ValueError, match="relative path"):
        classify(bad, Layout.SERIALEM)


def test_movie_format_follows_the_extension() -> None:
    assert movie_format(f"{GS}/Data/{ACQ}_fractions.tiff") is MovieFormat.TIFF
    assert movie_format("x_00001.TIF") is MovieFormat.TIFF
    assert movie_format(f"{GS}/Data/{ACQ}_Fractions.mrc") is MovieFormat.MRC
    assert movie_format(f"{GS}/Data/{ACQ}_EER.eer") is MovieFormat.EER
    with pytest.raises(ValueError, match=r"\.xml"):
        movie_format(f"{GS}/Data/{ACQ}.xml")


def test_sample_files_in_tests_data_are_recognised() -> None:
    epu = sorted(p.relative_to(DATA / "epu").as_posix() for p in (DATA / "epu").rglob("*.xml"))
    sem = sorted(p.name for p in (DATA / "serialem").glob("*.mdoc"))
    assert epu and sem
    assert {classify(p, Layout.EPU) for p in epu} == {FileKind.MOVIE_METADATA}
    kinds = {p: classify(p, Layout.SERIALEM) for p in sem}
    assert kinds == {
        "apoF_g2.mrc.mdoc": FileKind.OTHER_METADATA,
        "apoF_g2_00007_Mar14_10.02.31.tif.mdoc": FileKind.MOVIE_METADATA,
        "lyso_00005.tif.mdoc": FileKind.MOVIE_METADATA,
    }
