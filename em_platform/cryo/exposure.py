"""One exposure of a live single-particle session, processed as soon as its movie is complete: motion
correction (em_platform.cryo.motion), the CTF fit around the mdoc's target defocus (em_platform.cryo.ctf),
and what the session's screen shows of it (a thumbnail, the power spectrum beside its fit).

Its files are named by the movie, written under a temporary name and renamed: processing an exposure again
replaces them, never adds a second set, and a worker killed mid-way leaves no half-written file under a
final name."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from em_platform.cryo import session as sess
from em_platform.cryo.ctf import CTFSearch, defocus_window, diagnostic_image, estimate_ctf
from em_platform.cryo.motion import MotionSettings, correct_movie, fourier_bin
from em_platform.cryo.optics import Microscope
from em_platform.cryo.part_files import part_path
from em_platform.cryo.processing import NOMINAL_WINDOW, write_mrc
from em_platform.cryo.thumbnails import encode, mrc_to_jpeg, to_image

MICROGRAPHS, THUMBNAILS, SPECTRA = "micrographs", "thumbnails", "spectra"
# The CTF is fitted on the micrograph Fourier-cropped to about this pixel size (Nyquist 4 Å: CTFFIND's band
# ends at 5 Å) with the box cropped alike, so the rings are sampled as finely: a quarter of the work at 1 Å/px,
# which a live session's minute per exposure needs on two cores. The micrograph written is not cropped.
CTF_PIXEL_A = 2.0


@dataclass(frozen=True)
class ExposureSettings:
    motion: MotionSettings = MotionSettings()
    ctf: CTFSearch = CTFSearch()
    scope: Microscope = Microscope(300.0)


def stem_of(movie: str) -> str:
    """The exposure's name in the output folders: its movie's path in the session, suffixes dropped and
    folders joined with ``__`` (two grid squares may hold movies of one name)."""
    path = PurePosixPath(movie)
    name = path.name
    for suffix in sess.MOVIE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return "__".join((*path.parent.parts, name))


def process_exposure(ts: sess.TiltSeries, out: Path, movie: str, settings: ExposureSettings) -> dict:
    """Motion-correct and CTF-fit ``ts``'s one movie (a one-exposure set, :func:`describe_movie_set`) into
    ``out``; returns the stored figures and the files, relative to ``out``. A bad movie raises
    :class:`~em_platform.cryo.session.SessionError` naming it."""
    (tilt,) = ts.tilts
    frames = sess.load_movie(ts, tilt)
    gain = _gain(ts.gain, tuple(frames.shape[1:]), settings.motion.gain_rotation, settings.motion.gain_flip)
    dpf = tilt.frame_dose_e_per_A2 or (tilt.dose_e_per_A2 / frames.shape[0] if tilt.dose_e_per_A2 else 0.0)
    scope = Microscope(ts.voltage_kV, settings.scope.cs_mm, settings.scope.amplitude_contrast)
    try:
        res = correct_movie(
            frames, ts.pixel_A, dpf, gain=gain, voltage_kV=ts.voltage_kV, settings=settings.motion
        )
    except (ValueError, OSError) as exc:
        raise sess.SessionError(f"movie {tilt.movie}: motion correction failed: {exc}") from exc
    micrograph = res.micrograph
    if not np.isfinite(micrograph).all():
        raise sess.SessionError(f"movie {tilt.movie}: its frames hold NaN or infinite values")
    image, pixel_A, binning = ctf_view(micrograph, ts.pixel_A)
    ny, nx = image.shape
    box = min(max(128, settings.ctf.box // binning), max(128, min(ny, nx) // 2))
    search = CTFSearch(**{**settings.ctf.__dict__, "box": box})
    window = defocus_window(tilt.nominal_defocus_A, NOMINAL_WINDOW) if tilt.nominal_defocus_A else None
    try:
        est = estimate_ctf(image, pixel_A, scope, search, window)
    except ValueError as exc:
        raise sess.SessionError(f"movie {tilt.movie}: CTF fit failed: {exc}") from exc
    stem = stem_of(movie)
    files = {
        "micrograph": f"{MICROGRAPHS}/{stem}.mrc",
        "thumbnail": f"{THUMBNAILS}/{stem}.jpg",
        "spectrum": f"{SPECTRA}/{stem}.png",
    }
    _replace(out / files["micrograph"], lambda p: write_mrc(p, micrograph, ts.pixel_A))
    _replace(out / files["thumbnail"], lambda p: p.write_bytes(mrc_to_jpeg(image, 512)))  # the cropped one
    spectrum = encode(to_image(diagnostic_image(est, scope).astype(np.float32), 256))
    _replace(out / files["spectrum"], lambda p: p.write_bytes(spectrum))
    m = res.metrics
    return {
        **files,
        "movie_path": str(tilt.movie),
        "pixel_a": ts.pixel_A,
        "voltage_kv": ts.voltage_kV,
        "dose_per_frame_e_per_a2": dpf,
        "n_frames": int(frames.shape[0]),
        "total_motion_a": m["total_motion_px"] * ts.pixel_A,
        "early_motion_a": m["early_motion_px"] * ts.pixel_A,
        "late_motion_a": m["late_motion_px"] * ts.pixel_A,
        "defocus_u_a": est.defocus_u_A,
        "defocus_v_a": est.defocus_v_A,
        "defocus_angle_deg": est.astigmatism_angle_deg,
        "astigmatism_a": est.astigmatism_A,
        "ctf_fit_resolution_a": est.fit_resolution_A,
        "ctf_figure_of_merit": est.cc,
        "ice_ring_density": est.ice_ring_density,
    }


def ctf_view(micrograph: np.ndarray, pixel_A: float) -> tuple[np.ndarray, float, int]:
    """(the image the CTF is fitted on, its pixel size, the whole binning): :data:`CTF_PIXEL_A`'s crop."""
    binning = max(1, int(CTF_PIXEL_A / pixel_A + 1e-6))
    if binning == 1:
        return micrograph, pixel_A, 1
    ny, nx = (micrograph.shape[0] // binning) * binning, (micrograph.shape[1] // binning) * binning
    cropped = fourier_bin(micrograph[:ny, :nx], (ny // binning, nx // binning))
    return cropped, pixel_A * binning, binning


_GAINS: dict[tuple, np.ndarray] = {}  # the session's gain reference, read once while its file is unchanged


def _gain(path: Path | None, shape: tuple[int, int], rotation: int, flip: int) -> np.ndarray | None:
    if path is None:
        return None
    st = path.stat()
    key = (path, st.st_size, st.st_mtime_ns, shape, rotation, flip)
    if key not in _GAINS:
        _GAINS.clear()  # one session's camera at a time is the usual case: keep one
        gain = sess.load_gain(path, shape, rotation, flip)
        assert gain is not None  # path is not None
        gain.setflags(write=False)  # shared by every exposure: nothing may change it
        _GAINS[key] = gain
    return _GAINS[key]


def _replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(path)
    try:
        write(part)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
