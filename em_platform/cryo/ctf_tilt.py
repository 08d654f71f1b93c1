"""Power spectra of a tilted view whose Thon rings all sit where the tilt axis's defocus puts them.

A tilted specimen's defocus changes across the image, Δf(x') = Δf − x'·tan θ (x' in Å across the tilt axis,
the ground truth's convention): at 60° and 4 Å/px a 2048² view spans ±5300 Å about its axis's 3 µm. A plain
average of every tile's spectrum smears the rings (each tile's sit at its own defocus); keeping only the
tiles near the axis (ctfplotter's central strip) keeps the rings sharp but throws most of the electrons
away: at 60° one row of tiles in seven, which at 3 e/Å² left the defocus of high tilts 1–2 % off.

So every tile is used, as CTFFIND's tilt mode, Warp and ctfplotter's strips do in their own ways: tiles are
grouped by their defocus offset δ from the axis, and each group's spectrum is resampled radially so that
a ring of phase χ at Δf + δ lands where the same phase lies at Δf (k'² solves χ_Δf(k') = χ_{Δf+δ}(k), Cs
included); the resampled spectra then add up as if the whole view were at the axis's defocus. The
resampling needs Δf, which is what is being estimated: an estimate off by ε moves each group's rings by
ε·δ/Δf, in opposite directions on the two sides of the axis, so the sum stays centred and a second pass at
the new estimate removes the smear. Astigmatism is left out of the resampling: at 1000 Å of it the ring
position error is δ·Δ/(2Δf²), a few hundredths of a radian at the fit band's edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from em_platform.cryo.optics import Microscope
from em_platform.lazy_import import LazyModule

ndimage = LazyModule("scipy.ndimage")


@dataclass(frozen=True)
class TiltedView:
    """The geometry of a tilted view: its defocus at a point is the axis's plus :meth:`defocus_offsets_A`.

    ``tolerance_A``: the defocus spread the tiles of the near-axis spectrum may have (the first estimate,
    before the resampling); at least ``min_tiles`` of them."""

    angle_deg: float
    axis_deg: float  # tilt axis, counter-clockwise from image +y
    tolerance_A: float = 1500.0
    min_tiles: int = 4
    resample: bool = True  # False: the near-axis tiles only (ctfplotter's central strip)

    def signed_offsets_A(
        self, centres_xy: np.ndarray, image_centre: np.ndarray, pixel_A: float
    ) -> np.ndarray:
        """Δf(point) − Δf(axis) = −x'·tan θ, x' the distance across the axis (x' = x cos φ + y sin φ)."""
        phi = math.radians(self.axis_deg)
        across = (np.asarray(centres_xy, float) - image_centre) @ np.array([math.cos(phi), math.sin(phi)])
        return -across * pixel_A * math.tan(math.radians(self.angle_deg))

    def defocus_offsets_A(
        self, centres_xy: np.ndarray, image_centre: np.ndarray, pixel_A: float
    ) -> np.ndarray:
        """|Δf(point) − Δf(axis)|."""
        return np.abs(self.signed_offsets_A(centres_xy, image_centre, pixel_A))


def _taper(n: int, fraction: float = 0.1) -> np.ndarray:
    """A 1-D window, 1 in the middle and a cosine edge over ``fraction`` of each side."""
    w = np.ones(n, np.float32)
    m = max(1, int(n * fraction))
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(m) + 0.5) / m)
    w[:m], w[-m:] = ramp, ramp[::-1]
    return w


def tile_corners(shape: tuple[int, int], box: int) -> np.ndarray:
    """(row, column) of every ``box``² tile at 50 % overlap."""
    ny, nx = shape
    step = box // 2
    return np.array([(y, x) for y in range(0, ny - box + 1, step) for x in range(0, nx - box + 1, step)])


def tile_power_sum(image: np.ndarray, corners: np.ndarray, box: int) -> np.ndarray:
    """Σ |FFT|² of the tapered, mean-subtracted tiles at ``corners`` (unshifted layout, float64)."""
    window = np.outer(_taper(box), _taper(box))
    total = np.zeros((box, box), np.float64)
    for start in range(0, len(corners), 8):
        tiles = np.stack([image[y : y + box, x : x + box] for y, x in corners[start : start + 8]])
        tiles = tiles - tiles.mean(axis=(1, 2), keepdims=True)
        spec = np.fft.fft2(tiles * window)
        total += (spec.real**2 + spec.imag**2).sum(axis=0)
    return total


@dataclass
class TiltedSpectra:
    """A tilted view's tile spectra summed per defocus offset: ``sums[i]`` holds ``counts[i]`` tiles whose
    defocus is the axis's + ``offsets_A[i]`` (their mean offset)."""

    offsets_A: np.ndarray
    counts: np.ndarray
    sums: np.ndarray  # (groups, box, box) float32
    pixel_A: float

    def near_axis(self, tolerance_A: float, min_tiles: int) -> np.ndarray:
        """The mean spectrum of the groups within ``tolerance_A`` of the axis (at least ``min_tiles``
        tiles, the nearest groups first): sharp rings from a part of the view."""
        order = np.argsort(np.abs(self.offsets_A), kind="stable")
        total, n = np.zeros(self.sums.shape[1:], np.float64), 0
        for i in order:
            if n >= min_tiles and abs(self.offsets_A[i]) > tolerance_A:
                break
            total += self.sums[i]
            n += int(self.counts[i])
        return total / max(n, 1)

    def at_axis_defocus(self, defocus_A: float, scope: Microscope) -> np.ndarray:
        """The mean spectrum of every tile, each group resampled so its rings sit where the axis's defocus
        ``defocus_A`` puts them (:func:`resample_to_defocus`); a frequency that a group's resampling takes
        from beyond Nyquist is averaged over the other groups only."""
        total = np.zeros(self.sums.shape[1:], np.float64)
        weight = np.zeros(self.sums.shape[1:], np.float64)
        for offset, count, s in zip(self.offsets_A, self.counts, self.sums, strict=True):
            power, inside = resample_to_defocus(s, self.pixel_A, defocus_A + offset, defocus_A, scope)
            total += power * inside
            weight += count * inside
        return total / np.maximum(weight, 1)


def tilted_spectra(
    image: np.ndarray, box: int, tilt: TiltedView, pixel_A: float, group_A: float | None = None
) -> TiltedSpectra:
    """Every tile's power spectrum, summed in groups of tiles whose defocus offsets lie within ``group_A``
    of each other (default a third of the view's tolerance: the rings of one group then differ by less
    than the defocus spread inside one tile at any tilt worth resampling)."""
    image = np.asarray(image, np.float32)
    ny, nx = image.shape
    box = min(box, ny, nx)
    corners = tile_corners((ny, nx), box)
    centres = corners[:, ::-1] + box / 2
    offsets = tilt.signed_offsets_A(centres, np.array([nx / 2, ny / 2]), pixel_A)
    group_A = group_A or tilt.tolerance_A / 3
    keys = np.rint(offsets / group_A).astype(np.int64)
    groups = np.unique(keys)
    sums = np.empty((len(groups), box, box), np.float32)
    mean_offsets, counts = np.empty(len(groups)), np.empty(len(groups), np.int64)
    for j, g in enumerate(groups):
        sel = keys == g
        sums[j] = tile_power_sum(image, corners[sel], box)
        mean_offsets[j], counts[j] = offsets[sel].mean(), sel.sum()
    return TiltedSpectra(mean_offsets, counts, sums, pixel_A)


def resample_to_defocus(
    power: np.ndarray, pixel_A: float, from_defocus_A: float, to_defocus_A: float, scope: Microscope
) -> tuple[np.ndarray, np.ndarray]:
    """``power`` (unshifted layout) of a tile at ``from_defocus_A``, resampled radially so each ring sits at
    the frequency where ``to_defocus_A`` gives it the same aberration phase: output k' takes the input at k
    with πλΔf_from·k² − ½πCsλ³k⁴ = πλΔf_to·k'² − ½πCsλ³k'⁴ (linear interpolation). Returns the resampled
    power and where its source lay inside Nyquist (elsewhere it is not data)."""
    n_y, n_x = power.shape
    fy = np.fft.fftfreq(n_y)[:, None]
    fx = np.fft.fftfreq(n_x)[None, :]
    k2 = (fy / pixel_A) ** 2 + (fx / pixel_A) ** 2  # k'², 1/Å²
    lam = scope.wavelength_A
    c = 0.5 * math.pi * scope.cs_mm * 1e7 * lam**3
    b = math.pi * lam * from_defocus_A
    phase = math.pi * lam * to_defocus_A * k2 - c * k2 * k2  # χ_to(k'), without the constant
    # c·u² − b·u + phase = 0 for u = k², the root near phase/b (the stable form of the smaller root)
    u = 2 * phase / (b + np.sqrt(np.maximum(b * b - 4 * c * phase, 0.0)))
    scale = np.sqrt(np.maximum(u, 0.0) / np.where(k2 > 0, k2, 1.0))
    scale[0, 0] = 1.0
    sy, sx = fy * scale, fx * scale  # source frequency, cycles per pixel
    inside = (np.abs(sy) <= 0.5) & (np.abs(sx) <= 0.5)
    coords = np.stack([sy * n_y, sx * n_x])
    resampled = ndimage.map_coordinates(np.asarray(power, np.float64), coords, order=1, mode="grid-wrap")
    return resampled, inside
