"""CTF phase flipping of a tilted view in strips (IMOD ctfphaseflip's scheme).

The view is in the aligned geometry (tilt axis along y). Across the tilted field the defocus varies with the
distance x' from the axis: Δf(x') = Δf − x'·tan θ (x' in Å; the simulator contract's sign). The view is
flipped several times, each with the defocus of one strip parallel to the axis, and each strip is taken from
its own flip; strips are as narrow as needed to keep the defocus change within ``tolerance_A``.

A strip's defocus differs from the view's by the same amount along every azimuth, so its aberration phase is
the view's plus πλ·shift·k²: the view's phase is computed once and each strip adds that term. The view is
real and sign(CTF) is symmetric under k → −k, so the half-plane spectrum (rfft2, single precision for a
float32 view) carries everything.
"""

from __future__ import annotations

import math

import numpy as np

from em_platform.cryo.optics import (
    CTFParams,
    Microscope,
    aberration_phase,
    defocus_at_azimuth,
    frequency_grid,
)
from em_platform.lazy_import import LazyModule

fft = LazyModule("scipy.fft")


def strip_width_px(tilt_deg: float, pixel_A: float, nx: int, tolerance_A: float) -> int:
    slope = abs(math.tan(math.radians(tilt_deg))) * pixel_A  # Å of defocus per pixel across the axis
    return nx if slope == 0 else max(8, min(nx, int(tolerance_A / slope)))


def phase_flip(
    view: np.ndarray,
    pixel_A: float,
    params: CTFParams,
    tilt_deg: float,
    scope: Microscope,
    tolerance_A: float = 200.0,
) -> np.ndarray:
    """The view multiplied by sign(CTF) in Fourier space, strip by strip along x (the axis is along y)."""
    view = np.asarray(view, np.float32)
    ny, nx = view.shape
    mean = float(view.mean())
    ft = fft.rfft2(view - np.float32(mean))
    k, az = frequency_grid((ny, nx), pixel_A, half=True)
    chi = aberration_phase(k, defocus_at_azimuth(params, az), scope)  # the view's own defocus
    per_angstrom = math.pi * scope.wavelength_A * k * k  # dχ/dΔf
    width = strip_width_px(tilt_deg, pixel_A, nx, tolerance_A)
    out = np.empty_like(view)
    slope = math.tan(math.radians(tilt_deg)) * pixel_A
    for x0 in range(0, nx, width):
        x1 = min(nx, x0 + width)
        shift = -((x0 + x1) / 2 - nx // 2) * slope  # this strip's defocus minus the view's
        flip = np.sign(-np.sin(chi + shift * per_angstrom)).astype(np.float32)  # sign of the CTF −sin χ
        out[:, x0:x1] = fft.irfft2(ft * flip, s=(ny, nx))[:, x0:x1]
    return out + np.float32(mean)
