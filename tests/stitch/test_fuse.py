"""Montage fusion (em_platform.stitch.fuse) on small synthetic montages: 3 x 3 tiles of 96 px, 16 px overlap."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile
import zarr

from em_platform.imaging.pyramid import downsample_mean, plan_pyramid
from em_platform.stitch import fuse as fuse_module
from em_platform.stitch.fuse import (
    PlacedTile,
    TiffTileFolder,
    TileNotFound,
    ZarrTileGroup,
    fuse_montage,
)

SIDE = 96
STEP = 80  # 16 px overlap


def grid_tiles(rows=3, cols=3, dtype=np.uint8, seed=0, offset=(0.0, 0.0), skip=()):
    """Independent random tiles (so overlaps disagree) on a regular grid: {tile_id: pixels}, placements."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    lo, hi = (1, 250) if dtype.kind in "iu" else (0.0, 1.0)
    pixels, placed = {}, []
    for r in range(rows):
        for c in range(cols):
            tid = f"r{r:03d}_c{c:03d}"
            if dtype.kind == "f":
                pixels[tid] = rng.uniform(lo, hi, (SIDE, SIDE)).astype(dtype)
            else:
                pixels[tid] = rng.integers(lo, hi, (SIDE, SIDE), endpoint=True).astype(dtype)
            if (r, c) not in skip:
                placed.append(PlacedTile(tid, r * STEP + offset[0], c * STEP + offset[1], SIDE, SIDE))
    return pixels, placed


def store_tiles(url: str, pixels: dict[str, np.ndarray]) -> ZarrTileGroup:
    """The live pipeline's layout: one zarr v3 array per tile inside a group."""
    for tid, a in pixels.items():
        zarr.create_array(f"{url}/{tid}", shape=a.shape, chunks=(64, 64), dtype=a.dtype, overwrite=True)[
            ...
        ] = a
    return ZarrTileGroup(url)


def read_level(url: str, level: int = 0) -> np.ndarray:
    return zarr.open_group(url, mode="r")[str(level)][...]


def stack(placed, pixels, shape):
    """Every tile pasted into its own full-size layer (NaN outside it), at rounded positions from 0."""
    ys = [int(np.floor(t.y + 0.5)) for t in placed]
    xs = [int(np.floor(t.x + 0.5)) for t in placed]
    y0, x0 = min(ys), min(xs)
    layers = np.full((len(placed), *shape), np.nan)
    for k, (t, y, x) in enumerate(zip(placed, ys, xs, strict=True)):
        layers[k, y - y0 : y - y0 + t.height, x - x0 : x - x0 + t.width] = pixels[t.tile_id]
    return layers


def only_value(layers):
    """Per pixel, the largest finite layer value (the value itself where one layer covers it); NaN where none."""
    finite = np.isfinite(layers)
    top = np.where(finite, layers, -np.inf).max(axis=0)
    return np.where(finite.any(axis=0), top, np.nan)


def feather(n: int, blend_px: int) -> np.ndarray:
    """The documented ramp: distance of each pixel centre from the tile border over blend_px, at most 1."""
    i = np.arange(n)
    return np.minimum((np.minimum(i, n - 1 - i) + 0.5) / blend_px, 1.0)


# ----------------------------------------------------------------------------------------------------
# Pixels


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_a_pixel_covered_by_one_tile_is_that_tiles_pixel(tmp_path, dtype):
    pixels, placed = grid_tiles(dtype=dtype)
    source = store_tiles(str(tmp_path / "tiles.zarr"), pixels)
    result = fuse_montage(placed, source, str(tmp_path / "fused.zarr"), pixel_size_nm=4.0)
    out = read_level(str(tmp_path / "fused.zarr"))
    assert out.dtype == np.dtype(dtype)
    layers = stack(placed, pixels, out.shape)
    covered = np.isfinite(layers)
    single = covered.sum(axis=0) == 1
    assert single.sum() > 0.6 * out.size
    expected = only_value(layers)  # with one finite layer, that layer's value
    np.testing.assert_array_equal(out[single], expected[single].astype(dtype))
    assert result.shape == out.shape == (2 * STEP + SIDE, 2 * STEP + SIDE)


def test_overlaps_lie_between_the_tiles_and_equal_them_where_they_agree(tmp_path):
    base = np.random.default_rng(1).integers(20, 230, (2 * STEP + SIDE,) * 2, dtype=np.uint8)
    pixels, placed = {}, []
    rng = np.random.default_rng(2)
    for r in range(3):
        for c in range(3):
            tid = f"r{r}c{c}"
            tile = base[r * STEP : r * STEP + SIDE, c * STEP : c * STEP + SIDE].copy()
            disagree = rng.random(tile.shape) < 0.5  # each tile changes its own half of the pixels
            tile[disagree] = rng.integers(0, 255, disagree.sum(), endpoint=True)
            pixels[tid] = tile
            placed.append(PlacedTile(tid, r * STEP, c * STEP, SIDE, SIDE))
    source = store_tiles(str(tmp_path / "tiles.zarr"), pixels)
    fuse_montage(placed, source, str(tmp_path / "fused.zarr"), pixel_size_nm=2.0)
    out = read_level(str(tmp_path / "fused.zarr")).astype(float)
    layers = stack(placed, pixels, out.shape)
    multi = np.isfinite(layers).sum(axis=0) >= 2
    lo, hi = np.nanmin(layers, axis=0), only_value(layers)
    assert multi.sum() > 0
    assert np.all(out[multi] >= lo[multi]) and np.all(out[multi] <= hi[multi])
    agree = multi & (lo == hi)
    assert agree.sum() > 100
    np.testing.assert_array_equal(out[agree], lo[agree])
    strict = multi & (hi - lo >= 4)  # a blend of values 4+ apart is seldom exactly one of them
    assert np.mean((out[strict] > lo[strict]) & (out[strict] < hi[strict])) > 0.5


def test_overlaps_are_the_feather_weighted_mean_rounded_to_nearest(tmp_path):
    pixels, placed = grid_tiles(dtype=np.uint16, seed=5)
    source = store_tiles(str(tmp_path / "tiles.zarr"), pixels)
    fuse_montage(placed, source, str(tmp_path / "f.zarr"), pixel_size_nm=1.0, blend_px=24)
    out = read_level(str(tmp_path / "f.zarr")).astype(float)
    layers = stack(placed, pixels, out.shape)
    w = np.outer(feather(SIDE, 24), feather(SIDE, 24))
    weights = stack(placed, {t.tile_id: w for t in placed}, out.shape)
    expected = np.nansum(weights * layers, axis=0) / np.nansum(weights, axis=0)
    assert np.abs(out - expected).max() <= 0.5 + 1e-6


def two_flat_tiles(tmp_path, a=100, b=200):
    pixels = {"left": np.full((SIDE, SIDE), a, np.uint8), "right": np.full((SIDE, SIDE), b, np.uint8)}
    placed = [PlacedTile("left", 0, 0, SIDE, SIDE), PlacedTile("right", 0, STEP, SIDE, SIDE)]
    return store_tiles(str(tmp_path / "tiles.zarr"), pixels), placed


def test_feathering_fades_across_the_overlap(tmp_path):
    source, placed = two_flat_tiles(tmp_path)
    fuse_montage(placed, source, str(tmp_path / "f.zarr"), pixel_size_nm=1.0, blend_px=SIDE - STEP)
    row = read_level(str(tmp_path / "f.zarr"))[SIDE // 2].astype(int)
    overlap = row[STEP:SIDE]
    assert np.all(row[:STEP] == 100) and np.all(row[SIDE:] == 200)
    assert np.all(np.diff(overlap) >= 0) and overlap[-1] - overlap[0] > 80
    assert overlap[0] < 110 and overlap[-1] > 190  # each edge of the overlap is mostly its inner tile


def test_blend_px_zero_is_the_plain_mean(tmp_path):
    source, placed = two_flat_tiles(tmp_path)
    fuse_montage(placed, source, str(tmp_path / "f.zarr"), pixel_size_nm=1.0, blend_px=0)
    out = read_level(str(tmp_path / "f.zarr"))
    assert np.all(out[:, STEP:SIDE] == 150)


def test_a_missing_tile_leaves_a_hole_of_zeros(tmp_path):
    pixels, placed = grid_tiles(skip={(1, 1)})
    source = store_tiles(str(tmp_path / "tiles.zarr"), pixels)
    fuse_montage(placed, source, str(tmp_path / "f.zarr"), pixel_size_nm=4.0)
    out = read_level(str(tmp_path / "f.zarr"))
    layers = stack(placed, pixels, out.shape)
    hole = ~np.isfinite(layers).any(axis=0)
    assert hole.sum() == (SIDE - 2 * (SIDE - STEP)) ** 2  # the centre tile's part no neighbour covers
    assert np.all(out[hole] == 0)
    single = np.isfinite(layers).sum(axis=0) == 1
    np.testing.assert_array_equal(out[single], only_value(layers)[single])


# ----------------------------------------------------------------------------------------------------
# Placement


def test_sub_pixel_positions_round_half_up_and_shift_to_the_origin(tmp_path):
    pixels, _ = grid_tiles(rows=1, cols=3)
    ids = sorted(pixels)
    # Round half to even would put these at 0, 80, 162 (steps 80, 82); half up keeps the 81 px steps.
    xs = [-0.5, 80.5, 161.5]
    placed = [PlacedTile(t, 7.4, x, SIDE, SIDE) for t, x in zip(ids, xs, strict=True)]
    source = store_tiles(str(tmp_path / "tiles.zarr"), pixels)
    result = fuse_montage(placed, source, str(tmp_path / "f.zarr"), pixel_size_nm=1.0)
    assert result.origin == (7, 0)
    assert result.shape == (SIDE, 2 * 81 + SIDE)
    out = read_level(str(tmp_path / "f.zarr"))
    for k, t in enumerate(ids):  # the 15 px at each tile's centre no neighbour reaches
        x = 81 * k
        np.testing.assert_array_equal(out[:, x + 40 : x + 55], pixels[t][:, 40:55])

    # Moving every tile by whole pixels moves the origin and nothing else.
    moved = [PlacedTile(t.tile_id, t.y - 30, t.x + 1000, SIDE, SIDE) for t in placed]
    again = fuse_montage(moved, source, str(tmp_path / "g.zarr"), pixel_size_nm=1.0)
    assert again.origin == (-23, 1000)
    np.testing.assert_array_equal(read_level(str(tmp_path / "g.zarr")), out)


def test_metadata_holds_the_pixel_size_in_nanometers_and_the_shape(tmp_path):
    pixels, placed = grid_tiles(rows=4, cols=5)  # 336 x 416 px: two pyramid levels
    source = store_tiles(str(tmp_path / "tiles.zarr"), pixels)
    url = str(tmp_path / "montage.ome.zarr")
    result = fuse_montage(placed, source, url, pixel_size_nm=3.85, chunk=64, name="montage-7")
    shape = (3 * STEP + SIDE, 4 * STEP + SIDE)
    assert result.shape == shape and result.info.levels[0].shape == shape
    assert result.n_tiles == 20 and result.to_dict()["shape"] == list(shape)
    ms = zarr.open_group(url, mode="r").attrs["ome"]["multiscales"][0]
    assert ms["name"] == "montage-7"
    assert [(a["name"], a.get("unit")) for a in ms["axes"]] == [("y", "nanometer"), ("x", "nanometer")]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [3.85, 3.85]
    assert len(ms["datasets"]) == 2
    level0, level1 = read_level(url, 0), read_level(url, 1)
    assert level0.shape == shape
    assert zarr.open_group(url, mode="r")["0"].chunks == (64, 64)
    np.testing.assert_array_equal(level1, downsample_mean(level0, (2, 2)))


def test_fusion_blocks_are_the_writers_blocks(tmp_path, monkeypatch):
    """The dask array handed to write_ome_zarr is already cut as the writer cuts it: no rechunk."""
    seen = []
    real = fuse_module.write_ome_zarr

    def spy(data, url, **kwargs):
        seen.append(data)
        return real(data, url, **kwargs)

    monkeypatch.setattr(fuse_module, "write_ome_zarr", spy)
    pixels, placed = grid_tiles(rows=4, cols=5)
    source = store_tiles(str(tmp_path / "tiles.zarr"), pixels)
    fuse_montage(placed, source, str(tmp_path / "f.zarr"), pixel_size_nm=1.0, chunk=48)
    (data,) = seen
    level1 = plan_pyramid(data.shape, ("y", "x"), (1.0, 1.0))[1]
    block = tuple(min(48, n) * 2 for n in level1.shape)
    assert data.chunksize == block
    assert data.rechunk(block) is data
    assert len(data.dask) == data.npartitions  # one task per block, nothing else


# ----------------------------------------------------------------------------------------------------
# Schedulers and sources


def test_distributed_client_gives_the_same_image(tmp_path):
    distributed = pytest.importorskip("distributed")
    pixels, placed = grid_tiles(rows=4, cols=4, dtype=np.uint16)
    source = store_tiles(str(tmp_path / "tiles.zarr"), pixels)
    fuse_montage(placed, source, str(tmp_path / "threads.zarr"), pixel_size_nm=1.0, chunk=64)
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        result = fuse_montage(
            placed, source, str(tmp_path / "dist.zarr"), pixel_size_nm=1.0, chunk=64, client=client
        )
    assert len(result.info.levels) == 2
    for level in (0, 1):
        np.testing.assert_array_equal(
            read_level(str(tmp_path / "dist.zarr"), level), read_level(str(tmp_path / "threads.zarr"), level)
        )


def test_sources_pickle_without_their_open_arrays(tmp_path):
    pixels, _ = grid_tiles(rows=1, cols=1)
    source = store_tiles(str(tmp_path / "tiles.zarr"), pixels)
    first = source.read("r000_c000", 3, 9, 5, 50)  # opens and caches the array in this process
    copy = pickle.loads(pickle.dumps(source))
    assert len(pickle.dumps(source)) < 500
    np.testing.assert_array_equal(copy.read("r000_c000", 3, 9, 5, 50), first)
    np.testing.assert_array_equal(first, pixels["r000_c000"][3:9, 5:50])


def write_tiff_variants(folder, pixels):
    """Each tile in a different TIFF layout the readers must handle."""
    variants = [
        {},  # uncompressed, contiguous: memory-mapped
        {"compression": "zlib", "rowsperstrip": 16},
        {"tile": (32, 32), "compression": "zlib"},
        {"byteorder": ">"},  # big-endian, uncompressed
    ]
    for k, (tid, a) in enumerate(pixels.items()):
        tifffile.imwrite(folder / tid, a, **variants[k % len(variants)])


def test_tiff_folder_source_reads_regions_and_fuses_like_zarr(tmp_path):
    pixels, placed = grid_tiles(dtype=np.uint16)
    pixels = {f"{tid}.tif": a for tid, a in pixels.items()}
    placed = [PlacedTile(f"{t.tile_id}.tif", t.y, t.x, t.height, t.width) for t in placed]
    folder = tmp_path / "tiles"
    folder.mkdir()
    write_tiff_variants(folder, pixels)
    source = TiffTileFolder(folder)
    for tid, a in pixels.items():
        assert source.tile_info(tid) == ((SIDE, SIDE), np.dtype(np.uint16))
        region = source.read(tid, 10, 61, 33, 95)
        assert region.dtype == np.dtype(np.uint16)  # native byte order, whatever the file's
        np.testing.assert_array_equal(region, a[10:61, 33:95])
    fuse_montage(placed, pickle.loads(pickle.dumps(source)), str(tmp_path / "t.zarr"), pixel_size_nm=1.0)
    zarr_source = store_tiles(str(tmp_path / "tiles.zarr"), pixels)
    fuse_montage(placed, zarr_source, str(tmp_path / "z.zarr"), pixel_size_nm=1.0)
    np.testing.assert_array_equal(read_level(str(tmp_path / "t.zarr")), read_level(str(tmp_path / "z.zarr")))


# ----------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def montage(tmp_path):
    pixels, placed = grid_tiles(rows=2, cols=2)
    return store_tiles(str(tmp_path / "tiles.zarr"), pixels), placed, str(tmp_path / "out.zarr")


def test_unknown_tile_id_is_named(montage, tmp_path):
    source, placed, out = montage
    with pytest.raises(TileNotFound, match="r009_c009"):
        fuse_montage([*placed, PlacedTile("r009_c009", 0, 0, SIDE, SIDE)], source, out, pixel_size_nm=1.0)
    assert not (tmp_path / "out.zarr").exists()  # checked before anything is written
    folder = tmp_path / "tifs"
    folder.mkdir()
    with pytest.raises(TileNotFound, match="missing.tif"):
        TiffTileFolder(folder).read("missing.tif", 0, 1, 0, 1)
    with pytest.raises(NotADirectoryError, match="nowhere"):
        TiffTileFolder(tmp_path / "nowhere")


def test_region_outside_the_tile_is_refused(montage, tmp_path):
    source, placed, out = montage
    with pytest.raises(ValueError, match=r"rows 0:97.*outside the 96x96 px tile"):
        source.read("r000_c000", 0, 97, 0, 10)
    with pytest.raises(ValueError, match="outside"):
        source.read("r000_c000", 5, 5, 0, 10)  # empty
    too_big = [PlacedTile(placed[0].tile_id, 0, 0, SIDE + 8, SIDE), *placed[1:]]
    with pytest.raises(ValueError, match=r"'r000_c000' is placed as 104x96 px .* 96x96 px tile"):
        fuse_montage(too_big, source, out, pixel_size_nm=1.0)
    folder = tmp_path / "tifs"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", np.zeros((20, 30), np.uint8), compression="zlib")
    with pytest.raises(ValueError, match="outside the 20x30 px tile"):
        TiffTileFolder(folder).read("a.tif", 0, 20, 25, 31)


def test_mixed_or_unsupported_dtypes_are_refused(tmp_path):
    pixels, placed = grid_tiles(rows=1, cols=2)
    pixels["r000_c001"] = pixels["r000_c001"].astype(np.uint16)
    source = store_tiles(str(tmp_path / "mixed.zarr"), pixels)
    with pytest.raises(ValueError, match=r"mixed dtypes \(uint8: 'r000_c000'; uint16: 'r000_c001'\)"):
        fuse_montage(placed, source, str(tmp_path / "o.zarr"), pixel_size_nm=1.0)
    pixels, placed = grid_tiles(rows=1, cols=2, dtype=np.float64)
    source = store_tiles(str(tmp_path / "f64.zarr"), pixels)
    with pytest.raises(ValueError, match="float64 cannot be fused"):
        fuse_montage(placed, source, str(tmp_path / "o.zarr"), pixel_size_nm=1.0)


def test_a_3d_tile_is_refused(tmp_path):
    zarr.create_array(str(tmp_path / "t.zarr/stack"), shape=(2, 8, 8), dtype="u1")
    with pytest.raises(ValueError, match=r"'stack'.*shape \(2, 8, 8\).*2-D"):
        ZarrTileGroup(str(tmp_path / "t.zarr")).tile_info("stack")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tiles": []}, "no tiles to fuse"),
        ({"duplicate": True}, "placed twice"),
        ({"nan": True}, "not a finite number"),
        ({"pixel_size_nm": 0}, "pixel_size_nm must be a positive"),
        ({"pixel_size_nm": float("nan")}, "pixel_size_nm must be a positive"),
        ({"blend_px": -1}, "blend_px must be"),
        ({"chunk": 0}, "chunk must be"),
    ],
)
def test_bad_arguments_are_named(montage, change, message):
    source, placed, out = montage
    kwargs = {"pixel_size_nm": 1.0}
    if "tiles" in change:
        placed = change["tiles"]
    elif "duplicate" in change:
        placed = [*placed, placed[0]]
    elif "nan" in change:
        placed = [PlacedTile(placed[0].tile_id, float("nan"), 0, SIDE, SIDE), *placed[1:]]
    else:
        kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        fuse_montage(placed, source, out, **kwargs)


def test_corrupt_and_truncated_tiffs_are_named(tmp_path):
    folder = tmp_path / "tifs"
    folder.mkdir()
    (folder / "junk.tif").write_bytes(b"this is not a TIFF file at all" * 10)
    tifffile.imwrite(folder / "cut.tif", np.ones((64, 64), np.uint16))
    data = (folder / "cut.tif").read_bytes()
    (folder / "cut.tif").write_bytes(data[: len(data) // 2])
    source = TiffTileFolder(folder)
    with pytest.raises(ValueError, match="junk.tif is not a readable TIFF"):
        source.tile_info("junk.tif")
    with pytest.raises(ValueError, match="cut.tif is truncated"):
        source.read("cut.tif", 0, 64, 0, 64)


def test_tiles_and_montage_on_s3(s3_bucket):
    bucket, opts = s3_bucket
    pixels, placed = grid_tiles(rows=2, cols=2)
    for tid, a in pixels.items():
        arr = zarr.create_array(
            f"{bucket}/processed_tiles.zarr/{tid}", shape=a.shape, dtype=a.dtype, storage_options=opts
        )
        arr[...] = a
    source = ZarrTileGroup(f"{bucket}/processed_tiles.zarr", storage_options=opts)
    url = f"{bucket}/montage.ome.zarr"
    result = fuse_montage(
        placed, pickle.loads(pickle.dumps(source)), url, pixel_size_nm=4.0, storage_options=opts
    )
    out = zarr.open_group(url, mode="r", storage_options=opts)["0"][...]
    assert out.shape == result.shape
    layers = stack(placed, pixels, out.shape)
    single = np.isfinite(layers).sum(axis=0) == 1
    np.testing.assert_array_equal(out[single], only_value(layers)[single])
    with pytest.raises(TileNotFound, match="r005_c005"):
        source.tile_info("r005_c005")
