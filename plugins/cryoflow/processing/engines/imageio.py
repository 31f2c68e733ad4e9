"""Image file I/O shared by the engines: movie/micrograph reading, atomic writing, previews.

Why one module: every engine must refuse the same broken inputs with the same clear errors, and
must never leave a half-written file under its final name (a watcher or the next DAG task could
pick it up). Writers here go to a temp name in the same directory and ``os.replace`` it.

Run from a cryoflow job, the files and folders written here get exactly the facility's modes,
which the job script exports as ``CRYOFLOW_FILE_MODE``/``CRYOFLOW_DIR_MODE`` (octal); run by
hand, the usual ``0666``/``0777`` less the umask.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cryoflow.dirs import make_dirs

if TYPE_CHECKING:
    from cryoflow.processing.engines.eer import EerMovie, FmIntEntry

__all__ = [
    "ImageReadError",
    "MovieInfo",
    "atomic_path",
    "movie_kind",
    "open_movie",
    "read_image",
    "write_mrc",
    "write_preview",
]

#: Set by the job script (cryoflow.processing.compute.jobscript.FILE_MODE_ENV / DIR_MODE_ENV).
FILE_MODE_ENV = "CRYOFLOW_FILE_MODE"
DIR_MODE_ENV = "CRYOFLOW_DIR_MODE"

MRC_SUFFIXES = {".mrc", ".mrcs", ".st"}
TIFF_SUFFIXES = {".tif", ".tiff"}
EER_SUFFIXES = {".eer"}
GAIN_TIFF_SUFFIXES = {".gain"}  # EPU's Falcon gain references are float32 TIFFs


class ImageReadError(ValueError):
    """An input image is missing, of the wrong type, or damaged; the message names the file."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it over ``path``, else delete it."""
    final = Path(path)
    _make_dirs(final.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp made it 0600 (and a writer may have made it anew): give the job's mode, or
        # the usual one. After writing, so that a read-only file_mode (0440) works too.
        os.chmod(tmp, _env_mode(FILE_MODE_ENV, 0o666 & ~_umask()))
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _env_mode(name: str, default: int) -> int:
    """An octal mode from the environment (``0640``), or ``default`` when it is not set."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"{name}={text!r} is not an octal permission mode such as 0640")
    return mode


def _make_dirs(directory: Path) -> None:
    """Create missing folders; under a job each new one gets exactly the job's folder mode."""
    mode = _env_mode(DIR_MODE_ENV, -1)
    if mode < 0:
        directory.mkdir(parents=True, exist_ok=True)
    else:
        make_dirs(directory, mode)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def write_mrc(path: str | os.PathLike, data: np.ndarray, pixel_size_A: float | None = None) -> None:
    """Write a 2-D image or a 3-D stack as MRC, atomically; sets the pixel size when given."""
    import mrcfile

    data = np.ascontiguousarray(data)
    if data.dtype == np.uint8:  # MRC has no unsigned 8-bit mode (mode 0 is int8)
        data = data.astype(np.uint16)
    elif data.dtype == np.float64:
        data = data.astype(np.float32)
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(data)
        if data.ndim == 3:
            mrc.set_image_stack()
        if pixel_size_A:
            mrc.voxel_size = float(pixel_size_A)


def movie_kind(path: str | os.PathLike) -> str:
    """'mrc', 'tiff' or 'eer' from the file name; anything else is refused."""
    suffix = Path(path).suffix.lower()
    if suffix in MRC_SUFFIXES:
        return "mrc"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix in EER_SUFFIXES:
        return "eer"
    raise ImageReadError(f"{path}: unsupported file type {suffix!r} (expected MRC, TIFF or EER)")


class MovieInfo:
    """A lazily read movie: ``shape`` (n, ny, nx), ``pixel_size_A`` (None if unknown), frames.

    Frames are read one at a time (``frame(i)`` returns float32) so a 40-frame K3 movie never
    needs to be held twice. Use as a context manager.
    """

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self._mrc = None
        self._tif = None
        self.pixel_size_A: float | None = None
        try:
            if kind == "mrc":
                self._open_mrc()
            else:
                self._open_tiff()
        except BaseException:
            self.close()  # no file handle left behind by a refused file
            raise

    def _open_mrc(self) -> None:
        import mrcfile

        try:
            with mrcfile.open(self.path, header_only=True, permissive=True) as head:
                hdr = head.header
                dtype = mrcfile.utils.data_dtype_from_header(hdr)
                n_bytes = int(hdr.nx) * int(hdr.ny) * int(hdr.nz) * dtype.itemsize
                expected = 1024 + int(hdr.nsymbt) + n_bytes
        except (ValueError, OSError, EOFError) as exc:
            raise ImageReadError(f"{self.path}: not a readable MRC header ({exc})") from exc
        actual = self.path.stat().st_size
        if actual < expected:
            raise ImageReadError(
                f"{self.path}: truncated MRC file: {actual} bytes, its header promises {expected}"
            )
        try:
            self._mrc = mrcfile.mmap(self.path, mode="r", permissive=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ImageReadError(f"{self.path}: not a readable MRC file ({exc})") from exc
        data = self._mrc.data
        if data is None:
            raise ImageReadError(f"{self.path}: MRC file holds no data")
        arr = data if data.ndim == 3 else data[None]
        if arr.ndim != 3:
            raise ImageReadError(f"{self.path}: expected a 2-D image or a stack, got {data.shape}")
        self._arr = arr
        self.shape = tuple(int(v) for v in arr.shape)
        vs = float(self._mrc.voxel_size.x)
        self.pixel_size_A = vs if vs > 0 else None

    def _open_tiff(self) -> None:
        import tifffile

        try:
            self._tif = tifffile.TiffFile(self.path)
            pages = self._tif.pages
            n = len(pages)
            if n == 0:
                raise ImageReadError(f"{self.path}: TIFF file has no pages (empty or cut short)")
            shape = pages[0].shape
        except ImageReadError:
            raise
        except Exception as exc:  # tifffile raises many kinds for damaged files
            raise ImageReadError(f"{self.path}: not a readable TIFF file ({exc})") from exc
        if len(shape) != 2:
            raise ImageReadError(f"{self.path}: TIFF pages must be 2-D images, got {shape}")
        self.shape = (n, int(shape[0]), int(shape[1]))

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` as float32 (a truncated or damaged frame raises ImageReadError)."""
        try:
            if self.kind == "mrc":
                return np.array(self._arr[i], dtype=np.float32)
            page = self._tif.pages[i]
            arr = page.asarray()
        except ImageReadError:
            raise
        except Exception as exc:
            raise ImageReadError(f"{self.path}: cannot read frame {i} ({exc})") from exc
        if arr.shape != self.shape[1:]:
            raise ImageReadError(
                f"{self.path}: frame {i} has shape {arr.shape}, frame 0 has {self.shape[1:]}"
            )
        return arr.astype(np.float32, copy=False)

    def close(self) -> None:
        if self._mrc is not None:
            self._mrc.close()
        if self._tif is not None:
            self._tif.close()

    def __enter__(self) -> MovieInfo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_movie(
    path: str | os.PathLike,
    expected_kind: str | None = None,
    *,
    eer_sampling: int = 1,
    fm_int: Sequence[FmIntEntry] | None = None,
) -> MovieInfo | EerMovie:
    """Open a movie, checking that it exists, is the expected kind and is not truncated.

    An EER movie's frames are its fractions: raw frames grouped by ``fm_int`` (the parsed
    -FmIntFile; without it each raw frame is a fraction, as in MotionCor2) and rendered at
    ``eer_sampling`` (see :mod:`cryoflow.processing.engines.eer`).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    kind = "tiff" if path.suffix.lower() in GAIN_TIFF_SUFFIXES else movie_kind(path)
    if expected_kind is not None and kind != expected_kind:
        raise ImageReadError(f"{path}: is a {kind.upper()} file by name, expected {expected_kind}")
    _check_magic(path, kind)
    if kind == "eer":
        from cryoflow.processing.engines.eer import EerMovie

        return EerMovie(path, sampling=eer_sampling, fm_int=fm_int)
    return MovieInfo(path, kind)


def _check_magic(path: Path, kind: str) -> None:
    """Refuse a file whose content is not what its name says (before a library misreads it)."""
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if kind == "eer":
        if head[:4] not in (b"II+\x00", b"MM\x00+"):
            raise ImageReadError(f"{path}: named as EER but does not start with a BigTIFF header")
    elif kind == "tiff":
        if head[:4] not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            raise ImageReadError(f"{path}: named as TIFF but does not start with a TIFF header")
    elif kind == "mrc" and (len(head) < 1024 or head[208:211] != b"MAP"):
        raise ImageReadError(
            f"{path}: not an MRC file (short header or no 'MAP' label at byte 208)"
        )


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A single 2-D image (gain reference, micrograph) from MRC or TIFF (EPU ``.gain``), float32."""
    if Path(path).suffix.lower() in EER_SUFFIXES:
        raise ImageReadError(f"{path}: an EER movie is not a single image")
    with open_movie(path) as mov:
        if mov.shape[0] != 1:
            raise ImageReadError(f"{path}: expected one image, found a stack of {mov.shape[0]}")
        return mov.frame(0)


def write_preview(
    path: str | os.PathLike, image: np.ndarray, max_size: int = 1024, quality: int = 85
) -> None:
    """A downsampled 8-bit PNG/JPEG (by extension) of ``image`` for dashboards, atomically.

    Downsampling is block averaging (which also suppresses shot noise); contrast is clipped at
    the 0.5 and 99.5 percentiles so a few hot pixels or ice crystals do not grey out the picture.
    """
    from PIL import Image

    img = np.asarray(image, dtype=np.float32)
    factor = max(1, int(np.ceil(max(img.shape) / max_size)))
    if factor > 1:
        ny, nx = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
        img = img[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor).mean(axis=(1, 3))
    lo, hi = np.percentile(img, [0.5, 99.5])
    scaled = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    pil = Image.fromarray((scaled * 255.0 + 0.5).astype(np.uint8), mode="L")
    suffix = Path(path).suffix.lower()
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(suffix)
    if fmt is None:
        raise ValueError(f"{path}: preview must be .png, .jpg or .jpeg")
    with atomic_path(path) as tmp:
        pil.save(tmp, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
