"""Rigid and affine montage solves on synthetic montages with known per-tile transforms (no pixels).

Each tile's truth is a rotation and scale about its centre plus a position; the point pairs are
specimen points in the overlaps, seen through each tile's inverse transform, with Gaussian noise.
A pair's residual then has about ``2 · noise`` RMS length (both points are noisy, in x and y).
"""

from __future__ import annotations

import numpy as np
import pytest

from em_platform.stitch.layout import Edge, Layout, PointEdge, TransformLayout
from em_platform.stitch.solve import solve_translations
from em_platform.stitch.solve_affine import solve_transforms
from em_platform.stitch.tile_priors import MIN_TILE_SPREAD

SIZE, STEP = 512, 460  # 512 px tiles, 10 % overlap
CENTRE = np.array([SIZE / 2, SIZE / 2])
PATCHES = 6  # point pairs per edge, spread along the shared edge like the matcher's patches


def similarity(degrees: float, scale: float = 1.0) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return scale * np.array([[c, -s], [s, c]])


def montage(
    rows=10,
    columns=10,
    degrees=0.5,
    scale=0.005,
    noise=0.2,
    seed=0,
    missing=(),
    special=None,
):
    """Truth {tile: (A, centre)}, stage top-left corners and point edges of a rows × columns grid.

    Tiles are rotated by up to ±``degrees`` and scaled by up to ±``scale`` about their centres;
    ``special`` overrides the linear part of chosen tiles.
    """
    rng = np.random.default_rng(seed)
    truth, stage = {}, {}
    for r in range(rows):
        for c in range(columns):
            if (r, c) in missing:
                continue
            linear = similarity(rng.uniform(-degrees, degrees), 1 + rng.uniform(-scale, scale))
            linear = (special or {}).get((r, c), linear)
            centre = np.array([c * STEP, r * STEP]) + CENTRE + rng.uniform(-20, 20, 2)
            truth[(r, c)] = (linear, centre)
            stage[(r, c)] = tuple(centre - CENTRE + rng.normal(0, 2.0, 2))

    def seen_by(tile, points):
        linear, centre = truth[tile]
        return np.linalg.solve(linear, (points - centre).T).T + CENTRE

    middle = (SIZE - STEP) / 2  # the middle of the overlap strip, across it
    along = np.linspace(40, SIZE - 40, PATCHES)
    edges = []
    for (r, c), (_, centre) in truth.items():
        corner = centre - CENTRE
        for neighbour, local in (
            ((r - 1, c), np.stack([along, np.full(PATCHES, middle)], axis=1)),  # top strip
            ((r, c - 1), np.stack([np.full(PATCHES, middle), along], axis=1)),  # left strip
        ):
            if neighbour not in truth:
                continue
            specimen = corner + local  # near enough to where the tile shows them
            p = seen_by((r, c), specimen) + rng.normal(0, noise, (PATCHES, 2))
            q = seen_by(neighbour, specimen) + rng.normal(0, noise, (PATCHES, 2))
            edges.append(PointEdge((r, c), neighbour, p, q))
    return truth, stage, edges


def solve(stage, edges, model):
    return solve_transforms(stage, edges, model, tile_size=(SIZE, SIZE))


def angle(linear: np.ndarray) -> float:
    """Rotation (degrees) of the similarity nearest to a 2×2 linear part."""
    return float(np.degrees(np.arctan2(linear[1, 0] - linear[0, 1], linear[0, 0] + linear[1, 1])))


def corner_errors(layout: TransformLayout, truth) -> np.ndarray:
    """Distance (px) of every tile's solved corners from the true ones, after removing the best
    global affine map: a common rotation, scale or shear of the whole montage moves no point pair."""
    corners = np.array([[0, 0], [SIZE, 0], [0, SIZE], [SIZE, SIZE]], float)
    solved, true = [], []
    for tile, (linear, centre) in truth.items():
        m = layout.transforms[tile]
        solved.append(corners @ m[:, :2].T + m[:, 2])
        true.append((corners - CENTRE) @ linear.T + centre)
    x = np.hstack([np.concatenate(solved), np.ones((4 * len(truth), 1))])
    true = np.concatenate(true)
    fit, *_ = np.linalg.lstsq(x, true, rcond=None)
    return np.hypot(*(x @ fit - true).T)


def test_affine_recovers_rotated_and_scaled_tiles_where_translation_cannot():
    noise = 0.2
    truth, stage, edges = montage(noise=noise)
    fits = {model: solve(stage, edges, model) for model in ("translation", "rigid", "affine")}
    affine = fits["affine"]

    # seams: the affine model explains the pairs down to their noise; rigid cannot express the ±0.5 %
    # scale, translation neither that nor the ±0.5° rotation
    assert affine.rms_residual() <= 2 * noise
    assert max(affine.edge_residuals.values()) < 5 * noise
    assert 2 * affine.rms_residual() < fits["rigid"].rms_residual() < fits["translation"].rms_residual() / 1.5
    assert fits["translation"].rms_residual() > 1.0
    for fit in fits.values():
        assert fit.rejected == {} and fit.rejected_points == {} and fit.disconnected == []

    # where every tile's corners land: within a pixel or two of the truth, and far better than translation
    # (a pixel, not a tenth: matches along strips leave each tile row's and column's common shear to
    # the regularisation, see normal_equations' docstring)
    rms = {model: float(np.sqrt(np.mean(corner_errors(fit, truth) ** 2))) for model, fit in fits.items()}
    assert rms["affine"] < 1.5 and rms["affine"] < 0.6 * rms["translation"]

    # each tile's rotation and scale, against a truth spread of ±0.5° and ±0.5 %
    turn = np.array([angle(affine.transforms[t][:, :2]) - angle(a) for t, (a, _) in truth.items()])
    size = np.array(
        [
            np.sqrt(np.linalg.det(affine.transforms[t][:, :2]) / np.linalg.det(a)) - 1
            for t, (a, _) in truth.items()
        ]
    )
    true_turn = np.array([angle(a) for a, _ in truth.values()])
    true_size = np.array([np.sqrt(np.linalg.det(a)) - 1 for a, _ in truth.values()])
    assert np.sqrt(np.mean(turn**2)) < np.std(true_turn) / 3 and np.abs(turn).max() < 0.3
    assert np.sqrt(np.mean(size**2)) < np.std(true_size) / 2 and np.abs(size).max() < 0.004
    # and the scale-distortion figure reads the ±0.5 % back
    assert 0.003 < max(affine.scale_distortion.values()) < 0.01


def test_rigid_recovers_rotations_and_stays_rigid():
    noise = 0.1
    truth, stage, edges = montage(scale=0.0, noise=noise, seed=2)
    rigid, translation = solve(stage, edges, "rigid"), solve(stage, edges, "translation")
    assert rigid.rms_residual() <= 2 * noise < translation.rms_residual() / 5
    for m in rigid.transforms.values():
        np.testing.assert_allclose(m[:, :2] @ m[:, :2].T, np.eye(2), atol=1e-12)  # a rotation exactly
    assert max(rigid.scale_distortion.values()) < 1e-12
    # rotations up to the whole montage's (which no pair sees): a twentieth of a degree, from ±0.5°
    turn = np.array([angle(rigid.transforms[t][:, :2]) - angle(a) for t, (a, _) in truth.items()])
    assert np.abs(turn - turn.mean()).max() < 0.05 and abs(turn.mean()) < 0.05
    assert np.sqrt(np.mean(corner_errors(rigid, truth) ** 2)) < 0.3


def position_rms(layout: TransformLayout, truth) -> float:
    """RMS distance (px) of the solved top-left corners (centre kept) from the true ones, after removing
    only the common translation (no pair sees it): a common rotation, scale or shear counts."""
    d = np.array([np.subtract(layout.translations[t], centre - CENTRE) for t, (_, centre) in truth.items()])
    d -= d.mean(axis=0)
    return float(np.sqrt((d**2).sum(axis=1).mean()))


@pytest.mark.parametrize("model", ["rigid", "affine"])
def test_the_stage_holds_the_montage_in_place_not_in_shape(model):
    """A common rotation, scale or shear of every tile, the centres moved along, changes no point pair. Stage
    readings sheared by 4·10⁻⁴ (too little for the stage frame to tell from their scatter) must not set
    it: the tiles keep the images' frame. Trusting the stage's frame, they took its shear over."""
    truth, stage, edges = montage(degrees=0.0, scale=0.0, noise=0.1, seed=1)
    sheared = {t: (x + 4e-4 * y, y) for t, (x, y) in stage.items()}
    common = {}
    for fit in (True, False):
        layout = solve_transforms(
            sheared, edges, model, tile_size=(SIZE, SIZE), fit_spread=False, fit_stage_frame=fit
        )
        common[fit] = np.abs(
            np.mean([m[:, :2] for m in layout.transforms.values()], axis=0) - np.eye(2)
        ).max()
        if fit:
            assert layout.rejected == {} and layout.disconnected == []
            if model == "rigid":
                assert position_rms(layout, truth) < 0.15
    assert common[True] < 1e-4 < common[False]


def test_the_spread_of_the_tiles_deformation_is_measured():
    """Tiles with no deformation: the spreads fall to the floor and the flexible models place the tiles
    as the translation model does, where the largest spreads leave the matcher's noise in their scale.
    Tiles turned by ±0.5° (uniform: σ 0.005 rad): the rotation spread reads it back."""
    truth, stage, edges = montage(degrees=0.0, scale=0.0, noise=0.1, seed=1)
    fits = {model: solve(stage, edges, model) for model in ("translation", "rigid", "affine")}
    for name in ("scale", "rotation", "diagonal", "off_diagonal"):
        assert fits["affine"].stage[f"{name}_spread"] == pytest.approx(MIN_TILE_SPREAD, rel=0.1)
    assert fits["rigid"].stage["rotation_spread"] == pytest.approx(MIN_TILE_SPREAD, rel=0.1)
    exact = position_rms(fits["translation"], truth)
    assert exact < 0.1
    assert (
        position_rms(fits["rigid"], truth) < 1.2 * exact and position_rms(fits["affine"], truth) < 1.2 * exact
    )
    widest = solve_transforms(stage, edges, "affine", tile_size=(SIZE, SIZE), fit_spread=False)
    assert position_rms(widest, truth) > 3 * exact

    truth, stage, edges = montage(degrees=0.5, scale=0.0, noise=0.1, seed=2)
    assert 0.004 < solve(stage, edges, "rigid").stage["rotation_spread"] < 0.0065


def test_the_spreads_of_a_large_montage_are_estimated_as_a_small_one_sums_them(monkeypatch):
    """Beyond EXACT_TRACE_TILES the posterior variances are summed by Hutchinson's estimator: the same
    spreads within a few percent."""
    import em_platform.stitch.normal_equations as normal_equations

    _, stage, edges = montage(seed=3)
    estimated = solve(stage, edges, "affine").stage
    monkeypatch.setattr(normal_equations, "EXACT_TRACE_TILES", 1000)
    exact = solve(stage, edges, "affine").stage
    for name in ("scale", "rotation", "diagonal", "off_diagonal"):
        assert estimated[f"{name}_spread"] == pytest.approx(exact[f"{name}_spread"], rel=0.05)


# apart from each other, so each is outvoted by its tiles' other edges; one on the border, where its
# tiles have only three
WRONG_EDGES = {
    ((2, 3), (2, 2)): (25.0, -12.0),
    ((5, 6), (4, 6)): (-12.0, 6.0),
    ((7, 2), (6, 2)): (6.0, 12.0),
    ((6, 9), (5, 9)): (12.0, 6.0),
}


@pytest.mark.parametrize(("model", "scale"), [("rigid", 0.0), ("affine", 0.005)])
def test_wrong_pairs_and_wrong_edges_are_rejected_and_reported(model, scale):
    noise = 0.2
    truth, stage, edges = montage(scale=scale, noise=noise, seed=4)
    rng = np.random.default_rng(7)
    seeded_pairs = {}
    bad = []
    for e in edges:
        key = (e.tile, e.neighbour)
        q = e.q.copy()
        if key in WRONG_EDGES:  # a wrong neighbour or repeated texture: every pair agrees, all wrong
            q += WRONG_EDGES[key]
        elif rng.random() < 0.15:  # one patch matched somewhere else
            q[rng.integers(PATCHES)] += rng.uniform(8, 40, 2) * rng.choice([-1, 1], 2)
            seeded_pairs[key] = 1
        bad.append(PointEdge(e.tile, e.neighbour, e.p, q, e.weight))
    assert len(seeded_pairs) >= 10

    layout = solve(stage, bad, model)
    assert set(layout.rejected) == set(WRONG_EDGES)
    assert all(r > 5 for r in layout.rejected.values())
    assert layout.rejected_points == seeded_pairs
    assert layout.disconnected == []
    assert layout.rms_residual() <= 2 * noise
    clean = solve(stage, edges, model)
    assert np.sqrt(np.mean(corner_errors(layout, truth) ** 2)) < 1.2 * np.sqrt(
        np.mean(corner_errors(clean, truth) ** 2)
    )


@pytest.mark.parametrize(("degrees", "scale"), [(0.0, 0.0), (0.5, 0.005)])
def test_a_tile_with_a_3_percent_scale_error_is_flagged_not_rejected(degrees, scale):
    wrong = (5, 5)
    truth, stage, edges = montage(
        degrees=degrees, scale=scale, seed=3, special={wrong: similarity(0.1, 1.03)}
    )
    layout = solve(stage, edges, "affine")
    assert layout.rejected == {} and layout.rejected_points == {}
    assert abs(layout.scale_distortion[wrong] - 0.03) < 0.005
    assert layout.anisotropy[wrong] < 1.01  # the same in x and y
    limit = 0.01  # what a "scale distortion" asset check might allow
    assert [t for t, d in layout.scale_distortion.items() if d > limit] == [wrong]
    assert layout.rms_residual() <= 0.4


def test_missing_tile_leaves_a_hole_and_a_tile_without_matches_stays_at_its_stage_position():
    truth, stage, edges = montage(missing={(4, 4)}, seed=5)
    lonely = (9, 9)
    edges = [e for e in edges if lonely not in (e.tile, e.neighbour)]
    layout = solve(stage, edges, "affine")
    assert (4, 4) not in layout.transforms
    assert layout.disconnected == [lonely]
    np.testing.assert_allclose(
        layout.transforms[lonely], np.column_stack([np.eye(2), stage[lonely]]), atol=1e-6
    )
    assert layout.translations[lonely] == pytest.approx(stage[lonely], abs=1e-6)
    assert layout.rejected == {} and layout.rms_residual() <= 0.4
    # the tiles around the hole still have three or more edges: no worse than elsewhere
    around = [(3, 4), (5, 4), (4, 3), (4, 5)]
    assert max(layout.tile_residuals[t] for t in around) < 1.0


def test_translation_model_matches_solve_translations():
    """At the level of points, ``A ≡ I`` is the edge-level translation solve with its mean offsets."""
    truth, stage, edges = montage(degrees=0.0, scale=0.0, noise=0.2, seed=6)
    points = solve_transforms(stage, edges, "translation", tile_size=(SIZE, SIZE), stage_weight=1e-3)
    offsets = [Edge(e.tile, e.neighbour, *np.mean(e.q - e.p, axis=0)) for e in edges]
    # an edge of PATCHES pairs weighs PATCHES times one pair: the same stage prior relative to a match
    means = solve_translations(stage, offsets, stage_weight=1e-3 / PATCHES)
    for t, corner in means.positions.items():
        assert points.translations[t] == pytest.approx(corner, abs=0.01)


def test_fusion_translation_keeps_each_tile_centre_and_says_how_far_corners_move():
    """The translation fusion uses puts the tile centre where its transform does; the corners are then
    off by the linear part's departure from the identity."""
    theta = np.radians(0.5)
    rotated = similarity(0.5)
    stretched = np.diag([1.02, 1.0])
    transforms = {
        "rotated": np.column_stack([rotated, np.array([100.0, 50.0]) + CENTRE - rotated @ CENTRE]),
        "stretched": np.column_stack([stretched, np.array([600.0, 50.0]) + CENTRE - stretched @ CENTRE]),
        "plain": np.column_stack([np.eye(2), [100.0, 600.0]]),
    }
    layout = TransformLayout(
        transforms=transforms,
        tile_size=(SIZE, SIZE),
        model="affine",
        edge_residuals={("rotated", "plain"): 0.3},
        rejected={("stretched", "plain"): 9.0},
        rejected_points={},
        disconnected=["stretched"],
        iterations=3,
    )
    assert layout.translations["rotated"] == pytest.approx((100.0, 50.0))
    assert layout.translations["stretched"] == pytest.approx((600.0, 50.0))
    assert layout.translations["plain"] == pytest.approx((100.0, 600.0))
    half_diagonal = np.hypot(SIZE, SIZE) / 2
    assert layout.translation_error["rotated"] == pytest.approx(2 * np.sin(theta / 2) * half_diagonal)
    assert layout.translation_error["stretched"] == pytest.approx(0.02 * SIZE / 2)
    assert layout.translation_error["plain"] == 0.0
    assert layout.scale_distortion["stretched"] == pytest.approx(0.02)
    assert layout.anisotropy["stretched"] == pytest.approx(1.02)
    assert layout.scale_distortion["rotated"] == pytest.approx(0.0, abs=1e-12)
    assert layout.tile_residuals == {"rotated": 0.3, "stretched": 0.0, "plain": 0.3}

    fusion = layout.as_layout()
    assert isinstance(fusion, Layout)
    assert fusion.positions == layout.translations
    assert fusion.rejected == layout.rejected and fusion.disconnected == ["stretched"]
    assert fusion.tile_residuals == layout.tile_residuals


def test_bad_input_is_named():
    _, stage, edges = montage(rows=2, columns=2)
    e = edges[0]
    with pytest.raises(KeyError, match="no stage position"):
        solve(stage, [PointEdge((0, 0), (7, 7), e.p, e.q)], "affine")
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        solve(stage, [PointEdge(e.tile, e.neighbour, e.p, e.q[:-1])], "affine")
    with pytest.raises(ValueError, match="finite"):
        solve(stage, [PointEdge(e.tile, e.neighbour, e.p, np.full_like(e.q, np.nan))], "affine")
    with pytest.raises(ValueError, match="weight"):
        solve(stage, [PointEdge(e.tile, e.neighbour, e.p, e.q, weight=0.0)], "affine")
    with pytest.raises(ValueError, match="repeat an edge"):
        solve(stage, [e, e], "affine")
    with pytest.raises(ValueError, match="model"):
        solve(stage, edges, "projective")
    with pytest.raises(ValueError, match="tile_size"):
        solve_transforms(stage, edges, "affine", tile_size=(0, SIZE))
