"""The final CTF fit weights each ring by its Thon-ring signal (em_platform.cryo.ctf.snr_weighted)."""

from __future__ import annotations

import numpy as np

from em_platform.cryo.ctf import snr_weighted
from em_platform.cryo.optics import CTFParams, Microscope, aberration_phase, frequency_grid

SCOPE = Microscope(300.0, 2.7, 0.07)


def _spectrum(rng, box, pixel_A, params, signal_to_k_A):
    """Unit-RMS noise plus CTF² rings that fade out beyond 1/``signal_to_k_A``."""
    k, az = frequency_grid((box, box), pixel_A)
    rings = np.sin(aberration_phase(k, params.mean_defocus_A, SCOPE)) ** 2
    fade = np.clip(1 - k * signal_to_k_A, 0, 1)
    return rng.normal(size=(box, box)) + 2 * fade * (rings - 0.5), k, az


def test_rings_with_signal_weigh_more_than_rings_of_noise():
    rng = np.random.default_rng(0)
    params = CTFParams(30000.0, 30000.0, 0.0)
    spec, k, az = _spectrum(rng, 512, 4.0, params, 12.0)  # rings out to ~12 Å, noise beyond
    mask = (k >= 1 / 30) & (k <= 1 / 8.8)
    weighted = snr_weighted(spec, k, az, mask, params, SCOPE)
    ratio = np.abs(weighted / np.where(spec == 0, 1, spec))
    low, high = mask & (k < 1 / 20), mask & (k > 1 / 10)
    assert np.median(ratio[low]) > 3 * np.median(ratio[high])
    assert np.array_equal(weighted[~mask], spec[~mask])


def test_a_band_of_fewer_than_three_rings_is_left_alone():
    """At 8 Å/px and 2 µm the 30–17.6 Å band holds less than one ring: no band has a meaningful ρ."""
    rng = np.random.default_rng(1)
    params = CTFParams(20000.0, 20000.0, 0.0)
    spec, k, az = _spectrum(rng, 256, 8.0, params, 20.0)
    mask = (k >= 1 / 30) & (k <= 1 / 17.6)
    assert snr_weighted(spec, k, az, mask, params, SCOPE) is spec
