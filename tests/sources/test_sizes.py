"""Servers that lie about sizes, on loopback: a Content-Length of 10¹⁷ with byte ranges, a body longer than
anything announced, a JSON document of 80 MiB, an N5 block that inflates 512-fold, a block object far larger
than its block. Each is refused naming the URL, the field, the value and the bound, after reading no more than
the bound (Python's peak allocation is measured), and nothing is preallocated from the lie."""

from __future__ import annotations

import gzip
import json
import struct

import fsspec
import numpy as np
import pytest

from em_platform.formats import FormatError
from em_platform.sources import n5
from em_platform.sources.download import DownloadOptions, download, get_json, stat_remote
from em_platform.sources.dvid import DvidClient
from em_platform.sources.manifest import DownloadManifest
from em_platform.sources.retry import PermanentSourceError
from tests.sources.conftest import FAST
from tests.support.lying_http import Answer, LyingHttpServer, endless, json_array_of
from tests.support.memory import peak_memory

MiB = 2**20


@pytest.fixture
def liar():
    with LyingHttpServer() as server:
        yield server


def _manifest(tmp_path):
    return DownloadManifest(tmp_path / "work", "v1")


# -- downloads ---------------------------------------------------------------------------------------------


def test_a_content_length_of_1e17_with_byte_ranges_is_refused_before_any_part(tmp_path, liar, quiet_log):
    """The ranged downloader once listed its 1.5·10⁹ parts first (6.8 s, then a MemoryError)."""
    liar.answer("HEAD", "/big.mrc", Answer(200, {"Content-Length": str(10**17), "Accept-Ranges": "bytes"}))
    url = liar.url_for("big.mrc")
    m = _manifest(tmp_path)
    with peak_memory() as peak, pytest.raises(PermanentSourceError) as exc:
        download(
            url,
            m.folder / "big.mrc",
            manifest=m,
            options=DownloadOptions(policy=FAST.policy),
            logger=quiet_log,
        )
    msg = str(exc.value)
    assert url in msg and "Content-Length" in msg and str(10**17) in msg and str(2**40) in msg
    assert [method for method, _, _ in liar.log] == ["HEAD"]  # no ranged GET was planned or sent
    assert not (m.folder / "big.mrc.part").exists()  # nothing preallocated
    assert peak["bytes"] < 4 * MiB


@pytest.mark.parametrize("length", ["1e17", "-5", "lots"])
def test_a_content_length_that_is_not_a_size_is_refused(liar, length, quiet_log):
    liar.answer("HEAD", "/f.bin", Answer(200, {"Content-Length": length}))
    with pytest.raises(PermanentSourceError, match=r"f\.bin: Content-Length .* refused"):
        stat_remote(liar.url_for("f.bin"), options=DownloadOptions(policy=FAST.policy), logger=quiet_log)


def test_a_body_longer_than_the_bound_stops_at_the_bound(tmp_path, liar, quiet_log):
    """No size announced, then 8 MiB sent where the source allows 1 MiB: the stream stops at the bound."""
    liar.answer("HEAD", "/f.bin", Answer(200, {}))
    liar.answer("GET", "/f.bin", Answer(200, {}, json_array_of(8 * MiB)))
    m = _manifest(tmp_path)
    opts = DownloadOptions(policy=FAST.policy, max_file_bytes=MiB, chunk_bytes=64 * 1024)
    with pytest.raises(
        PermanentSourceError, match=r"f\.bin: body longer than 1048576 bytes refused: max_file_bytes"
    ):
        download(liar.url_for("f.bin"), m.folder / "f.bin", manifest=m, options=opts, logger=quiet_log)
    assert (m.folder / "f.bin.part").stat().st_size <= MiB
    assert not (m.folder / "f.bin").exists() and m.get("f.bin") is None


def test_a_size_past_max_file_bytes_is_refused_even_when_the_listing_agrees(tmp_path, liar, quiet_log):
    liar.answer("HEAD", "/f.bin", Answer(200, {"Content-Length": str(3 * MiB), "Accept-Ranges": "bytes"}))
    m = _manifest(tmp_path)
    opts = DownloadOptions(policy=FAST.policy, max_file_bytes=MiB)
    with pytest.raises(PermanentSourceError, match=r"Content-Length 3145728 refused: more than the 1048576"):
        download(
            liar.url_for("f.bin"),
            m.folder / "f.bin",
            manifest=m,
            expected_size=3 * MiB,
            options=opts,
            logger=quiet_log,
        )
    assert [method for method, _, _ in liar.log] == ["HEAD"]


# -- JSON documents ----------------------------------------------------------------------------------------


def test_a_json_body_announced_past_the_bound_is_refused_unread(liar, quiet_log):
    liar.answer("GET", "/api/entry", Answer(200, {"Content-Length": str(80 * MiB)}, json_array_of(80 * MiB)))
    url = liar.url_for("api/entry")
    with peak_memory() as peak, pytest.raises(PermanentSourceError) as exc:
        get_json(url, options=DownloadOptions(policy=FAST.policy), logger=quiet_log)
    assert (
        url in str(exc.value)
        and "Content-Length 83886080" in str(exc.value)
        and str(64 * MiB) in str(exc.value)
    )
    assert peak["bytes"] < 4 * MiB


def test_a_chunked_json_body_is_read_only_up_to_the_bound(liar, quiet_log):
    """80 MiB of valid JSON, sent chunked (no length): read to 64 MiB + 1 byte, then refused."""
    liar.answer("GET", "/api/entry", Answer(200, {}, json_array_of(80 * MiB)))
    url = liar.url_for("api/entry")
    with peak_memory() as peak, pytest.raises(PermanentSourceError) as exc:
        get_json(url, options=DownloadOptions(policy=FAST.policy), logger=quiet_log)
    assert url in str(exc.value) and f"body of more than {64 * MiB} bytes refused" in str(exc.value)
    assert peak["bytes"] < 100 * MiB  # the 64 MiB read, not the 80 MiB document or its parsed list


def test_a_dvid_info_that_never_ends_is_refused(liar):
    liar.answer("GET", "/api/node/abc/grayscale/info", Answer(200, {}, endless(b'{"Base": "' + b"x" * 65526)))
    client = DvidClient(liar.url_for(""), "abc", "grayscale")
    with (
        peak_memory() as peak,
        pytest.raises(PermanentSourceError, match=r"/info: body of more than 67108864 bytes"),
    ):
        client.info()
    assert peak["bytes"] < 100 * MiB


# -- N5 blocks over HTTP -----------------------------------------------------------------------------------

BLOCK = [64, 64, 64]  # x, y, z: a 256 KiB uint8 block


def _n5_array(root, compression: dict, block_size=BLOCK) -> None:
    (root / "arr").mkdir(parents=True)
    attrs = {
        "dimensions": [128, 128, 128],
        "blockSize": block_size,
        "dataType": "uint8",
        "compression": compression,
    }
    (root / "arr" / "attributes.json").write_text(json.dumps(attrs))


def _block(root, payload: bytes, dims=BLOCK) -> None:
    (root / "arr" / "0" / "0").mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HH", 0, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    (root / "arr" / "0" / "0" / "0").write_bytes(header + payload)


def test_an_n5_decompression_bomb_is_refused_at_the_blocks_size(http_files):
    """A 64³ uint8 block whose gzip payload inflates to 128 MiB (512×): decompressed to 256 KiB + 1, refused."""
    _n5_array(http_files.root, {"type": "gzip"})
    _block(http_files.root, gzip.compress(bytes(128 * MiB)))
    arr = n5.N5Array(fsspec.filesystem("http"), http_files.url_for("arr"))
    with peak_memory() as peak, pytest.raises(FormatError) as exc:
        arr.read_block((0, 0, 0))
    assert "arr/0/0/0" in str(exc.value) and "more than the 262144 bytes its header states" in str(exc.value)
    assert peak["bytes"] < 8 * MiB


def test_an_n5_block_object_larger_than_any_encoding_of_its_block_is_refused_unread(http_files):
    _n5_array(http_files.root, {"type": "raw"})
    _block(http_files.root, bytes(16 * MiB))
    arr = n5.N5Array(fsspec.filesystem("http"), http_files.url_for("arr"))
    with peak_memory() as peak, pytest.raises(FormatError, match=r"arr/0/0/0: N5 block object of more than"):
        arr.read_block((0, 0, 0))
    assert [r.range for r in http_files.requests_for("arr/0/0/0")] == ["bytes=0-270408"]  # the bound + 1
    assert peak["bytes"] < 8 * MiB


def test_an_n5_header_claiming_more_elements_than_its_block_is_refused(http_files):
    _n5_array(http_files.root, {"type": "gzip"})
    _block(http_files.root, gzip.compress(bytes(64)), dims=[2**16, 2**16, 2**16])
    arr = n5.N5Array(fsspec.filesystem("http"), http_files.url_for("arr"))
    with pytest.raises(
        FormatError, match=r"claims 281474976710656 elements .* more than blockSize \[64, 64, 64\]"
    ):
        arr.read_block((0, 0, 0))


@pytest.mark.parametrize(
    "block_size, says",
    [([2**20, 2**20, 2**20], "more than the 2147483647 one chunk may have"), ([64, 0, 64], "≥ 1")],
)
def test_n5_attributes_with_impossible_blocks_are_refused_at_open(http_files, block_size, says):
    _n5_array(http_files.root, {"type": "raw"}, block_size=block_size)
    with pytest.raises(FormatError, match=says):
        n5.N5Array(fsspec.filesystem("http"), http_files.url_for("arr"))


def test_honest_n5_blocks_still_read(http_files):
    _n5_array(http_files.root, {"type": "gzip"})
    data = np.arange(64**3, dtype=np.uint32).astype(np.uint8)
    _block(http_files.root, gzip.compress(data.tobytes()))
    arr = n5.N5Array(fsspec.filesystem("http"), http_files.url_for("arr"))
    np.testing.assert_array_equal(arr.read_block((0, 0, 0)).ravel(), data)
