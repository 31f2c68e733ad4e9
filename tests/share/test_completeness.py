"""Completeness of movies and metadata as real writers leave them: whole, or stalled part-way.

Files are made with tifffile and mrcfile (the libraries the processing side reads with), then cut
or patched where a stalled or broken writer would leave them. Every test that reads a file runs on
both backends (``share_backend``): the file is written into ``root`` as the microscope PC would,
and ``check`` asks the share's source about it, a mounted folder or the same folder over SMB.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile

from cryoflow.ingest.share.completeness import CHECKED_SUFFIXES, Completeness, Verdict
from tests.share.conftest import Backend

Check = Callable[..., Completeness]


@pytest.fixture
def root(share_backend: Backend) -> Path:
    """Where the test writes its files: the folder the share's source reads."""
    return share_backend.root


@pytest.fixture
def check(share_backend: Backend) -> Check:
    """``check(path, expected_frames=None)``: the verdict on ``path`` (a local path under
    ``root``) as the share's source gives it."""

    def check(path: Path, expected_frames: int | None = None) -> Completeness:
        relpath = path.relative_to(share_backend.root).as_posix()
        return share_backend.source.check_complete(relpath, expected_frames=expected_frames)

    return check


DATA = Path(__file__).resolve().parents[1] / "data"
EPU_XML = (
    DATA / "epu/Images-Disc1/GridSquare_12458340/Data"
    "/FoilHole_14698958_Data_14692990_14692992_20240314_092653.xml"
)
RNG = np.random.default_rng(20240314)

TIFF_VARIANTS = {
    "uint8": {"dtype": np.uint8},
    "uint16": {"dtype": np.uint16},
    "bigtiff": {"dtype": np.uint16, "bigtiff": True},
    "big-endian": {"dtype": np.uint16, "byteorder": ">"},
    "bigtiff-big-endian": {"dtype": np.uint8, "bigtiff": True, "byteorder": ">"},
    "lzw": {"dtype": np.uint16, "compression": "lzw"},
    "lzw-strips": {"dtype": np.uint8, "compression": "lzw", "rowsperstrip": 8},
    "lzw-tiles": {"dtype": np.uint16, "compression": "lzw", "tile": (16, 16)},
}


def _stack(frames: int, dtype: type = np.uint16, shape: tuple[int, int] = (64, 48)) -> np.ndarray:
    return RNG.integers(0, 200, (frames, *shape)).astype(dtype)


def _write_tiff(path: Path, frames: int, variant: str = "uint16") -> Path:
    opts = dict(TIFF_VARIANTS[variant])
    tifffile.imwrite(path, _stack(frames, opts.pop("dtype")), photometric="minisblack", **opts)
    return path


def _truncate(path: Path, size: int) -> None:
    assert 0 < size < path.stat().st_size
    os.truncate(path, size)


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _pages(path: Path) -> list[tuple[int, list[int], list[int]]]:
    """(IFD offset, data offsets, byte counts) of each page, as tifffile reads them."""
    with tifffile.TiffFile(path) as tif:
        return [(p.offset, list(p.dataoffsets), list(p.databytecounts)) for p in tif.pages]


def _incomplete(result: Completeness, *words: str) -> None:
    assert result.verdict is Verdict.INCOMPLETE, result
    assert not result.complete
    for word in words:
        assert word in result.reason, result.reason


# --- TIFF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(TIFF_VARIANTS))
def test_complete_tiff_counts_its_pages(root: Path, check: Check, variant: str) -> None:
    path = _write_tiff(root / "movie_fractions.tiff", 7, variant)
    result = check(path, expected_frames=7)
    assert result == Completeness(Verdict.COMPLETE, "7 pages", 7)
    assert result.complete


def test_more_pages_than_expected_is_complete(root: Path, check: Check) -> None:
    path = _write_tiff(root / "movie.tif", 6)
    assert check(path, expected_frames=5).verdict is Verdict.COMPLETE
    assert check(path).frames == 6


def test_suffix_is_case_insensitive(root: Path, check: Check) -> None:
    path = _write_tiff(root / "movie.TIFF", 3)
    _truncate(path, path.stat().st_size - 100)
    _incomplete(check(path))


@pytest.mark.parametrize("variant", ["uint16", "bigtiff", "lzw"])
def test_stalled_at_a_page_boundary_is_short_of_the_expected_frames(
    root: Path, check: Check, variant: str
) -> None:
    """The first 3 of 5 pages form a valid TIFF; only the expected count shows it is short."""
    path = _write_tiff(root / "movie.tif", 3, variant)
    _incomplete(check(path, expected_frames=5), "3 pages, expected 5")
    assert check(path, expected_frames=5).frames == 3
    # Without the count the file is indistinguishable from a finished 3-frame movie.
    assert check(path).verdict is Verdict.COMPLETE


@pytest.mark.parametrize(
    "variant", ["uint16", "lzw", "lzw-strips", "lzw-tiles", "bigtiff-big-endian"]
)
def test_stalled_in_the_last_page_data(root: Path, check: Check, variant: str) -> None:
    path = _write_tiff(root / "movie.tif", 4, variant)
    _, offsets, counts = _pages(path)[-1]
    last = max(o + c for o, c in zip(offsets, counts, strict=True))
    _truncate(path, last - counts[-1] // 2)
    _incomplete(check(path))


@pytest.mark.parametrize("variant", ["lzw", "lzw-strips", "lzw-tiles"])
def test_data_past_eof_names_the_page_and_bytes(root: Path, check: Check, variant: str) -> None:
    """LZW pages are IFD-then-data: the last IFD survives the cut, its data does not."""
    path = _write_tiff(root / "movie.tif", 4, variant)
    ifd, offsets, counts = _pages(path)[-1]
    end = max(o + c for o, c in zip(offsets, counts, strict=True))
    assert ifd < offsets[0], "test assumes the IFD precedes its data"
    cut = end - 3
    _truncate(path, cut)
    _incomplete(check(path), f"TIFF page 4 data ends at byte {end} of {cut}")


def test_single_page_cut_in_its_data(root: Path, check: Check) -> None:
    path = root / "gain.tif"
    tifffile.imwrite(path, _stack(1, np.uint16, (128, 128))[0])
    ((ifd, offsets, counts),) = _pages(path)
    _truncate(path, offsets[0] + counts[0] // 2)
    _incomplete(check(path), "page 1 data ends at byte")


@pytest.mark.parametrize("variant", ["uint16", "lzw", "bigtiff"])
def test_stalled_in_the_middle_of_an_ifd(root: Path, check: Check, variant: str) -> None:
    path = _write_tiff(root / "movie.tif", 4, variant)
    ifd = _pages(path)[-1][0]
    _truncate(path, ifd + 10)
    _incomplete(check(path), "page 4 IFD")


def test_next_ifd_pointer_beyond_eof(root: Path, check: Check) -> None:
    path = _write_tiff(root / "movie.tif", 3)
    ifd = _pages(path)[-1][0]
    with open(path, "rb") as fh:
        fh.seek(ifd)
        (n_tags,) = struct.unpack("<H", fh.read(2))
    size = path.stat().st_size
    _patch(path, ifd + 2 + 12 * n_tags, struct.pack("<I", size + 4096))
    _incomplete(check(path), "page 4 IFD", f"beyond the end of the file ({size})")


def test_ifd_loop_is_incomplete_not_endless(root: Path, check: Check) -> None:
    path = _write_tiff(root / "movie.tif", 3)
    pages = _pages(path)
    first, last = pages[0][0], pages[-1][0]
    with open(path, "rb") as fh:
        fh.seek(last)
        (n_tags,) = struct.unpack("<H", fh.read(2))
    _patch(path, last + 2 + 12 * n_tags, struct.pack("<I", first))
    _incomplete(check(path), "loops back", f"byte {first}")


def test_absurd_tag_count_in_a_bigtiff_ifd(root: Path, check: Check) -> None:
    path = _write_tiff(root / "movie.tif", 2, "bigtiff")
    _patch(path, _pages(path)[-1][0], struct.pack("<Q", 1 << 40))
    _incomplete(check(path), f"has {1 << 40} tags")


def test_strip_offsets_array_past_eof(root: Path, check: Check) -> None:
    path = _write_tiff(root / "movie.tif", 2, "lzw-strips")
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags["StripOffsets"]
        entry, n_values = tag.offset, tag.count
    assert n_values > 1  # stored out of line, the entry holds a pointer
    _patch(path, entry + 8, struct.pack("<I", path.stat().st_size - 2))
    _incomplete(check(path), "page 1 tag 273 values end at byte")


def test_strip_data_pointing_past_eof(root: Path, check: Check) -> None:
    """An IFD that is intact but whose (single, inline) strip lies beyond the file."""
    path = root / "frame.tif"
    tifffile.imwrite(path, _stack(1, np.uint8, (16, 16))[0])
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags["StripOffsets"]
        entry, ftype = tag.offset, tag.dtype
    assert tag.count == 1
    size = path.stat().st_size
    value = struct.pack("<I", size) if ftype == 4 else struct.pack("<HH", size, 0)
    _patch(path, entry + 8, value)
    _incomplete(check(path), f"data ends at byte {size + 256} of {size}")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "shorter than a TIFF header"),
        (b"II*\x00", "shorter than a TIFF header"),
        (bytes(4096), "not a TIFF header"),  # preallocated, nothing written yet
        (b"II*\x00\x00\x00\x00\x00" + bytes(100), "no IFD"),
        (b"II+\x00\x04\x00\x00\x00" + bytes(100), "4-byte offsets (must be 8)"),
        (b"II*\x00\x00\x10\x00\x00" + bytes(100), "beyond the end of the file"),
    ],
)
def test_broken_tiff_headers(root: Path, check: Check, content: bytes, words: str) -> None:
    path = root / "movie.tif"
    path.write_bytes(content)
    _incomplete(check(path), words)


@pytest.mark.parametrize("contiguous", [False, True])
def test_real_writer_page_by_page(root: Path, check: Check, contiguous: bool) -> None:
    """What a reader on the share sees while TiffWriter is still writing, flushed per page."""
    path = root / "movie_fractions.tiff"
    frames = _stack(5, np.uint16, (96, 80))
    seen = []
    with open(path, "wb") as fh, tifffile.TiffWriter(fh) as tif:
        for i, frame in enumerate(frames):
            tif.write(frame, contiguous=contiguous)
            fh.flush()
            result = check(path, expected_frames=len(frames))
            seen.append(result.verdict)
            if i < len(frames) - 1:
                _incomplete(result, "expected 5")
    assert seen[:-1] == [Verdict.INCOMPLETE] * 4
    assert check(path, expected_frames=5) == Completeness(Verdict.COMPLETE, "5 pages", 5)
    with tifffile.TiffFile(path) as tif:  # every frame is there, whichever way it was written
        assert np.array_equal(np.stack([page.asarray() for page in tif.pages]), frames)


# --- EER -----------------------------------------------------------------------------------------


def test_eer_is_checked_as_tiff(root: Path, check: Check) -> None:
    path = root / "FoilHole_1_Data_2_3_20240611_141201_EER.eer"
    tifffile.imwrite(path, _stack(12, np.uint8), compression="lzw")
    assert check(path, expected_frames=12) == Completeness(Verdict.COMPLETE, "12 pages", 12)
    _incomplete(check(path, expected_frames=13), "12 pages, expected 13")
    _truncate(path, _pages(path)[-1][0] + 5)
    _incomplete(check(path), "page 12 IFD")


def _eer(path: Path, frames: list[np.ndarray], metadata: dict) -> Path:
    from cryoflow.processing.engines.eer import EerWriter

    with path.open("wb") as fh:
        writer = EerWriter(fh, frames[0].shape, metadata)
        for frame in frames:
            writer.write(frame)
        writer.close()  # the last IFD says "no next page": the chain ends cleanly
    return path


def test_an_eer_cut_between_pages_is_incomplete_when_its_metadata_says_so(
    root: Path, check: Check
) -> None:
    """A writer that leaves the IFD chain closed after each page (every IFD whole, "next" 0):
    a TIFF reader sees a whole, shorter movie; only the metadata's numberOfFrames tells."""
    rng = np.random.default_rng(0)
    frames = [(rng.random((64, 64)) < 0.05).astype(np.uint8) for _ in range(12)]
    whole = _eer(root / "whole_EER.eer", frames, {"numberOfFrames": 12})
    # every promised frame there: the file proves it is finished (no settle time needed)
    assert check(whole) == Completeness(Verdict.COMPLETE, "12 pages", 12, final=True)
    paused = _eer(root / "paused_EER.eer", frames[:5], {"numberOfFrames": 12})
    with tifffile.TiffFile(paused) as tif:
        assert len(tif.pages) == 5
    _incomplete(check(paused), "EER has 5 pages, its metadata says 12 frames")
    # without numberOfFrames nothing tells: the settle time decides, as for any TIFF
    bare = _eer(root / "bare_EER.eer", frames[:5], {})
    assert check(bare) == Completeness(Verdict.COMPLETE, "5 pages", 5)


# --- MRC -----------------------------------------------------------------------------------------


def _write_mrc(path: Path, data: np.ndarray, extended: int = 0) -> Path:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if extended:
            mrc.set_extended_header(np.zeros(extended, dtype=np.uint8))
    return path


def _patch_mrc_words(path: Path, byteorder: str = "<", **words: int) -> None:
    where = {"nx": 0, "ny": 4, "nz": 8, "mode": 12, "nsymbt": 92}
    for name, value in words.items():
        _patch(path, where[name], struct.pack(byteorder + "i", value))


@pytest.mark.parametrize(
    ("dtype", "mode"),
    [(np.int8, 0), (np.int16, 1), (np.float32, 2), (np.complex64, 4), (np.uint16, 6),
     (np.float16, 12), (">i2", 1), (">f4", 2)],
)  # fmt: skip
def test_complete_mrc_every_mode(root: Path, check: Check, dtype: str | type, mode: int) -> None:
    path = _write_mrc(root / "movie_Fractions.mrc", np.zeros((6, 10, 12), dtype=dtype))
    assert check(path, expected_frames=6) == Completeness(
        Verdict.COMPLETE, f"6 frames of 12x10, mode {mode}", 6
    )


def test_mrc_truncated_data_names_the_numbers(root: Path, check: Check) -> None:
    path = _write_mrc(root / "movie.mrcs", np.zeros((5, 32, 16), dtype=np.int8))
    _truncate(path, 1024 + 2 * 32 * 16 + 100)
    _incomplete(
        check(path),
        f"MRC header promises 5 frames ({5 * 32 * 16} bytes of data) but the file holds "
        f"{2 * 32 * 16 + 100}",
    )


def test_mrc_with_bytes_beyond_what_the_header_accounts_for(root: Path, check: Check) -> None:
    """Data appended before the writer updated nz: sizes must match exactly, not at least."""
    path = _write_mrc(root / "movie.mrc", np.zeros((2, 8, 8), dtype=np.float32))
    with open(path, "ab") as fh:
        fh.write(bytes(8 * 8 * 4))
    _incomplete(check(path), "promises 2 frames (512 bytes of data)", "holds 768")


def test_mrc_header_claims_more_frames_than_written(root: Path, check: Check) -> None:
    path = _write_mrc(root / "movie.mrc", np.zeros((20, 16, 16), dtype=np.uint16))
    _patch_mrc_words(path, nz=40)
    result = check(path)
    _incomplete(result, "promises 40 frames (20480 bytes of data) but the file holds 10240")
    assert result.frames == 40


def test_mrc_fewer_frames_than_expected(root: Path, check: Check) -> None:
    path = _write_mrc(root / "movie.mrc", np.zeros((20, 16, 16), dtype=np.uint16))
    _incomplete(check(path, expected_frames=40), "20 frames, expected 40")
    assert check(path, expected_frames=20).verdict is Verdict.COMPLETE


def test_mrc_extended_header_is_accounted_for(root: Path, check: Check) -> None:
    path = _write_mrc(root / "movie.mrc", np.zeros((3, 8, 8), dtype=np.int16), extended=640)
    assert path.stat().st_size == 1024 + 640 + 3 * 8 * 8 * 2
    assert check(path).verdict is Verdict.COMPLETE
    _patch_mrc_words(path, nsymbt=0)  # the same bytes, now read as 640 bytes too many data
    _incomplete(check(path), "holds 1024")


def test_mrc_extended_header_past_eof(root: Path, check: Check) -> None:
    path = _write_mrc(root / "movie.mrc", np.zeros((3, 8, 8), dtype=np.int16))
    _patch_mrc_words(path, nsymbt=1 << 20)
    _incomplete(check(path), f"extended header of {1 << 20} bytes runs past")


@pytest.mark.parametrize(("nx", "complete"), [(5, True), (6, True), (7, False), (10, False)])
def test_mrc_mode_101_rows_are_half_bytes_rounded_up(
    root: Path, check: Check, nx: int, complete: bool
) -> None:
    """Packed 4-bit: 3 bytes a row holds 5 or 6 pixels, not 7 or 10."""
    path = _write_mrc(root / "movie.mrc", np.zeros((4, 9, 3), dtype=np.int8))
    _patch_mrc_words(path, nx=nx, mode=101)
    result = check(path)
    assert result.complete is complete, result
    assert result.frames == 4


def test_mrc_big_endian_with_an_empty_machine_stamp(root: Path, check: Check) -> None:
    path = _write_mrc(root / "movie.mrc", np.zeros((3, 8, 8), dtype=">u2"))
    with open(path, "rb") as fh:
        assert fh.read(1024)[212] == 0x11
    _patch(path, 212, bytes(4))
    assert check(path).frames == 3
    _truncate(path, path.stat().st_size - 1)
    _incomplete(check(path), "promises 3 frames (384 bytes of data)")


def test_gain_reference_mrc(root: Path, check: Check) -> None:
    path = _write_mrc(root / "20240314_CountRef-gain-ref.MRC", np.ones((40, 30), np.float32))
    assert check(path) == Completeness(Verdict.COMPLETE, "1 frames of 30x40, mode 2", 1)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (bytes(500), "500 bytes is shorter than the 1024-byte MRC header"),
        (bytes(1024), "MRC header does not parse"),  # preallocated, header not yet written
        (struct.pack("<4i", 8, 8, 1, 7) + bytes(1008 + 64), "mode=7"),
        (struct.pack("<4i", -8, 8, 1, 0) + bytes(1008 + 64), "nx=-8"),
    ],
)
def test_broken_mrc_headers(root: Path, check: Check, content: bytes, words: str) -> None:
    path = root / "movie.mrc"
    path.write_bytes(content)
    _incomplete(check(path), words)


# --- XML -----------------------------------------------------------------------------------------


def test_epu_xml_whole_and_truncated(root: Path, check: Check) -> None:
    text = EPU_XML.read_bytes()
    path = root / EPU_XML.name
    path.write_bytes(text)
    assert check(path) == Completeness(Verdict.COMPLETE, "well-formed XML", final=True)
    path.write_bytes(text[: len(text) * 2 // 3])
    _incomplete(check(path), "not well-formed")
    path.write_bytes(b"")
    _incomplete(check(path), "no element found")


def test_xml_external_entities_are_not_fetched(root: Path, check: Check) -> None:
    """A reference to a missing external entity would fail if the parser tried to load it."""
    path = root / "meta.XML"
    path.write_text(
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "/nonexistent/e.xml">]><a>&e;</a>'
    )
    assert check(path).verdict is Verdict.COMPLETE


# --- others and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["movie.tif.mdoc", "CountRef_x.dm4", "EER_GainReference.gain", "EpuSession"]
)
def test_unknown_suffix_leaves_it_to_settling(root: Path, check: Check, name: str) -> None:
    path = root / name
    path.write_bytes(b"\x00" * 10)
    result = check(path, expected_frames=40)
    assert result.verdict is Verdict.UNKNOWN
    assert result.complete
    assert Path(name).suffix.lower() not in CHECKED_SUFFIXES


@pytest.mark.parametrize("name", ["gone.tif", "gone.mrc", "gone.xml", "gone.eer"])
def test_a_vanished_file_raises_oserror(root: Path, check: Check, name: str) -> None:
    with pytest.raises(FileNotFoundError):
        check(root / name)


def test_expected_frames_must_be_positive(root: Path, check: Check) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        check(_write_tiff(root / "movie.tif", 1), expected_frames=0)


def test_verdicts_are_strings() -> None:
    assert Verdict("incomplete") is Verdict.INCOMPLETE
    assert f"{Verdict.COMPLETE}" == "complete"
    assert Completeness(Verdict.UNKNOWN).complete
    assert not Completeness(Verdict.INCOMPLETE, "x").complete
