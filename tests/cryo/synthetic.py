"""Small synthetic cryo-ET sessions with known answers (test fixtures, not a simulator).

The specimen is a sum of 3-D Gaussian blobs, so every projection is known in closed form (a blob at
(x, y, z) projects to a 2-D Gaussian at x' = x·cos θ + z·sin θ, y' = y), independent of the processing's
own projector. Each view is CTF-modulated (closed-form −sin χ, with a white "ice" term so Thon rings show),
rotated by the tilt axis angle, shifted, and recorded as drifting movie frames of Poisson counts divided by
a gain reference. Files follow the simulator/processing contract (mdoc, stack, frames/, gain_ref.mrc,
phantom.mrc, ground_truth.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mrcfile
import numpy as np
from scipy import ndimage

from em_platform.cryo.optics import CTFParams, Microscope, ctf_2d
from em_platform.simulation.truth import SCHEMA

ICE_SD = 0.1


def blobs(rng, n: int, extent_px: tuple[float, float, float], sigma_px=(1.5, 3.0)) -> np.ndarray:
    """(n, 5): x, y, z (px from the centre), sigma, amplitude."""
    ex, ey, ez = extent_px
    return np.column_stack(
        [
            rng.uniform(-ex, ex, n),
            rng.uniform(-ey, ey, n),
            rng.uniform(-ez, ez, n),
            rng.uniform(*sigma_px, n),
            rng.uniform(0.5, 1.0, n),
        ]
    )


def project_blobs(b: np.ndarray, angle_deg: float, shape: tuple[int, int]) -> np.ndarray:
    """Closed-form projection (line integral along z) of the blobs at tilt ``angle_deg``."""
    ny, nx = shape
    t = math.radians(angle_deg)
    xs = np.arange(nx) - nx // 2
    ys = np.arange(ny) - ny // 2
    out = np.zeros(shape)
    for x, y, z, s, a in b:
        u = x * math.cos(t) + z * math.sin(t)
        gx = np.exp(-((xs - u) ** 2) / (2 * s * s))
        gy = np.exp(-((ys - y) ** 2) / (2 * s * s))
        out += a * math.sqrt(2 * math.pi) * s * np.outer(gy, gx)
    return out


def blob_volume(b: np.ndarray, shape_zyx: tuple[int, int, int], scale: float = 1.0) -> np.ndarray:
    """The blobs sampled on a grid whose voxel is ``scale`` image pixels (the FSC reference)."""
    nz, ny, nx = shape_zyx
    zs, ys, xs = ((np.arange(n) - n // 2) * scale for n in (nz, ny, nx))
    vol = np.zeros(shape_zyx, np.float32)
    for x, y, z, s, a in b:
        gz = np.exp(-((zs - z) ** 2) / (2 * s * s))
        gy = np.exp(-((ys - y) ** 2) / (2 * s * s))
        gx = np.exp(-((xs - x) ** 2) / (2 * s * s))
        vol += (a * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]).astype(np.float32)
    return vol


def rotate_shift(image: np.ndarray, angle_deg: float, shift_xy) -> np.ndarray:
    """Content rotated counter-clockwise by ``angle_deg`` about the centre, then moved by ``shift_xy``."""
    ny, nx = image.shape
    c = np.array([ny // 2, nx // 2], float)
    a = math.radians(-angle_deg)  # output p samples the input at R(−angle)(p − c − d) + c
    m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])  # on (x, y)
    m_yx = np.array([[m[1, 1], m[1, 0]], [m[0, 1], m[0, 0]]])
    d = np.array([shift_xy[1], shift_xy[0]])
    offset = c - m_yx @ (c + d)
    return ndimage.affine_transform(image, m_yx, offset=offset, order=3, mode="nearest")


def fourier_shift(image: np.ndarray, shift_xy) -> np.ndarray:
    ky = np.fft.fftfreq(image.shape[0])[:, None]
    kx = np.fft.fftfreq(image.shape[1])[None, :]
    ramp = np.exp(-2j * np.pi * (kx * shift_xy[0] + ky * shift_xy[1]))
    return np.fft.ifft2(np.fft.fft2(image) * ramp).real


def ctf_image(
    signal: np.ndarray, ice: np.ndarray, pixel_A: float, params: CTFParams, scope: Microscope
) -> np.ndarray:
    """Weak-phase image: 1 + CTF ⊛ (−contrast·signal + ice), an envelope rolling the CTF off."""
    ctf = ctf_2d(signal.shape, pixel_A, params, scope)
    ky = np.fft.fftfreq(signal.shape[0], d=pixel_A)[:, None]
    kx = np.fft.fftfreq(signal.shape[1], d=pixel_A)[None, :]
    env = np.exp(-40.0 * (kx**2 + ky**2))
    phase = 0.5 * signal / max(signal.max(), 1e-9) + ice
    return 1.0 + np.fft.ifft2(np.fft.fft2(phase) * ctf * env).real


def write_mrc(path: Path, data: np.ndarray, voxel: float) -> None:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data))
        if np.asarray(data).ndim == 3:
            m.set_image_stack()
        m.voxel_size = voxel


def _movie_frames(rng, image, counts_per_px: float, drift: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """The dose-fractionated movie of ``image``: one Poisson frame per row of ``drift`` (x, y px), the
    exposure's ``counts_per_px`` shared out evenly, divided by the gain reference (the camera's counts)."""
    lam = np.clip(image, 0, None) * counts_per_px / len(drift)
    return np.stack([rng.poisson(np.clip(fourier_shift(lam, d), 0, None) / gain) for d in drift])


def make_tilt_series(
    folder: Path,
    name: str,
    *,
    seed: int = 0,
    size: int = 192,
    angles=tuple(range(-60, 61, 6)),
    pixel_A: float = 2.5,
    axis_deg: float = 4.0,
    defocus_A: float = 25000.0,
    astigmatism_A: float = 1200.0,
    frames: int = 6,
    dose_per_tilt: float = 12.0,
    shift_sigma_px: float = 2.5,
    drift_px: float = 3.0,
    with_movies: bool = True,
    phantom_binning: int = 2,
    thickness_px: int = 48,
) -> dict:
    """Write one tilt series (contract layout) into ``folder``; returns the truth dict."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    scope = Microscope(300.0, 2.7, 0.07)
    shape = (size, size)
    b = blobs(rng, 80, (size * 0.35, size * 0.35, thickness_px * 0.3))
    gain = rng.uniform(0.85, 1.15, shape).astype(np.float32)
    counts_per_px = dose_per_tilt * pixel_A**2
    order = sorted(range(len(angles)), key=lambda i: (abs(angles[i]), angles[i]))  # dose-symmetric-ish
    stack, clean, tilts, movies = [], [], [], []
    accumulated = 0.0
    (folder / "frames").mkdir(exist_ok=True)
    for z, idx in enumerate(order):
        ang = float(angles[idx])
        true_ang = ang + float(rng.normal(0, 0.2))
        shift = rng.normal(0, shift_sigma_px, 2)
        df = defocus_A + float(rng.normal(0, 500))
        params = CTFParams(df + astigmatism_A / 2, df - astigmatism_A / 2, float(rng.uniform(-80, 80)))
        # rendered on a larger canvas and cropped after the rotation: no border artefacts in the field
        big = (int(size * 1.5) // 2 * 2,) * 2
        ice = rng.normal(0, ICE_SD, big)
        ideal = ctf_image(project_blobs(b, true_ang, big), ice, pixel_A, params, scope)
        m = (big[0] - size) // 2
        image = rotate_shift(ideal, axis_deg, shift)[m : m + size, m : m + size]
        clean.append(image.astype(np.float32))
        t = np.linspace(0, 1, frames)
        drift = np.column_stack([drift_px * t + 0.5 * rng.normal() * t**2, -0.7 * drift_px * t**1.5])
        raw = _movie_frames(rng, image, counts_per_px, drift, gain)
        stack.append((rng.poisson(np.clip(image, 0, None) * counts_per_px)).astype(np.float32))
        movie = f"{name}_{z:03d}_{ang:.1f}.tif"
        if with_movies:
            import tifffile

            tifffile.imwrite(folder / "frames" / movie, raw.astype(np.uint16))
        movies.append(movie)
        tilts.append(
            {
                "z_index": z,
                "nominal_angle_deg": ang,
                "true_angle_deg": true_ang,
                "in_plane_rotation_deg": 0.0,
                "shift_px": [float(shift[0]), float(shift[1])],
                "shift_A": [float(shift[0] * pixel_A), float(shift[1] * pixel_A)],
                "defocus_u_A": params.defocus_u_A,
                "defocus_v_A": params.defocus_v_A,
                "astigmatism_angle_deg": params.astigmatism_angle_deg,
                "dose_e_per_A2": dose_per_tilt,
                "accumulated_dose_e_per_A2": accumulated,
                "frames": {
                    "count": frames,
                    "dose_e_per_A2": dose_per_tilt / frames,
                    "drift_px": drift.tolist(),
                    "file": f"frames/{movie}",
                }
                if with_movies
                else None,
            }
        )
        accumulated += dose_per_tilt
    write_mrc(folder / f"{name}.mrc", np.stack(stack), pixel_A)
    write_mrc(folder / f"{name}_noiseless.mrc", np.stack(clean) * counts_per_px, pixel_A)
    write_mrc(folder / "gain_ref.mrc", gain, pixel_A)
    pshape = (thickness_px // phantom_binning, size // phantom_binning, size // phantom_binning)
    write_mrc(folder / "phantom.mrc", blob_volume(b, pshape, phantom_binning), pixel_A * phantom_binning)
    lines = [
        f"PixelSpacing = {pixel_A}",
        "Voltage = 300",
        f"ImageFile = {name}.mrc",
        f"ImageSize = {size} {size}",
        "DataMode = 2",
        "",
        f"[T = SerialEM: synthetic test session   Tilt axis angle = {axis_deg}, binning = 1  spot = 8  camera = 0]",
        "",
    ]
    for t, movie in zip(tilts, movies, strict=True):
        lines += [
            f"[ZValue = {t['z_index']}]",
            f"TiltAngle = {t['nominal_angle_deg']}",
            f"ExposureDose = {dose_per_tilt}",
            f"PixelSpacing = {pixel_A}",
            f"Defocus = {-defocus_A / 1e4}",
            f"TargetDefocus = {-defocus_A / 1e4}",
            "RotationAngle = 0",
            "ExposureTime = 1.0",
        ]
        if with_movies:
            lines += [
                f"SubFramePath = X:\\session\\frames\\{movie}",
                f"NumSubFrames = {frames}",
                f"FrameDosesAndNumber = {dose_per_tilt / frames} {frames}",
            ]
        lines += ["DateTime = 23-Nov-26  10:00:00", ""]
    (folder / f"{name}.mrc.mdoc").write_text("\n".join(lines))
    truth = {
        "schema": SCHEMA,
        "stack": name,
        "spec_name": "synthetic",
        "seed": seed,
        "spec": {},
        "pixel_size_A": pixel_A,
        "image_shape_yx": [size, size],
        "voltage_kV": 300.0,
        "cs_mm": 2.7,
        "amplitude_contrast": 0.07,
        "tilt_axis_angle_deg": axis_deg,
        "tilts": tilts,
        "particles": [],
        "fiducials": [],
        "phantom": {
            "file": "phantom.mrc",
            "voxel_size_A": pixel_A * phantom_binning,
            "shape_zyx": list(pshape),
        },
        "files": {
            "tilt_series": f"{name}.mrc",
            "noiseless": f"{name}_noiseless.mrc",
            "mdoc": f"{name}.mrc.mdoc",
            "gain_ref": "gain_ref.mrc",
        },
    }
    (folder / "ground_truth.json").write_text(json.dumps(truth, indent=1))
    if not with_movies:
        (folder / "gain_ref.mrc").unlink()
        (folder / "frames").rmdir()
    return truth


def make_movie_set(
    folder: Path,
    *,
    n_movies: int = 2,
    seed: int = 0,
    size: int = 256,
    pixel_A: float = 2.0,
    defocus_A: float = 15000.0,
    astigmatism_A: float = 600.0,
    frames: int = 4,
    dose_per_movie: float = 40.0,
    drift_px: float = 3.0,
) -> list[dict]:
    """A single-particle session folder as SerialEM writes it: one movie (TIFF) and one frame-set mdoc
    (``[FrameSet = 0]``) per exposure, a gain reference beside them; returns each movie's truth."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    scope = Microscope(300.0, 2.7, 0.07)
    gain = rng.uniform(0.85, 1.15, (size, size)).astype(np.float32)
    write_mrc(folder / "gain_ref.mrc", gain, pixel_A)
    counts_per_px = dose_per_movie * pixel_A**2
    truths = []
    for i in range(n_movies):
        b = blobs(rng, 120, (size * 0.45, size * 0.45, 10.0))
        df = defocus_A + float(rng.normal(0, 1000))
        params = CTFParams(df + astigmatism_A / 2, df - astigmatism_A / 2, float(rng.uniform(-80, 80)))
        ice = rng.normal(0, ICE_SD, (size, size))
        image = ctf_image(project_blobs(b, 0.0, (size, size)), ice, pixel_A, params, scope)
        t = np.linspace(0, 1, frames)
        drift = np.column_stack([drift_px * t, -0.5 * drift_px * t**1.5])
        raw = _movie_frames(rng, image, counts_per_px, drift, gain)
        movie = f"FoilHole_{i:04d}_fractions.tif"
        import tifffile

        tifffile.imwrite(folder / movie, raw.astype(np.uint16))
        lines = [
            f"PixelSpacing = {pixel_A}",
            "Voltage = 300",
            f"ImageFile = {movie}",
            f"ImageSize = {size} {size}",
            "DataMode = 1",
            "",
            "[T = SerialEM: synthetic single-particle session]",
            "",
            "[FrameSet = 0]",
            "TiltAngle = 0.01",
            f"ExposureDose = {dose_per_movie}",
            f"PixelSpacing = {pixel_A}",
            f"Defocus = {-defocus_A / 1e4}",
            f"TargetDefocus = {-defocus_A / 1e4}",
            "ExposureTime = 2.0",
            f"SubFramePath = X:\\spa\\{movie}",
            f"NumSubFrames = {frames}",
            f"FrameDosesAndNumber = {dose_per_movie / frames} {frames}",
            "DateTime = 23-Nov-26  11:00:00",
            "",
        ]
        (folder / f"{movie}.mdoc").write_text("\n".join(lines))
        truths.append(
            {
                "movie": movie,
                "defocus_u_A": params.defocus_u_A,
                "defocus_v_A": params.defocus_v_A,
                "astigmatism_angle_deg": params.astigmatism_angle_deg,
                "drift_px": drift.tolist(),
            }
        )
    return truths


def thon_micrograph(
    rng,
    n: int,
    pixel_A: float,
    params: CTFParams,
    scope: Microscope,
    dose_e_per_A2: float,
    b_factor_A2: float = 150.0,
    tilt_deg: float = 0.0,
    axis_deg: float = 0.0,
    strip_px: int = 16,
) -> np.ndarray:
    """Counts of a weak-phase specimen (white-noise phase plus thickness variation on a 60 Å scale) through
    the CTF, an envelope exp(−B k²/4) and the pixel's sinc, at ``dose_e_per_A2`` (Poisson). A tilted view is
    built strip by strip across the tilt axis, each strip at its own defocus Δf − x'·tan θ."""
    from em_platform.cryo.optics import aberration_phase, defocus_at_azimuth, frequency_grid

    k, az = frequency_grid((n, n), pixel_A)
    phase = rng.normal(size=(n, n)) * 0.08 * pixel_A
    thick = ndimage.gaussian_filter(rng.normal(size=(n, n)), 60.0 / pixel_A)
    spectrum = np.fft.fft2(phase + thick / thick.std())
    fy, fx = np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :]
    envelope = np.exp(-b_factor_A2 * k**2 / 4) * np.sinc(fx) * np.sinc(fy)

    def image_at(p: CTFParams) -> np.ndarray:
        ctf = np.sin(aberration_phase(k, defocus_at_azimuth(p, az), scope))
        return 1.0 - 2 * np.fft.ifft2(spectrum * ctf * envelope).real

    if tilt_deg == 0:
        image = image_at(params)
    else:
        phi = np.radians(axis_deg)
        yy, xx = np.mgrid[0:n, 0:n] - n / 2
        across = xx * np.cos(phi) + yy * np.sin(phi)
        image = np.zeros((n, n))
        for start in np.arange(across.min(), across.max() + strip_px, strip_px):
            sel = (across >= start) & (across < start + strip_px)
            if sel.any():
                dz = (start + strip_px / 2) * pixel_A * np.tan(np.radians(tilt_deg))
                p = CTFParams(params.defocus_u_A - dz, params.defocus_v_A - dz, params.astigmatism_angle_deg)
                image[sel] = image_at(p)[sel]
    return rng.poisson(np.clip(image, 0, None) * dose_e_per_A2 * pixel_A**2).astype(np.float32)


def phase_flip_by_definition(view, pixel_A, params, tilt_deg, scope, tolerance_A=200.0):
    """Each strip from a whole-plane flip with that strip's own CTF (IMOD ctfphaseflip's scheme, literally, in
    double precision): the reference em_platform.cryo.ctf_correction.phase_flip is tested and timed against."""
    from em_platform.cryo.ctf_correction import strip_width_px

    view = view.astype(np.float64)
    ny, nx = view.shape
    mean = view.mean()
    ft = np.fft.fft2(view - mean)
    width = strip_width_px(tilt_deg, pixel_A, nx, tolerance_A)
    slope = math.tan(math.radians(tilt_deg)) * pixel_A
    out = np.empty_like(view)
    for x0 in range(0, nx, width):
        x1 = min(nx, x0 + width)
        shift = -((x0 + x1) / 2 - nx // 2) * slope
        local = CTFParams(
            params.defocus_u_A + shift, params.defocus_v_A + shift, params.astigmatism_angle_deg
        )
        out[:, x0:x1] = np.fft.ifft2(ft * np.sign(ctf_2d((ny, nx), pixel_A, local, scope))).real[:, x0:x1]
    return out + mean


def ctf_correlation_by_definition(spectrum, k, az, params, scope) -> float:
    """The CTF fits' score, literally: the normalised cross-correlation of a zero-mean ``spectrum`` (values at
    frequencies ``k``, azimuths ``az``) with CTF² (sin²χ) minus its mean; the reference ThonRings is tested
    and timed against."""
    from em_platform.cryo.optics import aberration_phase, defocus_at_azimuth

    model = np.sin(aberration_phase(k, defocus_at_azimuth(params, az), scope)) ** 2
    model = model - model.mean()
    return float((spectrum * model).sum()) / (math.sqrt(float((model * model).sum())) + 1e-30)
