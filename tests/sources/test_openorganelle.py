"""OpenOrganelle against a real S3 API on loopback (moto, behind a proxy that counts every request on the wire),
in a bucket named like janelia-cosem-datasets and read anonymously, holding both real COSEM layouts: the Zarr v2
container of jrc_mus-nacc-2 (recon-2/em/fibsem-int16, OME-NGFF 0.4 multiscales, written by zarr-python) and the
older N5 container of jrc_hela-2 (em/fibsem-uint16, COSEM transform/pixelResolution attributes, written by
tensorstore). Whole levels and crops equal the source voxels at one GET per chunk, a resumed run reads only the
missing chunks, and a missing level, a refused key, a crop outside the level or a corrupt chunk fail naming
the bucket and key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import numcodecs
import numpy as np
import pytest
import s3fs
import zarr

from em_platform.formats import FormatError
from em_platform.samples import em_texture
from em_platform.sources import openorganelle as oo
from em_platform.sources.manifest import DownloadManifest
from em_platform.sources.retry import PermanentSourceError
from tests.support.s3_proxy import S3Proxy

LOG = logging.getLogger("tests.sources.openorganelle")
BUCKET = "janelia-cosem-datasets"
CHUNKS = (8, 16, 16)
METADATA = {".zarray", ".zattrs", ".zgroup", "attributes.json"}


@dataclasses.dataclass(frozen=True)
class Layout:
    key: str  # the partition in oo.DATASETS
    container: str
    group: str
    dtype: type
    voxel: dict


LAYOUTS = {
    "zarr": Layout(
        "jrc_mus-nacc-2/fibsem-int16/s3",
        "jrc_mus-nacc-2/jrc_mus-nacc-2.zarr",
        "recon-2/em/fibsem-int16",
        np.int16,
        {"z": 2.96, "y": 4.0, "x": 4.0},
    ),
    "n5": Layout(
        "jrc_hela-2/fibsem-uint16/s4",
        "jrc_hela-2/jrc_hela-2.n5",
        "em/fibsem-uint16",
        np.uint16,
        {"z": 5.24, "y": 4.0, "x": 4.0},
    ),
}


def _levels(dtype) -> list[np.ndarray]:
    s0 = em_texture((20, 45, 50), seed=11, dtype=np.uint16)
    if dtype == np.int16:
        s0 = s0.astype(np.int16) - 1000  # int16 with negatives, as fibsem-int16
    s1 = s0[::2, ::2, ::2].copy()
    s1[:8, :16, :16] = 0  # equal to the fill value: neither writer stores this chunk
    return [s0, s1, s1[::2, ::2, ::2].copy()]


def _write_zarr(root, layout: Layout, levels):
    """As OpenOrganelle publishes Zarr: .zgroup at every level, OME-NGFF 0.4 multiscales on the group."""
    group = zarr.open_group(str(root / layout.container), mode="w", zarr_format=2).require_group(layout.group)
    for i, level in enumerate(levels):
        arr = group.create_array(
            f"s{i}",
            shape=level.shape,
            dtype=level.dtype,
            chunks=CHUNKS,
            compressors=numcodecs.Blosc(cname="zstd", clevel=3) if i == 0 else numcodecs.GZip(level=1),
            chunk_key_encoding={"name": "v2", "separator": "/"},
        )
        arr[...] = level
    v = layout.voxel
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "name": layout.group.rsplit("/", 1)[-1],
            "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
            "datasets": [
                {
                    "path": f"s{i}",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [v[a] * 2**i for a in "zyx"]},
                        {"type": "translation", "translation": [v[a] * (2**i - 1) / 2 for a in "zyx"]},
                    ],
                }
                for i in range(len(levels))
            ],
            "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}],
        }
    ]


def _write_n5(root, layout: Layout, levels):
    """As the older COSEM N5 containers are: {"n5": version} at the root, per-array pixelResolution (x first)
    and transform (z first), the group's multiscales of transforms and Neuroglancer scales (x first)."""
    ts = pytest.importorskip("tensorstore", reason="tensorstore writes the N5 test data")
    container = root / layout.container
    base = container / layout.group
    compressions = [
        {"type": "gzip", "level": -1, "useZlib": False},
        {"type": "gzip"},
        {"type": "raw"},
    ]
    v = layout.voxel
    for i, level in enumerate(levels):
        store = ts.open(
            {
                "driver": "n5",
                "kvstore": {"driver": "file", "path": str(base / f"s{i}")},
                "metadata": {
                    "dimensions": list(reversed(level.shape)),
                    "blockSize": list(reversed(CHUNKS)),
                    "dataType": np.dtype(layout.dtype).name,
                    "compression": compressions[i],
                },
                "create": True,
            }
        ).result()
        store[...] = level.transpose()  # N5 is x-first; tensorstore indexes in the N5 dimension order
        attrs_path = base / f"s{i}" / "attributes.json"
        attrs = json.loads(attrs_path.read_text())
        attrs["pixelResolution"] = {"dimensions": [v[a] * 2**i for a in "xyz"], "unit": "nm"}
        attrs["transform"] = {
            "axes": ["z", "y", "x"],
            "scale": [v[a] * 2**i for a in "zyx"],
            "translate": [v[a] * (2**i - 1) / 2 for a in "zyx"],
            "units": ["nm"] * 3,
        }
        attrs_path.write_text(json.dumps(attrs))
    (container / "attributes.json").write_text(json.dumps({"n5": "2.0.0"}))
    (container / "em" / "attributes.json").write_text(json.dumps({}))
    (base / "attributes.json").write_text(
        json.dumps(
            {
                "axes": ["x", "y", "z"],
                "units": ["nm", "nm", "nm"],
                "scales": [[2**i] * 3 for i in range(len(levels))],
                "pixelResolution": {"dimensions": [v[a] for a in "xyz"], "unit": "nm"},
                "multiscales": [
                    {
                        "name": layout.group.rsplit("/", 1)[-1],
                        "datasets": [
                            {
                                "path": f"s{i}",
                                "transform": json.loads((base / f"s{i}/attributes.json").read_text())[
                                    "transform"
                                ],
                            }
                            for i in range(len(levels))
                        ],
                    }
                ],
            }
        )
    )


@pytest.fixture(scope="module")
def bucket(tmp_path_factory, s3_endpoint):
    """janelia-cosem-datasets on the loopback S3 with both layouts (tests put back what they change)."""
    levels = {fmt: _levels(layout.dtype) for fmt, layout in LAYOUTS.items()}
    local = tmp_path_factory.mktemp("cosem")
    _write_zarr(local, LAYOUTS["zarr"], levels["zarr"])
    _write_n5(local, LAYOUTS["n5"], levels["n5"])
    fs = s3fs.S3FileSystem(
        key="testing", secret="testing", client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True
    )
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    fs.put(str(local) + "/", f"{BUCKET}/", recursive=True)
    for key in [BUCKET, *fs.find(BUCKET)]:  # public, like the real bucket: read anonymously
        fs.chmod(key, acl="public-read")
    return levels, fs


@pytest.fixture
def proxy(s3_endpoint):
    with S3Proxy(s3_endpoint) as p:
        yield p


def _endpoints(proxy, **kw) -> oo.OpenOrganelleEndpoints:
    settings = {
        "endpoint_url": proxy.url,
        "parallel": 3,
        "retry_attempts": 2,
        "retry_base_delay_s": 0.01,
        **kw,
    }
    endpoints = oo.OpenOrganelleEndpoints(**settings)
    endpoints.validate()
    return endpoints


def _source(fmt, endpoints, **spec_changes) -> oo.OpenOrganelleSource:
    key = LAYOUTS[fmt].key
    return oo.OpenOrganelleSource(key, dataclasses.replace(oo.DATASETS[key], **spec_changes), endpoints)


def _level_path(fmt: str, level: str) -> str:
    return f"{BUCKET}/{LAYOUTS[fmt].container}/{LAYOUTS[fmt].group}/{level}"


def _fetch(source, folder):
    version = source.check(LOG)
    manifest = DownloadManifest(folder, version.fingerprint)
    return version, manifest, source.fetch(manifest.folder, manifest, version, LOG)


def _chunk_requests(proxy, fmt: str, level: str) -> list:
    """Requests for chunk objects of a level that reached the S3 server (metadata objects left out)."""
    under = "/" + _level_path(fmt, level) + "/"
    return [r for r in proxy.requests(under) if r.path.rsplit("/", 1)[-1] not in METADATA]


def _chunk_key(fmt: str, level: str, idx) -> str:
    names = reversed(idx) if fmt == "n5" else idx  # N5 names a block x first
    return "/".join([_level_path(fmt, level), *map(str, names)])


def _stored_digest(fs, fmt: str, level: str, grid) -> tuple[int, str]:
    """What the source files should say: total bytes and the sha256 over per-chunk digests, from the bucket."""
    from itertools import product

    total, lines = 0, []
    for idx in product(*(range(g) for g in grid)):
        key = _chunk_key(fmt, level, idx)
        raw = fs.cat(key) if fs.exists(key) else b""
        total += len(raw)
        lines.append(f"{hashlib.sha256(raw).hexdigest()}  c{'_'.join(map(str, idx))}\n")
    return total, hashlib.sha256("".join(lines).encode()).hexdigest()


@pytest.mark.parametrize("fmt", ["zarr", "n5"])
def test_a_whole_level_and_a_crop_equal_the_source_at_one_get_per_chunk(bucket, tmp_path, proxy, fmt):
    levels, fs = bucket
    levels = levels[fmt]
    layout = LAYOUTS[fmt]
    ep = _endpoints(proxy)
    version, manifest, fetched = _fetch(_source(fmt, ep, level="s2"), tmp_path / "a")
    np.testing.assert_array_equal(fetched.volume.data.compute(), levels[2])
    assert fetched.volume.data.dtype == layout.dtype and fetched.volume.axes == ("z", "y", "x")
    assert fetched.volume.voxel_size_nm() == pytest.approx({a: v * 4 for a, v in layout.voxel.items()})
    assert fetched.voxel_size_source == "header" and fetched.modality == "FIB-SEM"
    (src,) = fetched.files
    assert src.url == f"s3://{_level_path(fmt, 's2')}" and src.path == f"{layout.container}/{layout.group}/s2"
    assert (src.size_bytes, src.sha256) == _stored_digest(fs, fmt, "s2", (1, 1, 1))
    assert [e.extra["missing"] for e in manifest.entries().values()] == [False]
    meta = version.additional_metadata["openorganelle"]
    assert meta["level"] == "s2" and meta["format"] == ("zarr2" if fmt == "zarr" else "n5")
    assert meta["group"] == layout.group
    assert meta["dimensions_nm"] == pytest.approx([5 * layout.voxel["z"] * 4, 12 * 16.0, 13 * 16.0])

    proxy.clear()
    _, manifest, fetched = _fetch(_source(fmt, ep, level="s1"), tmp_path / "b")
    np.testing.assert_array_equal(fetched.volume.data.compute(), levels[1])
    assert (fetched.files[0].size_bytes, fetched.files[0].sha256) == _stored_digest(fs, fmt, "s1", (2, 2, 2))
    missing = sorted(k for k, e in manifest.entries().items() if e.extra["missing"])
    assert missing == ["c0_0_0"] and fetched.header["missing_chunks"] == 1  # never written: read as 0
    chunk_requests = _chunk_requests(proxy, fmt, "s1")
    assert {r.method for r in chunk_requests} == {"GET"}  # no HEAD or listing before a chunk
    assert sorted(r.path for r in chunk_requests) == sorted(
        "/" + _chunk_key(fmt, "s1", (z, y, x)) for z in range(2) for y in range(2) for x in range(2)
    )  # exactly one GET per chunk, the never-written one included (its 404 reads as zeros)

    proxy.clear()
    crop = _source(fmt, ep, level="s0", crop_offset_zyx=(3, 10, 7), crop_size_zyx=(11, 20, 30))
    version, _, fetched = _fetch(crop, tmp_path / "c")
    np.testing.assert_array_equal(fetched.volume.data.compute(), levels[0][3:14, 10:30, 7:37])
    assert len(_chunk_requests(proxy, fmt, "s0")) == 2 * 2 * 3  # only the chunks the crop touches
    assert version.additional_metadata["openorganelle"]["crop_offset_zyx"] == [3, 10, 7]
    assert version.additional_metadata["openorganelle"]["dimensions_nm"] == pytest.approx(
        [11 * layout.voxel["z"], 80, 120]
    )


@pytest.mark.parametrize("fmt", ["zarr", "n5"])
def test_an_interrupted_fetch_resumes_with_the_missing_chunks_only(bucket, tmp_path, proxy, fmt):
    levels, _ = bucket
    levels = levels[fmt]
    source = _source(fmt, _endpoints(proxy, parallel=1), level="s0")
    version = source.check(LOG)
    manifest = DownloadManifest(tmp_path / "work", version.fingerprint)
    refused = _chunk_key(fmt, "s0", (0, 1, 1))  # the 6th chunk in grid order (3 × 3 × 4 chunks)
    proxy.fail(f"^/{refused}$", 403)
    with pytest.raises(PermanentSourceError, match="access denied"):
        source.fetch(manifest.folder, manifest, version, LOG)
    assert len(manifest.entries()) == 5  # one at a time: the five before the refusal, each written
    proxy.clear()
    resumed = DownloadManifest(manifest.folder, version.fingerprint)  # a new run reads the manifest again
    fetched = source.fetch(resumed.folder, resumed, version, LOG)
    total = int(np.prod([-(-n // c) for n, c in zip(levels[0].shape, CHUNKS, strict=True)]))
    reads = [r.path for r in _chunk_requests(proxy, fmt, "s0")]
    assert len(reads) == total - 5 and len(set(reads)) == len(reads)
    np.testing.assert_array_equal(fetched.volume.data.compute(), levels[0])
    proxy.clear()
    fetched = source.fetch(
        resumed.folder, DownloadManifest(resumed.folder, version.fingerprint), version, LOG
    )
    assert _chunk_requests(proxy, fmt, "s0") == []  # all there: nothing fetched again
    np.testing.assert_array_equal(fetched.volume.data.compute(), levels[0])


@pytest.mark.parametrize("fmt", ["zarr", "n5"])
def test_a_missing_level_names_bucket_key_and_layout(bucket, proxy, fmt):
    source = _source(fmt, _endpoints(proxy), level="s3")  # s3 does not exist here
    url = f"s3://{_level_path(fmt, 's3')}"
    with pytest.raises(PermanentSourceError, match=f"{url}: no (Zarr v2|N5) array there") as info:
        source.check(LOG)
    assert info.value.url == url
    assert f"bucket '{BUCKET}'" in str(info.value) and "container, group and level" in str(info.value)


@pytest.mark.parametrize("anonymous", [True, False])
def test_a_refused_key_names_bucket_key_and_what_to_check(bucket, tmp_path, proxy, anonymous):
    header = f"{_level_path('zarr', 's2')}/.zarray"
    proxy.fail(f"^/{header}$", 403)
    source = _source("zarr", _endpoints(proxy, anonymous=anonymous), level="s2")
    with pytest.raises(PermanentSourceError) as info:
        source.check(LOG)
    message = str(info.value)
    assert f"s3://{header}: access denied (HTTP 403) by {proxy.url}" in message
    assert f"bucket '{BUCKET}'" in message and f"key '{header.split('/', 1)[1]}'" in message
    if anonymous:
        assert "read anonymously" in message and "AWS_ACCESS_KEY_ID" in message
    else:
        assert "credentials" in message and "anonymous: true" in message

    proxy.clear()
    chunk = _chunk_key("zarr", "s1", (1, 0, 1))
    proxy.fail(f"^/{chunk}$", 403)
    with pytest.raises(
        PermanentSourceError, match=f"s3://{chunk}: access denied .*key '{chunk.split('/', 1)[1]}'"
    ):
        _fetch(_source("zarr", _endpoints(proxy, anonymous=anonymous), level="s1"), tmp_path)


def test_container_and_group_are_run_config_per_dataset(bucket, tmp_path, proxy):
    """The nacc-2 partition pointed at the hela-2 N5 container and its own group name by run config."""
    levels, _ = bucket
    ep = _endpoints(proxy, container=LAYOUTS["n5"].container, group=LAYOUTS["n5"].group)
    source = oo.make_source(LAYOUTS["zarr"].key, ep)
    assert source.url == f"s3://{_level_path('n5', 's3')}" and source.format == "n5"
    _, _, fetched = _fetch(_source("zarr", ep, level="s2"), tmp_path)
    np.testing.assert_array_equal(fetched.volume.data.compute(), levels["n5"][2])
    default = oo.make_source(LAYOUTS["n5"].key)
    assert (
        default.url == f"s3://{BUCKET}/jrc_hela-2/jrc_hela-2.n5/em/fibsem-uint16/s4"
        and default.format == "n5"
    )
    with pytest.raises(ValueError, match="unknown OpenOrganelle dataset 'nope'"):
        oo.make_source("nope")


def test_a_crop_outside_the_level_is_refused(bucket, proxy):
    source = _source(
        "zarr", _endpoints(proxy), level="s0", crop_offset_zyx=(10, 0, 0), crop_size_zyx=(20, 10, 10)
    )
    with pytest.raises(
        PermanentSourceError,
        match=r"crop at z,y,x \(10, 0, 0\) of size \(20, 10, 10\) does not fit the level's shape \(20, 45, 50\)",
    ):
        source.check(LOG)


def test_a_level_bigger_than_max_level_bytes_is_refused(bucket, proxy):
    source = _source("zarr", _endpoints(proxy, max_level_bytes=1000), level="s0")
    with pytest.raises(PermanentSourceError, match="more than max_level_bytes"):
        source.check(LOG)


@pytest.mark.parametrize("fmt", ["zarr", "n5"])
def test_a_corrupt_chunk_names_its_url(bucket, tmp_path, proxy, fmt):
    _, fs = bucket
    key = _chunk_key(fmt, "s1", (0, 1, 1))
    original = fs.cat(key)
    fs.pipe(key, original[:20] + b"this is not what was compressed")
    fs.chmod(key, acl="public-read")
    try:
        with pytest.raises(FormatError, match=f"s3://{key}: .*cannot be decoded"):
            _fetch(_source(fmt, _endpoints(proxy), level="s1"), tmp_path)
    finally:
        fs.pipe(key, original)
        fs.chmod(key, acl="public-read")


def test_bad_endpoints_name_the_field():
    for field, value in [
        ("bucket", "a/b"),
        ("endpoint_url", "s3.example.org"),
        ("container", "jrc_hela-2/jrc_hela-2.h5"),
        ("group", "../elsewhere"),
        ("parallel", 0),
        ("max_level_bytes", 0),
        ("retry_attempts", 0),
    ]:
        with pytest.raises(ValueError, match=field):
            oo.OpenOrganelleEndpoints(**{field: value}).validate()
    oo.OpenOrganelleEndpoints().validate()
    assert oo.OpenOrganelleEndpoints().storage_options()["anon"] is True
    assert "endpoint_url" not in oo.OpenOrganelleEndpoints().storage_options()["client_kwargs"]  # AWS


def test_a_level_ingests_end_to_end_into_ome_zarr_with_a_valid_record(bucket, tmp_path, proxy):
    from em_platform.catalog.db import CatalogDB
    from em_platform.catalog.schema import validation_errors
    from em_platform.ingest.public import ingest_public_dataset
    from em_platform.storage import DataStore

    levels, _ = bucket
    source = _source("n5", _endpoints(proxy), level="s1")
    db = CatalogDB(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    result = ingest_public_dataset(
        source,
        store=DataStore(str(tmp_path / "data")),
        catalog=db,
        downloads=tmp_path / "downloads",
        lineage={"run_id": "r", "asset_key": "ingest/openorganelle", "partition_key": source.key},
        logger=LOG,
    )
    db.dispose()
    np.testing.assert_array_equal(zarr.open_group(result.volume_url, mode="r")["0"][...], levels["n5"][1])
    rec = result.record
    assert validation_errors(rec) == [] and rec["status"] == "complete"
    assert rec["metadata"]["core"]["data_type"] == "uint16"
    assert rec["metadata"]["core"]["voxel_size_nm"] == pytest.approx(
        {a: v * 2 for a, v in LAYOUTS["n5"].voxel.items()}
    )
    assert rec["metadata"]["core"]["voxel_size_source"] == "header"
    assert rec["files"]["source"][0]["url"].endswith("jrc_hela-2.n5/em/fibsem-uint16/s1")
