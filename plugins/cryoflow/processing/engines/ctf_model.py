"""The contrast transfer function, in CTFFIND4's conventions (shared by generator and fitter).

Defocus values are in Angstrom, positive = underfocus; the astigmatism angle is measured from the
x axis to the axis of defocus 1, counter-clockwise, in degrees, as CTFFIND reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CTFParams:
    """Physical parameters of one micrograph's CTF."""

    defocus1_A: float
    defocus2_A: float
    astig_angle_deg: float = 0.0
    kv: float = 300.0
    cs_mm: float = 2.7
    amp_contrast: float = 0.07
    phase_shift_rad: float = 0.0


def electron_wavelength_A(kv: float) -> float:
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV."""
    volts = kv * 1000.0
    return 12.2643247 / np.sqrt(volts * (1.0 + volts * 0.978466e-6))


def spatial_frequency_grid(
    shape: tuple[int, int], pixel_size_A: float, rfft: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Return (|g| in 1/Angstrom, azimuth in radians) for an FFT grid of ``shape`` (y, x).

    Uses numpy's FFT frequency ordering (no fftshift); with ``rfft`` the x axis is halved.
    """
    ny, nx = shape
    fy = np.fft.fftfreq(ny, d=pixel_size_A)
    fx = np.fft.rfftfreq(nx, d=pixel_size_A) if rfft else np.fft.fftfreq(nx, d=pixel_size_A)
    gy, gx = np.meshgrid(fy, fx, indexing="ij")
    return np.hypot(gx, gy), np.arctan2(gy, gx)


def defocus_at_azimuth(p: CTFParams, azimuth: np.ndarray) -> np.ndarray:
    """Effective defocus (Angstrom) along each azimuth for an astigmatic CTF."""
    ang = np.deg2rad(p.astig_angle_deg)
    return 0.5 * (
        p.defocus1_A + p.defocus2_A + (p.defocus1_A - p.defocus2_A) * np.cos(2.0 * (azimuth - ang))
    )


def phase_aberration(p: CTFParams, g: np.ndarray, azimuth: np.ndarray) -> np.ndarray:
    """chi(g): the CTF phase, including the amplitude-contrast and phase-plate terms."""
    lam = electron_wavelength_A(p.kv)
    cs_A = p.cs_mm * 1e7
    df = defocus_at_azimuth(p, azimuth)
    w = p.amp_contrast
    amp_phase = np.arctan(w / np.sqrt(1.0 - w * w))
    g2 = g * g
    return (
        np.pi * lam * df * g2
        - 0.5 * np.pi * cs_A * lam**3 * g2 * g2
        + p.phase_shift_rad
        + amp_phase
    )


def ctf_2d(
    shape: tuple[int, int], pixel_size_A: float, p: CTFParams, rfft: bool = False
) -> np.ndarray:
    """The CTF sampled on an FFT grid (numpy ordering, no fftshift): -sin(chi)."""
    g, az = spatial_frequency_grid(shape, pixel_size_A, rfft=rfft)
    return -np.sin(phase_aberration(p, g, az))
