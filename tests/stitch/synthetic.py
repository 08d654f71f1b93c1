"""Hard synthetic montages with known truth: what real serial-section EM throws at a stitcher.

Tiles are cut from the procedural TEM specimen (:mod:`em_platform.simulation.specimen`; one 2048² window
of it repeated over the plane, so a tile costs a resampling, not a specimen evaluation) at true poses a
stitcher must recover, under the conditions of issue 14 (each can be switched off):

* **stage error**: the layout (what the stage reported) is off from the truth by up to ``stage_error`` ×
  the overlap per axis (uniform), optionally with a stage frame that disagrees with the images in scale
  and rotation (``stage_scale``, ``stage_rotation_deg``: a miscalibrated pixel size or stage axis);
* **camera**: per-tile vignetting (a quadratic fall-off, its centre off by a few percent) and gain, shot
  noise at ``dose`` electrons per bright pixel (Poisson, in its normal approximation), uint16 counts;
* **specimen**: ``blank`` tiles of bare resin (no section: flat tone and noise), a ``low_texture`` region
  where the stain's contrast is ``low_texture_contrast`` of normal, ``missing`` tiles (in the layout, no
  file), a forced ``tear``: from grid row ``tear[0]`` on, the section piece moved by ``tear[1]`` px between
  the acquisition of rows, so no overlap across that line agrees with the stage;
* **optics**: a per-tile rotation (uniform ±``rotation_deg``, about the tile centre) and a lens distortion
  shared by every tile (:class:`~em_platform.stitch.lens.LensModel`): recorded pixel ``x`` shows the
  specimen point of undistorted tile pixel ``x + D(x)``.

The truth per tile is a 2×3 affine ``[A | t]`` from *undistorted* tile pixels to the specimen plane (px):
``X = A·u + t``. Positions compared with a stitcher's are those transforms' top-left corners ``t`` (the
common translation removed by the comparison). Dagster-free; used by tests and ``bench/bench_montage.py``.

:meth:`HardMontage.point_matches` gives the point matches a feature matcher (SIFT, template matching)
would return for the montage, straight from the true transforms, without rendering a pixel: specimen
points spread over each overlap, seen by both tiles, with noise per point and a fraction of wrong pairs.
A montage of thousands of tiles of any size then costs seconds (the solve, not the matching, under test).
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from em_platform.simulation.specimen import Specimen
from em_platform.stitch.layout import PointEdge
from em_platform.stitch.lens import LensModel

__all__ = ["HardMontage", "HardMontageConfig", "PointMatches", "SyntheticTile", "make_montage", "tile_name"]

GridPosition = tuple[int, int]
RESIN = 0.82  # transmission of bare resin (no section)
ORIGIN = 4096.0  # plane coordinates of tile (0, 0)'s nominal corner
PERIOD = 2048  # px: the specimen window repeated over the plane (far more than any search range)


def tile_name(row: int, column: int) -> str:
    return f"tile_r{row:03d}_c{column:03d}.tif"


@dataclass(frozen=True)
class HardMontageConfig:
    rows: int = 10
    columns: int = 10
    tile_px: int = 1024
    overlap: float = 0.08  # of the tile
    stage_error: float = 0.45  # ± fraction of the overlap, per axis, uniform
    stage_scale: float = 1.0  # stage px per image px (a miscalibration: 1.03 = the stage says 3 % more)
    stage_rotation_deg: float = 0.0
    dose: float = 300.0  # electrons per pixel of full transmission, gain 1, no vignetting
    vignetting: float = 0.25  # fractional fall-off at the tile corners
    gain_spread: float = 0.1  # ± per tile
    blank: tuple[GridPosition, ...] = ()
    low_texture: tuple[float, float, float, float] | None = None  # (row0, col0, row1, col1) in tile units
    low_texture_contrast: float = 0.2
    missing: tuple[GridPosition, ...] = ()
    rotation_deg: float = 0.0  # ± per tile, uniform
    lens: tuple[float, float, float] | None = None  # (k1, p1, p2) Brown–Conrady, in units of half a tile
    tear: tuple[int, tuple[float, float]] | None = None  # (first torn row, (dx, dy) px)
    seed: int = 0

    @property
    def overlap_px(self) -> int:
        return int(round(self.tile_px * self.overlap))

    @property
    def step_px(self) -> int:
        return self.tile_px - self.overlap_px


@dataclass(frozen=True, eq=False)
class SyntheticTile:
    row: int
    column: int
    name: str
    truth: np.ndarray  # 2×3 [A | t]: specimen (x, y) = A @ undistorted tile (x, y) + t
    stage: tuple[float, float]  # top-left corner the stage reports (px)
    blank: bool
    missing: bool

    @property
    def position(self) -> tuple[float, float]:
        """True top-left corner (where the transform puts tile pixel (0, 0))."""
        return float(self.truth[0, 2]), float(self.truth[1, 2])


@dataclass(frozen=True)
class PointMatches:
    """Point matches of a montage made from its truth: ``edges`` as the solvers take them, and which pairs
    of each edge are wrong on purpose (``wrong[(tile, neighbour)]``: a bool per pair)."""

    edges: list[PointEdge]
    wrong: dict[tuple[str, str], np.ndarray]
    noise_px: float

    @property
    def pairs(self) -> int:
        return int(sum(len(e.p) for e in self.edges))

    @property
    def wrong_pairs(self) -> int:
        return int(sum(int(w.sum()) for w in self.wrong.values()))

    def residuals(self, transforms: Mapping[str, np.ndarray], genuine_only: bool = True) -> np.ndarray:
        """Per point pair, the distance (px) between where ``transforms`` (2×3, tile px → montage px) put
        its two points; the pairs made wrong on purpose left out unless ``genuine_only`` is False."""
        out = []
        for e in self.edges:
            a, b = np.asarray(transforms[e.tile]), np.asarray(transforms[e.neighbour])
            d = (e.p @ a[:, :2].T + a[:, 2]) - (e.q @ b[:, :2].T + b[:, 2])
            keep = ~self.wrong[(e.tile, e.neighbour)] if genuine_only else np.ones(len(d), bool)
            out.append(np.hypot(d[keep, 0], d[keep, 1]))
        return np.concatenate(out) if out else np.zeros(0)


@dataclass
class HardMontage:
    config: HardMontageConfig
    tiles: list[SyntheticTile]
    lens: LensModel

    def tile(self, row: int, column: int) -> SyntheticTile:
        return self.tiles[row * self.config.columns + column]

    def truth(self, content_only: bool = True) -> dict[str, tuple[float, float]]:
        """True top-left corners by file name of the tiles written (content tiles only by default)."""
        return {t.name: t.position for t in self.tiles if not t.missing and not (content_only and t.blank)}

    def transforms(self) -> dict[str, np.ndarray]:
        return {t.name: t.truth for t in self.tiles if not t.missing}

    def block_displacement(self, transforms: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """How far solved ``transforms`` put the content tiles' centres from the truth, after removing the one
        similarity (scale, rotation, translation) that best maps the solved montage onto the true one (a
        stage frame is free: no overlap sees it): per tile, and between neighbours (a block displaced from
        the rest shows as a jump between its edge tiles and their neighbours)."""
        names = sorted(n for n in self.truth(content_only=True) if n in transforms)
        centre = np.full(2, (self.config.tile_px - 1) / 2)

        def centres(ms):
            return np.array([np.asarray(ms[n])[:, :2] @ centre + np.asarray(ms[n])[:, 2] for n in names])

        solved, true = centres(transforms), centres(self.transforms())
        # the best similarity solved → true (Umeyama)
        sm, tm = solved.mean(axis=0), true.mean(axis=0)
        u, sv, vt = np.linalg.svd((true - tm).T @ (solved - sm))
        d = np.sign(np.linalg.det(u @ vt))
        rot = u @ np.diag([1.0, d]) @ vt
        scale = float((sv[0] + d * sv[1]) / ((solved - sm) ** 2).sum())
        error = scale * (solved - sm) @ rot.T + tm - true
        dist = np.hypot(*error.T)
        index = {n: i for i, n in enumerate(names)}
        cells = {t.name: (t.row, t.column) for t in self.tiles}
        jumps = [
            (float(np.hypot(*(error[i] - error[index[m]]))), n, m)
            for n, i in index.items()
            for m in (tile_name(cells[n][0], cells[n][1] - 1), tile_name(cells[n][0] - 1, cells[n][1]))
            if m in index
        ]
        worst_jump = max(jumps, default=(0.0, None, None))
        return {
            "tiles": len(names),
            "similarity_removed": {
                "scale": scale,
                "rotation_deg": float(np.degrees(np.arctan2(rot[1, 0], rot[0, 0]))),
            },
            "rms_px": float(np.sqrt(np.mean(dist**2))),
            "max_px": float(dist.max()),
            "worst_tile": names[int(dist.argmax())],
            "neighbour_max_px": worst_jump[0],
            "neighbour_rms_px": float(np.sqrt(np.mean([j[0] ** 2 for j in jumps]))) if jumps else 0.0,
            "worst_neighbours": list(worst_jump[1:]),
        }

    def point_matches(
        self,
        points_per_edge: int = 20,
        noise_px: float = 1.0,
        wrong_fraction: float = 0.0,
        seed: int | None = None,
        margin_px: float = 4.0,
    ) -> PointMatches:
        """Point pairs between every two neighbouring content tiles (left and top neighbours; blank and
        missing tiles have none), made from the true transforms as a feature matcher would return them.

        Per pair, a specimen point uniform over the two tiles' shared region (``margin_px`` inside both),
        seen in each tile's recorded pixels (through the lens, if any), plus Gaussian noise of
        ``noise_px`` per axis on each point (so a pair's residual at the truth is ~``1.77 · noise_px`` px
        long on average). A ``wrong_fraction`` of the pairs is wrong as a mismatched feature is: the
        neighbour's point put somewhere else in the shared region. A tear is not modelled (refused)."""
        c = self.config
        if c.tear:
            raise ValueError("point_matches does not model a tear: render the tiles and match them instead")
        rng = np.random.default_rng(c.seed if seed is None else seed)
        size = c.tile_px
        tiles = {(t.row, t.column): t for t in self.tiles if not (t.missing or t.blank)}
        lens = None if self.lens.is_identity() else self.lens
        edges, wrong = [], {}
        for (r, col), t in tiles.items():
            for other in ((r, col - 1), (r - 1, col)):  # left, top
                n = tiles.get(other)
                if n is None:
                    continue
                specimen = _shared_points(t.truth, n.truth, size, margin_px, points_per_edge, rng)
                if specimen is None:
                    continue
                p, q = _seen_by(t.truth, specimen), _seen_by(n.truth, specimen)
                if lens is not None:
                    p, q = lens.distort(p), lens.distort(q)
                bad = rng.random(len(q)) < wrong_fraction
                if bad.any():  # matched to another feature of the overlap
                    others = _shared_points(t.truth, n.truth, size, margin_px, int(bad.sum()), rng)
                    q[bad] = _seen_by(n.truth, others)
                p = p + rng.normal(0.0, noise_px, p.shape)
                q = q + rng.normal(0.0, noise_px, q.shape)
                edges.append(PointEdge(t.name, n.name, p, q))
                wrong[(t.name, n.name)] = bad
        return PointMatches(edges, wrong, noise_px)

    def image(self, tile: SyntheticTile) -> np.ndarray:
        """The recorded uint16 tile (rendering is deterministic per tile)."""
        return _render(self, tile)

    def images(self) -> Iterator[tuple[SyntheticTile, np.ndarray]]:
        for t in self.tiles:
            if not t.missing:
                yield t, self.image(t)

    def write(self, folder: str | Path, workers: int | None = None) -> Path:
        """Write the tiles as TIFFs and ``layout.csv`` (the stage's positions; missing tiles listed, no
        file); returns the layout's path."""
        import os
        from concurrent.futures import ThreadPoolExecutor

        import tifffile

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)

        def write(t: SyntheticTile) -> None:
            tifffile.imwrite(folder / t.name, self.image(t))

        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            list(pool.map(write, [t for t in self.tiles if not t.missing]))
        layout = folder / "layout.csv"
        with layout.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["tile", "row", "column", "x", "y"])
            for t in self.tiles:
                w.writerow([t.name, t.row, t.column, f"{t.stage[0]:.3f}", f"{t.stage[1]:.3f}"])
        return layout


def make_montage(config: HardMontageConfig) -> HardMontage:
    """The montage's truth and stage readings (tiles render on demand)."""
    c = config
    rng = np.random.default_rng(c.seed)
    size, step, ov = c.tile_px, c.step_px, c.overlap_px
    lens = LensModel.radial((size, size), *c.lens) if c.lens else LensModel.identity((size, size))
    theta = math.radians(c.stage_rotation_deg)
    stage_frame = c.stage_scale * np.array(
        [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
    )
    centre = (size - 1) / 2
    tiles = []
    for r in range(c.rows):
        for col in range(c.columns):
            nominal = np.array([col * step, r * step], np.float64)
            error = rng.uniform(-c.stage_error * ov, c.stage_error * ov, 2)
            angle = math.radians(rng.uniform(-c.rotation_deg, c.rotation_deg)) if c.rotation_deg else 0.0
            a = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
            # the tile centre sits at nominal centre + error; the stage reads the nominal grid in its frame
            true_centre = nominal + centre + error
            t = true_centre - a @ np.array([centre, centre])
            stage = stage_frame @ (nominal + centre) - centre
            tiles.append(
                SyntheticTile(
                    row=r,
                    column=col,
                    name=tile_name(r, col),
                    truth=np.column_stack([a, t]),
                    stage=(float(stage[0]), float(stage[1])),
                    blank=(r, col) in set(c.blank),
                    missing=(r, col) in set(c.missing),
                )
            )
    return HardMontage(c, tiles, lens)


def _render(m: HardMontage, tile: SyntheticTile) -> np.ndarray:
    c = m.config
    size = c.tile_px
    rng = np.random.default_rng((c.seed, tile.row, tile.column, 7))
    a, t = tile.truth[:, :2], tile.truth[:, 2] + ORIGIN
    if c.tear and tile.row >= c.tear[0]:
        t = t - np.asarray(c.tear[1], np.float64)  # this piece of section moved: it shows other specimen
    if tile.blank:
        transmission = np.full((size, size), RESIN, np.float32)
    else:
        texture = _texture(c.seed)
        shift = np.mod(t, PERIOD)  # the specimen repeats every PERIOD px: sample its one rendered period
        if m.lens.is_identity():
            forward = np.column_stack([a, shift]).astype(np.float64)
            transmission = cv2.warpAffine(
                texture, forward, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_WRAP,
            )  # fmt: skip
            mx = my = None
        else:
            if m.lens not in _GRIDS:
                _GRIDS.clear()
                _GRIDS[m.lens] = _lens_grid(m.lens, size)
            ux, uy = _GRIDS[m.lens]
            mx = (a[0, 0] * ux + a[0, 1] * uy + np.float32(shift[0])).astype(np.float32)
            my = (a[1, 0] * ux + a[1, 1] * uy + np.float32(shift[1])).astype(np.float32)
            transmission = cv2.remap(texture, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
        if c.low_texture:
            transmission = _low_texture(c, transmission, a, t - ORIGIN, mx, my, shift)
    # camera: vignetting about a slightly off-centre point, a per-tile gain, shot noise
    off = rng.uniform(-0.05, 0.05, 2) * size
    half = np.float32(size / 2)
    dx = ((np.arange(size, dtype=np.float32) - (size - 1) / 2 - off[0]) / half) ** 2
    dy = ((np.arange(size, dtype=np.float32) - (size - 1) / 2 - off[1]) / half) ** 2
    gain = 1.0 + rng.uniform(-c.gain_spread, c.gain_spread)
    falloff = 1.0 - np.float32(c.vignetting / 2) * (dy[:, None] + dx[None, :])
    expected = transmission * falloff
    expected *= np.float32(c.dose * gain)
    np.maximum(expected, 0, out=expected)
    # shot noise: Poisson, drawn as its normal approximation (exact to well under 1 % at ≥ 100 e⁻/px, and
    # five times faster); 16 grey levels per electron
    noise = rng.standard_normal(expected.shape, dtype=np.float32)
    counts = expected + np.sqrt(expected) * noise
    counts *= 16
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)


def _seen_by(truth: np.ndarray, specimen: np.ndarray) -> np.ndarray:
    """Undistorted tile pixels showing ``specimen`` points (n, 2) under ``truth`` = [A | t]."""
    return np.linalg.solve(truth[:, :2], (specimen - truth[:, 2]).T).T


def _shared_points(
    a: np.ndarray, b: np.ndarray, size: int, margin: float, n: int, rng: np.random.Generator
) -> np.ndarray | None:
    """``n`` specimen points uniform over where tiles ``a`` and ``b`` (true transforms) both see, ``margin``
    px inside each; None when they share less than a few pixels."""
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], np.float64)
    boxes = [corners @ m[:, :2].T + m[:, 2] for m in (a, b)]
    lo = np.maximum(boxes[0].min(axis=0), boxes[1].min(axis=0))
    hi = np.minimum(boxes[0].max(axis=0), boxes[1].max(axis=0))
    if ((hi - lo) <= 2 * margin + 2).any():
        return None
    out = np.zeros((0, 2))
    for _ in range(100):  # rejection sampling: the boxes are rotated by a fraction of a degree at most
        x = rng.uniform(lo, hi, (2 * n + 8, 2))
        inside = np.ones(len(x), bool)
        for m in (a, b):
            u = _seen_by(m, x)
            inside &= ((u >= margin) & (u <= size - 1 - margin)).all(axis=1)
        out = np.concatenate([out, x[inside]])
        if len(out) >= n:
            return out[:n]
    return None


_GRIDS: dict[LensModel, tuple[np.ndarray, np.ndarray]] = {}  # the last lens's grid (tiles share it)


def _lens_grid(lens: LensModel, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Undistorted coordinates ``x + D(x)`` of every tile pixel, float32 (H, W) each."""
    from em_platform.stitch.lens import monomials

    xi = ((np.arange(size, dtype=np.float32) - lens.centre[0]) / lens.scale)[None, :]
    eta = ((np.arange(size, dtype=np.float32) - lens.centre[1]) / lens.scale)[:, None]
    ux = np.broadcast_to(np.arange(size, dtype=np.float32)[None, :], (size, size)).copy()
    uy = np.broadcast_to(np.arange(size, dtype=np.float32)[:, None], (size, size)).copy()
    for (pa, pb), cx, cy in zip(monomials(lens.order), *lens.coefficients, strict=True):
        if cx == 0 and cy == 0:
            continue
        term = xi**pa * eta**pb
        if cx:
            ux += np.float32(cx) * term
        if cy:
            uy += np.float32(cy) * term
    return ux, uy


def _low_texture(c: HardMontageConfig, image, a, t, mx, my, shift) -> np.ndarray:
    """Stain contrast cut to ``low_texture_contrast`` inside the configured region (plane coordinates)."""
    size = c.tile_px
    if mx is None:
        g = np.arange(size, dtype=np.float32)
        px = a[0, 0] * g[None, :] + a[0, 1] * g[:, None] + np.float32(t[0])
        py = a[1, 0] * g[None, :] + a[1, 1] * g[:, None] + np.float32(t[1])
    else:
        px, py = mx + np.float32(t[0] - shift[0]), my + np.float32(t[1] - shift[1])
    r0, c0, r1, c1 = c.low_texture
    step = c.step_px
    inside = (px >= c0 * step) & (px < c1 * step) & (py >= r0 * step) & (py < r1 * step)
    if not inside.any():
        return image
    mean = np.float32(image.mean())
    faint = mean + (image - mean) * np.float32(c.low_texture_contrast)
    return np.where(inside, faint, image).astype(np.float32)


@functools.lru_cache(maxsize=2)
def _texture(seed: int) -> np.ndarray:
    """One PERIOD² window of the specimen, tiled over the plane (BORDER_WRAP): rendering a tile costs a
    resampling, not a specimen evaluation (a 2,500-tile montage renders in seconds)."""
    return Specimen(seed).render_lattice(0, 0, PERIOD, PERIOD)
