"""Montage QC figures of a solved layout: disconnected tiles, seams, scale against the stage."""

from __future__ import annotations

import pytest

from em_platform.stitch.layout import Edge
from em_platform.stitch.layout_qc import layout_qc
from em_platform.stitch.solve import solve_translations
from tests.stitch.test_solve import montage


def test_a_clean_montage_has_no_seam_and_unit_scale():
    truth, stage, edges = montage(seed=5)
    qc = layout_qc(solve_translations(stage, edges), stage)
    assert qc.tiles == 100 and qc.edges == 180 and qc.rejected == 0
    assert qc.disconnected == [] and qc.seams == []
    assert qc.scale_distortion < 1e-3
    assert qc.summary()["seams"] == 0


def test_a_wrong_pixel_size_shows_as_scale_distortion():
    truth, stage, edges = montage(seed=6)
    shrunk = {
        t: (x * 0.97, y * 0.97) for t, (x, y) in stage.items()
    }  # stage read with a 3 % wrong pixel size
    qc = layout_qc(solve_translations(shrunk, edges), shrunk)
    assert qc.scale[0] == pytest.approx(1 / 0.97, rel=2e-3) and qc.scale[1] == pytest.approx(
        1 / 0.97, rel=2e-3
    )
    assert qc.scale_distortion > 0.02


def test_seams_and_disconnected_tiles_are_named():
    truth, stage, edges = montage(rows=3, columns=3, seed=7)
    # two matches that disagree by 5 px about the same pair of tiles leave a seam the solve cannot close
    a, b = (1, 1), (1, 0)
    true_dx = truth[a][0] - truth[b][0]
    edges = [e for e in edges if (e.tile, e.neighbour) != (a, b)]
    edges += [
        Edge(a, b, true_dx + 2.5, 0.0 + truth[a][1] - truth[b][1]),
        Edge(a, b, true_dx - 2.5, truth[a][1] - truth[b][1]),
    ]
    lonely = (2, 2)
    edges = [e for e in edges if lonely not in (e.tile, e.neighbour)]
    layout = solve_translations(stage, edges, outlier_px=10.0)
    qc = layout_qc(layout, stage, seam_px=2.0)
    assert qc.disconnected == [lonely]
    assert {(t, n) for t, n, _ in qc.seams} == {(a, b)}
    assert all(r >= 2.0 for *_, r in qc.seams)


def test_a_small_montage_cannot_tell_its_scale_and_is_not_blamed_for_it():
    truth, stage, edges = montage(rows=2, columns=2, stage_error=3.0, seed=8)
    qc = layout_qc(solve_translations(stage, edges), stage)
    assert qc.scale_uncertainty > 0.002  # 3 px of stage error over one 460 px step
    assert qc.scale_ok(0.005)
    truth, stage, edges = montage(rows=10, columns=10, stage_error=3.0, seed=8)
    shrunk = {t: (x * 0.97, y * 0.97) for t, (x, y) in stage.items()}
    big = layout_qc(solve_translations(shrunk, edges), shrunk)
    assert big.scale_uncertainty < 0.001 and not big.scale_ok(0.005)
