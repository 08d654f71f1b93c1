"""What the operator sees of a run on SLURM (issue 37, point 3): the run's page in the Dagster UI, in a real
browser, shows the worker jobs' ids and their times in the queue and computing: in its log, and as the run's
tags (behind "View tags and config")."""

from __future__ import annotations

import dagster as dg

from em_platform.simulation.scope import simulate_montage
from em_platform.simulation.scope_config import ScopeConfig
from em_platform.tem.journal import Journal
from tests.slurm.test_platform_on_slurm import run_jobs, use_slurm
from tests.support.browser import (
    goto,
    new_page,
    open_browser,
    prepare_dagster_home,
    require_browser,
    screenshot,
    start_webserver,
)
from tests.support.platform import make_platform

MONTAGE = "m-slurm-ui"


def test_the_run_page_shows_the_slurm_jobs_and_their_times(slurm, tmp_path, monkeypatch):
    require_browser()
    env = use_slurm(slurm, tmp_path, monkeypatch)
    platform = make_platform(tmp_path, extra_env=env)
    journal = Journal(platform.settings.catalog_url)
    cfg = ScopeConfig(rows=2, columns=2, overlap=0.15, jitter_px=6.0, seed=3)
    simulate_montage(cfg, tmp_path / "tiles", journal.record, sleep=lambda s: None, montage_id=MONTAGE)
    home = prepare_dagster_home(tmp_path / "dagster_home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the instance's dagster.yaml reads it
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("montages", [MONTAGE])
        result = platform.defs.resolve_job_def("montage_job").execute_in_process(
            instance=instance, partition_key=MONTAGE
        )
        assert result.success
        jobs = run_jobs(instance, result.run_id)
        tags = instance.get_run_by_id(result.run_id).tags
    server_env = {**env, "EM_DATA_ROOT": str(platform.data_root), "EM_INBOX": str(platform.inbox)}
    with (
        start_webserver(home, env=server_env, module="em_platform.definitions") as web,
        open_browser() as browser,
    ):
        page = new_page(browser)
        goto(page, f"{web.url}/runs/{result.run_id}")
        page.get_by_text(f"SLURM worker jobs {','.join(jobs)}:", exact=False).first.wait_for(state="visible")
        log_png = screenshot(page, "slurm_run_log")
        page.get_by_text("View tags and config").first.click()
        for name in ("em/slurm_jobs", "em/slurm_queue_wait_s", "em/slurm_compute_s"):
            page.get_by_text(name, exact=False).first.wait_for(state="visible")
        shown = page.inner_text("body")
        png = screenshot(page, "slurm_run_tags")
    assert ",".join(jobs) in shown, shown[:2000]
    assert tags["em/slurm_compute_s"] in shown, shown[:2000]
    print(f"the run page with its SLURM jobs {jobs}: {log_png} (its log), {png} (its tags)")
