"""FlyEM hemibrain: grayscale crops fetched block by block from DVID, plus the dataset's neuPrint metadata.

A crop is fetched as fetch blocks (a multiple of DVID's 64³ storage blocks) in parallel into a local
Zarr array, one chunk per block; each block enters the download manifest only once its chunk is on disk,
so a killed run resumes with the missing blocks. neuPrint (connectome metadata) needs a personal token
(``NEUPRINT_TOKEN``); without it, or when neuPrint fails, the grayscale ingest goes on and the record says
why the connectome metadata is missing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_platform.formats import Volume
from em_platform.formats.volume import normalise_unit
from em_platform.lazy_import import LazyModule
from em_platform.sources.dataset import FetchedVolume, RemoteVersion, Source, SourceFile
from em_platform.sources.dvid import ZYX, DvidClient, DvidOptions, check_value_type, parse_voxel_size
from em_platform.sources.manifest import DownloadManifest, ManifestEntry
from em_platform.sources.progress import Progress
from em_platform.sources.retry import PermanentSourceError, RetryPolicy

if TYPE_CHECKING:  # the modules themselves for the type checker; at run time each is imported on first use
    import dask.array as da
    import zarr
    import zarr.codecs
else:
    da = LazyModule("dask.array")
    zarr = LazyModule("zarr")

log = logging.getLogger(__name__)

DVID_BLOCK = 64  # DVID's uint8blk storage block edge; fetch blocks are multiples of it
HEMIBRAIN_VOXEL_NM = 8.0  # the published isotropic voxel size (Scheffer et al. 2020)
CACHE_NAME = "grayscale.zarr"
TOKEN_ENV = "NEUPRINT_TOKEN"
# neuPrint :Meta fields kept in the record; roiInfo/roiHierarchy/neuroglancerMeta run to megabytes.
NEUPRINT_META_FIELDS = (
    "dataset",
    "info",
    "tag",
    "uuid",
    "lastDatabaseEdit",
    "latestMutationId",
    "totalPreCount",
    "totalPostCount",
    "preHPThreshold",
    "postHPThreshold",
    "postHighAccuracyThreshold",
    "primaryRois",
    "superLevelRois",
    "statusDefinitions",
    "meshHost",
)


@dataclass(frozen=True)
class FlyemCrop:
    offset_zyx: ZYX  # voxel coordinates in the full hemibrain volume
    size_zyx: ZYX
    title: str = ""


# Partition key → crop. The hemibrain grayscale spans about x 34432, y 39552, z 41408 voxels (8 nm);
# both crops sit near the centre of that box, aligned to DVID's 64³ blocks.
DATASETS: dict[str, FlyemCrop] = {
    "hemibrain-center-1024": FlyemCrop(
        (20224, 19264, 16704), (1024, 1024, 1024), "1024³ voxels (8.6 µm cube, 1 GiB) near the volume centre"
    ),
    "hemibrain-center-256": FlyemCrop(
        (20608, 19648, 17088), (256, 256, 256), "256³ voxels (2 µm cube, 16 MiB) near the volume centre"
    ),
}


@dataclass(frozen=True)
class FlyemEndpoints:
    dvid_server: str = "http://hemibrain-dvid.janelia.org"
    uuid: str = "a89eb3af216a46cdba81204d8f954786"
    instance: str = "grayscale"
    neuprint_server: str = "neuprint.janelia.org"
    neuprint_dataset: str = "hemibrain:v1.2.1"
    neuprint_ca_bundle: str | None = None  # CA file for a neuPrint server with a private certificate
    neuprint_timeout_s: float = 60.0
    block_size: int = 256  # fetch block edge in voxels (one GET, one Zarr chunk), a multiple of 64
    parallel: int = 8  # blocks in flight; memory ≈ parallel × block_size³ bytes (8 × 16 MiB by default)
    retry_attempts: int = 6
    retry_base_delay_s: float = 1.0
    read_timeout_s: float = 120.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not re.match(r"^https?://[^/\s]+", self.dvid_server):
            raise ValueError(f"dvid_server must be an http(s):// URL, not {self.dvid_server!r}")
        if not re.fullmatch(r"[0-9a-fA-F]{4,32}", self.uuid):
            raise ValueError(f"uuid must be a DVID node uuid (4-32 hex digits), not {self.uuid!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.instance):
            raise ValueError(f"instance must be a DVID data instance name, not {self.instance!r}")
        if not self.neuprint_server.strip() or self.neuprint_server.startswith("http://"):
            raise ValueError(f"neuprint_server must be a host or https:// URL, not {self.neuprint_server!r}")
        if not self.neuprint_dataset.strip():
            raise ValueError("neuprint_dataset must not be empty (e.g. 'hemibrain:v1.2.1')")
        if self.neuprint_ca_bundle is not None and not Path(self.neuprint_ca_bundle).is_file():
            raise ValueError(f"neuprint_ca_bundle {self.neuprint_ca_bundle!r} is not a file")
        if self.block_size < DVID_BLOCK or self.block_size % DVID_BLOCK:
            raise ValueError(f"block_size must be a positive multiple of {DVID_BLOCK}, not {self.block_size}")
        if not 1 <= self.parallel <= 64:
            raise ValueError(f"parallel must be between 1 and 64, not {self.parallel}")
        if self.retry_attempts < 1:
            raise ValueError(f"retry_attempts must be at least 1, not {self.retry_attempts}")
        if self.retry_base_delay_s < 0:
            raise ValueError(f"retry_base_delay_s must not be negative, not {self.retry_base_delay_s}")
        for name in ("neuprint_timeout_s", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")

    def dvid_options(self) -> DvidOptions:
        policy = RetryPolicy(
            attempts=self.retry_attempts,
            base_delay_s=self.retry_base_delay_s,
            max_delay_s=max(60.0, self.retry_base_delay_s),
        )
        return DvidOptions(policy=policy, timeout_s=(10.0, self.read_timeout_s))


def make_source(key: str, endpoints: FlyemEndpoints | None = None) -> FlyemSource:
    """The source for one partition key of :data:`DATASETS`."""
    if key not in DATASETS:
        raise ValueError(f"unknown FlyEM dataset {key!r}; choose one of {sorted(DATASETS)}")
    return FlyemSource(key, DATASETS[key], endpoints or FlyemEndpoints())


def _xyz_text(zyx: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in zyx)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class _Block:
    key: str
    start: ZYX  # relative to the crop origin (also the Zarr chunk's corner)
    size: ZYX

    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, a + n) for a, n in zip(self.start, self.size, strict=True))  # type: ignore[return-value]


def crop_blocks(size_zyx: ZYX, block: int) -> list[_Block]:
    """The fetch blocks covering a crop, in C order (z slowest); edge blocks are clipped to the crop."""
    ranges = [range(0, n, block) for n in size_zyx]
    out = []
    for z, y, x in itertools.product(*ranges):
        size = (min(block, size_zyx[0] - z), min(block, size_zyx[1] - y), min(block, size_zyx[2] - x))
        out.append(_Block(f"z{z}_y{y}_x{x}", (z, y, x), size))
    return out


def neuprint_metadata(
    server: str,
    dataset: str,
    token: str,
    *,
    ca_bundle: str | None = None,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """neuPrint's description of a dataset: its /api/dbmeta/datasets entry and selected :Meta fields.

    Runs neuprint-python in a daemon thread so an unresponsive server (neuprint-python sets no timeouts)
    costs at most ``timeout_s``. Raises on any failure; the caller decides that it is not fatal.
    """
    result: dict[str, Any] = {}
    failure: list[BaseException] = []

    def work() -> None:
        try:
            import neuprint  # heavy (pandas, pyarrow): only when a token is set

            client = neuprint.Client(
                server, dataset=dataset, token=token, verify=ca_bundle or True, progress=False
            )
            entry = client.fetch_datasets(reload_cache=True).get(dataset, {})
            meta = neuprint.fetch_meta(client=client)
            result["dataset_info"] = _jsonable(entry)
            result["meta"] = _jsonable({k: meta[k] for k in NEUPRINT_META_FIELDS if k in meta})
            result["server"] = client.server
        except BaseException as exc:  # handed to the calling thread
            failure.append(exc)

    worker = threading.Thread(target=work, name="neuprint-metadata", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"neuPrint {server} did not answer within {timeout_s:.0f} s")
    if failure:
        raise failure[0]
    return result


class FlyemSource(Source):
    name = "flyem"

    def __init__(self, key: str, crop: FlyemCrop, endpoints: FlyemEndpoints = FlyemEndpoints()):
        endpoints.validate()
        if len(crop.offset_zyx) != 3 or len(crop.size_zyx) != 3 or min(crop.size_zyx) < 1:
            raise ValueError(f"crop {key!r} needs a 3-D offset and a positive 3-D size, not {crop}")
        self.key = key
        self.crop = crop
        self.endpoints = endpoints
        self._client = DvidClient(
            endpoints.dvid_server, endpoints.uuid, endpoints.instance, endpoints.dvid_options()
        )

    @property
    def source_id(self) -> str:
        return f"{self.endpoints.uuid}:{self.endpoints.instance}:{self.key}"

    @property
    def crop_url(self) -> str:
        return self._client.raw_url(self.crop.offset_zyx, self.crop.size_zyx)

    def check(self, logger: logging.Logger | logging.LoggerAdapter) -> RemoteVersion:
        self._client.logger = logger
        info = self._client.info()
        check_value_type(info, self._client.info_url)
        lo, hi = self._client.bounds(info)
        o, s = tuple(self.crop.offset_zyx), tuple(self.crop.size_zyx)
        end = tuple(a + n - 1 for a, n in zip(o, s, strict=True))
        if any(a < m for a, m in zip(o, lo, strict=True)) or any(e > m for e, m in zip(end, hi, strict=True)):
            raise PermanentSourceError(
                f"FlyEM crop {self.key!r} (z,y,x offset {_xyz_text(o)}, size {_xyz_text(s)}, last voxel "
                f"{_xyz_text(end)}) lies outside the dataset bounds z,y,x {_xyz_text(lo)} to {_xyz_text(hi)} "
                f"(inclusive) of {self._client.info_url}; choose a crop inside the bounds",
                url=self._client.info_url,
            )
        extended = info.get("Extended") or {}
        fingerprint = hashlib.sha256(
            json.dumps(
                {
                    "uuid": self.endpoints.uuid,
                    "instance": self.endpoints.instance,
                    "crop_offset_zyx": list(o),
                    "crop_size_zyx": list(s),
                    "extended": extended,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()
        extra: dict[str, Any] = {
            "dataset_bounds": {"min_zyx": list(lo), "max_zyx": list(hi)},
            "crop_origin_zyx": list(o),
            "crop_size_zyx": list(s),
            "dvid_info_extended": _jsonable(extended),
            "dvid": {
                "server": self._client.server,
                "uuid": self.endpoints.uuid,
                "instance": self.endpoints.instance,
            },
            "neuprint": self._neuprint(logger),
        }
        return RemoteVersion(
            fingerprint=fingerprint,
            description=f"Hemibrain grayscale crop z,y,x {_xyz_text(o)} of size {_xyz_text(s)} (FlyEM DVID)",
            source_urls=(self.crop_url,),
            additional_metadata=extra,
            total_bytes=s[0] * s[1] * s[2],
        )

    def _neuprint(self, logger: logging.Logger | logging.LoggerAdapter) -> dict[str, Any]:
        """neuPrint's dataset metadata, or why it is missing; never raises."""
        ep = self.endpoints
        out: dict[str, Any] = {"server": ep.neuprint_server, "dataset": ep.neuprint_dataset}
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            out["available"] = False
            out["reason"] = f"{TOKEN_ENV} is not set (get a token from your neuPrint account page)"
            logger.info("neuPrint metadata skipped: %s", out["reason"])
            return out
        try:
            got = neuprint_metadata(
                ep.neuprint_server,
                ep.neuprint_dataset,
                token,
                ca_bundle=ep.neuprint_ca_bundle,
                timeout_s=ep.neuprint_timeout_s,
            )
        except Exception as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:400].replace(token, "<token>")
            out["available"] = False
            out["reason"] = reason
            logger.warning(
                "neuPrint metadata for %s on %s unavailable (%s); ingesting the grayscale without it",
                ep.neuprint_dataset,
                ep.neuprint_server,
                reason,
            )
            return out
        out.update(got)
        out["available"] = True
        return out

    # --- fetch -------------------------------------------------------------------------------------

    def _open_cache(
        self, path: Path, manifest: DownloadManifest, logger: logging.Logger | logging.LoggerAdapter
    ) -> zarr.Array:
        """The download cache: a Zarr array the crop's shape with one chunk per fetch block.

        A cache of another shape or block size (the block size setting changed) cannot be resumed: it is
        removed and the manifest forgotten, since its block keys name other boxes.
        """
        shape = tuple(self.crop.size_zyx)
        chunks = tuple(min(self.endpoints.block_size, n) for n in shape)
        if path.exists():
            try:
                arr = zarr.open_array(str(path), mode="r+", config={"write_empty_chunks": True})
                if tuple(arr.shape) == shape and tuple(arr.chunks) == chunks and arr.dtype == "uint8":
                    return arr
                why = f"its shape {arr.shape} / chunks {arr.chunks} differ from {shape} / {chunks}"
            except Exception as exc:  # unreadable metadata: start over
                why = f"it cannot be opened ({exc})"
            logger.warning("discarding the download cache %s: %s", path, why)
            shutil.rmtree(path)
            manifest.reset()
        elif manifest.entries():
            logger.warning("the download cache %s is missing; fetching every block again", path)
            manifest.reset()
        return zarr.create_array(
            str(path),
            shape=shape,
            chunks=chunks,
            dtype="uint8",
            compressors=[zarr.codecs.BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")],
            fill_value=0,
            config={"write_empty_chunks": True},  # every fetched block leaves a chunk file (see _on_disk)
            dimension_names=("z", "y", "x"),
            attributes={"source_url": self.crop_url, "crop_origin_zyx": list(self.crop.offset_zyx)},
        )

    @staticmethod
    def _on_disk(arr: zarr.Array, cache_path: Path, block: _Block) -> bool:
        """Whether a block's chunk file exists (a block in the manifest whose chunk was pruned is refetched)."""
        index = tuple(s // c for s, c in zip(block.start, arr.chunks, strict=True))
        metadata = arr.metadata
        assert metadata.zarr_format == 3  # _open_cache creates the cache as Zarr v3
        return (cache_path / metadata.chunk_key_encoding.encode_chunk_key(index)).is_file()

    def fetch(
        self,
        workdir: Path,
        manifest: DownloadManifest,
        version: RemoteVersion,
        logger: logging.Logger | logging.LoggerAdapter,
    ) -> FetchedVolume:
        self._client.logger = logger
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        cache_path = workdir / CACHE_NAME
        arr = self._open_cache(cache_path, manifest, logger)
        block = self.endpoints.block_size
        blocks = crop_blocks(self.crop.size_zyx, block)
        listed = manifest.entries()
        done = {b.key: listed[b.key] for b in blocks if b.key in listed and self._on_disk(arr, cache_path, b)}
        todo = [b for b in blocks if b.key not in done]
        total = sum(b.size[0] * b.size[1] * b.size[2] for b in blocks)
        already = sum(done[b.key].size_bytes for b in blocks if b.key in done)
        if done:
            logger.info(
                "%d of %d blocks already in %s; fetching %d",
                len(blocks) - len(todo),
                len(blocks),
                cache_path,
                len(todo),
            )
        progress = Progress(f"flyem {self.key}", total, logger, already_bytes=already)
        origin = self.crop.offset_zyx
        stop = threading.Event()

        def fetch_block(b: _Block) -> None:
            if stop.is_set():
                return
            absolute = tuple(o + s for o, s in zip(origin, b.start, strict=True))
            voxels = self._client.raw(absolute, b.size)
            arr[b.slices()] = voxels  # one whole chunk: no read-modify-write
            digest = hashlib.sha256(voxels.data).hexdigest()
            manifest.add(
                ManifestEntry(
                    key=b.key,
                    url=self._client.raw_url(absolute, b.size),
                    size_bytes=voxels.nbytes,
                    sha256=digest,
                    extra={"block_zyx": [block] * 3, "offset_zyx": list(absolute)},
                )
            )
            progress.add(voxels.nbytes)

        if todo:
            with ThreadPoolExecutor(self.endpoints.parallel, thread_name_prefix="dvid-block") as pool:
                futures = [pool.submit(fetch_block, b) for b in todo]
                finished, pending = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in finished if f.exception() is not None]
                if failed:
                    stop.set()
                    for f in pending:
                        f.cancel()
                    wait(pending)
                    entries = manifest.entries()
                    logger.error(
                        "flyem %s stopped with %d of %d blocks on disk; a re-run fetches only the rest",
                        self.key,
                        sum(b.key in entries for b in blocks),
                        len(blocks),
                    )
                    raise failed[0].exception()  # type: ignore[misc]
            self._client.close()
        progress.finish()
        return self._fetched(cache_path, blocks, manifest, version)

    def _fetched(
        self,
        cache_path: Path,
        blocks: list[_Block],
        manifest: DownloadManifest,
        version: RemoteVersion,
    ) -> FetchedVolume:
        entries = manifest.entries()
        missing = [b.key for b in blocks if b.key not in entries]
        if missing:
            raise PermanentSourceError(
                f"flyem {self.key}: blocks {missing[:5]} are not in the download manifest"
            )
        digests = "".join(f"{entries[b.key].sha256}  {b.key}\n" for b in blocks)
        size = tuple(self.crop.size_zyx)
        crop_file = SourceFile(
            path=f"{self.endpoints.instance}/raw/0_1_2/{size[2]}_{size[1]}_{size[0]}/"
            f"{self.crop.offset_zyx[2]}_{self.crop.offset_zyx[1]}_{self.crop.offset_zyx[0]}",
            url=self.crop_url,
            size_bytes=sum(entries[b.key].size_bytes for b in blocks),
            sha256=hashlib.sha256(digests.encode()).hexdigest(),
        )
        extended = version.additional_metadata.get("dvid_info_extended") or {}
        header_voxel = parse_voxel_size({"Extended": extended})
        unit = normalise_unit(header_voxel[1]) if header_voxel else None
        if header_voxel and unit:
            scale: tuple[float, ...] = header_voxel[0]
            voxel_source = "header"
        else:
            scale, unit, voxel_source = (HEMIBRAIN_VOXEL_NM,) * 3, "nanometer", "source"
        data = da.from_zarr(zarr.open_array(str(cache_path), mode="r"))
        volume = Volume(
            data=data,
            axes=("z", "y", "x"),
            scale=tuple(scale),
            units=(unit,) * 3,
            format="dvid-uint8blk",
            source_files=(cache_path,),
            source_metadata={"dvid_url": self.crop_url, "crop_origin_zyx": list(self.crop.offset_zyx)},
        )
        header = {k: extended[k] for k in ("BlockSize", "VoxelSize", "VoxelUnits", "Values") if k in extended}
        return FetchedVolume(
            volume=volume,
            voxel_size_source=voxel_source,
            files=(crop_file,),
            modality="FIB-SEM",
            header=_jsonable(header),
        )


__all__ = [
    "DATASETS",
    "FlyemCrop",
    "FlyemEndpoints",
    "FlyemSource",
    "crop_blocks",
    "make_source",
    "neuprint_metadata",
]
