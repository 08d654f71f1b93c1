"""Two scopes at once: the run queue and the op pools let two montages' live steps run together."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent.parent


def _acquisition_slots(runs: dict, tags: dict) -> int:
    limits = [
        lim["limit"]
        for lim in runs.get("tag_concurrency_limits", [])
        if tags.get(lim["key"]) == lim.get("value")
    ]
    return min([runs["max_concurrent_runs"], *limits])


@pytest.mark.parametrize("config", ["dagster.yaml", "docker/dagster.yaml"])
def test_two_montage_runs_fit_the_run_queue(config):
    from em_platform.definitions import defs

    concurrency = yaml.safe_load((REPO / config).read_text())["concurrency"]
    job = defs.resolve_job_def("montage_job")
    assert _acquisition_slots(concurrency["runs"], job.tags) >= 2
    live = next(n for n in job.graph.node_defs if n.name == "montage_tiles")
    assert live.pool is None or concurrency["pools"]["default_limit"] >= 2  # no pool of one in between
    assert int(job.tags["dagster/priority"]) > 0  # a queued montage goes before other queued runs


def test_the_embedded_instance_reads_those_limits(tmp_path, monkeypatch):
    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    runs = dg.DagsterInstance.from_config(str(tmp_path)).get_concurrency_config().run_queue_config
    limits = {
        "max_concurrent_runs": runs.max_concurrent_runs,
        "tag_concurrency_limits": runs.tag_concurrency_limits,
    }
    assert _acquisition_slots(limits, {"em/workload": "acquisition"}) >= 2
