"""Tests for the shared multiscale OME-Zarr writer (em_platform.imaging.ome_zarr) and its pyramid rule."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter

import dask.array as da
import numpy as np
import pytest
import zarr

from em_platform.imaging import ome_zarr as omz
from em_platform.imaging.ome_zarr import MultiscaleInfo, write_ome_zarr
from em_platform.imaging.pyramid import downsample_mean, plan_pyramid

NM3 = ("nanometer",) * 3
NM2 = ("nanometer",) * 2


def reference_mean(a: np.ndarray, factors) -> np.ndarray:
    """Mean over 2-windows computed independently of the writer: edge-pad odd sizes, reshape, mean.

    Edge padding gives every voxel of a partial edge window equal weight, i.e. the mean of the voxels
    that exist. Integers are summed exactly (Python ints) and rounded half up; floats in float64.
    """
    pad = [(0, n % 2 if f == 2 else 0) for n, f in zip(a.shape, factors, strict=True)]
    integer = a.dtype.kind in "iu"
    p = np.pad(a.astype(object if integer else np.float64), pad, mode="edge")
    shape = []
    for n, f in zip(p.shape, factors, strict=True):
        shape += [n // f, f]
    window = int(np.prod(factors))
    s = p.reshape(shape).sum(axis=tuple(range(1, 2 * a.ndim, 2)))
    m = (s + window // 2) // window if integer else s / window
    return np.asarray(m).astype(a.dtype)


def random_image(shape, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def levels_of(url: str) -> tuple[zarr.Group, list[np.ndarray], list[dict]]:
    group = zarr.open_group(url, mode="r")
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    return group, [group[d["path"]][...] for d in datasets], datasets


# ----------------------------------------------------------------------------------------------------
# The pyramid rule


def test_reference_matches_skimage_on_even_shapes():
    """The test's own reference agrees with scikit-image where skimage's zero padding plays no part."""
    downscale_local_mean = pytest.importorskip("skimage.transform").downscale_local_mean

    a = random_image((6, 10, 8), np.uint16)
    ours = reference_mean(a, (2, 2, 2))
    sk = np.floor(downscale_local_mean(a.astype(np.float64), (2, 2, 2)) + 0.5).astype(np.uint16)
    np.testing.assert_array_equal(ours, sk)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.uint32, np.int64, np.float32])
@pytest.mark.parametrize(
    ("shape", "factors"), [((7, 9, 11), (2, 2, 2)), ((5, 9, 10), (1, 2, 2)), ((9, 13), (2, 2))]
)
def test_downsample_mean_matches_reference(dtype, shape, factors):
    a = random_image(shape, dtype, seed=3)
    got = downsample_mean(a, factors)
    assert got.dtype == a.dtype
    assert got.shape == tuple(-(-n // f) for n, f in zip(shape, factors, strict=True))
    if np.dtype(dtype).kind == "f":
        np.testing.assert_allclose(got, reference_mean(a, factors), rtol=1e-6)
    else:
        np.testing.assert_array_equal(got, reference_mean(a, factors))


def test_downsample_rounds_half_up_and_averages_only_existing_edge_voxels():
    a = np.array([[2, 3, 9], [2, 3, 9], [4, 4, 1]], dtype=np.uint8)
    # windows: [2,3,2,3] -> 2.5 -> 3 ; [9,9] -> 9 ; [4,4] -> 4 ; [1] -> 1 (no dark edge from zero padding)
    np.testing.assert_array_equal(downsample_mean(a, (2, 2)), [[3, 9], [4, 1]])


def test_downsample_rejects_unsupported_dtype():
    with pytest.raises(ValueError, match="bool"):
        downsample_mean(np.zeros((4, 4), bool), (2, 2))


def _z_factors(scale, shape=(512, 8192, 8192), min_size=256):
    return [lv.factors[0] for lv in plan_pyramid(shape, "zyx", scale, min_size)[1:]]


def test_isotropic_volume_halves_z_every_level():
    assert _z_factors((4.0, 4.0, 4.0)) == [2, 2, 2, 2, 2]


def test_fib_sem_volume_keeps_z_first_then_stays_isotropic():
    plan = plan_pyramid((512, 8192, 8192), "zyx", (8.0, 4.0, 4.0), 256)
    assert [lv.factors[0] for lv in plan[1:]] == [1, 2, 2, 2, 2]
    assert [lv.scale for lv in plan[:3]] == [(8.0, 4.0, 4.0), (8.0, 8.0, 8.0), (16.0, 16.0, 16.0)]


def test_z_is_halved_only_when_that_is_nearer_to_isotropic():
    # 6 nm z against 8 nm y/x at level 1: keeping 6 (off by 2) beats halving to 12 (off by 4)
    assert _z_factors((6.0, 4.0, 4.0)) == [1, 2, 2, 2, 2]
    # 5 nm z: 10 is nearer to 8 than 5 is
    assert _z_factors((5.0, 4.0, 4.0)) == [2, 2, 2, 2, 2]
    # z finer than y/x is halved until it catches up
    assert _z_factors((1.0, 4.0, 4.0)) == [2, 2, 2, 2, 2]


def test_serial_section_stack_keeps_z_until_xy_catches_up():
    # z 40 nm, y/x 4 nm: y/x go 8, 16, 32, 64, 128; z is halved once it is < 2/3 of the new y/x size.
    assert _z_factors((40.0, 4.0, 4.0)) == [1, 1, 1, 2, 2]


def test_pyramid_stops_at_min_size_and_handles_odd_sizes():
    plan = plan_pyramid((3, 1025, 700), "zyx", (4.0, 4.0, 4.0), min_size=256)
    shapes = [lv.shape for lv in plan]
    assert shapes == [(3, 1025, 700), (2, 513, 350), (1, 257, 175), (1, 129, 88)]
    assert max(shapes[-2][1:]) > 256 >= max(shapes[-1][1:])
    assert plan[-1].factors[0] == 1  # a size-1 axis is not downsampled further


def test_extra_axes_are_never_downsampled_in_the_plan():
    plan = plan_pyramid((2, 3, 64, 600, 600), "tczyx", (1.0, 1.0, 4.0, 4.0, 4.0), 100)
    assert all(lv.shape[:2] == (2, 3) and lv.factors[:2] == (1, 1) for lv in plan)


# ----------------------------------------------------------------------------------------------------
# The writer


CASES = [
    ("yx", (301, 517), (128, 128), (4.0, 4.0), 64),
    ("zyx", (37, 133, 261), (16, 32, 64), (4.0, 4.0, 4.0), 32),
    ("zyx", (21, 150, 99), (8, 32, 32), (9.0, 3.0, 3.0), 32),
]


@pytest.mark.parametrize("in_order", [False, True], ids=["tree", "in_order"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize(("axes", "shape", "chunks", "scale", "min_size"), CASES)
def test_levels_are_exact_and_mean_downsampled(
    tmp_path, dtype, axes, shape, chunks, scale, min_size, in_order
):
    image = random_image(shape, dtype)
    # input chunks that do not line up with the writer's blocks
    data = da.from_array(image, chunks=tuple(max(1, c * 3 // 4) for c in chunks))
    url = str(tmp_path / "img.zarr")
    info = write_ome_zarr(
        data,
        url,
        axes=axes,
        scale=scale,
        units=("nanometer",) * len(axes),
        chunks=chunks,
        min_size=min_size,
        in_order=in_order,
    )
    group, levels, datasets = levels_of(url)
    assert len(levels) >= 3
    assert levels[0].dtype == image.dtype
    np.testing.assert_array_equal(levels[0], image)  # bit-exact
    for i in range(1, len(levels)):
        factors = tuple(
            round(a / b)
            for a, b in zip(
                datasets[i]["coordinateTransformations"][0]["scale"],
                datasets[i - 1]["coordinateTransformations"][0]["scale"],
                strict=True,
            )
        )
        expected = reference_mean(levels[i - 1], factors)
        assert levels[i].dtype == image.dtype
        if np.dtype(dtype).kind == "f":
            np.testing.assert_allclose(levels[i], expected, rtol=1e-6)
        else:
            np.testing.assert_array_equal(levels[i], expected)
    assert max(levels[-1].shape[-2:]) <= min_size < max(levels[-2].shape[-2:])
    # every level is chunked as asked (capped by its shape) and compressed with Blosc/Zstd
    for d, lv in zip(datasets, info.levels, strict=True):
        arr = group[d["path"]]
        assert arr.chunks == tuple(min(c, n) for c, n in zip(chunks, lv.shape, strict=True))
        assert arr.metadata.zarr_format == 3
        assert arr.compressors[0].to_dict()["name"] == "blosc"
        assert arr.compressors[0].to_dict()["configuration"]["cname"] == "zstd"


def test_scales_translations_and_info(tmp_path):
    image = random_image((40, 300, 300), np.uint16)
    url = str(tmp_path / "vol.ome.zarr")
    info = write_ome_zarr(
        da.from_array(image, chunks=(20, 150, 150)),
        url,
        axes=("z", "y", "x"),
        scale=(8.0, 4.0, 4.0),
        units=NM3,
        chunks=(16, 64, 64),
        min_size=64,
    )
    assert isinstance(info, MultiscaleInfo)
    ms = zarr.open_group(url, mode="r").attrs["ome"]["multiscales"][0]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[8, 4, 4], [8, 8, 8], [16, 16, 16], [32, 32, 32]]
    assert ms["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": [8.0, 4.0, 4.0]}]
    assert ms["datasets"][2]["coordinateTransformations"][1] == {
        "type": "translation",
        "translation": [4.0, 6.0, 6.0],
    }
    assert ms["axes"] == [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    assert ms["name"] == "vol"
    assert zarr.open_group(url, mode="r").attrs["ome"]["version"] == "0.5"
    assert [lv.shape for lv in info.levels] == [(40, 300, 300), (40, 150, 150), (20, 75, 75), (10, 38, 38)]
    assert [lv.scale for lv in info.levels] == [tuple(map(float, s)) for s in scales]
    assert [lv.path for lv in info.levels] == [d["path"] for d in ms["datasets"]]
    assert info.chunks == (16, 64, 64) and info.dtype == "uint16" and "zstd" in info.compressor
    json.dumps(info.to_dict())  # catalog-ready
    hash(info)  # frozen


def test_default_chunks():
    assert omz.default_chunks("yx", (5000, 6000), (4.0, 4.0)) == (1024, 1024)
    assert omz.default_chunks("zyx", (500, 5000, 6000), (4.0, 4.0, 4.0)) == (64, 128, 128)
    assert omz.default_chunks("zyx", (500, 5000, 6000), (8.0, 4.0, 4.0)) == (64, 128, 128)
    assert omz.default_chunks("zyx", (500, 5000, 6000), (40.0, 4.0, 4.0)) == (16, 256, 256)
    assert omz.default_chunks("czyx", (2, 10, 100, 6000), (1.0, 4.0, 4.0, 4.0)) == (1, 10, 100, 128)


def test_readable_by_ome_zarr_reader_and_plain_zarr(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    image = random_image((3, 2, 19, 200, 180), np.uint16)
    url = str(tmp_path / "tczyx.zarr")
    write_ome_zarr(
        da.from_array(image),
        url,
        axes="tczyx",
        scale=(2.5, 1.0, 50.0, 5.0, 5.0),
        units=("second", None, "angstrom", "angstrom", "angstrom"),
        chunks=(1, 1, 8, 64, 64),
        min_size=50,
    )
    nodes = list(Reader(parse_url(url))())
    assert nodes and nodes[0].load(Multiscales) is not None
    read = [np.asarray(level) for level in nodes[0].data]
    group, levels, _ = levels_of(url)
    assert len(read) == len(levels) >= 3
    for r, lv in zip(read, levels, strict=True):
        np.testing.assert_array_equal(r, lv)
        assert lv.shape[:2] == (3, 2)  # t and c are never downsampled
    np.testing.assert_array_equal(read[0], image)
    axes = nodes[0].metadata["axes"]
    assert [a["name"] for a in axes] == list("tczyx")
    assert axes[0]["type"] == "time" and axes[0]["unit"] == "second"
    assert axes[1] == {"name": "c", "type": "channel"}
    assert axes[2]["unit"] == "angstrom"
    # channels are downsampled independently of each other
    np.testing.assert_array_equal(levels[1][1, 1], reference_mean(image[1, 1], (1, 2, 2)))


def test_memory_url_and_file_url(tmp_path):
    import fsspec

    image = random_image((130, 250), np.uint8)
    url = f"memory://em-test-{uuid.uuid4().hex}/img.zarr"
    try:
        info = write_ome_zarr(
            da.from_array(image, chunks=64),
            url,
            axes="yx",
            scale=(1, 1),
            units=NM2,
            chunks=(64, 64),
            min_size=64,
            storage_options={},
        )
        group = zarr.open_group(url, mode="r")
        np.testing.assert_array_equal(group["0"][...], image)
        np.testing.assert_array_equal(group["1"][...], reference_mean(image, (2, 2)))
        assert len(info.levels) == 3 and "multiscales" in group.attrs["ome"]
    finally:
        fsspec.filesystem("memory").rm(url.split("://", 1)[1].split("/", 1)[0], recursive=True)
    file_url = "file://" + str(tmp_path / "f.zarr")
    write_ome_zarr(da.from_array(image), file_url, axes="yx", scale=(1, 1), units=NM2, min_size=64)
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "f.zarr"), mode="r")["0"][...], image)


def test_rewrite_replaces_previous_image(tmp_path):
    url = str(tmp_path / "again.zarr")
    write_ome_zarr(da.zeros((300, 300), dtype=np.uint8), url, axes="yx", scale=(1, 1), units=NM2, min_size=64)
    image = random_image((100, 90), np.uint16)
    info = write_ome_zarr(da.from_array(image), url, axes="yx", scale=(1, 1), units=NM2, min_size=64)
    group, levels, _ = levels_of(url)
    assert len(info.levels) == 2 and sorted(group.array_keys()) == ["0", "1"]
    np.testing.assert_array_equal(levels[0], image)


class _CountingStore(zarr.storage.WrapperStore):
    """Counts chunk reads and writes per key (tasks open stores through open_store, patched below)."""

    sets: Counter = Counter()
    gets: Counter = Counter()

    async def set(self, key, value):
        type(self).sets[key] += 1
        return await super().set(key, value)

    async def get(self, key, prototype, byte_range=None):
        type(self).gets[key] += 1
        return await super().get(key, prototype, byte_range)


@pytest.mark.parametrize("in_order", [False, True], ids=["tree", "in_order"])
def test_every_chunk_is_written_once_whole_and_never_read_back(tmp_path, monkeypatch, in_order):
    real_open_store = omz.open_store
    monkeypatch.setattr(omz, "open_store", lambda *a, **k: _CountingStore(real_open_store(*a, **k)))
    _CountingStore.sets.clear()
    _CountingStore.gets.clear()
    image = random_image((20, 100, 140), np.uint16) | 1  # no all-zero chunk
    url = str(tmp_path / "count.zarr")
    info = write_ome_zarr(
        da.from_array(image, chunks=(7, 33, 50)),
        url,
        axes="zyx",
        scale=(1, 1, 1),
        units=NM3,
        chunks=(8, 16, 16),
        min_size=16,
        in_order=in_order,
    )
    assert [lv.shape for lv in info.levels][-1] == (2, 7, 9)
    for lv in info.levels:
        grid = [-(-n // c) for n, c in zip(lv.shape, (min(8, lv.shape[0]), 16, 16), strict=True)]
        keys = [k for k in _CountingStore.sets if k.startswith(f"{lv.path}/c/")]
        assert len(keys) == int(np.prod(grid)), lv
        assert all(_CountingStore.sets[k] == 1 for k in keys)
    # partial chunk writes would read chunks back before writing them; nothing is read back at all
    assert not [k for k in _CountingStore.gets if "/c/" in k]
    np.testing.assert_array_equal(zarr.open_group(url, mode="r")["0"][...], image)


@pytest.mark.parametrize(
    ("shape", "axes", "scale", "chunks", "input_chunks"),
    [
        ((67, 300, 517), "zyx", (5, 5, 5), None, (16, 300, 517)),  # odd z, isotropic: z halved each level
        ((130, 600, 520), "zyx", (40, 4, 4), None, (7, 600, 520)),  # serial sections: z kept, 16-deep chunks
        ((5, 700, 300), "zyx", (5, 5, 5), (3, 64, 64), (2, 100, 300)),  # odd chunk depth, blocks not whole
        ((3, 40, 600, 520), "czyx", (1, 8, 8, 8), None, (1, 40, 600, 520)),  # the first axis is not halved
        ((1000, 1200), "yx", (1, 1), None, (100, 1200)),  # a 2-D image arriving row by row
    ],
)
def test_in_order_writes_the_same_image_as_the_tree(tmp_path, shape, axes, scale, chunks, input_chunks):
    image = random_image(shape, np.uint16)
    data = da.from_array(image, chunks=input_chunks)
    kw = {"axes": axes, "scale": scale, "units": (None,) * len(axes), "chunks": chunks, "name": "same"}
    tree = write_ome_zarr(data, str(tmp_path / "tree.zarr"), **kw)
    ordered = write_ome_zarr(data, str(tmp_path / "ordered.zarr"), in_order=True, **kw)
    assert tree.levels == ordered.levels and len(tree.levels) >= 3
    a, b = zarr.open_group(str(tmp_path / "tree.zarr")), zarr.open_group(str(tmp_path / "ordered.zarr"))
    assert a.attrs.asdict() == b.attrs.asdict()
    for lv in tree.levels:
        assert a[lv.path].chunks == b[lv.path].chunks
        np.testing.assert_array_equal(a[lv.path][...], b[lv.path][...])


def test_in_order_writes_the_first_planes_while_the_last_are_still_arriving(tmp_path):
    """A volume whose last slab is not there until its first planes are in the store (a file still
    downloading): written in order, it completes; the first level-0 chunks were written before it was read."""
    from dask import delayed

    image = random_image((256, 256, 256), np.uint8)
    url = tmp_path / "arriving.zarr"
    first_written = threading.Event()

    def slab(z0: int) -> np.ndarray:
        if z0 == 240:  # the last 16 planes "arrive" only once the first 64 are converted
            deadline = time.monotonic() + 30
            while not (url / "0" / "c" / "0" / "0" / "0").exists():
                assert time.monotonic() < deadline, "nothing was written before the last planes arrived"
                time.sleep(0.01)  # polling the store for the first chunk
            first_written.set()
        return image[z0 : z0 + 16]

    data = da.concatenate(
        [da.from_delayed(delayed(slab)(z0), (16, 256, 256), np.uint8) for z0 in range(0, 256, 16)]
    )
    write_ome_zarr(data, str(url), axes="zyx", scale=(5, 5, 5), units=NM3, min_size=64, in_order=True)
    assert first_written.is_set()
    np.testing.assert_array_equal(zarr.open_group(str(url), mode="r")["0"][...], image)


def test_in_order_failure_is_raised_and_stops_the_workers(tmp_path):
    from dask import delayed

    def slab(z0: int) -> np.ndarray:
        if z0 == 64:
            raise OSError("the download failed before byte 123")
        return np.ones((32, 128, 128), np.uint8)

    data = da.concatenate(
        [da.from_delayed(delayed(slab)(z0), (32, 128, 128), np.uint8) for z0 in range(0, 256, 32)]
    )
    with pytest.raises(OSError, match="before byte 123"):
        write_ome_zarr(data, str(tmp_path / "x.zarr"), axes="zyx", scale=(1, 1, 1), units=NM3, in_order=True)
    assert not [t for t in threading.enumerate() if t.name.startswith("ome-zarr-in-order")]


def test_distributed_client_runs_the_tasks(tmp_path):
    distributed = pytest.importorskip("distributed")
    image = random_image((24, 150, 130), np.uint16)
    url = str(tmp_path / "dist.zarr")
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        distributed.Client(cluster) as client,
        distributed.get_task_stream(client) as stream,
    ):
        info = write_ome_zarr(
            da.from_array(image, chunks=(12, 75, 65)),
            url,
            axes="zyx",
            scale=(4, 4, 4),
            units=NM3,
            chunks=(8, 32, 32),
            min_size=32,
            client=client,
        )
    names = {t["key"][0] if isinstance(t["key"], tuple) else t["key"] for t in stream.data}
    assert sum("_pyramid_task" in n for n in names) >= 3  # the pyramid's tasks ran on the cluster
    group, levels, _ = levels_of(url)
    assert len(levels) == len(info.levels) == 4
    np.testing.assert_array_equal(levels[0], image)
    np.testing.assert_array_equal(levels[1], reference_mean(image, (2, 2, 2)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"axes": "yx"}, "axes"),
        ({"axes": "zyq"}, "'q'"),
        ({"axes": "xyz"}, "order"),
        ({"axes": "tcz"}, "y and x"),
        ({"scale": (1.0, 1.0)}, "scale"),
        ({"scale": (1.0, -1.0, 1.0)}, "scale for axis 'y'"),
        ({"units": ("nanometer", "nanometer")}, "units"),
        ({"units": ("nm", "nanometer", "nanometer")}, "'nm'"),
        ({"axes": "cyx", "units": ("nanometer", "nanometer", "nanometer")}, "channel"),
        ({"chunks": (8, 8)}, "chunks"),
        ({"min_size": 0}, "min_size"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(tmp_path, kwargs, message):
    args = {"axes": "zyx", "scale": (1.0, 1.0, 1.0), "units": NM3} | kwargs
    with pytest.raises(ValueError, match=message):
        write_ome_zarr(da.zeros((4, 8, 8), dtype=np.uint8), str(tmp_path / "bad.zarr"), **args)
    assert not (tmp_path / "bad.zarr").exists()


def test_bad_dtype_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        write_ome_zarr(
            da.zeros((8, 8), dtype=bool), str(tmp_path / "b.zarr"), axes="yx", scale=(1, 1), units=NM2
        )


# ----------------------------------------------------------------------------------------------------
# Memory


BOUNDED_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import dask.array as da
    import numpy as np
    from em_platform.imaging.ome_zarr import write_ome_zarr

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":"))

    def ramp(a, b, k):
        return (np.arange(a, b) * k % 256).astype(np.uint8)

    def pattern(block_info=None):  # (7 z + 3 y + x) mod 256, made in uint8 so the source costs ~nothing
        (z0, z1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return (ramp(y0, y1, 3)[:, None] + ramp(x0, x1, 1)[None, :])[None] + ramp(z0, z1, 7)[:, None, None]

    def volume(n):  # generated lazily, block by block: never whole in memory
        return da.map_blocks(pattern, dtype=np.uint8, chunks=((64,) * (n // 64), (256,) * (n // 256), (256,) * (n // 256)))

    out = sys.argv[1]
    # z twice y/x: level 1 keeps z, so it alone is a quarter of the volume (256 MiB)
    kw = dict(axes="zyx", scale=(8, 4, 4), units=("nanometer",) * 3)
    write_ome_zarr(volume(256), out + "/warm.zarr", **kw)  # load every module and thread pool first
    before = status("VmRSS")
    vol = volume(1024)
    write_ome_zarr(vol, out + "/big.zarr", **kw)
    print(json.dumps({"nbytes": int(vol.nbytes), "before": before, "peak": status("VmHWM")}))
    """
)


@pytest.mark.timeout(120)
def test_peak_memory_does_not_grow_with_volume_size(tmp_path):
    """A 1 GiB volume is written with a small, fixed amount of extra memory (peak RSS of a subprocess).

    4 dask threads (~35 MiB each with the default chunks) so the bound does not depend on the machine;
    measured here: +140-160 MiB for 0.5, 1 and 4 GiB alike. Holding the volume, or only its level 1,
    would exceed the bound.
    """
    proc = subprocess.run(
        [sys.executable, "-c", BOUNDED_MEMORY_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "DASK_NUM_WORKERS": "4"},
    )
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        assert r["nbytes"] == 2**30
        growth = r["peak"] - r["before"]
        assert growth < 320 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB while writing a 1 GiB volume"
        levels = zarr.open_group(str(tmp_path / "big.zarr"), mode="r")
        assert levels["0"].shape == (1024, 1024, 1024) and levels["1"].shape == (1024, 512, 512)
        np.testing.assert_array_equal(levels["0"][1000, 5, :6], (1000 * 7 + 5 * 3 + np.arange(6)) % 256)
        np.testing.assert_array_equal(
            levels["1"][1000:1001, 5:6, :3], reference_mean(levels["0"][1000:1001, 10:12, :6], (1, 2, 2))
        )
    finally:
        shutil.rmtree(tmp_path / "big.zarr", ignore_errors=True)
