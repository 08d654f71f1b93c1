"""Motion correction on the frames detectors really write: non-square, odd-sized K3-shaped frames (5760 × 4092
scaled down), and movies read the ways sessions read them (a memory-mapped MRC through the lazy reader,
compressed TIFF into memory), all giving the in-memory result; and the BLAS thread limit it holds."""

from __future__ import annotations

import functools

import mrcfile
import numpy as np
import pytest
import tifffile

from em_platform.cryo.blas_threads import _openblas, single_threaded_blas
from em_platform.cryo.motion import MotionSettings, correct_movie, dose_weighted_sums
from em_platform.formats.mrc import read_mrc
from em_platform.formats.tiff import read_tiff
from em_platform.simulation.beam_motion import MovieSpec, movie_frames, specimen_image


@functools.lru_cache(maxsize=2)
def movie(**kw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    frames, gain, truth = movie_frames(MovieSpec(**kw))
    return np.stack(list(frames)), gain, truth


def rms(a: np.ndarray) -> float:
    return float(np.sqrt((np.asarray(a) ** 2).sum(axis=1).mean()))


K3_SMALL = {"shape": (1023, 1440), "n_frames": 24, "jump_px": 12.0, "hot_pixels": 30, "seed": 7}


def test_a_k3_shaped_movie_odd_and_non_square_is_followed_and_summed():
    """1440 × 1023 (a K3's 5760 × 4092 at a quarter, its height made odd): the drift to a tenth of a pixel,
    every sum at the frame's own shape, patches laid over the long side, and the sum shows the specimen as
    well as the same sum with the true drift does."""
    frames, gain, truth = movie(**K3_SMALL)
    res = correct_movie(frames, 1.0, 1.2, gain=gain, settings=MotionSettings(min_patch_px=256))
    assert res.micrograph.shape == res.even.shape == res.odd.shape == (1023, 1440)
    assert rms(res.shifts_px - truth) < 0.1, res.metrics
    assert res.metrics["patches_used"] == 5 * 3 and not res.local_applied
    clean = specimen_image(MovieSpec(**K3_SMALL))  # content at zero shift: what the aligned sum shows
    ideal, _, _ = dose_weighted_sums(frames, gain, truth, 1.0, 1.2)
    inner = (slice(32, -32), slice(32, -32))

    def agreement(img: np.ndarray) -> float:
        return float(np.corrcoef(img[inner].ravel(), clean[inner].ravel())[0, 1])

    assert agreement(res.micrograph) > 0.99 * agreement(ideal)
    assert agreement(res.micrograph) > agreement(frames.sum(axis=0) * gain) + 0.05
    assert set(res.timings["wall_s"]) == {"read", "gain_defects", "alignment", "patches", "sum"}


def test_local_motion_on_non_square_frames_is_applied_where_it_is():
    frames, gain, _ = movie(shape=(384, 640), n_frames=20, jump_px=6.0, doming_px=5.0, seed=8, contrast=0.1)
    res = correct_movie(
        frames, 1.0, 1.2, gain=gain, settings=MotionSettings(patches=(5, 3), min_patch_px=120)
    )
    assert res.local_applied and res.micrograph.shape == (384, 640), res.metrics


def test_a_movie_read_as_sessions_read_it_gives_the_in_memory_result(tmp_path):
    """The lazy MRC reader's dask array (used as the file's memory map) and a compressed TIFF (read into
    memory chunk by chunk, or streamed when over the cache) give the in-memory result exactly."""
    frames, gain, _ = movie(shape=(270, 400), n_frames=12, jump_px=5.0, hot_pixels=10, seed=9)
    settings = MotionSettings(patches=(1, 1))
    here = correct_movie(frames, 1.0, 1.2, gain=gain, settings=settings)
    with mrcfile.new(tmp_path / "m.mrc") as m:
        m.set_data(frames)
    tifffile.imwrite(tmp_path / "m.tif", frames, compression="zlib")
    sources = {
        "mrc": read_mrc(tmp_path / "m.mrc").data,
        "tiff": read_tiff(tmp_path / "m.tif").data,
        "tiff streamed": read_tiff(tmp_path / "m.tif").data,
    }
    for name, data in sources.items():
        cache = 0 if name == "tiff streamed" else 2048
        there = correct_movie(
            data, 1.0, 1.2, gain=gain, settings=MotionSettings(patches=(1, 1), cache_mib=cache)
        )
        assert np.allclose(there.shifts_px, here.shifts_px, atol=1e-6), name
        assert np.array_equal(there.micrograph, here.micrograph), name
        assert there.metrics["hot_pixels"] == here.metrics["hot_pixels"], name


@pytest.mark.skipif(not _openblas(), reason="no OpenBLAS loaded")
def test_blas_is_held_at_one_thread_inside_and_given_back():
    (setter, getter), *_ = _openblas()
    before = getter()
    with single_threaded_blas():
        with single_threaded_blas():  # nested (or a second movie in another thread)
            assert getter() == 1
        assert getter() == 1
    assert getter() == before
