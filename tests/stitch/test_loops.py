"""Edges judged before the solve: the pairs of an edge by their consensus, edges by the loops they close."""

from __future__ import annotations

import numpy as np

from em_platform.stitch.layout import PointEdge
from em_platform.stitch.loops import edge_consensus, loop_verdicts
from em_platform.stitch.solve_affine import solve_transforms

STEP = 900.0  # tile pitch (px) of a 1000 px tile with 100 px of overlap


def grid_edges(rows: int, columns: int, rng, wrong: dict | None = None):
    """Translation edges of a grid ((r, c) tiles at STEP pitch ± 3 px), ten pairs each along the overlap."""
    pos = {
        (r, c): np.array([c * STEP, r * STEP]) + rng.uniform(-3, 3, 2)
        for r in range(rows)
        for c in range(columns)
    }
    edges = []
    for (r, c), x in pos.items():
        for nb in ((r, c + 1), (r + 1, c)):
            if nb not in pos:
                continue
            along = np.linspace(50, 950, 10)
            p = (
                np.column_stack([np.full(10, 950.0), along])
                if nb[1] > c
                else np.column_stack([along, np.full(10, 950.0)])
            )
            q = p + x - pos[nb] + rng.normal(0, 0.3, p.shape)  # same specimen point in the neighbour
            q += (wrong or {}).get(((r, c), nb), 0.0)
            edges.append(PointEdge((r, c), nb, p, q))
    return pos, edges


def flat(edges):
    p = np.concatenate([e.p for e in edges])
    q = np.concatenate([e.q for e in edges])
    return p, q, np.repeat(np.arange(len(edges)), [len(e.p) for e in edges])


def test_pairs_that_agree_with_each_other_but_not_the_edge_are_dropped():
    rng = np.random.default_rng(1)
    _, edges = grid_edges(1, 2, rng)
    e = edges[0]
    q = e.q.copy()
    q[[1, 4, 7]] += (37.0, -21.0)  # three patches matched at one wrong place (repeated texture): a cluster
    p, q, edge_of = flat([PointEdge(e.tile, e.neighbour, e.p, q)])
    transforms, agree = edge_consensus(p, q, edge_of, 1)
    assert agree.tolist() == [i not in (1, 4, 7) for i in range(10)]
    assert np.allclose(transforms[0][:, :2], np.eye(2), atol=1e-3)


def test_a_wrong_edge_is_refused_by_its_loops_and_the_others_vouched_for():
    rng = np.random.default_rng(2)
    bad = ((2, 2), (2, 3))
    pos, edges = grid_edges(5, 5, rng, wrong={bad: np.array([40.0, 25.0])})
    p, q, edge_of = flat(edges)
    transforms, _ = edge_consensus(p, q, edge_of, len(edges))
    index = {k: i for i, k in enumerate(sorted(pos))}
    ends = np.array([[index[e.tile], index[e.neighbour]] for e in edges])
    verdicts = loop_verdicts(len(pos), ends, transforms, (500.0, 500.0))
    refused = [(e.tile, e.neighbour) for e, r in zip(edges, verdicts.refused, strict=True) if r]
    assert refused == [bad]
    assert verdicts.vouched.sum() == len(edges) - 1
    assert verdicts.loops == 16 and verdicts.closing == 14


def test_a_blank_tiles_random_matches_are_all_refused():
    rng = np.random.default_rng(3)
    blank = (2, 2)
    _, edges = grid_edges(5, 5, rng)
    edges = [
        PointEdge(e.tile, e.neighbour, e.p, e.q + rng.uniform(-200, 200, 2))
        if blank in (e.tile, e.neighbour)
        else e
        for e in edges
    ]
    stage = {
        t: (c * STEP, r * STEP) for t in {x for e in edges for x in (e.tile, e.neighbour)} for r, c in [t]
    }
    solved = solve_transforms(stage, edges, "translation", tile_size=(1000, 1000))
    assert solved.loops["edges_refused_by_loops"] == 4
    assert set(solved.rejected) == {(e.tile, e.neighbour) for e in edges if blank in (e.tile, e.neighbour)}
    assert solved.rms_residual() < 1.0
