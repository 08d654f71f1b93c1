"""Electron optics shared by CTF estimation and correction: wavelength, aberration phase, the CTF itself.

Conventions (CTFFIND's): defocus positive = underfocus, in Å; ``defocus_u`` ≥ ``defocus_v``; the
astigmatism angle is the direction of ``defocus_u`` counter-clockwise from +x. Frequencies in 1/Å, with
ky along the rows (axis 0) and kx along the columns (axis 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def electron_wavelength_A(voltage_kV: float) -> float:
    """Relativistic electron wavelength in Å (0.019687 Å at 300 kV)."""
    v = voltage_kV * 1e3
    return 12.264259 / math.sqrt(v * (1.0 + 0.97846e-6 * v))


@dataclass(frozen=True)
class Microscope:
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07

    @property
    def wavelength_A(self) -> float:
        return electron_wavelength_A(self.voltage_kV)


@dataclass(frozen=True)
class CTFParams:
    defocus_u_A: float
    defocus_v_A: float
    astigmatism_angle_deg: float = 0.0

    @property
    def mean_defocus_A(self) -> float:
        return 0.5 * (self.defocus_u_A + self.defocus_v_A)

    @property
    def astigmatism_A(self) -> float:
        return self.defocus_u_A - self.defocus_v_A

    def canonical(self) -> CTFParams:
        """defocus_u ≥ defocus_v and the angle in (-90, 90]."""
        du, dv, ang = self.defocus_u_A, self.defocus_v_A, self.astigmatism_angle_deg
        if dv > du:
            du, dv, ang = dv, du, ang + 90.0
        ang = (ang + 90.0) % 180.0 - 90.0
        if ang == -90.0:
            ang = 90.0
        return CTFParams(float(du), float(dv), float(ang))


def frequency_grid(
    shape: tuple[int, int], pixel_A: float, half: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """|k| (1/Å) and the azimuth φ = atan2(ky, kx) of an unshifted 2-D FFT grid; ``half``: of the rfft2 half
    plane (kx ≥ 0) of a real ``shape`` image."""
    ky = np.fft.fftfreq(shape[0], d=pixel_A)[:, None]
    kx = (np.fft.rfftfreq if half else np.fft.fftfreq)(shape[1], d=pixel_A)[None, :]
    return np.hypot(kx, ky), np.arctan2(ky, kx)


def defocus_at_azimuth(params: CTFParams, azimuth: np.ndarray) -> np.ndarray:
    """Defocus (Å) seen along the frequency direction ``azimuth`` (radians)."""
    ang = math.radians(params.astigmatism_angle_deg)
    return 0.5 * (
        params.defocus_u_A
        + params.defocus_v_A
        + (params.defocus_u_A - params.defocus_v_A) * np.cos(2.0 * (azimuth - ang))
    )


def aberration_phase(k: np.ndarray, defocus_A: np.ndarray | float, scope: Microscope) -> np.ndarray:
    """χ(k) = πλΔf k² − (π/2) Cs λ³ k⁴ + arctan(w/√(1−w²)) (amplitude contrast w as a phase)."""
    lam = scope.wavelength_A
    cs_A = scope.cs_mm * 1e7
    w = scope.amplitude_contrast
    k2 = k * k
    return (
        math.pi * lam * defocus_A * k2
        - 0.5 * math.pi * cs_A * lam**3 * k2 * k2
        + math.atan2(w, math.sqrt(1 - w * w))
    )


def ctf_2d(shape: tuple[int, int], pixel_A: float, params: CTFParams, scope: Microscope) -> np.ndarray:
    """The CTF −sin χ on an unshifted FFT grid of ``shape``."""
    k, az = frequency_grid(shape, pixel_A)
    return -np.sin(aberration_phase(k, defocus_at_azimuth(params, az), scope))


class ThonRings:
    """How well a spectrum matches CTF² (sin²χ) on a fixed set of frequencies, for fits that ask it for many
    defocus and astigmatism values: what does not depend on them (k², the double azimuth's cosine and sine,
    the Cs and amplitude-contrast phase) is computed once. χ = πλk²·(Δf̄ + ½Δ·cos 2(φ − α)) − ½πCsλ³k⁴ + w
    with cos 2(φ − α) expanded, and sin²χ = (1 − cos 2χ)/2, so an evaluation takes one cosine per pixel."""

    def __init__(self, k: np.ndarray, azimuth: np.ndarray, scope: Microscope):
        lam = scope.wavelength_A
        k2 = np.asarray(k, np.float64) ** 2
        self._defocus_term = 2.0 * math.pi * lam * k2  # 2χ per Å of defocus
        self._cos_term = self._defocus_term * np.cos(2.0 * azimuth)
        self._sin_term = self._defocus_term * np.sin(2.0 * azimuth)
        w = scope.amplitude_contrast
        self._rest = 2.0 * (
            -0.5 * math.pi * scope.cs_mm * 1e7 * lam**3 * k2 * k2 + math.atan2(w, math.sqrt(1 - w * w))
        )

    def double_phase(self, params: CTFParams) -> np.ndarray:
        """2χ for ``params`` at the frequencies given (a new array)."""
        ang = 2.0 * math.radians(params.astigmatism_angle_deg)
        half = 0.5 * (params.defocus_u_A - params.defocus_v_A)
        two_chi = self._defocus_term * params.mean_defocus_A + self._rest
        two_chi += (half * math.cos(ang)) * self._cos_term
        two_chi += (half * math.sin(ang)) * self._sin_term
        return two_chi

    def correlation(self, spectrum: np.ndarray, params: CTFParams) -> float:
        """The normalised cross-correlation of ``spectrum`` (its values at these frequencies) with sin²χ: with
        c = cos 2χ, sin²χ − mean = −(c − c̄)/2, so it is −(s·c − c̄·Σs) / |c − c̄|."""
        c = np.cos(self.double_phase(params))
        c_mean = float(c.mean())
        # elementwise products, not `@`: BLAS dot products start threads, and the fits run in threads already
        spread = math.sqrt(max(float(np.square(c).sum()) - c.size * c_mean * c_mean, 0.0))
        return -(float((spectrum * c).sum()) - c_mean * float(spectrum.sum())) / (spread + 1e-30)
