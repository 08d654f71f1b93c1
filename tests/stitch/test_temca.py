"""A real TEMCA montage (em_stitch's sdist example: 4,969 tiles, the scope's own matcher point pairs) and the
failure it showed: tiles turned by a few tenths of a degree leave a translation solve tens of pixels off at
the ends of good edges; judged as outliers by their residual, 294 good edges were torn out (blocks 360 px
off). The matches are consistent (every 2 × 2 loop closes within 6 px): loops, not residuals, judge edges.

The whole montage is solved in ``bench/bench_montage.py`` (part ``temca``); here a block of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from em_platform.stitch.layout import PointEdge, residual_stats
from em_platform.stitch.solve_affine import solve_transforms
from em_platform.stitch.temca import TemcaFileError, read_temca_metafile
from tests.stitch.bigfeta_reference import bigfeta_montage_solve, em_stitch_filter
from tests.stitch.em_stitch_data import MONTAGE_METAFILE, em_stitch_data

# rows 1-12 hold the montage's most turned tiles (rows 2-3: 0.26° against their neighbours' 0.46°), where
# the residual-judged solve tore the most
BLOCK = {"columns": range(52, 70), "rows": range(1, 13)}


@pytest.fixture(scope="module")
def document() -> list:
    em_stitch_data()
    return json.loads(MONTAGE_METAFILE.read_text())


def block_metafile(document: list, folder: Path, columns=BLOCK["columns"], rows=BLOCK["rows"]) -> Path:
    """The metafile cut to a block of raster positions (the matcher entries of its edge tiles that name a
    tile outside the block find no neighbour, as at a montage's border)."""
    doc = json.loads(json.dumps(document[:2]))
    doc[1]["data"] = [
        t
        for t in doc[1]["data"]
        if t["img_meta"]["raster_pos"][0] in columns and t["img_meta"]["raster_pos"][1] in rows
    ]
    path = folder / "_metadata_block.json"
    path.write_text(json.dumps(doc))
    return path


def kept_pair_residuals(transforms, edges, keep) -> dict:
    """Residuals of em_stitch's kept pairs (RANSAC 10 px) under ``transforms``: the pairs both solves fit."""
    out = []
    for e, w in zip(edges, keep, strict=True):
        a, b = transforms[e.tile], transforms[e.neighbour]
        out.append((e.p @ a[:, :2].T + a[:, 2] - e.q @ b[:, :2].T - b[:, 2])[w > 0])
    return residual_stats(np.vstack(out))


def test_the_metafile_reads_as_em_stitch_reads_it(document, tmp_path):
    path = tmp_path / "_metadata_full.json"
    path.write_text(json.dumps(document))
    montage = read_temca_metafile(path)
    assert len(montage.tiles) == 4969 and len(montage.edges) == 9790
    assert (montage.width, montage.height, montage.pixel_size_nm, montage.stage_angle_deg) == (
        3840,
        3840,
        3.85,
        183.6,
    )
    assert montage.shared_transform["className"] == "mpicbg.trakem2.transform.ThinPlateSplineTransform"
    # stage -> image px as em_stitch's tile specs (generate_EM_tilespecs_from_metafile), up to its int()
    data = {t["img_path"]: t for t in document[1]["data"]}
    a = np.radians(183.6)
    expected = {}
    for name, t in data.items():
        x, y = (v / 3.85 for v in t["img_meta"]["stage_pos"])
        expected[name] = (x * np.cos(a) + y * np.sin(a), -x * np.sin(a) + y * np.cos(a))
    low = np.min(list(expected.values()), axis=0)
    for t in montage.tiles[::97]:
        assert np.allclose((t.x, t.y), np.subtract(expected[t.name], low), atol=1e-6)
        assert (t.column, t.row) == tuple(data[t.name]["img_meta"]["raster_pos"])
    # em_stitch's convention: the matcher's p points lie in the neighbour (the template's tile)
    e = montage.edges[0]
    q_tile = next(t for t in montage.tiles if t.name == e.neighbour)
    p_tile = next(t for t in montage.tiles if t.name == e.tile)
    assert abs(q_tile.column - p_tile.column) + abs(q_tile.row - p_tile.row) == 1


@pytest.mark.parametrize("model", ["translation", "affine"])
def test_real_turned_tiles_keep_every_edge_and_fit_close_to_em_stitchs_solve(document, tmp_path, model):
    montage = read_temca_metafile(block_metafile(document, tmp_path))
    stage = {t.name: (t.x, t.y) for t in montage.tiles}
    edges = list(montage.edges)
    assert len(montage.tiles) == 18 * 12 and len(edges) > 380
    solved = solve_transforms(stage, edges, model, tile_size=(montage.width, montage.height))
    keep = em_stitch_filter(edges)
    ours = kept_pair_residuals(solved.transforms, edges, keep)
    reference = kept_pair_residuals(bigfeta_montage_solve(stage, edges, model), edges, keep)
    # every loop closes: no good edge is torn out, and no block comes loose
    assert solved.loops["loops_closing"] == solved.loops["loops"] > 150
    assert solved.rejected == {} and solved.disconnected == []
    assert ours["max_px"] <= reference["max_px"] + 1.0, (ours, reference)
    # our affine's spreads are scaled to what predicts held-out pairs (em_platform.stitch.held_out): it fits
    # em_stitch's kept pairs 4 % below em_stitch's own near-free solve here, 6 % on the whole montage
    assert ours["mean_px"] <= 1.01 * reference["mean_px"], (ours, reference)


def test_the_command_solves_a_metafile_without_its_images(document, tmp_path):
    meta = block_metafile(document, tmp_path, columns=range(52, 58), rows=range(1, 7))
    out = tmp_path / "out" / "block.zarr"
    run = subprocess.run(
        [sys.executable, "-m", "em_platform.cli", "stitch", str(tmp_path), "--metafile", str(meta), "--out", str(out),
         "--model", "affine"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "solved from the matches only" in run.stderr and not out.exists()
    report = json.loads(out.with_name("block.report.json").read_text())
    assert report["loops"]["loops"] == report["loops"]["loops_closing"] == 25
    assert report["residuals"]["mean_px"] < 2.5
    positions = out.with_name("block.positions.csv").read_text().splitlines()
    assert len(positions) == 1 + 36


def test_a_file_that_is_not_a_metafile_is_refused_naming_the_field(tmp_path, document):
    bad = tmp_path / "_metadata_bad.json"
    doc = json.loads(json.dumps(document[:2]))
    del doc[1]["data"][3]["img_meta"]["raster_pos"]
    bad.write_text(json.dumps(doc))
    with pytest.raises(TemcaFileError, match=r"data\[3\]: no img_meta.raster_pos"):
        read_temca_metafile(bad)
    bad.write_text(json.dumps({"data": []}))
    with pytest.raises(TemcaFileError, match="JSON list of sections"):
        read_temca_metafile(bad)


def turned(document: list, column: int, degrees: float) -> list:
    """The metafile with every tile of one raster column turned by ``degrees`` about its centre: its own
    points of every match (``q`` in its matcher, ``p`` in its neighbours' that name it) turn with it."""
    doc = json.loads(json.dumps(document[:2]))
    size = doc[0]["metadata"]["camera_info"]["width"] / 2
    a = np.radians(degrees)

    def turn(xs, ys):
        x, y = np.asarray(xs) - size, np.asarray(ys) - size
        return list(x * np.cos(a) - y * np.sin(a) + size), list(x * np.sin(a) + y * np.cos(a) + size)

    steps = {2: (-1, 0), 3: (0, -1), 4: (1, 0)}
    for t in doc[1]["data"]:
        c, r = t["img_meta"]["raster_pos"]
        for m in t.get("matcher") or []:
            if m.get("match_quality", 0) == -1 or "pX" not in m:
                continue
            if c == column:
                m["qX"], m["qY"] = turn(m["qX"], m["qY"])
            if c + steps.get(int(m["position"]), (0, 0))[0] == column and int(m["position"]) in steps:
                m["pX"], m["pY"] = turn(m["pX"], m["pY"])
    return doc


def polynomial_residuals(polynomials, edges, keep) -> dict:
    """Residuals of em_stitch's kept pairs under per-tile 2nd-order maps (1, x, y, x², xy, y²)."""

    def at(c, pts):
        x, y = pts[:, 0], pts[:, 1]
        return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1) @ c.T

    out = [
        (at(polynomials[e.tile], e.p) - at(polynomials[e.neighbour], e.q))[w > 0]
        for e, w in zip(edges, keep, strict=True)
    ]
    return residual_stats(np.vstack(out))


def test_the_polynomial_model_fits_the_real_block_below_the_affine(document, tmp_path):
    """em_stitch's best model on real tiles: each tile's x and y a 2nd-order polynomial of its point."""
    montage = read_temca_metafile(block_metafile(document, tmp_path))
    stage = {t.name: (t.x, t.y) for t in montage.tiles}
    edges = list(montage.edges)
    keep = em_stitch_filter(edges)
    size = (montage.width, montage.height)
    affine = solve_transforms(stage, edges, "affine", tile_size=size)
    poly = solve_transforms(stage, edges, "polynomial", tile_size=size)
    assert poly.polynomials is not None and set(poly.polynomials) == set(stage)
    ours = polynomial_residuals(poly.polynomials, edges, keep)
    flat = kept_pair_residuals(affine.transforms, edges, keep)
    reference = kept_pair_residuals(bigfeta_montage_solve(stage, edges, "affine"), edges, keep)
    print(
        f"\npolynomial {ours['mean_px']:.3f} px, affine {flat['mean_px']:.3f}, BigFeta affine {reference['mean_px']:.3f}"
    )
    assert ours["mean_px"] < 0.9 * flat["mean_px"] and ours["mean_px"] < reference["mean_px"]
    assert ours["max_px"] <= reference["max_px"]
    assert poly.rejected == {} and poly.disconnected == [] and poly.torn == {}
    # the layout's own figure over its consensus pairs (10 px, as em_stitch's filter) is the same maps'
    assert poly.inlier_residual_stats["mean_px"] == pytest.approx(ours["mean_px"], rel=0.05)


def test_a_model_that_cannot_fit_the_real_tiles_is_reported_torn_and_the_command_fails(document, tmp_path):
    """A column of tiles turned by 1° under a translation-only model: its edges are left tens of px apart at
    their ends (the loops vouch for them: the turn is consistent). The solve reports them torn over their
    consensus pairs, the residual check fails and the command exits 3; the polynomial model fits the same
    block and exits 0, its tile specs render's PolynomialTransform2D."""
    meta = block_metafile(turned(document, column=55, degrees=1.0), tmp_path, range(52, 60), range(1, 7))

    def stitch(model: str) -> tuple[int, dict, Path]:
        out = tmp_path / model / "block.zarr"
        run = subprocess.run(
            [sys.executable, "-m", "em_platform.cli", "stitch", str(tmp_path), "--metafile", str(meta),
             "--out", str(out), "--model", model, "--no-fuse"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        return run.returncode, json.loads(out.with_name("block.report.json").read_text()), out

    code, report, _ = stitch("translation")
    assert code == 3 and not report["passed"] and report["checks"]["residual"] is False
    assert report["torn_edges"] and report["torn_edges"][0]["median_residual_px"] > 10
    assert report["inlier_residuals"]["max_px"] > 20

    code, report, out = stitch("polynomial")
    assert code == 0 and report["passed"] and report["torn_edges"] == []
    assert report["inlier_residuals"]["mean_px"] < 2.0
    specs = json.loads(out.with_name("block.tilespecs.json").read_text())
    leaf = specs[0]["transforms"]["specList"][-1]
    assert leaf["className"] == "mpicbg.trakem2.transform.PolynomialTransform2D"
    assert len(leaf["dataString"].split()) == 12


# em_stitch 0.3.4 on the whole montage, over the pairs its RANSAC filter keeps: (worst pair, mean) px; the
# reference solves of tests.stitch.bigfeta_reference reproduce them (bench/bench_temca.py)
EM_STITCH = {"affine": (10.57, 1.956), "polynomial": (7.86, 1.517)}


@pytest.fixture(scope="module")
def whole_montage():
    em_stitch_data()
    montage = read_temca_metafile(MONTAGE_METAFILE)
    return montage, em_stitch_filter(montage.edges)


def pair_distances(solved, edges) -> list[np.ndarray]:
    """Per edge, each pair's residual (px) under the solve's affine or polynomial maps."""

    def at(tile, pts):
        if solved.polynomials is not None:
            x, y = pts[:, 0], pts[:, 1]
            return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1) @ solved.polynomials[tile].T
        a = solved.transforms[tile]
        return pts @ a[:, :2].T + a[:, 2]

    return [np.hypot(*(at(e.tile, e.p) - at(e.neighbour, e.q)).T) for e in edges]


@pytest.mark.parametrize("model", ["affine", "polynomial"])
def test_no_inlier_pair_of_the_whole_montage_is_worse_than_em_stitchs_worst(whole_montage, model):
    """Issue 38: every pair a user would call an inlier (em_stitch's kept pairs; ours; and, given only
    em_stitch's kept pairs, as `em-platform stitch --matches` reads its filtered collection, every one)
    within em_stitch's worst pair, the mean below its mean. Our RANSAC's consensus, which stopped early,
    dropped a wrong-but-within-10-px pair em_stitch keeps when given em_stitch's pairs: 12.99 px (affine),
    11.9 (polynomial)."""
    montage, keep = whole_montage
    stage = {t.name: (t.x, t.y) for t in montage.tiles}
    size = (montage.width, montage.height)
    worst, mean = EM_STITCH[model]
    solved = solve_transforms(stage, montage.edges, model, tile_size=size)
    r = pair_distances(solved, montage.edges)
    ours = [solved.inlier_pairs[(e.tile, e.neighbour)] for e in montage.edges]
    given = [
        PointEdge(e.tile, e.neighbour, e.p[w > 0], e.q[w > 0])
        for e, w in zip(montage.edges, keep, strict=True)
        if w.any()
    ]
    solved_given = solve_transforms(stage, given, model, tile_size=size)
    sets = {
        "em_stitch's kept pairs": np.concatenate([d[w > 0] for d, w in zip(r, keep, strict=True)]),
        "our inliers": np.concatenate([d[k] for d, k in zip(r, ours, strict=True)]),
        "em_stitch's pairs as the input": np.concatenate(pair_distances(solved_given, given)),
    }
    for name, d in sets.items():
        assert d.max() <= worst and d.mean() < mean, (model, name, d.max(), d.mean())
    assert solved.rejected == {} and solved_given.rejected == {}
