"""`make demo` in a fresh checkout with one corrupt file in the inbox: every good entry ingests, the bad one
fails on one line, the runs belong to the code location, and a second demo changes nothing."""

from __future__ import annotations

import dagster as dg
import pytest

from em_platform.demo import format_table, shorten, voxel_text
from tests.support.demo_state import BROKEN, demo_state


@pytest.fixture(scope="module")
def state():
    return demo_state()


@pytest.mark.slow
def test_demo_ingests_everything_good_and_reports_the_bad_entry_on_one_line(state):
    out = state.first.stdout
    assert state.first.returncode != 0, out + state.first.stderr  # one entry failed: make says so too
    assert "runs this time: 7 ingested, 1 failed" in out
    assert out.count(" complete ") == 9  # 7 samples + the demo montage + the simulated tilt series
    assert "montages this time: 1 processed, 0 failed" in out
    assert "storage_consistency_job: storage_consistency ... ok" in out  # its check has a result at once
    assert "stitched: 36 matches, 0 rejected" in out  # 5 x 5 grid, the blank tile matches nothing
    assert (state.data_root / "acquisition" / "demo-montage-5x5" / "montage.ome.zarr" / "zarr.json").is_file()
    failed = [line for line in out.splitlines() if line.startswith(f"  {BROKEN}:")]
    assert len(failed) == 1 and "not a readable TIFF" in failed[0] and "(run " in failed[0]
    assert "Traceback" not in out + state.first.stderr  # tracebacks stay in the run's log
    for demo in (state.first, state.second):  # nothing a user cannot act on
        warned = [line for line in (demo.stdout + demo.stderr).splitlines() if "warning" in line.lower()]
        assert not warned, warned
    assert len(out.splitlines()) < 50
    assert "1.36,1.36,1.36 (zyx)" in out and "4,4 (yx)" in out  # rounded, with the axes they belong to


@pytest.mark.slow
def test_demo_runs_belong_to_the_code_location(state):
    """The UI lists a job's runs by the repository label only runs with a code-location origin carry."""
    runs = state.runs
    assert {"ingest_local_job", "montage_job", "catalog_job"} <= {r.job_name for r in runs}
    assert len([r for r in runs if r.job_name == "ingest_local_job"]) == 8  # 8 inbox entries
    for run in runs:
        assert run.remote_job_origin.location_name == "em_platform"
        assert run.remote_job_origin.repository_origin.get_label() == "__repository__@em_platform"
    failed = [r for r in runs if r.status == dg.DagsterRunStatus.FAILURE]
    assert [r.tags["dagster/partition"] for r in failed] == [BROKEN]


@pytest.mark.slow
def test_second_demo_changes_nothing(state):
    out = state.second.stdout
    assert state.second.returncode == 0, out + state.second.stderr
    assert "0 new sample(s)" in out and "(nothing new)" in out
    assert "cryo-ET simulation: nothing new to simulate" in out and "simulated in" not in out, out
    assert "storage_consistency_job" not in out  # nothing new to check
    assert "cryo-ET simulation (new)" in state.first.stdout and "simulated in" in state.first.stdout
    assert state.tree_after_second == state.tree_after_first


def test_table_keeps_its_columns_with_long_values():
    rows = [["a" * 80, "complete", "1x2"], ["short", "failed", "-"]]
    lines = format_table(["source_id", "status", "shape"], rows, [20, 10, 10])
    status_col = lines[0].index("status")
    assert status_col == 2 + 20 + 2  # the long id is cut to its column's width
    assert [line[status_col : status_col + 8].strip() for line in lines[1:]] == ["complete", "failed"]
    assert shorten("abcdefghij", 5) == "ab…ij" and shorten("abc", 5) == "abc"


def test_voxel_text_names_its_axes_and_rounds():
    assert voxel_text({"voxel_size_nm": {"y": 4.0, "x": 4.0}}) == "4,4 (yx)"
    core = {"voxel_size_nm": {"z": 1.3600000381469728, "y": 1.36, "x": 1.36}, "voxel_size_source": "assumed"}
    assert voxel_text(core) == "1.36,1.36,1.36 (zyx, assumed)"
