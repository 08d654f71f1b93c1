"""Rigid tiles and the scope's lens correction through the montage assets (issue 14, item 2).

Montages of the synthetic generator (:mod:`tests.stitch.synthetic`: per-tile rotation or a lens
distortion shared by every tile, known truth) are put in the acquisition journal and the buffer as live
processing leaves them: processed tiles in ``processed_tiles.zarr``, each tile's matches against its top
and left neighbours measured by the live matcher (:func:`~em_platform.stitch.matching.match_neighbour`).
Then the assets run through Dagster: ``montage_layout`` → ``montage`` (and ``lens_correction``).

The fused pixels are compared with the specimen itself: the synthetic tiles are cut from one texture, so
the fused image's truth is that texture seen through the one affine map between the layout's frame and
the specimen's (fitted to the tile corners; the solve's gauge is free).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import dagster as dg
import numpy as np
import pytest
import zarr

from em_platform.assets.montage import lens_correction, montage, montage_layout
from em_platform.resources import build_resources
from em_platform.stitch.fuse import PlacedTile, ZarrTileGroup, fuse_montage
from em_platform.stitch.grid import array_name
from em_platform.stitch.matching import match_neighbour
from em_platform.stitch.montage_layout import layout_lens, placed_tiles
from em_platform.tem.journal import Journal
from tests.stitch.synthetic import ORIGIN, HardMontage, HardMontageConfig, _texture, make_montage
from tests.support.platform import make_platform

TILE_PX = 256
PIXEL_NM = 4.0
LENS = (0.01, 0.0, 0.0)  # k1 in half tiles: 3.6 px at the corners of a 256² tile, ~1.3 px mid-edge


@pytest.fixture
def platform(tmp_path):
    return make_platform(tmp_path)


def config(**kw) -> HardMontageConfig:
    # no vignetting or gain spread: a fused pixel is the specimen's transmission times one dose (plus noise)
    base = dict(
        rows=3, columns=4, tile_px=TILE_PX, overlap=0.125, stage_error=0.15, vignetting=0.0, gain_spread=0.0
    )
    return HardMontageConfig(**{**base, **kw})


def acquire(
    platform, montage_id: str, m: HardMontage, *, matcher=match_neighbour, unmatched_ok: bool = False
) -> None:
    """The montage in the journal and the buffer as live processing leaves it (tiles processed, matched).

    ``matcher`` (``match_neighbour``'s signature) measures each tile against its top and left neighbours;
    an edge it finds nothing on fails the set-up unless ``unmatched_ok`` (then the tile has no match there,
    as live processing leaves it)."""
    journal = Journal(platform.settings.catalog_url)
    images = {(t.row, t.column): m.image(t) for t in m.tiles}
    overlap = m.config.overlap_px
    ids = {(t.row, t.column): f"{montage_id}-r{t.row}c{t.column}" for t in m.tiles}
    group = zarr.open_group(
        str(Path(platform.settings.buffer) / montage_id / "processed_tiles.zarr"), mode="w"
    )
    for t in m.tiles:
        centre = np.asarray(t.stage) + TILE_PX / 2  # TEM_comms: the stage reads the field of view's centre
        journal.record(
            "tile.raw",
            {
                "montage_id": montage_id,
                "tile_id": ids[(t.row, t.column)],
                "row": t.row,
                "column": t.column,
                "overlap": overlap,
                "stage_position": [int(round(v * PIXEL_NM)) for v in centre],
                "path": f"/scope/{montage_id}/{t.name}",
            },
        )
        group.create_array(array_name(t.row, t.column), data=images[(t.row, t.column)], chunks=(128, 128))
    for (r, c), image in images.items():
        matches = {}
        for position, other in (("top", (r - 1, c)), ("left", (r, c - 1))):
            if other in images:
                found = matcher(image, images[other], position, overlap, row=other[0], column=other[1])
                if found is None and unmatched_ok:
                    continue
                assert found is not None, f"no match for tile {(r, c)} against its {position} neighbour"
                matches[position] = {**found.to_message(), "quality": found.quality}
        journal.save_tile_results(
            ids[(r, c)], status="processed", results={"matches": matches}, qc_passed=True
        )
    journal.record(
        "montage.complete",
        {"montage_id": montage_id, "pixel_size": PIXEL_NM, "rotation_angle": 0.0, "tiles": {}},
    )
    journal.dispose()


def run(platform, instance, montage_id: str, assets: list, **config) -> dg.ExecuteInProcessResult:
    """Materialize ``assets`` of one montage; ``config`` goes to the first of them."""
    result = dg.materialize(
        [montage_layout, montage, lens_correction],
        selection=assets,
        partition_key=montage_id,
        instance=instance,
        resources=build_resources(platform.settings),
        run_config={"ops": {assets[0].op.name: {"config": config}}} if config else None,
    )
    assert result.success
    return result


def metadata(instance, key: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def fused_error(fused: np.ndarray, origin: tuple[int, int], layout: dict, m: HardMontage) -> float:
    """RMS difference (in the tiles' noise-free grey levels' units) between a fused image and the specimen it
    shows, over the pixels the tiles cover (a few pixels in from the montage's border)."""
    true = {(t.row, t.column): t.truth for t in m.tiles}
    corners = np.array([[0, 0], [TILE_PX - 1, 0], [0, TILE_PX - 1], [TILE_PX - 1, TILE_PX - 1]], float)
    frame, specimen = [], []
    for t in layout["tiles"]:
        solved, truth = np.asarray(t["transform"]), true[(t["row"], t["column"])]
        frame.append(corners @ solved[:, :2].T + solved[:, 2])
        specimen.append(corners @ truth[:, :2].T + truth[:, 2])
    frame, specimen = np.concatenate(frame), np.concatenate(specimen)
    s, *_ = np.linalg.lstsq(np.column_stack([frame, np.ones(len(frame))]), specimen, rcond=None)
    a, b = s[:2].T, s[2]  # specimen = a @ frame + b
    oy, ox = origin  # fused pixel (col, row) is frame point (col + ox, row + oy)
    warp = np.column_stack([a, a @ np.array([ox, oy], float) + b + ORIGIN])
    height, width = fused.shape
    truth = cv2.warpAffine(
        _texture(m.config.seed), warp, (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_WRAP,
    )  # fmt: skip
    covered = cv2.erode((fused > 0).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    grey = fused[covered].astype(np.float64) / (16 * m.config.dose)
    return float(np.sqrt(np.mean((grey - truth[covered]) ** 2)))


def buffer_fused(platform, montage_id: str) -> tuple[np.ndarray, tuple[int, int]]:
    folder = Path(platform.settings.buffer) / montage_id
    info = json.loads((folder / "montage.json").read_text())
    return zarr.open_group(str(folder / "montage.ome.zarr"), mode="r")["0"][...], tuple(info["origin"])


def test_a_rigid_montage_is_fused_by_its_rotations_not_its_translations(platform, tmp_path):
    m = make_montage(config(rotation_deg=0.6, seed=5))  # ±1.3 px at a tile's corners if pasted square
    acquire(platform, "rigid", m)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("montages", ["rigid"])
        run(platform, instance, "rigid", [montage_layout, montage], model="rigid", lens="none")
        layout_meta, fused_meta = metadata(instance, "montage_layout"), metadata(instance, "montage")
    assert layout_meta["model"] == "rigid" and layout_meta["resampled"] is True
    assert fused_meta["placement"] == "resampled" and fused_meta["lens_corrected"] is False

    # layout.json carries each tile's rotation (x, y stay the centre-kept corners for translation readers)
    layout = json.loads((Path(platform.settings.buffer) / "rigid" / "layout.json").read_text())
    true = {(t.row, t.column): t.truth for t in m.tiles}
    solved_deg = np.array(
        [np.degrees(np.arctan2(t["transform"][1][0], t["transform"][0][0])) for t in layout["tiles"]]
    )
    true_deg = np.array(
        [np.degrees(np.arctan2(*true[(t["row"], t["column"])][::-1, 0])) for t in layout["tiles"]]
    )
    assert np.ptp(true_deg) > 0.6
    assert np.std(solved_deg - true_deg) < 0.03  # the rotations, up to the montage's common one

    fused, origin = buffer_fused(platform, "rigid")
    resampled = fused_error(fused, origin, layout, m)
    # the same layout as the assets fused it before transforms were kept: tiles pasted at x, y
    square = [PlacedTile(t.tile_id, t.y, t.x, t.height, t.width) for t in placed_tiles(layout)]
    pasted = fuse_montage(
        square,
        ZarrTileGroup(str(Path(platform.settings.buffer) / "rigid" / "processed_tiles.zarr")),
        str(tmp_path / "pasted.zarr"),
        pixel_size_nm=PIXEL_NM,
    )
    assert pasted.resampled is False
    by_translation = fused_error(
        zarr.open_group(str(tmp_path / "pasted.zarr"), mode="r")["0"][...], pasted.origin, layout, m
    )
    print(f"\nfused vs specimen, RMS: resampled {resampled:.4f}, pasted by translation {by_translation:.4f}")
    assert resampled < 0.75 * by_translation


def test_a_lens_estimated_from_one_montage_corrects_the_next(platform):
    calibration = make_montage(config(rows=4, columns=4, lens=LENS, seed=3))
    later = make_montage(config(lens=LENS, seed=4))
    acquire(platform, "calibration", calibration)
    acquire(platform, "later", later)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("montages", ["calibration", "later"])
        # before any estimate, 'latest' (the default) finds none: the montage is laid out without one
        run(platform, instance, "later", [montage_layout, montage], model="rigid")
        without = metadata(instance, "montage_layout")
        assert without["lens"].startswith("none (no lens_correction for scope 'default'")
        layout_without = json.loads((Path(platform.settings.buffer) / "later" / "layout.json").read_text())
        assert layout_without["lens"] is None and layout_lens(layout_without) is None
        error_without = fused_error(*buffer_fused(platform, "later"), layout_without, later)

        run(platform, instance, "calibration", [lens_correction], scope="tem-1")
        fit = metadata(instance, "lens_correction")
        assert fit["latest"] is True and fit["scope"] == "tem-1"
        assert fit["residual_mean_px_after"] < 0.5 * fit["residual_mean_px_before"]
        assert fit["max_displacement_px"] == pytest.approx(calibration.lens.max_displacement(), rel=0.25)
        stored = platform.data_root / "lens_correction" / "tem-1"
        assert (stored / "latest.json").is_file() and (stored / "calibration.json").is_file()

        run(platform, instance, "later", [montage_layout, montage], model="rigid", scope="tem-1")
        with_lens, fused_meta = metadata(instance, "montage_layout"), metadata(instance, "montage")
    assert "from montage calibration" in with_lens["lens"] and with_lens["resampled"] is True
    assert fused_meta["lens_corrected"] is True and fused_meta["placement"] == "resampled"
    layout = json.loads((Path(platform.settings.buffer) / "later" / "layout.json").read_text())
    assert layout_lens(layout).max_displacement() == pytest.approx(fit["max_displacement_px"], abs=1e-3)

    before = without["residual_per_point_pair"]["mean_px"]
    after = with_lens["residual_per_point_pair"]["mean_px"]
    error_with = fused_error(*buffer_fused(platform, "later"), layout, later)
    print(
        f"\nlater montage, residual per point pair {before:.3f} -> {after:.3f} px; "
        f"fused vs specimen RMS {error_without:.4f} -> {error_with:.4f}"
    )
    assert after < 0.5 * before
    assert error_with < 0.72 * error_without  # the fusion ignoring the lens gives ~0.81


def test_a_layout_written_before_transforms_were_kept_is_still_placed_by_x_and_y():
    from em_platform.stitch.montage_layout import LAYOUT_FORMAT

    tile = {"array": "r000_c000", "row": 0, "column": 0, "height": 8, "width": 9, "x": 1.5, "y": -2.0}
    old = {"format": LAYOUT_FORMAT, "tiles": [tile]}
    [placed] = placed_tiles(old)
    assert (placed.x, placed.y, placed.transform) == (1.5, -2.0, None) and layout_lens(old) is None
    rotated = {**old, "tiles": [{**tile, "transform": [[0.9, -0.1, 1.0], [0.1, 0.9, -2.5]]}]}
    assert placed_tiles(rotated)[0].transform == ((0.9, -0.1, 1.0), (0.1, 0.9, -2.5))
    with pytest.raises(ValueError, match="not a montage layout"):
        placed_tiles({"tiles": [tile]})


def test_the_scopes_own_matches_are_solved_instead_of_the_journals(platform, tmp_path):
    """``matches``: a render point-match collection from the scope (ids = the journal's tile ids), gzipped
    as render writes it, replaces the journal's matches; one that names no tile of the montage fails the
    run naming the file."""
    import gzip

    from em_platform.stitch.interop import write_point_matches

    m = make_montage(config(rotation_deg=0.6, seed=5))
    acquire(platform, "scope", m)
    ids = {t.name: f"scope-r{t.row}c{t.column}" for t in m.tiles}
    found = m.point_matches(points_per_edge=12, noise_px=0.2, wrong_fraction=0.0, seed=1)
    kept = found.edges[1:]  # the scope matched every neighbour pair but one (each tile keeps an edge)
    plain = write_point_matches(tmp_path / "scope.json", kept, tile_ids=ids)
    zipped = tmp_path / "scope.json.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("montages", ["scope"])
        run(platform, instance, "scope", [montage_layout], lens="none", matches=str(zipped))
        meta = metadata(instance, "montage_layout")
        assert meta["matches"] == str(zipped)
        assert meta["edges"] == len(kept)  # the journal has one per neighbour pair: these are the scope's
        assert meta["disconnected_tiles"] == 0 and meta["model"] in ("rigid", "affine")

        stranger = write_point_matches(tmp_path / "other.json", kept, tile_ids={})  # synthetic names
        failed = dg.materialize(
            [montage_layout], partition_key="scope", instance=instance,
            resources=build_resources(platform.settings), raise_on_error=False,
            run_config={"ops": {"montage_layout": {"config": {"matches": str(stranger)}}}},
        )  # fmt: skip
    assert not failed.success
    message = str(failed.get_step_failure_events()[0].event_specific_data.error)
    assert "other.json" in message and "none of the" in message and "tile ids" in message
