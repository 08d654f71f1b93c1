"""Cryo algorithms against closed forms and independent references (small images, seconds each)."""

import math

import numpy as np
import pytest
from scipy import ndimage

from em_platform.cryo.alignment import imod_xf, transform_view
from em_platform.cryo.ctf import CTFSearch, estimate_ctf
from em_platform.cryo.dose_weighting import critical_exposure, dose_filters, frame_exposures
from em_platform.cryo.fsc import fsc_curve, resolution_at
from em_platform.cryo.motion import MotionSettings, correct_movie, dose_weighted_sums, motion_metrics
from em_platform.cryo.optics import (
    CTFParams,
    Microscope,
    ThonRings,
    ctf_2d,
    electron_wavelength_A,
    frequency_grid,
)
from em_platform.cryo.reconstruction import reconstruct
from tests.cryo.synthetic import (
    blob_volume,
    blobs,
    ctf_correlation_by_definition,
    fourier_shift,
    project_blobs,
    rotate_shift,
)

SCOPE = Microscope(300.0, 2.7, 0.07)


def test_wavelength_table():
    assert electron_wavelength_A(300) == pytest.approx(0.019687, abs=2e-6)
    assert electron_wavelength_A(200) == pytest.approx(0.02508, abs=2e-5)


def test_thon_rings_score_a_spectrum_as_the_fits_define_it():
    """The fits' precomputed score is the normalised CC of the spectrum with ctf_2d² (the CTF is −sin χ) minus
    its mean, whatever the defocus, astigmatism and angle; and it tells a true model from a wrong angle."""
    n, px = 128, 1.7
    k, az = frequency_grid((n, n), px)
    truth = CTFParams(30500, 29000, 30.0)
    noise = np.random.default_rng(3).normal(size=(n, n))
    spectrum = (ctf_2d((n, n), px, truth, SCOPE) ** 2 + 0.5 * noise).ravel()
    spectrum -= spectrum.mean()
    spectrum /= np.sqrt((spectrum * spectrum).sum())
    rings = ThonRings(k.ravel(), az.ravel(), SCOPE)
    for params in (truth, CTFParams(21000, 19000, -60.0), CTFParams(9000, 9000, 0.0)):
        want = ctf_correlation_by_definition(spectrum, k.ravel(), az.ravel(), params, SCOPE)
        assert rings.correlation(spectrum, params) == pytest.approx(want, abs=1e-12)
    assert (
        rings.correlation(spectrum, truth) > rings.correlation(spectrum, CTFParams(30500, 29000, -30.0)) + 0.1
    )


@pytest.mark.parametrize("truth", [CTFParams(30500, 29500, 30.0), CTFParams(21000, 19000, -60.0)])
def test_ctf_recovers_closed_form_defocus_and_astigmatism(truth):
    rng = np.random.default_rng(1)
    n, px = 512, 2.0
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(n, px), np.fft.fftfreq(n, px)))
    img = np.fft.ifft2(
        np.fft.fft2(rng.normal(size=(n, n))) * ctf_2d((n, n), px, truth, SCOPE) * np.exp(-100 * k**2)
    ).real
    img += 0.5 * img.std() * rng.normal(size=(n, n))
    est = estimate_ctf(img, px, SCOPE, CTFSearch(box=256))
    assert abs(est.mean_defocus_A - truth.mean_defocus_A) / truth.mean_defocus_A < 0.01
    assert abs(est.astigmatism_A - truth.astigmatism_A) < 200
    d = (est.astigmatism_angle_deg - truth.astigmatism_angle_deg) % 180
    assert min(d, 180 - d) < 5
    assert est.fit_resolution_A < 10 and est.cc > 0.2


def test_critical_exposure_and_weights_closed_form():
    assert critical_exposure(np.array([0.1]))[0] == pytest.approx(0.245 * 0.1**-1.665 + 2.81)
    q = dose_filters(frame_exposures(3, 2.0), np.array([[0.1]]))[:, 0, 0]
    ne = 0.245 * 0.1**-1.665 + 2.81
    assert np.allclose(q, np.exp(-np.array([1.0, 3.0, 5.0]) / (2 * ne)))


def test_motion_metrics_as_cryoem_services():
    shifts = np.array([[0, 0], [3, 4], [3, 4], [6, 8]], float)  # steps 5, 0, 5
    m = motion_metrics(shifts, dose_per_frame=2.0, pixel_A=1.0)  # cutoff frame round(4/2) = 2
    assert m["total_motion_px"] == 10 and m["early_motion_px"] == 5 and m["late_motion_px"] == 5
    assert m["average_motion_per_frame_px"] == 2.5


def test_dose_weighted_sum_of_identical_frames_is_filtered_sum():
    rng = np.random.default_rng(0)
    img = ndimage.gaussian_filter(rng.normal(size=(64, 64)), 1).astype(np.float32)
    frames = np.stack([img] * 4)
    total, _, _ = dose_weighted_sums(frames, None, np.zeros((4, 2)), 1.0, 1.0)
    k = np.hypot(np.fft.fftfreq(64)[:, None], np.fft.rfftfreq(64)[None, :])
    q = dose_filters(frame_exposures(4, 1.0), k)
    expect = np.fft.irfft2(np.fft.rfft2(img) * q.sum(0) * np.sqrt(4 / (q**2).sum(0)), s=(64, 64))
    assert np.allclose(total, expect, atol=1e-4)


def test_tiled_sum_with_a_constant_local_shift_equals_the_global_one():
    rng = np.random.default_rng(2)
    img = ndimage.gaussian_filter(rng.normal(size=(120, 120)), 2).astype(np.float32)
    frames = np.stack([fourier_shift(img, (i * 0.7, -i * 0.4)) for i in range(4)]).astype(np.float32)
    drift = np.array([[i * 0.7, -i * 0.4] for i in range(4)])
    half = drift / 2
    glob, _, _ = dose_weighted_sums(frames, None, drift, 1.0, 0.5)
    tiled, _, _ = dose_weighted_sums(
        frames, None, half, 1.0, 0.5, local=lambda p: np.repeat(half[None], len(p), 0), grid=(3, 3)
    )
    # tiles are shifted circularly, so a little ringing at tile edges remains: compare RMS
    diff = (tiled - glob)[12:-12, 12:-12]
    assert np.sqrt((diff**2).mean()) < 0.02 * glob.std()


def test_motion_correction_recovers_drift_at_low_dose():
    rng = np.random.default_rng(2)
    base = ndimage.gaussian_filter(rng.normal(size=(256, 256)), 3)
    base = 1 + 0.3 * base / base.std()
    t = np.linspace(0, 1, 8)
    drift = np.stack([6 * t + 2 * t**2, -4 * t + 3 * np.sin(3 * t)], 1)
    gain = rng.uniform(0.8, 1.2, base.shape).astype(np.float32)
    frames = np.stack(
        [rng.poisson(np.clip(fourier_shift(base, d), 0, None) * 1.5 / gain) for d in drift]
    ).astype(np.uint16)
    res = correct_movie(frames, 2.0, 1.5 / 4, gain=gain, settings=MotionSettings(patches=(3, 3)))
    err = res.shifts_px - (drift - drift.mean(0))
    assert math.sqrt((err**2).sum(1).mean()) < 0.2


def test_wbp_and_sirt_reconstruct_closed_form_projections():
    """Gaussian blobs project in closed form (x' = x cos θ + z sin θ): an independent forward model."""
    rng = np.random.default_rng(0)
    b = blobs(rng, 30, (40, 12, 10))
    angles = np.arange(-60, 61, 3.0)
    proj = np.stack([project_blobs(b, a, (32, 96)) for a in angles]).astype(np.float32)
    truth = blob_volume(b, (32, 32, 96))
    for method in ("wbp", "sirt"):
        rec = reconstruct(proj, angles, 32, method=method, iterations=30)
        cc = np.corrcoef(rec.ravel(), truth.ravel())[0, 1]
        assert cc > 0.75, (method, cc)  # the ±60° missing wedge limits the correlation
        # mirrored in z it must not fit: the handedness is the contract's
        assert np.corrcoef(rec[::-1].ravel(), truth.ravel())[0, 1] < cc - 0.1


def test_transform_view_undoes_rotation_and_shift():
    rng = np.random.default_rng(3)
    img = ndimage.gaussian_filter(rng.normal(size=(96, 96)), 2)
    raw = rotate_shift(img, 7.0, (3.0, -2.0))
    back = transform_view(raw, 7.0, (3.0, -2.0), order=3)
    assert np.abs(back - img)[20:-20, 20:-20].max() < 0.05 * np.abs(img).max()


def test_imod_xf_maps_raw_to_aligned():
    a11, a12, a21, a22, dx, dy = imod_xf(np.array([[2.0, -1.0]]), 90.0, (64, 64))[0]
    # axis at 90°: rotate by −90°; the shift (2, −1) becomes (−1, −2), undone
    assert np.allclose([a11, a12, a21, a22], [0, 1, -1, 0], atol=1e-9)
    assert np.allclose([dx, dy], [1, 2])


def test_fsc_of_noisy_copies_crosses_where_the_snr_says():
    rng = np.random.default_rng(4)
    vol = ndimage.gaussian_filter(rng.normal(size=(48, 48, 48)), 1.5)
    a = vol + 0.02 * rng.normal(size=vol.shape)
    freqs, curve = fsc_curve(a, vol, 2.0)
    assert curve[:5].min() > 0.9
    assert resolution_at(freqs, curve, 0.5) < resolution_at(
        *fsc_curve(rng.normal(size=vol.shape) + vol, vol, 2.0), 0.5
    )
