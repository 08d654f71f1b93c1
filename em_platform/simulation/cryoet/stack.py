"""Simulate one tilt series end to end: assemble, image every tilt (in parallel), write, publish.

Tilts run as tasks on a Dask client when one is given (the platform's Dask resource), else on a thread
pool; each tilt draws from its own PCG64 stream, so the result does not depend on which worker ran it
or in what order. Outputs are written into a staging folder as tilts finish and published whole; on any
error the staging folder is removed and nothing is published.
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from em_platform.simulation.cryoet import acquisition
from em_platform.simulation.cryoet.acquisition import PlannedTilt, frame_file_name, plan_tilts, rng_for
from em_platform.simulation.cryoet.assembly import Sample, assemble, rotation_record
from em_platform.simulation.cryoet.detector import Detector, micrographs, movie_frames, sensitivity_map
from em_platform.simulation.cryoet.image_formation import Grid, Ice, Optics, TiltGeometry, TiltImager
from em_platform.simulation.cryoet.models import ParticleModel, load_library
from em_platform.simulation.cryoet.outputs import (
    GAIN_REF,
    GROUND_TRUTH,
    PHANTOM,
    StackFiles,
    discard_staging,
    publish_stack,
    staging_folder,
    write_metadata,
    write_mrc,
)
from em_platform.simulation.cryoet.phantom import phantom_shape, phantom_volume
from em_platform.simulation.cryoet.scene import Scene, build_scene
from em_platform.simulation.cryoet.spec import Spec, slab_thickness_A, tilt_angles
from em_platform.simulation.truth import (
    FiducialTruth,
    GroundTruth,
    ParticleTruth,
    PhantomTruth,
)
from em_platform.storage import DataStore
from em_platform.storage.checksums import describe_files

log = logging.getLogger(__name__)

SIMULATOR_VERSION = "1"  # bump when the physics changes what a spec produces


def stack_folder(store: DataStore, spec: Spec, stack_no: int) -> str:
    """``<root>/simulation/<spec name>/<stack>`` (the contract's layout)."""
    return store.path("simulation", spec.name, spec.stack_name(stack_no))


@dataclass(frozen=True)
class TiltJob:
    """What a worker needs to image one tilt (small; the imager is shared)."""

    index: int
    planned: PlannedTilt
    seed: int
    stack_no: int
    dose_e_per_A2: float
    frame_file: str | None
    drift_px: np.ndarray | None


@dataclass(frozen=True)
class TiltImages:
    index: int
    noisy: np.ndarray
    noiseless: np.ndarray
    frames: np.ndarray | None
    frame_file: str | None


def optics_of(spec: Spec) -> Optics:
    o = spec.optics
    return Optics(
        voltage_kV=spec.electronbeam.acc_voltage,
        cs_mm=o.cs,
        cc_mm=o.cc,
        energy_spread_eV=spec.electronbeam.energy_spread,
        illumination_angle_mrad=o.cond_ap_angle,
        aperture_um=o.aperture,
        focal_length_mm=o.focal_length,
        amplitude_contrast=o.amplitude_contrast,
    )


def detector_of(spec: Spec) -> Detector:
    d = spec.detector
    return Detector(d.dqe, d.gain, d.mtf_a, d.mtf_b, d.mtf_c, d.mtf_alpha, d.mtf_beta)


def imager_for(spec: Spec, scene: Scene) -> TiltImager:
    optics = optics_of(spec)
    grid = Grid(spec.detector.det_pix_y, spec.detector.det_pix_x, spec.simulation.padding, spec.pixel_size_A)
    s = spec.sample
    ice = Ice(s.ice, s.thickness * 10.0, s.inelastic_mean_free_path * 10.0)
    return TiltImager(scene, grid, optics, ice, slab_thickness_A(spec, optics.wavelength))


def render_tilt(
    imager: TiltImager, detector: Detector, job: TiltJob, sensitivity: np.ndarray | None
) -> TiltImages:
    """One exposure: intensity → expected counts → noisy and noiseless micrographs (+ its movie)."""
    t = job.planned.truth
    geometry = TiltGeometry(
        angle_deg=t.true_angle_deg,
        rotation_deg=job.planned.rotation_deg,
        shift_px=(t.shift_px[0], t.shift_px[1]),
        defocus_u_A=t.defocus_u_A,
        defocus_v_A=t.defocus_v_A,
        astigmatism_angle_deg=t.astigmatism_angle_deg,
        damage_b_A2=job.planned.damage_b_A2,
    )
    rng = np.random.Generator(
        np.random.PCG64(
            np.random.SeedSequence(job.seed, spawn_key=(job.stack_no, acquisition.TILT, job.index))
        )
    )
    intensity = imager.intensity(geometry, rng)
    p = imager.grid.pixel_A
    expected_padded = intensity * np.float32(job.dose_e_per_A2 * p * p)
    noisy, noiseless = micrographs(imager.grid.crop(expected_padded), detector, rng)
    frames = None
    if job.drift_px is not None and sensitivity is not None:
        frames = movie_frames(expected_padded, imager.grid.crop, job.drift_px, detector, sensitivity, rng)
    return TiltImages(job.index, noisy, noiseless, frames, job.frame_file)


def _run_tilts(imager, detector, jobs, sensitivity, client, workers):
    """Yield TiltImages as tilts finish, on Dask or a local thread pool.

    A finished tilt is let go of as soon as it is yielded (the caller writes it): holding every future
    would keep the whole stack in memory (two 2000² float32 images per tilt).
    """
    if client is not None:
        from distributed import as_completed as dask_completed

        shared = client.scatter([imager, detector, sensitivity], broadcast=True, hash=False)
        pending = {
            client.submit(render_tilt, shared[0], shared[1], job, shared[2], pure=False) for job in jobs
        }
        try:
            for fut in dask_completed(list(pending)):
                pending.discard(fut)
                images = fut.result()
                fut.release()
                yield images
        finally:
            client.cancel(list(pending))
        return
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        pending = {pool.submit(render_tilt, imager, detector, job, sensitivity) for job in jobs}
        try:
            for fut in as_completed(list(pending)):
                pending.discard(fut)
                yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()


@dataclass(frozen=True)
class StackResult:
    stack: str
    folder: str  # published folder (path or URL under the store)
    truth: GroundTruth
    preview: np.ndarray  # the noisy tilt nearest 0°, for thumbnails
    seconds: float
    n_points: int
    files: list[dict]  # [{path, size_bytes, sha256}] of the stack's main files (movies left out)


def _truth(
    spec: Spec, stack_no: int, sample: Sample, plan: list[PlannedTilt], files: dict, phantom: PhantomTruth
) -> GroundTruth:
    stack = spec.stack_name(stack_no)
    return GroundTruth(
        stack=stack,
        spec_name=spec.name,
        seed=spec.seed,
        spec=spec.to_doc(),
        pixel_size_A=spec.pixel_size_A,
        image_shape_yx=[spec.detector.det_pix_y, spec.detector.det_pix_x],
        voltage_kV=spec.electronbeam.acc_voltage,
        cs_mm=spec.optics.cs,
        amplitude_contrast=spec.optics.amplitude_contrast,
        tilt_axis_angle_deg=spec.geometry.tilt_axis,
        tilts=[p.truth for p in plan],
        particles=[
            ParticleTruth(
                id=p.id,
                model=p.model,
                position_nm=[float(v) / 10 for v in p.position_A],
                **rotation_record(p.rotation),
            )
            for p in sample.particles
        ],
        fiducials=[
            FiducialTruth(b.id, [float(v) / 10 for v in b.position_A], b.radius_A / 10) for b in sample.beads
        ],
        phantom=phantom,
        files=files,
        extra=_extra(spec, stack_no, plan),
    )


def _extra(spec: Spec, stack_no: int, plan: list[PlannedTilt]) -> dict[str, Any]:
    """Keys beyond the contract's: the physics a processing step may want to compare against."""
    o, d, b = spec.optics, spec.detector, spec.electronbeam
    return {
        "stack_no": stack_no,
        "simulator_version": SIMULATOR_VERSION,
        "nominal_defocus_um": spec.defocus_um(stack_no),
        "cc_mm": o.cc,
        "energy_spread_eV": b.energy_spread,
        "illumination_angle_mrad": o.cond_ap_angle,
        "wavelength_A": optics_of(spec).wavelength,
        "ice_thickness_nm": spec.sample.thickness,
        "ice_model": spec.sample.ice,
        "slab_thickness_A": slab_thickness_A(spec, optics_of(spec).wavelength),
        "detector": {
            "dqe": d.dqe,
            "gain": d.gain,
            "mtf": {"a": d.mtf_a, "b": d.mtf_b, "c": d.mtf_c, "alpha": d.mtf_alpha, "beta": d.mtf_beta},
        },
        "damage": {
            "model": "B = 8π²·S·dose at mid-exposure",
            "sensitivity": spec.simulation.damage_sensitivity,
            "b_factor_A2": [p.damage_b_A2 for p in plan],
        },
    }


def _files(spec: Spec, stack: str, plan: list[PlannedTilt]) -> dict[str, Any]:
    files: dict[str, Any] = {
        "tilt_series": f"{stack}.mrc",
        "noiseless": f"{stack}_noiseless.mrc",
        "mdoc": f"{stack}.mrc.mdoc",
        "tlt": f"{stack}.tlt",
        "phantom": PHANTOM,
    }
    if spec.movies.frames:
        files["gain_ref"] = GAIN_REF
        files["frames"] = []
        for p in plan:
            assert p.truth.frames is not None  # the spec has movies: every tilt has its frames
            files["frames"].append(p.truth.frames.file)
    return files


def simulate_stack(
    spec: Spec,
    stack_no: int,
    store: DataStore,
    library: dict[str, ParticleModel] | None = None,
    *,
    client: Any = None,
    workers: int | None = None,
    logger: logging.Logger = log,
) -> StackResult:
    """Simulate and publish stack ``stack_no`` of ``spec``; returns where it is and its truth."""
    t0 = time.perf_counter()
    stack = spec.stack_name(stack_no)
    library = load_library(spec) if library is None else library
    sample = assemble(spec, library, rng_for(spec, stack_no, acquisition.ASSEMBLY))
    scene = build_scene(sample, library, in_ice=spec.sample.ice != "none")
    fmt = spec.movies.format if spec.movies.frames else None
    names = None
    if fmt:
        names = [frame_file_name(stack, k, a, fmt) for k, a in enumerate(tilt_angles(spec.geometry))]
    plan = plan_tilts(spec, stack_no, names)
    imager = imager_for(spec, scene)
    detector = detector_of(spec)
    ny, nx = spec.detector.det_pix_y, spec.detector.det_pix_x
    sensitivity = (
        sensitivity_map((ny, nx), spec.movies.gain_variation, rng_for(spec, stack_no, acquisition.DETECTOR))
        if fmt
        else None
    )
    jobs = [
        TiltJob(
            k,
            p,
            spec.seed,
            stack_no,
            spec.electronbeam.dose_per_tilt,
            p.truth.frames.file if p.truth.frames else None,
            np.asarray(p.truth.frames.drift_px) if p.truth.frames else None,
        )
        for k, p in enumerate(plan)
    ]
    final = stack_folder(store, spec, stack_no)
    staging = staging_folder(store, final)
    out = StackFiles(staging, stack, (len(plan), ny, nx), spec.pixel_size_A, fmt)
    logger.info(
        "simulating %s: %d tilts of %d x %d px, %d scatterers (%d particles, %d beads), %d slab(s) of %.0f Å at 0°",
        stack,
        len(plan),
        nx,
        ny,
        scene.n_points,
        len(sample.particles),
        len(sample.beads),
        max(1, math.ceil(spec.sample.thickness * 10 / imager.slab_A)),
        imager.slab_A,
    )
    try:
        out.open()
        zero = int(np.argmin([abs(p.truth.nominal_angle_deg) for p in plan]))
        preview = None
        for images in _run_tilts(imager, detector, jobs, sensitivity, client, workers):
            out.write_tilt(images.index, images.noisy, images.noiseless)
            if images.frames is not None:
                out.write_frames(images.frame_file, images.frames)
            if images.index == zero:
                preview = images.noisy
        phantom = _write_phantom(spec, scene, staging)
        if sensitivity is not None:  # fmt: movies are written, with their gain reference
            write_mrc(staging / GAIN_REF, (1.0 / sensitivity).astype(np.float32), spec.pixel_size_A)
        truth = _truth(spec, stack_no, sample, plan, _files(spec, stack, plan), phantom)
        out.close()
        write_metadata(
            staging,
            truth,
            nominal_defocus_um=spec.defocus_um(stack_no),
            exposure_time_s=spec.movies.exposure_time,
        )
        main = sorted({v for k, v in truth.files.items() if k != "frames"} | {GROUND_TRUTH})
        described = describe_files([staging / name for name in main], staging)
        publish_stack(store, staging, final)
    except BaseException:
        out.abort()
        discard_staging(store, staging)
        raise
    seconds = time.perf_counter() - t0
    assert preview is not None  # the tilt nearest 0° is one of the plan's
    logger.info("published %s in %.1f s: %s", stack, seconds, store.to_url(final))
    return StackResult(stack, store.to_url(final), truth, preview, seconds, scene.n_points, described)


def _write_phantom(spec: Spec, scene: Scene, staging: Path) -> PhantomTruth:
    b = spec.simulation.phantom_binning
    voxel = spec.pixel_size_A * b
    shape = phantom_shape(
        spec.detector.det_pix_x, spec.detector.det_pix_y, b, spec.sample.thickness * 10, voxel
    )
    volume = phantom_volume(scene, shape, voxel, in_ice=spec.sample.ice != "none")
    write_mrc(staging / PHANTOM, volume, voxel)
    return PhantomTruth(PHANTOM, voxel, list(shape))
