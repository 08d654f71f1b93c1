"""The global translation solve on synthetic montages with known truth (geometry only, no pixels)."""

from __future__ import annotations

import numpy as np
import pytest

from em_platform.stitch.layout import Edge
from em_platform.stitch.solve import solve_translations

STEP = 460  # 512 px tiles, 10 % overlap


def montage(rows=10, columns=10, jitter=20.0, stage_error=2.0, match_error=0.05, seed=0, missing=()):
    """True positions, stage readings and neighbour matches of a rows × columns grid."""
    rng = np.random.default_rng(seed)
    truth, stage = {}, {}
    for r in range(rows):
        for c in range(columns):
            if (r, c) in missing:
                continue
            true = np.array([c * STEP, r * STEP]) + rng.uniform(-jitter, jitter, 2)
            truth[(r, c)] = true
            stage[(r, c)] = tuple(true + rng.normal(0, stage_error, 2))
    edges = []
    for (r, c), p in truth.items():
        for n in ((r - 1, c), (r, c - 1)):
            if n in truth:
                dx, dy = p - truth[n] + rng.normal(0, match_error, 2)
                edges.append(Edge((r, c), n, float(dx), float(dy)))
    return truth, stage, edges


def rms_error(layout, truth) -> float:
    """RMS position error after removing the common translation (no match can observe it)."""
    diff = np.array([np.subtract(layout.positions[t], truth[t]) for t in truth])
    diff -= diff.mean(axis=0)
    return float(np.sqrt((diff**2).sum(axis=1).mean()))


def test_positions_within_a_third_of_a_pixel_of_the_truth():
    truth, stage, edges = montage()
    layout = solve_translations(stage, edges)
    assert rms_error(layout, truth) <= 0.3
    # the stage alone is ten times worse: the matches carry the solve
    stage_only = rms_error(type(layout)(dict(stage), {}, {}, [], 0), truth)
    assert stage_only > 1.0
    assert layout.rejected == {} and layout.disconnected == []
    assert max(layout.edge_residuals.values()) < 0.5
    assert np.allclose(
        np.mean([layout.positions[t] for t in truth], axis=0),
        np.mean([stage[t] for t in truth], axis=0),
        atol=0.5,
    )  # anchored where the stage says the montage is


@pytest.mark.parametrize("error_px", [8.0, 40.0])
def test_wrong_matches_are_rejected_and_reported(error_px):
    truth, stage, edges = montage(seed=3)
    rng = np.random.default_rng(1)
    bad = set(rng.choice(len(edges), 6, replace=False).tolist())
    seeded = [
        Edge(e.tile, e.neighbour, e.dx + error_px * (1 if i % 2 else -1), e.dy + error_px / 2)
        if i in bad
        else e
        for i, e in enumerate(edges)
    ]
    layout = solve_translations(stage, seeded)
    assert set(layout.rejected) == {(edges[i].tile, edges[i].neighbour) for i in bad}
    assert all(r > 3 for r in layout.rejected.values())
    assert rms_error(layout, truth) <= 0.3


def test_missing_tile_leaves_a_hole_and_a_tile_without_matches_is_reported():
    truth, stage, edges = montage(missing={(4, 4)}, seed=5)
    assert (4, 4) not in stage
    lonely = (9, 9)  # every match of this tile lost (e.g. blank): placed by its stage position
    edges = [e for e in edges if lonely not in (e.tile, e.neighbour)]
    layout = solve_translations(stage, edges)
    assert (4, 4) not in layout.positions
    assert layout.disconnected == [lonely]
    assert np.allclose(layout.positions[lonely], stage[lonely], atol=0.5)
    others = {t: p for t, p in truth.items() if t != lonely}
    assert rms_error(layout, others) <= 0.3


def test_an_edge_to_an_unknown_tile_is_an_error():
    _, stage, _ = montage(rows=2, columns=2)
    with pytest.raises(KeyError, match="no stage position"):
        solve_translations(stage, [Edge((0, 0), (7, 7), 1.0, 2.0)])
