"""What each file on a microscope share is, for the two acquisition programs we support.

Why a module of its own: the watcher, the transfer and the pre-processing all need to agree on
which files are movies, which file describes a movie, and which file is the gain reference. The
rules come from how the programs name their files (no file is opened here, so the rules are cheap
enough to run on every directory listing and can be tested without a share).

EPU (Thermo Fisher) writes, under the session folder::

    EpuSession.dm
    Images-Disc1/GridSquare_<gs>/GridSquare_<date>_<time>.xml|.jpg
    Images-Disc1/GridSquare_<gs>/FoilHoles/FoilHole_<fh>_<date>_<time>.xml|.jpg
    Images-Disc1/GridSquare_<gs>/Data/FoilHole_<fh>_Data_<a>_<b>_<date>_<time>.xml|.jpg|.mrc
    Images-Disc1/GridSquare_<gs>/Data/FoilHole_<fh>_Data_<a>_<b>_<date>_<time>_fractions.tiff
    (Falcon: ``_Fractions.mrc`` / ``_Fractions.tiff``, Falcon 4 EER: ``_EER.eer``)
    Metadata/GridSquare_<gs>.dm

The movie's XML has the movie's name without the ``_fractions``/``_EER`` suffix; the ``.mrc``
without suffix beside it is EPU's integrated (summed) image, not a movie. Falcon 4 EER gain
references are ``<date>_<time>_EER_GainReference.gain``; K2/K3 ones ``*-gain-ref.MRC`` /
``*_gain.tiff``. The atlas lives in ``Atlas/`` (``Atlas.dm``, ``Atlas_1.mrc``, ``Tile_*``).

SerialEM writes each movie (``<root>_<NNNNN>[_<Mon><DD>_<HH.MM.SS>].tif|.mrc|.eer``) with a
``<movie>.mdoc`` beside it (``name.tif.mdoc``, one ``[FrameSet = 0]`` section), copies the gain
reference as ``CountRef_<movie stem>.dm4`` (``SuperRef_`` for super-resolution; ``.mrc`` for
some cameras, ``.gain`` for Falcon EER), and keeps summed images in a stack ``<root>.mrc`` with a
``<root>.mrc.mdoc`` (``[ZValue = N]`` sections), plus ``.nav`` navigator and ``.log`` files.

Paths are POSIX relative paths (``/`` separators) as the share scanner reports them; names with
spaces, brackets, unicode or shell metacharacters are ordinary data here.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import PurePosixPath

__all__ = [
    "FileKind",
    "Layout",
    "MovieFormat",
    "classify",
    "metadata_for_movie",
    "movie_format",
    "movie_key",
    "movie_stem",
]


class Layout(StrEnum):
    """The acquisition program whose naming rules a share follows."""

    EPU = "epu"
    SERIALEM = "serialem"


class FileKind(StrEnum):
    """What a file on the share is to the pipeline."""

    MOVIE = "movie"
    MOVIE_METADATA = "movie_metadata"  # the per-movie XML (EPU) or .mdoc (SerialEM)
    GAIN_REFERENCE = "gain_reference"
    OTHER_METADATA = "other_metadata"  # atlas, grid square / foil hole XML+JPG, session files
    OTHER = "other"  # integrated images, summed stacks, anything unknown


class MovieFormat(StrEnum):
    """A movie's container, as MotionCor2 distinguishes them (-InTiff, -InMrc, -InEer)."""

    TIFF = "tiff"
    MRC = "mrc"
    EER = "eer"


_MOVIE_EXTS = {".tif": MovieFormat.TIFF, ".tiff": MovieFormat.TIFF, ".mrc": MovieFormat.MRC}
_MOVIE_EXTS[".eer"] = MovieFormat.EER
_IMAGE_EXTS = {".tif", ".tiff", ".mrc", ".dm4", ".dm3", ".gain"}
_METADATA_EXTS = {".xml", ".dm", ".jpg", ".jpeg", ".png", ".mdoc", ".nav", ".log", ".txt"}

# EPU's movie suffixes (case varies between detectors and EPU versions).
_EPU_MOVIE_SUFFIX = re.compile(r"_(fractions|eer)$", re.IGNORECASE)
# SerialEM's frame-file names: root, a counter of 3+ digits, then optionally the date/time
# (``_Sep05_15.52.08``) and a tilt angle (``_-30.0``). A summed stack (``<root>.mrc``) has no
# counter, unless the user's root name itself ends in digits (then it is taken for a movie).
_SERIALEM_COUNTER = re.compile(
    r"_\d{3,}(?:_[A-Za-z]{3}\d{2}_\d{2}\.\d{2}\.\d{2})?(?:_-?\d+(?:\.\d+)?)?$"
)
# Gain references: SerialEM's CountRef_/SuperRef_ copies, and names ending in gain / gain-ref /
# GainReference (EPU, Falcon). A user's root name that merely contains "gain" is not one.
_GAIN_NAME = re.compile(
    r"^(?:CountRef|SuperRef)_|(?:^|[_\-.])gain(?:[_\-]?ref(?:erence)?)?$|GainReference",
    re.IGNORECASE,
)


def _split(relpath: str) -> tuple[PurePosixPath, str, str]:
    """(path, stem, lower-case extension); refuses empty and absolute paths."""
    if not relpath or relpath.startswith("/"):
        raise ValueError(f"expected a relative path inside the share, got {relpath!r}")
    path = PurePosixPath(relpath)
    name = path.name
    dot = name.rfind(".")
    if dot <= 0:  # no extension, or a dot-file such as ".DS_Store"
        return path, name, ""
    return path, name[:dot], name[dot:].lower()


def _is_gain(stem: str, ext: str) -> bool:
    if ext == ".gain":
        return True
    return ext in _IMAGE_EXTS and bool(_GAIN_NAME.search(stem))


def _epu_is_movie(stem: str, ext: str) -> bool:
    if ext == ".eer":
        return True  # EER is a movie-only format
    return ext in _MOVIE_EXTS and bool(_EPU_MOVIE_SUFFIX.search(stem))


def _serialem_is_movie(stem: str, ext: str) -> bool:
    if ext in (".tif", ".tiff", ".eer"):
        return True
    # An .mrc is a movie only when it carries SerialEM's file counter; the session's summed
    # stack and montage maps (``<root>.mrc``) do not.
    return ext == ".mrc" and bool(_SERIALEM_COUNTER.search(stem))


def classify(relpath: str, layout: Layout) -> FileKind:
    """The kind of the file at ``relpath`` (relative to the session folder) under ``layout``."""
    path, stem, ext = _split(relpath)
    layout = Layout(layout)
    if _is_gain(stem, ext):
        return FileKind.GAIN_REFERENCE
    if layout is Layout.EPU:
        if _epu_is_movie(stem, ext):
            return FileKind.MOVIE
        if ext == ".xml" and "_Data_" in stem and path.parent.name == "Data":
            return FileKind.MOVIE_METADATA
        if ext in _METADATA_EXTS:
            return FileKind.OTHER_METADATA
        if ext == ".mrc" and (stem.startswith(("Atlas", "Tile_")) or "Atlas" in path.parts):
            return FileKind.OTHER_METADATA  # atlas images are context, not data
        return FileKind.OTHER
    # SerialEM
    if _serialem_is_movie(stem, ext):
        return FileKind.MOVIE
    if ext == ".mdoc":
        inner_stem, _, inner_ext = stem.rpartition(".")
        if inner_stem and _serialem_is_movie(inner_stem, "." + inner_ext.lower()):
            return FileKind.MOVIE_METADATA
        return FileKind.OTHER_METADATA
    if ext in _METADATA_EXTS:
        return FileKind.OTHER_METADATA
    return FileKind.OTHER


def _require_movie(relpath: str, layout: Layout) -> tuple[PurePosixPath, str, str]:
    path, stem, ext = _split(relpath)
    if classify(relpath, layout) is not FileKind.MOVIE:
        raise ValueError(f"{relpath!r} is not a movie under the {Layout(layout)} layout")
    return path, stem, ext


def movie_stem(relpath: str, layout: Layout) -> str:
    """The movie's file name without extension and without EPU's ``_fractions``/``_EER``.

    This is the name EPU gives the movie's XML and JPG; for SerialEM it is the file stem.
    """
    _, stem, _ = _require_movie(relpath, layout)
    if Layout(layout) is Layout.EPU:
        return _EPU_MOVIE_SUFFIX.sub("", stem)
    return stem


def movie_key(relpath: str, layout: Layout) -> str:
    """A stable identifier of a movie within its session: its folder plus :func:`movie_stem`.

    The folder is kept because SerialEM names repeat across grid folders (``grid1/x_00001``,
    ``grid2/x_00001``); the extension is dropped so the key names the acquisition, not the file.
    """
    path, _, _ = _require_movie(relpath, layout)
    return str(path.with_name(movie_stem(relpath, layout)))


def metadata_for_movie(relpath: str, layout: Layout) -> list[str]:
    """Relative paths where the movie's own metadata file may be, most likely first.

    EPU: ``<stem>.xml`` beside the movie. SerialEM: ``<movie>.mdoc`` (``x.tif.mdoc``). A list,
    so that callers need not change when a layout gains a second place to look.
    """
    path, _, _ = _require_movie(relpath, layout)
    if Layout(layout) is Layout.EPU:
        return [str(path.with_name(movie_stem(relpath, layout) + ".xml"))]
    return [str(path.with_name(path.name + ".mdoc"))]


def movie_format(relpath: str) -> MovieFormat:
    """The container of a movie file, from its extension."""
    _, _, ext = _split(relpath)
    try:
        return _MOVIE_EXTS[ext]
    except KeyError:
        raise ValueError(f"{relpath!r}: {ext or 'no extension'} is not a movie format") from None
