"""Neighbour matching on synthetic pairs cut from one EM-like specimen at known offsets."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest

from em_platform.stitch.matching import EdgeStrip, Match, default_max_shift, edge_strip, match_neighbour
from tests.tem.test_tile_processing import em_like_specimen, shot_noise

SIZE = 768
OVERLAP = 128  # default search range: ±42 px
MARGIN = 64


@pytest.fixture(scope="module")
def specimen() -> np.ndarray:
    """Room for a neighbour at (MARGIN, MARGIN) and a tile beside or below it, plus shifts."""
    return em_like_specimen((2 * SIZE + 2 * MARGIN, 2 * SIZE + 2 * MARGIN), seed=21)


def fourier_shift(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``out(x, y) = image(x + dx, y + dy)`` for a band-limited (periodic) image."""
    h, w = image.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return np.fft.irfft2(np.fft.rfft2(image) * np.exp(2j * np.pi * (fx * dx + fy * dy)), s=image.shape)


def cut_pair(specimen, position, dx, dy, *, dose=100.0, seed=0, size=SIZE, overlap=OVERLAP):
    """(tile, neighbour) with the tile at nominal + (dx, dy) relative to its ``position`` neighbour:
    tile pixel (x, y) shows specimen point (x0 + x + dx, y0 + y + dy)."""
    nominal = (size - overlap, 0) if position == "left" else (0, size - overlap)
    neighbour = specimen[MARGIN : MARGIN + size, MARGIN : MARGIN + size]
    x, y = MARGIN + nominal[0] + dx, MARGIN + nominal[1] + dy
    ix, iy = int(np.floor(x)), int(np.floor(y))
    pad = 16
    region = specimen[iy - pad : iy + size + pad, ix - pad : ix + size + pad].astype(np.float64)
    region = fourier_shift(region, x - ix, y - iy)  # sub-pixel part (wrap-around stays in the pad)
    tile = region[pad : pad + size, pad : pad + size]
    return shot_noise(tile, dose, seed), shot_noise(neighbour, dose, seed + 1000)


# ----------------------------------------------------------------------------------------------------
# Accuracy and the sign convention


def test_sign_convention_on_a_hand_made_integer_pair():
    rng = np.random.default_rng(0)
    world = cv2.GaussianBlur(rng.random((400, 700)).astype(np.float32), (0, 0), 2) * 1000
    neighbour = world[10:310, 10:310]
    # nominal: 300 − 60 = 240 px right of the neighbour; really 5 px further right and 3 px lower
    tile = world[13:313, 10 + 240 + 5 : 10 + 240 + 5 + 300]
    m = match_neighbour(tile, neighbour, "left", 60, max_shift_px=16)
    assert m is not None
    assert (m.dX, m.dY) == pytest.approx((5.0, 3.0), abs=0.02)
    # tile pixel p shows what neighbour pixel q = p + (300 − 60 + dX, dY) shows
    for px, py, qx, qy in zip(m.pX, m.pY, m.qX, m.qY, strict=True):
        assert (qx - px, qy - py) == pytest.approx((245.0, 3.0), abs=0.05)
    below = world[10 + 240 - 4 : 10 + 240 - 4 + 300, 10 + 7 : 10 + 7 + 300]  # 4 px higher, 7 px right
    world_t = match_neighbour(below, neighbour, "top", 60, max_shift_px=16)
    assert (world_t.dX, world_t.dY) == pytest.approx((7.0, -4.0), abs=0.02)


@pytest.mark.parametrize("position", ["left", "top"])
def test_subpixel_offsets_within_a_tenth_of_a_pixel(specimen, position):
    rng = np.random.default_rng(1 if position == "left" else 2)
    errors = []
    for trial in range(6):
        dx, dy = rng.uniform(-20, 20, 2)
        tile, neighbour = cut_pair(specimen, position, dx, dy, dose=50.0, seed=trial)
        m = match_neighbour(tile, neighbour, position, OVERLAP, row=3, column=4)
        assert m is not None and m.position == position
        errors.append((m.dX - dx, m.dY - dy))
        assert m.distance == pytest.approx(np.hypot(m.dX, m.dY))
        assert m.n_agreeing == m.n_patches == 5 and len(m.pX) == 5
        assert m.quality == 1.0 and 0.3 < m.correlation <= 1.0
        assert m.dXsd < 0.2 and m.dYsd < 0.2
        assert abs(m.rotation) < 1e-3  # pure translation
    assert np.abs(errors).max() < 0.1  # target: ≤ 0.3 px


@pytest.mark.parametrize("position", ["left", "top"])
@pytest.mark.parametrize("offset", [(0, 0), (20, -20), (-20, 20), (13, 7), (-3, -17)])
def test_integer_offsets_including_twenty_pixels_beyond_nominal(specimen, position, offset):
    tile, neighbour = cut_pair(specimen, position, *offset, dose=100.0, seed=5)
    m = match_neighbour(tile, neighbour, position, OVERLAP)
    assert m is not None
    assert (m.dX, m.dY) == pytest.approx(offset, abs=0.05)


def test_clean_and_very_noisy_pairs(specimen):
    for dose, tolerance in ((None, 0.03), (20.0, 0.2), (5.0, 0.6)):  # 5 e⁻/px: per-pixel SNR ≈ 2
        tile, neighbour = cut_pair(specimen, "left", 6.4, -11.7, dose=dose, seed=9)
        m = match_neighbour(tile, neighbour, "left", OVERLAP)
        assert m is not None
        assert (m.dX, m.dY) == pytest.approx((6.4, -11.7), abs=tolerance)
    # noise lowers the correlation, not the answer nor the agreement of the patches
    clean = match_neighbour(*cut_pair(specimen, "left", 1, 1, dose=None), "left", OVERLAP)
    noisy = match_neighbour(*cut_pair(specimen, "left", 1, 1, dose=5.0), "left", OVERLAP)
    assert clean.correlation > 0.9 > 0.3 > noisy.correlation > 0
    assert clean.quality == noisy.quality == 1.0


def test_brightness_and_contrast_differences_do_not_matter(specimen):
    tile, neighbour = cut_pair(specimen, "top", -8.3, 2.6, dose=100.0, seed=4)
    darker = np.clip(neighbour.astype(np.float32) * 0.6 + 30, 0, 255).astype(np.uint8)
    m = match_neighbour(tile, darker, "top", OVERLAP)
    assert (m.dX, m.dY) == pytest.approx((-8.3, 2.6), abs=0.1)
    m16 = match_neighbour(tile.astype(np.uint16) * 200, neighbour, "top", OVERLAP)  # mixed dtypes
    assert (m16.dX, m16.dY) == pytest.approx((-8.3, 2.6), abs=0.1)


def test_rotation_is_measured(specimen):
    """Tile pixel p shows specimen point R(θ)·p + t; the neighbour is unrotated."""
    theta = 0.004  # 3 px across the 768 px edge
    neighbour = specimen[MARGIN : MARGIN + SIZE, MARGIN : MARGIN + SIZE]
    c, s = np.cos(theta), np.sin(theta)
    t = (MARGIN + SIZE - OVERLAP + 5.0, MARGIN - 2.0)
    to_specimen = np.array([[c, -s, t[0]], [s, c, t[1]]], np.float64)
    tile = cv2.warpAffine(specimen, to_specimen, (SIZE, SIZE), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP)
    m = match_neighbour(
        shot_noise(tile, 200.0, 1), shot_noise(neighbour, 200.0, 2), "left", OVERLAP, agree_px=4.0
    )
    assert m is not None and m.n_agreeing == 5
    assert m.rotation == pytest.approx(theta, abs=3e-4)
    # the patches' offsets follow the rotation: dX falls by θ per pixel down the edge
    assert m.dXsd > 0.5
    expected = [
        (c * px - s * py + t[0] - MARGIN, s * px + c * py + t[1] - MARGIN)
        for px, py in zip(m.pX, m.pY, strict=True)
    ]
    assert np.allclose(list(zip(m.qX, m.qY, strict=True)), expected, atol=0.15)


# ----------------------------------------------------------------------------------------------------
# No overlap found


def test_blank_neighbour_gives_none(specimen):
    tile, _ = cut_pair(specimen, "left", 3, 3)
    blank = np.random.default_rng(0).poisson(140.0, (SIZE, SIZE)).astype(np.uint8)
    assert match_neighbour(tile, blank, "left", OVERLAP) is None
    assert match_neighbour(blank, tile, "top", OVERLAP) is None
    flat = np.full((SIZE, SIZE), 90, np.uint8)  # no contrast at all: no division by zero either
    assert match_neighbour(tile, flat, "left", OVERLAP) is None
    assert match_neighbour(flat, flat, "top", OVERLAP) is None


def test_unrelated_neighbour_gives_none(specimen):
    other = em_like_specimen((SIZE, SIZE), seed=99)
    for dose in (None, 100.0):
        tile, _ = cut_pair(specimen, "left", 0, 0, dose=dose)
        assert match_neighbour(tile, shot_noise(other, dose, 3), "left", OVERLAP) is None
        assert match_neighbour(tile, shot_noise(other, dose, 3), "top", OVERLAP) is None


def test_offset_beyond_the_search_range_gives_none(specimen):
    tile, neighbour = cut_pair(specimen, "left", 30, 0)
    assert match_neighbour(tile, neighbour, "left", OVERLAP, max_shift_px=40) is not None
    assert match_neighbour(tile, neighbour, "left", OVERLAP, max_shift_px=20) is None


@pytest.mark.parametrize("position", ["left", "top"])
@pytest.mark.parametrize("offset", [(55, -47), (-45, 40), (52.3, 9.6)])
def test_search_centred_on_the_expected_place_finds_offsets_beyond_the_nominal_range(
    specimen, position, offset
):
    """The stage says where the tile is (within a few px): shifts far beyond ±max_shift are then found,
    and the result is still measured from nominal."""
    tile, neighbour = cut_pair(specimen, position, *offset, dose=100.0, seed=6)
    assert match_neighbour(tile, neighbour, position, OVERLAP, max_shift_px=12) is None
    stage = (offset[0] + 3, offset[1] - 2)  # a stage readout a few px off
    m = match_neighbour(tile, neighbour, position, OVERLAP, max_shift_px=12, expected=stage)
    assert m is not None
    assert (m.dX, m.dY) == pytest.approx(offset, abs=0.1)
    # the same offsets through edge strips deep enough for the expected place
    depth = OVERLAP + 12 + 64
    side = "left" if position == "left" else "top"
    strips = (
        edge_strip(tile, side, OVERLAP, 12 + 64),
        edge_strip(neighbour, {"left": "right", "top": "bottom"}[side], OVERLAP, 12 + 64),
    )
    assert strips[0].pixels.shape[1 if side == "left" else 0] == depth
    m2 = match_neighbour(*strips, position, OVERLAP, max_shift_px=12, expected=stage)
    assert m2 is not None and (m2.dX, m2.dY) == pytest.approx((m.dX, m.dY), abs=1e-9)
    assert m2.qX == pytest.approx(m.qX) and m2.qY == pytest.approx(m.qY)


def test_expected_place_without_enough_overlap_gives_none(specimen):
    tile, neighbour = cut_pair(specimen, "left", 0, 0)
    assert (
        match_neighbour(tile, neighbour, "left", OVERLAP, max_shift_px=12, expected=(OVERLAP - 15, 0)) is None
    )
    assert match_neighbour(tile, neighbour, "left", OVERLAP, max_shift_px=12, expected=(0, SIZE)) is None


def test_fine_detail_under_strong_smooth_tones_is_found_by_the_second_look():
    """Weak fine grain (σ 1 px, 8 grey levels) under strong smooth tones (σ 10 px, 40 levels), 100 e⁻/px:
    the unfiltered correlation is a wide hill whose peak does not stand out of it, so the strips are looked
    at again without their local mean; the offset is still measured on the unfiltered correlation."""
    rng = np.random.default_rng(5)

    def smooth(sigma: float) -> np.ndarray:
        a = cv2.GaussianBlur(rng.standard_normal((400, 800)).astype(np.float32), (0, 0), sigma)
        return a / a.std()

    world = 140 + 40 * smooth(10.0) + 8 * smooth(1.0)
    size, overlap, (dx, dy) = 300, 48, (5, -3)
    neighbour = world[20 : 20 + size, 20 : 20 + size]
    tile = world[20 + dy : 20 + dy + size, 20 + size - overlap + dx : 20 + 2 * size - overlap + dx]
    for seed in range(3):
        t, n = shot_noise(tile, 100.0, seed), shot_noise(neighbour, 100.0, seed + 100)
        # a high-pass wider than the strips removes nothing the correlation does not ignore: first look only
        assert match_neighbour(t, n, "left", overlap, highpass_px=200.0) is None
        m = match_neighbour(t, n, "left", overlap)
        assert m is not None and m.n_agreeing >= 4
        assert (m.dX, m.dY) == pytest.approx((dx, dy), abs=0.15)


def test_half_blank_edge_still_matches_with_lower_quality(specimen):
    tile, neighbour = cut_pair(specimen, "left", 4.5, -2.5, dose=100.0)
    full = match_neighbour(tile, neighbour, "left", OVERLAP)
    half = tile.copy()
    half[: SIZE // 2] = np.random.default_rng(1).poisson(140.0, (SIZE // 2, SIZE)).astype(np.uint8)
    m = match_neighbour(half, neighbour, "left", OVERLAP)
    assert m is not None and 2 <= m.n_agreeing < m.n_patches
    assert (m.dX, m.dY) == pytest.approx((4.5, -2.5), abs=0.1)
    assert m.quality == m.n_agreeing / m.n_patches < full.quality == 1.0
    assert match_neighbour(half, neighbour, "left", OVERLAP, min_agreeing=m.n_agreeing + 1) is None


# ----------------------------------------------------------------------------------------------------
# Edge strips, the message, arguments


def test_edge_strips_give_the_same_match_and_pickle(specimen):
    for position, side in (("left", "right"), ("top", "bottom")):
        tile, neighbour = cut_pair(specimen, position, -7.2, 12.9, seed=3)
        whole = match_neighbour(tile, neighbour, position, OVERLAP)
        own, other = edge_strip(tile, position, OVERLAP), edge_strip(neighbour, side, OVERLAP)
        depth = OVERLAP + default_max_shift(OVERLAP)
        assert own.pixels.shape == ((depth, SIZE) if position == "top" else (SIZE, depth))
        assert own.nbytes == depth * SIZE and other.tile_shape == (SIZE, SIZE)
        own, other = pickle.loads(pickle.dumps(own)), pickle.loads(pickle.dumps(other))
        assert match_neighbour(own, other, position, OVERLAP) == whole
        assert match_neighbour(tile, other, position, OVERLAP) == whole
        with pytest.raises(ValueError, match="must be given as its"):
            match_neighbour(tile, own, position, OVERLAP)
        shallow = EdgeStrip(
            other.pixels[:10] if side == "bottom" else other.pixels[:, :10], side, (SIZE, SIZE)
        )
        with pytest.raises(ValueError, match="px deep"):
            match_neighbour(tile, shallow, position, OVERLAP)


def test_match_message_validates_against_tem_comms(specimen):
    tile_msgs = pytest.importorskip("TEM_comms.tile")
    m = match_neighbour(*cut_pair(specimen, "top", 2.2, -1.1), "top", OVERLAP, row=6, column=9)
    message = m.to_message()
    assert tile_msgs.Match(**message).model_dump() == message
    assert message["row"] == 6 and message["column"] == 9 and message["position"] == "top"
    assert tile_msgs.Match(**m.to_message(row=1, column=2)).row == 1
    unnamed = match_neighbour(*cut_pair(specimen, "top", 2.2, -1.1), "top", OVERLAP)
    with pytest.raises(ValueError, match="row and column"):
        unnamed.to_message()
    assert isinstance(pickle.loads(pickle.dumps(m)), Match)


def test_bad_arguments_are_explained(specimen):
    tile, neighbour = cut_pair(specimen, "left", 0, 0)
    with pytest.raises(ValueError, match="'top' or 'left'"):
        match_neighbour(tile, neighbour, "bottom", OVERLAP)
    with pytest.raises(ValueError, match="leaves no room"):
        match_neighbour(tile, neighbour, "left", 40, max_shift_px=35)
    with pytest.raises(ValueError, match="more than a tile"):
        match_neighbour(tile, neighbour, "left", SIZE)
    with pytest.raises(ValueError, match="2-D"):
        match_neighbour(tile[None], neighbour, "left", OVERLAP)
    with pytest.raises(ValueError, match="highpass_px must be positive"):
        match_neighbour(tile, neighbour, "left", OVERLAP, highpass_px=0.0)
    assert default_max_shift(OVERLAP) == 42 and default_max_shift(500) == 64 and default_max_shift(51) == 17
