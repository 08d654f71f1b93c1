"""The web UI of the production topology in a real browser (Playwright driving Debian's Chromium): what an
operator looks at. Screenshots are saved as test artifacts (test-artifacts/browser/deploy_*.png)."""

from __future__ import annotations

import re

import pytest

from tests.deploy.dagster_api import TERMINAL, wait_until
from tests.support.browser import goto, new_page, open_browser, require_browser, screenshot

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(1800)]

GROUPS_QUERY = "{ assetNodes { groupName } }"


@pytest.fixture(scope="module")
def browser():
    require_browser()
    with open_browser() as b:
        yield b


@pytest.fixture
def page(browser):
    p = new_page(browser)
    yield p
    p.context.close()


def _images_loaded(page, selector: str) -> int:
    """How many <img> matching ``selector`` decoded into a picture (naturalWidth > 0)."""
    return page.eval_on_selector_all(
        selector, "els => els.filter(e => e.complete && e.naturalWidth > 0).length"
    )


def test_lineage_shows_every_asset_group(topology, dagster_api, page):
    groups = sorted({n["groupName"] for n in dagster_api.query(GROUPS_QUERY)["assetNodes"]})
    assert {"ingest", "acquisition", "montage", "catalog"} <= set(
        groups
    )  # + simulation, cryo once they exist
    goto(page, f"{topology.webserver}/asset-groups")
    for group in groups:
        page.get_by_text(group, exact=True).first.wait_for(state="visible")
    screenshot(page, "deploy_lineage")


def _partition_colour(page, key: str) -> str:
    """The status dot the Partitions tab draws beside partition ``key`` (its inline background colour)."""
    dot = page.locator(f"div:has(> div[data-tooltip='{key}']) > div[style*='border-radius: 100%']")
    dot.first.wait_for(state="visible")
    assert dot.count() == 1, f"{dot.count()} status dots for partition {key}"
    style = dot.first.get_attribute("style") or ""
    colour = re.search(r"background:\s*var\(--color-accent-(\w+)\)", style)
    assert colour, f"partition {key}: no status colour in {style!r}"
    return colour.group(1)


PARTITION_STATUSES = """query($key: [String!]!) { assetNodeOrError(assetKey: {path: $key}) { ... on AssetNode {
  assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } } } } }"""


def test_partitioned_asset_shows_its_partitions_and_their_status(
    topology, dagster_api, page, ingested_entry, clean_montage, faulty_montage
):
    """Each partition's own status: the ingested entry green; of the montages, the one whose focus check
    stopped its run red (its `montage` was never made) and the clean one green beside it."""
    goto(page, f"{topology.webserver}/assets/ingest/local?view=partitions")
    assert _partition_colour(page, ingested_entry.name) == "green"
    page.get_by_text(re.compile(r"^Materialized \(\d+\)$")).first.wait_for(state="visible")
    screenshot(page, "deploy_ingest_partitions")
    statuses = dagster_api.query(PARTITION_STATUSES, {"key": ["montage"]})["assetNodeOrError"]
    statuses = statuses["assetPartitionStatuses"]
    assert faulty_montage.montage_id in statuses["failedPartitions"], statuses
    assert clean_montage.montage_id in statuses["materializedPartitions"], statuses
    goto(page, f"{topology.webserver}/assets/montage?view=partitions")
    assert _partition_colour(page, faulty_montage.montage_id) == "red"
    assert _partition_colour(page, clean_montage.montage_id) == "green"
    failed = len(statuses["failedPartitions"])
    page.get_by_text(f"Failed ({failed})", exact=True).first.wait_for(state="visible")
    screenshot(page, "deploy_montage_partitions")


def test_a_failed_asset_check_shows_red(topology, page, faulty_montage):
    """The focus check of the out-of-focus montage: its evaluation is listed as Failed, in the red palette."""
    assert [r["status"] for r in faulty_montage.runs] == ["FAILURE"]
    goto(page, f"{topology.webserver}/assets/tile_stats?view=checks&checkDetail=focus")
    page.get_by_text("Execution history").first.click()
    # the history's status tag (the page has other "Failed" labels, e.g. filters, drawn before the history loads)
    failed = page.locator("[style*=tag-fill-color]").filter(has_text=re.compile(r"^\s*Failed\s*$")).last
    failed.wait_for(state="visible")
    tag_style, color = failed.evaluate("e => [e.getAttribute('style') || '', getComputedStyle(e).color]")
    red, green, blue = (int(c) for c in color[color.index("(") + 1 : color.index(")")].split(",")[:3])
    assert "red" in tag_style and red > green + 40 and red > blue + 40, f"drawn as {tag_style!r} in {color}"
    screenshot(page, "deploy_failed_check")


def _open_markdown(page) -> None:
    """A large Markdown value (a thumbnail, a minimap) sits behind "[Show Markdown]"; one click opens it in a
    dialog (em_platform/assets/presentation.py)."""
    link = page.get_by_text("[Show Markdown]").first
    link.wait_for(state="visible")
    link.click()


def test_montage_minimap_and_ingest_thumbnail_render_as_images(topology, page, ingested_entry, clean_montage):
    goto(page, f"{topology.webserver}/assets/ingest/local?partition={ingested_entry.name}")
    _open_markdown(page)
    wait_until(lambda: _images_loaded(page, "img[src^='data:image/png']"), 60, "the ingest thumbnail image")
    screenshot(page, "deploy_ingest_thumbnail")
    goto(page, f"{topology.webserver}/assets/montage?partition={clean_montage.montage_id}")
    wait_until(lambda: _images_loaded(page, "img[alt='focus map']"), 60, "the focus map drawn inline")
    _open_markdown(page)
    wait_until(lambda: _images_loaded(page, "img[alt='minimap']"), 60, "the montage minimap image")
    screenshot(page, "deploy_montage_minimap")


def test_materialization_launched_from_the_ui_runs_to_success(topology, dagster_api, page):
    before = {r["runId"] for r in dagster_api.runs(limit=500)}
    goto(page, f"{topology.webserver}/assets/catalog/metadata_catalog")
    page.locator("button").filter(has_text=re.compile(r"^\s*Materialize\s*$")).first.click()

    def launched() -> list[dict]:
        return [r for r in dagster_api.runs(limit=500) if r["runId"] not in before]

    # the click either launches at once or opens a dialog (launchpad / confirmation) asking to confirm
    confirm = page.locator("[role=dialog] button").filter(
        has_text=re.compile(r"^\s*(Launch run|Materialize|Confirm)\s*$")
    )
    wait_until(
        lambda: launched() or confirm.count(), 120, "a run launched from the UI, or a dialog to confirm"
    )
    screenshot(page, "deploy_ui_after_materialize_click")
    if not launched() and confirm.count():
        confirm.first.click()
    new = wait_until(launched, 120, "a run launched from the UI")
    assert len(new) == 1, new
    run_id = new[0]["runId"]
    done = wait_until(
        lambda: next(
            (r for r in dagster_api.runs(limit=500) if r["runId"] == run_id and r["status"] in TERMINAL), None
        ),
        300,
        "the UI-launched run to finish",
    )
    goto(page, f"{topology.webserver}/runs/{run_id}")
    page.get_by_text("Success", exact=False).first.wait_for(state="visible")
    screenshot(page, "deploy_ui_launched_run")
    assert done["status"] == "SUCCESS", dagster_api.failure_messages(run_id)
