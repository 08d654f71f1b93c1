"""Buffer -> storage upload: a local folder and a real S3 endpoint (moto server on loopback, through s3fs).

Sends are counted where they leave: on S3 by a botocore hook on the s3fs client (every PutObject and
CreateMultipartUpload request), on a local folder by wrapping the file system's ``put_file``.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import zarr

from em_platform.storage.upload import (
    MANIFEST_NAME,
    ChecksumMismatch,
    UploadError,
    UploadIncomplete,
    abort_cleanup,
    file_checksum,
    free_buffer,
    upload_buffer,
    verify_upload,
)
from em_platform.tem.protocol import buffer_status


@dataclass
class Dest:
    url: str
    opts: dict[str, Any] | None
    verify: str
    fs: Any
    root: str

    def kw(self) -> dict[str, Any]:
        return {"storage_options": self.opts, "verify": self.verify}

    def path(self, key: str) -> str:
        return posixpath.join(self.root, key)

    def keys(self) -> set[str]:
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            return set()
        found = self.fs.find(self.root)
        return {p[len(self.root) + 1 :] for p in found} - {MANIFEST_NAME}

    def has_manifest(self) -> bool:
        self.fs.invalidate_cache(self.root)
        return self.fs.exists(self.path(MANIFEST_NAME))

    def corrupt(self, key: str) -> None:
        """Flip the first byte of a stored object (same size, other content)."""
        data = bytearray(self.fs.cat_file(self.path(key)))
        data[0] ^= 0xFF
        self.fs.pipe_file(self.path(key), bytes(data))


def _dest(url: str, opts: dict[str, Any] | None, verify: str) -> Dest:
    fs, root = fsspec.core.url_to_fs(url, **(opts or {}))  # the same cached instance the uploader uses
    return Dest(url, opts, verify, fs, root.rstrip("/"))


@pytest.fixture(params=["local", "s3", "s3-read"])
def dest(request, tmp_path) -> Dest:
    if request.param == "local":
        return _dest(str(tmp_path / "storage" / "montages" / "m1"), None, "auto")
    url, opts = request.getfixturevalue("s3_bucket")
    return _dest(f"{url}/montages/m1", opts, "read" if request.param == "s3-read" else "auto")


@pytest.fixture(params=["local", "s3"])
def dest2(request, tmp_path) -> Dest:
    """Local folder and S3 (ETag verification) only: for the tests where the read-back mode adds nothing."""
    if request.param == "local":
        return _dest(str(tmp_path / "storage" / "montages" / "m1"), None, "auto")
    url, opts = request.getfixturevalue("s3_bucket")
    return _dest(f"{url}/montages/m1", opts, "auto")


@pytest.fixture
def buffer(tmp_path) -> Path:
    """A montage's buffer: processed tiles, a small zarr pyramid (many chunk files) and metadata."""
    root = tmp_path / "buffer" / "m1"
    rng = np.random.default_rng(7)
    (root / "tiles").mkdir(parents=True)
    for i in range(8):
        (root / "tiles" / f"t{i:02d}.processed.tiff").write_bytes(
            rng.bytes(int(rng.integers(20_000, 60_000)))
        )
    arr = zarr.create_array(str(root / "pyramid.zarr"), shape=(64, 64), chunks=(16, 16), dtype="u1")
    arr[...] = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    (root / "metadata.json").write_text('{"montage_id": "m1"}')
    return root


def _local_keys(buffer: Path) -> set[str]:
    return {p.relative_to(buffer).as_posix() for p in buffer.rglob("*") if p.is_file()}


class Sends:
    """Objects sent to a destination, counted per key (the manifest is left out)."""

    def __init__(self, dest: Dest, monkeypatch):
        self.keys: Counter[str] = Counter()
        self._unregister = None
        protocols = dest.fs.protocol if isinstance(dest.fs.protocol, tuple) else (dest.fs.protocol,)
        if "s3" in protocols:
            prefix = dest.root.split("/", 1)[1] + "/"
            dest.fs.connect()  # the s3fs client, so the hook sees its requests

            def on_request(params, **_kw):
                if params["Key"].startswith(prefix):
                    self._count(params["Key"][len(prefix) :])

            events = dest.fs.s3.meta.events
            for op in ("PutObject", "CreateMultipartUpload"):
                events.register(f"before-parameter-build.s3.{op}", on_request)
            self._unregister = lambda: [
                events.unregister(f"before-parameter-build.s3.{op}", on_request)
                for op in ("PutObject", "CreateMultipartUpload")
            ]
        else:
            put = dest.fs.put_file

            def counting_put(lpath, rpath, **kw):
                self._count(rpath[len(dest.root) + 1 :])
                return put(lpath, rpath, **kw)

            monkeypatch.setattr(dest.fs, "put_file", counting_put)

    def _count(self, key: str) -> None:
        if key != MANIFEST_NAME:
            self.keys[key] += 1

    def close(self) -> None:
        if self._unregister:
            self._unregister()


@pytest.fixture
def sends(monkeypatch):
    opened: list[Sends] = []

    def start(dest: Dest) -> Sends:
        opened.append(Sends(dest, monkeypatch))
        return opened[-1]

    yield start
    for s in opened:
        s.close()


class Stop(Exception):
    pass


def _stop_after(n: int):
    def on_progress(p):
        if p.objects_done >= n:
            raise Stop(f"killed after {p.objects_done} objects")

    return on_progress


# -- round trip -----------------------------------------------------------------------------------------


def test_round_trip_verifies_every_object_and_writes_the_manifest_last(buffer, dest, sends):
    keys = _local_keys(buffer)
    assert len(keys) > 20  # tiles + zarr chunks + metadata
    counted = sends(dest)
    seen_manifest = []
    report = upload_buffer(
        buffer, dest.url, on_progress=lambda p: seen_manifest.append(dest.has_manifest()), **dest.kw()
    )

    assert set(report.sent) == keys and report.skipped == () and report.retried == ()
    assert counted.keys == Counter(dict.fromkeys(keys, 1))  # one send per object, nothing else
    assert seen_manifest and not any(seen_manifest)  # never there while objects were still going up
    assert dest.keys() == keys
    for key in keys:
        assert dest.fs.cat_file(dest.path(key)) == (buffer / key).read_bytes(), key
    objects = json.loads(dest.fs.cat_file(dest.path(MANIFEST_NAME)))["objects"]
    assert set(objects) == keys
    for key in keys:
        data = (buffer / key).read_bytes()
        assert objects[key]["md5"] == hashlib.md5(data).hexdigest() and objects[key]["size"] == len(data)
    audit = verify_upload(dest.url, **dest.kw())
    assert audit.ok and audit.objects_checked == len(keys) and audit.unexpected == ()


def test_a_subset_of_the_buffer_can_be_uploaded(buffer, dest2):
    report = upload_buffer(buffer, dest2.url, sources=["tiles", "metadata.json"], **dest2.kw())
    expected = {k for k in _local_keys(buffer) if k.startswith("tiles/")} | {"metadata.json"}
    assert set(report.sent) == expected and dest2.keys() == expected


# -- resume ---------------------------------------------------------------------------------------------


def _held_after(n: int, monkeypatch) -> threading.Event:
    """Sends after the first ``n`` wait until the returned event is set: the kill lands while they are in
    flight, however slowly the progress thread runs on a busy machine (else the pool may finish first)."""
    import em_platform.storage.upload as upload

    released, started, lock = threading.Event(), [0], threading.Lock()
    send = upload._Destination.send

    def held_send(self, obj, part_size):
        with lock:
            started[0] += 1
            hold = started[0] > n
        if hold:
            released.wait(60)
        return send(self, obj, part_size)

    monkeypatch.setattr(upload._Destination, "send", held_send)
    return released


def test_a_killed_upload_resumes_without_resending_finished_objects(buffer, dest, sends, monkeypatch):
    keys = _local_keys(buffer)
    released = _held_after(5, monkeypatch)
    stop = _stop_after(5)

    def kill(p):
        try:
            stop(p)
        except Stop:
            released.set()  # the sends in flight finish; the pool starts no other
            raise

    with pytest.raises(Stop):
        upload_buffer(buffer, dest.url, on_progress=kill, workers=4, **dest.kw())
    monkeypatch.undo()
    stored = dest.keys()
    assert 5 <= len(stored) < len(keys)  # the objects in flight finished; the rest were never started
    assert not dest.has_manifest()
    audit = verify_upload(dest.url, **dest.kw())
    assert not audit.ok and not audit.manifest_found and "never finished" in audit.summary()

    # one finished object is cut short, as by a crash in the middle of writing it
    truncated = sorted(stored)[0]
    data = dest.fs.cat_file(dest.path(truncated))
    dest.fs.pipe_file(dest.path(truncated), data[: len(data) // 2])

    counted = sends(dest)
    report = upload_buffer(buffer, dest.url, **dest.kw())
    resent = keys - stored | {truncated}
    assert set(counted.keys) == resent and max(counted.keys.values()) == 1
    assert set(report.sent) == resent and set(report.skipped) == stored - {truncated}
    assert verify_upload(dest.url, **dest.kw()).ok


def test_a_new_upload_over_a_complete_one_is_not_complete_until_it_finishes(buffer, dest2):
    upload_buffer(buffer, dest2.url, **dest2.kw())
    (buffer / "tiles" / "t00.processed.tiff").write_bytes(b"reprocessed")
    with pytest.raises(Stop):
        upload_buffer(buffer, dest2.url, on_progress=_stop_after(1), **dest2.kw())
    assert not dest2.has_manifest()  # the old manifest went before anything changed
    assert not verify_upload(dest2.url, **dest2.kw()).ok


def test_a_complete_upload_run_again_sends_nothing(buffer, dest2, sends):
    upload_buffer(buffer, dest2.url, **dest2.kw())
    counted = sends(dest2)
    report = upload_buffer(buffer, dest2.url, **dest2.kw())
    assert not counted.keys and report.sent == () and len(report.skipped) == len(_local_keys(buffer))
    assert dest2.has_manifest()


# -- corruption -----------------------------------------------------------------------------------------


def test_corrupted_and_missing_objects_are_reported_and_resent(buffer, dest, sends):
    upload_buffer(buffer, dest.url, **dest.kw())
    chunks = sorted(k for k in _local_keys(buffer) if k.startswith("pyramid.zarr/c/"))
    corrupted, missing = chunks[0], "tiles/t03.processed.tiff"
    dest.corrupt(corrupted)
    dest.fs.rm(dest.path(missing))
    dest.fs.pipe_file(dest.path("stray.bin"), b"x")

    audit = verify_upload(dest.url, **dest.kw())
    assert not audit.ok
    assert (
        audit.corrupted == (corrupted,) and audit.missing == (missing,) and audit.unexpected == ("stray.bin",)
    )
    assert corrupted in audit.summary() and missing in audit.summary()

    counted = sends(dest)
    report = upload_buffer(buffer, dest.url, **dest.kw())
    assert set(counted.keys) == {corrupted, missing} and set(report.sent) == {corrupted, missing}
    assert verify_upload(dest.url, **dest.kw()).ok


def _corrupting_put(monkeypatch, dest: Dest, target: str, times: int, tmp_path: Path) -> Counter[str]:
    """Make the file system store a damaged copy of ``target`` the first ``times`` times it is sent."""
    put, attempts = dest.fs.put_file, Counter()

    def put_file(lpath, rpath, **kw):
        key = rpath[len(dest.root) + 1 :]
        attempts[key] += 1
        if key == target and attempts[key] <= times:
            bad = tmp_path / f"damaged-{attempts[key]}"
            data = bytearray(Path(lpath).read_bytes())
            data[len(data) // 2] ^= 0x01
            bad.write_bytes(bytes(data))
            lpath = str(bad)
        return put(lpath, rpath, **kw)

    monkeypatch.setattr(dest.fs, "put_file", put_file)
    return attempts


def test_a_checksum_mismatch_is_retried_once_then_raised_naming_the_object(
    buffer, dest, monkeypatch, tmp_path
):
    target = "tiles/t05.processed.tiff"
    attempts = _corrupting_put(monkeypatch, dest, target, times=2, tmp_path=tmp_path)
    with pytest.raises(ChecksumMismatch, match=r"tiles/t05\.processed\.tiff") as err:
        upload_buffer(buffer, dest.url, **dest.kw())
    assert err.value.keys == (target,)
    assert attempts[target] == 2  # sent, found wrong, sent once more, still wrong
    assert not dest.has_manifest()
    assert not verify_upload(dest.url, **dest.kw()).ok


def test_a_transient_mismatch_is_cured_by_the_retry(buffer, dest2, monkeypatch, tmp_path):
    target = "metadata.json"
    attempts = _corrupting_put(monkeypatch, dest2, target, times=1, tmp_path=tmp_path)
    report = upload_buffer(buffer, dest2.url, **dest2.kw())
    assert report.retried == (target,) and attempts[target] == 2
    assert verify_upload(dest2.url, **dest2.kw()).ok


def test_multipart_objects_are_verified_by_their_etag(tmp_path, s3_bucket, sends):
    url, opts = s3_bucket
    d = _dest(f"{url}/montages/big", opts, "auto")
    buf = tmp_path / "big"
    buf.mkdir()
    (buf / "fused.raw").write_bytes(np.random.default_rng(1).bytes(12 * 2**20 + 123))
    part = 5 * 2**20
    upload_buffer(buf, d.url, storage_options=opts, part_size=part)
    d.fs.invalidate_cache(d.root)
    etag = d.fs.info(d.path("fused.raw"))["ETag"].strip('"')
    assert etag.endswith("-3")  # s3fs sent three parts
    assert etag == file_checksum(buf / "fused.raw", part).multipart_etag
    counted = sends(d)
    assert upload_buffer(buf, d.url, storage_options=opts, part_size=part).sent == ()
    assert not counted.keys
    d.corrupt("fused.raw")
    assert verify_upload(d.url, storage_options=opts).corrupted == ("fused.raw",)


def test_file_checksum_matches_hashlib(tmp_path):
    data = np.random.default_rng(3).bytes(11 * 2**20)
    (tmp_path / "f").write_bytes(data)
    part = 5 * 2**20
    c = file_checksum(tmp_path / "f", part)
    digests = b"".join(hashlib.md5(data[i : i + part]).digest() for i in range(0, len(data), part))
    assert c.size == len(data) and c.md5 == hashlib.md5(data).hexdigest()
    assert c.multipart_etag == f"{hashlib.md5(digests).hexdigest()}-3"
    assert c.matches_etag(f'"{c.md5}"') and c.matches_etag(c.multipart_etag)
    assert not c.matches_etag(f"{c.md5}-3")


# -- progress and buffer.status ---------------------------------------------------------------------------


def test_progress_becomes_buffer_status_messages(buffer, dest2):
    total = sum(p.stat().st_size for p in buffer.rglob("*") if p.is_file())
    seen = []
    upload_buffer(buffer, dest2.url, workers=2, on_progress=seen.append, **dest2.kw())
    messages = [buffer_status(p.objects_left, p.free_space, p.upload_rate_bits_per_s) for p in seen]
    queue = [m["queue_length"] for m in messages]
    assert queue == list(range(len(seen) - 1, -1, -1))  # one report per object, counting down to 0
    assert seen[-1].bytes_done == seen[-1].bytes_sent == total
    assert all(m["free_space"] > 0 and m["upload_rate"] >= 0 for m in messages)
    assert messages[-1]["upload_rate"] == round(8 * total / seen[-1].elapsed_s)
    assert messages[-1]["upload_rate"] > 0


# -- freeing the buffer and aborting ---------------------------------------------------------------------


def test_free_buffer_only_after_the_upload_verifies(buffer, dest2):
    before = _local_keys(buffer)
    with pytest.raises(UploadIncomplete, match="never finished"):
        free_buffer(buffer, dest2.url, **dest2.kw())
    assert _local_keys(buffer) == before

    upload_buffer(buffer, dest2.url, **dest2.kw())
    dest2.corrupt("metadata.json")
    with pytest.raises(UploadIncomplete, match="metadata.json"):
        free_buffer(buffer, dest2.url, **dest2.kw())
    assert _local_keys(buffer) == before

    upload_buffer(buffer, dest2.url, **dest2.kw())
    (buffer / "tiles" / "late.processed.tiff").write_bytes(b"not uploaded")
    total = sum((buffer / k).stat().st_size for k in before)
    assert free_buffer(buffer, dest2.url, **dest2.kw()) == total
    assert _local_keys(buffer) == {"tiles/late.processed.tiff"}  # only what the manifest does not list
    assert not (buffer / "pyramid.zarr").exists()  # emptied folders go too
    assert verify_upload(dest2.url, **dest2.kw()).ok  # storage untouched


def test_free_buffer_refuses_when_a_buffer_file_changed_since_the_upload(buffer, dest2):
    upload_buffer(buffer, dest2.url, **dest2.kw())
    (buffer / "metadata.json").write_text('{"montage_id": "m1", "reprocessed": true}')
    with pytest.raises(UploadIncomplete, match="changed since the upload"):
        free_buffer(buffer, dest2.url, **dest2.kw())
    assert (buffer / "tiles" / "t00.processed.tiff").exists()


def test_abort_cleanup_removes_the_buffer_and_the_partial_destination(buffer, dest2):
    n_local = len(_local_keys(buffer))
    with pytest.raises(Stop):
        upload_buffer(buffer, dest2.url, on_progress=_stop_after(3), **dest2.kw())
    partial = dest2.keys()
    assert partial
    result = abort_cleanup(buffer, dest2.url, storage_options=dest2.opts)
    assert result.local_files == n_local and result.remote_objects == len(partial)
    assert not buffer.exists() and dest2.keys() == set()
    assert abort_cleanup(buffer, dest2.url, storage_options=dest2.opts).remote_objects == 0  # idempotent


def test_abort_cleanup_refuses_a_storage_root(tmp_path, s3_bucket):
    url, opts = s3_bucket
    with pytest.raises(ValueError, match="refusing"):
        abort_cleanup(tmp_path / "b", url, storage_options=opts)


# -- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_is_named(buffer, tmp_path):
    dest = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="upload buffer"):
        upload_buffer(tmp_path / "nope", dest)
    with pytest.raises(FileNotFoundError, match="fused.zarr"):
        upload_buffer(buffer, dest, sources=["fused.zarr"])
    with pytest.raises(ValueError, match="outside the upload buffer"):
        upload_buffer(buffer, dest, sources=["../../.."])
    with pytest.raises(ValueError, match="verify='etag' needs an S3"):
        upload_buffer(buffer, dest, verify="etag")
    with pytest.raises(ValueError, match="minimum part"):
        upload_buffer(buffer, dest, part_size=2**20)
    (buffer / MANIFEST_NAME).write_text("{}")
    with pytest.raises(ValueError, match="manifest name"):
        upload_buffer(buffer, dest)
    os.remove(buffer / MANIFEST_NAME)
    Path(dest).mkdir()
    (Path(dest) / MANIFEST_NAME).write_text("not json")
    with pytest.raises(UploadError, match="not valid JSON"):
        verify_upload(dest)


def test_an_s3_error_names_the_object(buffer, s3_endpoint):
    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}, "key": "testing", "secret": "testing"}
    with pytest.raises(UploadError, match=r"s3://no-such-bucket-em/m1/\S+.*run the upload again"):
        upload_buffer(buffer, "s3://no-such-bucket-em/m1", storage_options=opts, workers=1)
