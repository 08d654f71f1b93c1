"""Phase flipping in strips: the half-plane, phase-once implementation against the definition."""

from __future__ import annotations

import numpy as np
import pytest

from em_platform.cryo.ctf_correction import phase_flip, strip_width_px
from em_platform.cryo.optics import CTFParams, Microscope
from tests.cryo.synthetic import phase_flip_by_definition

SCOPE = Microscope()


# odd sizes: an even one has a Nyquist row whose ±0.5 the two implementations read differently (with
# astigmatism the whole-plane flip is not Hermitian there); that row carries no signal in a real image
@pytest.mark.parametrize(
    ("shape", "pixel_A", "tilt_deg"),
    [((255, 301), 2.0, 60.0), ((301, 255), 1.35, -45.0), ((129, 129), 4.0, 0.0)],
)
def test_phase_flip_is_the_strip_by_strip_definition(shape, pixel_A, tilt_deg):
    rng = np.random.default_rng(7)
    view = (rng.normal(size=shape) * 10 + 100).astype(np.float32)
    params = CTFParams(32000.0, 30500.0, 37.0)
    got = phase_flip(view, pixel_A, params, tilt_deg, SCOPE)
    want = phase_flip_by_definition(view, pixel_A, params, tilt_deg, SCOPE)
    assert got.dtype == np.float32
    assert strip_width_px(tilt_deg, pixel_A, shape[1], 200.0) < shape[1] or tilt_deg == 0.0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want - want.mean()).max())
