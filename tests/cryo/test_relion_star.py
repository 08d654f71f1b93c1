"""RELION STAR files of the motion-corrected micrographs and the CTF fits, read back with the `starfile`
package (the reader RELION's Python tools use): a tilt series (RELION 5's tomography columns) and a
single-particle movie set, every value against the pipeline's own JSON and micrographs."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import starfile

from em_platform.cryo import processing as proc
from em_platform.cryo import session as sess
from em_platform.cryo.ctf import CTFSearch
from em_platform.cryo.motion import MotionSettings
from em_platform.cryo.optics import Microscope
from tests.cryo.synthetic import make_movie_set, make_tilt_series

SCOPE = Microscope(300.0, 2.7, 0.07)


def _process(root, tmp_path):
    (ts,), errors = sess.discover(root, "sessions")
    assert errors == {}
    ws = proc.Workspace(tmp_path / "work", ts.key)
    scope = Microscope(ts.voltage_kV, 2.7, 0.1)  # Q0 0.1: the file must carry what the run was given
    proc.motion_correct(ts, ws, MotionSettings(patches=(1, 1)), scope=scope)
    proc.estimate_ctf_series(ts, ws, scope, CTFSearch(box=128))
    return ts, ws


def _check_common(ts, ws, star_path, blocks):
    assert set(blocks) == {"optics", "micrographs"}, star_path
    optics = blocks["optics"].iloc[0]
    assert optics["rlnOpticsGroupName"] == "opticsGroup1" and optics["rlnOpticsGroup"] == 1
    assert optics["rlnMicrographPixelSize"] == pytest.approx(ts.pixel_A)
    assert optics["rlnMicrographOriginalPixelSize"] == pytest.approx(ts.pixel_A)
    assert optics["rlnVoltage"] == pytest.approx(ts.voltage_kV)
    assert (optics["rlnSphericalAberration"], optics["rlnAmplitudeContrast"]) == pytest.approx((2.7, 0.1))
    mics = blocks["micrographs"]
    assert len(mics) == len(ts.tilts) and set(mics["rlnOpticsGroup"]) == {1}
    stack = mrcfile.open(ws.step("motioncorr") / "corrected.mrc").data.reshape(len(ts.tilts), *ts_shape(ws))
    for i, name in enumerate(mics["rlnMicrographName"]):
        with mrcfile.open(ws.dir / name) as m:  # relative to the series' folder, RELION's project directory
            assert np.array_equal(m.data, stack[i]) and float(m.voxel_size.x) == pytest.approx(ts.pixel_A)
    return mics


def ts_shape(ws):
    return tuple(json.loads((ws.step("motioncorr") / "motion.json").read_text())["shape"][1:])


def test_a_tilt_series_continues_in_relion(tmp_path):
    make_tilt_series(tmp_path / "sessions" / "g", "TS_01", size=128, angles=(-30, -15, 0, 15, 30), frames=3)
    ts, ws = _process(tmp_path / "sessions", tmp_path)

    motion = json.loads((ws.step("motioncorr") / "motion.json").read_text())["tilts"]
    mics = _check_common(
        ts, ws, "corrected", starfile.read(ws.step("motioncorr") / "corrected_micrographs.star")
    )
    assert mics["rlnAccumMotionTotal"].to_numpy() == pytest.approx(
        [m["total_motion_px"] * ts.pixel_A for m in motion]
    )
    assert mics["rlnAccumMotionEarly"].to_numpy() + mics["rlnAccumMotionLate"].to_numpy() == pytest.approx(
        mics["rlnAccumMotionTotal"].to_numpy()
    )
    assert set(mics["rlnTomoName"]) == {"TS_01"}
    assert mics["rlnTomoNominalStageTiltAngle"].tolist() == pytest.approx([t.angle_deg for t in ts.tilts])
    assert mics["rlnTomoNominalTiltAxisAngle"].to_numpy() == pytest.approx([ts.tilt_axis_deg] * len(ts.tilts))
    assert mics["rlnMicrographPreExposure"].tolist() == pytest.approx(
        [t.accumulated_dose_e_per_A2 for t in ts.tilts]
    )
    assert all(mics["rlnTomoNominalDefocus"] < 0)  # SerialEM's sign: negative is underfocus, in µm
    assert [n.rsplit("/", 1)[-1] for n in mics["rlnMicrographMovieName"]] == [t.movie_name for t in ts.tilts]

    ctf = json.loads((ws.step("ctf") / "ctf.json").read_text())["tilts"]
    cmics = _check_common(ts, ws, "ctf", starfile.read(ws.step("ctf") / "micrographs_ctf.star"))
    assert cmics["rlnMicrographName"].tolist() == mics["rlnMicrographName"].tolist()
    assert cmics["rlnDefocusU"].to_numpy() == pytest.approx([c["defocus_u_A"] for c in ctf])
    assert cmics["rlnDefocusV"].to_numpy() == pytest.approx([c["defocus_v_A"] for c in ctf])
    assert cmics["rlnDefocusAngle"].to_numpy() == pytest.approx([c["astigmatism_angle_deg"] for c in ctf])
    assert cmics["rlnCtfAstigmatism"].to_numpy() == pytest.approx([c["astigmatism_A"] for c in ctf])
    assert cmics["rlnCtfFigureOfMerit"].to_numpy() == pytest.approx([c["cc"] for c in ctf], abs=1e-6)  # %.6f
    assert cmics["rlnCtfMaxResolution"].to_numpy() == pytest.approx([c["fit_resolution_A"] for c in ctf])
    assert all(cmics["rlnDefocusU"] >= cmics["rlnDefocusV"])  # RELION's (and CTFFIND's) U ≥ V


def test_a_single_particle_session_has_no_tomography_columns(tmp_path):
    make_movie_set(tmp_path / "sessions" / "spa", n_movies=2, size=128, frames=3, seed=4, pixel_A=1.5)
    ts, ws = _process(tmp_path / "sessions", tmp_path)
    blocks = starfile.read(ws.step("ctf") / "micrographs_ctf.star")
    mics = _check_common(ts, ws, "ctf", blocks)
    assert not [c for c in mics.columns if c.startswith("rlnTomo")]
    assert "rlnCtfIceRingDensity" in mics.columns  # 1.5 Å/px reaches the ice band (0.25-0.28 /Å)
