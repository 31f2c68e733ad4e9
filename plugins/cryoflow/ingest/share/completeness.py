"""Whether a movie or metadata file on the share is whole, from what the file says about itself.

Why: settling (size and mtime unchanged for a while) only says a file is *quiet*. A detector
that pauses mid-movie for longer than the settle time leaves a half file that looks finished, and
copying it loses the movie. The formats a microscope writes describe their own extent, so we ask
the file:

- MRC (``.mrc``, ``.mrcs``): the header's nx, ny, nz, mode and extended-header size must account
  for the file size exactly (a gain reference ``.mrc`` is checked the same way);
- TIFF (``.tif``, ``.tiff``) and EER (``.eer``, a TIFF container): every IFD of the chain, every
  tag value and every strip or tile must lie inside the file (classic TIFF and BigTIFF, both byte
  orders); an EER whose metadata (tag 65001) names ``numberOfFrames`` must have that many pages,
  so a Falcon writer stopped between two pages is not taken for a whole movie;
- XML (``.xml``, EPU's per-movie metadata): it must be well-formed;
- any other suffix: :attr:`Verdict.UNKNOWN`, and settling alone decides.

Only headers and IFDs are read, never pixel data, so a 40-page 4k x 4k movie costs a few small
reads. Problems with the content are :attr:`Verdict.INCOMPLETE` with a reason that names the
numbers; an ``OSError`` (file vanished, permission) propagates, because that is the caller's to
handle. The file size is taken once, when the file is opened, and every extent is checked against
it: a file still growing during the check is judged as it was at that moment.

Not detected: a writer that preallocates the whole file and fills it in later (the extents are
then all inside the file), and TIFFs that keep frames outside the IFD chain (ImageJ's single-IFD
hyperstacks beyond 4 GiB, SubIFDs).
"""

from __future__ import annotations

import enum
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from xml.parsers import expat

import numpy as np

__all__ = ["CHECKED_SUFFIXES", "Completeness", "Verdict", "check_complete", "check_stream"]


class Verdict(enum.StrEnum):
    """What a file says about its own completeness."""

    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    UNKNOWN = "unknown"  # no check for this format: settling alone decides


@dataclass(frozen=True)
class Completeness:
    """A verdict, why (for INCOMPLETE, the numbers that disagree), and the frame count if known."""

    verdict: Verdict
    reason: str = ""
    frames: int | None = None  # TIFF pages / MRC nz
    # The file itself proves nothing more will be written: well-formed XML (its root is
    # closed), an EER with every frame its metadata promises. A movie's page or frame count
    # proves it only against an expected count, which the caller compares.
    final: bool = False

    @property
    def complete(self) -> bool:
        """True unless the file shows it is unfinished (UNKNOWN leaves it to settling)."""
        return self.verdict is not Verdict.INCOMPLETE


class _Incomplete(Exception):
    """Raised inside the checkers; :func:`check_complete` turns it into an INCOMPLETE verdict."""

    def __init__(self, reason: str, frames: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.frames = frames


def _read(fh: BinaryIO, offset: int, n: int, size: int, what: str) -> bytes:
    """``n`` bytes at ``offset``, or :class:`_Incomplete` if they are not all inside the file."""
    if offset < 0 or n < 0 or offset + n > size:
        raise _Incomplete(f"{what} needs bytes {offset}..{offset + n} but the file has {size}")
    fh.seek(offset)
    data = fh.read(n)
    if len(data) != n:  # the file shrank since it was opened
        raise _Incomplete(f"{what}: read {len(data)} of {n} bytes at byte {offset}")
    return data


# --- MRC -----------------------------------------------------------------------------------------

MRC_HEADER_BYTES = 1024
# MRC2014 modes (plus IMOD's 16, RGB uint8) -> bytes per voxel; 101 (4-bit) is handled apart.
_MRC_BYTES_PER_VOXEL = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2, 16: 3}
_MRC_MODE_4BIT = 101


def _mrc_fields(header: bytes, byteorder: str) -> tuple[int, int, int, int, int]:
    nx, ny, nz, mode = struct.unpack_from(byteorder + "4i", header, 0)
    (nsymbt,) = struct.unpack_from(byteorder + "i", header, 92)
    return nx, ny, nz, mode, nsymbt


def _mrc_plausible(nx: int, ny: int, nz: int, mode: int, nsymbt: int) -> bool:
    known = mode in _MRC_BYTES_PER_VOXEL or mode == _MRC_MODE_4BIT
    return known and nx > 0 and ny > 0 and nz > 0 and nsymbt >= 0


def _check_mrc(fh: BinaryIO, size: int, expected_frames: int | None) -> Completeness:
    """Header dimensions, mode and extended header must add up to the file size exactly.

    Byte order comes from the machine stamp (0x44 little, 0x11 big endian); writers that leave
    the stamp wrong or empty are common, so the other order is tried when the first gives a
    header that makes no sense.
    """
    if size < MRC_HEADER_BYTES:
        raise _Incomplete(f"{size} bytes is shorter than the {MRC_HEADER_BYTES}-byte MRC header")
    header = _read(fh, 0, MRC_HEADER_BYTES, size, "MRC header")
    orders = (">", "<") if header[212] == 0x11 else ("<", ">")
    for byteorder in orders:
        fields = _mrc_fields(header, byteorder)
        if _mrc_plausible(*fields):
            break
    else:
        nx, ny, nz, mode, nsymbt = _mrc_fields(header, orders[0])
        raise _Incomplete(
            f"MRC header does not parse: nx={nx} ny={ny} nz={nz} mode={mode} nsymbt={nsymbt}"
        )
    nx, ny, nz, mode, nsymbt = fields
    if mode == _MRC_MODE_4BIT:
        data_bytes = (nx + 1) // 2 * ny * nz
    else:
        data_bytes = nx * ny * nz * _MRC_BYTES_PER_VOXEL[mode]
    held = size - MRC_HEADER_BYTES - nsymbt
    if held < 0:
        raise _Incomplete(
            f"MRC extended header of {nsymbt} bytes runs past the end of the file ({size} bytes)",
            nz,
        )
    if held != data_bytes:
        raise _Incomplete(
            f"MRC header promises {nz} frames ({data_bytes} bytes of data) "
            f"but the file holds {held}",
            nz,
        )
    if expected_frames is not None and nz < expected_frames:
        raise _Incomplete(f"MRC has {nz} frames, expected {expected_frames}", nz)
    return Completeness(Verdict.COMPLETE, f"{nz} frames of {nx}x{ny}, mode {mode}", nz)


# --- TIFF / EER ----------------------------------------------------------------------------------

# TIFF field type -> bytes per value (TIFF 6.0 and BigTIFF); tags of other types are skipped.
_TIFF_TYPE_BYTES = {
    1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
    16: 8, 17: 8, 18: 8,
}  # fmt: skip
_TIFF_UINT_TYPES = {3: "u2", 4: "u4", 13: "u4", 16: "u8", 18: "u8"}
_STRIP_OFFSETS, _STRIP_BYTE_COUNTS, _TILE_OFFSETS, _TILE_BYTE_COUNTS = 273, 279, 324, 325
_DATA_TAGS = {_STRIP_OFFSETS, _STRIP_BYTE_COUNTS, _TILE_OFFSETS, _TILE_BYTE_COUNTS}
# Limits past which a count is corruption, not data (Falcon EER movies have a few thousand pages).
MAX_TIFF_PAGES = 1 << 20
MAX_TIFF_TAGS = 1 << 16
MAX_TIFF_CHUNKS = 1 << 22  # strips or tiles of one page
# EER: the acquisition metadata (XML) in the first page's tag 65001; when it names the number of
# raw frames, a file cut between two pages (every IFD whole, the chain just ends) is not whole.
EER_METADATA_TAG = 65001
MAX_EER_METADATA_BYTES = 1 << 20
_EER_FRAMES = re.compile(rb'name\s*=\s*"numberOfFrames"[^>]*>\s*(\d+)\s*<')


@dataclass(frozen=True)
class _TiffLayout:
    """Classic TIFF or BigTIFF field widths, in one byte order."""

    byteorder: str
    header_bytes: int
    count_fmt: str  # entries in an IFD
    entry: struct.Struct  # tag, type, count, value-or-offset
    offset_fmt: str

    @property
    def count_bytes(self) -> int:
        return struct.calcsize(self.count_fmt)

    @property
    def offset_bytes(self) -> int:
        return struct.calcsize(self.offset_fmt)


def _tiff_layout(fh: BinaryIO, size: int) -> tuple[_TiffLayout, int]:
    """The layout from the header, and the offset of the first IFD."""
    if size < 8:
        raise _Incomplete(f"{size} bytes is shorter than a TIFF header")
    head = _read(fh, 0, 8, size, "TIFF header")
    byteorder = {b"II": "<", b"MM": ">"}.get(head[:2])
    if byteorder is None:
        raise _Incomplete(f"not a TIFF header: starts with {head[:4]!r}")
    (magic,) = struct.unpack_from(byteorder + "H", head, 2)
    if magic == 42:
        layout = _TiffLayout(
            byteorder, 8, byteorder + "H", struct.Struct(byteorder + "HHI4s"), byteorder + "I"
        )
        (first,) = struct.unpack_from(byteorder + "I", head, 4)
        return layout, first
    if magic == 43:
        offset_size, zero = struct.unpack_from(byteorder + "HH", head, 4)
        if offset_size != 8 or zero != 0:
            raise _Incomplete(f"BigTIFF header declares {offset_size}-byte offsets (must be 8)")
        layout = _TiffLayout(
            byteorder, 16, byteorder + "Q", struct.Struct(byteorder + "HHQ8s"), byteorder + "Q"
        )
        (first,) = struct.unpack(byteorder + "Q", _read(fh, 8, 8, size, "BigTIFF header"))
        return layout, first
    raise _Incomplete(f"not a TIFF header: magic number {magic}")


def _tiff_uints(
    fh: BinaryIO, size: int, layout: _TiffLayout, field: tuple[int, int, bytes], what: str
) -> np.ndarray:
    """The unsigned integer values of one tag (inline or out of line) as uint64."""
    ftype, count, raw = field
    dtype = _TIFF_UINT_TYPES.get(ftype)
    if dtype is None:
        raise _Incomplete(f"{what} has TIFF type {ftype}, not an unsigned integer")
    if count > MAX_TIFF_CHUNKS:
        raise _Incomplete(f"{what} has an absurd count of {count}")
    nbytes = count * _TIFF_TYPE_BYTES[ftype]
    if nbytes <= layout.offset_bytes:
        data = raw[:nbytes]
    else:
        (offset,) = struct.unpack(layout.offset_fmt, raw)
        data = _read(fh, offset, nbytes, size, what)
    return np.frombuffer(data, dtype=layout.byteorder + dtype).astype(np.uint64)


def _tiff_data_end(
    fh: BinaryIO,
    size: int,
    layout: _TiffLayout,
    fields: dict[int, tuple[int, int, bytes]],
    page: int,
) -> int:
    """The byte one past the last strip or tile of a page (0 if the page has none)."""
    end = 0
    for off_tag, count_tag, kind in (
        (_STRIP_OFFSETS, _STRIP_BYTE_COUNTS, "strip"),
        (_TILE_OFFSETS, _TILE_BYTE_COUNTS, "tile"),
    ):
        if off_tag not in fields and count_tag not in fields:
            continue
        if off_tag not in fields or count_tag not in fields:
            raise _Incomplete(
                f"TIFF page {page} has {kind} offsets or byte counts without the other"
            )
        offsets = _tiff_uints(fh, size, layout, fields[off_tag], f"TIFF page {page} {kind} offsets")
        counts = _tiff_uints(
            fh, size, layout, fields[count_tag], f"TIFF page {page} {kind} byte counts"
        )
        if offsets.shape != counts.shape:
            raise _Incomplete(
                f"TIFF page {page} has {offsets.size} {kind} offsets but {counts.size} byte counts"
            )
        used = counts > 0  # empty (sparse) chunks have offset 0 and no data
        if not used.any():
            continue
        # Clip before adding so absurd values cannot wrap around 2**64.
        ends = np.minimum(offsets[used], size + 1) + np.minimum(counts[used], size + 1)
        end = max(end, int(ends.max()))
    return end


def _check_eer(fh: BinaryIO, size: int, expected_frames: int | None) -> Completeness:
    """A TIFF walk, plus: the pages the EER metadata promises (``numberOfFrames``) are there.
    ``expected_frames`` counts raw frames (pages) here, not the session's fractions."""
    return _check_tiff(fh, size, expected_frames, promised_tag=EER_METADATA_TAG)


def _promised_frames(
    fh: BinaryIO, size: int, layout: _TiffLayout, raw: bytes, count: int
) -> int | None:
    """``numberOfFrames`` from an EER metadata tag's XML, None when it does not say."""
    if count > MAX_EER_METADATA_BYTES:
        return None
    if count <= layout.offset_bytes:
        data = raw[:count]
    else:
        (offset,) = struct.unpack(layout.offset_fmt, raw)
        data = _read(fh, offset, count, size, "EER metadata")
    found = _EER_FRAMES.search(data)
    return int(found.group(1)) if found else None


def _check_tiff(
    fh: BinaryIO, size: int, expected_frames: int | None, *, promised_tag: int | None = None
) -> Completeness:
    """Walk the IFD chain; every IFD, tag value and strip/tile must end inside the file."""
    layout, offset = _tiff_layout(fh, size)
    if offset == 0:
        raise _Incomplete("TIFF header points to no IFD (no page written yet)", 0)
    seen: set[int] = set()
    pages = 0
    promised: int | None = None
    entry_bytes = layout.entry.size
    while offset:
        page = pages + 1
        if offset in seen:
            raise _Incomplete(
                f"TIFF IFD chain loops back to byte {offset} after {pages} pages", pages
            )
        if pages >= MAX_TIFF_PAGES:
            raise _Incomplete(f"TIFF IFD chain is longer than {MAX_TIFF_PAGES} pages", pages)
        if offset >= size:
            raise _Incomplete(
                f"TIFF page {page} IFD is at byte {offset}, beyond the end of the file ({size})",
                pages,
            )
        if offset < layout.header_bytes:
            raise _Incomplete(f"TIFF page {page} IFD points into the header (byte {offset})", pages)
        seen.add(offset)
        raw_count = _read(fh, offset, layout.count_bytes, size, f"TIFF page {page} IFD")
        (n_tags,) = struct.unpack(layout.count_fmt, raw_count)
        if n_tags == 0 or n_tags > MAX_TIFF_TAGS:
            raise _Incomplete(f"TIFF page {page} IFD at byte {offset} has {n_tags} tags", pages)
        block = _read(
            fh,
            offset + layout.count_bytes,
            n_tags * entry_bytes + layout.offset_bytes,
            size,
            f"TIFF page {page} IFD at byte {offset} ({n_tags} tags)",
        )
        fields: dict[int, tuple[int, int, bytes]] = {}
        for tag, ftype, count, raw in layout.entry.iter_unpack(block[: n_tags * entry_bytes]):
            type_bytes = _TIFF_TYPE_BYTES.get(ftype)
            if type_bytes is None:
                continue  # unknown type: TIFF readers ignore such tags
            nbytes = count * type_bytes
            if nbytes > layout.offset_bytes:
                (value_offset,) = struct.unpack(layout.offset_fmt, raw)
                if value_offset + nbytes > size:
                    raise _Incomplete(
                        f"TIFF page {page} tag {tag} values end at byte "
                        f"{value_offset + nbytes} of {size}",
                        pages,
                    )
            if tag in _DATA_TAGS:
                fields[tag] = (ftype, count, raw)
            elif tag == promised_tag and page == 1 and type_bytes == 1:
                promised = _promised_frames(fh, size, layout, raw, count)
        data_end = _tiff_data_end(fh, size, layout, fields, page)
        if data_end > size:
            raise _Incomplete(f"TIFF page {page} data ends at byte {data_end} of {size}", pages)
        pages = page
        (offset,) = struct.unpack(layout.offset_fmt, block[-layout.offset_bytes :])
    if expected_frames is not None and pages < expected_frames:
        raise _Incomplete(f"TIFF has {pages} pages, expected {expected_frames}", pages)
    if promised is not None and pages < promised:
        raise _Incomplete(f"EER has {pages} pages, its metadata says {promised} frames", pages)
    return Completeness(Verdict.COMPLETE, f"{pages} pages", pages, final=promised is not None)


# --- XML -----------------------------------------------------------------------------------------


def _check_xml(fh: BinaryIO, size: int, expected_frames: int | None) -> Completeness:
    """Well-formed or not; expat fetches no external entities and limits entity expansion."""
    parser = expat.ParserCreate()
    try:
        parser.ParseFile(fh)
    except expat.ExpatError as exc:
        raise _Incomplete(f"XML is not well-formed ({size} bytes): {exc}") from None
    return Completeness(Verdict.COMPLETE, "well-formed XML", final=True)


# --- front ---------------------------------------------------------------------------------------

_Checker = Callable[[BinaryIO, int, int | None], Completeness]
_CHECKERS: dict[str, tuple[str, _Checker]] = {
    ".mrc": ("MRC", _check_mrc),
    ".mrcs": ("MRC", _check_mrc),
    ".tif": ("TIFF", _check_tiff),
    ".tiff": ("TIFF", _check_tiff),
    ".eer": ("EER", _check_eer),
    ".xml": ("XML", _check_xml),
}
CHECKED_SUFFIXES = frozenset(_CHECKERS)  # lower case; others are UNKNOWN


def _check_expected(expected_frames: int | None) -> None:
    if expected_frames is not None and expected_frames < 1:
        raise ValueError(f"expected_frames must be at least 1, not {expected_frames}")


def check_complete(path: Path, *, expected_frames: int | None = None) -> Completeness:
    """Whether the file at ``path`` says it is whole (see the module docstring per format).

    ``expected_frames`` (from the acquisition metadata, when known) also makes a movie with fewer
    frames or pages INCOMPLETE; it is ignored for XML. The suffix picks the check, in any case.
    Raises ``OSError`` when the file cannot be opened or read, ``ValueError`` for an
    ``expected_frames`` below 1; a problem with the content is never an exception.
    """
    _check_expected(expected_frames)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _CHECKERS:
        return Completeness(Verdict.UNKNOWN, f"no completeness check for {suffix or 'no suffix'}")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        return check_stream(fh, path.name, size, expected_frames=expected_frames)


def check_stream(
    fh: BinaryIO, name: str, size: int, *, expected_frames: int | None = None
) -> Completeness:
    """:func:`check_complete` on a stream already open (an SMB file: no local path), whose
    ``size`` was taken when it was opened; ``name``'s suffix picks the check. ``fh.read(n)``
    must return ``n`` bytes unless the file ends first."""
    _check_expected(expected_frames)
    suffix = Path(name).suffix.lower()
    if suffix not in _CHECKERS:
        return Completeness(Verdict.UNKNOWN, f"no completeness check for {suffix or 'no suffix'}")
    kind, checker = _CHECKERS[suffix]
    try:
        return checker(fh, size, expected_frames)
    except _Incomplete as exc:
        return Completeness(Verdict.INCOMPLETE, exc.reason, exc.frames)
    except (struct.error, ValueError, OverflowError) as exc:  # a gap in the checks above
        return Completeness(Verdict.INCOMPLETE, f"{kind} does not parse: {exc}")
