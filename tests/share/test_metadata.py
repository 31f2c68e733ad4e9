"""Reading EPU XML and SerialEM mdoc files as the programs write them (samples in tests/data)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cryoflow.ingest.share.metadata import (
    MetadataError,
    read_epu_xml,
    read_mdoc,
    read_mdoc_sections,
    read_movie_metadata,
)

DATA = Path(__file__).resolve().parents[1] / "data"
K3_XML = (
    DATA / "epu/Images-Disc1/GridSquare_12458340/Data"
    "/FoilHole_14698958_Data_14692990_14692992_20240314_092653.xml"
)
FALCON_XML = (
    DATA / "epu/Images-Disc1/GridSquare_31550702/Data"
    "/FoilHole_31603711_Data_31571330_54_20240611_141201.xml"
)
FRAME_MDOC = DATA / "serialem/apoF_g2_00007_Mar14_10.02.31.tif.mdoc"
UNCALIBRATED_MDOC = DATA / "serialem/lyso_00005.tif.mdoc"
STACK_MDOC = DATA / "serialem/apoF_g2.mrc.mdoc"


def _variant(tmp_path: Path, source: Path, old: str, new: str, name: str | None = None) -> Path:
    text = source.read_bytes().decode()
    assert old in text, f"sample no longer contains {old!r}"
    out = tmp_path / (name or source.name)
    out.write_bytes(text.replace(old, new, 1).encode())
    return out


# --------------------------------------------------------------------------- EPU


def test_k3_xml_gives_si_values_converted_to_cryoem_units() -> None:
    md = read_epu_xml(K3_XML)
    assert md.pixel_size_A == pytest.approx(0.8254001230)  # 8.254e-11 m
    assert md.voltage_kV == 300.0
    assert md.total_dose_e_per_A2 == pytest.approx(50.2134884)  # 5.02e21 e/m^2
    assert md.n_frames == 50
    assert md.dose_per_frame_e_per_A2 == pytest.approx(50.2134884 / 50)
    assert md.target_defocus_A == pytest.approx(16000.0)  # AppliedDefocus -1.6e-6 m
    assert md.magnification == 105000
    assert md.exposure_time_s == pytest.approx(2.2)
    assert md.timestamp == datetime(2024, 3, 14, 9, 26, 55, 82341, timezone(timedelta(hours=1)))
    assert md.detector == "BioQuantum K3"
    assert md.binning == 1.0
    assert md.super_resolution_factor == 1
    assert md.gain_reference is None
    assert md.source == str(K3_XML)


def test_falcon_eer_xml_states_no_fraction_count_but_names_its_gain() -> None:
    md = read_epu_xml(FALCON_XML)
    assert md.pixel_size_A == pytest.approx(0.73)
    assert md.total_dose_e_per_A2 == pytest.approx(40.117025518)
    assert md.n_frames is None  # EER: depends on the readout, not stated
    assert md.dose_per_frame_e_per_A2 is None
    assert md.detector == "Falcon 4i"
    assert md.gain_reference == "20240605_081955_EER_GainReference.gain"  # from a Windows path
    assert md.target_defocus_A == pytest.approx(12000.0)
    assert md.magnification == 165000


def test_missing_optional_keys_are_none(tmp_path: Path) -> None:
    text = K3_XML.read_text()
    start = text.index("<a:KeyValueOfstringanyType>\n      <a:Key>Dose</a:Key>")
    end = text.index("</a:KeyValueOfstringanyType>", start) + len("</a:KeyValueOfstringanyType>")
    text = text[:start] + text[end:]
    start = text.index("<TemMagnification>")
    end = text.index("</TemMagnification>") + len("</TemMagnification>")
    path = tmp_path / K3_XML.name
    path.write_text(text[:start] + text[end:])
    md = read_epu_xml(path)
    assert md.total_dose_e_per_A2 is None
    assert md.dose_per_frame_e_per_A2 is None
    assert md.magnification is None
    assert md.n_frames == 50  # the rest is still read


def test_truncated_xml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / K3_XML.name
    path.write_bytes(K3_XML.read_bytes()[:3000])  # as if read while being written
    with pytest.raises(MetadataError, match=f"{path.name}.*not well-formed XML"):
        read_epu_xml(path)


def test_other_xml_documents_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "EpuSession.xml"
    path.write_text('<EpuSessionXml xmlns="http://schemas.datacontract.org/2004/07/x"/>')
    with pytest.raises(MetadataError, match="EpuSession.xml.*MicroscopeImage"):
        read_epu_xml(path)


def test_unparseable_number_names_file_and_key(tmp_path: Path) -> None:
    bad = _variant(tmp_path, K3_XML, "<AccelerationVoltage>300000", "<AccelerationVoltage>3OO kV")
    with pytest.raises(MetadataError, match=r"FoilHole_14698958.*AccelerationVoltage.*'3OO kV'"):
        read_epu_xml(bad)


def test_impossible_value_names_the_field(tmp_path: Path) -> None:
    bad = _variant(tmp_path, K3_XML, "8.2540012304561E-11", "-8.2540012304561E-11")
    with pytest.raises(MetadataError, match=r"FoilHole_14698958.*pixel_size_A"):
        read_epu_xml(bad)


def test_missing_file_is_a_metadata_error(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="no such file"):
        read_epu_xml(tmp_path / "absent.xml")


# --------------------------------------------------------------------------- SerialEM


def test_frame_mdoc_values() -> None:
    md = read_mdoc(FRAME_MDOC)
    assert md.pixel_size_A == pytest.approx(0.834)
    assert md.voltage_kV == 300.0  # from the global header
    assert md.total_dose_e_per_A2 == pytest.approx(49.6124)
    assert md.dose_per_frame_e_per_A2 == pytest.approx(1.24031)
    assert md.n_frames == 40
    assert md.target_defocus_A == pytest.approx(14000.0)  # TargetDefocus -1.4 µm
    assert md.magnification == 105000
    assert md.exposure_time_s == pytest.approx(2.4)
    assert md.timestamp == datetime(2024, 3, 14, 10, 2, 31)
    assert md.movie_file == "apoF_g2_00007_Mar14_10.02.31.tif"
    assert md.gain_reference == "CountRef_apoF_g2_00001_Mar14_08.55.02.dm4"
    assert md.detector is None  # an mdoc does not name the camera


def test_uncalibrated_dose_zero_is_not_reported_as_a_dose() -> None:
    md = read_mdoc(UNCALIBRATED_MDOC)
    assert md.total_dose_e_per_A2 is None
    assert md.dose_per_frame_e_per_A2 is None
    assert md.n_frames == 40
    assert md.timestamp == datetime(2021, 10, 17, 11, 40, 53)  # two-digit year
    assert md.target_defocus_A == pytest.approx(26000.0)


def test_stack_mdoc_sections_inherit_global_keys() -> None:
    sections = read_mdoc_sections(STACK_MDOC)
    assert [s.movie_file for s in sections] == [
        "apoF_g2_00001_Mar14_08.55.02.tif",
        "apoF_g2_00002_Mar14_08.55.19.tif",
        "apoF_g2_00003_Mar14_08.55.37.tif",
    ]
    assert all(s.voltage_kV == 300.0 for s in sections)
    assert all(s.pixel_size_A == pytest.approx(0.834) for s in sections)  # 2nd/3rd: global
    assert [s.target_defocus_A for s in sections] == pytest.approx([10000.0, 12000.0, 14000.0])


def test_unequal_frame_doses_give_no_single_per_frame_dose() -> None:
    last = read_mdoc_sections(STACK_MDOC)[2]  # FrameDosesAndNumber = 0.8 20 1.7 20
    assert last.n_frames == 40
    assert last.total_dose_e_per_A2 == pytest.approx(50.0344)
    assert last.dose_per_frame_e_per_A2 is None


def test_read_mdoc_refuses_a_stack(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match=r"apoF_g2.mrc.mdoc.*3"):
        read_mdoc(STACK_MDOC)


def test_old_style_single_zvalue_frame_mdoc(tmp_path: Path) -> None:
    path = _variant(tmp_path, FRAME_MDOC, "[FrameSet = 0]", "[ZValue = 0]")
    assert read_mdoc(path).n_frames == 40


def test_bad_number_names_file_and_key(tmp_path: Path) -> None:
    bad = _variant(tmp_path, FRAME_MDOC, "PixelSpacing = 0.834", "PixelSpacing = 0,834")
    with pytest.raises(MetadataError, match=r"apoF_g2_00007.*PixelSpacing.*'0,834'"):
        read_mdoc(bad)


def test_bad_date_names_the_key(tmp_path: Path) -> None:
    bad = _variant(tmp_path, FRAME_MDOC, "14-Mar-2024  10:02:31", "2024-03-14 10:02:31")
    with pytest.raises(MetadataError, match="DateTime"):
        read_mdoc(bad)


def test_garbage_line_names_the_line(tmp_path: Path) -> None:
    bad = _variant(tmp_path, FRAME_MDOC, "SpotSize = 7", "SpotSize 7")
    with pytest.raises(MetadataError, match=r"line \d+: expected 'key = value'"):
        read_mdoc(bad)


def test_odd_frame_dose_list_is_refused(tmp_path: Path) -> None:
    bad = _variant(
        tmp_path, FRAME_MDOC, "FrameDosesAndNumber = 1.24031 40", "FrameDosesAndNumber = 1.2 4 0"
    )
    with pytest.raises(MetadataError, match="FrameDosesAndNumber"):
        read_mdoc(bad)


def test_windows_ansi_bytes_are_read(tmp_path: Path) -> None:
    raw = FRAME_MDOC.read_bytes().replace(b"X:\\frames\\apoF\\", b"X:\\frames\\\xb5-apoF\\")
    path = tmp_path / FRAME_MDOC.name
    path.write_bytes(raw)  # 0xB5 is "µ" in cp1252, invalid as UTF-8
    assert read_mdoc(path).movie_file == "apoF_g2_00007_Mar14_10.02.31.tif"


def test_read_movie_metadata_dispatches_on_extension(tmp_path: Path) -> None:
    assert read_movie_metadata(K3_XML).n_frames == 50
    assert read_movie_metadata(FRAME_MDOC).n_frames == 40
    with pytest.raises(MetadataError, match=r"\.txt"):
        read_movie_metadata(tmp_path / "notes.txt")
