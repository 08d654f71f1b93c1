"""What the operator sees in the web UI after `make demo` (with one corrupt inbox file), in a real browser.

One webserver (workspace.yaml, as `make dev` loads it) over the demo's Dagster home and data root for the
module; each test opens a page in headless Chromium, checks what is drawn, and saves a screenshot. Two of them
are the README's pictures (tests/support/doc_pictures.py: a test fails when one is older than its page).
"""

from __future__ import annotations

import json
import urllib.parse

import pytest

from tests.support.browser import (
    goto,
    new_page,
    open_browser,
    open_in_neuroglancer,
    screenshot,
    start_webserver,
)
from tests.support.demo_state import BROKEN, demo_state
from tests.support.doc_pictures import keep_doc_picture

pytestmark = pytest.mark.slow
MONTAGE = "demo-montage-5x5"


@pytest.fixture(scope="module")
def ui():
    from tests.support.browser import require_browser

    require_browser()  # skip before the (slow) demo when there is no browser
    state = demo_state()
    assert state.first.stdout.count(" complete ") == 9, state.first.stdout + state.first.stderr
    # the checkout's own workspace.yaml and code, as `make dev` there loads them
    with (
        start_webserver(
            state.dagster_home, env=state.env, workspace=state.checkout / "workspace.yaml", cwd=state.checkout
        ) as web,
        open_browser() as browser,
    ):
        yield web, browser, state


def _page(browser):
    return new_page(browser)


def test_job_page_and_timeline_list_the_demo_runs(ui):
    web, browser, _ = ui
    page = _page(browser)
    goto(page, f"{web.url}/locations/em_platform/jobs/ingest_local_job/runs")
    page.get_by_text(BROKEN).first.wait_for()  # the failed run's partition tag
    page.get_by_text("fibsem_crop.ome.tif").first.wait_for()
    assert page.get_by_text("No runs found").count() == 0
    screenshot(page, "job_runs")
    goto(page, f"{web.url}/overview/activity/timeline")
    page.get_by_text("montage_job").first.wait_for()
    assert page.get_by_text("No runs or scheduled ticks").count() == 0
    screenshot(page, "timeline")


def _image_drawn(img) -> bool:
    return bool(img.evaluate("i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 40"))


def test_montage_focus_map_inline_and_minimap_as_images(ui):
    web, browser, _ = ui
    page = _page(browser)
    goto(page, f"{web.url}/assets/montage?view=partitions&partition={MONTAGE}")
    focus = page.locator("img[alt='focus map']").first
    focus.wait_for()
    assert _image_drawn(focus)
    page.get_by_text("green 0 (sharp)").first.wait_for()  # the legend beside it
    screenshot(page, "montage_partition", full_page=True)
    rows = web.graphql(
        """query($partition: String!) { assetNodeOrError(assetKey: {path: ["montage"]}) { ... on AssetNode {
        assetMaterializations(partitions: [$partition], limit: 1) { metadataEntries { label } } } } }""",
        {"partition": MONTAGE},
    )["assetNodeOrError"]["assetMaterializations"][0]["metadataEntries"]
    keep_doc_picture(
        "montage-focus-map", screenshot(page, "montage_partition_top"), [r["label"] for r in rows]
    )
    page.get_by_text("[Show Markdown]").first.click()  # the minimap: too large for the UI to draw inline
    minimap = page.locator("img[alt='minimap']").first
    minimap.wait_for()
    assert _image_drawn(minimap)
    screenshot(page, "montage_minimap")


def test_failed_partition_leaves_the_healthy_ones_green(ui):
    web, browser, _ = ui
    statuses = web.graphql(
        """{ assetNodeOrError(assetKey: {path: ["ingest", "local"]}) { ... on AssetNode {
        assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } } } } }"""
    )["assetNodeOrError"]["assetPartitionStatuses"]
    assert statuses["failedPartitions"] == [BROKEN]
    assert len(statuses["materializedPartitions"]) == 7
    page = _page(browser)
    goto(page, f"{web.url}/assets/ingest/local?view=partitions")
    page.get_by_text("Failed (1)").first.wait_for()
    page.get_by_text("Materialized (7)").first.wait_for()
    screenshot(page, "ingest_local_partitions")


def test_failed_check_shows_its_reason(ui):
    web, browser, _ = ui
    page = _page(browser)
    goto(page, f"{web.url}/assets/ingest/local?view=checks")
    page.get_by_text("converted").first.click()
    page.get_by_text("Execution history").first.click()  # one row per partition's evaluation
    page.get_by_text(BROKEN).first.wait_for()
    page.get_by_text("is not a readable TIFF").first.wait_for()
    screenshot(page, "failed_check", full_page=True)


def test_lineage_has_the_montage_to_catalog_edge_and_descriptions_keep_their_text(ui):
    web, browser, _ = ui
    node = web.graphql(
        """{ assetNodeOrError(assetKey: {path: ["catalog", "metadata_catalog"]}) { ... on AssetNode {
        description dependencyKeys { path } } } }"""
    )["assetNodeOrError"]
    assert ["montage_upload"] in [d["path"] for d in node["dependencyKeys"]]
    cryo = web.graphql(
        """{ assetNodeOrError(assetKey: {path: ["cryo", "motion_corrected"]}) { ... on AssetNode {
        dependencyKeys { path } } } }"""
    )["assetNodeOrError"]
    assert ["simulation", "tilt_series"] in [d["path"] for d in cryo["dependencyKeys"]]  # simulation -> cryo
    page = _page(browser)
    goto(page, f"{web.url}/assets/catalog/metadata_catalog")
    page.get_by_text("metadata_catalog_<ts>.json").first.wait_for()  # not eaten as an HTML tag
    screenshot(page, "catalog_asset")
    goto(
        page, f"{web.url}/asset-groups"
    )  # groups drawn collapsed: acquisition, catalog, ingest, montage, ...
    for group in ("acquisition", "catalog", "ingest", "montage"):
        page.get_by_text(group).first.wait_for()
    screenshot(page, "lineage")


# -- one click to full resolution: the asset page's Neuroglancer link, drawn by `em-platform viewer` ----------


@pytest.fixture(scope="module")
def viewer(ui):
    """`em-platform viewer` on the demo's data root, where the demo's links (EM_VIEWER_URL) point."""
    from urllib.parse import urlsplit

    from em_platform.viewer.server import ViewerServer

    _, _, state = ui
    where = urlsplit(state.env["EM_VIEWER_URL"])
    server = ViewerServer(str(state.data_root), where.hostname, where.port).start()
    yield server
    server.stop()


def test_montage_opens_in_neuroglancer(ui, viewer):
    web, browser, _ = ui
    open_in_neuroglancer(browser, web.url, viewer.url, "montage_upload", MONTAGE, "montage")


def test_ingested_volume_opens_in_neuroglancer(ui, viewer):
    web, browser, _ = ui
    open_in_neuroglancer(browser, web.url, viewer.url, "ingest/local", "fibsem_crop.ome.tif", "ingest")


def test_tomogram_opens_in_neuroglancer(ui, viewer):
    web, browser, _ = ui
    picture, link = open_in_neuroglancer(
        browser, web.url, viewer.url, "cryo/tomogram", "demo_apoferritin_000", "tomogram"
    )
    view = json.loads(urllib.parse.unquote(link.split("#!", 1)[1]))
    shows = [f"layout {view['layout']}"] + [f"layer {layer['name']}" for layer in view["layers"]]
    keep_doc_picture("neuroglancer-tomogram", picture, shows)
