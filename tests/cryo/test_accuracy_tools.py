"""The pieces that make tilt-image processing accurate at tilt-series dose: gold-fiducial alignment, the
series-wide CTF fit, patch gating and smooth drift, and the alignment score's gauge. Forward models here
are written independently of the code under test (3×3 rotation matrices as the simulator composes them)."""

import math

import numpy as np

from em_platform.cryo.ctf import CTFSearch, estimate_ctf, fit_series_astigmatism
from em_platform.cryo.evaluation import alignment_figures
from em_platform.cryo.fiducials import FiducialSettings, detect_beads, fiducial_alignment
from em_platform.cryo.motion import MotionSettings, patch_grid
from em_platform.cryo.optics import CTFParams, Microscope, ctf_2d
from em_platform.simulation.truth import GroundTruth, TiltTruth

SCOPE = Microscope(300.0, 2.7, 0.07)
NOISE = 4.0
PIXEL_A = 4.0
BEAD_RADIUS_PX = 12.5  # 10 nm gold at 4 Å/px


def _project(beads_px, angle_deg, axis_deg, shift_px, centre):
    """Rz(φ)·Ry(θ) on (x, y, z), keep (x, y), then shift and put the origin at the centre."""
    t, r = math.radians(angle_deg), math.radians(axis_deg)
    ry = np.array([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return (beads_px @ (rz @ ry).T)[:, :2] + np.asarray(shift_px) + centre


def _render(points, shape, rng, radius=BEAD_RADIUS_PX):
    """Dark gold discs (soft edges) on a noisy grey field."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, 100.0)
    for x, y in points:
        d = np.hypot(xx - x, yy - y)
        img -= 40.0 / (1 + np.exp((d - radius) / 1.5))
    return rng.poisson(img).astype(np.float32)


def test_beads_are_found_where_they_are_to_a_fraction_of_a_pixel():
    rng = np.random.default_rng(3)
    truth = np.array([[100.3, 120.7], [300.6, 90.2], [210.1, 330.9], [380.4, 400.5]])
    found, _ = detect_beads(_render(truth, (512, 512), rng), BEAD_RADIUS_PX)
    assert len(found) == len(truth)
    nearest = np.hypot(*(found[:, None, :] - truth[None]).transpose(2, 0, 1)).min(axis=0)
    assert nearest.max() < 0.35, nearest


def _series(rng, n_beads=12, size=512):
    angles = np.arange(-60.0, 61.0, 4.0)
    n = len(angles)
    beads = np.column_stack(
        [rng.uniform(-170, 170, n_beads), rng.uniform(-200, 200, n_beads), rng.uniform(-30, 30, n_beads)]
    )
    true_angles = angles + rng.normal(0, 0.5, n)
    rotations = rng.normal(0, 0.3, n)
    shifts = rng.normal(0, 2.0, (n, 2))
    axis = 4.0
    centre = np.array([size // 2, size // 2], float)
    views = np.stack(
        [
            _render(
                _project(beads, true_angles[i], axis + rotations[i], shifts[i], centre), (size, size), rng
            )
            for i in range(n)
        ]
    )
    truth = GroundTruth(
        stack="synthetic",
        spec_name="synthetic",
        seed=0,
        spec={},
        pixel_size_A=PIXEL_A,
        image_shape_yx=[size, size],
        voltage_kV=300.0,
        cs_mm=2.7,
        amplitude_contrast=0.07,
        tilt_axis_angle_deg=axis,
        tilts=[
            TiltTruth(
                z_index=i,
                nominal_angle_deg=float(angles[i]),
                true_angle_deg=float(true_angles[i]),
                in_plane_rotation_deg=float(rotations[i]),
                shift_px=[float(v) for v in shifts[i]],
                shift_A=[float(v) * PIXEL_A for v in shifts[i]],
                defocus_u_A=30000.0,
                defocus_v_A=30000.0,
                astigmatism_angle_deg=0.0,
                dose_e_per_A2=3.0,
                accumulated_dose_e_per_A2=3.0 * i,
                frames=None,
            )
            for i in range(n)
        ],
        particles=[],
        fiducials=[],
        phantom=None,
        files={},
    )
    return views, angles, truth


def test_fiducial_alignment_recovers_shifts_rotations_and_the_axis():
    """Every view is turned (σ 0.3°), shifted (σ 2 px) and misses its tilt angle (σ 0.5°); the beads pin
    it all down from a start that knows none of it."""
    rng = np.random.default_rng(7)
    views, angles, truth = _series(rng)
    solution = fiducial_alignment(views, angles, 3.5, np.zeros((len(angles), 2)), PIXEL_A, FiducialSettings())
    assert solution is not None and solution.summary["beads"] >= 10
    doc = {
        "tilt_axis_angle_deg": solution.tilt_axis_angle_deg,
        "tilts": [
            {"z_index": i, "shift_px": list(solution.shifts_px[i]), "rotation_deg": solution.rotations_deg[i]}
            for i in range(len(angles))
        ],
    }
    figures = alignment_figures(doc, truth)
    assert figures["shift_rms_error_px"] < 0.3, figures
    assert figures["rotation_rms_error_deg"] < 0.05, figures
    assert figures["tilt_axis_error_deg"] < 0.1, figures
    offsets = solution.angle_offsets_deg - solution.angle_offsets_deg.mean()
    true_offsets = np.array([t.true_angle_deg - t.nominal_angle_deg for t in truth.tilts])
    high = np.abs(angles) > 20  # tilt-angle errors show as stretch, invisible near 0°
    assert np.sqrt(np.mean((offsets - (true_offsets - true_offsets.mean()))[high] ** 2)) < 0.15


def test_too_few_beads_leave_the_marker_free_alignment_in_place():
    rng = np.random.default_rng(8)
    views, angles, _ = _series(rng, n_beads=2)
    assert fiducial_alignment(views, angles, 4.0, np.zeros((len(angles), 2)), PIXEL_A) is None


def test_alignment_gauge_is_a_translation_of_the_specimen():
    """Shifts that only move the tomogram (translation, height z0·sinθ, lateral x0·(cosθ − 1) across the
    axis) score zero; a real error does not."""
    rng = np.random.default_rng(1)
    _, angles, truth = _series(rng, n_beads=0, size=64)
    phi = math.radians(truth.tilt_axis_angle_deg)
    perp = np.array([math.cos(phi), math.sin(phi)])
    true = np.array([t.shift_px for t in truth.tilts])
    theta = np.radians([t.true_angle_deg for t in truth.tilts])
    gauge = np.array([3.0, -2.0]) + (7.0 * np.sin(theta) + 5.0 * (np.cos(theta) - 1))[:, None] * perp

    def score(shifts):
        doc = {
            "tilt_axis_angle_deg": truth.tilt_axis_angle_deg,
            "tilts": [{"z_index": i, "shift_px": list(s)} for i, s in enumerate(shifts)],
        }
        return alignment_figures(doc, truth)["shift_rms_error_px"]

    assert score(true + gauge) < 1e-9
    assert score(true + gauge + rng.normal(0, 1.0, true.shape)) > 0.5


def test_one_astigmatism_for_the_series_beats_each_tilt_alone():
    """Faint Thon rings per tilt (heavy noise): the per-tilt astigmatism angles scatter, the joint fit of
    the series lands within 3° of the truth."""
    rng = np.random.default_rng(5)
    n, px = 512, 2.0
    truth_angle = 30.0
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(n, px), np.fft.fftfreq(n, px)))
    search = CTFSearch(box=256)
    estimates, windows = [], []
    for _ in range(15):
        mean = 15000.0 + rng.normal(0, 300)
        params = CTFParams(mean + 500, mean - 500, truth_angle)
        img = np.fft.ifft2(
            np.fft.fft2(rng.normal(size=(n, n))) * ctf_2d((n, n), px, params, SCOPE) * np.exp(-100 * k**2)
        ).real
        img += NOISE * img.std() * rng.normal(size=(n, n))
        window = (12000.0, 18000.0)
        estimates.append(estimate_ctf(img, px, SCOPE, search, window))
        windows.append(window)

    def angle_error(e):
        d = (e.astigmatism_angle_deg - truth_angle) % 180
        return min(d, 180 - d)

    joint = fit_series_astigmatism(estimates, SCOPE, search, windows)
    assert angle_error(joint[0]) < 3.0
    assert np.median([angle_error(e) for e in estimates]) > angle_error(joint[0])
    assert all(abs(e.astigmatism_A - 1000) < 300 for e in joint)


def test_patches_need_enough_pixels_each():
    settings = MotionSettings(patches=(5, 5), min_patch_px=512)
    assert patch_grid(settings, (512, 512)) == (1, 1)
    assert patch_grid(settings, (4096, 4096)) == (5, 5)
    assert patch_grid(settings, (2048, 1536)) == (3, 4)  # (x, y) of a (ny, nx) frame
