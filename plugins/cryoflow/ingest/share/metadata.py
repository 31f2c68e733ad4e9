"""Acquisition metadata from EPU's per-movie XML and SerialEM's .mdoc files.

Why: pre-processing needs the pixel size, voltage and dose of every movie, and a facility's
microscopes do not all run the same settings. The acquisition program writes them next to each
movie; these readers turn them into one typed record. A value the file does not state stays
``None`` (nothing is guessed from defaults); a value it states badly raises
:class:`MetadataError` naming the file and the key.

Units are fixed here so callers never convert: Angstrom, kV, seconds, e/A^2, and defocus in
Angstrom with *positive = underfocus* (CTFFIND's convention, used throughout cryoflow; EPU and
SerialEM both write underfocus as negative, in metres and micrometres respectively).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path, PureWindowsPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "AcquisitionMetadata",
    "MetadataError",
    "read_epu_xml",
    "read_mdoc",
    "read_mdoc_sections",
    "read_movie_metadata",
]


class MetadataError(ValueError):
    """A metadata file is missing, malformed, or states an impossible value; names file and key."""


class AcquisitionMetadata(BaseModel):
    """What an acquisition program states about one image or movie (None: not stated)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(description="the metadata file this was read from")
    pixel_size_A: float | None = Field(None, gt=0, description="of the image the file describes")
    voltage_kV: float | None = Field(None, gt=0)
    total_dose_e_per_A2: float | None = Field(None, gt=0)
    dose_per_frame_e_per_A2: float | None = Field(None, gt=0)
    n_frames: int | None = Field(None, ge=1, description="frames/fractions in the movie")
    target_defocus_A: float | None = Field(
        None, description="defocus the program aimed for; positive = underfocus"
    )
    magnification: int | None = Field(None, gt=0, description="nominal magnification")
    exposure_time_s: float | None = Field(None, gt=0)
    timestamp: datetime | None = None
    detector: str | None = None
    binning: float | None = Field(None, gt=0, description="SerialEM: 0.5 = super-resolution")
    super_resolution_factor: int | None = Field(None, ge=1, description="EPU: 2 = super-res")
    movie_file: str | None = Field(None, description="movie file name the metadata points to")
    gain_reference: str | None = Field(None, description="gain reference file name, if stated")


def _build(path: Path, values: dict[str, Any]) -> AcquisitionMetadata:
    try:
        return AcquisitionMetadata(source=str(path), **values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise MetadataError(
            f"{path}: {field} = {err.get('input')!r} is not valid ({err['msg']})"
        ) from None


def _number(path: Path, key: str, text: str | None, kind: type = float) -> Any:
    """``text`` as a number, None when absent/empty; a clear error when it is not a number."""
    if text is None or not text.strip():
        return None
    try:
        value = float(text.strip())
    except ValueError:
        raise MetadataError(f"{path}: {key}: {text.strip()!r} is not a number") from None
    if kind is int:
        if not value.is_integer():
            raise MetadataError(f"{path}: {key}: {text.strip()!r} is not a whole number")
        return int(value)
    return value


def _basename(windows_or_posix_path: str | None) -> str | None:
    """The file name of a path as the (Windows) acquisition PC wrote it."""
    if not windows_or_posix_path or not windows_or_posix_path.strip():
        return None
    return PureWindowsPath(windows_or_posix_path.strip()).name


# --------------------------------------------------------------------------- EPU XML

_NS = {
    "so": "http://schemas.datacontract.org/2004/07/Fei.SharedObjects",
    "a": "http://schemas.microsoft.com/2003/10/Serialization/Arrays",
    "fr": "http://schemas.datacontract.org/2004/07/Fei.Applications.Common.Omp.Interface",
    "i": "http://www.w3.org/2001/XMLSchema-instance",
}
_NIL = f"{{{_NS['i']}}}nil"


def _xml_text(root: ET.Element, xpath: str) -> str | None:
    el = root.find(xpath, _NS)
    if el is None or el.get(_NIL) == "true":
        return None
    return el.text


def _key_values(container: ET.Element | None) -> dict[str, ET.Element]:
    """A .NET ``KeyValueOfstringanyType`` list as {key: value element}."""
    out: dict[str, ET.Element] = {}
    if container is None:
        return out
    for kv in container.findall("a:KeyValueOfstringanyType", _NS):
        key = kv.find("a:Key", _NS)
        value = kv.find("a:Value", _NS)
        if key is not None and key.text and value is not None and value.get(_NIL) != "true":
            out[key.text] = value
    return out


def read_epu_xml(path: str | Path) -> AcquisitionMetadata:
    """Metadata of one EPU acquisition from its ``FoilHole_..._Data_...xml`` (``MicroscopeImage``).

    EPU states the dose on the specimen as CustomData ``Dose`` in e/m^2; the number of fractions
    as ``NumberOffractions`` (K2/K3, Falcon 4 TIFF) or as a list of ``DoseFractions`` (Falcon 3).
    For EER it states no fraction count (the frame count depends on the readout), so
    ``n_frames`` stays None. The pixel size is the one of the image this XML describes.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise MetadataError(f"{path}: no such file") from None
    except ET.ParseError as exc:
        raise MetadataError(f"{path}: not well-formed XML ({exc})") from None
    if root.tag != f"{{{_NS['so']}}}MicroscopeImage":
        raise MetadataError(
            f"{path}: root element is {root.tag!r}, expected EPU's MicroscopeImage "
            f"in namespace {_NS['so']}"
        )
    custom = _key_values(root.find("so:CustomData", _NS))
    camera = "so:microscopeData/so:acquisition/so:camera"
    cam_input = _key_values(root.find(f"{camera}/so:CameraSpecificInput", _NS))

    def custom_text(key: str) -> str | None:
        el = custom.get(key)
        return el.text if el is not None else None

    values: dict[str, Any] = {}
    pixel_m = _number(
        path,
        "SpatialScale/pixelSize/x/numericValue",
        _xml_text(root, "so:SpatialScale/so:pixelSize/so:x/so:numericValue"),
    )
    values["pixel_size_A"] = pixel_m * 1e10 if pixel_m is not None else None
    volts = _number(
        path,
        "microscopeData/gun/AccelerationVoltage",
        _xml_text(root, "so:microscopeData/so:gun/so:AccelerationVoltage"),
    )
    values["voltage_kV"] = volts / 1000.0 if volts is not None else None
    dose = _number(path, "CustomData[Dose]", custom_text("Dose"))
    values["total_dose_e_per_A2"] = dose * 1e-20 if dose else None

    n_frames = None
    fractionation = cam_input.get("FractionationSettings")
    if fractionation is not None:
        n_el = fractionation.find(".//fr:NumberOffractions", _NS)
        if n_el is not None:
            n_frames = _number(path, "NumberOffractions", n_el.text, int)
        else:
            listed = fractionation.find(".//fr:DoseFractions", _NS)
            if listed is not None and len(listed):
                n_frames = len(listed)
    values["n_frames"] = n_frames
    if values["total_dose_e_per_A2"] and n_frames:
        values["dose_per_frame_e_per_A2"] = values["total_dose_e_per_A2"] / n_frames

    defocus_m = _number(path, "CustomData[AppliedDefocus]", custom_text("AppliedDefocus"))
    values["target_defocus_A"] = -defocus_m * 1e10 if defocus_m is not None else None
    values["magnification"] = _number(
        path,
        "optics/TemMagnification/NominalMagnification",
        _xml_text(root, "so:microscopeData/so:optics/so:TemMagnification/so:NominalMagnification"),
        int,
    )
    values["exposure_time_s"] = _number(
        path, "camera/ExposureTime", _xml_text(root, f"{camera}/so:ExposureTime")
    )
    stamp = _xml_text(root, "so:microscopeData/so:acquisition/so:acquisitionDateTime")
    if stamp:
        try:
            values["timestamp"] = datetime.fromisoformat(stamp.strip())
        except ValueError:
            raise MetadataError(
                f"{path}: acquisitionDateTime: {stamp!r} is not an ISO 8601 time"
            ) from None
    detector_id = custom_text("BinaryResult.Detector")
    values["detector"] = (
        custom_text("DetectorCommercialName")
        or (custom_text(f"Detectors[{detector_id}].CommercialName") if detector_id else None)
        or _xml_text(root, f"{camera}/so:Name")
    )
    values["binning"] = _number(
        path, "camera/Binning/x", _xml_text(root, f"{camera}/so:Binning/{{*}}x")
    )
    sr = cam_input.get("SuperResolutionFactor")
    values["super_resolution_factor"] = (
        _number(path, "SuperResolutionFactor", sr.text, int) if sr is not None else None
    )
    gain_keys = [k for k in custom if k.endswith(".EerGainReference")]
    values["gain_reference"] = _basename(custom_text(gain_keys[0])) if gain_keys else None
    return _build(path, values)


# --------------------------------------------------------------------------- SerialEM mdoc

_SECTION = re.compile(r"^\[\s*(?P<key>[^=\]]+?)\s*=\s*(?P<value>.*?)\s*\]$")
_IMAGE_SECTIONS = {"ZValue", "FrameSet"}
_MONTHS = {
    m: i
    for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1
    )
}
_MDOC_TIME = re.compile(
    r"^(?P<d>\d{1,2})-(?P<mon>[A-Za-z]{3})-(?P<y>\d{2}|\d{4})\s+"
    r"(?P<H>\d{1,2}):(?P<M>\d{2}):(?P<S>\d{2})$"
)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MetadataError(f"{path}: no such file") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")  # SerialEM on Windows writes ANSI


def _parse_mdoc(path: Path) -> tuple[dict[str, str], list[tuple[str, dict[str, str]]]]:
    """(global keys, [(section kind, keys)]) of an autodoc file; title ``[T = ...]`` skipped."""
    header: dict[str, str] = {}
    sections: list[tuple[str, dict[str, str]]] = []
    current = header
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("["):
            m = _SECTION.match(line)
            if m is None:
                raise MetadataError(f"{path}: line {lineno}: malformed section header {line!r}")
            if m["key"] == "T":
                continue
            current = {}
            sections.append((m["key"], current))
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise MetadataError(f"{path}: line {lineno}: expected 'key = value', got {line!r}")
        current[key.strip()] = value.strip()
    return header, sections


def _mdoc_time(path: Path, text: str | None) -> datetime | None:
    if not text:
        return None
    m = _MDOC_TIME.match(" ".join(text.split()))
    month = _MONTHS.get(m["mon"].lower()) if m else None
    if m is None or month is None:
        raise MetadataError(f"{path}: DateTime: {text!r} is not SerialEM's dd-Mon-yy hh:mm:ss")
    year = int(m["y"]) + (2000 if len(m["y"]) == 2 else 0)
    try:
        return datetime(year, month, int(m["d"]), int(m["H"]), int(m["M"]), int(m["S"]))
    except ValueError as exc:
        raise MetadataError(f"{path}: DateTime: {text!r} ({exc})") from None


def _frame_doses(path: Path, text: str | None) -> tuple[float | None, int | None]:
    """(dose per frame if uniform and measured, total frames) from ``FrameDosesAndNumber``."""
    if not text:
        return None, None
    parts = text.split()
    if len(parts) % 2:
        raise MetadataError(f"{path}: FrameDosesAndNumber: {text!r} is not pairs of 'dose count'")
    doses = [_number(path, "FrameDosesAndNumber", d) for d in parts[0::2]]
    counts = [_number(path, "FrameDosesAndNumber", c, int) for c in parts[1::2]]
    uniform = doses[0] if len(set(doses)) == 1 and doses[0] > 0 else None
    return uniform, sum(counts)


def _mdoc_section(path: Path, keys: dict[str, str]) -> AcquisitionMetadata:
    get = keys.get
    values: dict[str, Any] = {
        "pixel_size_A": _number(path, "PixelSpacing", get("PixelSpacing")),
        "voltage_kV": _number(path, "Voltage", get("Voltage")),
        "magnification": _number(path, "Magnification", get("Magnification"), int),
        "exposure_time_s": _number(path, "ExposureTime", get("ExposureTime")),
        "binning": _number(path, "Binning", get("Binning")),
        "timestamp": _mdoc_time(path, get("DateTime")),
        "movie_file": _basename(get("SubFramePath")),
        "gain_reference": _basename(get("GainReference")),
    }
    # SerialEM writes a dose of 0 when the camera's dose is not calibrated: not a measurement.
    values["total_dose_e_per_A2"] = _number(path, "ExposureDose", get("ExposureDose")) or None
    per_frame, listed_frames = _frame_doses(path, get("FrameDosesAndNumber"))
    n_frames = _number(path, "NumSubFrames", get("NumSubFrames"), int)
    values["n_frames"] = n_frames if n_frames is not None else listed_frames
    # Derive a per-frame dose only when the file does not list frame doses itself (listed
    # unequal doses mean there is no single per-frame value).
    if listed_frames is None and values["total_dose_e_per_A2"] and values["n_frames"]:
        per_frame = values["total_dose_e_per_A2"] / values["n_frames"]
    values["dose_per_frame_e_per_A2"] = per_frame
    target_um = _number(path, "TargetDefocus", get("TargetDefocus"))
    values["target_defocus_A"] = -target_um * 1e4 if target_um is not None else None
    return _build(path, values)


def read_mdoc_sections(path: str | Path) -> list[AcquisitionMetadata]:
    """One record per ``[ZValue]``/``[FrameSet]`` section (a summed stack, a tilt series).

    Keys before the first section (``Voltage``, ``PixelSpacing``...) apply to every section
    unless the section states its own.
    """
    path = Path(path)
    header, sections = _parse_mdoc(path)
    return [
        _mdoc_section(path, {**header, **keys})
        for kind, keys in sections
        if kind in _IMAGE_SECTIONS
    ]


def read_mdoc(path: str | Path) -> AcquisitionMetadata:
    """Metadata of one movie from the ``<movie>.mdoc`` SerialEM writes beside its frames.

    Such a file has exactly one image section (``[FrameSet = 0]``; older versions wrote
    ``[ZValue = 0]``); for a stack's mdoc use :func:`read_mdoc_sections`.
    """
    records = read_mdoc_sections(path)
    if len(records) != 1:
        raise MetadataError(
            f"{path}: a movie's mdoc has one [FrameSet] or [ZValue] section, this one has "
            f"{len(records)} (use read_mdoc_sections for stacks and tilt series)"
        )
    return records[0]


def read_movie_metadata(path: str | Path) -> AcquisitionMetadata:
    """Read a movie's metadata file, EPU XML or SerialEM mdoc, chosen by its extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".xml":
        return read_epu_xml(path)
    if suffix == ".mdoc":
        return read_mdoc(path)
    raise MetadataError(f"{path}: unknown metadata file type {suffix!r} (expected .xml or .mdoc)")
