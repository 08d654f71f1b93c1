"""Coarse registration of two neighbouring tiles over the whole overlap and beyond: the fallback when the
fine patch search finds no peak (the stage put the tile further off than its window).

Masked normalised cross-correlation (Padfield 2012, "Masked object registration in the Fourier domain")
of the tile's edge region against the neighbour's, for every relative placement within ``bound_px`` of
the expected one: six FFT correlations give, per shift, the NCC over exactly the pixels the two regions
share there, so a shift that leaves a thin overlap is judged on that overlap alone. Both regions are
block-averaged first (``downsample``: the coarse step), and high-passed (a difference of Gaussians) so
vignetting, gain and smooth tone do not correlate.

**Peak test.** NCC over ``N`` shared pixels scatters about ``1/√N`` under no match, so each shift is
scored ``NCC·√N`` (a significance, not favouring thin overlaps); the best shift is accepted when its
score stands out of the scores of all the other allowed shifts by ``min_z`` robust standard deviations
(median and MAD, the peak's neighbourhood left out) and its NCC reaches ``min_ncc``. Unrelated or blank
strips score z ≈ 3–6; a real overlap, even 16 px thin, 15–60.

The convention is :func:`~em_platform.tem.matching.match_neighbour`'s: ``dX, dY`` is the tile's true
place minus its nominal one (the neighbour's extent minus ``overlap_px`` away across the shared edge).
Dagster-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

__all__ = ["CoarseMatch", "coarse_offset"]

MIN_Z = 9.0
MIN_NCC = 0.1
_EXCLUDE = 2  # half-width (coarse px) of the peak's neighbourhood left out of the null statistics


@dataclass(frozen=True)
class CoarseMatch:
    dX: float
    dY: float
    ncc: float  # normalised cross-correlation at the peak
    z: float  # how far the peak's score stands out (robust standard deviations)
    shared_px: int  # pixels the two regions share at the peak (full resolution)
    downsample: int


def _prepare(region: np.ndarray, f: int, highpass: bool) -> np.ndarray:
    """Block-average by ``f`` and high-pass (for the search); for a final measurement the pixels as they
    are: a filter treats a tile's own border unlike the neighbour's interior and biases the offset across
    the edge (0.02–0.03 px per edge, which adds up over a row of tiles), while NCC over the shared pixels
    already ignores their gain and offset."""
    img = region.astype(np.float32)
    if f > 1:
        h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
        img = img[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    if not highpass:
        return img
    fine = cv2.GaussianBlur(img, (0, 0), 0.7)
    return fine - cv2.GaussianBlur(img, (0, 0), 6.0)


def _ncc_surface(
    t: np.ndarray, q: np.ndarray, sy: np.ndarray, sx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """NCC and shared-pixel count of ``t`` placed at offsets ``(sy, sx)`` (all pairs of the two ranges)
    in ``q``: ``t[y, x]`` over ``q[y + sy, x + sx]``.

    Only the cross term needs FFTs; the sums over each shared rectangle come from integral images."""
    from scipy import fft

    ht, wt = t.shape
    hq, wq = q.shape
    shape = (ht + hq - 1, wt + wq - 1)
    size = [fft.next_fast_len(s, real=True) for s in shape]
    t64, q64 = t.astype(np.float64), q.astype(np.float64)
    full = fft.irfft2(
        np.conj(fft.rfft2(t64, size, workers=1)) * fft.rfft2(q64, size, workers=1), size, workers=1
    )
    stq = full[np.mod(sy, size[0])[:, None], np.mod(sx, size[1])[None, :]]  # negative shifts wrap
    # the shared rectangle per shift, in t's coordinates (q's are these plus the shift)
    y0, y1 = np.maximum(0, -sy), np.minimum(ht, hq - sy)
    x0, x1 = np.maximum(0, -sx), np.minimum(wt, wq - sx)

    def boxes(image: np.ndarray, ya, yb, xa, xb) -> tuple[np.ndarray, np.ndarray]:
        """Sums of the pixels and of their squares over each rectangle, from OpenCV's integral images
        (zero first row and column, as the rectangle arithmetic needs; 7x numpy's two cumsums)."""
        ii, ii2 = cv2.integral2(image, sdepth=cv2.CV_64F, sqdepth=cv2.CV_64F)
        ya, yb, xa, xb = ya[:, None], yb[:, None], xa[None, :], xb[None, :]
        return tuple(s[yb, xb] - s[ya, xb] - s[yb, xa] + s[ya, xa] for s in (ii, ii2))

    n = np.maximum(y1 - y0, 0)[:, None] * np.maximum(x1 - x0, 0)[None, :]
    st, stt = boxes(t64, y0, y1, x0, x1)
    sq, sqq = boxes(q64, y0 + sy, y1 + sy, x0 + sx, x1 + sx)
    with np.errstate(divide="ignore", invalid="ignore"):
        nn = np.maximum(n, 1)
        num = stq - st * sq / nn
        den = (stt - st * st / nn) * (sqq - sq * sq / nn)
        ncc = np.where((n > 0) & (den > 1e-12), num / np.sqrt(np.maximum(den, 1e-12)), 0.0)
    return np.clip(ncc, -1, 1), n.astype(np.float64)


def coarse_offset(
    tile_region: np.ndarray,
    neighbour_region: np.ndarray,
    position: Literal["top", "left"],
    overlap_px: int,
    neighbour_extent: int,
    *,
    bound_px: float,
    expected: tuple[float, float] = (0.0, 0.0),
    min_shared_across_px: int = 8,
    downsample: int | None = None,
    min_z: float = MIN_Z,
    min_ncc: float = MIN_NCC,
    highpass: bool = True,
) -> CoarseMatch | None:
    """Where the tile sits against its ``position`` neighbour, searched within ``bound_px`` of ``expected``
    (``dX, dY`` from nominal); None when no shift passes the peak test.

    ``tile_region`` is the tile's first rows ("top") or columns ("left"), as deep as the search needs
    (``overlap_px + bound_px`` plus any expected shift across); ``neighbour_region`` the neighbour's last
    ones, equally deep; ``neighbour_extent`` is the neighbour's full height ("top") or width ("left").
    A placement leaving less than ``min_shared_across_px`` of overlap across the edge is not considered.
    ``highpass`` False measures on the raw pixels (the final, full-resolution measurement: unbiased).
    """
    t = np.asarray(tile_region)
    q = np.asarray(neighbour_region)
    if t.ndim != 2 or q.ndim != 2:
        raise ValueError("coarse_offset needs 2-D edge regions")
    if position == "top":  # orient as a left neighbour: across = columns
        t, q = t.T, q.T
        e_across, e_along = expected[1], expected[0]
    elif position == "left":
        e_across, e_along = expected
    else:
        raise ValueError(f"position must be 'top' or 'left', got {position!r}")
    length = min(t.shape[0], q.shape[0])
    f = downsample or max(1, min(4, math.ceil(length / 512)))
    tc, qc = _prepare(t, f, highpass), _prepare(q, f, highpass)
    ht, wt = tc.shape
    hq, wq = qc.shape
    d_q = q.shape[1]  # full-resolution depth of the neighbour region
    # shift (coarse px) ↔ offset from nominal: sx·f = D_q − overlap + dX, sy·f = dY; only the allowed ones
    lo_y, hi_y = math.floor((e_along - bound_px) / f), math.ceil((e_along + bound_px) / f)
    base = d_q - overlap_px + e_across
    lo_x, hi_x = math.floor((base - bound_px) / f), math.ceil((base + bound_px) / f)
    sy_c = np.arange(max(lo_y, -(ht - 1)), min(hi_y, hq - 1) + 1)
    sx_c = np.arange(max(lo_x, -(wt - 1)), min(hi_x, wq - 1) + 1)
    if len(sy_c) < 3 or len(sx_c) < 3:
        return None
    ncc, n = _ncc_surface(tc, qc, sy_c, sx_c)
    sy, sx = sy_c * f, sx_c * f
    d_x = sx - (d_q - overlap_px)
    shared_across = d_q - sx  # how much of the neighbour region lies right of the tile's left edge
    allowed = (
        (np.abs(sy - e_along) <= bound_px)[:, None]
        & (np.abs(d_x - e_across) <= bound_px)[None, :]
        & (shared_across >= min_shared_across_px)[None, :]
        & (n * f * f >= min_shared_across_px * max(32, length // 4))
    )
    if allowed.sum() < 16:
        return None
    score = np.where(allowed, ncc * np.sqrt(np.maximum(n, 1)), -np.inf)
    iy, ix = np.unravel_index(int(np.argmax(score)), score.shape)
    peak = score[iy, ix]
    null = allowed.copy()
    null[max(0, iy - _EXCLUDE) : iy + _EXCLUDE + 1, max(0, ix - _EXCLUDE) : ix + _EXCLUDE + 1] = False
    values = score[null]
    if values.size < 8:
        return None
    med = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - med)))
    z = (peak - med) / spread if spread > 0 else 0.0
    if z < min_z or ncc[iy, ix] < min_ncc:
        return None
    # NCC: the score tilts with N
    dx_sub, dy_sub = _subpixel(np.where(allowed, ncc, -np.inf), int(ix), int(iy))
    d_across = float(d_x[ix] + dx_sub * f)
    d_along = float(sy[iy] + dy_sub * f)
    dX, dY = (d_across, d_along) if position == "left" else (d_along, d_across)
    return CoarseMatch(dX, dY, float(ncc[iy, ix]), float(z), int(n[iy, ix] * f * f), f)


def _subpixel(surface: np.ndarray, x: int, y: int) -> tuple[float, float]:
    """Separable parabola through the peak and its finite neighbours (0 where one is missing)."""

    def vertex(a: float, m: float, b: float) -> float:
        if not (np.isfinite(a) and np.isfinite(b)):
            return 0.0
        den = a - 2 * m + b
        return float(np.clip(0.5 * (a - b) / den, -0.5, 0.5)) if den < 0 else 0.0

    h, w = surface.shape
    ox = vertex(surface[y, x - 1], surface[y, x], surface[y, x + 1]) if 0 < x < w - 1 else 0.0
    oy = vertex(surface[y - 1, x], surface[y, x], surface[y + 1, x]) if 0 < y < h - 1 else 0.0
    return ox, oy


def refine_offset(
    tile_region: np.ndarray,
    neighbour_region: np.ndarray,
    position: Literal["top", "left"],
    overlap_px: int,
    *,
    expected: tuple[float, float],
    radius: int = 3,
) -> tuple[float, float, float] | None:
    """The offset near ``expected`` (a coarse result) at full resolution: one template as long as the edge
    and as wide as the shared strip allows, fixed for every shift tried (NCC over a shared region that
    changes with the shift leans toward the larger overlaps), sub-pixel by a parabola through the peak.
    Returns ``(dX, dY, ncc)`` or None when the strip leaves no room or the peak sits on the window's rim."""
    t, q = np.asarray(tile_region, np.float32), np.asarray(neighbour_region, np.float32)
    if position == "top":
        t, q = t.T, q.T
        e_across, e_along = expected[1], expected[0]
    else:
        e_across, e_along = expected
    ea, el = round(e_across), round(e_along)
    shared = overlap_px - ea  # the strip the tiles share at the expected place
    # inside the shared strip, with room for the window's ± radius before the neighbour region ends
    width = min(shared - radius - 2, t.shape[1] - 1)
    if width < 4:
        return None
    length = min(t.shape[0], q.shape[0])
    y0 = radius + max(0, -el) + 1
    y1 = length - radius - max(0, el) - 1
    if y1 - y0 < 16:
        return None
    x0 = 1
    template = np.ascontiguousarray(t[y0:y1, x0 : x0 + width])
    d_q = q.shape[1]
    qx = x0 + d_q - overlap_px + ea - radius  # where the template sits in q at the expected place, − radius
    qy = y0 + el - radius
    if qx < 0 or qy < 0 or qx + width + 2 * radius > d_q or qy + (y1 - y0) + 2 * radius > q.shape[0]:
        return None
    window = np.ascontiguousarray(q[qy : qy + (y1 - y0) + 2 * radius, qx : qx + width + 2 * radius])
    r = cv2.matchTemplate(window, template, cv2.TM_CCOEFF_NORMED)
    r = np.nan_to_num(r, nan=-1.0)
    _, peak, _, (ix, iy) = cv2.minMaxLoc(r)
    if not (0 < ix < r.shape[1] - 1 and 0 < iy < r.shape[0] - 1):
        return None
    ox, oy = _subpixel(r, ix, iy)
    d_across = ea + ix - radius + ox
    d_along = el + iy - radius + oy
    dX, dY = (d_across, d_along) if position == "left" else (d_along, d_across)
    return float(dX), float(dY), float(peak)
