"""A procedural thin-section TEM specimen (heavy-metal-stained brain tissue) over an unbounded plane.

The specimen is a pure function of a seed and of plane coordinates (pixels of about 4 nm): any window cut
from the plane shows the same pixels for the same region, so neighbouring tiles of a simulated montage
truly overlap (what neighbour matching and stitching are tested against).

What it looks like (sizes at 4 nm/px):

- neuropil: a mosaic of cell profiles (Voronoi cells of a jittered grid, ~0.6 µm) bounded by dark plasma
  membranes ~2–3 px wide; about a third of them are bundles of small axon profiles (~150 nm), a fifth
  are boutons full of synaptic vesicles, the rest dendrites with mitochondria; each profile has its own
  cytoplasm tone;
- mitochondria: dark ellipses (~100–250 × 200–500 nm) with a darker outer membrane and cristae;
- synaptic vesicles: round, ~32–44 nm (8–11 px), dark rim around a lighter lumen, packed in boutons;
- fine granular texture (ribosomes, glycogen, stain grain) at 2–4 px everywhere, inside compartments too,
  and 30–60 px mottling. As in real sections, a cell interior is not flat: after the optics its grain
  modulates the transmission by 8–9 % (median |local deviation|), near the shot noise of 100 e⁻/px
  (13 %), so a 50 px overlap strip holds detail to register wherever it falls and any 256² crop shows
  fine detail (the neighbour matcher and the focus score rely on that, on real tiles and here).

How it is computed (fast, and independent of the window):

- Everything is placed by hashing global integer lattice coordinates with the seed.
- Membranes and tones are evaluated on a coarse grid (one sample per 8 px, aligned to the plane) and
  brought to full resolution with OpenCV's bilinear ``resize`` by an integer factor, which maps a pixel to
  the same samples with the same weights wherever the block starts. Membranes come from the Worley
  distance ``(F2 − F1)/2`` (≈ distance to the nearest cell boundary) of two jittered grids (profiles,
  and small axons inside bundles), evaluated at gently warped positions so that membranes curve. Each is
  made *signed* with a four-colouring of its grid cells (one field signed by the cell's column parity,
  one by its row parity: every boundary flips at least one of them). A signed distance is smooth across
  a boundary, so bilinear upsampling keeps its zero crossing sharp; the dark profile ``exp(-(d/w)²)`` of
  the smallest ``|d|`` is applied at full resolution.
- Mitochondria are analytic sprites, combined by maximum (independent of drawing order).
- Vesicles and the fine grain are 1024² periodic textures made once per seed; vesicles show only inside
  boutons (a coarse mask), so their period never shows.
- Coordinates entering float32 arithmetic are relative to global grid corners, so a plane point's value is
  computed from identical numbers in every window: overlapping windows agree bit for bit.

The image is a transmission ``T = exp(-density)`` in (0, 1]: bright cytoplasm, dark stain. A window may
start at fractional coordinates (true stage positions are floats): the integer-lattice image is then
sampled bilinearly (``render``) — the value at a plane point still does not depend on the window.
Feature sizes are fixed in pixels (designed for ~4 nm/px); ``pixel_size_nm`` is recorded, not applied.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

COARSE = 8  # full-resolution pixels per coarse sample; coarse sample c sits at pixel COARSE*c + 3.5
_PROFILE_CELL = 160  # px, grid of the large cell profiles (multiple of COARSE)
_AXON_CELL = 40  # px, grid of the small axon profiles inside bundles (multiple of COARSE)
_JITTER = 0.85  # site jitter as a fraction of the grid cell
_MITO_CELL = 192  # px, at most one mitochondrion per cell of this grid
_VESICLE_CELL = 16  # px, at most one vesicle per cell of the vesicle texture's grid
_TEXTURE_PERIOD = 1024  # px, period of the grain and vesicle textures
_STRIP_ROWS = 256  # full-resolution rows assembled at a time (temporaries stay in cache)
_FAR = 64.0  # px, "no membrane near here"

# kinds of large profiles
_DENDRITE, _BUNDLE, _BOUTON = 0, 1, 2

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_M3 = np.uint64(0xBF58476D1CE4E5B9)
_M4 = np.uint64(0x94D049BB133111EB)


def _hash_uniform(ix: np.ndarray, iy: np.ndarray, key: int) -> np.ndarray:
    """Uniform [0, 1) float32 per integer lattice point (ix, iy broadcast): a pure function of (ix, iy, key)."""
    ix = np.asarray(ix, np.int64).astype(np.uint64)
    iy = np.asarray(iy, np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = (ix * _M1) ^ (iy * _M2) ^ np.uint64(key)
        h ^= h >> np.uint64(30)
        h *= _M3
        h ^= h >> np.uint64(27)
        h *= _M4
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


@dataclass(frozen=True)
class _Coarse:
    """Coarse fields over samples [cy0, cy0+h) x [cx0, cx0+w)."""

    cx0: int
    cy0: int
    membranes: tuple[np.ndarray, ...]  # signed distances to the membranes (px), one per layer and colouring
    tone: np.ndarray  # stain density of the cytoplasm
    boutons: np.ndarray  # 1 inside boutons (where vesicles are), else 0


class Specimen:
    """A deterministic stained-tissue section; ``render`` cuts any window out of the unbounded plane."""

    def __init__(self, seed: int = 0, pixel_size_nm: float = 4.0):
        self.seed = int(seed)
        self.pixel_size_nm = float(pixel_size_nm)

    def __repr__(self) -> str:
        return f"Specimen(seed={self.seed}, pixel_size_nm={self.pixel_size_nm:g})"

    # -- public ------------------------------------------------------------------------------------------

    def render(self, x0: float, y0: float, height: int, width: int) -> np.ndarray:
        """Transmission image (float32 in (0, 1]) of the window whose top-left pixel is at (x0, y0).

        ``x0``/``y0`` are plane coordinates in pixels (x = column, y = row) and may be fractional.
        """
        ix, iy = math.floor(x0), math.floor(y0)
        fx, fy = float(x0) - ix, float(y0) - iy
        if fx == 0.0 and fy == 0.0:
            return self.render_lattice(ix, iy, height, width)
        return bilinear_shift(self.render_lattice(ix, iy, height + 1, width + 1), fx, fy)

    def render_lattice(
        self, x0: int, y0: int, height: int, width: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The window at integer plane coordinates: the samples every other window is interpolated from.

        ``out`` (float32, ``(height, width)``) is filled in place when given, saving an allocation.
        """
        height, width, x0, y0 = int(height), int(width), int(x0), int(y0)
        if height <= 0 or width <= 0:
            raise ValueError(f"a specimen window must be at least 1x1 pixels, got {height}x{width}")
        if out is None:
            out = np.empty((height, width), np.float32)
        elif out.shape != (height, width) or out.dtype != np.float32:
            raise ValueError(
                f"out must be a float32 array of shape {(height, width)}, got {out.dtype} {out.shape}"
            )
        coarse = self._coarse(x0, y0, height, width)
        mitos = self._mitochondria(x0, y0, height, width)
        for a in range(0, height, _STRIP_ROWS):
            b = min(height, a + _STRIP_ROWS)
            self._assemble(out[a:b], coarse, mitos, x0, y0 + a)
        return out

    # -- sites -------------------------------------------------------------------------------------------

    def _key(self, layer: int) -> int:
        return (self.seed * 0x100000001B3 + layer * 0x9E3779B1 + 0x51ED270B) & 0xFFFFFFFFFFFFFFFF

    def _sites(self, layer: int, cell: int, gi: np.ndarray, gj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Site (px) of grid cells (gi, gj) of a jittered grid with spacing ``cell``."""
        k = self._key(layer)
        ux = _hash_uniform(gi, gj, k)
        uy = _hash_uniform(gi, gj, k + 1)
        sx = (gi + 0.5 + _JITTER * (ux - 0.5)) * cell
        sy = (gj + 0.5 + _JITTER * (uy - 0.5)) * cell
        return sx.astype(np.float64), sy.astype(np.float64)

    def _profile_kind(self, gi: np.ndarray, gj: np.ndarray) -> np.ndarray:
        u = _hash_uniform(gi, gj, self._key(1) + 7)
        return np.where(u < 0.33, _BUNDLE, np.where(u < 0.53, _BOUTON, _DENDRITE))

    def _nearest_profile(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grid cell (gi, gj) of the large profile nearest each point (ignoring the warp)."""
        c = _PROFILE_CELL
        bi, bj = np.floor(px / c).astype(np.int64), np.floor(py / c).astype(np.int64)
        best = np.full(px.shape, np.inf)
        gi, gj = bi.copy(), bj.copy()
        for oj in (-1, 0, 1):
            for oi in (-1, 0, 1):
                sx, sy = self._sites(1, c, bi + oi, bj + oj)
                d2 = (px - sx) ** 2 + (py - sy) ** 2
                closer = d2 < best
                best = np.where(closer, d2, best)
                gi, gj = np.where(closer, bi + oi, gi), np.where(closer, bj + oj, gj)
        return gi, gj

    # -- coarse fields -----------------------------------------------------------------------------------

    def _noise(self, layer: int, cell: int, cx0: int, cy0: int, ch: int, cw: int) -> np.ndarray:
        """Value noise (cubic) on coarse samples [cy0, cy0+ch) x [cx0, cx0+cw); lattice spacing ``cell``
        samples (a power of 2); roughly zero-mean, std ~0.35, within [-1, 1]."""
        kx0, ky0 = cx0 // cell - 2, cy0 // cell - 2
        nkx = (cx0 + cw - 1) // cell - kx0 + 3
        nky = (cy0 + ch - 1) // cell - ky0 + 3
        kx = np.arange(kx0, kx0 + nkx)
        ky = np.arange(ky0, ky0 + nky)
        lattice = _hash_uniform(kx[None, :], ky[:, None], self._key(layer)) * 2.0 - 1.0
        up = cv2.resize(lattice, (nkx * cell, nky * cell), interpolation=cv2.INTER_CUBIC)
        ox, oy = cx0 - kx0 * cell, cy0 - ky0 * cell
        return up[oy : oy + ch, ox : ox + cw]

    def _voronoi(self, layer: int, cell: int, px: np.ndarray, py: np.ndarray, ax0: int, ay0: int):
        """Worley fields of a jittered grid at the (warped) sample positions ``px``/``py`` (px, float64).

        The samples are coarse samples [ay0, ay0+h) x [ax0, ax0+w) with h, w and ax0, ay0 multiples of
        the grid's block (``cell // COARSE`` samples); the 3x3 grid cells around a sample's block are the
        candidates. Returns the membrane distance (F2 − F1)/2 (px), the column and row parity (+1/−1)
        of the nearest site's grid cell, and that cell's indices (gi, gj).
        """
        b = cell // COARSE
        h, w = px.shape
        nj, ni = h // b, w // b
        i0, j0 = ax0 // b, ay0 // b
        gi = np.arange(i0 - 1, i0 + ni + 1)
        gj = np.arange(j0 - 1, j0 + nj + 1)
        sx, sy = self._sites(layer, cell, gi[None, :], gj[:, None])  # (nj+2, ni+2)
        # float32 coordinates relative to each block's own corner (a global position, so a sample's
        # values do not depend on the window)
        corner_x = (np.arange(i0, i0 + ni) * cell).astype(np.float64)
        corner_y = (np.arange(j0, j0 + nj) * cell).astype(np.float64)
        P = (px.reshape(nj, b, ni, b) - corner_x[None, None, :, None]).astype(np.float32)
        Q = (py.reshape(nj, b, ni, b) - corner_y[:, None, None, None]).astype(np.float32)
        shape = P.shape
        f1 = np.full(shape, np.inf, np.float32)
        f2 = np.full(shape, np.inf, np.float32)
        best = np.zeros(shape, np.int8)
        d2 = np.empty(shape, np.float32)
        tmp = np.empty(shape, np.float32)
        closer = np.empty(shape, bool)
        for k in range(9):
            oj, oi = divmod(k, 3)
            csx = (sx[oj : oj + nj, oi : oi + ni] - corner_x[None, :]).astype(np.float32)
            csy = (sy[oj : oj + nj, oi : oi + ni] - corner_y[:, None]).astype(np.float32)
            np.subtract(P, csx[:, None, :, None], out=d2)
            np.multiply(d2, d2, out=d2)
            np.subtract(Q, csy[:, None, :, None], out=tmp)
            np.multiply(tmp, tmp, out=tmp)
            d2 += tmp
            np.less(d2, f1, out=closer)
            np.maximum(f1, d2, out=tmp)
            np.minimum(f2, tmp, out=f2)
            np.minimum(f1, d2, out=f1)
            np.copyto(best, k, where=closer)
        dist = ((np.sqrt(f2) - np.sqrt(f1)) * 0.5).reshape(h, w)
        best = best.reshape(h, w)
        bi = np.repeat(np.arange(i0, i0 + ni), b)[None, :] + (best % 3) - 1
        bj = np.repeat(np.arange(j0, j0 + nj), b)[:, None] + (best // 3) - 1
        col = np.where(bi % 2 == 0, 1.0, -1.0)
        row = np.where(bj % 2 == 0, 1.0, -1.0)
        return dist, col, row, bi, bj

    def _coarse(self, x0: int, y0: int, height: int, width: int) -> _Coarse:
        m = 2  # samples of margin for bilinear upsampling
        cx0, cy0 = x0 // COARSE - m, y0 // COARSE - m
        cx1 = (x0 + width - 1) // COARSE + m + 1
        cy1 = (y0 + height - 1) // COARSE + m + 1
        # the Voronoi grids need whole blocks: work on the window aligned to the large grid, crop at the end
        B = _PROFILE_CELL // COARSE
        ax0, ay0 = (cx0 // B) * B, (cy0 // B) * B
        aw, ah = -(-(cx1 - ax0) // B) * B, -(-(cy1 - ay0) // B) * B
        noise = functools.partial(self._noise, cx0=ax0, cy0=ay0, ch=ah, cw=aw)

        # the tissue is gently deformed (domain warp, px) so that membranes curve
        wx = 18.0 * noise(50, 16) + 4.0 * noise(52, 4)
        wy = 18.0 * noise(51, 16) + 4.0 * noise(53, 4)
        px = (np.arange(ax0, ax0 + aw) * COARSE + (COARSE - 1) / 2)[None, :] + wx.astype(np.float64)
        py = (np.arange(ay0, ay0 + ah) * COARSE + (COARSE - 1) / 2)[:, None] + wy.astype(np.float64)
        d1, col1, row1, gi, gj = self._voronoi(1, _PROFILE_CELL, px, py, ax0, ay0)
        # small profiles follow a weaker warp (their 3x3 candidate cells must still hold the nearest site)
        px2 = px - 0.7 * wx
        py2 = py - 0.7 * wy
        d2, col2, row2, ai, aj = self._voronoi(2, _AXON_CELL, px2, py2, ax0, ay0)

        kind = self._profile_kind(gi, gj)
        bundle = kind == _BUNDLE
        # the small profiles exist only inside bundles: elsewhere their distance is "far" (same sign, so
        # no zero crossing appears at the bundle's edge other than the large membrane itself)
        d2 = np.where(bundle, d2, _FAR)

        u_tone = _hash_uniform(gi, gj, self._key(1) + 11) - 0.5
        u_axon = _hash_uniform(ai, aj, self._key(2) + 11) - 0.5
        tone = (
            0.40
            + 0.18 * u_tone
            + np.where(bundle, 0.06 + 0.12 * u_axon, 0.0)
            + np.where(kind == _BOUTON, 0.06, 0.0)
            + 0.07 * noise(20, 4)  # 30–60 px mottling
            + 0.05 * noise(21, 64)  # section thickness / stain variation, ~1 µm
        )
        crop = (slice(cy0 - ay0, cy1 - ay0), slice(cx0 - ax0, cx1 - ax0))
        f32 = functools.partial(np.ascontiguousarray, dtype=np.float32)
        return _Coarse(
            cx0,
            cy0,
            membranes=(
                f32((d1 * col1)[crop]),
                f32((d1 * row1)[crop]),
                f32((d2 * col2)[crop]),
                f32((d2 * row2)[crop]),
            ),
            tone=f32(tone[crop]),
            boutons=f32((kind == _BOUTON)[crop]),
        )

    # -- full resolution ---------------------------------------------------------------------------------

    @staticmethod
    def _upsample(field: np.ndarray, c: _Coarse, x0: int, y0: int, h: int, w: int) -> np.ndarray:
        """Bilinear upsampling of a coarse field onto full-resolution pixels [y0, y0+h) x [x0, x0+w)."""
        sx0 = x0 // COARSE - 1
        sy0 = y0 // COARSE - 1
        sx1 = (x0 + w - 1) // COARSE + 2
        sy1 = (y0 + h - 1) // COARSE + 2
        block = field[sy0 - c.cy0 : sy1 - c.cy0, sx0 - c.cx0 : sx1 - c.cx0]
        up = cv2.resize(block, ((sx1 - sx0) * COARSE, (sy1 - sy0) * COARSE), interpolation=cv2.INTER_LINEAR)
        ox, oy = x0 - sx0 * COARSE, y0 - sy0 * COARSE
        return up[oy : oy + h, ox : ox + w]

    def _assemble(
        self,
        out: np.ndarray,
        c: _Coarse,
        mitos: list[_Mito],
        x0: int,
        y0: int,
    ) -> None:
        h, w = out.shape
        up = functools.partial(self._upsample, c=c, x0=x0, y0=y0, h=h, w=w)
        d = np.abs(up(c.membranes[0]))
        for field in c.membranes[1:]:
            np.minimum(d, np.abs(up(field)), out=d)
        # plasma membrane profile exp(-(d/1.4)²)
        np.multiply(d, d, out=d)
        np.multiply(d, np.float32(-1.0 / 1.4**2), out=d)
        np.exp(d, out=d)
        np.multiply(d, np.float32(0.95), out=out)
        out += up(c.tone)
        _periodic(np.add, out, self._grain(), x0, y0)
        vesicles = up(c.boutons)
        _periodic(np.multiply, vesicles, self._vesicle_texture(), x0, y0)
        out += vesicles
        _draw_mitochondria(out, mitos, x0, y0)
        np.negative(out, out=out)
        np.exp(out, out=out)
        np.minimum(out, np.float32(1.0), out=out)

    @functools.cache  # noqa: B019 - a handful of specimens per process, 4 MB each
    def _grain(self) -> np.ndarray:
        """Periodic fine grain (stain density): blurred white noise plus sparse dark granules."""
        rng = np.random.default_rng([self.seed, 0x6A41])
        p, pad = _TEXTURE_PERIOD, 8
        white = rng.standard_normal((p, p), dtype=np.float32)
        fine: np.ndarray = cv2.GaussianBlur(np.pad(white, pad, mode="wrap"), (0, 0), 1.0)[pad:-pad, pad:-pad]
        fine *= np.float32(0.12 / max(float(fine.std()), 1e-6))
        granules = (rng.random((p, p)) < 0.003).astype(np.float32)
        dots: np.ndarray = cv2.GaussianBlur(np.pad(granules, pad, mode="wrap"), (0, 0), 1.0)[
            pad:-pad, pad:-pad
        ]
        dots *= np.float32(0.6 / max(float(dots.max()), 1e-6))
        return np.ascontiguousarray(fine + dots)

    @functools.cache  # noqa: B019
    def _vesicle_texture(self) -> np.ndarray:
        """Periodic texture (stain density) of packed synaptic vesicles, shown inside boutons."""
        rng = np.random.default_rng([self.seed, 0x7E51])
        p, g = _TEXTURE_PERIOD, _VESICLE_CELL
        n = p // g
        gy, gx = np.divmod(np.flatnonzero(rng.random(n * n) < 0.8), n)
        radius = 4.0 + 1.5 * rng.random(gx.size)
        cx = gx * g + 3.0 + rng.random(gx.size) * (g - 6.0)
        cy = gy * g + 3.0 + rng.random(gx.size) * (g - 6.0)
        box = np.arange(-8, 9)
        bx = np.floor(cx).astype(np.int64)[:, None, None] + box[None, None, :]
        by = np.floor(cy).astype(np.int64)[:, None, None] + box[None, :, None]
        r = np.sqrt((bx - cx[:, None, None]) ** 2 + (by - cy[:, None, None]) ** 2)
        rr = radius[:, None, None]
        rim = 0.55 * np.exp(-(((r - rr) / 1.1) ** 2))
        lumen = -0.08 * np.clip(rr - 1.5 - r, 0.0, 1.0)
        bx, by = np.broadcast_to(bx % p, r.shape), np.broadcast_to(by % p, r.shape)
        dark = np.zeros((p, p))
        light = np.zeros((p, p))
        np.maximum.at(dark, (by, bx), rim)
        np.minimum.at(light, (by, bx), lumen)
        return np.ascontiguousarray(dark + light, dtype=np.float32)

    def _mitochondria(self, x0: int, y0: int, h: int, w: int) -> list[_Mito]:
        """The mitochondria reaching into the window: at most one per cell of a jittered grid, in dendrites."""
        g = _MITO_CELL
        reach = _MITO_REACH
        gx = np.arange((x0 - reach) // g, (x0 + w + reach) // g + 1)
        gy = np.arange((y0 - reach) // g, (y0 + h + reach) // g + 1)
        gxx, gyy = (a.ravel() for a in np.meshgrid(gx, gy))
        key = self._key(30)
        cx = (gxx + _hash_uniform(gxx, gyy, key).astype(np.float64)) * g
        cy = (gyy + _hash_uniform(gxx, gyy, key + 1).astype(np.float64)) * g
        pi, pj = self._nearest_profile(cx, cy)
        present = (self._profile_kind(pi, pj) == _DENDRITE) & (_hash_uniform(gxx, gyy, key + 2) < 0.5)
        mitos = []
        for i in np.flatnonzero(present):
            a = 40.0 + 60.0 * float(_hash_uniform(gxx[i], gyy[i], key + 3))  # semi-major axis, px
            b = 20.0 + 16.0 * float(_hash_uniform(gxx[i], gyy[i], key + 4))  # semi-minor axis, px
            theta = math.pi * float(_hash_uniform(gxx[i], gyy[i], key + 5))
            mito = _Mito(float(cx[i]), float(cy[i]), a, b, theta)
            xa, xb, ya, yb = mito.box()
            if xa < x0 + w and xb > x0 and ya < y0 + h and yb > y0:
                mitos.append(mito)
        return mitos


@dataclass(frozen=True)
class _Mito:
    cx: float
    cy: float
    a: float  # semi-major axis, px
    b: float  # semi-minor axis, px
    theta: float  # orientation of the major axis, rad

    def box(self) -> tuple[int, int, int, int]:
        """Pixel bounding box [xa, xb) x [ya, yb) of the drawn density."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        hx = math.hypot(self.a * c, self.b * s) + 5
        hy = math.hypot(self.a * s, self.b * c) + 5
        return (
            math.floor(self.cx - hx),
            math.ceil(self.cx + hx) + 1,
            math.floor(self.cy - hy),
            math.ceil(self.cy + hy) + 1,
        )


_MITO_REACH = 130  # px: no mitochondrion's box extends further than this from its centre


def _draw_mitochondria(density: np.ndarray, mitos: list[_Mito], x0: int, y0: int) -> None:
    """Add the mitochondria's stain density to rows [y0, y0+h) (overlaps combine by maximum)."""
    h, w = density.shape
    extra = None
    for mito in mitos:
        xa, xb, ya, yb = mito.box()
        xa, xb, ya, yb = max(xa, x0), min(xb, x0 + w), max(ya, y0), min(yb, y0 + h)
        if xa >= xb or ya >= yb:
            continue
        # offsets from the centre, exact in float32 far from the plane's origin too
        fx, fy = math.floor(mito.cx), math.floor(mito.cy)
        X = (np.arange(xa - fx, xb - fx, dtype=np.float32) - np.float32(mito.cx - fx))[None, :]
        Y = (np.arange(ya - fy, yb - fy, dtype=np.float32) - np.float32(mito.cy - fy))[:, None]
        ct, st = np.float32(math.cos(mito.theta)), np.float32(math.sin(mito.theta))
        u = X * ct + Y * st  # along the major axis
        v = Y * ct - X * st
        q = np.sqrt((u / np.float32(mito.a)) ** 2 + (v / np.float32(mito.b)) ** 2)
        edge = (q - 1.0) * np.float32(mito.b)  # ~signed distance to the outline, px
        inside = np.clip(edge * np.float32(-1 / 1.5), 0.0, 1.0)
        cristae = 0.5 + 0.5 * np.cos(u * np.float32(2 * math.pi / 22.0) + np.float32(0.2) * v)
        depth = np.clip(edge * np.float32(-1 / 6.0), 0.0, 1.0)
        dens = 0.9 * np.exp(-((edge * np.float32(1 / 1.8)) ** 2)) + inside * (0.30 + 0.40 * cristae * depth)
        if extra is None:
            extra = np.zeros((h, w), np.float32)
        view = extra[ya - y0 : yb - y0, xa - x0 : xb - x0]
        np.maximum(view, dens, out=view)
    if extra is not None:
        density += extra


def _runs(start: int, length: int, period: int) -> list[tuple[int, int, int]]:
    """Split [start, start+length) into runs inside one period: (destination offset, source start, size)."""
    runs, done = [], 0
    while done < length:
        src = (start + done) % period
        size = min(period - src, length - done)
        runs.append((done, src, size))
        done += size
    return runs


def _periodic(op, target: np.ndarray, texture: np.ndarray, x0: int, y0: int) -> None:
    """``op(target, texture tiled over the plane, out=target)`` for a target whose top-left is (x0, y0)."""
    h, w = target.shape
    period = texture.shape[0]
    for dy, sy, ny in _runs(y0, h, period):
        for dx, sx, nx in _runs(x0, w, period):
            view = target[dy : dy + ny, dx : dx + nx]
            op(view, texture[sy : sy + ny, sx : sx + nx], out=view)


def bilinear_shift(image: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """Sample ``image`` at (x + fx, y + fy) for 0 ≤ fx, fy < 1; the result is one pixel smaller each way.

    A two-tap separable filter: each output pixel depends only on its 2x2 input neighbourhood, so the
    result does not depend on where the image was cut from either.
    """
    kx = np.array([[1.0 - fx], [fx]], np.float32)
    ky = np.array([[1.0 - fy], [fy]], np.float32)
    out = cv2.sepFilter2D(image, cv2.CV_32F, kx, ky, anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)
    return out[:-1, :-1]
