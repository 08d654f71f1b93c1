"""The processing steps of one tilt series, from session files to published outputs in its workspace.

Each step reads what the previous ones published, writes into a staging folder and publishes it with one
rename, so a reader (or a re-run) never sees half a step. Outputs of ``<work root>/<partition key>/``:

    motioncorr/  corrected.mrc (+ even.mrc, odd.mrc from even/odd frames), motion.json, drift.png
    ctf/         ctf.json, diagnostic_<z>.png
    alignment/   <name>.xf, <name>.tlt, alignment.json
    tomogram/    <name>_wbp.mrc, <name>_sirt.mrc, halves, tomogram.json, central/xy/xz PNGs
    denoised/    <name>_denoised.mrc, denoise.json
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dask
import numpy as np

from em_platform.cryo import relion_star as star
from em_platform.cryo import session as sess
from em_platform.cryo.alignment import AlignmentSettings, align_tilt_series, transform_view, write_imod_files
from em_platform.cryo.ctf import (
    CTFSearch,
    TiltedView,
    defocus_window,
    diagnostic_image,
    estimate_ctf,
    fit_series_astigmatism,
)
from em_platform.cryo.ctf_correction import phase_flip
from em_platform.cryo.live_tilts import IMAGES, LiveTilts, series_gain, tilt_fingerprint
from em_platform.cryo.motion import MotionSettings, correct_movie, fourier_bin
from em_platform.cryo.optics import CTFParams, Microscope
from em_platform.cryo.reconstruction import reconstruct
from em_platform.cryo.thickness import specimen_slab, thickness_for, z_profile
from em_platform.cryo.thumbnails import drift_plot, encode, to_image
from em_platform.lazy_import import LazyModule

mrcfile = LazyModule("mrcfile")


class Workspace:
    """The output folder of one tilt series; steps are published atomically."""

    def __init__(self, root: str | Path, key: str):
        self.dir = Path(root) / key

    def step(self, name: str) -> Path:
        return self.dir / name

    @contextmanager
    def staged(self, name: str):
        self.dir.mkdir(parents=True, exist_ok=True)
        staging = self.dir / f".{name}.staging-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        final = self.step(name)
        if final.exists():
            old = self.dir / f".{name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)

    def json(self, step: str, name: str) -> dict:
        path = self.step(step) / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the '{step}' step has not been published for this tilt series yet"
            )
        return json.loads(path.read_text())


def write_mrc(path: Path, data: np.ndarray, voxel_A: float) -> None:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data, np.float32))
        m.voxel_size = voxel_A


def new_mrc_mmap(path: Path, shape: tuple[int, ...], voxel_A: float):
    """A float32 MRC opened as a writable memory map (call ``set_image_stack`` before the voxel size)."""
    m = mrcfile.new_mmap(path, shape=shape, mrc_mode=2, overwrite=True)
    if len(shape) == 3:
        m.set_image_stack()
    m.voxel_size = voxel_A
    return m


def open_mrc(path: Path):
    return mrcfile.mmap(path, mode="r", permissive=True)


def _dump(path: Path, doc) -> None:
    path.write_text(json.dumps(doc, indent=2, default=float, allow_nan=True))


# ---------------------------------------------------------------------------------------------------
# 1. Motion correction


def _worker_memory_settings(settings: MotionSettings) -> MotionSettings:
    """On a Dask worker, keep a movie in memory only while it fits a third of the worker's memory limit (a
    larger one is read twice instead): the worker is not paused or killed for one movie."""
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):
        return settings
    if not limit:
        return settings
    return replace(settings, cache_mib=min(settings.cache_mib, int(limit / 3 / 2**20)))


def correct_tilt(
    ts: sess.TiltSeries,
    i: int,
    shape: tuple[int, int],
    gain_path: Path | None,
    settings: MotionSettings,
    out: str,
    gain: np.ndarray | None = None,
    live_root: str | None = None,
) -> dict:
    """Motion-correct tilt ``i``'s movie and write its micrograph (and even/odd sums) into section ``i`` of
    ``out``'s MRC stacks; returns its figures. A task of its own: run in the process, or on a Dask worker
    that sees the same files (it reads the movie and the gain reference itself: nothing big travels).
    With ``live_root``, a tilt cryo-live corrected as it landed (:mod:`em_platform.cryo.live_tilts`) is
    taken when it was corrected from what this would correct now (its figures say ``"live": true``)."""
    tilt = ts.tilts[i]
    kept = None
    if live_root is not None and tilt.movie is not None:
        with contextlib.suppress(OSError):  # a movie gone: corrected below, which says so
            kept = LiveTilts(live_root).get(ts, i, tilt_fingerprint(ts, i, gain_path, settings))
    if kept is not None:
        figures, images = kept
        figures = {**figures, "live": True}
    else:
        figures, images = correct_tilt_images(ts, i, shape, gain_path, settings, gain)
    for k in IMAGES:
        with mrcfile.mmap(Path(out) / f"{k}.mrc", mode="r+") as m:
            m.data.reshape(-1, *images[k].shape)[i] = images[k]  # a one-section stack's data is 2-D
    return {"z_index": tilt.z_index, "angle_deg": tilt.angle_deg, "movie": str(tilt.movie), **figures}


def correct_tilt_images(
    ts: sess.TiltSeries,
    i: int,
    shape: tuple[int, int] | None,
    gain_path: Path | None,
    settings: MotionSettings,
    gain: np.ndarray | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Tilt ``i``'s movie motion-corrected: (its figures, its corrected, even and odd sums)."""
    tilt = ts.tilts[i]
    frames = sess.load_movie(ts, tilt)
    if shape is not None and tuple(frames.shape[1:]) != tuple(shape):
        raise sess.SessionError(
            f"movie {tilt.movie}: frame shape {frames.shape[1:]} differs from {tuple(shape)}"
        )
    if gain is None and gain_path is not None:
        gain = sess.load_gain(gain_path, tuple(frames.shape[1:]), settings.gain_rotation, settings.gain_flip)
    dpf = tilt.frame_dose_e_per_A2 or (tilt.dose_e_per_A2 / frames.shape[0] if tilt.dose_e_per_A2 else 0.0)
    res = correct_movie(
        frames,
        ts.pixel_A,
        dpf,
        gain=gain,
        pre_exposure=tilt.accumulated_dose_e_per_A2,
        voltage_kV=ts.voltage_kV,
        settings=_worker_memory_settings(settings),
    )
    figures = {
        "dose_per_frame_e_per_A2": dpf,
        "pre_exposure_e_per_A2": tilt.accumulated_dose_e_per_A2,
        "shifts_px": res.shifts_px.tolist(),
        "local_applied": res.local_applied,
        **res.metrics,
    }
    return figures, {"corrected": res.micrograph, "even": res.even, "odd": res.odd}


def motion_correct(
    ts: sess.TiltSeries,
    ws: Workspace,
    settings: MotionSettings,
    client=None,
    scope: Microscope | None = None,
    live_root: Path | None = None,
) -> dict:
    """Movies → corrected micrographs (acquisition order); without movies the stack is checked and used.

    With a Dask ``client`` every movie is a task on the cluster's workers (each reads its movie and writes
    its section: memory per worker is one movie's); without one they run here, one after another. With
    ``live_root`` the tilts cryo-live corrected as they landed are taken, then let go of."""
    with ws.staged("motioncorr") as out:
        if not ts.has_movies:
            stack = sess.load_stack(ts)
            doc: dict[str, Any] = {
                "source": "stack",
                "stack": str(ts.stack),
                "note": "no movies in the mdoc: the stack's images are the micrographs",
                "shape": list(stack.shape),
                "tilts": [],
            }
            _write_relion_micrographs(ts, out, stack, None, scope)
            _dump(out / "motion.json", doc)
            return doc
        first = sess.load_movie(ts, ts.tilts[0])
        shape = tuple(first.shape[1:])
        gain_path = series_gain(ts, settings)
        gain = sess.load_gain(
            gain_path, shape, settings.gain_rotation, settings.gain_flip
        )  # checked here, once
        n = len(ts.tilts)
        for k in ("corrected", "even", "odd"):
            new_mrc_mmap(out / f"{k}.mrc", (n, *shape), ts.pixel_A).close()
        live = str(live_root) if live_root is not None else None
        if client is None:
            per_tilt = [
                correct_tilt(ts, i, shape, gain_path, settings, str(out), gain, live) for i in range(n)
            ]
        else:
            futures = [
                client.submit(
                    correct_tilt, ts, i, shape, gain_path, settings, str(out), None, live, pure=False
                )
                for i in range(n)
            ]
            try:
                per_tilt = client.gather(futures)
            finally:
                client.cancel(futures)
        zero = min(range(n), key=lambda i: abs(ts.tilts[i].angle_deg))
        (out / "drift.png").write_bytes(drift_plot(np.array(per_tilt[zero]["shifts_px"])))
        doc = {
            "source": "movies",
            "gain": str(gain_path) if gain_path else None,
            "gain_rule": "setting"
            if settings.gain_reference
            else (ts.gain_found.rule if ts.gain_found else "session" if ts.gain else "none"),
            "shape": [n, *shape],
            "tilts": per_tilt,
            "ran_on": "dask cluster" if client is not None else "in process",
        }
        with mrcfile.mmap(out / "corrected.mrc", mode="r") as m:
            _write_relion_micrographs(ts, out, m.data.reshape(n, *shape), per_tilt, scope)
        _dump(out / "motion.json", doc)
    if live_root is not None:  # published: what was kept of its tilts, taken or stale, is no longer needed
        LiveTilts(live_root).forget(ts, list(range(n)))
    return doc


def _write_relion_micrographs(ts: sess.TiltSeries, out: Path, stack, motion: list | None, scope) -> None:
    """Each micrograph as its own MRC and ``corrected_micrographs.star`` (em_platform.cryo.relion_star)."""
    folder = out / Path(star.MICROGRAPHS).name
    folder.mkdir(exist_ok=True)
    for i, tilt in enumerate(ts.tilts):
        write_mrc(folder / star.micrograph_file(ts.name, tilt.z_index), np.asarray(stack[i]), ts.pixel_A)
    rows = star.micrograph_rows(ts.name, ts.tilts, ts.tilt_axis_deg, ts.kind == "tilt_series")
    star.write_star(
        out / "corrected_micrographs.star",
        star.optics_block(ts.pixel_A, scope or Microscope(ts.voltage_kV)),
        star.corrected_micrographs(rows, motion, ts.pixel_A),
    )


def micrographs(ts: sess.TiltSeries, ws: Workspace, which: str = "corrected"):
    """The corrected micrographs (or the session's stack when there were no movies), (n, ny, nx) lazily."""
    path = ws.step("motioncorr") / f"{which}.mrc"
    if path.is_file():
        data = open_mrc(path).data
        return data[None] if data.ndim == 2 else data  # mrcfile reads a one-section stack as an image
    if which != "corrected":
        return None
    return sess.load_stack(ts)


# ---------------------------------------------------------------------------------------------------
# 2. CTF


NOMINAL_WINDOW = 0.5  # first pass: the target defocus (mdoc) ± 50 %
CONSENSUS_WINDOW = (0.1, 2000.0)  # tilt series, second pass: the series' median ± max(10 %, 2000 Å)


def estimate_ctf_series(ts: sess.TiltSeries, ws: Workspace, scope: Microscope, search: CTFSearch) -> dict:
    """A CTFFIND-like estimate per micrograph (Dask threads over tilts) + a diagnostic image each.

    A tilt image at 3 e/Å² holds faint Thon rings, and the full 0.2–9 µm search then often locks onto a
    far ring family. So the search starts around the target defocus the mdoc gives, and for a tilt series a
    second pass searches every tilt again around the series' median: the defocus of one series changes
    by a few hundred Å from tilt to tilt (CTFplotter and CTFFIND5 use the same prior), never by microns.
    Its astigmatism is the objective lens's, one for the series: fitted on all tilts together
    (:func:`~em_platform.cryo.ctf.fit_series_astigmatism`).
    """
    data = micrographs(ts, ws)
    n, ny, nx = data.shape
    box = min(search.box, max(128, min(ny, nx) // 2))
    search = CTFSearch(**{**search.__dict__, "box": box})

    tilts = [
        TiltedView(t.angle_deg, ts.tilt_axis_deg) if ts.kind == "tilt_series" else None for t in ts.tilts
    ]

    def run(windows: Sequence[tuple[float, float] | None]):
        def one(i: int):
            return estimate_ctf(
                np.asarray(data[i], np.float32), ts.pixel_A, scope, search, windows[i], tilts[i]
            )

        return dask.compute(*[dask.delayed(one)(i) for i in range(n)], scheduler="threads")

    windows: Sequence[tuple[float, float] | None] = [
        defocus_window(t.nominal_defocus_A, NOMINAL_WINDOW) if t.nominal_defocus_A else None for t in ts.tilts
    ]
    estimates = run(windows)
    consensus = None
    if ts.kind == "tilt_series" and n >= 3:
        consensus = float(np.median([e.mean_defocus_A for e in estimates]))
        around = [defocus_window(consensus, *CONSENSUS_WINDOW)] * n
        windows = around  # what the tilts' rows report
        estimates = fit_series_astigmatism(list(run(around)), scope, search, around)
    with ws.staged("ctf") as out:
        rows = []
        for tilt, est, window in zip(ts.tilts, estimates, windows, strict=True):
            png = out / f"diagnostic_{tilt.z_index:03d}.png"
            png.write_bytes(encode(to_image(diagnostic_image(est, scope).astype(np.float32), 256)))
            rows.append(
                {
                    "z_index": tilt.z_index,
                    "angle_deg": tilt.angle_deg,
                    "nominal_defocus_A": tilt.nominal_defocus_A,
                    "search_window_A": list(window) if window else None,
                    "diagnostic": str(ws.step("ctf") / png.name),
                    **est.summary(),
                }
            )
        doc = {
            "scope": scope.__dict__,
            "search": search.__dict__,
            "series_defocus_A": consensus,
            "tilts": rows,
        }
        base = star.micrograph_rows(ts.name, ts.tilts, ts.tilt_axis_deg, ts.kind == "tilt_series")
        star.write_star(
            out / "micrographs_ctf.star",
            star.optics_block(ts.pixel_A, scope),
            star.micrographs_ctf(base, rows),
        )
        _dump(out / "ctf.json", doc)
    return doc


# ---------------------------------------------------------------------------------------------------
# 3. Alignment


def view_angles(alignment: dict) -> np.ndarray:
    """Each view's in-plane angle from an ``alignment.json``: the tilt axis plus the view's own rotation."""
    axis = float(alignment["tilt_axis_angle_deg"])
    return np.array([axis + float(t.get("rotation_deg", 0.0)) for t in alignment["tilts"]])


def align_series(ts: sess.TiltSeries, ws: Workspace, settings: AlignmentSettings) -> dict:
    if ts.kind != "tilt_series":
        raise ValueError(f"{ts.key} is a single-particle set: no tilt series to align")
    data = micrographs(ts, ws)
    res = align_tilt_series(data, ts.angles_deg, ts.tilt_axis_deg, settings, pixel_A=ts.pixel_A)
    with ws.staged("alignment") as out:
        write_imod_files(
            str(out / ts.name),
            res.angles_deg,
            res.shifts_px,
            res.tilt_axis_angle_deg + res.rotations_deg,
            data.shape[1:],
        )
        doc = {
            "nominal_tilt_axis_deg": ts.tilt_axis_deg,
            **res.summary(),
            "axis_scores": {str(k): v for k, v in sorted(res.axis_scores.items())},
            "xf": str(ws.step("alignment") / f"{ts.name}.xf"),
            "tlt": str(ws.step("alignment") / f"{ts.name}.tlt"),
            "tilts": [
                {
                    "z_index": t.z_index,
                    "angle_deg": float(a),
                    "shift_px": [float(v) for v in s],
                    "rotation_deg": float(d),
                    "residual_px": float(r),
                    "score": float(c),
                }
                for t, a, s, d, r, c in zip(
                    ts.tilts,
                    res.angles_deg,
                    res.shifts_px,
                    res.rotations_deg,
                    res.residuals_px,
                    res.scores,
                    strict=True,
                )
            ],
        }
        _dump(out / "alignment.json", doc)
    return doc


# ---------------------------------------------------------------------------------------------------
# 4. Tomogram


@dataclass(frozen=True)
class TomogramSettings:
    binning: int = 0  # 0 = auto: the phantom's grid when simulated, else views ≤ 512 px wide
    thickness: int = 0  # binned voxels along z; 0 = thickness_nm, else THICKNESS_PRECEDENCE
    thickness_nm: float = 0.0  # 0 = the session's em_session.yaml, the phantom's, else estimated
    methods: tuple[str, ...] = ("wbp", "sirt")
    sirt_iterations: int = 20
    phase_flip: bool = True
    slab_rows: int = 32
    search_thickness_nm: float = 600.0  # the slab a thickness estimate searches (thicker than any ice imaged)


# where the tomogram's thickness comes from, first that applies (README, "Cryo processing")
THICKNESS_PRECEDENCE = (
    "run config (thickness, voxels)",
    "run config (thickness_nm)",
    "em_session.yaml (thickness_nm)",
    "the phantom's grid (simulated)",
    "estimated from the data",
)


def grid_for(
    ts: sess.TiltSeries, shape_yx: tuple[int, int], settings: TomogramSettings
) -> tuple[int, int, str]:
    """(binning, thickness in binned voxels or 0 = estimate it, where the thickness came from)."""
    b = settings.binning
    phantom = None
    if ts.truth is not None:
        from em_platform.simulation.truth import read_ground_truth

        phantom = read_ground_truth(ts.truth).phantom
    if not b and phantom is not None:
        b = max(1, int(round(phantom.voxel_size_A / ts.pixel_A)))
    b = b or max(1, math.ceil(max(shape_yx) / 512))
    voxel_nm = ts.pixel_A * b / 10.0
    candidates = (
        settings.thickness or None,
        round(settings.thickness_nm / voxel_nm) if settings.thickness_nm else None,
        round(ts.thickness_nm / voxel_nm) if ts.thickness_nm else None,
        int(phantom.shape_zyx[0]) if phantom is not None else None,
    )
    for source, nz in zip(THICKNESS_PRECEDENCE, candidates, strict=False):
        if nz:
            return int(b), max(2, int(nz)), source
    return int(b), 0, THICKNESS_PRECEDENCE[-1]


def estimate_slab(stack, angles, voxel_A: float, settings: TomogramSettings) -> dict:
    """Thickness and z-centre of the specimen from a quick WBP of the central rows (em_platform.cryo.thickness)."""
    n, ny, nx = stack.shape
    search = min(nx, max(32, round(settings.search_thickness_nm * 10 / voxel_A))) // 2 * 2
    rows = slice(max(0, ny // 2 - 64), min(ny, ny // 2 + 64))
    trial = reconstruct(np.asarray(stack[:, rows, :], np.float32), angles, search, slab_rows=64)
    profile = z_profile(trial)
    centre, extent = specimen_slab(profile)
    return {
        "thickness": thickness_for(extent, search),
        "z_offset": float(centre - search // 2),
        "slab_extent_voxels": extent,
        "search_thickness": search,
    }


def prepared_stack(
    data,
    out_path: Path,
    ts: sess.TiltSeries,
    shifts_px,
    axis_deg: float | np.ndarray,  # one angle, or one per view (view_angles)
    ctf_rows,
    binning: int,
    scope,
    flip: bool,
) -> np.ndarray:
    """Aligned (axis along y, shifts undone), phase-flipped per tilt in strips, as contrast, Fourier-binned;
    an MRC memmap."""
    n, ny, nx = data.shape
    small = (ny // binning // 2 * 2, nx // binning // 2 * 2)
    m = new_mrc_mmap(out_path, (n, *small), ts.pixel_A * binning)
    axes = np.broadcast_to(np.asarray(axis_deg, float), (n,))

    def one(i: int) -> None:
        view = np.asarray(data[i], np.float32)
        mean = float(view.mean())
        view = transform_view(view - mean, axes[i], shifts_px[i], order=3) + mean
        if flip and ctf_rows is not None:
            r = ctf_rows[i]
            params = CTFParams(r["defocus_u_A"], r["defocus_v_A"], r["astigmatism_angle_deg"] - axes[i])
            view = phase_flip(view, ts.pixel_A, params, ts.tilts[i].angle_deg, scope)
        # contrast (I − <I>)/<I>: the constant background of a view would back-project into a slab-shaped
        # low-frequency artefact, and tilts of unequal dose would weigh differently
        m.data[i] = fourier_bin((view - mean) / (abs(mean) if mean else 1.0), small)

    dask.compute(*[dask.delayed(one)(i) for i in range(n)], scheduler="threads")
    m.flush()
    return m.data


def reconstruct_to(
    path: Path,
    stack,
    angles,
    nz: int,
    method: str,
    voxel_A: float,
    settings: TomogramSettings,
    z_offset: float = 0.0,
):
    """A tomogram as an MRC of (nz, ny, nx) voxels, z along the beam (IMOD's orientation after
    ``trimvol -rx``), its voxel size in the header."""
    n, ny, nx = stack.shape
    m = new_mrc_mmap(path, (nz, ny, nx), voxel_A)
    try:
        reconstruct(
            stack,
            angles,
            nz,
            method=method,
            slab_rows=settings.slab_rows,
            out=m.data,
            iterations=settings.sirt_iterations,
            z_offset=z_offset,
        )
        m.update_header_stats()
    finally:
        m.close()
    return path


def tomogram_series(
    ts: sess.TiltSeries, ws: Workspace, scope: Microscope, settings: TomogramSettings, zarr_writer=None
) -> dict:
    """WBP (+ SIRT) tomograms of the aligned, phase-flipped, binned stack; even/odd half tomograms for
    denoising (from even/odd frames when there were movies, else from even/odd tilts); pictures.

    ``zarr_writer(path_of_mrc) -> dict`` publishes the first tomogram as OME-Zarr (the asset passes one).
    """
    ali = ws.json("alignment", "alignment.json")
    ctf_rows = ws.json("ctf", "ctf.json")["tilts"] if settings.phase_flip else None
    shifts = np.array([t["shift_px"] for t in ali["tilts"]])
    axis = float(ali["tilt_axis_angle_deg"])
    views = view_angles(ali)
    angles = np.array([t["angle_deg"] for t in ali["tilts"]])  # the fitted tilt angles (fiducials) or nominal
    data = micrographs(ts, ws)
    binning, nz, thickness_source = grid_for(ts, data.shape[1:], settings)
    voxel = ts.pixel_A * binning
    with ws.staged("tomogram") as out:
        stack = prepared_stack(
            data, out / "stack.mrc", ts, shifts, views, ctf_rows, binning, scope, settings.phase_flip
        )
        slab: dict[str, Any] = {"z_offset": 0.0}
        if not nz:
            slab = estimate_slab(stack, angles, voxel, settings)
            nz = slab["thickness"]
        z0 = slab["z_offset"]
        files = {}
        for method in settings.methods:
            path = out / f"{ts.name}_{method}.mrc"
            files[method] = str(reconstruct_to(path, stack, angles, nz, method, voxel, settings, z0))
        even, odd = micrographs(ts, ws, "even"), micrographs(ts, ws, "odd")
        if even is not None:
            halves_from = "frames"
            for name, half in (("even", even), ("odd", odd)):
                hs = prepared_stack(
                    half,
                    out / f"stack_{name}.mrc",
                    ts,
                    shifts,
                    views,
                    ctf_rows,
                    binning,
                    scope,
                    settings.phase_flip,
                )
                reconstruct_to(out / f"half_{name}.mrc", hs, angles, nz, "wbp", voxel, settings, z0)
                (out / f"stack_{name}.mrc").unlink()
        else:
            halves_from = "tilts"
            order = np.argsort(angles)
            for name, sel in (("even", order[0::2]), ("odd", order[1::2])):
                half = stack[sel]
                reconstruct_to(out / f"half_{name}.mrc", half, angles[sel], nz, "wbp", voxel, settings, z0)
        with open_mrc(out / f"{ts.name}_{settings.methods[0]}.mrc") as m:
            vol = np.asarray(m.data)
        from em_platform.cryo.thumbnails import central_slice, projections

        (out / "central_slice.png").write_bytes(encode(to_image(central_slice(vol), 512)))
        for k, img in projections(vol).items():
            (out / f"projection_{k}.png").write_bytes(encode(to_image(img, 512)))
        doc: dict[str, Any] = {
            "binning": binning,
            "voxel_size_A": voxel,
            "shape_zyx": list(vol.shape),
            "methods": list(settings.methods),
            "files": {k: str(ws.step("tomogram") / Path(v).name) for k, v in files.items()},
            "halves_from": halves_from,
            "phase_flipped": settings.phase_flip,
            "tilt_axis_angle_deg": axis,
            "thickness_nm": nz * voxel / 10.0,
            "thickness_source": thickness_source,
            "z_offset_voxels": z0,  # the volume's centre in the alignment's frame: on the specimen
            "thickness_estimate": slab if "thickness" in slab else None,
        }
        _dump(out / "tomogram.json", doc)
    if zarr_writer is not None:
        doc["ome_zarr"] = zarr_writer(Path(doc["files"][settings.methods[0]]), voxel)
        _dump(ws.step("tomogram") / "tomogram.json", doc)
    return doc


# ---------------------------------------------------------------------------------------------------
# 5. Denoising


def denoise_series(ts: sess.TiltSeries, ws: Workspace, method: str) -> dict:
    from em_platform.cryo.denoise import denoise

    tomo = ws.json("tomogram", "tomogram.json")
    src = Path(tomo["files"][tomo["methods"][0]])
    with open_mrc(src) as m:
        vol = np.asarray(m.data, np.float32)
    halves = [ws.step("tomogram") / f"half_{k}.mrc" for k in ("even", "odd")]
    even = odd = None
    if all(h.is_file() for h in halves):
        with open_mrc(halves[0]) as a, open_mrc(halves[1]) as b:
            even, odd = np.asarray(a.data, np.float32), np.asarray(b.data, np.float32)
    import time

    t0 = time.process_time()
    result, used = denoise(vol, method, even, odd)
    cpu = time.process_time() - t0
    with ws.staged("denoised") as out:
        path = out / f"{ts.name}_denoised.mrc"
        write_mrc(path, result, tomo["voxel_size_A"])
        from em_platform.cryo.thumbnails import central_slice

        (out / "central_slice.png").write_bytes(encode(to_image(central_slice(result), 512)))
        doc = {
            "method": used,
            "requested": method,
            "source": str(src),
            "file": str(ws.step("denoised") / path.name),
            "cpu_seconds": cpu,
        }
        _dump(out / "denoise.json", doc)
    return doc
