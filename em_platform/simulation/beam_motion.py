"""Dose-fractionated movies with beam-induced motion as real detectors record it, for testing motion correction.

What makes real movies hard, and what the earlier synthetic movies lacked (white noise drifting in whole
pixel steps, or a slow cubic drift):

* **The trajectory**: an exponential jump in the first frames (the ice relaxing under the first electrons,
  time constant ~1–2 frames, several to tens of pixels) plus slow drift and a little jitter; 10–40 px in all.
* **The specimen**: weak phase contrast: a 1/k-like spectrum through a CTF (Thon rings, little low-frequency
  contrast), a few percent RMS, so each frame's correlation peak is noisy.
* **The detector**: Poisson counts at 1–1.5 e/px/frame, per-pixel sensitivity (the gain reference is its
  inverse, SerialEM's convention: normalised = raw × gain), hot pixels that read high in every frame.
* **Local motion** (optional): a smooth doming field whose amplitude follows the same jump.

Everything is reproducible from a seed. Dagster-free; used by the cryo tests and ``bench/bench_cryo.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["MovieSpec", "beam_trajectory", "movie_frames", "specimen_image"]


@dataclass(frozen=True)
class MovieSpec:
    shape: tuple[int, int] = (1024, 1024)
    n_frames: int = 40
    pixel_A: float = 1.0
    e_per_px_frame: float = 1.2
    jump_px: float = 15.0  # amplitude of the early jump
    tau_frames: float = 1.5  # its time constant
    drift_px: float = 6.0  # slow drift over the whole movie
    jitter_px: float = 0.03  # per-frame random walk step
    sensitivity_sd: float = 0.05  # per-pixel gain variation
    hot_pixels: int = 0
    hot_extra_counts: float = 6.0  # per frame
    doming_px: float = 0.0  # local motion: peak amplitude at the frame edge
    defocus_A: float = 15000.0
    contrast: float = 0.06  # RMS of the specimen's intensity modulation
    seed: int = 0
    camera_seed: int | None = None  # the detector's own (its gain and hot pixels): one camera, many movies


def beam_trajectory(spec: MovieSpec) -> np.ndarray:
    """Where frame i's content sits, (n, 2) px (dx, dy), mean zero: jump + drift + jitter."""
    rng = np.random.default_rng([spec.seed, 1])
    t = np.arange(spec.n_frames, dtype=np.float64)
    jump_dir = rng.normal(size=2)
    jump_dir /= np.linalg.norm(jump_dir)
    drift_dir = rng.normal(size=2)
    drift_dir /= np.linalg.norm(drift_dir)
    jump = spec.jump_px * (1 - np.exp(-(t + 0.5) / spec.tau_frames))  # frame i is exposed from i to i + 1
    drift = spec.drift_px * t / max(spec.n_frames - 1, 1)
    walk = np.cumsum(rng.normal(0, spec.jitter_px, (spec.n_frames, 2)), axis=0)
    s = jump[:, None] * jump_dir + drift[:, None] * drift_dir + walk
    return s - s.mean(axis=0)


def specimen_image(spec: MovieSpec) -> np.ndarray:
    """The undrifted exposure's intensity, mean 1, float64 (ny, nx): weak phase contrast through a CTF."""
    rng = np.random.default_rng([spec.seed, 2])
    ny, nx = spec.shape
    ky = np.fft.fftfreq(ny, d=spec.pixel_A)[:, None]
    kx = np.fft.rfftfreq(nx, d=spec.pixel_A)[None, :]
    k2 = kx * kx + ky * ky
    wavelength = 0.0197  # Å at 300 kV
    chi = np.pi * wavelength * spec.defocus_A * k2
    amplitude = 1.0 / np.sqrt(k2 + (1 / 400.0) ** 2) * np.exp(-40.0 * k2 / 4)  # ~1/k, B 40 Å²
    phase = (rng.normal(size=k2.shape) + 1j * rng.normal(size=k2.shape)) * amplitude
    image = np.fft.irfft2(phase * (np.sin(chi) + 0.07 * np.cos(chi)), s=(ny, nx))
    image *= spec.contrast / image.std()
    return 1.0 + image


def _shifted(spectrum: np.ndarray, shape: tuple[int, int], dx: float, dy: float) -> np.ndarray:
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    return np.fft.irfft2(spectrum * np.exp(-2j * np.pi * (kx * dx + ky * dy)), s=shape)


def _doming(spec: MovieSpec) -> tuple[np.ndarray, np.ndarray]:
    """The local displacement field per unit of the jump (ny, nx) for x and y: a dome, zero at the centre."""
    ny, nx = spec.shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    u, v = (x - nx / 2) / (nx / 2), (y - ny / 2) / (ny / 2)
    r2 = u * u + v * v
    return spec.doming_px * u * r2 / 2, spec.doming_px * v * r2 / 2


def movie_frames(spec: MovieSpec) -> tuple[Iterator[np.ndarray], np.ndarray, np.ndarray]:
    """(frames, gain reference, true trajectory): raw counts (uint16), one frame at a time, the gain
    reference (float32, normalised = raw × gain) and the trajectory (:func:`beam_trajectory`)."""
    rng = np.random.default_rng([spec.seed, 3])
    shifts = beam_trajectory(spec)
    image = specimen_image(spec)
    camera = rng if spec.camera_seed is None else np.random.default_rng([spec.camera_seed, 4])
    sensitivity = np.clip(camera.normal(1.0, spec.sensitivity_sd, spec.shape), 0.5, 1.5)
    hot = camera.integers(0, spec.shape[0] * spec.shape[1], spec.hot_pixels)
    gain = (1.0 / sensitivity).astype(np.float32)
    spectrum = np.fft.rfft2(image)
    t = np.arange(spec.n_frames, dtype=np.float64)
    dome_t = 1 - np.exp(-(t + 0.5) / spec.tau_frames)
    dome = _doming(spec) if spec.doming_px else None

    def frames() -> Iterator[np.ndarray]:
        from scipy.ndimage import map_coordinates

        for i, (dx, dy) in enumerate(shifts):
            if dome is None:
                frame = _shifted(spectrum, spec.shape, dx, dy)
            else:  # content at x sits at x + s(x): sample the image at x − s(x)
                y, x = np.mgrid[0 : spec.shape[0], 0 : spec.shape[1]].astype(np.float64)
                coords = [y - dy - dome[1] * dome_t[i], x - dx - dome[0] * dome_t[i]]
                frame = map_coordinates(image, coords, order=3, mode="wrap")
            expected = np.clip(frame, 0, None) * spec.e_per_px_frame * sensitivity
            counts = rng.poisson(expected)
            counts.ravel()[hot] += rng.poisson(spec.hot_extra_counts, len(hot))
            yield counts.astype(np.uint16)

    return frames(), gain, shifts
