"""Tomogram denoising with well-kept libraries, chosen by measurement (bench/bench_cryo.py: PSNR gain against
the noiseless reconstruction, and CPU time).

Candidates (torch, hence Topaz/cryoCARE, is not usable in the project's Python 3.12 venv):
- ``n2n_wiener``: Noise2Noise with a classical estimator. The even- and odd-frame tomograms carry the same
  signal and independent noise, so their Fourier shell correlation measures the SNR per shell; the Wiener
  filter of the full tomogram is FSC_full = 2·FSC/(1 + FSC) per shell (cryoCARE's even/odd idea, a linear
  estimator instead of a U-Net). Needs the halves; without them it falls back to ``gaussian``.
- ``nl_means``: scikit-image non-local means per z slice (fast mode, h = 0.8 σ, σ estimated per volume).
- ``wavelet``: scikit-image BayesShrink wavelet thresholding (PyWavelets), 3-D.
- ``tv``: scikit-image total-variation (Chambolle) in 3-D.
- ``bm3d``: the reference BM3D implementation (``bm3d`` package) per z slice.
- ``gaussian``: a plain low-pass (σ = 1 voxel), the baseline any method must beat.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from em_platform.cryo.fsc import fsc_curve
from em_platform.lazy_import import LazyModule

ndimage = LazyModule("scipy.ndimage")

# Chosen by bench/bench_cryo.py (bench/results/cryo.json "accuracy" → "denoise"): the largest PSNR gain against
# the noiseless reconstruction of a 1024² × 41-tilt simulated series: TV 6.0 dB in 1.1 CPU s, non-local means
# 5.6 dB (2.9 s), BM3D 5.5 dB (130 s), wavelets 1.5 dB, the even/odd Wiener filter 1.3 dB, Gaussian −3.1 dB.
DEFAULT_METHOD = "tv"


def _sigma(volume: np.ndarray) -> float:
    from skimage.restoration import estimate_sigma

    mid = volume[volume.shape[0] // 2]
    return float(estimate_sigma(mid))


def shell_filter(volume: np.ndarray, weights_per_shell: np.ndarray) -> np.ndarray:
    """Multiply the volume's spectrum by a per-shell weight (shells as in ``fsc_curve``)."""
    ft = np.fft.rfftn(volume)
    grids = [np.fft.fftfreq(n) for n in volume.shape[:-1]] + [np.fft.rfftfreq(volume.shape[-1])]
    k = np.sqrt(sum(g**2 for g in np.meshgrid(*grids, indexing="ij", sparse=True)))
    shell = np.minimum(np.rint(k * max(volume.shape)).astype(np.int64), len(weights_per_shell) - 1)
    return np.fft.irfftn(ft * weights_per_shell[shell], s=volume.shape).astype(np.float32)


def n2n_wiener(volume: np.ndarray, even: np.ndarray, odd: np.ndarray) -> np.ndarray:
    """Per-shell Wiener filter of ``volume`` learnt from the independent halves ``even`` and ``odd``."""
    _, half = fsc_curve(even, odd, 1.0)
    half = np.clip(half, 0.0, 0.999)
    full = 2 * half / (1 + half)
    weights = np.concatenate([[1.0], full])  # shell 0 (the mean) kept
    # a shell with no signal should not let noise through: smooth the weights a little over neighbours
    weights[1:] = ndimage.uniform_filter1d(weights[1:], 3, mode="nearest")
    return shell_filter(np.asarray(volume, np.float32), weights)


def nl_means(volume: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    sigma = _sigma(volume)
    out = np.empty_like(volume, dtype=np.float32)
    for z in range(volume.shape[0]):
        out[z] = denoise_nl_means(
            volume[z], h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6
        )
    return out


def wavelet(volume: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_wavelet

    return denoise_wavelet(
        np.asarray(volume, np.float64), method="BayesShrink", mode="soft", rescale_sigma=True
    ).astype(np.float32)


def tv(volume: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(np.asarray(volume, np.float32), weight=0.5 * _sigma(volume)).astype(
        np.float32
    )


def bm3d_slices(volume: np.ndarray) -> np.ndarray:
    import bm3d

    sigma = _sigma(volume)
    return np.stack(
        [bm3d.bm3d(s, sigma_psd=sigma).astype(np.float32) for s in np.asarray(volume, np.float32)]
    )


def gaussian(volume: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(np.asarray(volume, np.float32), 1.0)


SINGLE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "nl_means": nl_means,
    "wavelet": wavelet,
    "tv": tv,
    "bm3d": bm3d_slices,
    "gaussian": gaussian,
}
METHODS = ("n2n_wiener", *SINGLE)


def denoise(
    volume: np.ndarray,
    method: str = DEFAULT_METHOD,
    even: np.ndarray | None = None,
    odd: np.ndarray | None = None,
) -> tuple[np.ndarray, str]:
    """The denoised volume and the method actually used (n2n_wiener without halves falls back)."""
    if method not in METHODS:
        raise ValueError(f"denoising method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "n2n_wiener":
        if even is None or odd is None:
            return gaussian(volume), "gaussian"
        return n2n_wiener(volume, even, odd), method
    return SINGLE[method](np.asarray(volume, np.float32)), method


def matched_psnr(estimate: np.ndarray, clean: np.ndarray) -> float:
    """PSNR (dB) of ``estimate`` against ``clean`` after the best affine intensity match (scale + offset).

    Reconstructions of the noisy and the noiseless stack differ in scale and offset by construction, so the
    comparison is made after the least-squares a·x + b fit; the peak is the clean volume's range.
    """
    x = np.asarray(estimate, np.float64).ravel()
    y = np.asarray(clean, np.float64).ravel()
    a, b = np.polyfit(x, y, 1) if x.std() > 0 else (0.0, y.mean())
    mse = float(np.mean((a * x + b - y) ** 2))
    peak = float(y.max() - y.min())
    return 10 * math.log10(peak**2 / mse) if mse > 0 else math.inf
