"""The simulated microscope: specimen, image formation, faults, files and the TEM_comms message stream."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
import TEM_comms
import tifffile
from pydantic import ValidationError

from em_platform.simulation import scope_cli
from em_platform.simulation.camera import Camera, flat_field, vignetting_field
from em_platform.simulation.scope import GROUND_TRUTH_FILE, GroundTruth, simulate_montage
from em_platform.simulation.scope_config import ScopeConfig
from em_platform.simulation.specimen import Specimen

# 3 x 4 tiles of 128² px; raster order = row by row
FAULTS = ("blank:1", "saturated:2", "defocus:4-5", "missing:7", "corrupt:9")
SMALL = dict(
    rows=3, columns=4, tile_size=128, overlap=0.25, jitter_px=6.0, brightfield_frames=6, darkfield_frames=6
)
CLEAN = (0, 3, 6, 8, 10, 11)


class FakeClock:
    """Time moves 1 ms per reading and by whatever is slept."""

    def __init__(self):
        self.t = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        self.slept: list[float] = []

    def now(self) -> datetime:
        self.t += timedelta(milliseconds=1)
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += timedelta(seconds=seconds)


def _simulate(out: Path, config: ScopeConfig, **kw):
    messages: list[tuple[str, dict]] = []
    clock = FakeClock()
    truth = simulate_montage(
        config,
        out,
        lambda topic, payload: messages.append((topic, payload)),
        now=clock.now,
        sleep=clock.sleep,
        **kw,
    )
    return truth, messages, clock


@pytest.fixture(scope="module")
def montage(tmp_path_factory):
    config = ScopeConfig(**SMALL, faults=FAULTS, seed=3)
    out = tmp_path_factory.mktemp("scope") / "m"
    truth, messages, _ = _simulate(out, config, montage_id="montage-a")
    return config, out, truth, messages


def _read(truth: GroundTruth, index: int) -> np.ndarray:
    return tifffile.imread(truth.tiles[index].path).astype(np.float64)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _overlap_ncc(a: np.ndarray, b: np.ndarray, ox: int, oy: int) -> float:
    """Correlation of the region both frames show if b's top-left sits at (ox, oy) in a's pixels."""
    n = a.shape[0]
    i0, i1, j0, j1 = max(0, oy), min(n, n + oy), max(0, ox), min(n, n + ox)
    return _ncc(a[i0:i1, j0:j1], b[i0 - oy : i1 - oy, j0 - ox : j1 - ox])


def _high_pass(image: np.ndarray) -> np.ndarray:
    """Without the smooth vignetting and cytoplasm tones: what a matcher keys on."""
    return image - cv2.GaussianBlur(image, (0, 0), 4.0)


def _focus(image: np.ndarray) -> float:
    """Laplacian variance after a light smoothing (so shot noise does not dominate)."""
    return float(cv2.Laplacian(cv2.GaussianBlur(image, (0, 0), 1.5), cv2.CV_64F).var())


# -- specimen -------------------------------------------------------------------------------------------


def test_specimen_is_the_same_whatever_window_it_is_cut_from():
    s = Specimen(seed=7)
    big = s.render_lattice(-300, 1000, 700, 800)
    rng = np.random.default_rng(0)
    for _ in range(12):
        x, y = int(rng.integers(-300, 400)), int(rng.integers(1000, 1600))
        h, w = int(rng.integers(1, 1700 - y)), int(rng.integers(1, 500 - x))
        assert np.array_equal(
            s.render_lattice(x, y, h, w), big[y - 1000 : y - 1000 + h, x + 300 : x + 300 + w]
        )
    # fractional windows: the same plane points give the same values
    a = s.render(10.25, 20.5, 200, 200)
    b = s.render(110.25, 70.5, 200, 200)
    assert np.array_equal(a[50:, 100:], b[:150, :100])


def test_specimen_is_deterministic_per_seed_and_looks_like_stained_tissue():
    a = Specimen(seed=1).render(0, 0, 512, 512)
    assert np.array_equal(a, Specimen(seed=1).render(0, 0, 512, 512))
    b = Specimen(seed=2).render(0, 0, 512, 512)
    assert abs(_ncc(a, b)) < 0.3
    assert a.dtype == np.float32 and 0.0 < a.min() and a.max() <= 1.0
    dark = float((a < 0.35).mean())  # membranes, mitochondria, vesicle rims
    assert 0.02 < dark < 0.4, dark
    assert 0.4 < float(a.mean()) < 0.8
    # fine grain: neighbouring pixels are not identical, structure exists at several scales
    assert float(np.abs(np.diff(a, axis=1)).mean()) > 0.01
    assert float(cv2.resize(a, (16, 16), interpolation=cv2.INTER_AREA).std()) > 0.02


def test_blurred_transmission_of_overlapping_tiles_agrees_exactly():
    """Before noise and vignetting, two frames show identical pixels where they overlap."""
    camera = Camera(ScopeConfig(tile_size=128, overlap=0.25, jitter_px=6.0))
    a = camera.transmission(40.3, 17.8, 0.9).copy()
    b = camera.transmission(40.3 + 97, 17.8 - 5, 0.9)  # a neighbour, same sub-pixel offsets
    assert np.array_equal(a[:123, 97:], b[5:, :31])


@pytest.mark.parametrize(
    "dose", [20.0, 100.0]
)  # exact Poisson below 30 e⁻/px, its normal approximation above
def test_shot_and_read_noise_follow_the_dose(dose):
    config = ScopeConfig(tile_size=256, jitter_px=5.0, dose=dose, seed=5)
    camera = Camera(config)
    frame = camera.brightfield(np.random.default_rng(1)).astype(np.float64)
    signal = flat_field(config) * config.bright_level * camera.mean_transmission
    residual = frame - config.dark_offset - signal
    k = config.bright_level / dose  # counts per electron
    expected = k * signal + config.read_noise**2 + 1 / 12  # shot + read + rounding
    assert abs(residual.mean()) < 0.5
    assert residual.var() / expected.mean() == pytest.approx(1.0, abs=0.06)


# -- the message stream ---------------------------------------------------------------------------------


def test_message_sequence_and_counts(montage):
    config, _, truth, messages = montage
    topics = [t for t, _ in messages]
    n_refs = config.brightfield_frames + config.darkfield_frames
    acquired = [t for t in truth.tiles if t.acquired]
    assert len(acquired) == 11
    assert Counter(topics) == {"montage.status": 1 + 11 + 1, "tile.raw": n_refs + 11, "montage.complete": 1}

    first, *rest = messages
    assert first[0] == "montage.status" and first[1]["state"] == "started"
    assert first[1]["total_tiles"] == 12 and first[1]["current_tile"] == 0

    refs, rest = rest[:n_refs], rest[n_refs:]
    assert [p["brightfield"] for _, p in refs] == [True] * 6 + [False] * 6
    assert [p["darkfield"] for _, p in refs] == [False] * 6 + [True] * 6
    assert all(
        p["montage_id"] == "montage-a" and p["row"] == -1 and p["stage_position"] is None for _, p in refs
    )

    # per tile: tile.raw then montage.status in_progress; the missing tile (7) has neither
    tile_msgs, tail = rest[:22], rest[22:]
    raws = tile_msgs[0::2]
    statuses = tile_msgs[1::2]
    assert all(t == "tile.raw" for t, _ in raws) and all(t == "montage.status" for t, _ in statuses)
    assert [(p["row"], p["column"]) for _, p in raws] == [(t.row, t.column) for t in acquired]
    assert [p["current_tile"] for _, p in statuses] == [i + 1 for i in range(12) if i != 7]
    assert all(p["state"] == "in_progress" and p["total_tiles"] == 12 for _, p in statuses)
    assert statuses[-1][1]["throughput_tiles_per_min"] > 0
    assert all(not p["brightfield"] and not p["darkfield"] for _, p in raws)
    assert {p["overlap"] for _, p in raws} == {32}

    (t_complete, complete), (t_done, done) = tail
    assert t_complete == "montage.complete" and t_done == "montage.status"
    assert done["state"] == "completed" and done["current_tile"] == 12
    assert set(complete["tiles"]) == {t.tile_id for t in acquired}
    t9 = truth.tiles[9]
    assert complete["tiles"][t9.tile_id] == {
        "raster_index": 9,
        "stage_position": list(t9.stage_position_nm),
        "raster_position": [t9.column, t9.row],
    }
    assert complete["pixel_size"] == 4.0 and complete["rotation_angle"] == 0.0
    assert complete["montage_id"] == "montage-a" and complete["acquisition_id"] == truth.acquisition_id


def test_every_payload_validates_against_its_tem_comms_model(montage):
    _, _, _, messages = montage
    for topic, payload in messages:
        model = TEM_comms.topics[topic](**payload)
        assert model.model_dump(mode="json") == payload  # JSON-ready and lossless
        assert json.loads(json.dumps(payload)) == payload
        assert TEM_comms.topics[topic].deserialize(model.serialize()) == model  # pigeon's wire format


def test_the_journal_takes_the_stream_as_is(montage, tmp_path):
    from em_platform.tem.journal import Journal

    _, _, truth, messages = montage
    journal = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    try:
        for topic, payload in messages:
            assert journal.record(topic, payload)
        m = journal.montage("montage-a")
        assert m.state == "completed" and m.total_tiles == 12 and m.pixel_size_nm == 4.0
        rows = journal.tiles("montage-a")
        assert sum(r.is_reference for r in rows) == 12
        tiles = {r.tile_id: r for r in rows if not r.is_reference}
        assert len(tiles) == 11
        for t in truth.tiles:
            if t.acquired:
                r = tiles[t.tile_id]
                assert (r.row, r.column, r.raster_index, r.path) == (t.row, t.column, t.raster_index, t.path)
                assert (r.stage_x_nm, r.stage_y_nm) == t.stage_position_nm
    finally:
        journal.dispose()


# -- files and ground truth -----------------------------------------------------------------------------


def test_files_are_complete_tiffs_named_by_tile_id_and_no_temporaries_remain(montage):
    _, out, truth, messages = montage
    names = {p.name for p in out.iterdir()}
    assert not [n for n in names if "tmp" in n]
    expected = {f"{t.tile_id}.tiff" for t in truth.tiles if t.acquired}
    expected |= {f"{r.tile_id}.tiff" for r in truth.references} | {GROUND_TRUTH_FILE}
    assert names == expected
    for topic, payload in messages:
        if topic == "tile.raw":
            assert Path(payload["path"]).is_absolute() and Path(payload["path"]).exists()
            assert Path(payload["path"]).name == f"{payload['tile_id']}.tiff"
    image = tifffile.imread(truth.tiles[0].path)
    assert image.dtype == np.uint8 and image.shape == (128, 128)


def test_ground_truth_positions_are_the_nominal_grid_plus_bounded_jitter(montage):
    config, out, truth, _ = montage
    assert GroundTruth.load(out) == truth
    assert GroundTruth.load(out / GROUND_TRUTH_FILE).scope_config == config
    step = 128 - 32
    offsets = []
    for t in truth.tiles:
        assert (t.row, t.column) == divmod(t.raster_index, 4)
        assert t.nominal_px == (t.column * step, t.row * step)
        dx, dy = t.position_px[0] - t.nominal_px[0], t.position_px[1] - t.nominal_px[1]
        assert abs(dx) <= 6.0 and abs(dy) <= 6.0
        offsets += [dx, dy]
        # the stage reports the field-of-view centre, within a few readout errors of the truth
        for axis in (0, 1):
            centre_nm = (t.position_px[axis] + 64) * 4.0
            assert abs(t.stage_position_nm[axis] - centre_nm) <= 4 * 2.0 * 4.0 + 1
    assert np.std(offsets) > 1.0  # there is jitter, and positions are not integers
    assert any(abs(v - round(v)) > 0.01 for v in offsets)
    assert truth.dark_offset == 12.0 and truth.vignetting["strength"] == 0.25
    assert truth.tiles[4].blur_sigma_px > 5 * truth.tiles[0].blur_sigma_px


def test_neighbours_overlap_where_the_ground_truth_says(montage):
    """With noise and vignetting, the overlap correlates best at the true offset, not at the nominal one."""
    _, _, truth, _ = montage
    off_nominal = []
    for a, b in ((10, 11), (6, 10)):  # left-right and top-bottom neighbours, both clean
        ta, tb = truth.tiles[a], truth.tiles[b]
        ox = round(tb.position_px[0] - ta.position_px[0])
        oy = round(tb.position_px[1] - ta.position_px[1])
        ia, ib = _high_pass(_read(truth, a)), _high_pass(_read(truth, b))
        scores = {
            (dx, dy): _overlap_ncc(ia, ib, ox + dx, oy + dy) for dx in range(-8, 9) for dy in range(-8, 9)
        }
        best = max(scores, key=scores.get)
        assert abs(best[0]) <= 1 and abs(best[1]) <= 1, (a, b, best)
        far = [v for (dx, dy), v in scores.items() if max(abs(dx), abs(dy)) >= 4]
        assert scores[best] > max(far) + 0.1 and np.median(far) < 0.1
        nominal = (96, 0) if ta.row == tb.row else (0, 96)
        off_nominal.append(max(abs(ox - nominal[0]), abs(oy - nominal[1])))
    assert max(off_nominal) >= 2  # the stage jitter is real


# -- faults -----------------------------------------------------------------------------------------------


def test_each_fault_appears_as_configured(montage):
    config, _, truth, messages = montage
    blank = _read(truth, 1)
    assert abs(blank.mean() - config.dark_offset) < 0.5 and blank.std() < 2 * config.read_noise
    saturated = _read(truth, 2)
    assert (saturated >= 255).mean() > 0.9
    clean_focus = [_focus(_read(truth, i)) for i in CLEAN]
    for i in (4, 5):
        assert truth.tiles[i].faults == ["defocus"]
        assert _focus(_read(truth, i)) < 0.5 * min(clean_focus)
        assert abs(truth.tiles[i].defocus_um) == config.fault_defocus_um
    missing = truth.tiles[7]
    assert not missing.acquired and missing.path is None
    sent = {p["tile_id"] for t, p in messages if t == "tile.raw"}
    assert missing.tile_id not in sent
    corrupt = truth.tiles[9]
    assert corrupt.tile_id in sent and Path(corrupt.path).exists() and not corrupt.readable
    with pytest.raises(Exception):  # noqa: B017 - any reader error will do
        tifffile.imread(corrupt.path)
    assert cv2.imread(corrupt.path, cv2.IMREAD_GRAYSCALE) is None
    for i in CLEAN:
        assert truth.tiles[i].faults == [] and 60 < _read(truth, i).mean() < 200


def test_reference_frames_measure_the_flat_field_and_the_dark_offset(montage):
    config, _, truth, _ = montage
    bright = np.mean([tifffile.imread(r.path) for r in truth.references if r.kind == "brightfield"], axis=0)
    dark = np.mean([tifffile.imread(r.path) for r in truth.references if r.kind == "darkfield"], axis=0)
    assert abs(dark.mean() - config.dark_offset) < 0.1
    signal = bright - dark
    expected = flat_field(config) * config.bright_level * truth.specimen["mean_transmission"]
    blocks = cv2.resize(signal / expected, (8, 8), interpolation=cv2.INTER_AREA)
    assert np.abs(blocks - 1).max() < 0.02
    # the corners are ~25 % darker than the centre
    v = vignetting_field(config)
    corner = np.mean(
        [signal[:8, :8].mean(), signal[:8, -8:].mean(), signal[-8:, :8].mean(), signal[-8:, -8:].mean()]
    )
    assert 0.7 < corner / signal[60:68, 60:68].mean() < 0.8
    assert 0.7 < float(v[[0, 0, -1, -1], [0, -1, 0, -1]].mean()) < 0.8
    # flatfield correction removes it from a tile: left and right halves of the corrected tile match
    raw = _read(truth, 10)
    corrected = (raw - dark) / signal
    assert (
        abs(corrected[:, :64].mean() / corrected[:, 64:].mean() - 1)
        < abs(raw[:, :64].mean() / raw[:, 64:].mean() - 1) + 0.05
    )


# -- determinism, pacing, failure -------------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_different(montage, tmp_path):
    config, _, truth, _ = montage
    again, _, _ = _simulate(tmp_path / "again", config)
    assert again.montage_id != truth.montage_id
    for a, b in zip(truth.tiles, again.tiles, strict=True):
        assert a.tile_id != b.tile_id and a.position_px == b.position_px
        if a.acquired:
            assert Path(a.path).read_bytes() == Path(b.path).read_bytes()
    for a, b in zip(truth.references, again.references, strict=True):
        assert Path(a.path).read_bytes() == Path(b.path).read_bytes()
    other, _, _ = _simulate(tmp_path / "other", config.model_copy(update={"seed": 4}))
    assert Path(other.tiles[0].path).read_bytes() != Path(truth.tiles[0].path).read_bytes()
    assert other.tiles[0].position_px != truth.tiles[0].position_px


def test_acquisition_rate_is_honoured_through_the_injected_sleep(tmp_path):
    small = {**SMALL, "rows": 2, "columns": 3, "brightfield_frames": 1, "darkfield_frames": 1}
    config = ScopeConfig(**small, rate=2.0)
    _, messages, clock = _simulate(tmp_path / "paced", config)
    assert len(clock.slept) == 5 and all(0.4 < s <= 0.5 for s in clock.slept)
    statuses = [p for t, p in messages if t == "montage.status" and p["state"] == "in_progress"]
    assert statuses[-1]["throughput_tiles_per_min"] == pytest.approx(120, rel=0.05)
    assert statuses[-1]["avg_cycle_time_ms"] == pytest.approx(500, abs=20)
    unpaced = ScopeConfig(
        **{**SMALL, "rows": 2, "columns": 3, "brightfield_frames": 0, "darkfield_frames": 0}
    )
    _, _, clock = _simulate(tmp_path / "fast", unpaced)
    assert clock.slept == []


def test_a_failing_sink_ends_the_stream_with_an_error_status(tmp_path):
    messages = []

    def emit(topic, payload):
        if topic == "tile.raw" and payload["row"] == 1:
            raise ConnectionError("broker gone")
        messages.append((topic, payload))

    config = ScopeConfig(**{**SMALL, "brightfield_frames": 0, "darkfield_frames": 0})
    with pytest.raises(ConnectionError):
        simulate_montage(config, tmp_path / "failed", emit)
    topic, last = messages[-1]
    assert topic == "montage.status" and last["state"] == "error" and "broker gone" in last["error_message"]
    assert last["current_tile"] == 4
    assert not (tmp_path / "failed" / GROUND_TRUTH_FILE).exists()


def test_a_directory_holds_one_montage(montage):
    config, out, _, _ = montage
    with pytest.raises(FileExistsError, match="own directory"):
        simulate_montage(config, out, lambda t, p: None)


# -- configuration and CLI --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"faults": ("flood:1",)}, "unknown fault"),
        ({"faults": ("blank:12",)}, "outside the grid"),
        ({"faults": ("blank:r3c0",)}, "outside the grid"),
        ({"faults": ("blank:x",)}, "cannot read"),
        ({"faults": ("missing:2", "corrupt:2")}, "missing tile is never acquired"),
        ({"faults": ("blank:2", "saturated:1-3")}, "only one of blank"),
        ({"jitter_px": 16.0}, "overlap"),
        ({"bright_level": 250.0}, "full scale"),
    ],
)
def test_bad_configuration_is_refused_with_a_reason(update, message):
    with pytest.raises(ValidationError, match=message):
        ScopeConfig(**{**SMALL, **update})


def test_fault_specs_by_index_range_and_grid_position():
    c = ScopeConfig(**SMALL, faults=("defocus:r1c0-r1c3", "blank:r2c1", "corrupt:0-1"))
    assert c.fault_plan() == {
        0: {"corrupt"},
        1: {"corrupt"},
        4: {"defocus"},
        5: {"defocus"},
        6: {"defocus"},
        7: {"defocus"},
        9: {"blank"},
    }
    s = ScopeConfig(**SMALL, serpentine=True, faults=("blank:r1c0",))
    assert s.raster_position(4) == (1, 3) and s.fault_plan() == {7: {"blank"}}


def test_cli_simulates_a_montage_and_prints_a_summary(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    scope_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--rows", "2", "--columns", "2", "--tile-size", "128", "--overlap", "0.25", "--jitter", "5",
         "--fault", "blank:1", "--fault", "missing:r1c1", "--out", str(tmp_path), "--montage-id", "cli-1",
         "--brightfield-frames", "2", "--darkfield-frames", "2"]
    )  # fmt: skip
    messages = []
    assert scope_cli.run(args, lambda t, p: messages.append((t, p))) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "cli-1" in out[0] and "3/4 tiles" in out[0]
    truth = GroundTruth.load(tmp_path / "cli-1")
    assert [t.faults for t in truth.tiles] == [[], ["blank"], [], ["missing"]]
    assert sum(t == "tile.raw" for t, _ in messages) == 3 + 4

    bad = parser.parse_args(["--fault", "blank:99", "--out", str(tmp_path)])
    assert scope_cli.run(bad, lambda t, p: None) == 2
    assert "outside the grid" in capsys.readouterr().err
    assert scope_cli.run(parser.parse_args([]), lambda t, p: None) == 2
