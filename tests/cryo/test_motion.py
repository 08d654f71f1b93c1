"""Motion correction on movies with the physics that makes real ones hard (em_platform.simulation.beam_motion):
an early exponential jump, slow drift, weak phase contrast at 1.2 e/px/frame, per-pixel gain, hot pixels,
optionally local doming; plus the gain-reference rule."""

from __future__ import annotations

import functools
import math

import mrcfile
import numpy as np
import pytest

from em_platform.assets.cryo import MotionConfig
from em_platform.cryo.gain_reference import GainError, discover_gain, orient_gain, resolve_gain
from em_platform.cryo.motion import MotionSettings, correct_movie
from em_platform.cryo.session import load_gain
from em_platform.cryo.trajectory import fit_trajectory
from em_platform.simulation.beam_motion import MovieSpec, movie_frames


@functools.lru_cache(maxsize=4)
def movie(**kw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    frames, gain, truth = movie_frames(MovieSpec(**kw))
    return np.stack(list(frames)), gain, truth


def rms(a: np.ndarray) -> float:
    return float(np.sqrt((np.asarray(a) ** 2).sum(axis=1).mean()))


def test_an_early_jump_is_followed_to_a_tenth_of_a_pixel():
    frames, gain, truth = movie(
        shape=(768, 768), n_frames=40, jump_px=18.0, tau_frames=1.2, hot_pixels=40, seed=3
    )
    # the motion is one no cubic in time follows (the old prior): its best cubic is this far off
    basis = np.vander(np.linspace(-1, 1, 40), 4)
    cubic = basis @ np.linalg.lstsq(basis, truth, rcond=None)[0]
    assert rms(truth - cubic) > 0.4
    res = correct_movie(frames, 1.0, 1.2, gain=gain)
    assert rms(res.shifts_px - truth) < 0.1, res.metrics
    assert not res.local_applied
    assert res.metrics["hot_pixels"] >= 38


def test_the_trajectory_model_is_physics_where_it_fits_and_no_stronger_than_the_noise():
    t = np.arange(40.0)
    rng = np.random.default_rng(5)
    jump = np.column_stack(
        [14 * (1 - np.exp(-(t + 0.5) / 1.3)) + 0.1 * t, -9 * (1 - np.exp(-(t + 0.5) / 1.3))]
    )
    jump -= jump.mean(0)
    measured = jump + rng.normal(0, 0.3, jump.shape)
    fit = fit_trajectory(measured)
    assert fit.model == "physical" and abs(fit.tau_frames - 1.3) < 0.3
    assert rms(fit.shifts - jump) < 0.5 * rms(measured - jump)
    measured[17] += (2.5, -2.0)  # one failed correlation peak does not bend it
    assert rms(fit_trajectory(measured).shifts - jump) < 0.2
    # a path outside the family (the drift turns back): smoothed only as much as the noise asks
    kink = np.column_stack([np.where(t < 20, 0.3 * t, 6 - 0.25 * (t - 20)), 0.1 * t])
    kink -= kink.mean(0)
    noisy = kink + rng.normal(0, 0.15, kink.shape)
    smooth = fit_trajectory(noisy)
    assert smooth.model == "smooth" and rms(smooth.shifts - kink) < rms(noisy - kink)


def test_a_short_movie_whose_shifts_all_disagree_is_smoothed_not_refused():
    """Five frames (the demo's movies) where the robust weights would discard all but one or two frames:
    the smoothing then keeps every frame instead of solving a singular system."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        m = rng.normal(size=(5, 2)) * rng.choice([0.01, 0.1, 1.0, 5.0])
        m[rng.integers(5)] += rng.normal(size=2) * 20
        for model in ("physical", "smooth"):
            fit = fit_trajectory(m, model)
            assert fit.shifts.shape == (5, 2) and np.isfinite(fit.shifts).all()


@pytest.mark.parametrize("doming_px", [0.0, 5.0])
def test_local_motion_only_where_the_patches_show_it(doming_px):
    frames, gain, truth = movie(
        shape=(512, 512), n_frames=24, jump_px=8.0, doming_px=doming_px, seed=4, contrast=0.1
    )
    settings = MotionSettings(patches=(3, 3), min_patch_px=160)
    res = correct_movie(frames, 1.0, 1.2, gain=gain, settings=settings)
    assert res.local_applied == (doming_px > 0), res.metrics
    if doming_px:
        rigid = correct_movie(
            frames, 1.0, 1.2, gain=gain, settings=MotionSettings(patches=(3, 3), local_motion="off")
        )
        reference = movie_frames(
            MovieSpec(shape=(512, 512), n_frames=1, seed=4, contrast=0.1, jump_px=0.0, drift_px=0.0)
        )
        clean = next(reference[0]).astype(np.float64)

        def agreement(img: np.ndarray) -> float:
            return float(np.corrcoef(img[64:-64, 64:-64].ravel(), clean[64:-64, 64:-64].ravel())[0, 1])

        assert agreement(res.micrograph) > agreement(rigid.micrograph)


def test_hot_pixels_are_masked_not_summed():
    frames, gain, _ = movie(
        shape=(512, 512), n_frames=16, jump_px=6.0, hot_pixels=25, hot_extra_counts=8.0, seed=6
    )
    hot = np.argwhere(frames.sum(axis=0) > 5 * 16)  # injected: ~9 counts per frame against 1.2
    assert len(hot) >= 20
    masked = correct_movie(frames, 1.0, 1.2, gain=gain, settings=MotionSettings(patches=(1, 1)))
    kept = correct_movie(
        frames, 1.0, 1.2, gain=gain, settings=MotionSettings(patches=(1, 1), hot_pixel_sigma=0)
    )
    level = masked.micrograph.std()
    peaks = lambda img: np.abs(img - img.mean()).max() / level  # noqa: E731
    assert peaks(kept.micrograph) > 8 and peaks(masked.micrograph) < 6
    assert masked.metrics["hot_pixels"] == pytest.approx(len(hot), abs=3)


def _mrc(path, data) -> None:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data, np.float32))


def test_the_gain_reference_is_chosen_by_a_rule_not_by_the_first_file_found(tmp_path):
    session = tmp_path / "session"
    (session / "frames").mkdir(parents=True)
    _mrc(session / "K3_gain_old.mrc", np.ones((4, 6)))
    _mrc(session / "frames" / "CountRef_today_gain.mrc", np.full((4, 6), 2.0))
    dirs = [session, session / "frames"]
    found = discover_gain(dirs)
    with pytest.raises(
        GainError, match="2 gain references.*K3_gain_old.mrc.*CountRef_today_gain.mrc.*gain_reference"
    ):
        resolve_gain(found)
    assert resolve_gain(found, "frames/CountRef_today_gain.mrc", session).name == "CountRef_today_gain.mrc"
    named = discover_gain(dirs, r"X:\\K3\\CountRef_today_gain.mrc")  # SerialEM writes a Windows path
    assert named.rule == "mdoc" and resolve_gain(named).name == "CountRef_today_gain.mrc"
    with pytest.raises(GainError, match="names gain reference"):
        resolve_gain(discover_gain(dirs, "gone_gain.mrc"))
    with pytest.raises(GainError, match="no such file"):
        resolve_gain(found, "nothing_here.mrc", session)
    (session / "K3_gain_old.mrc").unlink()
    assert discover_gain(dirs).rule == "session"


def test_gain_rotation_and_flip_as_motioncor2():
    g = np.arange(6.0).reshape(2, 3)  # row 0 is y = 0: the bottom row as an MRC viewer shows it
    # -RotGain 1: 90° counter-clockwise with y up; the bottom-left pixel (0) goes to the bottom-right
    r = orient_gain(g, 1)
    assert r.shape == (3, 2) and r[0, -1] == 0
    assert np.array_equal(orient_gain(g, 2), g[::-1, ::-1])
    assert np.array_equal(orient_gain(g, 0, 1), g[::-1]) and np.array_equal(orient_gain(g, 0, 2), g[:, ::-1])
    with pytest.raises(GainError):
        orient_gain(g, 4)


def test_a_gain_turned_against_the_frames_is_named_and_the_rotation_setting_fixes_it(tmp_path):
    _mrc(tmp_path / "gain.mrc", np.ones((6, 4)))
    with pytest.raises(ValueError, match="after rotation 0.*gain_rotation"):
        load_gain(tmp_path / "gain.mrc", (4, 6))
    assert load_gain(tmp_path / "gain.mrc", (4, 6), rotation=1).shape == (4, 6)


def test_every_motion_setting_is_in_the_asset_config():
    settings = MotionConfig(
        trajectory="smooth", local_motion="off", hot_pixel_sigma=0, gain_rotation=3
    ).settings()
    assert (settings.trajectory, settings.local_motion, settings.hot_pixel_sigma, settings.gain_rotation) == (
        "smooth", "off", 0, 3,
    )  # fmt: skip
    # the optics are the micrographs' STAR file's (corrected_micrographs.star), not motion settings
    user_facing = set(MotionConfig.model_fields) - {"patches_x", "patches_y", "cs_mm", "amplitude_contrast"}
    assert user_facing <= {f for f in MotionSettings.__dataclass_fields__}
    with pytest.raises(ValueError, match="trajectory 'cubic'"):
        MotionConfig(trajectory="cubic").settings()
    assert math.isfinite(MotionConfig().settings().local_significance)


def test_movies_run_as_tasks_on_a_dask_cluster_and_give_the_same_micrographs(tmp_path):
    """With a cluster (two worker processes, as the deployment's), each movie is a task: the worker reads it
    and writes its section; the result is the in-process one, and the worker's memory limit bounds its cache."""
    from distributed import Client, LocalCluster

    from em_platform.cryo import processing as proc
    from em_platform.cryo import session as sess
    from tests.cryo.synthetic import make_movie_set

    make_movie_set(tmp_path / "s" / "g" / "spa", n_movies=3, size=256, frames=6, seed=9)
    (series,), errors = sess.discover(tmp_path / "s", "sessions")
    assert errors == {}
    settings = MotionSettings(patches=(1, 1))
    here = proc.motion_correct(series, proc.Workspace(tmp_path / "here", series.key), settings)
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            memory_limit="1GiB",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        there = proc.motion_correct(series, proc.Workspace(tmp_path / "there", series.key), settings, client)
        ran = {w["id"] for w in client.run(lambda dask_worker: {"id": dask_worker.id}).values()}
    assert there["ran_on"] == "dask cluster" and here["ran_on"] == "in process" and len(ran) == 2
    for a, b in zip(here["tilts"], there["tilts"], strict=True):
        assert np.allclose(a["shifts_px"], b["shifts_px"], atol=1e-6)
    for name in ("corrected", "even", "odd"):
        mine = mrcfile.read(tmp_path / "here" / series.key / "motioncorr" / f"{name}.mrc")
        theirs = mrcfile.read(tmp_path / "there" / series.key / "motioncorr" / f"{name}.mrc")
        assert np.allclose(mine, theirs, atol=1e-5 * np.abs(mine).max())
