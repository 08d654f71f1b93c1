"""Montage accuracy through the real path (issue 4): a simulated montage with known truth is processed and
matched live (``run_montage``), the matches it recorded in the acquisition journal become solver edges,
the solve places the tiles, and the placement is compared with the simulator's ground truth.

The acceptance montage is 10 × 10 tiles of 512² px with 10 % overlap and ±20 px stage jitter (scope-sim's
demo tiles; smaller tiles cannot take that jitter at 10 % overlap: 2 × 20 px must stay under the 51 px
overlap, or neighbours could fail to overlap at all). Below it, the conversions of ``stitch.edges`` on
hand-made journal rows.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np
import pytest
from distributed import Client, LocalCluster

from em_platform.simulation.scope import simulate_montage
from em_platform.simulation.scope_config import ScopeConfig
from em_platform.stitch.edges import (
    compare_with_truth,
    match_edges,
    nominal_positions,
    stage_positions,
    true_positions,
)
from em_platform.stitch.grid import GridTile
from em_platform.stitch.solve import solve_translations
from em_platform.tem.journal import Journal, TileRow
from em_platform.tem.montage_run import MontageRunConfig, run_montage
from em_platform.tem.stitch_inputs import grid_tiles
from em_platform.tem.tile_source import JournalTileSource

ACCEPTANCE = dict(rows=10, columns=10, tile_size=512, overlap=0.10, jitter_px=20.0, seed=1)


@pytest.fixture(scope="module")
def client():
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0"
    ) as cluster:
        with Client(cluster) as c:
            yield c


def _acquire_and_process(tmp_path, client, **config) -> SimpleNamespace:
    """Simulate a montage into a journal, process and match it live; the journal's rows afterwards."""
    url = f"sqlite:///{tmp_path / 'journal.sqlite'}"
    journal = Journal(url)
    truth = simulate_montage(ScopeConfig(**config), tmp_path / "tiles", journal.record, sleep=lambda s: None)
    result = run_montage(
        truth.montage_id,
        JournalTileSource(journal, pixel_size_nm=truth.pixel_size_nm),
        client,
        processed_url=str(tmp_path / "processed.zarr"),
        config=MontageRunConfig(poll_seconds=0.05),
    )
    rows = journal.tiles(truth.montage_id)
    tiles = grid_tiles(rows)
    pixel_size_nm = journal.montage(truth.montage_id).pixel_size_nm  # from montage.complete
    journal.dispose()
    shapes = {(r.tile.row, r.tile.column): r.outcome.shape for r in result.tiles.values() if r.outcome}
    return SimpleNamespace(
        truth=truth,
        result=result,
        rows=rows,
        tiles=tiles,
        shapes=shapes,
        stage=stage_positions(tiles, shapes, pixel_size_nm),
        true=true_positions(truth),
    )


@pytest.fixture(scope="module")
def montage(tmp_path_factory, client) -> SimpleNamespace:
    return _acquire_and_process(tmp_path_factory.mktemp("accuracy"), client, **ACCEPTANCE)


def _interior_edges(rows: int, columns: int) -> int:
    return 2 * rows * columns - rows - columns


# ----------------------------------------------------------------------------------------------------
# The acceptance test of issue 4


def test_solved_positions_are_within_0_3_px_rms_of_the_truth(montage):
    edges = match_edges(montage.tiles, montage.shapes)
    layout = solve_translations(montage.stage, edges)
    solved = compare_with_truth(layout.positions, montage.true)
    stage_only = compare_with_truth(montage.stage, montage.true)
    possible = _interior_edges(ACCEPTANCE["rows"], ACCEPTANCE["columns"])
    print(
        f"\n{len(edges)}/{possible} edges matched; solved RMS {solved.rms_px:.3f} px (max {solved.max_px:.3f}), "
        f"stage alone {stage_only.rms_px:.2f} px; worst tiles {solved.worst(3)}"
    )
    assert len(montage.true) == len(layout.positions) == 100
    assert solved.rms_px <= 0.3
    assert solved.max_px < 0.5
    assert stage_only.rms_px > 1.0  # the matches, not the stage, put the tiles there
    assert len(edges) >= 0.95 * possible
    assert layout.rejected == {} and layout.disconnected == []  # the live matches are all sound
    # the edges agree with the true offsets one by one, not only on average
    for e in edges:
        true = np.subtract(montage.true[e.tile], montage.true[e.neighbour])
        assert np.hypot(e.dx - true[0], e.dy - true[1]) < 0.5, e


def _with_match_offset(row: TileRow, position: str, ddx: float, ddy: float) -> TileRow:
    """The journal row with one of its recorded matches moved by (ddx, ddy) px: a wrong match."""
    matches = dict(row.results["matches"])
    m = dict(matches[position])
    m["dX"] += ddx
    m["dY"] += ddy
    matches[position] = m
    return dataclasses.replace(row, results={**row.results, "matches": matches})


def test_seeded_wrong_matches_are_rejected_and_reported(montage):
    """Wrong matches (8–40 px off) planted among the journal's real ones: exactly those are rejected,
    with their residuals, and the rest still place the tiles within 0.3 px."""
    edges = match_edges(montage.tiles, montage.shapes)
    degree: dict = {}
    for e in edges:
        for t in (e.tile, e.neighbour):
            degree[t] = degree.get(t, 0) + 1
    # a wrong match can only be told from a right one where other matches tie both tiles down
    candidates = sorted(
        (e.tile, e.neighbour) for e in edges if degree[e.tile] >= 3 and degree[e.neighbour] >= 3
    )
    rng = np.random.default_rng(7)
    picks = [candidates[i] for i in rng.choice(len(candidates), 6, replace=False)]
    errors = [(8.0, 0.0), (0.0, -8.0), (12.0, 5.0), (-20.0, 14.0), (40.0, 0.0), (-6.0, -6.0)]
    by_position = {(r.row, r.column): r for r in montage.rows if not r.is_reference}
    seeded = {}
    for (tile, neighbour), (ddx, ddy) in zip(picks, errors, strict=True):
        position = "left" if neighbour == (tile[0], tile[1] - 1) else "top"
        by_position[tile] = _with_match_offset(by_position[tile], position, ddx, ddy)
        seeded[(tile, neighbour)] = np.hypot(ddx, ddy)
    layout = solve_translations(montage.stage, match_edges(grid_tiles(by_position.values()), montage.shapes))
    assert set(layout.rejected) == set(seeded)
    for key, residual in layout.rejected.items():
        assert residual == pytest.approx(seeded[key], abs=0.5)  # reported with how far off each was
    assert layout.disconnected == []
    assert compare_with_truth(layout.positions, montage.true).rms_px <= 0.3


def test_a_missing_tile_leaves_a_hole_not_a_crash(tmp_path, client):
    m = _acquire_and_process(
        tmp_path, client, **{**ACCEPTANCE, "rows": 3, "columns": 4, "seed": 4, "faults": ("missing:r1c2",)}
    )
    assert m.result.missing == [(1, 2)]
    edges = match_edges(m.tiles, m.shapes)
    assert all((1, 2) not in (e.tile, e.neighbour) for e in edges)
    layout = solve_translations(m.stage, edges)
    assert (1, 2) not in layout.positions and len(layout.positions) == 11
    assert layout.disconnected == [] and layout.rejected == {}
    assert compare_with_truth(layout.positions, m.true).rms_px <= 0.3


# ----------------------------------------------------------------------------------------------------
# stitch.edges on hand-made journal rows (through tem.stitch_inputs, which picks the montage's tiles)


def _row(row: int, column: int, *, matches=None, stage=None, overlap=40, seq=None, **kw) -> TileRow:
    fields = dict(
        tile_id=f"t{row}{column}",
        montage_id="m",
        seq=seq if seq is not None else 10 + 10 * row + column,
        raster_index=None,
        row=row,
        column=column,
        overlap=overlap,
        stage_x_nm=stage[0] if stage else None,
        stage_y_nm=stage[1] if stage else None,
        path=f"/tiles/t{row}{column}.tiff",
        brightfield=False,
        darkfield=False,
        acquired_at=datetime(2026, 1, 1, tzinfo=UTC),
        status="processed",
        results={"matches": matches or {}},
        qc_passed=True,
        qc_faults=[],
        error=None,
    )
    return TileRow(**{**fields, **kw})


def test_matches_become_offsets_with_the_nominal_step_of_the_neighbours_shape():
    """Tiles 300 px high and 500 px wide: a left neighbour's step is 500 − 40, a top neighbour's 300 − 40."""
    rows = [
        _row(0, 0),
        _row(0, 1, matches={"left": {"row": 0, "column": 0, "dX": 2.5, "dY": -1.25, "quality": 0.8}}),
        _row(1, 0, matches={"top": {"row": 0, "column": 0, "dX": -3.0, "dY": 4.0}}),
        _row(-1, -1, brightfield=True, matches={"top": {"dX": 99.0, "dY": 99.0}}),  # a reference frame
        _row(1, 1, status="failed", results=None),
    ]
    shapes = {(0, 0): (300, 500), (0, 1): (300, 500), (1, 0): (300, 500)}
    edges = {(e.tile, e.neighbour): e for e in match_edges(grid_tiles(rows), shapes)}
    assert set(edges) == {((0, 1), (0, 0)), ((1, 0), (0, 0))}
    left, top = edges[((0, 1), (0, 0))], edges[((1, 0), (0, 0))]
    assert (left.dx, left.dy, left.weight) == (500 - 40 + 2.5, -1.25, 0.8)
    assert (top.dx, top.dy, top.weight) == (-3.0, 300 - 40 + 4.0, 1.0)


def test_the_last_arrival_at_a_grid_position_is_the_tile():
    retaken = [
        _row(0, 0),
        _row(0, 1, seq=50, matches={"left": {"dX": 1.0, "dY": 0.0}}),
        _row(0, 1, seq=20, tile_id="first-take", matches={"left": {"dX": 9.0, "dY": 0.0}}),
    ]
    (edge,) = match_edges(grid_tiles(retaken), {(0, 0): (100, 100), (0, 1): (100, 100)})
    assert edge.dx == 100 - 40 + 1.0


def test_bad_matches_are_named():
    shapes = {(0, 0): (100, 100), (0, 1): (100, 100)}
    with pytest.raises(ValueError, match=r"tile t01 \(row 0, column 1\), left match: no dX/dY"):
        match_edges(grid_tiles([_row(0, 1, matches={"left": {"dY": 1.0}})]), shapes)
    with pytest.raises(ValueError, match="names row 3, column 3 as the neighbour"):
        match_edges(
            grid_tiles([_row(0, 1, matches={"left": {"row": 3, "column": 3, "dX": 0.0, "dY": 0.0}})]), shapes
        )
    with pytest.raises(ValueError, match="position must be 'top' or 'left'"):
        match_edges(grid_tiles([_row(0, 1, matches={"right": {"dX": 0.0, "dY": 0.0}})]), shapes)
    with pytest.raises(KeyError, match="no shape for the neighbour at row 0, column 0"):
        match_edges(grid_tiles([_row(0, 1, matches={"left": {"dX": 0.0, "dY": 0.0}})]), {(0, 1): (100, 100)})


def test_one_tile_per_grid_position():
    shapes = {(0, 0): (100, 100)}
    with pytest.raises(ValueError, match="tiles a and b are both at row 0, column 0"):
        stage_positions([GridTile("a", 0, 0, 0, 0, 0), GridTile("b", 0, 0, 0, 0, 0)], shapes, 4.0)


def test_stage_and_nominal_priors():
    rows = [_row(0, 0, stage=(1000, 800)), _row(0, 1, stage=(2840, 812)), _row(1, 0, stage=(1004, 1920))]
    shapes = {(0, 0): (300, 500), (0, 1): (300, 500)}  # (1, 0) never processed: nothing to place
    # the stage reads the field of view's centre in nm: 4 nm/px, minus half a tile
    assert stage_positions(grid_tiles(rows), shapes, 4.0) == {(0, 0): (0.0, 50.0), (0, 1): (460.0, 53.0)}
    assert nominal_positions(grid_tiles(rows), shapes) == {(0, 0): (0.0, 0.0), (0, 1): (460.0, 0.0)}
    with pytest.raises(ValueError, match="pixel_size_nm must be positive"):
        stage_positions(grid_tiles(rows), shapes, 0.0)
    with pytest.raises(ValueError, match=r"tile t01 \(row 0, column 1\) has no stage position"):
        stage_positions(grid_tiles([rows[0], _row(0, 1)]), shapes, 4.0)


def test_comparison_with_the_truth_ignores_the_common_translation():
    truth = {(0, 0): (0.0, 0.0), (0, 1): (460.0, 3.0), (1, 0): (-2.0, 461.0)}
    shifted = {k: (x + 1000.0, y - 7.0) for k, (x, y) in truth.items()}
    exact = compare_with_truth(shifted, truth)
    assert exact.rms_px == pytest.approx(0.0, abs=1e-9) and exact.max_px == pytest.approx(0.0, abs=1e-9)
    off = dict(shifted)
    off[(0, 1)] = (shifted[(0, 1)][0] + 0.3, shifted[(0, 1)][1])  # one tile 0.3 px to the right
    c = compare_with_truth({**off, (5, 5): (0.0, 0.0)}, truth)  # tiles without a truth are not compared
    assert set(c.errors) == set(truth)
    assert c.errors[(0, 1)] == pytest.approx((0.2, 0.0))  # 0.3 minus the mean shift of 0.1
    assert c.rms_px == pytest.approx(np.sqrt((0.2**2 + 2 * 0.1**2) / 3))
    assert c.worst(1) == [((0, 1), pytest.approx(0.2))]
    with pytest.raises(ValueError, match="no tile has both"):
        compare_with_truth({(9, 9): (0.0, 0.0)}, truth)


@pytest.mark.parametrize("model", ["translation", "rigid", "affine"])
def test_solve_montage_with_each_model_from_the_journal(montage, model):
    """montage_layout's solve (prior from the stage, layout QC) on the live matches, for each model."""
    from em_platform.stitch.montage_layout import solve_montage

    result = solve_montage(
        montage.truth.montage_id, montage.tiles, montage.shapes, montage.truth.pixel_size_nm, model=model
    )
    solved = compare_with_truth(result.layout.positions, montage.true)
    print(f"\n{model}: RMS {solved.rms_px:.3f} px, max {solved.max_px:.3f}; qc {result.qc.summary()}")
    assert result.prior == "stage" and result.model == model
    assert solved.rms_px <= (
        0.3 if model == "translation" else 0.5
    )  # flexible models trade corners for seams
    assert result.qc.disconnected == [] and result.qc.seams == []
    assert result.qc.scale_distortion < 0.005  # the simulated tiles are neither scaled nor rotated
    doc = result.to_dict()
    assert doc["model"] == model and len(doc["tiles"]) == 100
