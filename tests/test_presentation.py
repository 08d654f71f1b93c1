"""What the UI is given: Markdown-safe descriptions, inline-sized focus maps with a legend, rounded numbers."""

from __future__ import annotations

import re

import dagster as dg

from em_platform.assets.montage import focus_map_markdown
from em_platform.assets.presentation import INLINE_MARKDOWN_LIMIT, is_inline, rounded, voxel_size_metadata


def _descriptions(defs: dg.Definitions):
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        yield str(key), graph.get(key).description or ""
    for check_key in graph.asset_check_keys:
        yield str(check_key), graph.get_check_spec(check_key).description or ""
    for job in defs.resolve_all_job_defs():
        yield job.name, job.description or ""


def test_descriptions_keep_angle_brackets_in_code_spans():
    """The UI renders descriptions as Markdown: a bare `<ts>` would be swallowed as an HTML tag."""
    from em_platform.definitions import defs

    seen = 0
    for name, text in _descriptions(defs):
        seen += 1
        outside_code = re.sub(r"`[^`]*`", "", text)
        assert not re.search(r"<[A-Za-z/][^>]*>", outside_code), f"{name}: {text!r}"
    assert seen > 10


def test_focus_map_is_drawn_inline_with_its_legend():
    grid = {(r, c): (r * 20 + c) / 400 for r in range(20) for c in range(20)}
    value = focus_map_markdown(grid, 20, 20)
    assert is_inline(value) and len(value.md_str) < INLINE_MARKDOWN_LIMIT
    assert value.md_str.startswith("![focus map](data:image/svg+xml,") and "green 0 (sharp)" in value.md_str
    assert "blue: nothing to focus on" in value.md_str


def test_voxel_sizes_lose_their_float_noise():
    assert rounded(1.3600000381469728) == 1.36
    assert voxel_size_metadata({"z": 1.3600000381469728, "x": 0.25}).value == {"z": 1.36, "x": 0.25}


def test_the_focus_map_takes_qc_s_blank_and_no_tissue_tiles_from_the_journal():
    from types import SimpleNamespace

    from em_platform.assets.montage import _nothing_to_focus_on

    def tile(row, column, *faults):
        return SimpleNamespace(row=row, column=column, qc_faults=[{"fault_type": f} for f in faults] or None)

    tiles = [tile(0, 0), tile(0, 1, "blank"), tile(1, 0, "no_tissue"), tile(1, 1, "out_of_focus")]
    assert _nothing_to_focus_on(tiles) == [(0, 1), (1, 0)]


def test_figures_are_shown_to_four_significant_digits_whole_numbers_whole():
    import dagster as dg

    from em_platform.assets.presentation import figure, materialize_result

    assert figure(29472.486632421824) == 29472.0
    assert figure(0.45017596) == 0.4502 and figure(84.85205530263167) == 84.85
    assert figure(-0.007303310952981446) == -0.007303 and figure(0.0) == 0.0
    assert figure(float("nan")) != figure(float("nan"))  # NaN stays NaN
    result = materialize_result(
        metadata={"a_px": 1.23456789, "n": 3, "f": dg.MetadataValue.float(10.759133434949838), "s": "x"}
    )
    assert result.metadata == {"a_px": 1.235, "n": 3, "f": dg.MetadataValue.float(10.76), "s": "x"}


def test_the_montage_page_sums_up_its_tiles_qc_and_points_to_the_checks():
    from types import SimpleNamespace

    from em_platform.assets.montage import tile_qc_markdown

    def tile(passed, *faults):
        return SimpleNamespace(qc_passed=passed, qc_faults=[{"fault_type": f} for f in faults])

    tiles = [
        tile(True),
        tile(True),
        tile(False, "blank"),
        tile(False, "out_of_focus", "saturated"),
        tile(None),
    ]
    text = tile_qc_markdown(tiles).value
    assert text.startswith(
        "4 tiles judged live: 2 passed, 2 failed (blank: 1, out of focus: 1, saturated: 1). "
    )
    assert "[tile_stats](/assets/tile_stats?view=checks)" in text
