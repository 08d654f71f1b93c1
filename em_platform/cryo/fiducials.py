"""Gold-fiducial alignment of a tilt series: beads found, tracked and fitted by a projection model
(IMOD's beadtrack + tiltalign, reduced to what a single-axis series needs).

Marker-free alignment (:mod:`em_platform.cryo.alignment`) fits a shift per view, but a real goniometer also
turns each view a little in plane and misses each tilt angle by a fraction of a degree, and no shift undoes
either: a bead 300 px from the axis moves by 1–2 px. Gold beads seen in every view pin all of it down.

1. **Detect**: each view binned so a bead is ~6 px across, a difference of Gaussians tuned to the bead on
   the negated image (gold is dark in bright field), local maxima far above the robust noise level, sub-pixel
   peaks by a Gaussian 3-point fit.
2. **Track**: beads seen near 0° seed the tracks; every view's detections are matched to where the current
   model projects each bead (the marker-free shifts to start with), then the model is refitted and the views
   tracked again with a tighter search.
3. **Fit** (the projection model, as the simulator forms the image): a bead at (X, Y, Z) appears in view i at
   R(φ + δᵢ)·(X cos θᵢ′ + Z sin θᵢ′, Y) + sᵢ + c, θᵢ′ = θᵢ + Δθᵢ, c the image centre; unknowns every bead's
   position, every view's shift sᵢ, in-plane rotation δᵢ and tilt-angle error Δθᵢ, and the axis angle φ,
   by robust least squares (scipy). Gauges: mean shift, rotation, tilt error and bead height are zero.

Shifts are in the raw view frame as :func:`~em_platform.cryo.alignment.align_tilt_series` reports them.
Dagster-free; :func:`~em_platform.cryo.alignment.align_tilt_series` calls :func:`fiducial_alignment`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from em_platform.cryo.motion import fourier_bin
from em_platform.lazy_import import LazyModule

ndimage = LazyModule("scipy.ndimage")
optimize = LazyModule("scipy.optimize")
sparse = LazyModule("scipy.sparse")

OUTLIER_PX = 3.0  # an observation this far from its bead's projection counts as a mis-track


@dataclass(frozen=True)
class FiducialSettings:
    bead_diameter_nm: float = 10.0  # colloidal gold as usually added to cryo-ET grids
    min_beads: int = 4  # fewer tracked beads: keep the marker-free alignment
    min_fraction: float = 0.7  # of the views a bead must be found in to be used
    detection_sigma: float = 8.0  # robust z-score a bead's response must exceed
    rounds: int = 3  # track → fit rounds


@dataclass
class FiducialSolution:
    shifts_px: np.ndarray  # (n, 2) raw frame, full-resolution px
    rotations_deg: np.ndarray  # (n,) in-plane angle minus the axis
    angle_offsets_deg: np.ndarray  # (n,) fitted tilt angle minus nominal
    tilt_axis_angle_deg: float
    beads_xyz_px: np.ndarray  # (m, 3)
    tracks: np.ndarray  # (n, m, 2) observed positions, NaN where a bead was not found
    residuals_px: np.ndarray  # (n,) RMS residual per view
    summary: dict = field(default_factory=dict)


def _rot(angle_rad: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def detect_beads(view: np.ndarray, radius_px: float, sigma: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """Bead centres (k, 2) as (x, y) full-resolution px and their response strengths, strongest first."""
    view = np.asarray(view, np.float32)
    ny, nx = view.shape
    binning = max(1.0, radius_px / 3.0)
    small_shape = (max(32, int(ny / binning) // 2 * 2), max(32, int(nx / binning) // 2 * 2))
    small = fourier_bin(view, small_shape)
    by, bx = ny / small_shape[0], nx / small_shape[1]
    r = radius_px / bx
    inverted = -(small - small.mean())
    response = ndimage.gaussian_filter(inverted, 0.7 * r) - ndimage.gaussian_filter(inverted, 1.6 * r)
    med = float(np.median(response))
    noise = 1.4826 * float(np.median(np.abs(response - med))) + 1e-12
    z = (response - med) / noise
    size = max(3, int(2 * r) | 1)
    peaks = (z == ndimage.maximum_filter(z, size=size)) & (z > sigma)
    edge = max(2, int(math.ceil(r)))
    peaks[:edge], peaks[-edge:], peaks[:, :edge], peaks[:, -edge:] = False, False, False, False
    ys, xs = np.nonzero(peaks)
    if not len(ys):
        return np.zeros((0, 2)), np.zeros(0)
    strength = z[ys, xs]
    keep = strength > 0.25 * np.percentile(strength, 90)  # gold, not the strongest protein
    ys, xs, strength = ys[keep], xs[keep], strength[keep]
    out = np.zeros((len(ys), 2))
    for k, (y, x) in enumerate(zip(ys, xs, strict=True)):
        dy = _vertex(z[y - 1 : y + 2, x])
        dx = _vertex(z[y, x - 1 : x + 2])
        out[k] = ((x + dx) * bx, (y + dy) * by)  # Fourier binning keeps sample 0 at pixel 0
    order = np.argsort(-strength)
    return out[order], strength[order]


def _vertex(vals: np.ndarray) -> float:
    a, b, c = (float(v) for v in vals)
    den = a - 2 * b + c
    return float(np.clip(0.5 * (a - c) / den, -0.5, 0.5)) if den < 0 else 0.0


@dataclass
class _Model:
    shifts: np.ndarray  # (n, 2)
    rotations: np.ndarray  # (n,) rad
    offsets: np.ndarray  # (n,) rad
    axis: float  # rad
    beads: np.ndarray  # (m, 3)

    def project(self, angles: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """(n, m, 2) where every bead appears in every view."""
        t = angles + self.offsets
        u = self.beads[None, :, 0] * np.cos(t)[:, None] + self.beads[None, :, 2] * np.sin(t)[:, None]
        v = np.broadcast_to(self.beads[None, :, 1], u.shape)
        rot = _rot(self.axis + self.rotations)  # (n, 2, 2)
        p = np.einsum("nij,nmj->nmi", rot, np.stack([u, v], -1))
        return p + self.shifts[:, None, :] + centre


def _fit(
    tracks: np.ndarray, angles: np.ndarray, centre: np.ndarray, start: _Model
) -> tuple[_Model, np.ndarray]:
    """Robust least squares of the projection model to the observed ``tracks`` (NaN = not seen).

    Only views with observations are fitted (the others keep ``start``'s numbers); the gauges (mean shift,
    rotation, tilt error of those views and mean bead height) stay at ``start``'s, so fits of growing sets
    of views stay in one frame."""
    active = ~np.isnan(tracks[..., 0]).all(axis=1)
    sub_tracks, sub_angles = tracks[active], angles[active]
    n, m, _ = sub_tracks.shape
    seen = ~np.isnan(sub_tracks[..., 0])
    target = np.concatenate(
        [
            start.shifts[active].mean(0),
            [start.rotations[active].mean(), start.offsets[active].mean(), start.beads[:, 2].mean()],
        ]
    )

    def unpack(x: np.ndarray) -> _Model:
        shifts = x[: 2 * n].reshape(n, 2)
        return _Model(shifts, x[2 * n : 3 * n], x[3 * n : 4 * n], x[4 * n], x[4 * n + 1 :].reshape(m, 3))

    def residuals(x: np.ndarray) -> np.ndarray:
        model = unpack(x)
        r = (model.project(sub_angles, centre) - sub_tracks)[seen].ravel()
        means = np.concatenate(
            [model.shifts.mean(0), [model.rotations.mean(), model.offsets.mean(), model.beads[:, 2].mean()]]
        )
        return np.concatenate([r, 100.0 * (means - target) * np.array([1, 1, 100, 100, 0.1])])

    x0 = np.concatenate(
        [
            start.shifts[active].ravel(),
            start.rotations[active],
            start.offsets[active],
            [start.axis],
            start.beads.ravel(),
        ]
    )
    # sparsity: an observation depends on its view's 4 numbers, the axis and its bead's 3
    rows, cols = [], []
    for k, (i, j) in enumerate(np.argwhere(seen)):
        depends = [
            2 * i,
            2 * i + 1,
            2 * n + i,
            3 * n + i,
            4 * n,
            4 * n + 1 + 3 * j,
            4 * n + 2 + 3 * j,
            4 * n + 3 + 3 * j,
        ]
        for row in (2 * k, 2 * k + 1):
            rows += [row] * len(depends)
            cols += depends
    g0 = 2 * int(seen.sum())
    gauge_cols: list[Sequence[int]] = [
        range(0, 2 * n, 2),
        range(1, 2 * n, 2),
        range(2 * n, 3 * n),
        range(3 * n, 4 * n),
    ]
    gauge_cols.append([4 * n + 3 + 3 * j for j in range(m)])
    for r_, cset in enumerate(gauge_cols):
        rows += [g0 + r_] * len(cset)
        cols += list(cset)
    pattern = sparse.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(g0 + 5, len(x0))).tocsr()
    pattern.data[:] = 1
    fit = optimize.least_squares(
        residuals, x0, jac_sparsity=pattern, loss="soft_l1", f_scale=1.0, x_scale="jac", max_nfev=200
    )
    sub = unpack(fit.x)
    model = _Model(start.shifts.copy(), start.rotations.copy(), start.offsets.copy(), sub.axis, sub.beads)
    model.shifts[active], model.rotations[active], model.offsets[active] = (
        sub.shifts,
        sub.rotations,
        sub.offsets,
    )
    per_obs = np.full(tracks.shape[:2], np.nan)
    full = model.project(angles, centre)
    observed = ~np.isnan(tracks[..., 0])
    per_obs[observed] = np.hypot(*(full - tracks)[observed].T)
    return model, per_obs


def _track(detections: list[np.ndarray], predicted: np.ndarray, radius: float) -> np.ndarray:
    """(n, m, 2): for each view and bead the nearest detection within ``radius`` of its prediction, each
    detection used once (closest pairs first)."""
    n, m, _ = predicted.shape
    out = np.full((n, m, 2), np.nan)
    for i, det in enumerate(detections):
        if not len(det):
            continue
        d = np.hypot(*(predicted[i][:, None, :] - det[None, :, :]).transpose(2, 0, 1))
        taken_b, taken_d = set(), set()
        for flat in np.argsort(d, axis=None):
            b, k = np.unravel_index(flat, d.shape)
            if d[b, k] > radius:
                break
            if b in taken_b or k in taken_d:
                continue
            out[i, b] = det[k]
            taken_b.add(b)
            taken_d.add(k)
    return out


def _refit(model: _Model, tracks: np.ndarray, used: np.ndarray, angles, centre) -> np.ndarray:
    """Fit ``model`` in place on the ``used`` beads' tracks (the others keep their positions); residuals."""
    sub = _Model(model.shifts, model.rotations, model.offsets, model.axis, model.beads[used])
    sub, residual = _fit(tracks[:, used], angles, centre, sub)
    model.shifts, model.rotations, model.offsets, model.axis = (
        sub.shifts,
        sub.rotations,
        sub.offsets,
        sub.axis,
    )
    model.beads[used] = sub.beads
    return residual


def fiducial_alignment(
    stack,
    angles_deg: np.ndarray,
    axis_deg: float,
    start_shifts_px: np.ndarray,
    pixel_A: float,
    settings: FiducialSettings = FiducialSettings(),
) -> FiducialSolution | None:
    """Align on gold beads, starting from marker-free ``start_shifts_px`` (raw frame); ``None`` when fewer
    than ``min_beads`` beads can be followed through ``min_fraction`` of the views (the caller keeps the
    marker-free alignment then)."""
    n, ny, nx = stack.shape
    angles = np.radians(np.asarray(angles_deg, float))
    centre = np.array([nx // 2, ny // 2], float)
    radius = settings.bead_diameter_nm * 5.0 / pixel_A  # nm → Å is ×10, diameter → radius is ½
    detections = [
        detect_beads(np.asarray(stack[i], np.float32), radius, settings.detection_sigma)[0] for i in range(n)
    ]
    zero = int(np.argmin(np.abs(angles)))
    if len(detections[zero]) < settings.min_beads:
        return None
    axis = math.radians(axis_deg)
    seeds = detections[zero] - centre - start_shifts_px[zero]
    xy = np.einsum("ij,mj->mi", _rot(np.array(-axis)), seeds)
    u_over_cos = xy[:, 0] / math.cos(angles[zero])
    model = _Model(
        shifts=np.asarray(start_shifts_px, float).copy(),
        rotations=np.zeros(n),
        offsets=np.zeros(n),
        axis=axis,
        beads=np.column_stack([u_over_cos, xy[:, 1], np.zeros(len(xy))]),
    )
    # grow outward from 0°: track the views near it first, fit, then take in the rest
    order = np.argsort(np.abs(angles))
    search = 3.0 * radius
    tracks = np.full((n, len(seeds), 2), np.nan)
    for stop in (max(3, n // 4), max(5, n // 2), n):
        views = order[:stop]
        predicted = model.project(angles, centre)
        tracks = np.full_like(tracks, np.nan)
        tracks[views] = _track([detections[i] for i in views], predicted[views], search)
        used = (~np.isnan(tracks[..., 0])).sum(0) >= max(3, 0.7 * len(views))
        if used.sum() < settings.min_beads:
            return None
        _refit(model, tracks, used, angles, centre)
        search = max(1.5 * radius, 4.0)
    residual = np.zeros((n, 0))
    used = np.zeros(len(seeds), bool)
    for _ in range(settings.rounds):
        predicted = model.project(angles, centre)
        tracks = _track(detections, predicted, max(radius, 4.0))
        used = (~np.isnan(tracks[..., 0])).mean(0) >= settings.min_fraction
        if used.sum() < settings.min_beads:
            return None
        residual = _refit(model, tracks, used, angles, centre)
    per_view = np.sqrt(np.nanmean(np.where(residual > OUTLIER_PX, np.nan, residual) ** 2, axis=1))
    return FiducialSolution(
        shifts_px=model.shifts,
        rotations_deg=np.degrees(model.rotations),
        angle_offsets_deg=np.degrees(model.offsets),
        tilt_axis_angle_deg=math.degrees(model.axis),
        beads_xyz_px=model.beads[used],
        tracks=tracks[:, used],
        residuals_px=per_view,
        summary={
            "beads": int(used.sum()),
            "observations": int((~np.isnan(tracks[:, used, 0])).sum()),
            "residual_median_px": float(np.nanmedian(residual)),
            "outliers": int((residual > OUTLIER_PX).sum()),  # mis-tracks the robust fit set aside
            "residual_rms_px": float(
                np.sqrt(np.nanmean(np.where(residual > OUTLIER_PX, np.nan, residual) ** 2))
            ),
            "bead_diameter_nm": settings.bead_diameter_nm,
        },
    )
