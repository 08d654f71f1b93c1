"""``cryo/*``: the cryoem-services role as assets, one partition per tilt series (``cryo_tilt_series``).

Thin: each asset finds its tilt series, calls one step of ``em_platform.cryo.processing`` and reports what
came out as metadata (pictures inline). A bad input (missing frames, wrong gain, an mdoc that disagrees
with its stack, a truncated file) fails only this partition, with the file and the fault named, and is
recorded as failed in the results tables. ``simulation/evaluation``, which scores a simulated series
against its ground truth, is in :mod:`em_platform.assets.simulation_evaluation`.
"""

from pathlib import Path

import dagster as dg
import numpy as np

from em_platform.assets.presentation import (
    materialize_result,
    neuroglancer_link,
)
from em_platform.cryo import processing as proc
from em_platform.cryo.alignment import AlignmentSettings
from em_platform.cryo.ctf import CTFSearch
from em_platform.cryo.denoise import DEFAULT_METHOD
from em_platform.cryo.motion import MotionSettings
from em_platform.cryo.optics import Microscope
from em_platform.cryo.results_db import CryoResults
from em_platform.cryo.session import SessionError, TiltSeries
from em_platform.cryo.thumbnails import markdown_image, mrc_to_jpeg
from em_platform.cryo.trajectory import TRAJECTORY_MODELS
from em_platform.formats.errors import FormatError
from em_platform.imaging.ome_zarr import write_ome_zarr
from em_platform.lazy_import import LazyModule
from em_platform.partitions import cryo_tilt_series
from em_platform.resources import CatalogResource, CryoSessionsResource, DaskResource, StorageResource

da = LazyModule("dask.array")

K = {
    name: dg.AssetKey(["cryo", name])
    for name in ("motion_corrected", "ctf", "tilt_alignment", "tomogram", "denoised", "thumbnails", "results")
}
# the key of simulation/evaluation (assets.simulation_evaluation), which cryo_job runs with these
EVALUATION = dg.AssetKey(["simulation", "evaluation"])
# A simulated stack's cryo partition bears its simulation partition's key (cryo.session.series_key), so the
# simulator's output is upstream of processing and evaluation partition by partition; a microscope's series
# has no simulation partition (a dependency with nothing upstream, as for a raw file).
FROM_SIMULATION = dg.AssetDep(
    dg.AssetKey(["simulation", "tilt_series"]), partition_mapping=dg.IdentityPartitionMapping()
)
BAD_INPUT = (SessionError, FormatError, ValueError, FileNotFoundError)


class OpticsConfig(dg.Config):
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07


class MotionConfig(OpticsConfig):
    """Every setting of em_platform.cryo.motion.MotionSettings (README, "Cryo processing")."""

    patches_x: int = 5
    patches_y: int = 5
    bfactor_global_A2: float = 500.0
    bfactor_patch_A2: float = 1000.0
    estimation_size: int = 1024
    trajectory: str = "physical"  # physical | smooth | none
    local_motion: str = "auto"  # auto | on | off
    local_significance: float = 1e-3
    local_threshold_px: float = 0.1
    min_patch_px: int = 512
    hot_pixel_sigma: float = 12.0  # 0 = no hot-pixel search
    # overrides the session's rule (mdoc GainReference, then one file in the session)
    gain_reference: str = ""
    gain_rotation: int = 0  # MotionCor2's -RotGain (× 90° counter-clockwise)
    gain_flip: int = 0  # MotionCor2's -FlipGain (1 upside down, 2 left-right)

    def settings(self) -> MotionSettings:
        if self.trajectory not in TRAJECTORY_MODELS:
            raise ValueError(f"trajectory {self.trajectory!r}: one of {', '.join(TRAJECTORY_MODELS)}")
        if self.local_motion not in ("auto", "on", "off"):
            raise ValueError(f"local_motion {self.local_motion!r}: auto, on or off")
        fields = self.model_dump(exclude={"patches_x", "patches_y", "cs_mm", "amplitude_contrast"})
        return MotionSettings(patches=(self.patches_x, self.patches_y), **fields)


class CTFConfig(OpticsConfig):
    box: int = 512
    min_res_A: float = 30.0
    max_res_A: float = 5.0
    min_defocus_A: float = 2000.0
    max_defocus_A: float = 90000.0


class AlignmentConfig(dg.Config):
    # ± degrees searched around the mdoc's tilt-axis angle; 0 (default) keeps the mdoc's (calibrated) angle.
    # The search (back-projection power) found 5.0° on fixtures but drifted 4° off on a simulated apoferritin
    # series at 3 e/Å² per tilt, so it is opt-in until it is reliable.
    axis_search_deg: float = 0.0
    max_size: int = 256


class TomogramConfig(OpticsConfig):
    binning: int = 0  # 0 = auto (the phantom's grid when simulated, else ≤ 512 px wide)
    thickness: int = 0  # binned voxels; 0 = thickness_nm
    thickness_nm: float = 0.0  # 0 = the session's em_session.yaml, the phantom's (simulated), else estimated
    sirt: bool = True
    sirt_iterations: int = 20
    phase_flip: bool = True

    def settings(self) -> proc.TomogramSettings:
        return proc.TomogramSettings(
            binning=self.binning,
            thickness=self.thickness,
            thickness_nm=self.thickness_nm,
            methods=("wbp", "sirt") if self.sirt else ("wbp",),
            sirt_iterations=self.sirt_iterations,
            phase_flip=self.phase_flip,
        )


class DenoiseConfig(dg.Config):
    method: str = DEFAULT_METHOD


def series_fields(ts: TiltSeries) -> dict:
    return {
        "name": ts.name,
        "kind": ts.kind,
        "mdoc_path": str(ts.mdoc) if ts.mdoc else None,
        "stack_path": str(ts.stack) if ts.stack else None,
        "n_tilts": len(ts.tilts),
        "pixel_size_A": ts.pixel_A,
        "voltage_kV": ts.voltage_kV,
        "tilt_axis_nominal_deg": ts.tilt_axis_deg,
    }


def run_step(context, sessions: CryoSessionsResource, catalog: CatalogResource, step):
    """Find the partition's tilt series and run ``step(ts)``; bad input fails only this partition."""
    key = context.partition_key
    results = CryoResults(catalog.url)
    ts = None

    def failed(error: str) -> None:  # the results tables say failed as Dagster will, with why
        series = series_fields(ts) if ts else {"name": key, "kind": "unknown"}
        results.mark(key, "failed", series=series, error=error, run_id=context.run.run_id)

    try:
        ts = sessions.tilt_series(key)
        return ts, step(ts)
    except BAD_INPUT as exc:
        message = f"tilt series {key}: {exc}"
        failed(message)
        raise dg.Failure(description=message, metadata={"partition": key, "error": str(exc)}) from exc
    except Exception as exc:  # a fault of ours
        failed(f"tilt series {key}: {context.asset_key.to_user_string()} failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        results.dispose()


def _img(path: Path, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(markdown_image(path.read_bytes(), alt))


def _spa_skip(ts: TiltSeries, what: str) -> dg.MaterializeResult | None:
    if ts.kind == "tilt_series":
        return None
    return materialize_result(metadata={"skipped": f"{ts.key} is a single-particle movie set: no {what}"})


def _asset(name: str, deps=(), description: str = "", **kw):
    upstream: list[dg.AssetKey | dg.AssetDep] = [K[d] for d in deps]
    return dg.asset(
        key=K[name],
        deps=upstream or [FROM_SIMULATION],
        partitions_def=cryo_tilt_series,
        group_name="cryo",
        description=description,
        **kw,
    )


@_asset(
    "motion_corrected",
    description="Movies → drift-corrected, dose-weighted micrographs: hot pixels masked, gain applied, "
    "full-frame drift as physics has it (early jump + slow drift), local motion (5 × 5 patches) only where "
    "significant; total/early/late motion as cryoem-services records them.",
    kinds={"mrc", "dask"},
    pool="pixels",
)
def motion_corrected(
    context: dg.AssetExecutionContext,
    config: MotionConfig,
    cryo_sessions: CryoSessionsResource,
    storage: StorageResource,
    catalog: CatalogResource,
    dask: DaskResource,
) -> dg.MaterializeResult:
    root = storage.cryo_root()

    def step(ts: TiltSeries):
        results = CryoResults(catalog.url)
        try:
            results.mark(ts.key, "processing", series=series_fields(ts), run_id=context.run.run_id)
        finally:
            results.dispose()
        # on the deployment's cluster when it has one (each movie a task on a worker), else here
        client = dask.get_client() if dask.is_cluster else None
        scope = Microscope(ts.voltage_kV, config.cs_mm, config.amplitude_contrast)  # for the STAR optics
        return proc.motion_correct(
            ts, proc.Workspace(root, ts.key), config.settings(), client, scope, storage.cryo_live_root()
        )

    ts, doc = run_step(context, cryo_sessions, catalog, step)
    tilts = doc["tilts"]
    meta = {
        "source": doc["source"],
        "ran_on": doc.get("ran_on", "in process"),
        "n_tilts": len(ts.tilts),
        "shape": str(tuple(doc["shape"])),
        "path": dg.MetadataValue.path(str(proc.Workspace(root, ts.key).step("motioncorr"))),
    }
    if tilts:
        meta |= {
            "total_motion_px_mean": float(np.mean([t["total_motion_px"] for t in tilts])),
            "early_motion_px_mean": float(np.mean([t["early_motion_px"] for t in tilts])),
            "late_motion_px_mean": float(np.mean([t["late_motion_px"] for t in tilts])),
            "average_motion_per_frame_px": float(np.mean([t["average_motion_per_frame_px"] for t in tilts])),
            "local_motion_rms_px_max": float(max(t["local_motion_rms_px"] for t in tilts)),
            "drift_plot": _img(proc.Workspace(root, ts.key).step("motioncorr") / "drift.png", "drift"),
        }
    return materialize_result(metadata=meta)


@_asset(
    "ctf",
    deps=["motion_corrected"],
    description="CTFFIND-like estimate per micrograph: defocus 1/2, "
    "astigmatism angle, fit score, fit resolution (CC 0.75), ice-ring density, diagnostic image.",
    kinds={"json"},
)
def ctf(
    context: dg.AssetExecutionContext,
    config: CTFConfig,
    cryo_sessions: CryoSessionsResource,
    storage: StorageResource,
    catalog: CatalogResource,
) -> dg.MaterializeResult:
    root = storage.cryo_root()

    def step(ts: TiltSeries):
        scope = Microscope(ts.voltage_kV, config.cs_mm, config.amplitude_contrast)
        search = CTFSearch(
            config.box, config.min_res_A, config.max_res_A, config.min_defocus_A, config.max_defocus_A
        )
        return proc.estimate_ctf_series(ts, proc.Workspace(root, ts.key), scope, search)

    ts, doc = run_step(context, cryo_sessions, catalog, step)
    rows = doc["tilts"]
    zero = min(rows, key=lambda r: abs(r["angle_deg"]))
    return materialize_result(
        metadata={
            "defocus_A_median": float(np.median([r["estimated_defocus_A"] for r in rows])),
            "astigmatism_A_median": float(np.median([r["astigmatism_A"] for r in rows])),
            "fit_resolution_A_median": float(np.median([r["fit_resolution_A"] for r in rows])),
            "cc_median": float(np.median([r["cc"] for r in rows])),
            "nominal_defocus_A": zero["nominal_defocus_A"] if zero["nominal_defocus_A"] is not None else -1.0,
            "diagnostic_zero_tilt": _img(Path(zero["diagnostic"]), "CTF fit"),
        }
    )


@_asset(
    "tilt_alignment",
    deps=["motion_corrected"],
    description="Coarse cosine-stretched cross-correlation, projection matching and tilt-axis refinement, "
    "then gold-fiducial alignment when enough beads are tracked; shifts, axis angle, per-view rotation and "
    "tilt angle, per-tilt residuals; IMOD .xf/.tlt.",
    kinds={"json"},
)
def tilt_alignment(
    context: dg.AssetExecutionContext,
    config: AlignmentConfig,
    cryo_sessions: CryoSessionsResource,
    storage: StorageResource,
    catalog: CatalogResource,
) -> dg.MaterializeResult:
    root = storage.cryo_root()
    ts, skip = run_step(context, cryo_sessions, catalog, lambda ts: _spa_skip(ts, "tilt series to align"))
    if skip:
        return skip
    settings = AlignmentSettings(max_size=config.max_size, axis_search_deg=config.axis_search_deg)
    _, doc = run_step(
        context,
        cryo_sessions,
        catalog,
        lambda ts: proc.align_series(ts, proc.Workspace(root, ts.key), settings),
    )
    return materialize_result(
        metadata={
            "method": doc["method"],
            "tilt_axis_angle_deg": doc["tilt_axis_angle_deg"],
            "nominal_tilt_axis_deg": doc["nominal_tilt_axis_deg"],
            "rms_residual_px": doc["rms_residual_px"],
            "xf": dg.MetadataValue.path(doc["xf"]),
            "tlt": dg.MetadataValue.path(doc["tlt"]),
        }
    )


def _publish_zarr(storage: StorageResource, key: str):
    store = storage.store()

    def write(mrc_path: Path, voxel_A: float) -> dict:
        final = store.path("cryo", key, "tomogram.ome.zarr")
        staging = store.staging_path(final)
        with proc.open_mrc(mrc_path) as m:
            data = da.from_array(m.data, chunks=(m.data.shape[0], 128, 128))
            info = write_ome_zarr(
                data,
                store.to_url(staging),
                axes="zyx",
                scale=(voxel_A,) * 3,
                units=("angstrom",) * 3,
                storage_options=store.storage_options,
                name=key,
            )
        store.publish(staging, final)
        return {"url": store.to_url(final), "levels": len(info.levels)}

    return write


@_asset(
    "tomogram",
    deps=["tilt_alignment", "ctf"],
    description="Weighted back-projection and SIRT of the "
    "aligned, CTF phase-flipped, binned stack (slab by slab); MRC + multiscale OME-Zarr; central slice and "
    "XY/XZ projections.",
    kinds={"mrc", "zarr", "dask"},
    pool="pixels",
)
def tomogram(
    context: dg.AssetExecutionContext,
    config: TomogramConfig,
    cryo_sessions: CryoSessionsResource,
    storage: StorageResource,
    catalog: CatalogResource,
) -> dg.MaterializeResult:
    root = storage.cryo_root()
    ts, skip = run_step(context, cryo_sessions, catalog, lambda ts: _spa_skip(ts, "tomogram"))
    if skip:
        return skip

    def step(ts: TiltSeries):
        scope = Microscope(ts.voltage_kV, config.cs_mm, config.amplitude_contrast)
        return proc.tomogram_series(
            ts, proc.Workspace(root, ts.key), scope, config.settings(), _publish_zarr(storage, ts.key)
        )

    _, doc = run_step(context, cryo_sessions, catalog, step)
    out = proc.Workspace(root, ts.key).step("tomogram")
    return materialize_result(
        metadata={
            "shape_zyx": str(tuple(doc["shape_zyx"])),
            "voxel_size_A": doc["voxel_size_A"],
            "binning": doc["binning"],
            "thickness_nm": doc["thickness_nm"],
            "thickness_source": doc["thickness_source"],
            "methods": ", ".join(doc["methods"]),
            "ome_zarr": dg.MetadataValue.path(doc["ome_zarr"]["url"]),
            **neuroglancer_link(storage, doc["ome_zarr"]["url"], context.log),
            "central_slice": _img(out / "central_slice.png", "central slice"),
            "projection_xz": _img(out / "projection_xz.png", "XZ projection"),
        }
    )


@_asset(
    "denoised",
    deps=["tomogram"],
    description="The tomogram denoised (default: 3-D total variation, the largest PSNR gain measured in "
    "bench/bench_cryo.py among TV, non-local means, BM3D, wavelets and an even/odd Wiener filter).",
    kinds={"mrc"},
)
def denoised(
    context: dg.AssetExecutionContext,
    config: DenoiseConfig,
    cryo_sessions: CryoSessionsResource,
    storage: StorageResource,
    catalog: CatalogResource,
) -> dg.MaterializeResult:
    root = storage.cryo_root()
    ts, skip = run_step(context, cryo_sessions, catalog, lambda ts: _spa_skip(ts, "tomogram to denoise"))
    if skip:
        return skip
    _, doc = run_step(
        context,
        cryo_sessions,
        catalog,
        lambda ts: proc.denoise_series(ts, proc.Workspace(root, ts.key), config.method),
    )
    return materialize_result(
        metadata={
            "method": doc["method"],
            "cpu_seconds": doc["cpu_seconds"],
            "path": dg.MetadataValue.path(doc["file"]),
            "central_slice": _img(
                proc.Workspace(root, ts.key).step("denoised") / "central_slice.png", "denoised"
            ),
        }
    )


@_asset(
    "thumbnails",
    deps=["motion_corrected", "ctf", "denoised"],
    description="mrc_to_jpeg of every "
    "micrograph (mean ± 3σ), and the tomogram pictures, shown here as metadata images.",
    kinds={"jpeg"},
)
def thumbnails(
    context: dg.AssetExecutionContext,
    cryo_sessions: CryoSessionsResource,
    storage: StorageResource,
    catalog: CatalogResource,
) -> dg.MaterializeResult:
    root = storage.cryo_root()

    def step(ts: TiltSeries):
        ws = proc.Workspace(root, ts.key)
        data = proc.micrographs(ts, ws)
        with ws.staged("thumbnails") as out:
            for i, t in enumerate(ts.tilts):
                (out / f"{ts.name}_{t.z_index:03d}.jpg").write_bytes(mrc_to_jpeg(np.asarray(data[i]), 512))
        return ws

    ts, ws = run_step(context, cryo_sessions, catalog, step)
    zero = min(range(len(ts.tilts)), key=lambda i: abs(ts.tilts[i].angle_deg))
    jpg = ws.step("thumbnails") / f"{ts.name}_{ts.tilts[zero].z_index:03d}.jpg"
    meta = {
        "count": len(ts.tilts),
        "folder": dg.MetadataValue.path(str(ws.step("thumbnails"))),
        "micrograph_zero_tilt": dg.MetadataValue.md(markdown_image(jpg.read_bytes(), "0°", "jpeg")),
    }
    if (ws.step("tomogram") / "projection_xy.png").is_file():
        meta["projection_xy"] = _img(ws.step("tomogram") / "projection_xy.png", "XY projection")
    return materialize_result(metadata=meta)


def _rows(ts: TiltSeries, ws: proc.Workspace):
    motion = ws.json("motioncorr", "motion.json")
    movie_rows = [
        {
            k: t.get(k)
            for k in (
                "z_index",
                "total_motion_px",
                "early_motion_px",
                "late_motion_px",
                "average_motion_per_frame_px",
                "local_motion_rms_px",
                "patches_used",
            )
        }
        | {
            "tilt_angle_deg": t["angle_deg"],
            "movie_path": t["movie"],
            "n_frames": t["n_frames"],
            "dose_per_frame_e_per_A2": t["dose_per_frame_e_per_A2"],
            "pre_exposure_e_per_A2": t["pre_exposure_e_per_A2"],
            "drift_px": t["shifts_px"],
            "micrograph_path": str(ws.step("motioncorr") / "corrected.mrc"),
        }
        for t in motion["tilts"]
    ]
    ctf_rows = [
        {
            "z_index": r["z_index"],
            "defocus_u_A": r["defocus_u_A"],
            "defocus_v_A": r["defocus_v_A"],
            "astigmatism_A": r["astigmatism_A"],
            "astigmatism_angle_deg": r["astigmatism_angle_deg"],
            "estimated_defocus_A": r["estimated_defocus_A"],
            "nominal_defocus_A": r["nominal_defocus_A"],
            "cc_value": r["cc"],
            "estimated_resolution_A": r["fit_resolution_A"],
            "ice_ring_density": r["ice_ring_density"],
            "diagnostic_path": r["diagnostic"],
        }
        for r in ws.json("ctf", "ctf.json")["tilts"]
    ]
    alignment, tomos = None, []
    if ts.kind == "tilt_series":
        a = ws.json("alignment", "alignment.json")
        alignment = {
            "method": a["method"],
            "tilt_axis_angle_deg": a["tilt_axis_angle_deg"],
            "rms_residual_px": a["rms_residual_px"],
            "xf_path": a["xf"],
            "tlt_path": a["tlt"],
            "per_tilt": a["tilts"],
        }
        t = ws.json("tomogram", "tomogram.json")
        d = ws.json("denoised", "denoise.json")
        for i, (method, path) in enumerate(t["files"].items()):
            tomos.append(
                {
                    "method": method,
                    "voxel_size_A": t["voxel_size_A"],
                    "shape_zyx": t["shape_zyx"],
                    "mrc_path": path,
                    "zarr_url": t["ome_zarr"]["url"] if i == 0 else None,
                    "denoised_path": d["file"] if i == 0 else None,
                    "denoise_method": d["method"] if i == 0 else None,
                }
            )
    return movie_rows, ctf_rows, alignment, tomos


@_asset(
    "results",
    deps=["motion_corrected", "ctf", "tilt_alignment", "tomogram", "denoised", "thumbnails"],
    description="The processing results as tables in the catalog DB (cryo_tilt_series, cryo_movies, "
    "cryo_ctf, cryo_alignments, cryo_tomograms), linked by ids, replaced as a whole per tilt series.",
    kinds={"sql"},
)
def results(
    context: dg.AssetExecutionContext,
    cryo_sessions: CryoSessionsResource,
    storage: StorageResource,
    catalog: CatalogResource,
) -> dg.MaterializeResult:
    root = storage.cryo_root()

    def step(ts: TiltSeries):
        movie_rows, ctf_rows, alignment, tomos = _rows(ts, proc.Workspace(root, ts.key))
        db = CryoResults(catalog.url)
        try:
            sid = db.replace(
                ts.key,
                series=series_fields(ts),
                movie_rows=movie_rows,
                ctf_rows=ctf_rows,
                alignment=alignment,
                tomogram_rows=tomos,
                run_id=context.run.run_id,
            )
        finally:
            db.dispose()
        return sid, len(movie_rows), len(ctf_rows), len(tomos)

    _, (sid, nm, nc, nt) = run_step(context, cryo_sessions, catalog, step)
    return materialize_result(metadata={"tilt_series_id": sid, "movies": nm, "ctf": nc, "tomograms": nt})


cryo_assets = [motion_corrected, ctf, tilt_alignment, tomogram, denoised, thumbnails, results]
