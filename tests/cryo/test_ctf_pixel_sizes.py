"""CTF estimation at every pixel size a facility records: single micrographs at 1–2 Å/px, tilt series at
4–8 Å/px (tilted views, 3 e/Å² each), with the fit band derived from the pixel size and the defocus range
(em_platform.cryo.ctf.band_at) and, for a series, the search around the mdoc's target then the consensus."""

from __future__ import annotations

import numpy as np
import pytest

from em_platform.cryo.ctf import (
    CTFSearch,
    TiltedView,
    band_at,
    defocus_window,
    estimate_ctf,
    fit_series_astigmatism,
)
from em_platform.cryo.optics import CTFParams, Microscope
from em_platform.cryo.processing import CONSENSUS_WINDOW, NOMINAL_WINDOW
from tests.cryo.synthetic import thon_micrograph

SCOPE = Microscope(300.0, 2.7, 0.07)


def test_the_fit_band_follows_the_pixel_size_and_the_defocus():
    user = CTFSearch()  # CTFFIND's 30–5 Å
    assert band_at(user, 512, 1.0, 20000, SCOPE) == (30.0, 5.0)  # as a user sets it at 1 Å/px
    low, high = band_at(user, 256, 8.0, 30000, SCOPE)
    assert high == pytest.approx(17.6) and low == 30.0  # 2.2 px, inside Nyquist (16 Å)
    low, high = band_at(user, 128, 16.0, 30000, SCOPE)
    assert high == pytest.approx(35.2) and low == pytest.approx(52.8)  # never an empty band
    # at 1 Å/px and 9 µm a 512² spectrum samples rings by 2 px only to ~14 Å: the band ends there
    assert band_at(user, 512, 1.0, 90000, SCOPE)[1] == pytest.approx(2 * 2 * SCOPE.wavelength_A * 90000 / 512)


@pytest.mark.parametrize("pixel_A", [1.0, 2.0])
@pytest.mark.parametrize("defocus_A", [8000.0, 25000.0, 50000.0])
def test_a_single_micrograph_within_one_percent(pixel_A, defocus_A):
    rng = np.random.default_rng(int(pixel_A * 10 + defocus_A / 1000))
    truth = CTFParams(defocus_A + 300, defocus_A - 300, 35.0)
    image = thon_micrograph(rng, 1024, pixel_A, truth, SCOPE, dose_e_per_A2=20.0)
    est = estimate_ctf(image, pixel_A, SCOPE, CTFSearch(box=512))  # the whole 0.2–9 µm search
    assert abs(est.mean_defocus_A - defocus_A) / defocus_A < 0.01, (est.mean_defocus_A, est.band_A)


@pytest.mark.parametrize("pixel_A, defocus_A", [(4.0, 20000.0), (8.0, 20000.0), (8.0, 50000.0)])
def test_a_tilted_series_within_two_percent(pixel_A, defocus_A):
    rng = np.random.default_rng(int(pixel_A + defocus_A))
    truth = CTFParams(defocus_A + 300, defocus_A - 300, 35.0)
    angles = (-60.0, -30.0, 0.0, 30.0, 60.0)
    views = [TiltedView(a, 10.0) for a in angles]
    images = [
        thon_micrograph(rng, 512, pixel_A, truth, SCOPE, 3.0, b_factor_A2=400.0, tilt_deg=a, axis_deg=10.0)
        for a in angles
    ]
    search = CTFSearch(box=256)
    # as estimate_ctf_series does: the mdoc's target (15 % off here) ± 50 %, then the consensus window
    first = [defocus_window(defocus_A * 1.15, NOMINAL_WINDOW)] * len(angles)
    est = [
        estimate_ctf(im, pixel_A, SCOPE, search, w, v) for im, w, v in zip(images, first, views, strict=True)
    ]
    consensus = float(np.median([e.mean_defocus_A for e in est]))
    windows = [defocus_window(consensus, *CONSENSUS_WINDOW)] * len(angles)
    est = [
        estimate_ctf(im, pixel_A, SCOPE, search, w, v)
        for im, w, v in zip(images, windows, views, strict=True)
    ]
    est = fit_series_astigmatism(est, SCOPE, search, windows)
    errors = [abs(e.mean_defocus_A - defocus_A) / defocus_A for e in est]
    assert max(errors) < 0.02, errors
    assert all(e.band_A[1] >= 2.2 * pixel_A - 1e-9 for e in est)  # never fitted beyond 2.2 px
