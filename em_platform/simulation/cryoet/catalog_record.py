"""A simulated stack in the catalog: its tilt series as OME-Zarr, a thumbnail, one record (source
``simulation``), with the same status lifecycle as every ingest (pending → processing → saving-data →
complete, or failed with the error).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np

from em_platform.catalog.db import CatalogDB
from em_platform.catalog.records import ome_zarr_block
from em_platform.catalog.status import Status
from em_platform.imaging.ome_zarr import write_ome_zarr
from em_platform.imaging.thumbnail import to_uint8
from em_platform.lazy_import import LazyModule
from em_platform.simulation.cryoet.models import ParticleModel
from em_platform.simulation.cryoet.spec import Spec
from em_platform.simulation.cryoet.stack import SIMULATOR_VERSION, StackResult, simulate_stack, stack_folder
from em_platform.simulation.truth import GroundTruthError, ground_truth_from_dict
from em_platform.storage import DataStore
from em_platform.storage.checksums import combined_sha256

da = LazyModule("dask.array")
imagecodecs = LazyModule("imagecodecs")

SOURCE = "simulation"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedStack:
    record: dict[str, Any]
    folder_url: str
    volume_url: str
    thumbnail_png: bytes
    simulated: bool  # False when an identical earlier stack was kept
    seconds: float


def thumbnail(image: np.ndarray, max_side: int = 256) -> bytes:
    """A PNG of one tilt, block-averaged down to ``max_side`` (averaging tames the shot noise)."""
    f = max(1, -(-max(image.shape) // max_side))
    ny, nx = (image.shape[0] // f) * f, (image.shape[1] // f) * f
    binned = image[:ny, :nx].reshape(ny // f, f, nx // f, f).mean(axis=(1, 3))
    return imagecodecs.png_encode(to_uint8(binned))


def _unchanged(store: DataStore, folder: str, spec: Spec, previous: dict | None) -> bool:
    """An earlier complete stack made from this very spec by this simulator version."""
    if not previous or previous.get("status") != Status.COMPLETE:
        return False
    truth_path = f"{folder}/ground_truth.json"
    if not store.exists(truth_path) or not store.exists(previous["files"].get("volume", "") or "-"):
        return False
    try:
        truth = ground_truth_from_dict(store.read_json(truth_path))
    except (GroundTruthError, ValueError):
        return False
    return truth.spec == spec.to_doc() and truth.extra.get("simulator_version") == SIMULATOR_VERSION


def simulate_and_catalog(
    spec: Spec,
    stack_no: int,
    *,
    store: DataStore,
    catalog: CatalogDB,
    lineage: dict[str, Any],
    library: dict[str, ParticleModel] | None = None,
    dask_client: Callable[[], Any] | None = None,
    logger: logging.Logger = log,
) -> PublishedStack:
    """Simulate stack ``stack_no`` of ``spec`` (unless an identical one is there), then catalog it."""
    stack = spec.stack_name(stack_no)
    folder = stack_folder(store, spec, stack_no)
    volume_path = store.path("simulation", spec.name, f"{stack}.ome.zarr")
    thumb_path = store.path("simulation", spec.name, f"{stack}.thumbnail.png")
    previous = catalog.find(SOURCE, stack)
    if _unchanged(store, folder, spec, previous):
        assert previous is not None  # _unchanged: the catalog holds it
        logger.info("%s is unchanged (same spec, same simulator); keeping %s", stack, store.to_url(folder))
        with store.fs.open(thumb_path, "rb") as f:
            png = f.read()
        return PublishedStack(previous, store.to_url(folder), store.to_url(volume_path), png, False, 0.0)
    run_id = lineage.get("run_id")
    description = f"simulated cryo-ET tilt series {stack} (spec {spec.name}, {spec.geometry.ntilts} tilts)"
    record = catalog.begin(SOURCE, stack, description=description, files=[], run_id=run_id)
    rid = record["id"]
    staging = store.staging_path(volume_path)
    try:
        catalog.transition(rid, Status.PROCESSING, run_id=run_id)
        client = dask_client() if dask_client else None
        result = simulate_stack(spec, stack_no, store, library, client=client, logger=logger)
        info, mean = _write_zarr(result, store, staging, spec, client)
        core = {
            "description": description,
            "volume_shape": [len(result.truth.tilts), *result.truth.image_shape_yx],
            "axes": ["t", "y", "x"],
            "voxel_size_nm": {"x": spec.apix, "y": spec.apix},
            "voxel_size_source": "config",
            "units": {"x": "nanometer", "y": "nanometer"},
            "data_type": "float32",
            "modality": "cryo-ET",
        }
        catalog.transition(rid, Status.SAVING_DATA, update={"metadata": {"core": core}}, run_id=run_id)
        png = thumbnail(result.preview)
        store.write_bytes(thumb_path, png)
        store.publish(staging, volume_path)
        record = catalog.transition(
            rid,
            Status.COMPLETE,
            run_id=run_id,
            update=_complete_update(result, spec, store, info, mean, volume_path, thumb_path, lineage),
        )
        return PublishedStack(record, result.folder, store.to_url(volume_path), png, True, result.seconds)
    except BaseException as exc:
        try:
            store.remove(staging)
        except Exception as cleanup:  # the store may be what failed: the record must still say so
            logger.warning("could not remove the staging %s (%s); it is never published", staging, cleanup)
        catalog.transition(rid, Status.FAILED, error=exc, run_id=run_id)
        raise


def _write_zarr(result: StackResult, store: DataStore, staging: str, spec: Spec, client: Any):
    """The noisy tilt series as OME-Zarr (axes t, y, x: the tilts in acquisition order), read from the store
    the stack was published to (a local folder or S3) one tilt per task: the stack is never whole in memory,
    and a task carries only where its tilt is, not its pixels (a memory map in the graph would travel whole
    to a cluster's scheduler)."""
    path = f"{result.folder}/{result.truth.files['tilt_series']}"
    offset, shape, dtype = _mrc_layout(store, path)
    tilt_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    data = da.stack(
        [
            da.from_delayed(
                dask.delayed(_tilt)(store.fs, path, offset + i * tilt_bytes, shape[1:], dtype),
                shape[1:],
                dtype.newbyteorder("="),
            )
            for i in range(shape[0])
        ]
    )
    info = write_ome_zarr(
        data,
        store.to_url(staging),
        axes=("t", "y", "x"),
        scale=(1.0, spec.apix, spec.apix),
        units=(None, "nanometer", "nanometer"),
        storage_options=store.storage_options or None if not store.is_local else None,
        name=result.stack,
        client=client,
    )
    mean = float(data[:, :: max(1, data.shape[1] // 64), :: max(1, data.shape[2] // 64)].mean().compute())
    return info, mean


def _mrc_layout(store: DataStore, path: str) -> tuple[int, tuple[int, int, int], np.dtype]:
    """(data offset, (tilts, y, x), dtype) from the header of the simulator's own MRC stack."""
    import mrcfile
    from mrcfile.mrcinterpreter import MrcInterpreter

    with store.fs.open(path, "rb") as f:
        header = MrcInterpreter(iostream=f, header_only=True).header
    shape = (int(header.nz), int(header.ny), int(header.nx))
    return 1024 + int(header.nsymbt), shape, mrcfile.utils.data_dtype_from_header(header)


def _tilt(fs: Any, path: str, offset: int, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    with fs.open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(int(np.prod(shape)) * dtype.itemsize)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _complete_update(
    result: StackResult,
    spec: Spec,
    store: DataStore,
    info,
    mean: float,
    volume_path: str,
    thumb_path: str,
    lineage: dict,
) -> dict:
    truth = result.truth
    files = result.files
    return {
        "metadata": {
            "technical": {
                "file_size_bytes": sum(f["size_bytes"] for f in files),
                "sha256": combined_sha256(files),
                "source_format": "mrc",
                "compression": "blosc-zstd",
                "chunk_size": list(info.chunks),
                "dtype": "float32",
                "global_mean": mean,
                "dimensions_nm": [truth.image_shape_yx[0] * spec.apix, truth.image_shape_yx[1] * spec.apix],
                "header": {"voxel_size_A": spec.pixel_size_A, "n_tilts": len(truth.tilts)},
            },
            "provenance": {
                "processing_pipeline": "em_platform simulation/tilt_series",
                "internal_zarr_path": "0",
            },
            "ome_zarr": ome_zarr_block(info, store.to_url(volume_path)),
        },
        "files": {
            "source": files,
            "volume": store.to_url(volume_path),
            "raw": result.folder,
            "metadata": f"{result.folder}/ground_truth.json",
            "thumbnail": store.to_url(thumb_path),
        },
        "lineage": {k: v for k, v in lineage.items() if v is not None or k == "partition_key"},
        "additional_metadata": {
            "spec_name": spec.name,
            "stack_no": truth.extra.get("stack_no"),
            "nominal_defocus_um": truth.extra.get("nominal_defocus_um"),
            "tilt_range_deg": [
                min(t.nominal_angle_deg for t in truth.tilts),
                max(t.nominal_angle_deg for t in truth.tilts),
            ],
            "particles": len(truth.particles),
            "fiducials": len(truth.fiducials),
            "simulator_version": SIMULATOR_VERSION,
            "seconds": round(result.seconds, 2),
        },
    }
