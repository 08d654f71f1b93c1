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


def test_partitioned_asset_shows_its_partitions_and_their_status(
    topology, page, ingested_entry, faulty_montage
):
    goto(page, f"{topology.webserver}/assets/ingest/local?view=partitions")
    page.get_by_text(ingested_entry.name).first.wait_for(state="visible")
    page.get_by_text("Materialized", exact=False).first.wait_for(state="visible")
    screenshot(page, "deploy_ingest_partitions")
    goto(page, f"{topology.webserver}/assets/tile_stats?view=partitions")
    page.get_by_text(faulty_montage.montage_id).first.wait_for(state="visible")
    screenshot(page, "deploy_montage_partitions")


def test_a_failed_asset_check_shows_red(topology, page, faulty_montage):
    """The focus check of the out-of-focus montage: its evaluation is listed as Failed, in the red palette."""
    assert [r["status"] for r in faulty_montage.runs] == ["FAILURE"]
    goto(page, f"{topology.webserver}/assets/tile_stats?view=checks&checkDetail=focus")
    page.get_by_text("Execution history").first.click()
    failed = page.get_by_text("Failed", exact=True).last
    failed.wait_for(state="visible")
    tag_style, color = failed.evaluate(
        "e => [(e.closest('[style*=tag-fill-color]') || e).getAttribute('style') || '', getComputedStyle(e).color]"
    )
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
    page.wait_for_timeout(3000)  # a dialog may open (launchpad / confirmation); show what the UI did
    screenshot(page, "deploy_ui_after_materialize_click")
    for label in ("Launch run", "Materialize", "Confirm"):  # confirm in a dialog, if one opened
        dialog_button = page.locator("[role=dialog] button").filter(has_text=re.compile(rf"^\s*{label}\s*$"))
        if dialog_button.count():
            dialog_button.first.click()
            break
    new = wait_until(
        lambda: [r for r in dagster_api.runs(limit=500) if r["runId"] not in before],
        120,
        "a run launched from the UI",
    )
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
