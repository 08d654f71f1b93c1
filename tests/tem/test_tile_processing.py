"""The per-tile chain: reading, flatfield, CLAHE, statistics, focus score, process_tile."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import tifffile

from em_platform.tem.tile_processing import (
    Flatfield,
    ProcessedTile,
    TileReadError,
    clahe,
    focus_score,
    process_tile,
    read_tile,
    tile_statistics,
)

# ----------------------------------------------------------------------------------------------------
# A synthetic EM-like specimen (also used by test_matching)


def em_like_specimen(shape: tuple[int, int], seed: int = 0, mean: float = 140.0) -> np.ndarray:
    """float32, noise-free: smoothed-noise cytoplasm, thin dark membranes, a few dark granules."""
    rng = np.random.default_rng(seed)

    def smooth(sigma: float) -> np.ndarray:
        a = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), sigma)
        return a / a.std()

    texture = 0.4 * smooth(1.5) + 0.6 * smooth(6.0)
    f = smooth(14.0)
    gradient = np.hypot(cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3)) / 8
    membranes = np.exp(-0.5 * (np.abs(f) / np.maximum(gradient, 1e-3) / 1.2) ** 2)
    granules = np.clip(smooth(4.0) - 2.2, 0, None)
    return (mean + 18 * texture - 70 * membranes - 60 * granules).astype(np.float32)


def shot_noise(image: np.ndarray, dose: float | None, seed: int, mean: float = 140.0) -> np.ndarray:
    """Poisson noise at ``dose`` electrons per pixel for the mean grey level; rounded to uint8."""
    image = np.clip(image, 0, None)
    if dose:
        rng = np.random.default_rng(seed)
        image = rng.poisson(image * (dose / mean)).astype(np.float32) * (mean / dose)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def specimen() -> np.ndarray:
    return em_like_specimen((768, 768), seed=3)


# ----------------------------------------------------------------------------------------------------
# read_tile


def test_read_tile_round_trips_tiff_and_png(tmp_path):
    rng = np.random.default_rng(0)
    a8 = rng.integers(0, 256, (64, 80), dtype=np.uint8)
    a16 = rng.integers(0, 65536, (64, 80), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tiff", a8)
    tifffile.imwrite(tmp_path / "b.tif", a16, compression="zlib")
    cv2.imwrite(str(tmp_path / "c.png"), a8)
    np.testing.assert_array_equal(read_tile(tmp_path / "a.tiff"), a8)
    np.testing.assert_array_equal(read_tile(str(tmp_path / "b.tif"), expected_shape=(64, 80)), a16)
    np.testing.assert_array_equal(read_tile(tmp_path / "c.png"), a8)
    with open(tmp_path / "a.tiff", "rb") as fh:
        np.testing.assert_array_equal(read_tile(fh), a8)


@pytest.mark.parametrize("cut", [0.5, 0.999, 100, 7])
def test_read_tile_names_a_truncated_file(tmp_path, cut):
    a = np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "good.tiff", a)
    data = (tmp_path / "good.tiff").read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut
    (tmp_path / "tile_0042.tiff").write_bytes(data[:n])
    with pytest.raises(TileReadError, match="tile_0042.tiff.*(corrupt|truncated)"):
        read_tile(tmp_path / "tile_0042.tiff")


def test_read_tile_rejects_garbage_missing_colour_and_wrong_shape(tmp_path):
    (tmp_path / "junk.tiff").write_bytes(b"this is not an image")
    with pytest.raises(TileReadError, match="junk.tiff"):
        read_tile(tmp_path / "junk.tiff")
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(TileReadError, match="junk.png"):
        read_tile(tmp_path / "junk.png")
    with pytest.raises(TileReadError, match="missing.tiff"):
        read_tile(tmp_path / "missing.tiff")
    tifffile.imwrite(tmp_path / "rgb.tiff", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(TileReadError, match="single-channel"):
        read_tile(tmp_path / "rgb.tiff")
    tifffile.imwrite(tmp_path / "float.tiff", np.zeros((10, 10), np.float32))
    with pytest.raises(TileReadError, match="float32"):
        read_tile(tmp_path / "float.tiff")
    tifffile.imwrite(tmp_path / "small.tiff", np.zeros((10, 12), np.uint8))
    with pytest.raises(TileReadError, match="10×12 px, expected 20×20"):
        read_tile(tmp_path / "small.tiff", expected_shape=(20, 20))


# ----------------------------------------------------------------------------------------------------
# Flatfield


def _camera(shape, dark_level=12.0, beam=200.0):
    """Vignetting falling off by 30 % to the corners, a dark offset with fixed-pattern columns."""
    h, w = shape
    y, x = np.mgrid[:h, :w].astype(np.float32)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    vignetting = 1 - 0.3 * ((x - cx) ** 2 + (y - cy) ** 2) / (cx**2 + cy**2)
    dark = dark_level + 3 * (np.arange(w) % 7 == 0)[None, :].astype(np.float32) + 2 * y / h
    return vignetting.astype(np.float32), dark.astype(np.float32), beam


def _exposure(vignetting, dark, level, rng, dtype=np.uint8):
    """One camera frame of a uniform specimen transmitting ``level`` counts at the centre: shot noise
    on the signal, read noise on the dark offset."""
    signal = rng.poisson(vignetting * level).astype(np.float32)
    frame = signal + dark + rng.normal(0, 0.7, dark.shape)
    info = np.iinfo(dtype)
    return np.clip(np.rint(frame), info.min, info.max).astype(dtype)


def _block_means(image, block=64):
    h, w = image.shape
    return (
        image[: h // block * block, : w // block * block]
        .reshape(h // block, block, w // block, block)
        .mean(axis=(1, 3))
    )


@pytest.mark.parametrize("dtype,beam", [(np.uint8, 200.0), (np.uint16, 3000.0)])
def test_flatfield_removes_vignetting_to_under_one_percent(dtype, beam):
    rng = np.random.default_rng(7)
    shape = (512, 640)
    vignetting, dark, _ = _camera(shape, beam=beam)
    bright_frames = [_exposure(vignetting, dark, beam, rng, dtype) for _ in range(16)]
    dark_frames = [_exposure(vignetting, dark, 0.0, rng, dtype) for _ in range(16)]
    flatfield = Flatfield.from_frames(bright_frames, dark_frames)
    raw = _exposure(vignetting, dark, 0.7 * beam, rng, dtype)  # a uniform specimen, 70 % transmission

    before = _block_means(raw.astype(np.float64))
    corrected = flatfield.apply(raw)
    assert corrected.dtype == dtype and corrected.shape == raw.shape
    after = _block_means(corrected.astype(np.float64))
    assert before.max() / before.min() - 1 > 0.25  # the test has something to remove …
    assert after.max() / after.min() - 1 < 0.01  # … and it is gone: < 1 % residual non-uniformity
    smooth = cv2.GaussianBlur(corrected.astype(np.float32), (0, 0), 16)[32:-32, 32:-32]
    assert smooth.std() / smooth.mean() < 0.003  # (what is left is shot noise, not vignetting)
    # brightness scale kept: a 70 % specimen lands at 70 % of mean(bright − dark)
    assert corrected.mean() == pytest.approx(0.7 * flatfield.scale, rel=0.01)
    assert flatfield.scale == pytest.approx(beam * vignetting.mean(), rel=0.01)
    assert (flatfield.n_bright, flatfield.n_dark, flatfield.invalid_pixels) == (16, 16, 0)


def test_flatfield_apply_is_the_formula_rounded_and_clipped():
    rng = np.random.default_rng(2)
    bright = rng.uniform(120, 250, (70, 90)).astype(np.float32)
    dark = rng.uniform(0, 20, (70, 90)).astype(np.float32)
    raw = rng.integers(0, 256, (70, 90), dtype=np.uint8)
    flatfield = Flatfield.from_references(bright, dark)
    response = bright.astype(np.float64) - dark
    expected = np.clip(np.rint((raw - dark) / response * response.mean()), 0, 255)
    got = flatfield.apply(raw).astype(np.float64)
    assert np.abs(got - expected).max() <= 1  # float32 vs float64 rounding at .5
    assert (got == expected).mean() > 0.99
    assert got.max() == 255 and got.min() == 0  # clipped at both ends, no wrap-around
    out = np.empty_like(raw)
    assert flatfield.apply(raw, out=out) is out
    # a stack of frames is the same as a list, and one frame is accepted as is
    stack = np.stack([bright, bright + 2])
    a = Flatfield.from_frames(stack, [dark, dark])
    b = Flatfield.from_frames(list(stack), iter([dark, dark]))
    np.testing.assert_array_equal(a.gain, b.gain)
    np.testing.assert_array_equal(Flatfield.from_frames(bright, dark).gain, flatfield.gain)


def test_flatfield_guards_dead_and_inverted_pixels():
    bright = np.full((40, 50), 200.0, np.float32)
    dark = np.full((40, 50), 10.0, np.float32)
    bright[5, 5] = 10.0  # no response
    bright[6, 6] = 3.0  # darker than dark
    bright[7, 7] = 12.0  # 2 counts of response: below 5 % of the mean
    flatfield = Flatfield.from_references(bright, dark)
    assert flatfield.invalid_pixels == 3
    assert np.isfinite(flatfield.gain).all() and flatfield.gain.max() <= 20
    raw = np.full((40, 50), 105, np.uint8)
    corrected = flatfield.apply(raw)
    assert corrected[5, 5] == corrected[6, 6] == corrected[7, 7] == 95  # gain 1: dark removed only
    assert corrected[0, 0] == round(95 / 190 * flatfield.scale)
    with pytest.raises(ValueError, match="nowhere brighter"):
        Flatfield.from_references(dark, bright * 0 + 50)


def test_flatfield_from_reference_files(tmp_path):
    bright = np.random.default_rng(3).uniform(150, 220, (32, 48)).astype(np.float32)
    dark = np.full((32, 48), 9, np.uint16)
    tifffile.imwrite(tmp_path / "brightfield.tiff", bright)
    tifffile.imwrite(tmp_path / "darkfield.tiff", dark)
    flatfield = Flatfield.from_files(tmp_path / "brightfield.tiff", tmp_path / "darkfield.tiff")
    np.testing.assert_array_equal(flatfield.gain, Flatfield.from_references(bright, dark).gain)
    with pytest.raises(OSError, match="darkfield reference .*nothere.tiff"):
        Flatfield.from_files(tmp_path / "brightfield.tiff", tmp_path / "nothere.tiff")


def test_flatfield_arrays_are_realigned():
    """Arrays unpickled from a Dask transfer can start at odd addresses; OpenCV is slow on them."""
    flatfield = Flatfield.from_references(np.full((30, 40), 200.0), np.full((30, 40), 10.0))
    raw_buffer = bytearray(flatfield.gain.nbytes + 1)
    odd = np.frombuffer(memoryview(raw_buffer)[1:], dtype=np.float32).reshape(30, 40)
    odd[...] = flatfield.gain
    assert not odd.flags.aligned
    moved = Flatfield(odd, flatfield.offset, flatfield.scale)
    assert moved.gain.flags.aligned and moved.gain.flags.c_contiguous
    raw = np.full((30, 40), 100, np.uint8)
    np.testing.assert_array_equal(moved.apply(raw), flatfield.apply(raw))
    assert pickle.loads(pickle.dumps(flatfield, protocol=5)).gain.flags.aligned


def test_flatfield_rejects_mismatches():
    flatfield = Flatfield.from_references(np.full((8, 8), 100.0), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="wrong camera"):
        flatfield.apply(np.zeros((8, 9), np.uint8))
    with pytest.raises(TypeError, match="uint8 or uint16"):
        flatfield.apply(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="same camera"):
        Flatfield.from_frames([np.ones((8, 8))], [np.zeros((8, 9))])
    with pytest.raises(ValueError, match="frame 1"):
        Flatfield.from_frames([np.ones((8, 8)), np.ones((9, 8))], [np.zeros((8, 8))])
    with pytest.raises(ValueError, match="no brightfield frames"):
        Flatfield.from_frames([], [np.zeros((8, 8))])


# ----------------------------------------------------------------------------------------------------
# CLAHE


def test_clahe_is_opencv_and_raises_local_contrast(specimen):
    flat = (120 + (specimen - 140) / 8).astype(np.uint8)  # a low-contrast tile
    enhanced = clahe(flat)
    expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(16, 16)).apply(flat)
    np.testing.assert_array_equal(enhanced, expected)
    assert _block_std(enhanced) > 1.5 * _block_std(flat)
    wide = flat.astype(np.uint16) * 257
    np.testing.assert_array_equal(clahe(wide, 3.0, (8, 4)), cv2.createCLAHE(3.0, (8, 4)).apply(wide))
    with pytest.raises(TypeError, match="uint8 or uint16"):
        clahe(flat.astype(np.float32))


@pytest.mark.parametrize("shape", [(768, 768), (333, 517)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_clahe_in_place_equals_out_of_place(specimen, shape, dtype):
    """process_tile runs CLAHE in place on the flatfield output; this holds while OpenCV builds all
    lookup tables before mapping pixels."""
    image = np.clip(specimen[: shape[0], : shape[1]], 0, 255).astype(dtype) * (
        200 if dtype == np.uint16 else 1
    )
    buffer = image.copy()
    assert clahe(buffer, out=buffer) is buffer
    np.testing.assert_array_equal(buffer, clahe(image))
    with pytest.raises(ValueError, match="C-contiguous"):
        clahe(image, out=np.empty((3, 3), dtype))


def _block_std(image, block=48):
    h, w = image.shape
    blocks = image[: h // block * block, : w // block * block].reshape(h // block, block, w // block, block)
    return float(blocks.astype(np.float64).std(axis=(1, 3)).mean())


# ----------------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tile_statistics_equal_numpy(dtype):
    rng = np.random.default_rng(5)
    high = np.iinfo(dtype).max
    image = np.clip(rng.normal(0.4 * high, 0.15 * high, (333, 517)), 3, high - 5).astype(dtype)
    stats = tile_statistics(image)
    ref = image.astype(np.float64)
    assert stats["min"] == int(image.min()) and stats["max"] == int(image.max())
    assert stats["mean_float"] == pytest.approx(ref.mean(), rel=1e-9)
    assert stats["std_float"] == pytest.approx(ref.std(), rel=1e-9)
    assert stats["mean"] == round(ref.mean()) and stats["std"] == round(ref.std())
    assert all(type(stats[k]) is int for k in ("min", "max", "mean", "std"))
    expected_hist = np.histogram(image, bins=256, range=(0, high + 1))[0]
    assert stats["histogram"] == expected_hist.tolist()
    assert sum(stats["histogram"]) == image.size and len(stats["histogram"]) == 256


def test_tile_statistics_count_exactly_beyond_float32_precision():
    """A saturated 4097² tile: 16,785,407 pixels in one bin, an odd count above 2**24 that a float32
    count (what cv2.calcHist returns) cannot hold."""
    image = np.full((4097, 4097), 255, np.uint8)
    image[0, :2] = 3
    assert float(np.float32(4097 * 4097 - 2)) != 4097 * 4097 - 2
    stats = tile_statistics(image)
    assert stats["histogram"][255] == 4097 * 4097 - 2 and stats["histogram"][3] == 2
    assert (stats["min"], stats["max"], stats["mean"]) == (3, 255, 255)


# ----------------------------------------------------------------------------------------------------
# Focus


def _focus_series(base, sigmas, dose, seeds):
    out = []
    for sigma in sigmas:
        blurred = cv2.GaussianBlur(base, (0, 0), sigma) if sigma else base
        scores = [focus_score(clahe(shot_noise(blurred, dose, seed))) for seed in seeds]
        out.append(float(np.mean(scores)))
    return out


@pytest.mark.parametrize("dose", [None, 300.0])
def test_focus_score_orders_defocus_monotonically(specimen, dose):
    sigmas = [0.0, 0.5, 1.0, 1.5] if dose else [0.0, 0.5, 1.0, 1.5, 2.0]
    scores = _focus_series(specimen, sigmas + [4.0], dose, seeds=range(4))
    strict = scores[: len(sigmas)]
    assert all(a < b for a, b in zip(strict, strict[1:], strict=False)), scores
    assert strict[0] < 0.5  # sharp: lower is better
    assert scores[-1] >= 0.95  # badly blurred: no fine detail left
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_focus_score_is_not_fooled_by_shot_noise(specimen):
    """The plain band/total energy ratio would call a noisy blurred tile sharper than a clean one."""
    sharp = [focus_score(clahe(shot_noise(specimen, dose, 1))) for dose in (None, 1000.0, 100.0)]
    blurred = [
        focus_score(clahe(shot_noise(cv2.GaussianBlur(specimen, (0, 0), 2.5), dose, 1)))
        for dose in (None, 1000.0, 100.0)
    ]
    assert max(sharp) < 0.5 < min(blurred)


def test_focus_score_ignores_brightness_and_contrast(specimen):
    noisy = shot_noise(specimen, 300.0, 0).astype(np.float32)
    base = focus_score(noisy)
    for gain, offset in ((0.5, 0.0), (3.0, -100.0), (1.0, 1000.0), (-1.0, 0.0)):
        assert focus_score(gain * noisy + offset) == pytest.approx(base, abs=1e-4)


def test_focus_score_blank_flat_and_small_tiles():
    assert focus_score(np.full((512, 512), 117, np.uint8)) == 1.0
    assert focus_score(np.zeros((300, 300), np.uint16)) == 1.0
    rng = np.random.default_rng(0)
    for seed in range(5):  # a blank tile: shot noise only, no specimen
        blank = np.random.default_rng(seed).poisson(140.0, (512, 512)).astype(np.uint8)
        assert focus_score(clahe(blank)) >= 0.95
    small = em_like_specimen((100, 140), seed=2)
    assert 0.0 <= focus_score(small) < 0.6  # a crop smaller than 256² works
    with pytest.raises(ValueError, match="too small"):
        focus_score(rng.random((10, 300)))
    with pytest.raises(ValueError, match="2-D"):
        focus_score(rng.random((3, 300, 300)))


# ----------------------------------------------------------------------------------------------------
# The chain


def test_qc_statistics_see_through_clahe():
    """CLAHE gives a blank tile the contrast of a specimen; the corrected statistics do not."""
    blank = np.random.default_rng(0).poisson(140.0, (512, 512)).astype(np.uint8)
    flatfield = Flatfield.from_references(np.full((512, 512), 200.0), np.full((512, 512), 10.0))
    tile = process_tile(blank, flatfield)
    assert tile.stats["std_float"] > 2 * tile.corrected_stats["std_float"]
    assert tile.corrected_stats["std"] == 12 and tile.focus == 1.0
    saturated = process_tile(np.full((512, 512), 255, np.uint8), flatfield)
    assert saturated.raw_stats["histogram"][-1] == 512 * 512


def test_process_tile_is_the_chain_and_pickles(specimen):
    rng = np.random.default_rng(11)
    vignetting, dark, beam = _camera(specimen.shape)
    flatfield = Flatfield.from_frames([_exposure(vignetting, dark, beam, rng) for _ in range(4)], [dark] * 4)
    raw = np.clip(np.rint(specimen / 140 * 0.7 * beam * vignetting + dark), 0, 255).astype(np.uint8)
    tile = process_tile(raw, flatfield)
    assert isinstance(tile, ProcessedTile)
    expected = clahe(flatfield.apply(raw))
    np.testing.assert_array_equal(tile.image, expected)
    assert tile.stats == tile_statistics(expected)
    assert tile.focus == focus_score(expected) and tile.focus < 0.5
    assert tile.raw_stats == tile_statistics(raw)
    assert tile.corrected_stats == tile_statistics(flatfield.apply(raw))
    np.testing.assert_array_equal(
        process_tile(raw, None, clahe_clip=3.0, clahe_grid=8).image, clahe(raw, 3.0, 8)
    )
    again = pickle.loads(pickle.dumps(tile))
    np.testing.assert_array_equal(again.image, tile.image)
    assert again.stats == tile.stats and again.focus == tile.focus
    ff = pickle.loads(pickle.dumps(flatfield))
    np.testing.assert_array_equal(ff.apply(raw), flatfield.apply(raw))
