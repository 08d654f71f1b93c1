"""Each object's projected potential on a small box of its own: exact at any sub-pixel position, and
imaged at the object's own height.

The points of one object in one channel are summed straight into Fourier coefficients on the box's
frequency grid by a type-1 non-uniform FFT (finufft): Σ_j w_j·exp(−2πi q·r_j) at every q up
to the detector's Nyquist frequency. There is no deposit kernel to divide out, so an atom's peak and
shape do not depend on where it falls in its pixel (cloud-in-cell put a carbon's peak anywhere from
0.78 to 1.75× the exact value at 1 Å/px). Times each channel's form factor (and the dose B-factor),
the box is the band-limited projection of the object, as a direct Fourier sum over its atoms gives it.

For the image, the object's thin-object transmission on its box, exp((i − f)σV) − 1, is propagated by
the Fresnel propagator from the object's own height to its slab's plane and multiplied into the slab's
transmission: each particle is imaged at defocus Δf + z′, as the ground truth says, while the multislice
keeps slabs as thick as the depth of field (a 400-Å slab at 2 Å/px would otherwise put its particles up to
200 Å off their defocus). Exact for a lone object; objects whose boxes overlap in one slab multiply, the
thin-slab approximation the multislice makes anyway.

Odd, 3·5·7-smooth box sizes: every frequency has its conjugate on the grid (no lone Nyquist row), so the
projection is real.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from em_platform.lazy_import import LazyModule

finufft = LazyModule("finufft")
sfft = LazyModule("scipy.fft")

NUFFT_EPS = 1e-4  # single precision; peaks then agree with a direct sum to 0.1 %
# Pixels around an object's outermost point: the band-limited atom's ringing, its excluded-volume
# Gaussian and the Fresnel spread (λ·Δz·q_max ≈ 1 Å for 200 Å at 2 Å/px) stay inside the box.
MARGIN_PX = 8


def odd_fast_len(n: int) -> int:
    """The smallest odd m ≥ n whose only prime factors are 3, 5 and 7 (fast for scipy.fft)."""
    m = n | 1
    while True:
        k = m
        for p in (3, 5, 7):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 2


@dataclass
class BoxGrid:
    """One box size's frequency grid and the channels' transfers on it (1/pixel² folded in)."""

    size: int
    q2: np.ndarray  # (n, n) float32, Å⁻²
    transfers: list[np.ndarray]  # per channel, (n, n) float32


class ObjectBoxes:
    """Every object's box size and point ranges; its projection added to a slab's potential, or its
    transmission, propagated from its own height, multiplied into a slab's."""

    def __init__(self, scene, pixel_A: float, solvent_potential_V: float):
        self.scene, self.pixel_A = scene, pixel_A
        self.solvent = solvent_potential_V
        self._grids: dict[int, BoxGrid] = {}
        self._plans = threading.local()  # a finufft plan per box size and thread (tilts run in parallel)
        self.sizes = []
        for o, centre in enumerate(scene.centres):
            pts = scene.coords[scene.ranges[o, 0] : scene.ranges[o, -1]]
            radius = float(np.sqrt(((pts - centre) ** 2).sum(axis=1).max())) if len(pts) else 0.0
            radius += max(  # a bead is one point with the radius in its form factor
                (
                    ch.radius_A
                    for c, ch in enumerate(scene.channels)
                    if scene.ranges[o, c + 1] > scene.ranges[o, c]
                ),
                default=0.0,
            )
            size = odd_fast_len(2 * (math.ceil(radius / pixel_A) + MARGIN_PX) + 1)
            self.sizes.append(size)
            self.grid(size)

    def __getstate__(self) -> dict:
        """Pickled for a Dask cluster's workers (the simulation scatters its imager): the plans are per
        process and thread, so they stay behind and each worker makes its own."""
        state = dict(self.__dict__)
        del state["_plans"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._plans = threading.local()

    def grid(self, size: int) -> BoxGrid:
        if size not in self._grids:
            f = sfft.fftfreq(size, d=self.pixel_A)
            q2 = (f[:, None] ** 2 + f[None, :] ** 2).astype(np.float64)
            scale = 1.0 / self.pixel_A**2
            transfers = [
                (ch.transfer(q2, solvent_potential_V=self.solvent, damage_b=0.0) * scale).astype(np.float32)
                for ch in self.scene.channels
            ]
            self._grids[size] = BoxGrid(size, q2.astype(np.float32), transfers)
        return self._grids[size]

    def _plan(self, size: int):
        plans = cast("dict[int, Any]", self._plans.__dict__)  # this thread's plans, by box size
        if size not in plans:
            plans[size] = finufft.Plan(
                1, (size, size), eps=NUFFT_EPS, isign=-1, modeord=1, nthreads=1, dtype="complex64"
            )
        return plans[size]

    def spectrum(self, o: int, ix: np.ndarray, iy: np.ndarray, origin: tuple[int, int], damage_b: float):
        """The object's projected potential (V·Å) on its box as Fourier coefficients (FFT order).

        ``ix``/``iy`` are every scene point's padded-grid pixel coordinates; ``origin`` the box's (row,
        column) on that grid.
        """
        scene = self.scene
        g = self._grids[self.sizes[o]]
        n = g.size
        damaged = undamaged = None
        for c in range(len(scene.channels)):
            lo, hi = scene.ranges[o, c], scene.ranges[o, c + 1]
            if hi <= lo:
                continue
            # radians across the box, folded by finufft into [−π, π)
            by = (iy[lo:hi] - np.float32(origin[0])) * np.float32(2 * math.pi / n)
            bx = (ix[lo:hi] - np.float32(origin[1])) * np.float32(2 * math.pi / n)
            plan = self._plan(n)
            plan.setpts(by, bx)
            s = plan.execute(scene.weights[lo:hi].astype(np.complex64))
            s *= g.transfers[c]
            if scene.channels[c].damaged:
                damaged = s if damaged is None else np.add(damaged, s, out=damaged)
            else:
                undamaged = s if undamaged is None else np.add(undamaged, s, out=undamaged)
        if damaged is not None and damage_b:
            damaged *= np.exp(np.float32(-damage_b / 4) * g.q2)
        parts = [x for x in (damaged, undamaged) if x is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def _origin(
        self, o: int, centre_px: tuple[float, float], shape: tuple[int, int]
    ) -> tuple[int, int] | None:
        """The (row, column) of object ``o``'s box centred on ``centre_px`` (x, y); None when off the grid."""
        n = self.sizes[o]
        y0, x0 = int(round(centre_px[1])) - n // 2, int(round(centre_px[0])) - n // 2
        if y0 >= shape[0] or x0 >= shape[1] or y0 + n <= 0 or x0 + n <= 0:
            return None
        return y0, x0

    def potential(self, o: int, ix, iy, origin: tuple[int, int], damage_b: float) -> np.ndarray | None:
        """The object's projected potential (V·Å, real) on its box."""
        spec = self.spectrum(o, ix, iy, origin, damage_b)
        return None if spec is None else sfft.ifft2(spec, overwrite_x=True, workers=1).real

    def add_projection(self, slab: np.ndarray, o: int, ix, iy, centre_px, damage_b: float) -> None:
        """Add object ``o``'s projected potential to ``slab`` (real, padded grid)."""
        origin = self._origin(o, centre_px, slab.shape)
        if origin is None:
            return
        box = self.potential(o, ix, iy, origin, damage_b)
        if box is not None:
            _paste(slab, box, origin, np.add)

    def multiply_transmission(
        self,
        slab: np.ndarray,
        o: int,
        ix,
        iy,
        centre_px,
        damage_b: float,
        wave: tuple[float, float, float],
        distance_A: float,
    ) -> None:
        """Multiply ``slab`` (a complex transmission, padded grid) by object ``o``'s: its thin-object
        transmission exp((i − f)σV) − 1, propagated ``distance_A`` from its own height to the slab's plane, + 1.

        ``wave`` = (σ, f_amp, wavelength). Exact for a lone object; where boxes overlap, the product of the
        two is the thin-slab approximation the multislice makes anyway.
        """
        origin = self._origin(o, centre_px, slab.shape)
        if origin is None:
            return
        v = self.potential(o, ix, iy, origin, damage_b)
        if v is None:
            return
        sigma, famp, wavelength = wave
        phase = np.float32(sigma) * v.astype(np.float32)
        change = np.empty(v.shape, np.complex64)
        amplitude = np.exp(-np.float32(famp) * phase)
        change.real = amplitude * np.cos(phase) - 1
        change.imag = amplitude * np.sin(phase)
        if distance_A:
            # the Fresnel propagator of physics.fresnel_propagator, exp(−iπλΔz q²), on the box
            angle = np.float32(-math.pi * wavelength * distance_A) * self._grids[self.sizes[o]].q2
            step = np.empty(angle.shape, np.complex64)
            step.real, step.imag = np.cos(angle), np.sin(angle)
            spectrum = sfft.fft2(change, overwrite_x=True, workers=1)
            spectrum *= step
            change = sfft.ifft2(spectrum, overwrite_x=True, workers=1)
        change += np.complex64(1)
        _paste(slab, change, origin, np.multiply)


def _paste(slab: np.ndarray, box: np.ndarray, origin: tuple[int, int], op) -> None:
    """slab[box's footprint] = op(slab, box), the box clipped to the grid."""
    y0, x0 = origin
    n = box.shape[0]
    my, mx = slab.shape
    ys, xs = slice(max(y0, 0), min(y0 + n, my)), slice(max(x0, 0), min(x0 + n, mx))
    view = slab[ys, xs]
    op(view, box[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0], out=view)
