"""A torn montage through the montage assets: the blocking checks stop it before the upload (issue 14, item 4).

The synthetic generator's ``tear`` (:mod:`tests.stitch.synthetic`) moves the section piece imaged by
grid row 2 and below by 24 px along the rows: each piece is internally consistent (its own overlaps
match), but across the tear line the live matcher (±10 px search on these 32-px overlaps) finds nothing.
Tiles are put in the journal and the buffer as live processing leaves them
(:func:`tests.orchestration.test_montage_models.acquire`), then the real assets run.

* Every match across the tear missing: the torn rows are a second group after rejection, placed by the
  stage alone; ``montage_layout``'s ``disconnected_tiles`` fails and names them.
* One match across the tear wrong as a false peak would make it (it says the piece did not move): the
  torn rows hang on that one edge, so the solve has nothing to disagree with it, and every layout check
  passes; the ``montage`` asset's ``fused_seams`` measures the overlaps on the pixels and fails.

An untorn montage of the same seed passes every check and is uploaded: the checks can pass.
"""

from __future__ import annotations

import dataclasses

import dagster as dg
import pytest

from em_platform.assets.montage import lens_correction, montage, montage_layout, montage_upload
from em_platform.resources import build_resources
from em_platform.stitch.matching import match_neighbour
from tests.orchestration.test_montage_models import acquire, config
from tests.stitch.synthetic import make_montage
from tests.support.platform import make_platform

TORN_ROW = 2
TEAR_PX = (24.0, 0.0)  # along the rows: beyond the ±10 px search, the overlaps still shared
LINK = (TORN_ROW, 1)  # the torn tile whose top match is wrong
LAYOUT_CHECKS = ("disconnected_tiles", "seams", "scale_distortion")


@pytest.fixture
def platform(tmp_path):
    return make_platform(tmp_path)


def torn():
    m = make_montage(config(tear=(TORN_ROW, TEAR_PX), seed=7))
    untorn = make_montage(dataclasses.replace(m.config, tear=None))  # same truth, stage and noise
    return m, untorn


def run(platform, montage_id: str, m, **acquired) -> tuple[dg.ExecuteInProcessResult, dict]:
    """Acquire ``m`` and run layout → fusion → upload; the run's outcome and its check results."""
    acquire(platform, montage_id, m, **acquired)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("montages", [montage_id])
        result = dg.materialize(
            [montage_layout, montage, montage_upload, lens_correction],
            selection=[montage_layout, montage, montage_upload],
            partition_key=montage_id,
            instance=instance,
            resources=build_resources(platform.settings),
            run_config={"ops": {"montage_layout": {"config": {"lens": "none"}}}},
            raise_on_error=False,
        )
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    return result, checks


def materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def meta(evaluation) -> dict:
    return {k: v.value for k, v in evaluation.metadata.items()}


def test_the_untorn_montage_passes_every_check_and_is_uploaded(platform):
    _, untorn = torn()
    result, checks = run(platform, "whole", untorn)
    assert result.success and materialized(result) == {"montage_layout", "montage", "montage_upload"}
    assert {name: e.passed for name, e in checks.items()} == {
        c: True for c in (*LAYOUT_CHECKS, "fused_seams")
    }
    seams = meta(checks["fused_seams"])
    print(f"\nuntorn: {seams['measured']} overlaps measured on the pixels, max {seams['max_px']} px")
    assert seams["measured"] == 17 and seams["not_measurable"] == 0  # every overlap of 3 x 4 tiles
    assert seams["max_px"] < 0.3


def test_a_block_cut_off_by_a_tear_fails_disconnected_tiles(platform):
    m, _ = torn()
    result, checks = run(platform, "cut", m, unmatched_ok=True)
    assert not result.success
    assert (
        materialized(result) == set()
    )  # its blocking check failed: not materialized, nothing downstream ran
    disconnected = meta(checks["disconnected_tiles"])
    print(f"\ncut off: disconnected {disconnected['disconnected']}")
    assert checks["disconnected_tiles"].passed is False
    assert sorted(map(tuple, disconnected["disconnected"])) == [(TORN_ROW, c) for c in range(4)]
    assert "fused_seams" not in checks  # the fusion never ran
    # the UI shows a sentence with the failed check: what was measured against what, and what to do
    assert checks["disconnected_tiles"].description == (  # the montage first: the UI lists results by run
        "montage cut: 4 good tile(s) tied to the montage by no match; limit at most 0. They are placed by the stage alone: "
        "check their overlaps (metadata `disconnected`), then re-run with a larger `stage_error_px` or the "
        "scope's matches."
    )


def test_a_torn_block_hanging_on_one_wrong_match_fails_fused_seams(platform):
    m, untorn = torn()
    unmoved = untorn.image(untorn.tile(*LINK))

    def matcher(image, other, position, overlap, row, column):
        if (position, row, column) == ("top", LINK[0] - 1, LINK[1]):
            image = unmoved  # a false peak where the stage expects the tile: "the piece did not move"
        return match_neighbour(image, other, position, overlap, row=row, column=column)

    result, checks = run(platform, "torn", m, matcher=matcher, unmatched_ok=True)
    # the layout's own checks cannot see it: one edge holds the block, nothing disagrees with it
    assert {c: checks[c].passed for c in LAYOUT_CHECKS} == {c: True for c in LAYOUT_CHECKS}
    assert meta(checks["disconnected_tiles"])["disconnected"] == []
    # the pixels do, and the upload is blocked
    seams = meta(checks["fused_seams"])
    print(f"\ntorn: fused seams beyond the limit {seams['beyond_limit']}, median {seams['median_px']} px")
    assert checks["fused_seams"].passed is False and not result.success
    assert materialized(result) == {"montage_layout"}  # the fused montage failed its blocking check: red
    [seam] = seams["beyond_limit"]  # the three other edges across the tear were never matched
    assert (seam["tile"], seam["neighbour"]) == ("r002_c001", "r001_c001")
    assert seam["offset_px"] == pytest.approx(abs(TEAR_PX[0]), abs=1.5)
    assert seams["measured"] == 14 and seams["median_px"] < 0.3  # the rest of the montage is sound
    sentence = checks["fused_seams"].description
    assert (
        sentence.startswith("montage torn: 1 overlap(s) of the fused montage offset by more than")
        and "re-run" in sentence
    )
    assert checks["seams"].description.endswith("limit at most 0.")  # passed: no advice
