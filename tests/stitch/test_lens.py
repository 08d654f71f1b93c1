"""The scope's lens correction estimated from one montage's point matches (:mod:`em_platform.stitch.lens`),
at 10 × 10 and 50 × 50 tiles of 1024² (issue 14, item 2).

The point matches are the synthetic montage's (:meth:`~tests.stitch.synthetic.HardMontage.point_matches`:
no pixels rendered): specimen points in each overlap seen by both tiles through a known lens (Brown–Conrady
radial and decentering terms, 8.6 px at the tile corners), tiles turned by up to ±0.5°, Gaussian noise of
``NOISE_PX`` per axis on every point. The noise floor of the residual per point pair is then
``NOISE_PX · √π`` (the mean length of the difference of two such errors).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from em_platform.stitch.lens import estimate_lens
from tests.stitch.synthetic import HardMontageConfig, make_montage

TILE = 1024
NOISE_PX = 0.2
FLOOR_PX = NOISE_PX * math.sqrt(math.pi)  # 0.354 px
LENS = (0.004, 0.0005, -0.0008)  # k1, p1, p2 in half tiles
SIZES = [
    # tiles per side, field tolerance (RMS, max) px: the part of the lens the overlaps barely see (even
    # terms across an edge, the corners) is held by the ridge and moved by the noise
    pytest.param(10, (0.2, 0.6), id="10x10"),
    pytest.param(50, (0.1, 0.35), id="50x50"),
]


def matches(n: int, lens):
    m = make_montage(
        HardMontageConfig(rows=n, columns=n, tile_px=TILE, overlap=0.08, rotation_deg=0.5, lens=lens, seed=11)
    )
    return m, m.point_matches(points_per_edge=12, noise_px=NOISE_PX, seed=2)


def field_error(estimated, true) -> np.ndarray:
    """|D_estimated − D_true| (px) on a 65 × 65 grid over the whole tile, corners included."""
    g = np.linspace(0, TILE - 1, 65)
    xy = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)
    return np.hypot(*(estimated.displacement(xy) - true.displacement(xy)).T)


@pytest.mark.parametrize(("n", "tolerance"), SIZES)
def test_a_lens_is_recovered_from_point_matches_down_to_the_noise_floor(n, tolerance):
    m, pm = matches(n, LENS)
    fit = estimate_lens(pm.edges, (TILE, TILE), order=3)  # the synthetic lens is radial (order 3)
    error = field_error(fit.model, m.lens)
    rms, worst = float(np.sqrt(np.mean(error**2))), float(error.max())
    print(
        f"\n{n}x{n}: {fit.pairs} point pairs; residual per pair {fit.residual_before_px:.3f} -> "
        f"{fit.residual_after_px:.3f} px (floor {FLOOR_PX:.3f}); lens max {m.lens.max_displacement():.2f} px, "
        f"estimated {fit.model.max_displacement():.2f}; field error RMS {rms:.3f}, max {worst:.3f} px"
    )
    assert fit.tiles == n * n and fit.rejected_pairs == 0
    assert fit.residual_before_px > 3 * FLOOR_PX  # the lens is what the matches disagree by
    # the correction takes it down to the noise (slightly below: the solve fits ~6 % of the pairs' freedom)
    assert 0.93 * FLOOR_PX < fit.residual_after_px < 1.02 * FLOOR_PX
    assert m.lens.max_displacement() > 8.0
    assert rms < tolerance[0] and worst < tolerance[1]


@pytest.mark.parametrize(("n", "tolerance"), SIZES)
def test_rotated_tiles_without_a_lens_give_no_lens(n, tolerance):
    """The tiles' own rotations are solved with the lens (rigid tiles), not taken for a distortion."""
    m, pm = matches(n, None)
    assert m.lens.is_identity()
    fit = estimate_lens(pm.edges, (TILE, TILE), order=3)  # the synthetic lens is radial (order 3)
    by_translation = estimate_lens(pm.edges, (TILE, TILE), order=3, model="translation")
    print(
        f"\n{n}x{n}, ±0.5° tiles, no lens: estimated lens {fit.model.max_displacement():.3f} px with rigid "
        f"tiles, {by_translation.model.max_displacement():.2f} px with translations only"
    )
    assert fit.model.max_displacement() < tolerance[1]
    assert fit.residual_before_px < 1.01 * FLOOR_PX and fit.residual_after_px < 1.01 * FLOOR_PX
    # what a translation per tile makes of the same matches: the rotations read as a lens of pixels
    assert by_translation.model.max_displacement() > 4.0
    assert by_translation.residual_after_px > 1.5 * FLOOR_PX


def test_an_unknown_tile_model_is_refused():
    _, pm = matches(3, None)
    with pytest.raises(ValueError, match="rigid or translation"):
        estimate_lens(pm.edges, (TILE, TILE), model="affine")
