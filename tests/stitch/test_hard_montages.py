"""Stitching hard synthetic montages (issue 14's "Done when"), at 10 × 10 and 50 × 50 tiles.

Montages come from :mod:`tests.stitch.synthetic` (tiles cut from the procedural specimen at known
true poses, with vignetting, gain and shot noise) and go through the tile-folder path that
``em-platform stitch`` runs: layout CSV + TIFFs → :func:`match_tile_folder` (fine search, coarse fallback)
→ :func:`solve_tile_folder` → :func:`stitch_report` (the ``OUT.report.json`` document and its checks).

Tiles are 256² px with 12.5 % overlap (32 px), so the 50 × 50 montages stay quick (the torn ones 128² px
with the same 32 px of overlap). Conditions:

* **translation**: stage error uniform up to ±45 % of the overlap per axis (±14.4 px: a pair can be up to
  28.8 px off along both axes, far beyond the fine window), with blank resin tiles and tiles listed in the
  layout but missing from the folder: ≤ 0.1 px RMS and ≤ 0.5 px max on content tiles, common translation
  removed; blank and missing tiles named in the report, every content tile placed by the images;
* **rotation**: ±0.2° per tile (at 256 px the corner displacement of issue 14's ±0.05° at 1024 px), solved
  rigid: ≤ 0.25 px RMS at the tile corners; the translation model on the same matches must be worse
  than that, or the condition would not test anything;
* **tear**: from one grid row on the section piece moved by more than any search reaches: the report's
  checks fail (not connected, tiles unplaced) and name exactly the torn piece's tiles.

The 10 × 10 blank/missing and tear montages also go through the ``em-platform stitch`` command once
(exit status and ``OUT.report.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from em_platform.cli import main
from em_platform.stitch.layout import TransformLayout
from em_platform.stitch.stitch_report import stitch_report
from em_platform.stitch.tile_folder import (
    MatchReport,
    TileFolder,
    match_tile_folder,
    open_tile_folder,
    solve_tile_folder,
)
from tests.stitch.synthetic import HardMontage, HardMontageConfig, make_montage, tile_name

TILE_PX = 256
OVERLAP = 0.125  # 32 px
SIZES = [10, 50]  # tiles per side


def _scaled(n: int, cells: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """Cells given for a 10 × 10 grid, placed at the same relative place of an n × n grid."""
    return tuple((r * n // 10, c * n // 10) for r, c in cells)


def translation_config(n: int) -> HardMontageConfig:
    # bare resin past the section's edge in one corner and a stray blank tile inside; two files missing
    blank = _scaled(n, ((0, 8), (0, 9), (1, 9), (5, 5)))
    missing = _scaled(n, ((3, 2), (8, 6)))
    return HardMontageConfig(
        rows=n, columns=n, tile_px=TILE_PX, overlap=OVERLAP, stage_error=0.45, blank=blank,
        missing=missing, seed=14,
    )  # fmt: skip


def rotation_config(n: int) -> HardMontageConfig:
    return HardMontageConfig(
        rows=n, columns=n, tile_px=TILE_PX, overlap=OVERLAP, stage_error=0.15, rotation_deg=0.2, seed=15
    )


def tear_config(n: int) -> HardMontageConfig:
    # the piece from 60 % of the rows down moved (45, 80) px: beyond the coarse search's ±32 px. No
    # accuracy is asked of it, so half-size tiles (the same 32 px of overlap) halve the cost of matching
    return HardMontageConfig(
        rows=n, columns=n, tile_px=TILE_PX // 2, overlap=2 * OVERLAP, stage_error=0.1,
        tear=(n * 6 // 10, (45.0, 80.0)), seed=16,
    )  # fmt: skip


@dataclass
class Stitched:
    montage: HardMontage
    folder: TileFolder
    report: MatchReport
    layout: TransformLayout
    doc: dict  # the OUT.report.json document (without the seams of the fused pixels)


def stitch(montage: HardMontage, folder: Path, model: str = "translation") -> Stitched:
    layout_csv = montage.write(folder, workers=2)
    tiles = open_tile_folder(folder, layout_csv)
    report = match_tile_folder(tiles, workers=2)
    layout = solve_tile_folder(tiles, report, model)
    doc = report_of(tiles, report, layout)
    return Stitched(montage, tiles, report, layout, doc)


def report_of(tiles: TileFolder, report: MatchReport, layout: TransformLayout) -> dict:
    """What ``em-platform stitch`` reports (:func:`em_platform.stitch.stitch_cli._report`), seams aside."""
    return stitch_report(
        cells={t.tile: (t.row, t.column) for t in tiles.tiles},
        skipped=tiles.skipped,
        blank=report.blank,
        layout=layout,
        methods=report.methods(),
        unmatched=[(p.tile.tile, p.neighbour.tile, p.position, why) for p, why in report.unmatched],
    )


def tile_errors(transforms: dict[str, np.ndarray], truth: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Per tile, the RMS over its four corners of (solved − true) montage position, the common translation
    (no match observes it) removed. For translation-only tiles: the position error."""
    names = sorted(truth)
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)

    def place(m: np.ndarray) -> np.ndarray:
        return corners @ np.asarray(m)[:, :2].T + np.asarray(m)[:, 2]

    d = np.array([place(transforms[n]) - place(truth[n]) for n in names])  # (tiles, corners, 2)
    d -= d.reshape(-1, 2).mean(axis=0)
    return np.sqrt((d**2).sum(axis=-1).mean(axis=-1))


def rms(errors: np.ndarray) -> float:
    return float(np.sqrt(np.mean(errors**2)))


def content_truth(montage: HardMontage) -> dict[str, np.ndarray]:
    content = set(montage.truth(content_only=True))
    return {name: m for name, m in montage.transforms().items() if name in content}


def angle_deg(m: np.ndarray) -> float:
    return float(np.degrees(np.arctan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1])))


def in_mean_tile_frame(truth: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The true transforms turned by minus their tiles' mean rotation. A rotation common to every tile and
    the montage with it changes no overlap: the images cannot see it, and the solve puts its frame where
    the tiles' rotations average to none (:mod:`em_platform.stitch.solve_affine`, the free frame ``F``).
    Random per-tile angles average to a few thousandths of a degree, which at 50 × 50 tiles turns the far
    corners by a few tenths of a pixel: that is the frame's choice, not a tile's error, like the common
    translation."""
    theta = np.radians(np.mean([angle_deg(m) for m in truth.values()]))
    turn = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])  # by −mean
    return {name: turn @ m for name, m in truth.items()}


# ----------------------------------------------------------------------------------------------------
# Montages, one stitch each per size, shared by the tests


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n}x{n}")
def translation(request, tmp_path_factory) -> Stitched:
    n = request.param
    return stitch(make_montage(translation_config(n)), tmp_path_factory.mktemp(f"translation{n}"))


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n}x{n}")
def rotation(request, tmp_path_factory) -> Stitched:
    n = request.param
    return stitch(make_montage(rotation_config(n)), tmp_path_factory.mktemp(f"rotation{n}"), "rigid")


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n}x{n}")
def tear(request, tmp_path_factory) -> Stitched:
    n = request.param
    return stitch(make_montage(tear_config(n)), tmp_path_factory.mktemp(f"tear{n}"))


# ----------------------------------------------------------------------------------------------------
# Translation only, stage error 45 % of the overlap


def test_translation_with_large_stage_error_is_recovered_on_content_tiles(translation):
    s = translation
    c = s.montage.config
    truth = content_truth(s.montage)
    assert len(truth) == c.rows * c.columns - len(c.blank) - len(c.missing)
    stage = {t.tile: np.array([[1.0, 0, t.x], [0, 1.0, t.y]]) for t in s.folder.tiles}
    before = tile_errors(stage, truth, c.tile_px)
    after = tile_errors(s.layout.transforms, truth, c.tile_px)
    print(
        f"\n{c.rows}x{c.columns} translation, stage error ±{c.stage_error * c.overlap_px:.1f} px: stage "
        f"{rms(before):.2f} px RMS / {before.max():.2f} max; stitched {rms(after):.4f} px RMS / "
        f"{after.max():.4f} max; matched {s.report.methods()}, unmatched {len(s.report.unmatched)}, "
        f"rejected {len(s.layout.rejected)}"
    )
    assert before.max() > 0.6 * c.overlap_px  # the layout alone is far off: pairs beyond the fine window …
    assert s.report.methods().get("coarse", 0) > 0  # … which only the coarse fallback reaches
    assert rms(after) <= 0.1
    assert after.max() <= 0.5
    assert s.doc["checks"]["placed"] and s.doc["checks"]["connected"]


def test_blank_and_missing_tiles_are_reported_by_name(translation):
    s = translation
    c = s.montage.config
    blank = sorted(tile_name(r, col) for r, col in c.blank)
    missing = sorted(tile_name(r, col) for r, col in c.missing)
    # the match result and the report name the blank tiles (and no content tile) …
    assert s.report.blank == blank
    assert s.doc["tiles"]["blank"] == blank
    # … and the layout rows whose file is missing, skipped with the reason, the rest stitched
    skipped = {e["tile"]: e for e in s.doc["tiles"]["skipped"]}
    assert sorted(skipped) == missing
    assert all("no file" in e["reason"] for e in skipped.values())
    assert {(e["row"], e["column"]) for e in skipped.values()} == set(c.missing)
    assert s.doc["tiles"]["listed"] == c.rows * c.columns
    assert s.doc["tiles"]["stitched"] == c.rows * c.columns - len(missing)
    # blank tiles are not failures to place: nothing unplaced, the checks pass
    assert s.doc["tiles"]["unplaced"] == []
    assert s.doc["tiles"]["placed_by_images"] == c.rows * c.columns - len(missing) - len(blank)
    assert s.doc["passed"]


# ----------------------------------------------------------------------------------------------------
# Per-tile rotation, rigid solve


def test_per_tile_rotation_is_recovered_by_the_rigid_solve(rotation):
    s = rotation
    c = s.montage.config
    raw = content_truth(s.montage)
    truth = in_mean_tile_frame(raw)
    rigid = tile_errors(s.layout.transforms, truth, c.tile_px)
    # the same matches, translation only: what the rotation costs a model that cannot follow it
    flat = tile_errors(solve_tile_folder(s.folder, s.report, "translation").transforms, truth, c.tile_px)
    angle_error = np.array([angle_deg(s.layout.transforms[n]) - angle_deg(truth[n]) for n in truth])
    print(
        f"\n{c.rows}x{c.columns} rotation ±{c.rotation_deg}°: rigid {rms(rigid):.4f} px RMS / "
        f"{rigid.max():.4f} max (angles {rms(angle_error):.4f}° RMS; in the truth's own frame, "
        f"mean tile angle {np.mean([angle_deg(m) for m in raw.values()]):+.4f}°: "
        f"{rms(tile_errors(s.layout.transforms, raw, c.tile_px)):.4f} px RMS); translation model "
        f"{rms(flat):.4f} px RMS / {flat.max():.4f} max; unmatched {len(s.report.unmatched)}, "
        f"rejected {len(s.layout.rejected)}"
    )
    assert s.layout.model == "rigid"
    assert rms(flat) > 0.25  # the rotation matters at this size …
    assert rms(rigid) <= 0.25  # … and the rigid solve follows it
    assert rigid.max() <= 1.0
    assert rms(angle_error) < 0.5 * c.rotation_deg / np.sqrt(3)  # well under the angles' own spread
    assert s.doc["passed"]


# ----------------------------------------------------------------------------------------------------
# A forced tear


def test_a_forced_tear_fails_the_checks_and_names_the_torn_piece(tear):
    s = tear
    c = s.montage.config
    first_torn, _ = c.tear
    torn = sorted(tile_name(r, col) for r in range(first_torn, c.rows) for col in range(c.columns))
    across = {(tile_name(first_torn, col), tile_name(first_torn - 1, col)) for col in range(c.columns)}
    accepted = set(s.layout.edge_residuals)
    print(
        f"\n{c.rows}x{c.columns} tear at row {first_torn} by {c.tear[1]} px: passed {s.doc['passed']}, "
        f"checks {s.doc['checks']}, unplaced {len(s.doc['tiles']['unplaced'])}, components "
        f"{[g['tiles'] for g in s.doc['components']]}, unmatched {len(s.report.unmatched)}, "
        f"rejected {len(s.layout.rejected)}"
    )
    assert not accepted & across  # no accepted edge ties the two pieces together …
    assert not s.doc["passed"]  # … and the checks say so
    assert s.doc["checks"] == {"placed": False, "connected": False, "seams": True, "residual": True}
    assert s.doc["tiles"]["unplaced"] == torn  # the smaller piece, by name
    [piece] = s.doc["components"]
    assert piece["members"] == torn and piece["content_tiles"] == len(torn)
    # the torn piece holds together by itself (one group, above): the tear is the only break


# ----------------------------------------------------------------------------------------------------
# The command end to end (10 × 10)


def test_the_command_names_blank_and_missing_tiles_and_exits_0(tmp_path, capsys):
    montage = make_montage(translation_config(10))
    folder = tmp_path / "tiles"
    layout_csv = montage.write(folder, workers=2)
    out = tmp_path / "out" / "m.zarr"
    code = main(["stitch", str(folder), "--layout", str(layout_csv), "--out", str(out), "--no-fuse",
                 "--workers", "2"])  # fmt: skip
    capsys.readouterr()
    doc = json.loads((tmp_path / "out" / "m.report.json").read_text())
    c = montage.config
    assert code == 0 and doc["passed"], doc["checks"]
    assert doc["tiles"]["blank"] == sorted(tile_name(r, col) for r, col in c.blank)
    assert sorted(e["tile"] for e in doc["tiles"]["skipped"]) == sorted(
        tile_name(r, col) for r, col in c.missing
    )
    assert doc["tiles"]["unplaced"] == []


def test_the_command_exits_3_on_a_torn_montage(tmp_path, capsys):
    montage = make_montage(tear_config(10))
    folder = tmp_path / "tiles"
    layout_csv = montage.write(folder, workers=2)
    out = tmp_path / "out" / "m.zarr"
    code = main(["stitch", str(folder), "--layout", str(layout_csv), "--out", str(out), "--no-fuse",
                 "--workers", "2"])  # fmt: skip
    err = capsys.readouterr().err
    doc = json.loads((tmp_path / "out" / "m.report.json").read_text())
    first_torn, _ = montage.config.tear
    torn = sorted(tile_name(r, col) for r in range(first_torn, 10) for col in range(10))
    assert code == 3 and "checks failed" in err
    assert not doc["checks"]["connected"] and not doc["passed"]
    assert doc["tiles"]["unplaced"] == torn
