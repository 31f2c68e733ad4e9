"""A microscope on a folder: writes an EPU-like or SerialEM-like session at a given pace.

Why: the pipeline's hardest cases happen on the share, not in the maths — movies that are still
being written, metadata that lands after its movie, a gain reference that appears once, odd
names. This simulator reproduces them with real files (readable MRC/TIFF/EER movies, XML/mdoc as the
programs write them) and keeps a ground truth per movie (defocus, drift, particles) in a separate
folder, so end-to-end tests can compare what the pipeline found with what was put there.

What a session looks like on disk, and what is simplified:

* Movies are written in place under their final name, frame by frame over ``write_seconds``
  (a detector streaming to disk): a watcher sees a growing file. The movie's XML/mdoc (and EPU's
  JPG) are written after the movie, atomically, as the programs do. One gain reference is
  written (atomically) before the first movie.
* EPU: a Falcon-4i-like instrument writing ``_Fractions.tiff``/``_Fractions.mrc`` (not
  gain-normalised) or ``_EER.eer``, with the gain as ``<date>_<time>_EER_GainReference.gain`` (a
  float32 TIFF, as real ``.gain`` files are; here multiplicative like every gain this pipeline
  uses, whereas RELION treats real EPU ``.gain`` files as the inverse). No atlas and no
  integrated ``.mrc`` beside each movie (the pipeline does not use them); EpuSession.dm is a
  minimal document.
* EER (``format="eer"``, either layout): each of the ``frames`` fractions is written as
  ``eer_group`` raw frames (pages) by :mod:`cryoflow.processing.engines.eer`'s encoder; a
  fraction's counts
  are dealt to distinct raw frames at random (at most one electron per pixel per raw frame, as a
  Falcon records them), with random sub-pixel positions. The drift is the fraction's for all its
  raw frames, so ``shifts_px`` in the truth (one row per fraction) is exactly what MotionCor2 with
  the truth's ``eer.fm_int_file`` must find.
* SerialEM: ``<name>_<NNNNN>_<Mon><DD>_<HH.MM.SS>.tif|.mrc`` with ``.tif.mdoc`` beside it, the
  gain as ``CountRef_<first movie>.mrc`` (a K3 would give ``.dm4``, which no registry package
  writes), and the frame sums appended to a growing ``<name>.mrc`` whose ``.mrc.mdoc`` is
  rewritten after each image.
* ``content="noise"`` writes flat Poisson frames (fast; nothing to find but the gain pattern);
  ``"synthetic"`` renders CTF-modulated particles with drift with
  :mod:`cryoflow.processing.engines.synthetic`.

The command-line face (``cryoflow-simulate``) prints one JSON line per finished movie, flushed,
and stops cleanly (between two frames) on SIGTERM/SIGINT; a movie cut short keeps its partial
file and gets no metadata, like an aborted acquisition.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO
from xml.sax.saxutils import escape

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cryoflow.ingest.share.layout import FileKind, Layout, MovieFormat, classify, metadata_for_movie
from cryoflow.processing.engines.ctf_model import CTFParams
from cryoflow.processing.engines.imageio import atomic_path, write_preview
from cryoflow.processing.engines.synthetic import (
    MovieTruth,
    apply_ctf,
    default_drift,
    make_gain,
    make_movie,
    make_specimen,
    write_gain_mrc,
    write_truth_json,
)
from cryoflow.processing.tools.motioncor2 import fm_int_file_text

__all__ = ["Content", "SimulatedMovie", "SimulatorConfig", "main", "simulate_session"]


class Content(StrEnum):
    """What the movies show."""

    NOISE = "noise"
    SYNTHETIC = "synthetic"


class SimulatorConfig(BaseModel):
    """One simulated session. Sizes are (ny, nx); doses per frame in e/A^2."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layout: Layout
    out: Path = Field(description="the session folder on the share")
    truth_dir: Path | None = Field(None, description="ground truth JSON; must be outside out")
    movies: int = Field(5, ge=1)
    interval_s: float = Field(0.0, ge=0, description="between the starts of two movies")
    write_seconds: float = Field(0.0, ge=0, description="time to write one movie's frames")
    frames: int = Field(20, ge=1)
    size: tuple[int, int] = (1024, 1024)
    pixel_size_A: float = Field(1.0, gt=0)
    format: MovieFormat = MovieFormat.TIFF
    seed: int = 0
    content: Content = Content.NOISE
    eer_group: int = Field(16, ge=1, description="EER: raw frames per fraction (-FmIntFile)")
    defocus_range_um: tuple[float, float] = Field(
        (0.8, 2.5), description="nominal underfocus targets, spread evenly (EPU defocus list)"
    )
    dose_per_frame: float = Field(1.0, gt=0)
    voltage_kV: float = Field(300.0, gt=0)
    exposure_time_s: float = Field(2.0, gt=0)
    magnification: int = Field(105000, gt=0)
    particles: int = Field(10, ge=0)
    diameter_A: float = Field(150.0, gt=0)
    drift_px: float = Field(5.0, ge=0, description="total drift path per movie (synthetic)")
    contrast: float = Field(0.3, gt=0, description="fractional contrast of particles")
    ice: float = Field(
        0.05,
        ge=0,
        description="amorphous ice: white-noise density (std, particle peak = 1) under the CTF; "
        "it is what makes Thon rings visible between particles",
    )
    gain: bool = True
    holes_per_square: int = Field(4, ge=1, description="EPU: movies per grid square")
    session_name: str = Field("cryoflow_sim", pattern=r"^[^/\\\x00]+$")

    @field_validator("size")
    @classmethod
    def _size_ok(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 16:
            raise ValueError(f"movie size {v[0]}x{v[1]} is too small (at least 16x16)")
        return v

    @model_validator(mode="after")
    def _checks(self) -> SimulatorConfig:
        raw_e_per_px = self.dose_per_frame * self.pixel_size_A**2 / self.eer_group
        if self.format is MovieFormat.EER and raw_e_per_px > _EER_MAX_E_PER_PX:
            raise ValueError(
                f"EER: {raw_e_per_px:.3g} e/px per raw frame (dose per frame x pixel^2 / "
                f"eer_group) is more than a counting detector records without losing electrons "
                f"({_EER_MAX_E_PER_PX}); raise eer_group"
            )
        if (
            self.layout is Layout.SERIALEM
            and classify(f"{self.session_name}.mrc", Layout.SERIALEM) is FileKind.MOVIE
        ):
            raise ValueError(
                f"session name {self.session_name!r} ends like a SerialEM file counter; its "
                "summed stack would be taken for a movie"
            )
        lo, hi = self.defocus_range_um
        if not 0 < lo <= hi:
            raise ValueError(f"defocus range must satisfy 0 < min <= max (µm), got {lo}, {hi}")
        if self.truth_dir is not None:
            out, truth = self.out.resolve(), self.truth_dir.resolve()
            if truth == out or truth.is_relative_to(out):
                raise ValueError(f"truth_dir {self.truth_dir} must not be inside the share {out}")
        return self


@dataclass(frozen=True)
class SimulatedMovie:
    """One movie the simulator finished: where its files are and what was put in it."""

    index: int
    relpath: str  # movie, relative to config.out
    metadata_relpath: str
    truth_path: str | None
    shape: tuple[int, int, int]  # (frames, ny, nx)
    target_defocus_A: float  # what the metadata states (positive = underfocus)
    defocus_A: float | None  # the true mean defocus of the content (None for noise)


# --------------------------------------------------------------------------- progressive writers


def _mrc_header(shape: tuple[int, int, int], dtype: np.dtype, pixel_size_A: float) -> Any:
    """An MRC2014 image-stack header for ``shape`` (made by mrcfile, so readers agree with it)."""
    from mrcfile.mrcinterpreter import MrcInterpreter

    m = MrcInterpreter()
    m._create_default_attributes()
    m.set_data(np.zeros((1, shape[1], shape[2]), dtype=dtype))
    m.set_image_stack()
    m.voxel_size = pixel_size_A
    header = m.header.copy()
    header.nz = shape[0]
    return header


class _MrcStream:
    """Writes an MRC stack section by section; the header states the final size from the start.

    A reader that opens the file early finds fewer bytes than the header promises (mrcfile
    refuses it), exactly the state a copy must not be taken in. Statistics go into the header at
    :meth:`close`.
    """

    def __init__(self, fh: BinaryIO, shape: tuple[int, int, int], dtype: Any, pixel_size_A: float):
        self.fh, self.dtype = fh, np.dtype(dtype)
        self.header = _mrc_header(shape, self.dtype, pixel_size_A)
        self.fh.write(self.header.tobytes())
        self._stats = _Stats()

    def write(self, frame: np.ndarray) -> None:
        data = np.ascontiguousarray(frame, dtype=self.dtype)
        self.fh.write(data.tobytes())
        self.fh.flush()
        self._stats.add(data)

    def close(self) -> None:
        self._stats.into(self.header)
        self.fh.seek(0)
        self.fh.write(self.header.tobytes())
        self.fh.close()


class _Stats:
    """Running min/max/mean/rms for an MRC header."""

    def __init__(self) -> None:
        self.n, self.s, self.s2 = 0, 0.0, 0.0
        self.lo, self.hi = np.inf, -np.inf

    def add(self, data: np.ndarray) -> None:
        d = data.astype(np.float64)
        self.n += d.size
        self.s += float(d.sum())
        self.s2 += float((d * d).sum())
        self.lo, self.hi = min(self.lo, float(d.min())), max(self.hi, float(d.max()))

    def into(self, header: Any) -> None:
        if self.n:
            mean = self.s / self.n
            header.dmin, header.dmax, header.dmean = self.lo, self.hi, mean
            header.rms = np.sqrt(max(self.s2 / self.n - mean * mean, 0.0))


class _TiffStream:
    """Writes a multi-page TIFF page by page; each page is complete and linked when written."""

    def __init__(self, fh: BinaryIO, nbytes: int):
        import tifffile

        self.fh = fh
        self.writer = tifffile.TiffWriter(fh, bigtiff=nbytes > 3_900_000_000)

    def write(self, frame: np.ndarray) -> None:
        # metadata=None: no tifffile JSON description, like a detector's TIFF; pages of equal
        # shape still read back as one (n, ny, nx) series.
        self.writer.write(frame, photometric="minisblack", metadata=None, contiguous=False)
        self.fh.flush()

    def close(self) -> None:
        self.writer.close()
        self.fh.close()


_EER_MAX_E_PER_PX = 0.25  # per raw frame; a Falcon 4 records ~0.01-0.05


class _EerStream:
    """Writes each fraction as ``group`` EER raw frames (pages), dealing its counts out at random.

    A pixel with ``k`` counts gets one electron in each of ``k`` distinct raw frames, chosen
    uniformly (sequential selection: frame ``j`` takes one with probability remaining / frames
    left), so no raw frame holds two electrons in a pixel. Counts above ``group`` cannot be
    recorded (coincidence loss): the caller clips them first, so the sum it keeps is the file's.
    """

    def __init__(
        self,
        fh: BinaryIO,
        shape: tuple[int, int, int],
        group: int,
        rng: np.random.Generator,
        metadata: dict[str, Any],
    ):
        from cryoflow.processing.engines.eer import EerWriter

        self.group, self.rng = group, rng
        self.writer = EerWriter(fh, shape[1:], metadata)

    def write(self, frame: np.ndarray) -> None:
        flat = frame.ravel()
        hit = np.flatnonzero(flat)  # only pixels with electrons draw random numbers
        left = flat[hit].astype(np.int16)
        for j in range(self.group):
            take = self.rng.random(hit.size, dtype=np.float32) * (self.group - j) < left
            left -= take
            # Uniform stored codes are uniform sub-pixel positions (the XOR is a bijection).
            sub = self.rng.integers(0, 16, int(np.count_nonzero(take)), dtype=np.uint8)
            self.writer.write_hits(hit[take], sub)

    def close(self) -> None:
        self.writer.close()
        self.writer.fh.close()


def _write_progressively(
    path: Path,
    frames: np.ndarray | _NoiseFrames,
    fmt: MovieFormat,
    pixel_size_A: float,
    seconds: float,
    stop: threading.Event,
    eer: tuple[int, np.random.Generator, dict[str, Any]] | None = None,
) -> np.ndarray | None:
    """Write ``frames`` to ``path`` (final name) spread over ``seconds``.

    ``eer``: (raw frames per fraction, generator, metadata) for EER. Returns the sum of the
    frames, or None if ``stop`` was set before the movie was complete.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (len(frames), *frames.shape[1:])
    fh = open(path, "wb")  # noqa: SIM115 - closed by the stream
    stream: _MrcStream | _TiffStream | _EerStream
    if fmt is MovieFormat.MRC:
        dtype = np.uint16 if frames.dtype == np.uint8 else frames.dtype  # MRC has no uint8
        stream = _MrcStream(fh, shape, dtype, pixel_size_A)
    elif fmt is MovieFormat.EER:
        if eer is None:
            raise ValueError("EER needs the raw frames per fraction")
        stream = _EerStream(fh, shape, *eer)
    else:
        stream = _TiffStream(fh, int(np.prod(shape)) * np.dtype(frames.dtype).itemsize)
    total = np.zeros(shape[1:], dtype=np.uint32)
    start = time.monotonic()
    per_frame = seconds / shape[0]
    try:
        for i, frame in enumerate(frames):
            if stop.is_set():
                return None
            if eer is not None:
                frame = np.minimum(frame, eer[0])  # at most one electron per raw frame
            stream.write(frame)
            total += frame
            delay = start + (i + 1) * per_frame - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return None
        return total
    finally:
        stream.close()


class _GrowingMrcStack:
    """SerialEM's summed-image stack: one section appended per movie, header rewritten each time."""

    def __init__(self, path: Path, shape: tuple[int, int], pixel_size_A: float):
        self.path, self.shape, self.pixel_size_A = path, shape, pixel_size_A
        self.n = 0
        self._stats = _Stats()

    def append(self, image: np.ndarray) -> None:
        data = np.ascontiguousarray(np.clip(image, 0, 65535), dtype=np.uint16)
        self._stats.add(data)
        self.n += 1
        header = _mrc_header((self.n, *self.shape), data.dtype, self.pixel_size_A)
        self._stats.into(header)
        with open(self.path, "r+b" if self.n > 1 else "wb") as fh:
            fh.seek(0, os.SEEK_END)
            if self.n == 1:
                fh.write(header.tobytes())
            fh.write(data.tobytes())
            fh.seek(0)
            fh.write(header.tobytes())


# --------------------------------------------------------------------------- content


def _targets(cfg: SimulatorConfig) -> list[float]:
    """EPU-style defocus list (µm underfocus), cycled through by the acquisitions."""
    lo, hi = cfg.defocus_range_um
    n = 1 if lo == hi else min(cfg.movies, 6)
    return list(np.linspace(lo, hi, n))


_GAIN_LEVELS = 16  # the simulated detector's gain takes this many distinct values
_LUT_BITS = 16  # noise counts come from 16-bit uniform numbers through a Poisson inverse CDF


def _quantize_gain(gain: np.ndarray) -> np.ndarray:
    """The gain on a few levels, so noise frames can come from one lookup table per level."""
    lo, hi = float(gain.min()), float(gain.max())
    levels = np.linspace(lo, hi, _GAIN_LEVELS)
    index = np.rint((gain - lo) / ((hi - lo) / (_GAIN_LEVELS - 1) or 1.0)).astype(np.intp)
    return levels[index].astype(np.float32)


class _NoiseTable:
    """Poisson counts by inverse-CDF lookup of 16-bit random numbers, one table per gain level.

    Probabilities are exact Poisson rounded to 1/65536 (rarer counts never occur); drawing a
    frame is about ten times faster than ``Generator.poisson``. Built once per session.
    """

    def __init__(
        self, shape: tuple[int, int], e_per_px: float, gain: np.ndarray | None, dtype: Any
    ):
        self.shape, self.dtype = shape, np.dtype(dtype)
        if gain is None:
            levels, index = np.ones(1), np.zeros(shape, dtype=np.uint32)
        else:
            levels, inverse = np.unique(gain, return_inverse=True)
            index = inverse.reshape(shape).astype(np.uint32)
        q = (np.arange(2**_LUT_BITS) + 0.5) / 2**_LUT_BITS
        kmax = int(np.iinfo(self.dtype).max)
        table = np.empty((len(levels), 2**_LUT_BITS), dtype=self.dtype)
        for i, g in enumerate(levels):
            lam = e_per_px / float(g)  # a gain reference multiplies raw frames back to flat
            k = np.arange(min(kmax, int(lam + 12 * np.sqrt(lam) + 12)) + 1)
            log_pmf = k * np.log(lam) - lam - np.cumsum(np.log(np.maximum(k, 1)))
            table[i] = np.minimum(np.searchsorted(np.cumsum(np.exp(log_pmf)), q), k[-1])
        self.table = table.ravel()
        self.base = index << _LUT_BITS

    def movie(self, n: int, rng: np.random.Generator) -> _NoiseFrames:
        return _NoiseFrames(self, n, rng)


class _NoiseFrames:
    """A movie's noise frames, made one at a time (a 4k x 4k movie never sits in memory)."""

    def __init__(self, table: _NoiseTable, n: int, rng: np.random.Generator):
        self._t, self.n, self.rng = table, n, rng
        self.shape, self.dtype = (n, *table.shape), table.dtype

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[np.ndarray]:
        base = self._t.base
        for _ in range(self.n):
            u = np.frombuffer(self.rng.bytes(2 * base.size), dtype=np.uint16).reshape(base.shape)
            yield self._t.table.take(base | u)


def _frame_dtype(cfg: SimulatorConfig) -> Any:
    """uint8 counts like a K3 TIFF, unless the dose per pixel could overflow them."""
    return np.uint8 if cfg.dose_per_frame * cfg.pixel_size_A**2 < 60 else np.uint16


def _render(
    cfg: SimulatorConfig,
    index: int,
    target_um: float,
    gain: np.ndarray | None,
    noise: _NoiseTable | None,
) -> tuple[np.ndarray | _NoiseFrames, MovieTruth, float | None]:
    """Frames (n, ny, nx) of counts (lazy for noise), their truth, the true mean defocus (Å)."""
    rng = np.random.default_rng([cfg.seed, index])
    ny, nx = cfg.size
    e_per_px = cfg.dose_per_frame * cfg.pixel_size_A**2
    dtype = _frame_dtype(cfg)
    if noise is not None:
        frames = noise.movie(cfg.frames, rng)
        truth = MovieTruth(
            n_frames=cfg.frames,
            shape=(ny, nx),
            dose_per_frame=e_per_px,
            shifts_px=np.zeros((cfg.frames, 2)),
            gain_applied=gain is not None,
            pixel_size_A=cfg.pixel_size_A,
        )
        return frames, truth, None
    # The true defocus varies around the target (ice is never flat), with some astigmatism.
    mean_A = target_um * 1e4 + rng.uniform(-500.0, 500.0)
    astig = rng.uniform(100.0, 600.0)
    ctf = CTFParams(
        defocus1_A=mean_A + astig / 2,
        defocus2_A=mean_A - astig / 2,
        astig_angle_deg=float(rng.uniform(0.0, 180.0)),
        kv=cfg.voltage_kV,
    )
    pad = int(np.ceil(cfg.drift_px)) + 16
    density, specimen = make_specimen(
        (ny + 2 * pad, nx + 2 * pad),
        cfg.pixel_size_A,
        n_particles=cfg.particles,
        diameter_A=cfg.diameter_A,
        rng=rng,
    )
    if cfg.ice > 0:
        density = density + rng.normal(0.0, cfg.ice, density.shape).astype(np.float32)
    image = cfg.contrast * apply_ctf(density, cfg.pixel_size_A, ctf)
    frames, truth = make_movie(
        image,
        n_frames=cfg.frames,
        dose_per_frame=e_per_px,
        drift=default_drift(cfg.frames, cfg.drift_px, rng),
        gain=gain,
        rng=rng,
        out_shape=(ny, nx),
        dtype=dtype,
    )
    for obj in specimen.particles + specimen.specks + specimen.contaminants:
        obj.x -= pad  # positions in the frames' coordinates (of the undrifted image)
        obj.y -= pad
    specimen.shape = (ny, nx)
    truth.ctf, truth.specimen, truth.pixel_size_A = ctf, specimen, cfg.pixel_size_A
    return frames, truth, mean_A


# --------------------------------------------------------------------------- metadata text


def _write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding, newline="")


def _kv(key: str, xsd_type: str, value: Any) -> str:
    return (
        f"<a:KeyValueOfstringanyType><a:Key>{escape(key)}</a:Key>"
        f'<a:Value i:type="b:{xsd_type}" xmlns:b="http://www.w3.org/2001/XMLSchema">'
        f"{escape(str(value))}</a:Value></a:KeyValueOfstringanyType>"
    )


def _epu_xml(
    *,
    pixel_size_A: float,
    kv: float,
    when: datetime,
    exposure_s: float,
    magnification: int,
    shape: tuple[int, int],
    n_fractions: int | None = None,
    dose_e_per_A2: float | None = None,
    applied_defocus_um: float | None = None,
    gain_path: str | None = None,
) -> str:
    """A ``MicroscopeImage`` document as EPU's .NET DataContract serializer writes it."""
    det = "EF-Falcon"
    custom = [_kv("BinaryResult.Detector", "string", det)]
    custom.append(_kv(f"Detectors[{det}].CommercialName", "string", "Falcon 4i"))
    custom.append(_kv("DetectorCommercialName", "string", "Falcon 4i"))
    if dose_e_per_A2 is not None:
        custom.append(_kv("Dose", "double", repr(dose_e_per_A2 * 1e20)))
    if applied_defocus_um is not None:
        custom.append(_kv("AppliedDefocus", "double", repr(-applied_defocus_um * 1e-6)))
    if gain_path is not None:
        custom.append(_kv(f"Detectors[{det}].EerGainReference", "string", gain_path))
    custom.append(_kv("PhasePlateUsed", "boolean", "false"))
    cam_input = [_kv("ElectronCountingEnabled", "boolean", "true")]
    cam_input.append(_kv("SuperResolutionFactor", "long", 1))
    if n_fractions is not None:
        cam_input.append(
            "<a:KeyValueOfstringanyType><a:Key>FractionationSettings</a:Key>"
            '<a:Value i:type="b:EquidistantFractionation" xmlns:b="http://schemas.datacontract'
            '.org/2004/07/Fei.Applications.Common.Omp.Interface">'
            f"<b:NumberOffractions>{n_fractions}</b:NumberOffractions></a:Value>"
            "</a:KeyValueOfstringanyType>"
        )
    unit = (
        '<unit xmlns:a="http://schemas.datacontract.org/2004/07/Fei.Common.Types">'
        "<a:_x003C_PrefixExponent_x003E_k__BackingField>1</a:_x003C_PrefixExponent_x003E_k__"
        "BackingField><a:_x003C_Symbol_x003E_k__BackingField>m</a:_x003C_Symbol_x003E_k__"
        "BackingField></unit>"
    )
    px = repr(pixel_size_A * 1e-10)
    stamp = when.astimezone().isoformat(timespec="microseconds")
    arrays = "http://schemas.microsoft.com/2003/10/Serialization/Arrays"
    drawing = "http://schemas.datacontract.org/2004/07/System.Drawing"
    return (
        '<MicroscopeImage xmlns="http://schemas.datacontract.org/2004/07/Fei.SharedObjects" '
        'xmlns:i="http://www.w3.org/2001/XMLSchema-instance"><name>Empty</name>'
        f"<uniqueID>{_uuid(when, pixel_size_A)}</uniqueID>"
        f'<CustomData xmlns:a="{arrays}">{"".join(custom)}</CustomData>'
        '<IntensityScale i:nil="true"/>'
        f"<SpatialScale><offset><x><numericValue>0</numericValue>{unit}</x><y><numericValue>0"
        f"</numericValue>{unit}</y></offset><pixelSize><x><numericValue>{px}</numericValue>"
        f"{unit}</x><y><numericValue>{px}</numericValue>{unit}</y></pixelSize></SpatialScale>"
        "<microscopeData><acquisition>"
        f"<acquisitionDateTime>{stamp}</acquisitionDateTime><analyticalDetectors/><camera>"
        f'<Binning xmlns:a="{drawing}"><a:x>1</a:x><a:y>1</a:y></Binning>'
        "<CameraLocation>EnergyFilter</CameraLocation>"
        f'<CameraSpecificInput xmlns:a="{arrays}">{"".join(cam_input)}</CameraSpecificInput>'
        f"<DarkGainCorrection>None</DarkGainCorrection><ExposureTime>{exposure_s!r}"
        f"</ExposureTime><Inserted>true</Inserted><Name>{det}</Name>"
        f'<ReadoutArea xmlns:a="{drawing}"><a:height>{shape[0]}</a:height>'
        f"<a:width>{shape[1]}</a:width><a:x>0</a:x><a:y>0</a:y></ReadoutArea>"
        "<Shutter>PreSpecimen</Shutter></camera></acquisition>"
        "<core><ApplicationSoftware>EPU</ApplicationSoftware>"
        "<ApplicationSoftwareVersion>3.6.0.6389</ApplicationSoftwareVersion></core>"
        f"<gun><AccelerationVoltage>{int(round(kv * 1000))}</AccelerationVoltage>"
        "<Sourcetype>FieldEmission</Sourcetype></gun>"
        "<instrument><InstrumentModel>KRIOS-SIM</InstrumentModel></instrument>"
        "<optics><ColumnOperatingMode>TEM</ColumnOperatingMode>"
        "<Defocus>0</Defocus><EFTEMOn>true</EFTEMOn><TemMagnification>"
        f"<NominalMagnification>{magnification}</NominalMagnification></TemMagnification>"
        "</optics></microscopeData></MicroscopeImage>"
    )


def _uuid(when: datetime, salt: float) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"{when.isoformat()}-{salt}"))


def _epu_session_dm(name: str, when: datetime) -> str:
    return (
        '<?xml version="1.0"?>\n<EpuSessionXml xmlns="http://schemas.datacontract.org/2004/07/'
        'Applications.Epu.Persistence" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">'
        f"<Name>{escape(name)}</Name>"
        "<DoseFractionsOutputFormat>Tiff Non-Gain normalized</DoseFractionsOutputFormat>"
        f"<StartDateTime>{when.astimezone().isoformat()}</StartDateTime></EpuSessionXml>\n"
    )


def _mdoc_time(when: datetime) -> str:
    return when.strftime("%d-%b-%y  %H:%M:%S")


def _frame_mdoc(
    cfg: SimulatorConfig,
    when: datetime,
    movie_name: str,
    gain_name: str | None,
    target_um: float,
    n: int,
    index: int,
) -> str:
    """A ``<movie>.mdoc`` as SerialEM writes it beside a frame file (CRLF, one FrameSet)."""
    lines = [
        f"T = SerialEM: Acquired on cryoflow simulator            {_mdoc_time(when)}",
        f"Voltage = {cfg.voltage_kV:g}",
        "",
        "[FrameSet = 0]",
    ]
    if gain_name:
        lines.append(f"GainReference = {gain_name}")
    total = cfg.dose_per_frame * cfg.frames
    lines += [
        "TiltAngle = 0.00249969",
        f"Magnification = {cfg.magnification}",
        f"ExposureDose = {total:g}",
        f"PixelSpacing = {cfg.pixel_size_A:g}",
        "SpotSize = 8",
        f"Defocus = {-target_um + 0.0412:g}",
        f"ExposureTime = {cfg.exposure_time_s:g}",
        "Binning = 1",
        "CameraIndex = 1",
        "DividedBy2 = 0",
        "OperatingMode = 1",
        f"TargetDefocus = {-target_um:g}",
        f"SubFramePath = X:\\{cfg.session_name}\\{movie_name}",
        f"NumSubFrames = {n}",
        f"FrameDosesAndNumber = {cfg.dose_per_frame:g} {n}",
        f"DateTime = {_mdoc_time(when)}",
        f"NavigatorLabel = {index + 1}-1",
        "",
        "",
    ]
    return "\r\n".join(lines)


def _stack_mdoc(
    cfg: SimulatorConfig, sections: list[str], shape: tuple[int, int], when: datetime
) -> str:
    head = [
        f"PixelSpacing = {cfg.pixel_size_A:g}",
        f"Voltage = {cfg.voltage_kV:g}",
        f"ImageFile = {cfg.session_name}.mrc",
        f"ImageSize = {shape[1]} {shape[0]}",
        "DataMode = 6",
        "",
        f"[T = SerialEM: Acquired on cryoflow simulator            {_mdoc_time(when)}]",
        "",
    ]
    return "\r\n".join(head + sections)


# --------------------------------------------------------------------------- the session


class _Session:
    """Names and side files of one layout; the run loop in :func:`simulate_session` is shared."""

    def __init__(self, cfg: SimulatorConfig, start: datetime):
        self.cfg, self.start = cfg, start
        self.out = cfg.out
        self.gain_relpath: str | None = None
        self._sums: _GrowingMrcStack | None = None
        self._sum_sections: list[str] = []

    # names ---------------------------------------------------------------
    def movie_relpath(self, index: int, when: datetime) -> str:
        fmt = self.cfg.format
        if self.cfg.layout is Layout.EPU:
            suffix = {MovieFormat.MRC: "_Fractions.mrc", MovieFormat.EER: "_EER.eer"}
            square = 8_999_100 + index // self.cfg.holes_per_square
            hole = 9_015_800 + index
            stamp = when.strftime("%Y%m%d_%H%M%S")
            return (
                f"Images-Disc1/GridSquare_{square}/Data/"
                f"FoilHole_{hole}_Data_9017347_{index % 9 + 1}_{stamp}"
                f"{suffix.get(fmt, '_Fractions.tiff')}"
            )
        ext = {MovieFormat.MRC: ".mrc", MovieFormat.EER: ".eer"}.get(fmt, ".tif")
        stamp = when.strftime("%b%d_%H.%M.%S")
        return f"{self.cfg.session_name}_{index + 1:05d}_{stamp}{ext}"

    def metadata_relpath(self, movie_relpath: str) -> str:
        return metadata_for_movie(movie_relpath, self.cfg.layout)[0]

    # side files ----------------------------------------------------------
    def begin(self, gain: np.ndarray | None, first_movie: str) -> None:
        """Files that exist before the first movie: session file and gain reference."""
        cfg = self.cfg
        if cfg.layout is Layout.EPU:
            _write_text(self.out / "EpuSession.dm", _epu_session_dm(cfg.session_name, self.start))
            if gain is not None:
                import tifffile

                name = self.start.strftime("%Y%m%d_%H%M%S") + "_EER_GainReference.gain"
                with atomic_path(self.out / name) as tmp:
                    tifffile.imwrite(tmp, gain.astype(np.float32), photometric="minisblack")
                self.gain_relpath = name
        elif gain is not None:
            name = "CountRef_" + Path(first_movie).stem + ".mrc"
            write_gain_mrc(self.out / name, gain)
            self.gain_relpath = name

    def before_movie(self, index: int, when: datetime) -> None:
        """EPU writes the grid square and foil hole records before the exposures in them."""
        cfg = self.cfg
        if cfg.layout is not Layout.EPU:
            return
        square_dir = self.out / Path(self.movie_relpath(index, when)).parent.parent
        stamp = when.strftime("%Y%m%d_%H%M%S")
        overview = np.random.default_rng([cfg.seed, index, 7]).normal(size=(64, 64))
        meta = dict(kv=cfg.voltage_kV, when=when, exposure_s=1.0, shape=(64, 64))
        if index % cfg.holes_per_square == 0:
            _write_text(
                square_dir / f"GridSquare_{stamp}.xml",
                _epu_xml(pixel_size_A=100.0, magnification=2250, **meta),
            )
            write_preview(square_dir / f"GridSquare_{stamp}.jpg", overview)
            sq_id = square_dir.name.split("_", 1)[1]
            _write_text(
                self.out / "Metadata" / f"GridSquare_{sq_id}.dm",
                '<?xml version="1.0"?>\n<GridSquareXml xmlns="http://schemas.datacontract.org/'
                f'2004/07/Applications.Epu.Persistence"><Id>{sq_id}</Id></GridSquareXml>\n',
            )
        hole = Path(self.movie_relpath(index, when)).name.split("_Data_")[0]
        _write_text(
            square_dir / "FoilHoles" / f"{hole}_{stamp}.xml",
            _epu_xml(pixel_size_A=15.0, magnification=8500, **meta),
        )
        write_preview(square_dir / "FoilHoles" / f"{hole}_{stamp}.jpg", overview)

    def after_movie(
        self, relpath: str, total: np.ndarray, n: int, when: datetime, target_um: float
    ) -> None:
        """The movie's own metadata (and EPU's JPG / SerialEM's summed stack), after the movie."""
        cfg = self.cfg
        meta_path = self.out / self.metadata_relpath(relpath)
        if cfg.layout is Layout.EPU:
            gain_path = (
                f"D:\\ImagesForProcessing\\{self.gain_relpath}" if self.gain_relpath else None
            )
            xml = _epu_xml(
                pixel_size_A=cfg.pixel_size_A,
                kv=cfg.voltage_kV,
                when=when,
                exposure_s=cfg.exposure_time_s,
                magnification=cfg.magnification,
                shape=cfg.size,
                n_fractions=n,
                dose_e_per_A2=cfg.dose_per_frame * n,
                applied_defocus_um=target_um,
                gain_path=gain_path,
            )
            _write_text(meta_path, xml)
            write_preview(meta_path.with_suffix(".jpg"), total.astype(np.float32), max_size=256)
            return
        index = self._sums.n if self._sums is not None else 0
        text = _frame_mdoc(cfg, when, Path(relpath).name, self.gain_relpath, target_um, n, index)
        _write_text(meta_path, text, encoding="utf-8")
        if self._sums is None:
            self._sums = _GrowingMrcStack(
                self.out / f"{cfg.session_name}.mrc", cfg.size, cfg.pixel_size_A
            )
        self._sums.append(total)
        z = self._sums.n - 1
        self._sum_sections += [
            f"[ZValue = {z}]",
            f"PixelSpacing = {cfg.pixel_size_A:g}",
            f"ExposureDose = {cfg.dose_per_frame * n:g}",
            f"TargetDefocus = {-target_um:g}",
            f"SubFramePath = X:\\{cfg.session_name}\\{Path(relpath).name}",
            f"NumSubFrames = {n}",
            f"DateTime = {_mdoc_time(when)}",
            "",
        ]
        _write_text(
            self.out / f"{cfg.session_name}.mrc.mdoc",
            _stack_mdoc(cfg, self._sum_sections, cfg.size, self.start),
            encoding="utf-8",
        )


def simulate_session(
    config: SimulatorConfig,
    *,
    stop: threading.Event | None = None,
    on_movie: Callable[[SimulatedMovie], None] | None = None,
) -> list[SimulatedMovie]:
    """Write the session described by ``config``; returns the movies finished.

    ``stop`` (set from another thread or a signal handler) ends the session between two frames;
    ``on_movie`` is called after each finished movie (metadata and truth written).
    """
    cfg = config
    stop = stop if stop is not None else threading.Event()
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.truth_dir is not None:
        cfg.truth_dir.mkdir(parents=True, exist_ok=True)
    start_wall = datetime.now().astimezone().replace(microsecond=0)
    session = _Session(cfg, start_wall)
    gain = None
    if cfg.gain:
        gain = _quantize_gain(make_gain(cfg.size, rng=np.random.default_rng([cfg.seed, 10**6])))
    session.begin(gain, session.movie_relpath(0, start_wall))
    noise = None
    if cfg.content is Content.NOISE:
        e_per_px = cfg.dose_per_frame * cfg.pixel_size_A**2
        noise = _NoiseTable(cfg.size, e_per_px, gain, _frame_dtype(cfg))
    targets = _targets(cfg)
    done: list[SimulatedMovie] = []
    t0 = time.monotonic()
    for index in range(cfg.movies):
        target_um = float(targets[index % len(targets)])
        frames, truth, defocus_A = _render(cfg, index, target_um, gain, noise)
        delay = t0 + index * cfg.interval_s - time.monotonic()
        if stop.is_set() or (delay > 0 and stop.wait(delay)):
            break
        when = start_wall + timedelta(seconds=time.monotonic() - t0)
        relpath = session.movie_relpath(index, when)
        session.before_movie(index, when)
        eer = None
        n_raw = cfg.frames * cfg.eer_group
        if cfg.format is MovieFormat.EER:
            meta = {
                "numberOfFrames": n_raw,
                "sensorImageWidth": cfg.size[1],
                "sensorImageHeight": cfg.size[0],
                "exposureTime": cfg.exposure_time_s,
                "totalDose": cfg.dose_per_frame * cfg.frames,
            }
            eer = (cfg.eer_group, np.random.default_rng([cfg.seed, index, 65001]), meta)
        total = _write_progressively(
            cfg.out / relpath, frames, cfg.format, cfg.pixel_size_A, cfg.write_seconds, stop, eer
        )
        if total is None:
            break
        session.after_movie(relpath, total, cfg.frames, when, target_um)
        truth_path = None
        if cfg.truth_dir is not None:
            truth_path = cfg.truth_dir / (relpath + ".truth.json")
            write_truth_json(
                truth_path,
                {
                    "layout": str(cfg.layout),
                    "movie": relpath,
                    "metadata": session.metadata_relpath(relpath),
                    "gain_reference": session.gain_relpath,
                    "content": str(cfg.content),
                    "dose_per_frame_e_per_A2": cfg.dose_per_frame,  # truth.dose_per_frame: e/px
                    "target_defocus_A": target_um * 1e4,
                    "defocus_A": defocus_A,
                    "truth": truth,
                    **({"eer": _eer_truth(cfg)} if cfg.format is MovieFormat.EER else {}),
                },
            )
        movie = SimulatedMovie(
            index=index,
            relpath=relpath,
            metadata_relpath=session.metadata_relpath(relpath),
            truth_path=str(truth_path) if truth_path else None,
            shape=(cfg.frames, *cfg.size),
            target_defocus_A=target_um * 1e4,
            defocus_A=defocus_A,
        )
        done.append(movie)
        if cfg.truth_dir is not None:
            _write_index(cfg, session, done)
        if on_movie is not None:
            on_movie(movie)
    return done


def _eer_truth(cfg: SimulatorConfig) -> dict[str, Any]:
    """How the EER's raw frames make the truth's fractions (an -FmIntFile that recovers them)."""
    n_raw, dose = cfg.frames * cfg.eer_group, cfg.dose_per_frame / cfg.eer_group
    return {
        "raw_frames": n_raw,
        "group": cfg.eer_group,
        "dose_per_raw_frame_e_per_A2": dose,
        "fm_int_file": fm_int_file_text(n_raw, cfg.eer_group, dose),
    }


def _write_index(cfg: SimulatorConfig, session: _Session, done: list[SimulatedMovie]) -> None:
    """``session.json`` in the truth folder: the config and every finished movie so far."""
    data = {
        "config": json.loads(cfg.model_dump_json()),
        "gain_reference": session.gain_relpath,
        "movies": [asdict(m) for m in done],
    }
    with atomic_path(cfg.truth_dir / "session.json") as tmp:  # type: ignore[operator]
        tmp.write_text(json.dumps(data, indent=1) + "\n")


# --------------------------------------------------------------------------- CLI


def _size(text: str) -> tuple[int, int]:
    try:
        ny, nx = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NYxNX such as 1024x1024, got {text!r}"
        ) from None
    return ny, nx


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cryoflow-simulate",
        description="Write an EPU- or SerialEM-like acquisition session into a folder, movie by "
        "movie, with ground truth kept elsewhere. Prints one JSON line per finished movie.",
    )
    p.add_argument("--layout", choices=[v.value for v in Layout], default="epu")
    p.add_argument("--out", type=Path, required=True, help="session folder (the share)")
    p.add_argument("--truth-dir", type=Path, help="ground-truth folder, outside --out")
    p.add_argument("--movies", type=int, default=5)
    p.add_argument("--interval", type=float, default=0.0, help="seconds between movie starts")
    p.add_argument("--write-seconds", type=float, default=0.0, help="seconds to write one movie")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--size", type=_size, default=(1024, 1024), help="NYxNX pixels")
    p.add_argument("--pixel-size", type=float, default=1.0, help="Angstrom per pixel")
    p.add_argument("--format", choices=[v.value for v in MovieFormat], default="tiff")
    p.add_argument("--eer-group", type=int, default=16, help="EER: raw frames per fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--content", choices=[v.value for v in Content], default="noise")
    p.add_argument(
        "--defocus-range",
        type=float,
        nargs=2,
        default=(0.8, 2.5),
        metavar=("MIN_UM", "MAX_UM"),
        help="nominal underfocus range, µm",
    )
    p.add_argument("--dose-per-frame", type=float, default=1.0, help="e/A^2 per frame")
    p.add_argument("--voltage", type=float, default=300.0, help="kV")
    p.add_argument("--particles", type=int, default=10, help="per movie (synthetic content)")
    p.add_argument("--diameter", type=float, default=150.0, help="particle diameter, Angstrom")
    p.add_argument("--drift", type=float, default=5.0, help="drift path per movie, px")
    p.add_argument(
        "--contrast", type=float, default=0.3, help="fractional contrast of particles (synthetic)"
    )
    p.add_argument("--ice", type=float, default=0.05, help="ice texture std (synthetic)")
    p.add_argument("--no-gain", action="store_true", help="write no gain reference")
    p.add_argument("--session-name", default="cryoflow_sim")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``cryoflow-simulate``."""
    args = _parser().parse_args(argv)
    from pydantic import ValidationError

    try:
        cfg = SimulatorConfig(
            layout=args.layout,
            out=args.out,
            truth_dir=args.truth_dir,
            movies=args.movies,
            interval_s=args.interval,
            write_seconds=args.write_seconds,
            frames=args.frames,
            size=args.size,
            pixel_size_A=args.pixel_size,
            format=args.format,
            eer_group=args.eer_group,
            seed=args.seed,
            content=args.content,
            defocus_range_um=tuple(args.defocus_range),
            dose_per_frame=args.dose_per_frame,
            voltage_kV=args.voltage,
            particles=args.particles,
            diameter_A=args.diameter,
            drift_px=args.drift,
            contrast=args.contrast,
            ice=args.ice,
            gain=not args.no_gain,
            session_name=args.session_name,
        )
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "config"
            print(f"cryoflow-simulate: {where}: {err['msg']}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    def _report(movie: SimulatedMovie) -> None:
        print(json.dumps({"event": "movie", **asdict(movie)}), flush=True)

    try:
        done = simulate_session(cfg, stop=stop, on_movie=_report)
    except (OSError, ValueError) as exc:
        print(f"cryoflow-simulate: {exc}", file=sys.stderr)
        return 1
    event = "stopped" if stop.is_set() and len(done) < cfg.movies else "done"
    print(json.dumps({"event": event, "movies": len(done)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
