"""CTF phase flipping of a tilted view in strips (IMOD ctfphaseflip's scheme).

The view is in the aligned geometry (tilt axis along y). Across the tilted field the defocus varies with the
distance x' from the axis: Δf(x') = Δf − x'·tan θ (x' in Å; the simulator contract's sign). The view is
flipped several times, each with the defocus of one strip parallel to the axis, and each strip is taken from
its own flip; strips are as narrow as needed to keep the defocus change within ``tolerance_A``.
"""

from __future__ import annotations

import math

import numpy as np

from em_platform.cryo.optics import CTFParams, Microscope, ctf_2d


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
    ft = np.fft.fft2(view - mean)
    width = strip_width_px(tilt_deg, pixel_A, nx, tolerance_A)
    out = np.empty_like(view)
    slope = math.tan(math.radians(tilt_deg)) * pixel_A
    for x0 in range(0, nx, width):
        x1 = min(nx, x0 + width)
        xc = (x0 + x1) / 2 - nx // 2
        shift = -xc * slope
        local = CTFParams(
            params.defocus_u_A + shift, params.defocus_v_A + shift, params.astigmatism_angle_deg
        )
        flipped = np.fft.ifft2(ft * np.sign(ctf_2d((ny, nx), pixel_A, local, scope))).real
        out[:, x0:x1] = flipped[:, x0:x1]
    return out + mean
