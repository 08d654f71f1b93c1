"""The detector: expected counts, DQE-scaled Poisson noise, MTF, gain; dose-fractionated movies.

Micrographs follow TEM-Simulator's integrating detector: n ~ Poisson(E) electrons with E = I·dose·p²,
then conversion noise of mean 0 and variance (1/DQE − 1)·n, so var = E/DQE; the MTF
(TEM-Simulator's parametric form) filters signal and noise alike; × gain. The noiseless twin is
MTF(E)·gain. Movies are counting-camera frames: each frame's expected image, shifted by its drift,
filtered by the MTF, times the pixel's sensitivity, gives integer Poisson counts; the gain reference is
1/sensitivity, so raw × gain_ref is the normalised frame (SerialEM's convention).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from em_platform.lazy_import import LazyModule
from em_platform.simulation.cryoet import physics

sfft = LazyModule("scipy.fft")
ndimage = LazyModule("scipy.ndimage")


@dataclass(frozen=True)
class Detector:
    dqe: float
    gain: float
    mtf_a: float
    mtf_b: float
    mtf_c: float
    mtf_alpha: float
    mtf_beta: float

    def mtf_rfft(self, shape: tuple[int, int]) -> np.ndarray:
        fy = np.fft.fftfreq(shape[0])[:, None]
        fx = np.fft.rfftfreq(shape[1])[None, :]
        return physics.mtf(
            np.sqrt(fy**2 + fx**2),
            a=self.mtf_a,
            b=self.mtf_b,
            c=self.mtf_c,
            alpha=self.mtf_alpha,
            beta=self.mtf_beta,
        ).astype(np.float32)

    def apply_mtf(self, image: np.ndarray) -> np.ndarray:
        if self.mtf_a == 0 and self.mtf_b == 0:
            return image.astype(np.float32, copy=False)
        return sfft.irfft2(sfft.rfft2(image) * self.mtf_rfft(image.shape), s=image.shape).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _mtf_grid(detector: Detector, shape: tuple[int, int]) -> np.ndarray:
    """The MTF on an rfft2 grid (cached: every tilt of a stack uses the same one)."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    d = detector
    grid = physics.mtf(
        np.sqrt(fy**2 + fx**2), a=d.mtf_a, b=d.mtf_b, c=d.mtf_c, alpha=d.mtf_alpha, beta=d.mtf_beta
    )
    grid = grid.astype(np.float32)
    grid.flags.writeable = False
    return grid


def quantized_counts(expected: np.ndarray, dqe: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson electrons plus conversion noise of variance (1/DQE − 1)·n: mean E, variance E/DQE.

    TEM-Simulator draws the conversion noise from a Wald distribution of the same mean and variance; a
    Gaussian is ten times cheaper and indistinguishable at the tens of electrons per pixel of a micrograph.
    """
    n = rng.poisson(np.clip(expected, 0, None)).astype(np.float32)
    extra = 1.0 / dqe - 1.0
    if extra <= 0:
        return n
    return n + np.sqrt(np.float32(extra) * n) * rng.standard_normal(n.shape, dtype=np.float32)


def micrographs(
    expected: np.ndarray, detector: Detector, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, noiseless) detector images from the expected electron counts."""
    noiseless = detector.apply_mtf(expected) * np.float32(detector.gain)
    noisy = detector.apply_mtf(quantized_counts(expected, detector.dqe, rng)) * np.float32(detector.gain)
    return noisy, noiseless


def drift_trajectory(
    n_frames: int, total_px: float, jitter_px: float, rng: np.random.Generator
) -> np.ndarray:
    """(n_frames, 2) [dx, dy] px: beam-induced motion, fast at first and decaying, plus a little jitter.

    Frame 0 sits at the origin; the path runs ``total_px`` in a random direction along
    1 − exp(−3·t) (t from 0 to 1 over the exposure).
    """
    if n_frames <= 0:
        return np.zeros((0, 2))
    t = np.arange(n_frames) / max(n_frames - 1, 1)
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) or 1.0
    path = (1 - np.exp(-3 * t)) / (1 - np.exp(-3)) * total_px
    drift = path[:, None] * direction[None, :] + rng.normal(scale=jitter_px, size=(n_frames, 2))
    drift[0] = 0.0
    return drift


def sensitivity_map(shape: tuple[int, int], variation: float, rng: np.random.Generator) -> np.ndarray:
    """Per-pixel relative sensitivity (mean 1, σ = variation, kept positive)."""
    if variation <= 0:
        return np.ones(shape, np.float32)
    return np.clip(rng.normal(1.0, variation, size=shape), 0.2, None).astype(np.float32)


def movie_frames(
    expected_padded: np.ndarray,
    crop,
    drift_px: np.ndarray,
    detector: Detector,
    sensitivity: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Raw integer counts (n_frames, ny, nx) of a movie whose frames share ``expected_padded`` equally.

    Frame i shows the image moved by drift_px[i] (a Fourier shift on the padded grid, then cropped).
    """
    n = len(drift_px)
    per_frame = expected_padded / np.float32(n)
    spectrum = sfft.rfft2(per_frame)
    frames = []
    peak = 0
    for dx, dy in drift_px:
        moved = sfft.irfft2(
            ndimage.fourier_shift(spectrum, (dy, dx), n=expected_padded.shape[1]), s=per_frame.shape
        )
        mean = detector.apply_mtf(np.clip(crop(moved), 0, None)) * sensitivity
        counts = rng.poisson(np.clip(mean, 0, None))
        peak = max(peak, int(counts.max(initial=0)))
        frames.append(counts)
    dtype = np.uint8 if peak < 256 else np.uint16 if peak < 65536 else np.uint32
    return np.stack(frames).astype(dtype)
