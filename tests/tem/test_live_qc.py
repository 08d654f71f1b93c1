"""What the scope hears from live QC (domain level, small simulated montages): no-tissue tiles, tiles
montage.complete names that never come, qc.status at the end and in between, and stage positions turned
into pixels with montage.complete's rotation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from distributed import Client, LocalCluster

from em_platform.simulation.camera import Camera
from em_platform.simulation.scope import simulate_montage
from em_platform.simulation.scope_config import ScopeConfig
from em_platform.stitch.edges import compare_with_truth, stage_positions, true_positions
from em_platform.stitch.grid import stage_to_image
from em_platform.tem.journal import Journal
from em_platform.tem.montage_run import MontageRunConfig, run_montage
from em_platform.tem.qc_summary import MontageLimits, MontageSummary
from em_platform.tem.stitch_inputs import grid_tiles
from em_platform.tem.tile_processing import specimen_contrast
from em_platform.tem.tile_source import JournalTileSource


@pytest.fixture(scope="module")
def client():
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0"
    ) as cluster:
        with Client(cluster) as c:
            yield c


@pytest.mark.parametrize("mean", [3.0, 30.0, 300.0, 3000.0])
def test_specimen_contrast_of_shot_noise_alone_is_one(mean):
    """White (Poisson) noise: block means vary by σ / b exactly, so the measure is 1 whatever the dose."""
    noise = np.random.default_rng(int(mean)).poisson(mean, (1024, 1024)).astype(np.uint16)
    assert specimen_contrast(noise) == pytest.approx(1.0, abs=0.05)


def test_specimen_contrast_separates_film_from_sections_even_out_of_focus():
    camera = Camera(ScopeConfig(tile_size=512, dose=10.0))  # the noisiest case the simulator calls normal
    rng = np.random.default_rng(0)
    film = specimen_contrast(camera.film(rng))
    sections = [specimen_contrast(camera.tile(100.0, 200.0, d, rng)) for d in (0.0, 12.0)]
    assert film < 1.2 and min(sections) > 2.0, (film, sections)


def test_stage_to_image_undoes_the_stage_rotation():
    # the image's x axis lies along the stage's y axis (θ = 90°): 8 nm along stage y is 2 px along image x
    assert stage_to_image(0.0, 8.0, 4.0, math.pi / 2) == pytest.approx((2.0, 0.0))
    assert stage_to_image(8.0, 0.0, 4.0, math.pi / 2) == pytest.approx((0.0, -2.0))
    theta = 0.3  # and it inverts R(θ)·p·pixel_size for any displacement
    p = np.array([13.0, -7.0])
    rotated = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]) @ p * 4.0
    assert stage_to_image(*rotated, 4.0, theta) == pytest.approx(tuple(p))


def test_rotated_stage_positions_still_centre_the_search_and_the_prior(tmp_path, client):
    """A stage turned 0.3 rad against the camera: its positions become pixels through montage.complete's
    rotation_angle, so every edge is found where the stage says and the solve's prior matches the truth."""
    journal = Journal(f"sqlite:///{tmp_path / 'journal.sqlite'}")
    cfg = ScopeConfig(rows=3, columns=3, overlap=0.15, jitter_px=20.0, stage_rotation_rad=0.3, seed=4)
    truth = simulate_montage(cfg, tmp_path / "tiles", journal.record, sleep=lambda s: None)
    result = run_montage(
        truth.montage_id,
        JournalTileSource(journal, pixel_size_nm=truth.pixel_size_nm),
        client,
        processed_url=str(tmp_path / "processed.zarr"),
        config=MontageRunConfig(poll_seconds=0.02),
    )
    matches = [m for r in result.tiles.values() for m in r.matches.values()]
    assert len(matches) == 12 and all(m and m["search"] == "stage" for m in matches), matches
    montage = journal.montage(truth.montage_id)
    assert montage.rotation_angle == pytest.approx(0.3)
    tiles = grid_tiles(journal.tiles(truth.montage_id))
    shapes = {(t.row, t.column): (512, 512) for t in tiles}
    prior = stage_positions(tiles, shapes, montage.pixel_size_nm, montage.rotation_angle)
    unrotated = stage_positions(tiles, shapes, montage.pixel_size_nm)
    assert compare_with_truth(prior, true_positions(truth)).max_px < 8  # readout error: σ = 2 px
    assert compare_with_truth(unrotated, true_positions(truth)).max_px > 50


class RecordingSource(JournalTileSource):
    """The journal-backed source, noting every qc.status it is asked to send."""

    def __init__(self, journal: Journal):
        super().__init__(journal, pixel_size_nm=4.0)
        self.statuses: list[tuple[str, str | None, bool]] = []

    def send_status(self, montage_id, status, reason, *, changed):
        self.statuses.append((status, reason, changed))
        super().send_status(montage_id, status, reason, changed=changed)


def test_a_named_tile_that_never_comes_stops_the_scope_at_the_end_and_fails_the_check(tmp_path, client):
    journal = Journal(f"sqlite:///{tmp_path / 'journal.sqlite'}")
    events = []
    cfg = ScopeConfig(
        rows=2, columns=3, overlap=0.15, jitter_px=4.0, brightfield_frames=1, darkfield_frames=1
    )
    truth = simulate_montage(
        cfg, tmp_path / "tiles", lambda t, p: events.append((t, p)), sleep=lambda s: None
    )
    lost = truth.tile(0, 1).tile_id
    for topic, payload in events:
        if payload.get("tile_id") != lost:  # its tile.raw is lost on the way; montage.complete names it
            journal.record(topic, payload)
    source = RecordingSource(journal)
    result = run_montage(
        truth.montage_id,
        source,
        client,
        processed_url=str(tmp_path / "processed.zarr"),
        config=MontageRunConfig(poll_seconds=0.02, late_tile_seconds=0.3, status_every_seconds=0.0),
    )
    assert result.not_received == {lost: (0, 1)}
    verdict = result.qc.verdicts[lost]
    assert [(f.fault_type, f.scope) for f in verdict.faults] == [("tile_not_received", "persistent")]
    assert result.qc.status == "STOP_AT_END" and "tile_not_received at r0 c1" in result.qc.reason
    # the end of the montage is said even though the status did not change then; GOOD went out first
    assert source.statuses[0][:2] == ("GOOD", None) and source.statuses[-1][0] == "STOP_AT_END"
    assert any(not changed for _, _, changed in source.statuses)  # re-sent, not only on a change
    assert journal.qc_statuses(truth.montage_id)[-1] == ("STOP_AT_END", result.qc.reason)
    checks = {c.name: c for c in MontageSummary.of(result).checks(MontageLimits())}
    assert not checks["tiles_received"].passed
    assert checks["tiles_received"].metadata["not_received"] == [{"tile_id": lost, "row": 0, "column": 1}]
    assert result.missing == []  # not a hole in the plan: a tile the scope took and the platform lost
