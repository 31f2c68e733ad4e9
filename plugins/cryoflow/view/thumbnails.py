"""Thumbnails of a movie's processing outputs, made once and cached beside them.

Three kinds per movie: the motion-corrected sum (the dose-weighted ``_DW.mrc`` when MotionCor2
wrote one), the CTFFIND diagnostic power spectrum, and the sum with the picks drawn on it. Each is
an 8-bit PNG of at most :data:`MAX_PX` pixels, written once to
``<session>/processed/thumbnails/<file id>_<kind>.png`` (atomically, with the facility's file
mode, 0640 by default) and made again only when its source is newer.

Only files under the session's ``processed/`` folder are ever read, after resolving symlinks:
the paths come from the ledger, never from a request, and are checked all the same.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("micrograph", "spectrum", "picks")
MAX_PX = 512
PICK_COLOUR = (255, 200, 0)


class ThumbnailError(LookupError):
    """The output does not exist (yet), or lies outside the session's processed folder."""


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` resolved, if it lies under ``root`` resolved; else :class:`ThumbnailError`."""
    base = Path(root).resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(base):
        raise ThumbnailError(f"{path} lies outside {root}")
    return target


def dose_weighted(aligned: Path) -> Path:
    """MotionCor2 writes ``<stem>_DW.mrc`` beside ``<stem>.mrc`` when it dose-weights."""
    return aligned.with_name(f"{aligned.stem}_DW{aligned.suffix}")


def _read_mrc(path: Path) -> np.ndarray:
    import mrcfile

    try:
        with mrcfile.mmap(path, mode="r", permissive=True) as mrc:
            if mrc.data is None:
                raise ThumbnailError(f"{path}: not a readable MRC file")
            data = np.asarray(mrc.data)
            image = data[0] if data.ndim == 3 else data
            return np.array(image, dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise ThumbnailError(f"{path}: {exc}") from exc


def _bin(image: np.ndarray, max_px: int) -> tuple[np.ndarray, int]:
    factor = max(1, int(np.ceil(max(image.shape) / max_px)))
    if factor > 1:
        ny, nx = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
        image = image[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor)
        image = image.mean(axis=(1, 3))
    return image, factor


def _grey(image: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros(image.shape, np.uint8)
    lo, hi = np.percentile(finite, [lo_pct, hi_pct])
    scaled = np.clip((np.nan_to_num(image, nan=lo) - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return (scaled * 255.0 + 0.5).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    mode = "L" if pixels.ndim == 2 else "RGB"
    Image.fromarray(pixels, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def micrograph_png(path: Path, max_px: int = MAX_PX) -> bytes:
    image, _ = _bin(_read_mrc(path), max_px)
    return _png(_grey(image))


def spectrum_png(path: Path, max_px: int = MAX_PX) -> bytes:
    """CTFFIND's diagnostic image (its left half the spectrum, right half the fit) as it is."""
    image, _ = _bin(_read_mrc(path), max_px)
    return _png(_grey(image, 1.0, 99.0))


def picks_png(
    micrograph: Path, picks: Path, diameter_px: float | None, max_px: int = MAX_PX
) -> bytes:
    """The micrograph with a circle per pick (centres in the micrograph's pixels, x = column,
    y = row, as the picker writes them)."""
    from PIL import Image, ImageDraw

    from cryoflow.processing.tools.dogpicker import PickFileError, parse_picks

    image, factor = _bin(_read_mrc(micrograph), max_px)
    try:
        found = parse_picks(picks)
    except (PickFileError, OSError, ValueError) as exc:
        raise ThumbnailError(f"{picks}: {exc}") from exc
    rgb = Image.fromarray(_grey(image), mode="L").convert("RGB")
    draw = ImageDraw.Draw(rgb)
    radius = max(3.0, (diameter_px or 30.0 * factor) / 2 / factor)
    for x, y in zip(found.x, found.y, strict=True):
        if np.isfinite(x) and np.isfinite(y):
            cx, cy = x / factor, y / factor
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius),
                         outline=PICK_COLOUR, width=1)  # fmt: skip
    return _png(np.asarray(rgb))


def sources(session_root: str | os.PathLike, outputs: dict, kind: str) -> list[Path]:
    """The files a thumbnail is made from, checked to lie under the session's processed/."""
    processed = Path(session_root) / "processed"
    if kind not in KINDS:
        raise ThumbnailError(f"unknown thumbnail kind {kind!r}")
    aligned = outputs.get("aligned")
    if kind == "spectrum":
        if not outputs.get("diag"):
            raise ThumbnailError("no CTF diagnostic recorded for this movie")
        return [inside(processed, outputs["diag"])]
    if not aligned:
        raise ThumbnailError("no aligned sum recorded for this movie")
    mic = inside(processed, aligned)
    dw = dose_weighted(mic)
    mic = inside(processed, dw) if dw.is_file() else mic
    if kind == "micrograph":
        return [mic]
    if not outputs.get("picks"):
        raise ThumbnailError("no picks recorded for this movie")
    return [mic, inside(processed, outputs["picks"])]


def thumbnail(
    session_root: str | os.PathLike,
    outputs: dict,
    kind: str,
    *,
    file_mode: int = 0o640,
    dir_mode: int = 0o2770,
    diameter_px: float | None = None,
) -> bytes:
    """The PNG of one movie's ``kind``, from the cache or made now (and cached)."""
    srcs = sources(session_root, outputs, kind)
    for src in srcs:
        if not src.is_file():
            raise ThumbnailError(f"{src.name} does not exist (yet)")
    processed = Path(session_root) / "processed"
    cache = processed / "thumbnails" / f"{int(outputs['file_id'])}_{kind}.png"
    newest = max(src.stat().st_mtime_ns for src in srcs)
    try:
        if cache.stat().st_mtime_ns >= newest:
            return cache.read_bytes()
    except OSError:
        pass
    if kind == "micrograph":
        data = micrograph_png(srcs[0])
    elif kind == "spectrum":
        data = spectrum_png(srcs[0])
    else:
        data = picks_png(srcs[0], srcs[1], diameter_px)
    _store(cache, data, file_mode=file_mode, dir_mode=dir_mode)
    return data


def _store(cache: Path, data: bytes, *, file_mode: int, dir_mode: int) -> None:
    """Write the cache file atomically; a folder the API server may not write is no error (the
    thumbnail is served all the same, and made again next time)."""
    from cryoflow.ingest.transfer import make_dirs

    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        make_dirs(cache.parent, dir_mode)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, file_mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, file_mode)
        os.replace(tmp, cache)
    except OSError as exc:
        log.warning("Thumbnail not cached at %s: %s", cache, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


__all__ = ["KINDS", "ThumbnailError", "inside", "sources", "thumbnail"]
