"""A movie's drift as physics has it: an early jump that decays, then slow drift; smoothed no more than the noise asks.

Beam-induced motion is fastest in the first frames: the ice relaxes under the first electrons, an
exponential jump of several pixels within one or two frames, then slow stage/specimen drift. A cubic in
time (Unblur's old prior, this module's predecessor) cannot follow the jump: on real movies it left
0.7–2.4 px RMS, where per-frame correlation peaks alone were within 0.05–0.07 px. So the measured per-frame
shifts are kept unless the noise says otherwise:

1. **Noise.** The per-frame measurement error ``σ`` is read from the second differences of the measured
   shifts (``Δ²m``; for drift that is slow after the jump, ``Δ²`` of the motion is ~0 and ``Δ²`` of white
   noise has variance ``6σ²``), robustly (MAD), so the few frames of the jump do not count.
2. **Model.** ``s(t) = c + a·(1 − e^{−t/τ}) + b·t + d·t²`` per axis, with one ``τ`` for both axes (searched
   on a log grid from 0.3 frames to a quarter of the movie): kept when it fits the measurements within their noise (residual
   RMS ≤ 1.5 σ, or ≤ 0.05 px); it then averages the noise of every frame.
3. **Otherwise** a Whittaker smoother (second-difference penalty), its weight chosen by generalised
   cross-validation: as little smoothing as the data support; a jump the noise cannot hide stays a jump.

A movie whose per-frame peaks are already better than 0.05 px is smoothed by neither. Dagster-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TRAJECTORY_MODELS", "Trajectory", "fit_trajectory", "shift_noise"]

TRAJECTORY_MODELS = ("physical", "smooth", "none")
MIN_NOISE_PX = 0.01
MODEL_FIT_NOISE = 1.5  # the model is kept when its residual RMS is within this many σ
PRECISE_PX = 0.05  # per-frame shifts this good are not smoothed at all
TAU_GRID = np.geomspace(0.3, 30.0, 48)  # frames


@dataclass(frozen=True)
class Trajectory:
    shifts: np.ndarray  # (n, 2), mean zero
    model: str  # "physical", "smooth", "measured"
    noise_px: float  # σ per frame and axis, as measured
    tau_frames: float | None = None  # the jump's time constant, when the physical model was kept
    residual_rms_px: float = 0.0  # measured − fitted

    def summary(self) -> dict:
        return {
            "trajectory_model": self.model,
            "shift_noise_px": round(self.noise_px, 4),
            "trajectory_residual_rms_px": round(self.residual_rms_px, 4),
            **({"jump_tau_frames": round(self.tau_frames, 3)} if self.tau_frames is not None else {}),
        }


def shift_noise(shifts: np.ndarray) -> float:
    """σ of the per-frame shift measurement (px per axis) from the measured shifts' second differences."""
    m = np.asarray(shifts, np.float64)
    if len(m) < 4:
        return MIN_NOISE_PX
    d2 = np.diff(m, n=2, axis=0).ravel()
    mad = float(np.median(np.abs(d2 - np.median(d2))))
    return max(MIN_NOISE_PX, 1.4826 * mad / np.sqrt(6.0))


def _tukey(r: np.ndarray, scale: float) -> np.ndarray:
    """Biweight per frame from its residual vector: a stray frame (a failed correlation peak) stops pulling."""
    d = np.hypot(*r.T) / (4.685 * scale)
    return (1 - np.clip(d, 0, 1) ** 2) ** 2


def _physical_at(m: np.ndarray, tau: float, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """The robust least-squares model at one ``tau``: (fit, weights)."""
    n = len(m)
    t = np.arange(n, dtype=np.float64)
    basis = np.column_stack([np.ones(n), 1 - np.exp(-(t + 0.5) / tau), t / n, (t / n) ** 2])
    w = np.ones(n)
    for _ in range(5):
        root = np.sqrt(w)[:, None]
        coef, *_ = np.linalg.lstsq(basis * root, m * root, rcond=None)
        fit = basis @ coef
        w = _tukey(m - fit, noise)
    return fit, w


def _physical_fit(m: np.ndarray, noise: float) -> tuple[np.ndarray, float, np.ndarray]:
    """The best ``c + a(1 − e^{−t/τ}) + b t + d t²`` (one τ for both axes; grid, then refined): (fit, τ,
    residual per frame)."""
    from scipy.optimize import minimize_scalar

    def cost(log_tau: float) -> float:
        fit, w = _physical_at(m, float(np.exp(log_tau)), noise)
        return float((w[:, None] * (m - fit) ** 2).sum() + (1 - w).sum() * (4.685 * noise) ** 2)

    grid = TAU_GRID[TAU_GRID <= len(m) / 4]  # slower "jumps" are the drift terms' business
    costs = [cost(np.log(tau)) for tau in grid]
    i = int(np.argmin(costs))
    lo, hi = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, len(grid) - 1)])
    best = (
        minimize_scalar(cost, bounds=(lo, hi), method="bounded", options={"xatol": 1e-3}) if hi > lo else None
    )
    tau = float(np.exp(best.x)) if best is not None and best.fun <= costs[i] else float(grid[i])
    fit, _ = _physical_at(m, tau, noise)
    return fit, tau, np.hypot(*(m - fit).T) / np.sqrt(2)


def _whittaker_gcv(m: np.ndarray, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Whittaker smoothing (second differences), robust (biweight), its weight by generalised
    cross-validation: (fit, weights)."""
    n = len(m)
    d = np.diff(np.eye(n), n=2, axis=0)
    penalty = d.T @ d
    w = np.ones(n)
    fit = m
    for _ in range(4):
        best = (m, float("inf"))
        for lam in np.geomspace(1e-3, 1e4, 36):
            hat = np.linalg.solve(np.diag(w) + lam * penalty, np.diag(w))
            candidate = hat @ m
            dof = float(np.trace(hat))
            used = float(w.sum())
            if dof >= used - 0.5:
                continue
            gcv = used * float((w[:, None] * (m - candidate) ** 2).sum()) / (used - dof) ** 2
            if gcv < best[1]:
                best = (candidate, gcv)
        fit = best[0]
        new_w = _tukey(m - fit, noise)
        if (new_w > 0).sum() < max(3, (n + 1) // 2):
            break  # a few frames whose shifts all disagree: no majority to call the rest outliers
        w = new_w
    return fit, w


def fit_trajectory(measured: np.ndarray, model: str = "physical") -> Trajectory:
    """The drift the measured per-frame ``shifts`` (n, 2) support, by ``model`` (module docstring):
    ``physical`` (jump + drift, else GCV smoothing), ``smooth`` (GCV smoothing only) or ``none``."""
    if model not in TRAJECTORY_MODELS:
        raise ValueError(f"trajectory model {model!r}: choose one of {', '.join(TRAJECTORY_MODELS)}")
    m = np.asarray(measured, np.float64) - np.mean(measured, axis=0)
    noise = shift_noise(m)
    if model == "none" or len(m) < 5 or noise <= PRECISE_PX:
        return Trajectory(m, "measured", noise)
    if model == "physical" and len(m) >= 6:
        fit, tau, residual = _physical_fit(m, noise)
        # kept when it fits within the noise everywhere but a stray frame or two (a failed peak)
        limit = max(3 * noise, PRECISE_PX)
        stray = residual > limit
        rms = float(np.sqrt((residual[~stray] ** 2).mean())) if (~stray).any() else float("inf")
        if stray.sum() <= max(1, len(m) // 20) and rms <= max(MODEL_FIT_NOISE * noise, PRECISE_PX):
            return Trajectory(fit - fit.mean(axis=0), "physical", noise, tau, rms)
    fit, w = _whittaker_gcv(m, noise)
    fit = fit - fit.mean(axis=0)
    kept = w > 0
    rms = float(np.sqrt(((m - fit)[kept] ** 2).sum(axis=1).mean() / 2)) if kept.any() else 0.0
    return Trajectory(fit, "smooth", noise, None, rms)
