"""Marker-free tilt-series alignment: IMOD tiltxcorr's coarse alignment, then projection matching.

1. Views are binned (Fourier) to at most ``max_size``, band-pass filtered and edge-tapered, rotated by −φ so
   the tilt axis runs along y.
2. Coarse: neighbours in angle order are cross-correlated after cosine stretching (the view at the higher
   tilt stretched by cos θ_low / cos θ_high perpendicular to the axis), shifts accumulated outward from the
   view nearest 0°.
3. Projection matching (AreTomo's idea, with the even/odd split so no view is matched to itself): the views
   of one half are back-projected (WBP) into a thin tomogram and re-projected at the angles of the other
   half; each view is re-aligned to its re-projection. Repeated until the shifts settle. This also removes
   the z-offset gauge that pure neighbour correlation leaves (the specimen mass not at z = 0).
4. Tilt-axis angle (before 2-3): the common line. Summed across the axis, every view of a single-axis series
   gives the same 1-D line integrals along the axis; only at the right φ do the profiles of all tilts agree.
   The mean correlation of each profile with the zero tilt's is searched on a grid around the nominal angle
   and refined by a parabola.

Shifts are reported in the raw view frame, as the simulator's ``shift_px``: content that would sit at (x, y)
appears at (x + dx, y + dy). The raw view = the ideal view rotated by φ about the centre, then shifted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from em_platform.cryo.fiducials import FiducialSettings, fiducial_alignment
from em_platform.cryo.motion import correlation_peak, fourier_bin, limit_search
from em_platform.cryo.reconstruction import project, reconstruct
from em_platform.lazy_import import LazyModule

ndimage = LazyModule("scipy.ndimage")


@dataclass(frozen=True)
class AlignmentSettings:
    max_size: int = 256  # views binned to at most this for the search
    axis_search_deg: float = 0.0  # ± around the nominal tilt-axis angle (0 = keep the nominal; opt-in)
    axis_step_deg: float = 0.5  # coarse grid; then ±2 steps in 0.1° steps
    thickness_fraction: float = 0.35  # thickness of the matching tomogram relative to the binned width
    matching_rounds: int = 3
    rotation_search_deg: float = 0.0  # ± per-view in-plane rotation searched in projection matching (0 = off)
    rotation_step_deg: float = 0.25
    fiducials: bool = True  # align on gold beads when enough are seen (em_platform.cryo.fiducials)
    bead_diameter_nm: float = 10.0
    highpass_fraction: float = 0.02  # band-pass in cycles/px of the binned views
    lowpass_fraction: float = 0.25


@dataclass
class AlignmentResult:
    angles_deg: np.ndarray  # stack order
    shifts_px: np.ndarray  # (n, 2) (dx, dy), raw frame, full-resolution px, stack order
    tilt_axis_angle_deg: float
    rotations_deg: np.ndarray  # per view: its in-plane angle minus the tilt axis (stage/goniometer wobble)
    residuals_px: np.ndarray  # per view: size of the last projection-matching correction
    scores: np.ndarray  # per view: correlation with its re-projection
    axis_scores: dict = field(default_factory=dict)
    binning: float = 1.0
    method: str = "marker-free"  # or "fiducials"
    fiducials: dict = field(default_factory=dict)  # beads, observations, residual (when method = fiducials)

    def summary(self) -> dict:
        return {
            "method": self.method,
            "fiducials": self.fiducials,
            "tilt_axis_angle_deg": self.tilt_axis_angle_deg,
            "rotation_rms_deg": float(np.sqrt(np.mean(self.rotations_deg**2))),
            "rms_residual_px": float(np.sqrt(np.mean(self.residuals_px**2))),
            "mean_score": float(np.mean(self.scores)),
            "binning": self.binning,
        }


def rotation_yx(angle_deg: float) -> np.ndarray:
    """R(a) acting on (y, x) index vectors for a counter-clockwise rotation by a in the (x, y) frame."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, s], [-s, c]])  # (x, y) → (x c − y s, x s + y c), rewritten for (y, x)


def transform_view(
    image: np.ndarray, angle_deg: float = 0.0, shift_xy=(0.0, 0.0), stretch_x: float = 1.0, order: int = 1
) -> np.ndarray:
    """The ideal view from a raw one: undo ``shift_xy`` then rotate by −``angle_deg``; optionally stretch x.

    Output pixel p (y, x) samples the input at R(angle)·S⁻¹·(p − c) + c + shift, c = (n//2) per axis.
    """
    ny, nx = image.shape
    c = np.array([ny // 2, nx // 2], float)
    r = rotation_yx(angle_deg) @ np.diag([1.0, 1.0 / stretch_x])
    offset = c + np.array([shift_xy[1], shift_xy[0]]) - r @ c
    return ndimage.affine_transform(image, r, offset=offset, order=order, mode="constant", cval=0.0)


def _prepare(view: np.ndarray, size: tuple[int, int], hp: float, lp: float) -> np.ndarray:
    small = fourier_bin(np.asarray(view, np.float32), size)
    small = (small - small.mean()) / (small.std() + 1e-12)
    ft = np.fft.rfft2(small)
    ky = np.fft.fftfreq(size[0])[:, None]
    kx = np.fft.rfftfreq(size[1])[None, :]
    k2 = kx**2 + ky**2
    band = (1 - np.exp(-k2 / (2 * hp**2))) * np.exp(-k2 / (2 * lp**2))
    return np.fft.irfft2(ft * band, s=size).astype(np.float32)


def _taper2d(shape: tuple[int, int], fraction: float = 0.1) -> np.ndarray:
    def t(n: int) -> np.ndarray:
        w = np.ones(n)
        m = max(1, int(n * fraction))
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(m) + 0.5) / m)
        w[:m], w[-m:] = ramp, ramp[::-1]
        return w

    return np.outer(t(shape[0]), t(shape[1])).astype(np.float32)


def _xcorr_shift(
    ref: np.ndarray, mov: np.ndarray, max_shift: float | None = None
) -> tuple[float, float, float]:
    """(dx, dy) of ``mov``'s content relative to ``ref``, and the normalised peak height."""
    w = _taper2d(ref.shape)
    a = (ref - ref.mean()) * w
    b = (mov - mov.mean()) * w
    cc = np.fft.irfft2(np.fft.rfft2(b) * np.conj(np.fft.rfft2(a)), s=a.shape)
    if max_shift is not None:
        cc = limit_search(cc, max_shift)
    dy, dx = correlation_peak(cc)
    norm = math.sqrt(float((a * a).sum() * (b * b).sum())) + 1e-12
    return dx, dy, float(cc.max() / norm)


def coarse_alignment(views: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """Cosine-stretched neighbour correlation (views already rotated so the axis is along y).

    Returns (n, 2) shifts (dx, dy) in the rotated frame, the view nearest 0° at zero.
    """
    n = len(angles_deg)
    order = np.argsort(angles_deg)
    pos = {int(i): k for k, i in enumerate(order)}
    zero = int(np.argmin(np.abs(angles_deg)))
    shifts = np.zeros((n, 2))
    max_shift = min(views.shape[1:]) / 4
    for direction in (1, -1):
        k = pos[zero]
        while 0 <= k + direction < n:
            i, j = int(order[k]), int(order[k + direction])
            f = math.cos(math.radians(angles_deg[i])) / math.cos(math.radians(angles_deg[j]))
            stretched = transform_view(views[j], stretch_x=f)
            mx, my, _ = _xcorr_shift(views[i], stretched, max_shift)
            shifts[j] = ((mx + shifts[i, 0]) / f, my + shifts[i, 1])
            k += direction
    return shifts


def _shifted(views: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Views with their (dx, dy) shifts undone (Fourier shift, no interpolation loss)."""
    ky = np.fft.fftfreq(views.shape[1])[None, :, None]
    kx = np.fft.rfftfreq(views.shape[2])[None, None, :]
    ramp = np.exp(2j * np.pi * kx * shifts[:, 0, None, None]) * np.exp(
        2j * np.pi * ky * shifts[:, 1, None, None]
    )
    return np.fft.irfft2(np.fft.rfft2(views) * ramp, s=views.shape[1:]).astype(np.float32)


def _match_view(
    reproj: np.ndarray, view: np.ndarray, shift: np.ndarray, rotation: float, settings: AlignmentSettings
) -> tuple[float, float, float, float]:
    """The best (rotation, dx, dy, score) of one rotated-frame ``view`` against its re-projection.

    The rotation is searched on a grid around ``rotation`` (the view turned about its centre, then its
    shift undone) and refined by a parabola through the correlation peaks; (dx, dy) is the correction
    to ``shift`` at that rotation.
    """
    max_shift = min(view.shape) / 8

    def at(angle: float) -> tuple[float, float, float]:
        turned = transform_view(view, angle) if angle else view
        return _xcorr_shift(reproj, _shifted(turned[None], shift[None])[0], max_shift)

    if settings.rotation_search_deg <= 0:
        return (rotation, *at(rotation))
    steps = np.arange(
        -settings.rotation_search_deg, settings.rotation_search_deg + 1e-9, settings.rotation_step_deg
    )
    found = {float(rotation + d): at(rotation + d) for d in steps}
    best = _peak_of({a: r[2] for a, r in found.items()}, settings.rotation_step_deg)
    return (best, *at(best))


def projection_matching(
    views: np.ndarray,
    angles_deg: np.ndarray,
    shifts: np.ndarray,
    thickness: int,
    settings: AlignmentSettings,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Refine shifts (and each view's in-plane rotation) by matching each view to the re-projection of the
    other half's tomogram.

    A view's rotation matters as much as its shift: a goniometer that turns a view by 0.25° moves a gold
    bead 300 px from the centre by 1.3 px, which no shift can undo. Views are rotated-frame (axis along y);
    a view is turned by its rotation, then its shift undone. The mean rotation is held at zero (a common
    turn is the tilt axis's angle, found separately). Returns shifts, rotations (deg), the last
    corrections (px) and per-view correlation scores.
    """
    n = len(angles_deg)
    halves = [np.arange(n)[np.argsort(angles_deg)][p::2] for p in (0, 1)]
    rotations = np.zeros(n)
    corr = np.zeros(n)
    scores = np.zeros(n)
    for _ in range(settings.matching_rounds):
        turned = np.stack([transform_view(v, a) if a else v for v, a in zip(views, rotations, strict=True)])
        aligned = _shifted(turned, shifts)
        corr = np.zeros(n)
        for p in (0, 1):
            src, dst = halves[p], halves[1 - p]
            tomo = reconstruct(
                aligned[src], angles_deg[src], thickness, slab_rows=max(8, views.shape[1] // 2)
            )
            reproj = project(tomo, angles_deg[dst])
            for k, i in enumerate(dst):
                rotation, dx, dy, score = _match_view(reproj[k], views[i], shifts[i], rotations[i], settings)
                corr[i] = math.hypot(dx, dy)
                scores[i] = score
                shifts[i] += (dx, dy)
                rotations[i] = rotation
        shifts -= shifts.mean(axis=0)
        rotations -= rotations.mean()
        if np.max(corr) < 0.05:
            break
    return shifts, rotations, corr, scores


def _rot(angle_deg: float) -> np.ndarray:
    """Counter-clockwise rotation on (x, y) vectors."""
    a = math.radians(angle_deg)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def _align_at_axis(prepared: np.ndarray, angles: np.ndarray, axis_deg: float, settings: AlignmentSettings):
    rotated = np.stack([transform_view(v, axis_deg) for v in prepared])
    shifts = coarse_alignment(rotated, angles)
    thickness = max(8, int(prepared.shape[2] * settings.thickness_fraction) // 2 * 2)
    return projection_matching(rotated, angles, shifts, thickness, settings)


def common_line_profiles(
    views: np.ndarray, angles_deg: np.ndarray, axis_deg: float, shifts_raw: np.ndarray | None = None
) -> np.ndarray:
    """Each view rotated so the axis runs along y, summed across x over the part of the field that every
    tilt sees (half-width ∝ cos θ): for a single-axis series these 1-D profiles along the axis are the same
    line integrals of the specimen at every tilt, but only when the axis angle is right."""
    n, ny, nx = views.shape
    x = np.arange(nx) - nx // 2
    out = np.zeros((n, ny))
    for i in range(n):
        rotated = transform_view(views[i], axis_deg, (0.0, 0.0) if shifts_raw is None else shifts_raw[i])
        half = 0.45 * nx * math.cos(math.radians(angles_deg[i]))
        w = np.clip((half - np.abs(x)) / 4.0, 0, 1)
        prof = rotated @ w
        prof = prof - prof.mean()
        out[i] = prof / (np.linalg.norm(prof) + 1e-12)
    return out


def common_line_score(profiles: np.ndarray, zero: int, max_lag: int | None = None) -> float:
    """Mean peak correlation of every profile with the zero-tilt one (1-D shifts along the axis allowed)."""
    ref = np.fft.rfft(profiles[zero])
    n = profiles.shape[1]
    scores = []
    for i in range(len(profiles)):
        if i == zero:
            continue
        cc = np.fft.irfft(np.fft.rfft(profiles[i]) * np.conj(ref), n=n)
        lim = n // 8 if max_lag is None else max_lag
        scores.append(float(max(cc[: lim + 1].max(), cc[-lim:].max())))
    return float(np.mean(scores))


def _peak_of(scores: dict[float, float], half_window: float) -> float:
    """The grid point with the best score, refined by a parabola through the points within ±``half_window``."""
    keys = np.array(sorted(scores))
    vals = np.array([scores[k] for k in keys])
    i = int(np.argmax(vals))
    near = np.abs(keys - keys[i]) <= half_window + 1e-9
    if near.sum() >= 3:
        a, b, _ = np.polyfit(keys[near] - keys[i], vals[near], 2)
        if a < 0:
            return float(keys[i] + np.clip(-b / (2 * a), -half_window, half_window))
    return float(keys[i])


def axis_by_common_line(
    prepared: np.ndarray,
    angles: np.ndarray,
    centre: float,
    half_range: float,
    step: float,
    shifts_raw: np.ndarray | None = None,
) -> tuple[float, dict[float, float]]:
    """Tilt-axis angle maximising the common-line score on a grid of ``step`` within ±``half_range`` of
    ``centre``, refined by a parabola. With ``shifts_raw`` the views are aligned first (then only a small
    lag along the axis is allowed)."""
    zero = int(np.argmin(np.abs(angles)))
    grid = centre + np.arange(-half_range, half_range + 1e-9, step)
    lag = None if shifts_raw is None else 3
    scores = {
        round(float(a), 4): common_line_score(
            common_line_profiles(prepared, angles, a, shifts_raw), zero, lag
        )
        for a in grid
    }
    return _peak_of(scores, max(3 * step, half_range / 3)), scores


def axis_by_sharpness(
    prepared: np.ndarray,
    angles: np.ndarray,
    shifts_raw: np.ndarray,
    centre: float,
    half_range: float,
    step: float,
    thickness: int,
) -> tuple[float, dict[float, float]]:
    """Tilt-axis angle maximising the power of the aligned views' back-projection.

    Noise back-projects to the same power at any axis angle (a rotation keeps its energy), but the signal of
    different tilts adds up coherently only when the geometry is right, so the tomogram's power peaks at the
    true axis. Every pair of tilts contributes, not just pairs with one reference view."""
    scores = {}
    for a in centre + np.arange(-half_range, half_range + 1e-9, step):
        views = np.stack([transform_view(prepared[i], a, shifts_raw[i]) for i in range(len(prepared))])
        tomo = reconstruct(views, angles, thickness, slab_rows=max(8, views.shape[1] // 2))
        scores[round(float(a), 4)] = float(np.mean(tomo.astype(np.float64) ** 2))
    return _peak_of(scores, max(2 * step, half_range / 2)), scores


def align_tilt_series(
    stack,
    angles_deg,
    axis_nominal_deg: float,
    settings: AlignmentSettings = AlignmentSettings(),
    pixel_A: float | None = None,
) -> AlignmentResult:
    """Align a tilt series (n, ny, nx) (stack order, nominal angles); returns full-resolution shifts.

    Marker-free first; then, with ``settings.fiducials`` and the pixel size, on gold beads if enough are
    followed through the series (:func:`~em_platform.cryo.fiducials.fiducial_alignment`), which also fits
    each view's rotation and tilt angle (``angles_deg`` of the result are then the fitted ones)."""
    angles = np.asarray(angles_deg, float)
    n, ny, nx = stack.shape
    if len(angles) != n:
        raise ValueError(f"{len(angles)} tilt angles for a stack of {n} views")
    scale = min(1.0, settings.max_size / max(ny, nx))
    size = (max(16, int(round(ny * scale / 2)) * 2), max(16, int(round(nx * scale / 2)) * 2))
    binning = nx / size[1]
    prepared = np.stack(
        [_prepare(v, size, settings.highpass_fraction, settings.lowpass_fraction) for v in stack]
    )

    axis_scores: dict[float, float] = {}
    best_axis = axis_nominal_deg
    shifts_rot, rotations, corr, scores = _align_at_axis(prepared, angles, best_axis, settings)
    if settings.axis_search_deg > 0:
        # the axis by the back-projection's power on the aligned views: a coarse grid, then a fine one
        thickness = max(8, int(size[1] * settings.thickness_fraction) // 2 * 2)
        for half, step in (
            (settings.axis_search_deg, settings.axis_step_deg),
            (2 * settings.axis_step_deg, 0.1),
        ):
            raw = shifts_rot @ _rot(best_axis).T
            best_axis, grid = axis_by_sharpness(prepared, angles, raw, best_axis, half, step, thickness)
            axis_scores.update(grid)
            shifts_rot, rotations, corr, scores = _align_at_axis(prepared, angles, best_axis, settings)
    # a view turned by δ then shifted by s in the rotated frame is, in the raw frame, shifted by R(φ + δ)·s
    shifts_raw = (
        np.stack([_rot(best_axis + d) @ v for d, v in zip(rotations, shifts_rot, strict=True)]) * binning
    )
    if settings.fiducials and pixel_A:
        solution = fiducial_alignment(
            stack, angles, best_axis, shifts_raw, pixel_A, FiducialSettings(settings.bead_diameter_nm)
        )
        if solution is not None:
            return AlignmentResult(
                angles_deg=angles + solution.angle_offsets_deg,
                shifts_px=solution.shifts_px,
                tilt_axis_angle_deg=solution.tilt_axis_angle_deg,
                rotations_deg=solution.rotations_deg,
                method="fiducials",
                residuals_px=solution.residuals_px,
                scores=scores,
                axis_scores=axis_scores,
                binning=1.0,
                fiducials=solution.summary,
            )
    return AlignmentResult(
        angles_deg=angles,
        shifts_px=shifts_raw,
        tilt_axis_angle_deg=float(best_axis),
        rotations_deg=rotations,
        residuals_px=corr * binning,
        scores=scores,
        axis_scores=axis_scores,
        binning=binning,
    )


def aligned_stack(stack, shifts_px: np.ndarray, axis_deg: float, out: np.ndarray | None = None) -> np.ndarray:
    """Every view brought to the reference geometry (shift undone, axis along y), cubic interpolation."""
    n = stack.shape[0]
    if out is None:
        out = np.zeros(stack.shape, np.float32)
    for i in range(n):
        view = np.asarray(stack[i], np.float32)
        mean = float(view.mean())
        out[i] = transform_view(view - mean, axis_deg, shifts_px[i], order=3) + mean
    return out


def imod_xf(shifts_px: np.ndarray, axis_deg, shape_yx: tuple[int, int]) -> list[tuple[float, ...]]:
    """IMOD ``.xf`` lines (A11 A12 A21 A22 DX DY) taking each raw view to the aligned one (axis along y).

    ``axis_deg``: one angle, or one per view (the axis plus the view's own rotation). IMOD (newstack's
    cubinterp) maps a raw pixel X to X' = A·(X − c) + D + c with c = (nx/2, ny/2) in 0-based pixel indices;
    :func:`transform_view` turns about the pixel (nx//2, ny//2), half a pixel away on an odd axis, so
    D = −A·d + (A − I)·(c − (nx//2, ny//2)), with A = R(−φ) and d the view's shift.
    """
    angles = np.broadcast_to(np.asarray(axis_deg, float), (len(shifts_px),))
    ny, nx = shape_yx
    centre_gap = np.array([nx / 2 - nx // 2, ny / 2 - ny // 2])
    rows: list[tuple[float, ...]] = []
    for d, phi in zip(shifts_px, angles, strict=True):
        a = math.radians(-phi)
        m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        dd = -m @ np.asarray(d, float) + (m - np.eye(2)) @ centre_gap
        rows.append((m[0, 0], m[0, 1], m[1, 0], m[1, 1], float(dd[0]), float(dd[1])))
    return rows


def write_imod_files(
    path_stem: str, angles_deg, shifts_px: np.ndarray, axis_deg, shape_yx: tuple[int, int]
) -> tuple[str, str]:
    """Write ``<stem>.xf`` and ``<stem>.tlt`` (stack order) for IMOD / AreTomo users."""
    xf, tlt = f"{path_stem}.xf", f"{path_stem}.tlt"
    with open(xf, "w") as f:
        for r in imod_xf(shifts_px, axis_deg, shape_yx):
            f.write("{:12.7f}{:12.7f}{:12.7f}{:12.7f}{:12.3f}{:12.3f}\n".format(*r))
    with open(tlt, "w") as f:
        for a in angles_deg:
            f.write(f"{float(a):8.2f}\n")
    return xf, tlt
