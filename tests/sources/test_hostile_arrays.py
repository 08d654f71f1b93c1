"""Remote arrays whose metadata or chunks lie (issue 50, point 3), served by a real S3 API on loopback (moto)
to the OpenOrganelle source, by an HTTP file server to the N5 reader, and by a DVID-like server to FlyEM.

The review's Zarr v2 bomb: a 255 KB gzip object for a 64 × 64 chunk inflated to 256 MiB before zarr-python
refused it. Now the declared chunk is bounded when the array is opened (dims ≥ 1, MAX_CHUNK_BYTES), the object
is read only up to what such a chunk can be stored in, and every codec stops at the chunk's declared bytes;
a dtype that is not on the allow-list is refused before a chunk is read. Each refusal names the object, the
rule and the bound, and Python's peak allocation while fetching stays within ALLOWANCE of what the array's
metadata requests took (the bombs inflate to 48 MiB or more; tracemalloc sees the decoders' outputs, which are
Python and numpy buffers, and liblzma's, which Python allocates)."""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import logging
import lzma
import struct
import zlib

import fsspec
import numcodecs
import numpy as np
import pytest
import s3fs

from em_platform.formats import FormatError
from em_platform.sources import n5
from em_platform.sources import openorganelle as oo
from em_platform.sources.manifest import DownloadManifest
from tests.support.dvid_server import DvidServer
from tests.support.memory import peak_memory

LOG = logging.getLogger("tests.sources.hostile_arrays")
MiB = 2**20
BUCKET = "hostile-cosem"
KEY = "jrc_mus-nacc-2/fibsem-int16/s3"  # a Zarr partition; container and group come from the run config
ALLOWANCE = 12 * MiB
"""What refusing one hostile chunk may allocate beyond the baseline (one S3 request of the same client, measured
in each test: moto and aiobotocore allocate about 10 MiB a request here): the object as read, a few copies of
the chunk (256 KiB at most here) and an xz decoder's dictionary (8 MiB at xz's default preset). A quarter of
the smallest bomb below, which inflates to 48 MiB."""

MULTISCALES = {
    "multiscales": [
        {
            "version": "0.4",
            "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
            "datasets": [
                {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [8, 4, 4]}]}
            ],
        }
    ]
}


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    """The bucket, and one S3 client for the module's sources (each would make its own, at 0.2 s a client),
    made by the sources' own OpenOrganelleEndpoints.filesystem."""
    fs = s3fs.S3FileSystem(
        key="testing", secret="testing", client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True
    )
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    make = oo.OpenOrganelleEndpoints.filesystem
    clients: dict = {}

    def one_client(endpoints: oo.OpenOrganelleEndpoints):
        key = (endpoints.endpoint_url, endpoints.anonymous)
        if key not in clients:
            clients[key] = make(endpoints)
        return clients[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(oo.OpenOrganelleEndpoints, "filesystem", one_client)
        yield fs, s3_endpoint


def _zarray(shape=(1, 64, 64), chunks=(1, 64, 64), dtype="|u1", compressor=None, **changes) -> dict:
    return {
        "zarr_format": 2,
        "shape": list(shape),
        "chunks": list(chunks),
        "dtype": dtype,
        "compressor": compressor,
        "fill_value": 0,
        "order": "C",
        "filters": None,
        "dimension_separator": ".",
        **changes,
    }


def _publish(s3, case: str, zarray: dict, chunks: dict[str, bytes] | None = None) -> oo.OpenOrganelleSource:
    """A one-level Zarr v2 multiscale at s3://hostile-cosem/<case>.zarr/em/s0 and the source reading it."""
    fs, endpoint = s3
    base = f"{BUCKET}/{case}.zarr/em"
    objects = {
        f"{base}/.zattrs": json.dumps(MULTISCALES).encode(),
        f"{base}/s0/.zarray": json.dumps(zarray).encode(),
    }
    objects.update({f"{base}/s0/{k}": v for k, v in (chunks or {}).items()})
    fs.pipe(objects)
    endpoints = oo.OpenOrganelleEndpoints(
        bucket=BUCKET,
        endpoint_url=endpoint,
        anonymous=False,
        container=f"{case}.zarr",
        group="em",
        parallel=1,
        retry_attempts=1,
        retry_base_delay_s=0.01,
    )
    endpoints.validate()
    return oo.OpenOrganelleSource(KEY, dataclasses.replace(oo.DATASETS[KEY], level="s0"), endpoints)


def _prepared(source: oo.OpenOrganelleSource, folder):
    """What a run has before it fetches: the checked version and its download manifest."""
    version = source.check(LOG)
    return version, DownloadManifest(folder, version.fingerprint)


def _fetch_refused(source: oo.OpenOrganelleSource, folder) -> str:
    """The FormatError fetching ``source`` raises, once the fetch allocated at most ALLOWANCE more than the
    check before it (its metadata requests)."""
    with peak_memory() as baseline:
        version, manifest = _prepared(source, folder)
    with peak_memory() as peak, pytest.raises(FormatError) as exc:
        source.fetch(manifest.folder, manifest, version, LOG)
    assert peak["bytes"] < baseline["bytes"] + ALLOWANCE, (
        f"fetching the chunk allocated {peak['bytes'] / MiB:.0f} MiB, its metadata {baseline['bytes'] / MiB:.0f}"
    )
    return str(exc.value)


# -- dtypes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, rule",
    [
        ("|O", "object dtype would take the file's bytes for Python object pointers"),
        ([["a", "<i4"]], "structured (record) dtype"),
        ("|V8", "void (raw bytes) dtype"),
        ("<U4", "string dtype holds text"),
        ("|S8", "bytes dtype holds text"),
        ("<M8[ns]", "datetime dtype"),
        ("<c8", "complex values"),
        ("|b1", "boolean image"),
    ],
    ids=["object", "structured", "void", "str", "bytes", "datetime", "complex", "bool"],
)
def test_a_zarr_dtype_off_the_allow_list_is_refused_before_any_chunk(s3, dtype, rule, request):
    source = _publish(
        s3, f"dtype-{request.node.callspec.id}", _zarray(dtype=dtype), {"0.0.0": bytes(64 * 64 * 16)}
    )
    with pytest.raises(FormatError) as exc:
        source.check(LOG)
    message = str(exc.value)
    assert f"{BUCKET}/dtype-{request.node.callspec.id}.zarr/em/s0/.zarray: dtype" in message
    assert rule in message and "ALLOWED_DTYPES" in message


@pytest.mark.parametrize("dtype", [">u2", "<u2"])
def test_both_byte_orders_of_a_zarr_array_read_the_right_values(s3, tmp_path, dtype):
    """A guard for the reader that replaced zarr-python's: a valid array reads voxel for voxel."""
    values = (np.arange(2 * 64 * 64, dtype=np.uint32) * 7 % 65521).astype(dtype).reshape(2, 64, 64)
    chunk = gzip.compress(values[:1].tobytes())
    name = "order-big" if dtype[0] == ">" else "order-little"
    zarray = _zarray(shape=(2, 64, 64), dtype=dtype, compressor={"id": "gzip", "level": 1})
    source = _publish(s3, name, zarray, {"0.0.0": chunk, "1.0.0": gzip.compress(values[1:].tobytes())})
    version, manifest = _prepared(source, tmp_path)
    fetched = source.fetch(manifest.folder, manifest, version, LOG)
    np.testing.assert_array_equal(fetched.volume.data.compute(), values)
    assert fetched.volume.data.dtype == np.uint16 and fetched.volume.data.dtype.isnative


# -- chunk shapes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks, rule",
    [
        ([1, 0, 64], "must be a list of whole numbers ≥ 1 (no zero or negative side)"),
        ([1, -64, 64], "must be a list of whole numbers ≥ 1 (no zero or negative side)"),
        ([1, 64.0, 64], "must be a list of whole numbers ≥ 1"),
        (
            [64, 2**16, 2**16],
            "is 274877906944 bytes a chunk, more than the 2147483647 one chunk may have (MAX_CHUNK_BYTES)",
        ),
    ],
    ids=["zero", "negative", "not-whole", "huge"],
)
def test_a_zarr_chunk_shape_out_of_bounds_is_refused_at_open(s3, chunks, rule, request):
    source = _publish(s3, f"chunks-{request.node.callspec.id}", _zarray(chunks=chunks))
    with pytest.raises(FormatError) as exc:
        source.check(LOG)
    assert ".zarray: chunks" in str(exc.value) and rule in str(exc.value)


# -- objects and codecs ----------------------------------------------------------------------------------------


def test_the_reviews_255_kb_gzip_object_for_a_64x64_chunk_is_refused_unread(s3, tmp_path):
    """256 one-MiB gzip members (a valid gzip file of 256 MiB): no 4 KiB chunk is stored in 255 KB."""
    bomb = gzip.compress(bytes(MiB), 9) * 256
    assert 200_000 < len(bomb) < 300_000
    source = _publish(s3, "review-bomb", _zarray(compressor={"id": "gzip", "level": 9}), {"0.0.0": bomb})
    message = _fetch_refused(source, tmp_path)
    assert f"s3://{BUCKET}/review-bomb.zarr/em/s0/0.0.0" in message
    assert "chunk object of more than 8256 bytes, the most a chunk of 4096 bytes can be stored in" in message
    assert "max_stored_bytes" in message


def _members(compress, total: int) -> bytes:
    """``total`` bytes of zeros as one-MiB streams one after the other (gzip members, bzip2 and xz streams):
    what a decoder of the format inflates whole, at the cost of compressing one MiB."""
    return compress(bytes(MiB)) * (total // MiB)


def _zstd_without_size(data: bytes) -> bytes:
    """A zstd frame that states no content size (as a streaming writer makes): only the buffer bounds it."""
    frame = numcodecs.Zstd(level=1).encode(data)
    assert frame[4] >> 6 == 2 and not frame[4] & 0x20  # a 4-byte Frame_Content_Size, a window descriptor
    return frame[:4] + bytes([frame[4] & 0x3F]) + frame[5:6] + frame[10:]


CHUNK = (1, 512, 512)  # 256 KiB of uint8
STREAM = "decodes to more than the 262144 bytes its array declares"
FRAME = "frame states {} bytes, its array declares 262144: refused before decompressing"
BOMBS = {
    "gzip": ({"id": "gzip", "level": 9}, lambda: _members(lambda b: gzip.compress(b, 9), 64 * MiB), STREAM),
    "zlib": ({"id": "zlib", "level": 9}, lambda: zlib.compress(bytes(64 * MiB), 9), STREAM),
    "bz2": ({"id": "bz2", "level": 9}, lambda: _members(bz2.compress, 256 * MiB), STREAM),
    "lzma": ({"id": "lzma", "format": 1}, lambda: _members(lzma.compress, 256 * MiB), STREAM),
    "zstd": (
        {"id": "zstd", "level": 1},
        lambda: numcodecs.Zstd().encode(bytes(64 * MiB)),
        FRAME.format(64 * MiB),
    ),
    "zstd-unsized": (
        {"id": "zstd", "level": 1},
        lambda: _zstd_without_size(bytes(64 * MiB)),
        "does not decode to the 262144 bytes its array declares",
    ),
    "lz4": ({"id": "lz4"}, lambda: numcodecs.LZ4().encode(bytes(64 * MiB)), FRAME.format(64 * MiB)),
    "blosc-zstd": (
        {"id": "blosc", "cname": "zstd"},
        lambda: numcodecs.Blosc(cname="zstd").encode(bytes(64 * MiB)),
        FRAME.format(64 * MiB),
    ),
    "blosc-lz4": (
        {"id": "blosc", "cname": "lz4"},
        lambda: numcodecs.Blosc(cname="lz4").encode(bytes(48 * MiB)),
        FRAME.format(48 * MiB),
    ),
}


@pytest.mark.parametrize("codec", list(BOMBS))
def test_a_bomb_in_each_codec_stops_at_the_chunks_declared_bytes(s3, tmp_path, codec):
    compressor, make, rule = BOMBS[codec]
    bomb = make()
    zarray = _zarray(shape=CHUNK, chunks=CHUNK, compressor=compressor)
    message = _fetch_refused(_publish(s3, f"bomb-{codec}", zarray, {"0.0.0": bomb}), tmp_path)
    assert f"s3://{BUCKET}/bomb-{codec}.zarr/em/s0/0.0.0" in message and rule in message


def test_a_blosc_header_that_understates_its_size_is_refused_unexpanded():
    """48 MiB in 1 MiB blosc blocks, its header patched to claim 256 KiB: blocks bigger than the whole."""
    from em_platform.sources.chunk_codecs import decode_at_most

    frame = bytearray(numcodecs.Blosc(cname="zstd", blocksize=MiB).encode(bytes(48 * MiB)))
    struct.pack_into("<I", frame, 4, 256 * 1024)
    with (
        peak_memory() as peak,
        pytest.raises(FormatError, match="blosc header states blocks of 1048576 bytes in 262144"),
    ):
        decode_at_most("blosc", bytes(frame), 256 * 1024, "x/0.0.0")
    assert peak["bytes"] < ALLOWANCE


@pytest.mark.parametrize(
    "change, says",
    [
        ({"compressor": {"id": "zfpy", "mode": 4}}, "codec 'zfpy' is not supported"),
        ({"compressor": {"id": "imagecodecs_jpeg2k"}}, "codec 'imagecodecs_jpeg2k' is not supported"),
        ({"filters": [{"id": "delta", "dtype": "<u2"}]}, "filters: codec ['delta'] is not supported"),
    ],
    ids=["zfpy", "jpeg2k", "delta-filter"],
)
def test_a_codec_or_filter_not_read_is_refused_by_name(s3, change, says, request):
    source = _publish(s3, f"codec-{request.node.callspec.id}", _zarray(**change))
    with pytest.raises(FormatError) as exc:
        source.check(LOG)
    assert says in str(exc.value) and "raw, gzip, zlib, bz2, lzma, zstd, blosc, lz4" in str(exc.value)


# -- N5 (its chunks were bounded before; these guard the codecs now shared with Zarr) ----------------------------

N5_BLOCK = [64, 64, 64]  # x, y, z: a 256 KiB uint8 block


@pytest.mark.parametrize(
    "compression, payload, says",
    [
        (
            {"type": "bzip2"},
            lambda: _members(bz2.compress, 256 * MiB),
            "more than the 262144 bytes its header states",
        ),
        (
            {"type": "xz"},
            lambda: _members(lzma.compress, 256 * MiB),
            "more than the 262144 bytes its header states",
        ),
        (
            {"type": "zstd"},
            lambda: numcodecs.Zstd().encode(bytes(64 * MiB)),
            "zstd frame states 67108864 bytes",
        ),
        (
            {"type": "blosc"},
            lambda: numcodecs.Blosc(cname="zstd").encode(bytes(64 * MiB)),
            "blosc frame states",
        ),
    ],
    ids=["bzip2", "xz", "zstd", "blosc"],
)
def test_an_n5_bomb_in_each_codec_stops_at_the_blocks_size(http_files, compression, payload, says):
    (http_files.root / "arr" / "0" / "0").mkdir(parents=True)
    attrs = {
        "dimensions": [64, 64, 64],
        "blockSize": N5_BLOCK,
        "dataType": "uint8",
        "compression": compression,
    }
    (http_files.root / "arr" / "attributes.json").write_text(json.dumps(attrs))
    header = struct.pack(">HH", 0, 3) + struct.pack(">3I", *N5_BLOCK)
    (http_files.root / "arr" / "0" / "0" / "0").write_bytes(header + payload())
    arr = n5.N5Array(fsspec.filesystem("http"), http_files.url_for("arr"))
    with peak_memory() as peak, pytest.raises(FormatError, match=says):
        arr.read_block((0, 0, 0))
    assert peak["bytes"] < ALLOWANCE


def test_an_n5_lz4_array_is_refused_by_name(http_files):
    (http_files.root / "arr").mkdir()
    attrs = {"dimensions": [64], "blockSize": [64], "dataType": "uint8", "compression": {"type": "lz4"}}
    (http_files.root / "arr" / "attributes.json").write_text(json.dumps(attrs))
    with pytest.raises(FormatError, match="N5 compression 'lz4' is not supported"):
        n5.N5Array(fsspec.filesystem("http"), http_files.url_for("arr"))


# -- DVID ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data_type, says",
    [("uint64", "holds uint64 voxels, and raw reads uint8blk instances only"), ("object", "object dtype")],
)
def test_a_dvid_instance_stating_another_voxel_type_is_refused_before_any_voxel(data_type, says, monkeypatch):
    from em_platform.sources.flyem import FlyemCrop, FlyemEndpoints, FlyemSource

    monkeypatch.delenv("NEUPRINT_TOKEN", raising=False)
    with DvidServer() as dvid:
        info = dvid.info()
        info["Extended"]["Values"] = [{"DataType": data_type, "Label": "labels"}]
        dvid.info_override = info
        source = FlyemSource(
            "crop", FlyemCrop((128, 0, 64), (64, 64, 64)), FlyemEndpoints(dvid_server=dvid.url)
        )
        with pytest.raises(FormatError) as exc:
            source.check(LOG)
    assert "/grayscale/info: " in str(exc.value) and says in str(exc.value)
