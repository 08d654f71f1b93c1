"""Where the live chain's speed comes from must not change what it computes or stores: processed tiles
written straight into one zarr shard file read back as zarr wrote them, a released tile's strips read back
from storage match as the held ones did, and the per-thread CLAHE operator gives OpenCV's result."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest
import zarr

from em_platform.tem.tile_processing import clahe
from em_platform.tem.tile_tasks import (
    EdgeJob,
    StoredTile,
    TileOutcome,
    _strips,
    match_edge,
    read_region,
    store_chunks,
    store_shard,
    store_tile,
)
from tests.stitch.test_matching import OVERLAP, SIZE, cut_pair
from tests.tem.test_tile_processing import em_like_specimen


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((2000, 3000), np.uint8), ((1031, 777), np.uint8), ((300, 2100), np.uint16), ((7, 5), np.uint16)],
)
def test_stored_tile_reads_back_as_zarr_writes_it(tmp_path, shape, dtype):
    rng = np.random.default_rng(1)
    image = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    image[: shape[0] // 3] = 0  # whole chunks of the fill value: zarr itself would leave those out
    zarr.open_group(tmp_path / "p.zarr", mode="w")
    url = tmp_path / "p.zarr" / "r0_c0"
    store_tile(image, str(url))
    ours = zarr.open_array(url, mode="r")
    assert ours.shape == shape and ours.dtype == dtype and ours.chunks == store_chunks(shape)
    assert ours.shards == store_shard(shape)
    np.testing.assert_array_equal(ours[...], image)
    # the same array through zarr's own writer: the same metadata; zarr orders the inner chunks in Z order
    # and leaves all-fill ones out, so the shard's bytes differ, but not what they decode to
    theirs = zarr.create_array(
        tmp_path / "z.zarr",
        shape=shape,
        chunks=store_chunks(shape),
        shards=store_shard(shape),
        dtype=dtype,
        compressors=None,
    )
    theirs[...] = image
    theirs.attrs["complete"] = True  # ours marks a write that reached its end
    assert ours.metadata.to_dict() == theirs.metadata.to_dict()
    assert sorted(p.relative_to(url).as_posix() for p in url.rglob("*") if p.is_file()) == [
        "c/0/0",
        "zarr.json",
    ]
    np.testing.assert_array_equal(read_region(str(url), None, (1, 6), (2, 5)), image[1:6, 2:5])
    for corner in ((0, 0), (shape[0] - 1, shape[1] - 1)):  # single pixels: partial reads through the index
        rows, cols = ((c, c + 1) for c in corner)
        assert read_region(str(url), None, rows, cols)[0, 0] == image[corner]


def test_a_shard_whose_index_was_damaged_is_refused_on_read(tmp_path):
    image = np.random.default_rng(3).integers(0, 256, (2000, 2000), dtype=np.uint8)
    url = tmp_path / "p.zarr" / "r0_c0"
    store_tile(image, str(url))
    shard = url / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01  # a bit of the index's last entry: its checksum no longer agrees
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        zarr.open_array(url, mode="r")[...]


def test_a_released_tile_is_matched_from_its_stored_pixels(tmp_path):
    specimen = em_like_specimen((2 * SIZE + 128, 2 * SIZE + 128), seed=21)
    zarr.open_group(tmp_path / "p.zarr", mode="w")
    for position in ("left", "top"):
        tile, neighbour = cut_pair(specimen, position, -6.4, 9.7, seed=5)
        job = EdgeJob("t", 1, 1, position, OVERLAP, None)
        held = [TileOutcome({}, 0.5, image.shape, _strips(image, OVERLAP)) for image in (tile, neighbour)]
        stored = []
        for name, image in (("tile", tile), ("neighbour", neighbour)):
            url = str(tmp_path / "p.zarr" / f"{position}_{name}")
            store_tile(image, url)
            stored.append(StoredTile(url, None, image.shape))
        expected = match_edge(job, *held)
        assert expected is not None and expected["dX"] == pytest.approx(-6.4, abs=0.3)
        assert match_edge(job, held[0], stored[1]) == expected
        assert match_edge(job, *stored) == expected


def test_the_kept_clahe_operator_gives_opencvs_result_in_every_thread():
    rng = np.random.default_rng(2)
    images = [
        cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (0, 0), 2)
        for shape in ((500, 777), (512, 512), (500, 777))
    ] + [rng.integers(0, 4096, (300, 200), dtype=np.uint16)]
    settings = [(2.0, 16), (3.0, (8, 4)), (2.0, 16)]
    failures: list[str] = []

    def work() -> None:
        for _ in range(2):
            for image in images:
                for clip, grid in settings:
                    size = (grid, grid) if isinstance(grid, int) else grid
                    expected = cv2.createCLAHE(clip, size).apply(image)
                    if not np.array_equal(clahe(image, clip, grid), expected):
                        failures.append(f"{image.shape} {image.dtype} clip {clip} grid {grid}")

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_a_stored_tile_is_zarrs_own_array_and_a_cut_off_one_is_not_complete(tmp_path, monkeypatch):
    """The local store writes the shard around the page cache and zarr's own zarr.json last: a tile
    stored again replaces the old one, and a write cut off before the end leaves no complete array."""
    from em_platform.imaging import chunk_io
    from em_platform.tem import tile_tasks

    rng = np.random.default_rng(4)
    first, second = (rng.integers(0, 256, (1500, 2100), dtype=np.uint8) for _ in range(2))
    zarr.open_group(tmp_path / "p.zarr", mode="w")
    url = str(tmp_path / "p.zarr" / "r0_c0")
    store_tile(first, url)
    store_tile(second, url)  # a re-run stores the tile again
    assert tile_tasks.stored_completely(url)
    np.testing.assert_array_equal(zarr.open_array(url, mode="r")[...], second)
    theirs = zarr.create_array(
        tmp_path / "z.zarr",
        shape=second.shape,
        chunks=store_chunks(second.shape),
        shards=store_shard(second.shape),
        dtype="u1",
        compressors=None,
    )
    theirs.attrs["complete"] = True
    assert (tmp_path / "p.zarr" / "r0_c0" / "zarr.json").read_bytes() == (
        tmp_path / "z.zarr" / "zarr.json"
    ).read_bytes()
    assert sorted(p.name for p in (tmp_path / "p.zarr" / "r0_c0").iterdir()) == ["c", "zarr.json"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(chunk_io, "write_shard_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        store_tile(first, url)
    assert not tile_tasks.stored_completely(url)


def test_a_tile_on_an_object_store_goes_through_zarr(tmp_path, monkeypatch):
    from em_platform.tem import tile_tasks

    monkeypatch.setattr(tile_tasks, "_store_tile_locally", lambda *a: pytest.fail("not a local folder"))
    image = np.random.default_rng(5).integers(0, 256, (300, 200), dtype=np.uint8)
    url = f"memory://{tmp_path.name}/p.zarr/r0_c0"
    store_tile(image, url)
    assert tile_tasks.stored_completely(url)
    np.testing.assert_array_equal(read_region(url, None, (0, 300), (0, 200)), image)
