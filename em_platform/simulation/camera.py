"""Image formation of the simulated TEM: specimen → optics (blur, vignetting) → camera (gain, noise, counts).

For a tile whose top-left pixel sits at plane position (x, y) (floats: the true stage position):

1. transmission ``T`` of the specimen, blurred by a Gaussian point-spread function of
   ``sigma = sqrt(psf_sigma² + (blur_px_per_um · |defocus|)²)`` px; the kernel is centred on the
   sub-pixel position, so blurring also does the sub-pixel shift and every tile samples one plane;
2. mean signal ``S = bright_level · exposure · F · T`` counts above dark, where the flat field
   ``F = V · G`` is the beam's vignetting ``V = 1 − vignetting · (r / r_corner)²`` (``r`` measured from
   the beam centre, ``r_corner`` = frame centre to corner) times a fixed per-pixel gain ``G ~ 1 + N(0, g)``;
3. noise: electron shot noise (Poisson with mean ``S / k`` electrons, ``k = bright_level / dose``
   counts per electron; by its normal approximation when the dose is ≥ 30 e⁻/px) and Gaussian read
   noise; ``counts = dark_offset + S + noise``, rounded and clipped to the camera's range.

Reference frames: a *brightfield* frame is taken with the stage moving, so the specimen averages out to
its mean transmission (``S = bright_level · F · mean(T)``); a *darkfield* frame with the beam blanked
(``S = 0``). Averaging them gives what flatfield correction ``(raw − dark) / (bright − dark)`` needs.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import cv2
import numpy as np

from em_platform.simulation.scope_config import ScopeConfig
from em_platform.simulation.specimen import Specimen

_EXACT_POISSON_BELOW_DOSE = 30.0  # e⁻/px: below this, shot noise is drawn from the Poisson distribution

# 256 equiprobable quantiles of N(0, 1) (rescaled to unit variance): normal noise from random bytes,
# ~5x faster than numpy's normal generator and indistinguishable once added and rounded to counts
_NORMAL_LUT = np.array([NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)], np.float32)
_NORMAL_LUT /= np.float32(_NORMAL_LUT.std())


def blur_sigma_px(config: ScopeConfig, defocus_um: float) -> float:
    """Gaussian sigma (px) of the image of a tile taken at ``defocus_um``."""
    return math.hypot(config.psf_sigma_px, config.blur_px_per_um * abs(defocus_um))


def beam_center_px(config: ScopeConfig) -> tuple[float, float]:
    """Centre (x, y) of the vignetting in frame pixel coordinates (pixel centres at integers)."""
    c = (config.tile_size - 1) / 2.0
    return c + config.vignetting_center[0] * config.tile_size, c + config.vignetting_center[
        1
    ] * config.tile_size


def vignetting_field(config: ScopeConfig) -> np.ndarray:
    """The beam's relative intensity over the frame (float32): ``1 − vignetting · (r / r_corner)²``."""
    n = config.tile_size
    cx, cy = beam_center_px(config)
    r_corner2 = 2.0 * ((n - 1) / 2.0) ** 2
    x = ((np.arange(n, dtype=np.float64) - cx) ** 2)[None, :]
    y = ((np.arange(n, dtype=np.float64) - cy) ** 2)[:, None]
    return (1.0 - config.vignetting * (x + y) / r_corner2).astype(np.float32)


def gain_field(config: ScopeConfig) -> np.ndarray:
    """The camera's fixed per-pixel gain (float32, mean 1, std ``gain_variation``)."""
    rng = np.random.default_rng([config.seed, 0xCA3E])
    gain = standard_normal(rng, (config.tile_size, config.tile_size))
    gain *= np.float32(config.gain_variation)
    gain += np.float32(1.0)
    return gain


def flat_field(config: ScopeConfig) -> np.ndarray:
    """Vignetting x gain: what a perfect brightfield reference measures (relative to its centre)."""
    flat = vignetting_field(config)
    flat *= gain_field(config)
    return flat


def standard_normal(
    rng: np.random.Generator, shape: tuple[int, int], out: np.ndarray | None = None
) -> np.ndarray:
    """N(0, 1) float32 noise from random bytes through a quantile table."""
    raw = np.frombuffer(rng.bytes(shape[0] * shape[1]), np.uint8).reshape(shape)
    return cv2.LUT(raw, _NORMAL_LUT, dst=out)


def psf_kernel(sigma: float, frac: float, margin: int) -> np.ndarray:
    """Taps ``h[t] = g(frac + margin − t)``, t = 0 … 2·margin+1, of a normalised Gaussian of ``sigma``.

    Correlating a window that starts ``margin`` px before the integer part of a position with ``h``
    samples the blurred image at that position's fractional offset ``frac``.
    """
    t = np.arange(2 * margin + 2, dtype=np.float64)
    k = np.exp(-0.5 * ((frac + margin - t) / sigma) ** 2)
    return (k / k.sum()).astype(np.float32).reshape(-1, 1)


class Camera:
    """The microscope's optics and camera for one configuration.

    It keeps its working buffers between frames (about six frames of float32: ~0.6 GB for 5000² tiles).
    """

    def __init__(self, config: ScopeConfig, specimen: Specimen | None = None):
        self.config = config
        self.specimen = specimen or Specimen(config.specimen_seed_value, config.pixel_size_nm)
        n = config.tile_size
        self._signal_scale = flat_field(config)  # counts of the open beam per pixel (T = 1)
        self._signal_scale *= np.float32(config.bright_level)
        self._counts_per_electron = config.bright_level / config.dose
        self._windows: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # by window size: (specimen, blurred)
        self._signal = np.empty((n, n), np.float32)
        self._spread = np.empty((n, n), np.float32)
        self._noise = np.empty((n, n), np.float32)
        self._mean_transmission: float | None = None

    # -- frames --------------------------------------------------------------------------------------

    def tile(
        self, x: float, y: float, defocus_um: float, rng: np.random.Generator, *, exposure: float = 1.0
    ) -> np.ndarray:
        """A frame of the specimen with its top-left pixel at plane position (x, y)."""
        transmission = self.transmission(x, y, blur_sigma_px(self.config, defocus_um))
        return self._expose(transmission, rng, exposure)

    def blank(self, rng: np.random.Generator) -> np.ndarray:
        """A frame with the beam blanked: dark offset and read noise only (also a darkfield frame)."""
        return self._expose(None, rng, 0.0)

    def film(self, rng: np.random.Generator, transmission: float = 0.9) -> np.ndarray:
        """A frame of the support film (or resin) where no section lies: uniform transmission, so flat but
        for vignetting and shot noise."""
        return self._expose(np.float32(transmission), rng, 1.0)

    def darkfield(self, rng: np.random.Generator) -> np.ndarray:
        return self.blank(rng)

    def brightfield(self, rng: np.random.Generator) -> np.ndarray:
        """A frame taken with the stage moving: the specimen averages out to its mean transmission."""
        return self._expose(np.float32(self.mean_transmission), rng, 1.0)

    @property
    def mean_transmission(self) -> float:
        """Mean transmission of the specimen (over a 1024² px region at the montage origin)."""
        if self._mean_transmission is None:
            x, y = self.config.origin_px
            t = self.specimen.render_lattice(math.floor(x), math.floor(y), 1024, 1024)
            self._mean_transmission = float(t.mean(dtype=np.float64))
        return self._mean_transmission

    # -- steps -----------------------------------------------------------------------------------------

    def transmission(self, x: float, y: float, sigma: float) -> np.ndarray:
        """Blurred specimen transmission of the frame at (x, y) (a view of an internal buffer)."""
        n = self.config.tile_size
        ix, iy = math.floor(x), math.floor(y)
        margin = max(2, math.ceil(3.0 * sigma))
        size = n + 2 * margin + 1
        if size not in self._windows:
            if len(self._windows) >= 2:  # in focus and one defocus, typically
                self._windows.clear()
            self._windows[size] = (np.empty((size, size), np.float32), np.empty((size, size), np.float32))
        window, blurred = self._windows[size]
        self.specimen.render_lattice(ix - margin, iy - margin, size, size, out=window)
        kx = psf_kernel(sigma, x - ix, margin)
        ky = psf_kernel(sigma, y - iy, margin)
        cv2.sepFilter2D(
            window, cv2.CV_32F, kx, ky, dst=blurred, anchor=(0, 0), borderType=cv2.BORDER_REPLICATE
        )
        return blurred[:n, :n]

    def _expose(
        self, transmission: np.ndarray | np.float32 | None, rng: np.random.Generator, exposure: float
    ) -> np.ndarray:
        c = self.config
        n = c.tile_size
        k = self._counts_per_electron
        signal = self._signal  # mean counts above dark
        if transmission is None or exposure == 0.0:
            signal.fill(0.0)
        else:
            np.multiply(self._signal_scale, transmission, out=signal)
            if exposure != 1.0:
                signal *= np.float32(exposure)
        noise = standard_normal(rng, (n, n), out=self._noise)
        if c.dose < _EXACT_POISSON_BELOW_DOSE:
            signal[...] = rng.poisson(signal / np.float32(k)) * k
            noise *= np.float32(c.read_noise)
            signal += noise
        else:
            # shot noise (variance k·S counts²) and read noise in one normal draw
            spread = self._spread
            np.multiply(signal, np.float32(k), out=spread)
            spread += np.float32(c.read_noise**2)
            np.sqrt(spread, out=spread)
            spread *= noise
            signal += spread
        signal += np.float32(c.dark_offset)
        np.clip(signal, 0.0, c.full_scale, out=signal)
        if c.dtype == "uint8":
            return cv2.convertScaleAbs(signal)  # rounds to nearest
        return np.rint(signal).astype(np.uint16)
