"""Session discovery on real SerialEM mdocs, and bad input named by file and fault."""

import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile

from em_platform.cryo import session as sess
from em_platform.cryo.ctf import CTFSearch, estimate_ctf
from em_platform.cryo.motion import MotionSettings, correct_movie
from em_platform.cryo.optics import Microscope
from tests.cryo.synthetic import make_tilt_series

DATA = Path(__file__).parent / "data"


def test_real_serialem_mdoc_is_described(tmp_path):
    folder = tmp_path / "session1"
    folder.mkdir()
    shutil.copy(DATA / "TS_01.mrc.mdoc", folder)
    found, errors = sess.discover(tmp_path, "sessions")
    assert errors == {} and [t.key for t in found] == ["sessions/session1/TS_01"]
    ts = found[0]
    assert (
        len(ts.tilts) == 41 and ts.tilt_axis_deg == pytest.approx(85.3) and ts.pixel_A == pytest.approx(5.4)
    )
    assert ts.tilts[0].nominal_defocus_A == pytest.approx(40000)  # TargetDefocus -4 µm = 4 µm underfocus
    assert ts.tilts[1].movie_name == "TS_01_001_3.0.mrc" and ts.tilts[1].n_frames == 8
    # a stack with fewer sections than the mdoc lists
    with mrcfile.new(folder / "TS_01.mrc") as m:
        m.set_data(np.zeros((40, 8, 8), np.float32))
    ts = sess.discover(tmp_path, "sessions")[0][0]
    with pytest.raises(sess.SessionError, match=r"TS_01\.mrc has 40 sections but its mdoc .* lists 41 tilts"):
        sess.load_stack(ts)


def test_real_micrograph_through_motion_correction_and_ctf():
    """A real Falcon micrograph (EPU): the estimate must be plausible against its header's applied defocus."""
    with mrcfile.open(DATA / "epu2.9_example_crop960.mrc", permissive=True) as m:
        image = np.asarray(m.data, np.float32)
        pixel = float(m.voxel_size.x)
        nominal_A = -float(m.indexed_extended_header["Applied defocus"][0]) * 1e10
        voltage = float(m.indexed_extended_header["HT"][0]) / 1e3
    res = correct_movie(image[None], pixel, 40.0, settings=MotionSettings())
    est = estimate_ctf(res.micrograph, pixel, Microscope(voltage, 2.7, 0.07), CTFSearch(box=480))
    assert 0.5 * nominal_A < est.mean_defocus_A < 2.0 * nominal_A, (est.mean_defocus_A, nominal_A)
    assert est.fit_resolution_A < 15 and est.cc > 0.05


@pytest.fixture
def small_session(tmp_path):
    make_tilt_series(tmp_path / "s" / "ts", "TS", size=96, angles=tuple(range(-30, 31, 10)), frames=4)
    return tmp_path


def _ts(root):
    return sess.discover(root, "sessions")[0][0]


def test_movie_with_a_missing_frame(small_session):
    ts = _ts(small_session)
    movie = ts.tilts[2].movie
    tifffile.imwrite(movie, tifffile.imread(movie)[:3])
    with pytest.raises(
        sess.SessionError, match=rf"{movie.name} has 3 frames but the mdoc .* NumSubFrames = 4"
    ):
        sess.load_movie(ts, ts.tilts[2])


def test_gain_reference_of_the_wrong_shape(small_session):
    ts = _ts(small_session)
    with mrcfile.new(ts.gain, overwrite=True) as m:
        m.set_data(np.ones((96, 80), np.float32))
    with pytest.raises(sess.SessionError, match=r"gain reference .*gain_ref\.mrc has shape \(96, 80\)"):
        sess.load_gain(ts.gain, (96, 96))


def test_truncated_stack(small_session):
    ts = _ts(small_session)
    size = ts.stack.stat().st_size
    with open(ts.stack, "r+b") as f:
        f.truncate(size - 5000)
    with pytest.raises(sess.SessionError, match=r"tilt-series stack .*TS\.mrc"):
        sess.load_stack(ts)
