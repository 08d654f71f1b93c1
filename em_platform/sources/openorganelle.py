"""OpenOrganelle (Janelia COSEM): one level, or a crop of it, of a Zarr v2 or N5 multiscale on public S3.

Read anonymously through s3fs, one stored chunk object at a time (several in flight), into a local Zarr
cache laid out on the source's chunk grid; each chunk is entered in the manifest once written, so an
interrupted run resumes with the missing chunks only, and memory stays at (parallel × chunk) whatever the
level's size (s0 of jrc_mus-nacc-2 is 7 GB). The voxel size is the multiscale metadata's, in nm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from em_platform.formats import FormatError, Volume
from em_platform.sources.chunked import ChunkedArray, open_chunked
from em_platform.sources.dataset import FetchedVolume, RemoteVersion, Source, SourceFile
from em_platform.sources.manifest import DownloadManifest, ManifestEntry
from em_platform.sources.progress import Progress
from em_platform.sources.retry import PermanentSourceError, RetryPolicy, SourceError, retrying

CACHE = "level.zarr"


@dataclass(frozen=True)
class CosemLevel:
    dataset: str  # e.g. jrc_mus-nacc-2
    group: str  # path inside the container, e.g. recon-2/em/fibsem-int16
    level: str  # s0 (full resolution) … s8
    description: str
    crop_offset_zyx: tuple[int, int, int] | None = None  # None: the whole level
    crop_size_zyx: tuple[int, int, int] | None = None
    modality: str = "FIB-SEM"


_NACC = "mouse nucleus accumbens (jrc_mus-nacc-2), FIB-SEM, OpenOrganelle"
DATASETS = {
    # s3 is 70 × 315 × 324 voxels (14 MB): what a scheduled re-check fetches by default.
    "jrc_mus-nacc-2/fibsem-int16/s3": CosemLevel(
        "jrc_mus-nacc-2", "recon-2/em/fibsem-int16", "s3", f"{_NACC}, level s3"
    ),
    "jrc_mus-nacc-2/fibsem-int16/s2": CosemLevel(
        "jrc_mus-nacc-2", "recon-2/em/fibsem-int16", "s2", f"{_NACC}, level s2"
    ),
    # a full-resolution 256 × 1024 × 1024 crop from the middle of s0 (512 MB of the level's 7 GB)
    "jrc_mus-nacc-2/fibsem-int16/s0-centre-crop": CosemLevel(
        "jrc_mus-nacc-2",
        "recon-2/em/fibsem-int16",
        "s0",
        f"{_NACC}, 256 × 1024 × 1024 crop of level s0",
        crop_offset_zyx=(154, 748, 786),
        crop_size_zyx=(256, 1024, 1024),
    ),
}


@dataclass(frozen=True)
class OpenOrganelleEndpoints:
    bucket: str = "janelia-cosem-datasets"
    endpoint_url: str = ""  # empty: AWS S3; else an S3-compatible endpoint (a mirror, MinIO)
    region: str = "us-east-1"
    anonymous: bool = True  # the bucket is public; set False to use the usual AWS credentials
    container_format: str = "zarr"  # "zarr" (<dataset>.zarr) or "n5" (<dataset>.n5)
    parallel: int = 8  # chunk objects in flight
    max_level_gib: float = (
        16.0  # refuse a level or crop bigger than this (a typo in a crop must not pull 7 GB)
    )
    retry_attempts: int = 6
    retry_base_delay_s: float = 1.0

    def validate(self) -> None:
        if not self.bucket or "/" in self.bucket:
            raise ValueError(f"bucket must be a bucket name (no '/'), not {self.bucket!r}")
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url must be an http(s):// URL or empty, not {self.endpoint_url!r}")
        if self.container_format not in ("zarr", "n5"):
            raise ValueError(f"container_format must be 'zarr' or 'n5', not {self.container_format!r}")
        if not 1 <= self.parallel <= 64:
            raise ValueError(f"parallel must be between 1 and 64, not {self.parallel}")
        if self.max_level_gib <= 0:
            raise ValueError(f"max_level_gib must be positive, not {self.max_level_gib}")
        if self.retry_attempts < 1 or self.retry_base_delay_s < 0:
            raise ValueError("retry_attempts must be ≥ 1 and retry_base_delay_s ≥ 0")

    def filesystem(self):
        import s3fs

        client_kwargs: dict[str, Any] = {"region_name": self.region}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        return s3fs.S3FileSystem(anon=self.anonymous, client_kwargs=client_kwargs, skip_instance_cache=True)

    def policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.retry_attempts, base_delay_s=self.retry_base_delay_s)


def make_source(key: str, endpoints: OpenOrganelleEndpoints | None = None) -> OpenOrganelleSource:
    if key not in DATASETS:
        raise ValueError(f"unknown OpenOrganelle dataset {key!r}; known: {', '.join(sorted(DATASETS))}")
    return OpenOrganelleSource(key, DATASETS[key], endpoints or OpenOrganelleEndpoints())


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError | PermissionError)


class OpenOrganelleSource(Source):
    name = "openorganelle"

    def __init__(self, key: str, spec: CosemLevel, endpoints: OpenOrganelleEndpoints):
        self.key = key
        self.spec = spec
        self.endpoints = endpoints
        self.container = f"{spec.dataset}/{spec.dataset}.{endpoints.container_format}"
        self.group_path = posixpath.join(endpoints.bucket, self.container, spec.group)
        self.array_path = posixpath.join(self.group_path, spec.level)
        self._fs = None

    @property
    def source_id(self) -> str:
        return self.key

    @property
    def fs(self):
        if self._fs is None:
            self._fs = self.endpoints.filesystem()
        return self._fs

    def url(self, path: str) -> str:
        return f"s3://{path}"

    def _open(self, logger) -> ChunkedArray:
        def attempt() -> ChunkedArray:
            try:
                return open_chunked(self.fs, self.array_path)
            except FileNotFoundError:
                raise PermanentSourceError(
                    f"{self.url(self.array_path)}: no Zarr v2 or N5 array there; check the dataset, group, level "
                    "and container_format (and endpoint_url for a mirror)",
                    url=self.url(self.array_path),
                ) from None

        return retrying(
            attempt,
            what=f"open {self.url(self.array_path)}",
            policy=self.endpoints.policy(),
            transient=_transient,
            logger=logger,
        )

    def _crop(self, arr: ChunkedArray) -> tuple[tuple[int, ...], tuple[int, ...]]:
        offset = self.spec.crop_offset_zyx or (0,) * len(arr.shape)
        size = self.spec.crop_size_zyx or tuple(n - o for n, o in zip(arr.shape, offset, strict=True))
        if len(offset) != len(arr.shape) or any(
            o < 0 or s < 1 or o + s > n for o, s, n in zip(offset, size, arr.shape, strict=True)
        ):
            raise PermanentSourceError(
                f"{self.url(self.array_path)}: crop at z,y,x {tuple(offset)} of size {tuple(size)} does not fit the "
                f"level's shape {arr.shape}",
                url=self.url(self.array_path),
            )
        return tuple(offset), tuple(size)

    def voxel_size_nm(self, arr: ChunkedArray) -> dict[str, float]:
        return cosem_voxel_size(arr, self._group_attributes(), self.spec.level, self.url(self.array_path))

    def _group_attributes(self) -> dict[str, Any]:
        for name in (".zattrs", "attributes.json"):
            p = posixpath.join(self.group_path, name)
            if self.fs.exists(p):
                return json.loads(self.fs.cat(p))
        return {}

    def check(self, logger: logging.Logger | logging.LoggerAdapter) -> RemoteVersion:
        arr = self._open(logger)
        offset, size = self._crop(arr)
        nbytes = int(np.prod(size)) * arr.dtype.itemsize
        if nbytes > self.endpoints.max_level_gib * 2**30:
            raise PermanentSourceError(
                f"{self.url(self.array_path)}: {nbytes / 2**30:.1f} GiB is more than max_level_gib "
                f"({self.endpoints.max_level_gib}); raise it in the run config if this is intended",
                url=self.url(self.array_path),
            )
        voxel = self.voxel_size_nm(arr)
        meta = {
            "format": arr.format,
            "shape": list(arr.shape),
            "chunks": list(arr.chunks),
            "dtype": arr.dtype.str,
            "crop_offset_zyx": list(offset),
            "crop_size_zyx": list(size),
            "array_attributes": arr.attributes or {},
        }
        fingerprint = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
        return RemoteVersion(
            fingerprint=fingerprint,
            description=self.spec.description,
            source_urls=(self.url(self.array_path),),
            additional_metadata={
                "openorganelle": {
                    "container": self.url(posixpath.join(self.endpoints.bucket, self.container)),
                    "group": self.spec.group,
                    "level": self.spec.level,
                    **meta,
                    "voxel_size_nm": voxel,
                    "dimensions_nm": [n * voxel[a] for n, a in zip(size, "zyx", strict=True)],
                    "multiscale_attributes": self._group_attributes(),
                }
            },
            total_bytes=nbytes,
        )

    def fetch(
        self,
        workdir: Path,
        manifest: DownloadManifest,
        version: RemoteVersion,
        logger: logging.Logger | logging.LoggerAdapter,
    ) -> FetchedVolume:
        arr = self._open(logger)
        offset, size = self._crop(arr)
        first = tuple(o // c for o, c in zip(offset, arr.chunks, strict=True))
        last = tuple((o + s - 1) // c for o, s, c in zip(offset, size, arr.chunks, strict=True))
        indices = list(product(*(range(a, b + 1) for a, b in zip(first, last, strict=True))))
        origin = tuple(i * c for i, c in zip(first, arr.chunks, strict=True))
        box = tuple(
            min(n, (b + 1) * c) - o for n, b, c, o in zip(arr.shape, last, arr.chunks, origin, strict=True)
        )
        cache = self._cache(workdir / CACHE, box, arr, manifest, logger)
        progress = Progress(
            f"OpenOrganelle {self.key}", len(indices) * int(np.prod(arr.chunks)) * arr.dtype.itemsize, logger
        )
        digests: dict[tuple[int, ...], ManifestEntry] = {}
        todo = []
        for idx in indices:
            done = manifest.get(_key(idx))
            if done:
                digests[idx] = done
                progress.add(done.extra.get("voxel_bytes", 0))
            else:
                todo.append(idx)
        if digests:
            logger.info("resuming %s: %d of %d chunks already here", self.key, len(digests), len(indices))
        lock = threading.Lock()
        local = threading.local()

        def fs():
            if not hasattr(local, "fs"):
                local.fs = self.endpoints.filesystem()
            return local.fs

        def one(idx: tuple[int, ...]) -> None:
            key = arr.key(idx)

            def read() -> bytes | None:
                try:
                    return fs().cat(key)
                except FileNotFoundError:
                    return None  # a chunk never written: the fill value

            raw = retrying(
                read,
                what=f"GET {self.url(key)}",
                policy=self.endpoints.policy(),
                transient=_transient,
                logger=logger,
            )
            block = arr.decode(raw, idx)
            region = tuple(
                slice(s.start - o, s.stop - o) for s, o in zip(arr.region(idx), origin, strict=True)
            )
            cache[region] = block
            entry = ManifestEntry(
                key=_key(idx),
                url=self.url(key),
                size_bytes=len(raw) if raw is not None else 0,
                sha256=hashlib.sha256(raw or b"").hexdigest(),
                extra={"voxel_bytes": block.nbytes, "missing": raw is None},
            )
            manifest.add(entry)
            with lock:
                digests[idx] = entry
            progress.add(block.nbytes)

        with ThreadPoolExecutor(max_workers=self.endpoints.parallel, thread_name_prefix="cosem") as pool:
            futures = [pool.submit(one, idx) for idx in todo]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                for f in futures:
                    f.cancel()
                raise failed[0].exception()
        progress.finish()
        crop = tuple(slice(o - g, o - g + s) for o, g, s in zip(offset, origin, size, strict=True))
        data = da.from_zarr(str(workdir / CACHE))[crop]
        voxel = self.voxel_size_nm(arr)
        ordered = [digests[i] for i in indices]
        combined = hashlib.sha256("".join(f"{e.sha256}  {e.key}\n" for e in ordered).encode()).hexdigest()
        vol = Volume(
            data=data,
            axes=("z", "y", "x"),
            scale=(voxel["z"], voxel["y"], voxel["x"]),
            units=("nanometer",) * 3,
            format=f"openorganelle-{arr.format}",
            source_files=(),
        )
        return FetchedVolume(
            volume=vol,
            voxel_size_source="header",
            files=(
                SourceFile(
                    path=posixpath.join(self.container, self.spec.group, self.spec.level),
                    url=self.url(self.array_path),
                    size_bytes=sum(e.size_bytes for e in ordered),
                    sha256=combined,
                ),
            ),
            modality=self.spec.modality,
            header={"chunks": list(arr.chunks), "format": arr.format, "stored_dtype": arr.dtype.str},
        )

    def _cache(self, path: Path, box, arr: ChunkedArray, manifest: DownloadManifest, logger) -> zarr.Array:
        """The local copy on the source's chunk grid (one source chunk = one cache chunk: no shared writes)."""
        dtype = arr.dtype.newbyteorder("=")
        if path.exists():
            cache = zarr.open_array(str(path), mode="r+")
            if cache.shape == tuple(box) and cache.chunks == tuple(arr.chunks) and cache.dtype == dtype:
                return cache
            logger.warning("the download cache %s does not match the level; starting it again", path)
            manifest.reset()
        return zarr.create_array(
            str(path),
            shape=box,
            chunks=arr.chunks,
            dtype=dtype,
            fill_value=0,
            overwrite=True,
            compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=1),
        )


def _key(idx: tuple[int, ...]) -> str:
    return "c" + "_".join(str(i) for i in idx)


def cosem_voxel_size(
    arr: ChunkedArray, group_attrs: dict[str, Any], level: str, url: str
) -> dict[str, float]:
    """The level's voxel size in nm from COSEM metadata: the array's N5 ``transform`` / ``pixelResolution``,
    else the group's NGFF ``multiscales`` (Zarr) or COSEM ``multiscales`` (N5)."""
    attrs = arr.attributes or {}
    transform = attrs.get("transform")
    if transform and "scale" in transform:
        return _to_nm(
            dict(zip(transform["axes"], transform["scale"], strict=True)), transform.get("units"), url
        )
    res = attrs.get("pixelResolution")
    if res and "dimensions" in res:
        return _to_nm(dict(zip("xyz", res["dimensions"], strict=False)), [res.get("unit", "nm")] * 3, url)
    for ms in group_attrs.get("multiscales", []):
        axes = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", ["z", "y", "x"])]
        units = [a.get("unit") if isinstance(a, dict) else None for a in ms.get("axes", [])] or None
        for ds in ms.get("datasets", []):
            if ds.get("path") != level:
                continue
            if "transform" in ds:
                t = ds["transform"]
                return _to_nm(dict(zip(t["axes"], t["scale"], strict=True)), t.get("units"), url)
            for ct in ds.get("coordinateTransformations", []):
                if ct.get("type") == "scale":
                    return _to_nm(dict(zip(axes, ct["scale"], strict=True)), units, url)
    raise SourceError(
        f"{url}: no voxel size in its multiscale metadata (transform, pixelResolution or multiscales)",
        url=url,
    )


_NM = {"nm": 1.0, "nanometer": 1.0, "um": 1e3, "micrometer": 1e3, "µm": 1e3, "angstrom": 0.1, None: 1.0}


def _to_nm(scale: dict[str, float], units, url: str) -> dict[str, float]:
    units = list(units) if units else [None] * len(scale)
    out = {}
    for (axis, value), unit in zip(scale.items(), units, strict=False):
        if unit not in _NM:
            raise SourceError(f"{url}: unknown unit {unit!r} in its multiscale metadata", url=url)
        out[axis] = float(value) * _NM[unit]
    if set(out) != {"z", "y", "x"}:
        raise FormatError(f"{url}: multiscale axes {sorted(out)} are not z, y, x")
    return out
