"""Tomograms a user can keep: the tilt axis from a documented precedence, the thickness from the session's
settings or the data, the volume centred on the specimen, and IMOD files that IMOD's conventions read back.

IMOD is not installed here; its conventions are applied as IMOD's source states them (libcfshr/cubinterp.c,
which newstack uses: X' = A·(X − c) + D + c', c = (nx/2, ny/2) in 0-based pixel indices)."""

from __future__ import annotations

import math
import re

import dagster as dg
import mrcfile
import numpy as np
import pytest
from scipy import ndimage

from em_platform.cryo import processing as proc
from em_platform.cryo import session as sess
from em_platform.cryo.alignment import imod_xf, transform_view, write_imod_files
from em_platform.cryo.reconstruction import project
from em_platform.sensors.cryo import session_run_config
from tests.cryo.synthetic import make_tilt_series


def _imod_newstack(raw: np.ndarray, xf) -> np.ndarray:
    """A raw view transformed as IMOD's newstack does with one .xf line (cubinterp's inverse mapping)."""
    a11, a12, a21, a22, dx, dy = xf
    ny, nx = raw.shape
    a_inv = np.linalg.inv(np.array([[a11, a12], [a21, a22]]))
    yo, xo = np.mgrid[0:ny, 0:nx].astype(float)
    u = np.stack([xo - nx / 2 - dx, yo - ny / 2 - dy])
    xi, yi = np.tensordot(a_inv, u, axes=1) + np.array([nx / 2, ny / 2])[:, None, None]
    return ndimage.map_coordinates(raw, [yi, xi], order=3, mode="constant")


@pytest.mark.parametrize("shape", [(96, 128), (97, 129)])
def test_the_xf_file_read_as_imod_reads_it_gives_our_aligned_views(tmp_path, shape):
    rng = np.random.default_rng(0)
    raw = ndimage.gaussian_filter(rng.normal(size=shape), 3)
    shifts = np.array([[3.2, -1.7], [-2.5, 4.1]])
    axes = np.array([85.3, -4.0])
    xf_path, tlt_path = write_imod_files(str(tmp_path / "TS"), [-3.0, 57.5], shifts, axes, shape)
    lines = [[float(v) for v in line.split()] for line in open(xf_path)]
    assert len(lines) == 2 and all(len(v) == 6 for v in lines)
    assert [float(v) for v in open(tlt_path).read().split()] == [-3.0, 57.5]
    for xf, d, phi in zip(lines, shifts, axes, strict=True):
        ours = transform_view(raw, phi, d, order=3)
        imods = _imod_newstack(raw, xf)
        inner = (slice(20, -20), slice(20, -20))
        assert np.abs(ours - imods)[inner].max() < 0.02 * np.abs(raw).max(), (shape, phi)
    # and written as IMOD writes them: 4 × %12.7f, 2 × %12.3f
    assert re.fullmatch(r"( {0,3}-?\d+\.\d{7}){4}( +-?\d+\.\d{3}){2}\n", open(xf_path).readline())
    assert np.allclose(imod_xf(shifts, axes, shape), lines, atol=1e-3)


def _slab_volume(rng, shape_zyx, z_centre: float, thickness: float) -> np.ndarray:
    nz, ny, nx = shape_zyx
    vol = np.zeros(shape_zyx, np.float32)
    n = 400
    z = rng.uniform(z_centre - thickness / 2, z_centre + thickness / 2, n)
    y, x = rng.uniform(8, ny - 8, n), rng.uniform(8, nx - 8, n)
    vol[np.clip(np.rint(z).astype(int), 0, nz - 1), np.rint(y).astype(int), np.rint(x).astype(int)] = 1.0
    return ndimage.gaussian_filter(vol, 1.5)


def test_the_thickness_and_centre_are_estimated_from_the_data():
    """A 30-voxel specimen 20 voxels above the alignment's origin, in a series tilted ±60°: the estimate
    covers it (with a margin, no more than ~1.5×) and the volume is centred on it."""
    rng = np.random.default_rng(1)
    nz = 128
    true_offset, true_thickness = 20.0, 30.0
    vol = _slab_volume(rng, (nz, 64, 128), nz // 2 + true_offset, true_thickness)
    angles = np.arange(-60, 61, 3.0)
    stack = project(vol, angles) + 0.02 * rng.normal(size=(len(angles), 64, 128))
    settings = proc.TomogramSettings(search_thickness_nm=128 * 10.0 / 10.0)  # 128 voxels of 10 Å
    slab = proc.estimate_slab(stack.astype(np.float32), angles, 10.0, settings)
    assert abs(slab["z_offset"] - true_offset) <= 3, slab
    assert true_thickness <= slab["thickness"] <= 1.6 * true_thickness, slab


def _mdoc_without(mdoc, pattern: str) -> None:
    mdoc.write_text("\n".join(x for x in mdoc.read_text().splitlines() if not re.match(pattern, x)) + "\n")


def test_tilt_axis_precedence_and_tilt_angles_from_rawtlt(tmp_path):
    folder = tmp_path / "s" / "grid"
    make_tilt_series(folder, "TS_01", size=64, angles=(-20, 0, 20), frames=2, axis_deg=7.5, with_movies=False)
    mdoc = folder / "TS_01.mrc.mdoc"

    def one():
        (ts,), errors = sess.discover(tmp_path / "s", "sessions")
        assert errors == {}
        return ts

    ts = one()
    assert (ts.tilt_axis_deg, ts.axis_source) == (7.5, "mdoc title")
    text = (
        mdoc.read_text()
        .replace("Tilt axis angle = 7.5", "binning = 1")
        .replace("RotationAngle = 0", "RotationAngle = 84.2")
    )
    mdoc.write_text(text)
    ts = one()
    assert (ts.tilt_axis_deg, ts.axis_source) == (84.2, "mdoc RotationAngle")
    (folder / "em_session.yaml").write_text("tilt_axis_deg: -95.5\nthickness_nm: 180\n")
    ts = one()
    assert (ts.tilt_axis_deg, ts.axis_source, ts.thickness_nm) == (-95.5, "session settings", 180.0)
    (folder / "em_session.yaml").unlink()
    _mdoc_without(mdoc, r"RotationAngle")
    ts = one()
    assert (ts.tilt_axis_deg, ts.axis_source) == (0.0, "none: 0° assumed") and "0° assumed" in ts.notes[0]

    # no TiltAngle in the mdoc: IMOD's .rawtlt beside it gives them; neither is an error naming both
    _mdoc_without(mdoc, r"TiltAngle")
    (folder / "TS_01.rawtlt").write_text("-21.0\n0.5\n19.0\n")
    assert [t.angle_deg for t in one().tilts] == [-21.0, 0.5, 19.0]
    (folder / "TS_01.rawtlt").unlink()
    _, errors = sess.discover(tmp_path / "s", "sessions")
    assert re.search(
        r"TS_01\.mrc\.mdoc: ZValue 0 has no TiltAngle and there is no TS_01\.rawtlt", *errors.values()
    )


def test_a_bad_session_settings_file_is_named(tmp_path):
    folder = tmp_path / "s" / "grid"
    make_tilt_series(folder, "TS_01", size=64, angles=(-20, 0, 20), with_movies=False)
    for text, fault in (
        ("thickness: 100\n", r"unknown setting\(s\) \['thickness'\]"),
        ("thickness_nm: thick\n", "thickness_nm must be a number"),
        ("thickness_nm: -5\n", "thickness_nm must be positive"),
        ("[1, 2\n", "not valid YAML"),
    ):
        (folder / "em_session.yaml").write_text(text)
        _, errors = sess.discover(tmp_path / "s", "sessions")
        (error,) = errors.values()
        assert "em_session.yaml" in error and re.search(fault, error), error


def test_the_session_thickness_reaches_the_run_and_the_tomogram(tmp_path):
    folder = tmp_path / "s" / "grid"
    make_tilt_series(
        folder, "TS_01", size=96, angles=tuple(range(-45, 46, 15)), with_movies=False, thickness_px=24
    )
    (folder / "em_session.yaml").write_text("thickness_nm: 8\n")  # 2.5 Å px, binning 1: 32 voxels
    (tmp_path / "s" / "grid" / "ground_truth.json").unlink()  # a real session: no phantom grid
    (ts,), _ = sess.discover(tmp_path / "s", "sessions")
    config = session_run_config(ts)
    from em_platform.definitions import defs

    dg.validate_run_config(defs.resolve_job_def("cryo_job"), config)  # raises if cryo_job would refuse it
    assert config["ops"]["cryo__tomogram"]["config"] == {"thickness_nm": 8.0}
    assert proc.grid_for(ts, (96, 96), proc.TomogramSettings()) == (1, 32, "em_session.yaml (thickness_nm)")
    assert proc.grid_for(ts, (96, 96), proc.TomogramSettings(thickness_nm=5))[1:] == (
        20,
        "run config (thickness_nm)",
    )

    ws = proc.Workspace(tmp_path / "work", ts.key)
    from em_platform.cryo.alignment import AlignmentSettings
    from em_platform.cryo.ctf import CTFSearch
    from em_platform.cryo.motion import MotionSettings
    from em_platform.cryo.optics import Microscope

    scope = Microscope()
    proc.motion_correct(ts, ws, MotionSettings())
    proc.estimate_ctf_series(ts, ws, scope, CTFSearch(box=64))
    proc.align_series(ts, ws, AlignmentSettings())
    doc = proc.tomogram_series(ts, ws, scope, proc.TomogramSettings(methods=("wbp",)))
    assert doc["shape_zyx"][0] == 32 and doc["thickness_source"] == "em_session.yaml (thickness_nm)"
    with mrcfile.open(doc["files"]["wbp"]) as m:  # IMOD reads nx, ny, nz = x, y, z (beam) and the pixel
        assert (int(m.header.nx), int(m.header.ny), int(m.header.nz)) == (96, 96, 32)
        assert int(m.header.mode) == 2 and math.isclose(float(m.voxel_size.z), ts.pixel_A, rel_tol=1e-6)
