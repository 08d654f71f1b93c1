"""Seams measured on the fused pixels (:mod:`em_platform.stitch.seams`) and the report's ``seams`` check.

A good montage (solved from its point matches) passes; the same montage with one tile moved a few pixels
after the solve, as a wrong match or a stage-placed tile would leave it, fails, and the report names
exactly that tile's seams. The pixels are the synthetic montage's (:mod:`tests.stitch.synthetic`:
per-tile rotation, vignetting, gain, shot noise), rendered as the fusion places them.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from em_platform.stitch.seams import SEAM_LIMIT_PX, measure_seams, measure_source_seams, seams_beyond
from em_platform.stitch.solve_affine import solve_transforms
from em_platform.stitch.stitch_report import stitch_report
from tests.stitch.synthetic import HardMontageConfig, make_montage, tile_name

MOVED = tile_name(1, 2)


@pytest.fixture(scope="module")
def solved():
    montage = make_montage(
        HardMontageConfig(
            rows=3, columns=4, tile_px=256, overlap=0.125, stage_error=0.15, rotation_deg=0.3, seed=9
        )
    )
    matches = montage.point_matches(points_per_edge=12, noise_px=0.05, seed=1)
    stage = {t.name: t.stage for t in montage.tiles}
    layout = solve_transforms(stage, matches.edges, "rigid", tile_size=(256, 256))
    tiles = {t.name: t for t in montage.tiles}
    read = functools.lru_cache(maxsize=None)(lambda name: montage.image(tiles[name]))
    shapes = {name: (256, 256) for name in tiles}
    pairs = sorted(layout.edge_residuals)
    cells = {t.name: (t.row, t.column) for t in montage.tiles}
    return layout, pairs, read, shapes, cells


def report(layout, cells, seams):
    return stitch_report(cells=cells, layout=layout, seams=seams)


def test_a_good_montage_has_no_seam(solved):
    layout, pairs, read, shapes, cells = solved
    seams = measure_seams(pairs, layout.transforms, read, shapes)
    assert len(seams) == len(pairs) == 17
    assert all(s.offset_px is not None for s in seams)  # every overlap measurable
    # a few hundredths to a tenth of a pixel (phase correlation alone read up to 0.8 px on narrow strips)
    assert max(s.offset_px for s in seams) < 0.25 * SEAM_LIMIT_PX
    doc = report(layout, cells, seams)
    assert (
        doc["checks"] == {"placed": True, "connected": True, "seams": True, "residual": True}
        and doc["passed"]
    )
    assert doc["seams"]["measured"] == 17 and doc["seams"]["beyond_limit"] == []


@pytest.mark.parametrize(
    ("shift", "tolerance"),
    [((4.0, -3.0), 0.6), ((1.2, -0.9), 0.15)],  # phase correlation's reach; Lucas–Kanade's (≤ 3 px)
    ids=["5px", "1.5px"],
)
def test_a_tile_moved_after_the_solve_shows_its_seams_and_fails_the_check(solved, shift, tolerance):
    layout, pairs, read, shapes, cells = solved
    shift = np.array(shift)
    good = {(s.tile, s.neighbour): s.offset_px for s in measure_seams(pairs, layout.transforms, read, shapes)}
    moved = dict(layout.transforms)
    moved[MOVED] = moved[MOVED] + np.column_stack([np.zeros((2, 2)), shift])
    seams = measure_seams(pairs, moved, read, shapes)
    touched = {(s.tile, s.neighbour) for s in seams if MOVED in (s.tile, s.neighbour)}
    assert len(touched) == 4  # left, right, top and bottom neighbours
    for s in seams:
        if (s.tile, s.neighbour) in touched:
            assert s.offset_px == pytest.approx(np.hypot(*shift), abs=tolerance)
        else:  # the other seams are measured as before
            assert s.offset_px == pytest.approx(good[(s.tile, s.neighbour)], abs=1e-9)

    # the solve's own residuals do not see it (the layout is the good one): only the pixels do
    doc = report(layout, cells, seams)
    assert not doc["passed"] and doc["checks"] == {
        "placed": True,
        "connected": True,
        "seams": False,
        "residual": True,
    }
    named = {(e["tile"], e["neighbour"]) for e in doc["seams"]["beyond_limit"]}
    assert named == touched
    assert doc["seams"]["max_px"] > SEAM_LIMIT_PX


class _Tiles:
    """A fusion tile source over images in memory (pickles: Dask sends it to the workers)."""

    def __init__(self, images):
        self.images = images

    def read(self, tile, y0, y1, x0, x1):
        return self.images[tile][y0:y1, x0:x1]


def test_seams_read_from_a_tile_source_in_batches_on_dask_are_the_seams_measured_directly(solved):
    from distributed import Client, LocalCluster

    layout, pairs, read, shapes, _ = solved
    direct = measure_seams(pairs, layout.transforms, read, shapes)
    source = _Tiles({name: read(name) for name in shapes})
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0"
    ) as cluster:
        with Client(cluster) as client:
            batched = measure_source_seams(pairs, layout.transforms, source, shapes, client=client, batch=5)
    inline = measure_source_seams(pairs, layout.transforms, source, shapes, batch=5)
    for seams in (batched, inline):
        assert [(s.tile, s.neighbour) for s in seams] == pairs  # 4 batches, back in the order asked
        assert [s.offset_px for s in seams] == [s.offset_px for s in direct]
    moved = dict(layout.transforms)
    moved[MOVED] = moved[MOVED] + np.column_stack([np.zeros((2, 2)), [4.0, -3.0]])
    beyond = seams_beyond(measure_source_seams(pairs, moved, source, shapes, batch=5))
    assert sorted(MOVED in (s.tile, s.neighbour) for s in beyond) == [True] * 4
    assert [s.offset_px for s in beyond] == sorted((s.offset_px for s in beyond), reverse=True)
