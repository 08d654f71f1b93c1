"""The separable models' spreads scaled to what predicts held-out pairs (em_platform.stitch.held_out)."""

from __future__ import annotations

import numpy as np

from em_platform.stitch.held_out import _folds
from em_platform.stitch.solve_affine import solve_transforms
from em_platform.stitch.temca import read_temca_metafile
from tests.stitch.bigfeta_reference import bigfeta_montage_solve, em_stitch_filter
from tests.stitch.test_solve_affine import SIZE, montage
from tests.stitch.test_temca import block_metafile, document, kept_pair_residuals  # noqa: F401 (fixture)


def test_the_folds_alternate_within_each_edge_and_skip_edges_with_one_pair():
    edge_of = np.array([0, 1, 0, 0, 2, 1, 2, 2])
    weights = np.array([1.0, 1, 1, 1, 1, 0, 1, 1])
    fold, shared = _folds(edge_of, weights, 3)
    assert fold.tolist() == [0, 0, 1, 0, 0, 1, 1, 0]
    # edge 1's second pair weighs nothing: it has nothing to hold out
    assert shared.tolist() == [True, False, True, True, True, False, True, True]


def test_independent_noise_keeps_the_spreads_the_likelihood_measured():
    _, stage, edges = montage(degrees=0.5, scale=0.005, noise=0.2, seed=8)
    solved = solve_transforms(stage, edges, "affine", tile_size=(SIZE, SIZE))
    held_out = solved.stage["held_out"]
    assert held_out["scale"] == 1.0, held_out
    squares = [s for _, s in held_out["held_out_mean_square_px2"]]
    assert (
        len(squares) >= 2 and squares[-1] >= squares[-2] * 0.998
    )  # the search stopped where it stopped paying


def test_a_real_scopes_shared_errors_take_looser_spreads_and_fit_below_em_stitch(document, tmp_path):  # noqa: F811
    """The TEMCA block's 10 pairs per edge share their edge's errors: the likelihood's spreads are too tight,
    the held-out pairs say so, and the solve then fits em_stitch's kept pairs better than its own solve."""
    block = read_temca_metafile(block_metafile(document, tmp_path))
    stage = {t.name: (t.x, t.y) for t in block.tiles}
    edges = list(block.edges)
    solved = solve_transforms(stage, edges, "affine", tile_size=(block.width, block.height))
    held_out = solved.stage["held_out"]
    assert held_out["scale"] >= 4.0, held_out
    squares = [s for _, s in held_out["held_out_mean_square_px2"]]
    assert squares[0] > squares[-1]
    keep = em_stitch_filter(edges)
    ours = kept_pair_residuals(solved.transforms, edges, keep)
    reference = kept_pair_residuals(bigfeta_montage_solve(stage, edges, "affine"), edges, keep)
    print(f"\nblock: ours {ours['mean_px']:.3f} (max {ours['max_px']:.2f}), em_stitch/BigFeta "
          f"{reference['mean_px']:.3f} (max {reference['max_px']:.2f}); {held_out}")  # fmt: skip
    assert ours["mean_px"] <= reference["mean_px"]
