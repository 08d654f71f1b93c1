"""OpenOrganelle against a real S3 API on loopback (moto) holding a COSEM-shaped Zarr v2 multiscale (written by
zarr-python) and an N5 multiscale (written by tensorstore): whole levels and crops equal the source voxels, a
resumed run reads only the missing chunks, and a missing level, a crop outside the level or a corrupt chunk
fail with the URL named."""

from __future__ import annotations

import json
import logging
import uuid

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

LOG = logging.getLogger("tests.sources.openorganelle")
GROUP = "recon-2/em/fibsem-int16"
VOXEL = {"z": 2.96, "y": 4.0, "x": 4.0}
CHUNKS = (8, 16, 16)


def _levels() -> list[np.ndarray]:
    s0 = em_texture((20, 45, 50), seed=11, dtype=np.uint16).astype(np.int16) - 1000  # int16 with negatives
    return [s0, s0[::2, ::2, ::2].copy()]


def _write_zarr(root, levels):
    group = zarr.open_group(str(root / "jrc_mus-nacc-2.zarr"), mode="w", zarr_format=2).require_group(GROUP)
    for i, level in enumerate(levels):
        arr = group.create_array(
            f"s{i}",
            shape=level.shape,
            dtype=level.dtype,
            chunks=CHUNKS,
            compressors=numcodecs.GZip(level=1),
            chunk_key_encoding={"name": "v2", "separator": "/"},
        )
        arr[...] = level
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "name": "fibsem-int16",
            "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
            "datasets": [
                {
                    "path": f"s{i}",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [VOXEL[a] * 2**i for a in "zyx"]},
                        {"type": "translation", "translation": [0.0, 0.0, 0.0]},
                    ],
                }
                for i in range(len(levels))
            ],
        }
    ]


def _write_n5(root, levels):
    ts = pytest.importorskip("tensorstore", reason="tensorstore writes the N5 test data")
    base = root / "jrc_mus-nacc-2.n5" / GROUP
    for i, level in enumerate(levels):
        store = ts.open(
            {
                "driver": "n5",
                "kvstore": {"driver": "file", "path": str(base / f"s{i}")},
                "metadata": {
                    "dimensions": list(reversed(level.shape)),
                    "blockSize": list(reversed(CHUNKS)),
                    "dataType": "int16",
                    "compression": {"type": "gzip"} if i == 0 else {"type": "raw"},
                },
                "create": True,
            }
        ).result()
        store[...] = level.transpose()  # N5 is x-first; tensorstore indexes in the N5 dimension order
        attrs_path = base / f"s{i}" / "attributes.json"
        attrs = json.loads(attrs_path.read_text())
        attrs["pixelResolution"] = {"dimensions": [VOXEL[a] * 2**i for a in "xyz"], "unit": "nm"}
        attrs_path.write_text(json.dumps(attrs))
    (base / "attributes.json").write_text(
        json.dumps(
            {
                "multiscales": [
                    {
                        "name": "fibsem-int16",
                        "datasets": [
                            {
                                "path": f"s{i}",
                                "transform": {
                                    "axes": ["z", "y", "x"],
                                    "scale": [VOXEL[a] * 2**i for a in "zyx"],
                                    "translate": [0, 0, 0],
                                    "units": ["nm"] * 3,
                                },
                            }
                            for i in range(len(levels))
                        ],
                    }
                ]
            }
        )
    )


@pytest.fixture(scope="module")
def bucket(tmp_path_factory, s3_endpoint):
    """A bucket laid out like janelia-cosem-datasets, holding both containers (tests must not change it)."""
    levels = _levels()
    local = tmp_path_factory.mktemp("cosem")
    _write_zarr(local, levels)
    _write_n5(local, levels)
    name = f"cosem-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir(name)
    fs.put(str(local) + "/", f"{name}/jrc_mus-nacc-2/", recursive=True)
    for key in [name, *fs.find(name)]:  # public, like janelia-cosem-datasets: read anonymously
        fs.chmod(key, acl="public-read")
    return name, levels, fs


def _endpoints(bucket_name, s3_endpoint, **kw):
    settings = {"parallel": 3, "retry_attempts": 2, "retry_base_delay_s": 0.01, **kw}
    return oo.OpenOrganelleEndpoints(bucket=bucket_name, endpoint_url=s3_endpoint, **settings)


def _source(key, endpoints, monkeypatch=None, **spec_changes):
    spec = oo.DATASETS[key]
    if spec_changes:
        import dataclasses

        spec = dataclasses.replace(spec, **spec_changes)
    return oo.OpenOrganelleSource(key, spec, endpoints)


def _fetch(source, tmp_path):
    version = source.check(LOG)
    manifest = DownloadManifest(tmp_path / "work", version.fingerprint)
    return version, manifest, source.fetch(manifest.folder, manifest, version, LOG)


@pytest.mark.parametrize("container_format", ["zarr", "n5"])
def test_a_whole_level_and_a_crop_equal_the_source(bucket, tmp_path, s3_endpoint, container_format):
    name, levels, _ = bucket
    ep = _endpoints(name, s3_endpoint, container_format=container_format)
    version, _, fetched = _fetch(_source("jrc_mus-nacc-2/fibsem-int16/s3", ep, level="s1"), tmp_path / "a")
    np.testing.assert_array_equal(fetched.volume.data.compute(), levels[1])
    assert fetched.volume.data.dtype == np.int16
    assert fetched.volume.voxel_size_nm() == pytest.approx({a: v * 2 for a, v in VOXEL.items()})
    assert fetched.files[0].url == f"s3://{name}/jrc_mus-nacc-2/jrc_mus-nacc-2.{container_format}/{GROUP}/s1"

    crop = _source(
        "jrc_mus-nacc-2/fibsem-int16/s0-centre-crop",
        ep,
        level="s0",
        crop_offset_zyx=(3, 10, 7),
        crop_size_zyx=(11, 20, 30),
    )
    _, _, fetched = _fetch(crop, tmp_path / "b")
    np.testing.assert_array_equal(fetched.volume.data.compute(), levels[0][3:14, 10:30, 7:37])
    assert version.additional_metadata["openorganelle"]["dimensions_nm"][0] == pytest.approx(10 * 2.96 * 2)


def test_an_interrupted_fetch_resumes_with_the_missing_chunks_only(
    bucket, tmp_path, s3_endpoint, monkeypatch
):
    name, levels, fs = bucket
    ep = _endpoints(name, s3_endpoint, parallel=1)
    source = _source("jrc_mus-nacc-2/fibsem-int16/s2", ep, level="s0")
    reads: list[str] = []
    real_cat = s3fs.S3FileSystem.cat

    def counting_cat(self, path, *a, **kw):
        if path.rsplit("/", 1)[-1] in (".zarray", ".zattrs", "attributes.json"):
            return real_cat(self, path, *a, **kw)
        reads.append(path)  # chunk objects only
        if len(reads) == 5 and not getattr(counting_cat, "failed", False):
            counting_cat.failed = True
            raise PermissionError(f"injected: access denied for {path}")  # permanent: the run stops here
        return real_cat(self, path, *a, **kw)

    version = source.check(LOG)
    monkeypatch.setattr(s3fs.S3FileSystem, "cat", counting_cat)
    manifest = DownloadManifest(tmp_path / "work", version.fingerprint)
    with pytest.raises(PermissionError):
        source.fetch(manifest.folder, manifest, version, LOG)
    finished = len(manifest.entries())
    assert 4 <= finished < 5 + 1  # the four before the failure (and one already under way when it came)
    reads.clear()
    fetched = source.fetch(
        manifest.folder, DownloadManifest(manifest.folder, version.fingerprint), version, LOG
    )
    total = int(np.prod([-(-n // c) for n, c in zip(levels[0].shape, CHUNKS, strict=True)]))
    assert len(reads) == total - finished
    np.testing.assert_array_equal(fetched.volume.data.compute(), levels[0])


def test_a_missing_level_names_the_s3_url(bucket, tmp_path, s3_endpoint):
    name, _, _ = bucket
    source = _source(
        "jrc_mus-nacc-2/fibsem-int16/s3", _endpoints(name, s3_endpoint)
    )  # s3 does not exist here
    with pytest.raises(PermanentSourceError, match=f"s3://{name}/.*/s3: no Zarr v2 or N5 array"):
        source.check(LOG)


def test_a_crop_outside_the_level_is_refused(bucket, s3_endpoint):
    name, _, _ = bucket
    source = _source(
        "jrc_mus-nacc-2/fibsem-int16/s0-centre-crop",
        _endpoints(name, s3_endpoint),
        level="s0",
        crop_offset_zyx=(10, 0, 0),
        crop_size_zyx=(20, 10, 10),
    )
    with pytest.raises(PermanentSourceError, match=r"does not fit the level's shape \(20, 45, 50\)"):
        source.check(LOG)


def test_a_corrupt_chunk_names_its_url(bucket, tmp_path, s3_endpoint):
    name, _, fs = bucket
    key = f"{name}/jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/{GROUP}/s1/0/1/1"
    original = fs.cat(key)
    fs.pipe(key, b"this is not gzip")
    fs.chmod(key, acl="public-read")
    try:
        source = _source("jrc_mus-nacc-2/fibsem-int16/s3", _endpoints(name, s3_endpoint), level="s1")
        with pytest.raises(FormatError, match="s1/0/1/1: chunk cannot be decoded"):
            _fetch(source, tmp_path)
    finally:
        fs.pipe(key, original)
        fs.chmod(key, acl="public-read")


def test_bad_endpoints_name_the_field():
    with pytest.raises(ValueError, match="container_format"):
        oo.OpenOrganelleEndpoints(container_format="hdf5").validate()
    with pytest.raises(ValueError, match="endpoint_url"):
        oo.OpenOrganelleEndpoints(endpoint_url="s3.example.org").validate()
    oo.OpenOrganelleEndpoints().validate()


def test_a_level_ingests_end_to_end_into_ome_zarr_with_a_valid_record(bucket, tmp_path, s3_endpoint):
    from em_platform.catalog.db import CatalogDB
    from em_platform.catalog.schema import validation_errors
    from em_platform.sources.ingest import ingest_public_dataset
    from em_platform.storage import DataStore

    name, levels, _ = bucket
    source = _source(
        "jrc_mus-nacc-2/fibsem-int16/s3", _endpoints(name, s3_endpoint, container_format="n5"), level="s0"
    )
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
    np.testing.assert_array_equal(zarr.open_group(result.volume_url, mode="r")["0"][...], levels[0])
    rec = result.record
    assert validation_errors(rec) == [] and rec["status"] == "complete"
    assert rec["metadata"]["core"]["data_type"] == "int16"
    assert rec["metadata"]["core"]["voxel_size_nm"] == pytest.approx(VOXEL)
    assert rec["files"]["source"][0]["url"].endswith("jrc_mus-nacc-2.n5/recon-2/em/fibsem-int16/s0")
