"""OpenOrganelle (Janelia COSEM): one level, or a crop of it, of a Zarr v2 or N5 multiscale on public S3.

Read anonymously through s3fs one stored chunk object at a time (several in flight):
:mod:`em_platform.sources.zarr_v2` reads and decodes the Zarr v2 chunks, :mod:`em_platform.sources.n5` the
N5 blocks, each checking the array's dtype and bounding every chunk before it is decompressed. Each chunk
goes into a local Zarr cache laid out on the source's chunk grid and is entered in the manifest (with the
sha256 of the object as received) only once written, so an interrupted run resumes with the missing
chunks only, and memory stays at about (parallel × chunk) whatever the level's size (s0 of
jrc_mus-nacc-2 is 7 GB). The voxel size is the multiscale metadata's, in nm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from em_platform.formats import FormatError, Volume
from em_platform.lazy_import import LazyModule
from em_platform.sources import n5, zarr_v2
from em_platform.sources.bounds import MAX_METADATA_BYTES, cat_limited
from em_platform.sources.dataset import FetchedVolume, RemoteVersion, Source, SourceFile
from em_platform.sources.endpoints import check_retries, check_url
from em_platform.sources.manifest import DownloadManifest, ManifestEntry
from em_platform.sources.progress import Progress
from em_platform.sources.retry import PermanentSourceError, RetryPolicy, SourceError, retrying

if TYPE_CHECKING:  # the modules themselves for the type checker; at run time each is imported on first use
    import dask.array as da
    import zarr
    import zarr.codecs
else:
    da = LazyModule("dask.array")
    zarr = LazyModule("zarr")

CACHE = "level.zarr"
FORMATS = {".zarr": "zarr", ".n5": "n5"}


@dataclass(frozen=True)
class CosemLevel:
    """What one partition fetches: a level of a multiscale group, whole or cropped."""

    container: str  # within the bucket; its suffix (.zarr or .n5) says the format
    group: str  # the multiscale group inside the container, e.g. recon-2/em/fibsem-int16
    level: str  # s0 (full resolution) … s8
    description: str
    crop_offset_zyx: tuple[int, int, int] | None = None  # None: the whole level
    crop_size_zyx: tuple[int, int, int] | None = None
    modality: str = "FIB-SEM"

    @property
    def dataset(self) -> str:
        return self.container.split("/", 1)[0]


_NACC = "mouse nucleus accumbens (jrc_mus-nacc-2), FIB-SEM, OpenOrganelle"
_NACC_ZARR = "jrc_mus-nacc-2/jrc_mus-nacc-2.zarr"
DATASETS = {
    # s3 is 70 × 315 × 324 voxels (14 MB): what a scheduled re-check fetches by default.
    "jrc_mus-nacc-2/fibsem-int16/s3": CosemLevel(
        _NACC_ZARR, "recon-2/em/fibsem-int16", "s3", f"{_NACC}, level s3"
    ),
    "jrc_mus-nacc-2/fibsem-int16/s2": CosemLevel(
        _NACC_ZARR, "recon-2/em/fibsem-int16", "s2", f"{_NACC}, level s2"
    ),
    # a full-resolution 256 × 1024 × 1024 crop from the middle of s0 (512 MB of the level's 7 GB)
    "jrc_mus-nacc-2/fibsem-int16/s0-centre-crop": CosemLevel(
        _NACC_ZARR,
        "recon-2/em/fibsem-int16",
        "s0",
        f"{_NACC}, 256 × 1024 × 1024 crop of level s0",
        crop_offset_zyx=(154, 748, 786),
        crop_size_zyx=(256, 1024, 1024),
    ),
    # The older COSEM layout: an N5 container whose groups are named differently from the Zarr ones
    # (em/fibsem-uint16, no recon-N level); s0 is 6368 × 1600 × 12000 uint16, s4 about 60 MB.
    "jrc_hela-2/fibsem-uint16/s4": CosemLevel(
        "jrc_hela-2/jrc_hela-2.n5",
        "em/fibsem-uint16",
        "s4",
        "HeLa cell 2 (jrc_hela-2), FIB-SEM, OpenOrganelle N5 container, level s4",
    ),
}


@dataclass(frozen=True)
class OpenOrganelleEndpoints:
    bucket: str = "janelia-cosem-datasets"
    endpoint_url: str | None = None  # None: AWS S3; else an S3-compatible endpoint (a mirror, MinIO)
    region: str = "us-east-1"
    anonymous: bool = True  # the bucket is public; False uses the usual AWS credentials
    # Where the run's dataset (partition) lives, when not where the registry says: the container's path
    # in the bucket (its suffix, .zarr or .n5, picks the format) and the multiscale group inside it.
    container: str = ""
    group: str = ""
    parallel: int = 8  # chunk objects in flight
    max_level_bytes: int = 16 * 2**30  # refuse a bigger level or crop (a typo in a crop must not pull 7 GB)
    retry_attempts: int = 6
    retry_base_delay_s: float = 1.0

    def validate(self) -> None:
        if not self.bucket or "/" in self.bucket:
            raise ValueError(f"bucket must be a bucket name (no '/'), not {self.bucket!r}")
        if self.endpoint_url:
            check_url("endpoint_url", self.endpoint_url, ("http", "https"))
        if not self.region:
            raise ValueError("region must not be empty (the bucket is in us-east-1)")
        if self.container and posixpath.splitext(self.container.rstrip("/"))[1] not in FORMATS:
            raise ValueError(
                f"container must be a path in the bucket ending in .zarr or .n5, not {self.container!r}"
            )
        if self.group.startswith("/") or ".." in self.group.split("/"):
            raise ValueError(f"group must be a relative path inside the container, not {self.group!r}")
        if not 1 <= self.parallel <= 64:
            raise ValueError(f"parallel must be between 1 and 64, not {self.parallel}")
        if self.max_level_bytes <= 0:
            raise ValueError(f"max_level_bytes must be positive, not {self.max_level_bytes}")
        check_retries(self.retry_attempts, self.retry_base_delay_s)

    def storage_options(self) -> dict[str, Any]:
        """s3fs options: anonymous by default, the endpoint only when one is set."""
        client_kwargs: dict[str, Any] = {"region_name": self.region}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        # max_concurrency 1: one GET per chunk object (s3fs would HEAD each object first to split it)
        return {"anon": self.anonymous, "client_kwargs": client_kwargs, "max_concurrency": 1}

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())

    def policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.retry_attempts, base_delay_s=self.retry_base_delay_s)


def make_source(key: str, endpoints: OpenOrganelleEndpoints | None = None) -> OpenOrganelleSource:
    if key not in DATASETS:
        raise ValueError(f"unknown OpenOrganelle dataset {key!r}; known: {', '.join(sorted(DATASETS))}")
    return OpenOrganelleSource(key, DATASETS[key], endpoints or OpenOrganelleEndpoints())


def _transient(exc: BaseException) -> bool:
    """Network faults are worth another try; a missing or refused object, or bad bytes, are not."""
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError | PermissionError)


def _s3(path: str) -> str:
    return f"s3://{path}"


def s3_access_error(exc: BaseException, path: str, endpoints: OpenOrganelleEndpoints) -> PermanentSourceError:
    """What to tell a user whose S3 read was refused (HTTP 403): bucket, key, endpoint and what to check."""
    bucket, _, key = path.partition("/")
    where = endpoints.endpoint_url or f"AWS S3 ({endpoints.region})"
    if endpoints.anonymous:
        how = (
            "it was read anonymously (anonymous: true): check that the bucket allows public reads, or set "
            "anonymous: false in the run config and give AWS credentials (AWS_PROFILE, or AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY)"
        )
    else:
        how = (
            "it was read with this environment's AWS credentials (anonymous: false): check that they may "
            "s3:GetObject in this bucket (AWS_PROFILE, AWS_ACCESS_KEY_ID), or set anonymous: true for a public bucket"
        )
    return PermanentSourceError(
        f"s3://{path}: access denied (HTTP 403) by {where}, bucket {bucket!r}, key {key!r}; {how}. A bucket "
        "that does not let you list it also answers 403 for a key that does not exist: check the dataset's "
        f"container, group and level too ({type(exc).__name__}: {exc})",
        url=f"s3://{path}",
    )


class _Level:
    """One stored level, either format: geometry in (z, y, x) order and one chunk read at a time."""

    format: str
    path: str  # the array's folder in the bucket (no protocol)
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype  # native byte order, as returned by read()
    metadata: dict[str, Any]  # .zarray or the N5 attributes.json, as stored
    attributes: dict[str, Any]  # the array's own attributes (.zattrs, or the N5 attributes.json)

    def chunk_key(self, idx: tuple[int, ...]) -> str:
        raise NotImplementedError

    def read(self, idx: tuple[int, ...]) -> tuple[tuple[int, str] | None, np.ndarray]:
        """((size, sha256) of the object as received or None if never written, its voxels clipped at the edge)."""
        raise NotImplementedError

    def region(self, idx: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(
            slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, self.chunks, self.shape, strict=True)
        )


class _ZarrLevel(_Level):
    format = "zarr2"

    def __init__(self, path: str, fs: Any):
        self.path = path
        self._array = zarr_v2.ZarrV2Array(fs, path)
        self.attributes = self._array.attributes()
        self.metadata = {**self._array.metadata, "attributes": self.attributes}  # as zarr-python lists it
        self.shape = self._array.shape
        self.chunks = self._array.chunks
        self.dtype = self._array.native_dtype

    def chunk_key(self, idx: tuple[int, ...]) -> str:
        return self._array.chunk_key(idx)

    def read(self, idx: tuple[int, ...]) -> tuple[tuple[int, str] | None, np.ndarray]:
        try:
            raw = self._array.read_raw(idx)
            block = self._array.decode_chunk(raw, idx)
        except FormatError as exc:
            raise FormatError(f"{_s3(self.chunk_key(idx))}: {exc}") from exc
        return (None if raw is None else (len(raw), hashlib.sha256(raw).hexdigest())), block


class _N5Level(_Level):
    format = "n5"

    def __init__(self, path: str, fs: Any):
        self.path = path
        self._array = n5.N5Array(fs, path)
        self.metadata = self._array.attributes
        self.attributes = self._array.attributes
        self.shape = self._array.shape
        self.chunks = self._array.chunks
        self.dtype = self._array.dtype

    def chunk_key(self, idx: tuple[int, ...]) -> str:
        return self._array.block_key(idx)

    def read(self, idx: tuple[int, ...]) -> tuple[tuple[int, str] | None, np.ndarray]:
        try:
            raw = self._array.read_raw(idx)
            block = self._array.decode_block(raw, idx)
        except FormatError as exc:
            raise FormatError(f"{_s3(self.chunk_key(idx))}: {exc}") from exc
        return (None if raw is None else (len(raw), hashlib.sha256(raw).hexdigest())), block


class OpenOrganelleSource(Source):
    name = "openorganelle"

    def __init__(self, key: str, spec: CosemLevel, endpoints: OpenOrganelleEndpoints):
        self.key = key
        self.spec = spec
        self.endpoints = endpoints
        self.container = (endpoints.container or spec.container).strip("/")
        self.group = (endpoints.group or spec.group).strip("/")
        suffix = posixpath.splitext(self.container)[1]
        if suffix not in FORMATS:
            raise ValueError(f"OpenOrganelle container {self.container!r} must end in .zarr or .n5")
        self.format = FORMATS[suffix]
        self.group_path = posixpath.join(endpoints.bucket, self.container, self.group)
        self.array_path = posixpath.join(self.group_path, spec.level)
        self._fs = None

    @property
    def source_id(self) -> str:
        return self.key

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs = self.endpoints.filesystem()
        return self._fs

    @property
    def url(self) -> str:
        return _s3(self.array_path)

    def _open(self, logger: logging.Logger | logging.LoggerAdapter) -> _Level:
        header = posixpath.join(self.array_path, ".zarray" if self.format == "zarr" else n5.ATTRIBUTES)

        def attempt() -> _Level:
            try:
                cat_limited(
                    self.fs, header, MAX_METADATA_BYTES, _s3(header), "array metadata"
                )  # one GET: 404 vs 403
            except FileNotFoundError:
                raise PermanentSourceError(
                    f"{self.url}: no {'Zarr v2' if self.format == 'zarr' else 'N5'} array there "
                    f"(s3://{header} answered 404: bucket {self.endpoints.bucket!r}, key "
                    f"{header.split('/', 1)[1]!r}); check the dataset's container, group and level (run config "
                    "container/group) and endpoint_url for a mirror",
                    url=self.url,
                ) from None
            except PermissionError as exc:
                raise s3_access_error(exc, header, self.endpoints) from None
            if self.format == "zarr":
                return _ZarrLevel(self.array_path, self.fs)
            return _N5Level(self.array_path, self.fs)

        return retrying(
            attempt,
            what=f"open {self.url}",
            policy=self.endpoints.policy(),
            transient=_transient,
            logger=logger,
        )

    def _crop(self, level: _Level) -> tuple[tuple[int, ...], tuple[int, ...]]:
        offset, size = self.spec.crop_offset_zyx, self.spec.crop_size_zyx
        if (offset is None) != (size is None):
            raise ValueError(f"{self.key}: give both crop_offset_zyx and crop_size_zyx, or neither")
        if offset is None:
            return (0,) * len(level.shape), level.shape
        assert size is not None  # both or neither (checked above)
        if len(offset) != len(level.shape) or any(
            o < 0 or s < 1 or o + s > n for o, s, n in zip(offset, size, level.shape, strict=True)
        ):
            raise PermanentSourceError(
                f"{self.url}: crop at z,y,x {tuple(offset)} of size {tuple(size)} does not fit the level's "
                f"shape {level.shape}; fix the crop of {self.key!r}",
                url=self.url,
            )
        return tuple(offset), tuple(size)

    def _group_attributes(self) -> dict[str, Any]:
        name = n5.ATTRIBUTES if self.format == "n5" else ".zattrs"
        try:
            path = posixpath.join(self.group_path, name)
            return json.loads(cat_limited(self.fs, path, MAX_METADATA_BYTES, _s3(path), name))
        except FileNotFoundError:
            return {}
        except PermissionError as exc:
            raise s3_access_error(exc, posixpath.join(self.group_path, name), self.endpoints) from None

    def voxel_size_nm(self, level: _Level, group_attrs: dict[str, Any]) -> dict[str, float]:
        voxel = None
        if self.format == "n5":
            voxel = n5.level_voxel_size_nm(level.attributes, group_attrs, self.spec.level, self.url)
        else:
            voxel = ngff_level_voxel_size_nm(group_attrs, self.spec.level, self.url)
        if voxel is None or set(voxel) != {"z", "y", "x"}:
            raise PermanentSourceError(
                f"{self.url}: no z, y, x voxel size in the multiscale metadata of "
                f"{_s3(self.group_path)} (found {voxel}); tell the OpenOrganelle maintainers",
                url=self.url,
            )
        return voxel

    def check(self, logger: logging.Logger | logging.LoggerAdapter) -> RemoteVersion:
        level = self._open(logger)
        offset, size = self._crop(level)
        nbytes = (
            math.prod(size) * level.dtype.itemsize
        )  # exact: a lying shape cannot wrap past max_level_bytes
        if nbytes > self.endpoints.max_level_bytes:
            raise PermanentSourceError(
                f"{self.url}: {nbytes / 2**30:.2f} GiB is more than max_level_bytes "
                f"({self.endpoints.max_level_bytes / 2**30:.2f} GiB); raise it in the run config if intended",
                url=self.url,
            )
        group_attrs = self._group_attributes()
        voxel = self.voxel_size_nm(level, group_attrs)
        crop = {"crop_offset_zyx": list(offset), "crop_size_zyx": list(size)}
        fingerprint = hashlib.sha256(
            json.dumps(
                {"metadata": level.metadata, "attributes": level.attributes, **crop}, sort_keys=True
            ).encode()
        ).hexdigest()
        return RemoteVersion(
            fingerprint=fingerprint,
            description=self.spec.description,
            source_urls=(self.url,),
            additional_metadata={
                "openorganelle": {
                    "dataset": self.spec.dataset,
                    "container": _s3(posixpath.join(self.endpoints.bucket, self.container)),
                    "group": self.group,
                    "level": self.spec.level,
                    "format": level.format,
                    "shape": list(level.shape),
                    "chunks": list(level.chunks),
                    "dtype": level.dtype.name,
                    **crop,
                    "whole_level": tuple(size) == tuple(level.shape),
                    "voxel_size_nm": voxel,
                    "dimensions_nm": [n * voxel[a] for n, a in zip(size, "zyx", strict=True)],
                    "array_metadata": level.metadata,
                    "multiscale_attributes": group_attrs,
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
        level = self._open(logger)
        offset, size = self._crop(level)
        voxel = self.voxel_size_nm(level, self._group_attributes())
        first = tuple(o // c for o, c in zip(offset, level.chunks, strict=True))
        last = tuple((o + s - 1) // c for o, s, c in zip(offset, size, level.chunks, strict=True))
        indices = list(product(*(range(a, b + 1) for a, b in zip(first, last, strict=True))))
        origin = tuple(i * c for i, c in zip(first, level.chunks, strict=True))
        box = tuple(
            min(n, (b + 1) * c) - o
            for n, b, c, o in zip(level.shape, last, level.chunks, origin, strict=True)
        )
        cache = self._cache(workdir / CACHE, box, level, manifest, logger)
        chunk_bytes = math.prod(level.chunks) * level.dtype.itemsize
        progress = Progress(f"OpenOrganelle {self.key}", len(indices) * chunk_bytes, logger)
        entries: dict[tuple[int, ...], ManifestEntry] = {}
        todo = []
        for idx in indices:
            done = manifest.get(_key(idx))
            if done:
                entries[idx] = done
                progress.add(done.extra.get("voxel_bytes", 0))
            else:
                todo.append(idx)
        if entries:
            logger.info("resuming %s: %d of %d chunks already here", self.key, len(entries), len(indices))
        lock = threading.Lock()
        stop = threading.Event()

        def one(idx: tuple[int, ...]) -> None:
            if stop.is_set():
                return  # another chunk failed: leave the rest for the re-run
            url = _s3(level.chunk_key(idx))
            try:
                received, block = retrying(
                    lambda: level.read(idx),
                    what=f"GET {url}",
                    policy=self.endpoints.policy(),
                    transient=_transient,
                    logger=logger,
                )
            except PermissionError as exc:
                stop.set()  # at once, so no worker starts another chunk
                raise s3_access_error(exc, level.chunk_key(idx), self.endpoints) from exc
            except BaseException:
                stop.set()
                raise
            region = tuple(
                slice(s.start - o, s.stop - o) for s, o in zip(level.region(idx), origin, strict=True)
            )
            cache[region] = block
            size_bytes, digest = received or (0, hashlib.sha256(b"").hexdigest())
            entry = ManifestEntry(
                key=_key(idx),
                url=url,
                size_bytes=size_bytes,
                sha256=digest,
                extra={"voxel_bytes": block.nbytes, "missing": received is None},
            )
            manifest.add(entry)  # only now: the chunk is in the cache
            with lock:
                entries[idx] = entry
            progress.add(block.nbytes)

        with ThreadPoolExecutor(max_workers=self.endpoints.parallel, thread_name_prefix="cosem") as pool:
            futures = [pool.submit(one, idx) for idx in todo]
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [e for f in futures if f.done() and (e := f.exception()) is not None]
            if errors:
                for f in futures:
                    f.cancel()
                raise errors[0]
        progress.finish()
        ordered = [entries[i] for i in indices]
        crop = tuple(slice(o - g, o - g + s) for o, g, s in zip(offset, origin, size, strict=True))
        data = da.from_zarr(str(workdir / CACHE))[crop]
        combined = hashlib.sha256("".join(f"{e.sha256}  {e.key}\n" for e in ordered).encode()).hexdigest()
        vol = Volume(
            data=data,
            axes=("z", "y", "x"),
            scale=(voxel["z"], voxel["y"], voxel["x"]),
            units=("nanometer",) * 3,
            format=f"openorganelle-{level.format}",
            source_files=(),
        )
        return FetchedVolume(
            volume=vol,
            voxel_size_source="header",
            files=(
                SourceFile(
                    path=posixpath.join(self.container, self.group, self.spec.level),
                    url=self.url,
                    size_bytes=sum(e.size_bytes for e in ordered),
                    sha256=combined,
                ),
            ),
            modality=self.spec.modality,
            header={
                "format": level.format,
                "chunks": list(level.chunks),
                "level_shape": list(level.shape),
                "crop_offset_zyx": list(offset),
                "crop_size_zyx": list(size),
                "missing_chunks": sum(1 for e in ordered if e.extra.get("missing")),
            },
        )

    def _cache(
        self,
        path: Path,
        box: tuple[int, ...],
        level: _Level,
        manifest: DownloadManifest,
        logger: logging.Logger | logging.LoggerAdapter,
    ) -> zarr.Array:
        """The local copy on the source's chunk grid (one source chunk = one cache chunk: no shared writes)."""
        if path.exists():
            try:
                cache = zarr.open_array(str(path), mode="r+")
            except Exception:  # a cache torn before its metadata was written
                cache = None
            if (
                cache is not None
                and cache.shape == tuple(box)
                and cache.chunks == tuple(level.chunks)
                and cache.dtype == level.dtype
            ):
                return cache
            logger.warning("the download cache %s does not match %s; starting it again", path, self.url)
        if manifest.entries():
            manifest.reset()  # its chunks lived in the cache that is being replaced
        return zarr.create_array(
            str(path),
            shape=box,
            chunks=level.chunks,
            dtype=level.dtype,
            fill_value=0,
            overwrite=True,
            compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=1),
        )


def _key(idx: tuple[int, ...]) -> str:
    return "c" + "_".join(str(i) for i in idx)


def ngff_level_voxel_size_nm(group_attrs: dict[str, Any], level: str, where: str) -> dict[str, float] | None:
    """A level's voxel size in nm from OME-NGFF ``multiscales`` (as OpenOrganelle's Zarr containers carry).

    The dataset's ``scale`` transformation, times the multiscale's own ``scale`` if it has one, in the
    axes' units (nanometer on OpenOrganelle). None when the level is not listed.
    """
    for ms in group_attrs.get("multiscales", []) or []:
        axes = ms.get("axes") or ["z", "y", "x"]
        names = [a["name"] if isinstance(a, dict) else a for a in axes]
        units = [a.get("unit", "nanometer") if isinstance(a, dict) else "nanometer" for a in axes]
        overall = _scale_of(ms.get("coordinateTransformations", []), len(names))
        for ds in ms.get("datasets", []):
            if ds.get("path") != level:
                continue
            scale = _scale_of(ds.get("coordinateTransformations", []), len(names))
            if scale is None:
                raise SourceError(
                    f"{where}: level {level} has no scale transformation in multiscales", url=where
                )
            if overall is not None:
                scale = [a * b for a, b in zip(scale, overall, strict=True)]
            spatial = [(n, s, u) for n, s, u in zip(names, scale, units, strict=True) if n in ("z", "y", "x")]
            return n5.scale_to_nm({n: s for n, s, _ in spatial}, [u for _, _, u in spatial], where)
    return None


def _scale_of(transforms: list[dict[str, Any]], ndim: int) -> list[float] | None:
    for t in transforms:
        if t.get("type") == "scale" and len(t.get("scale", [])) == ndim:
            return [float(s) for s in t["scale"]]
    return None
