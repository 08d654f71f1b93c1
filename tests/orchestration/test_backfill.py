"""`em-platform backfill`: one asset backfill over the partitions given, recorded for the daemon; a job or a
partition the code location does not have is refused before anything is recorded, naming it."""

from __future__ import annotations

import dagster as dg
import pytest
from dagster._core.execution.backfill import BulkActionStatus

from em_platform.backfill import BackfillRefused, launch_asset_backfill
from em_platform.cli import main
from tests.support.platform import make_platform

MONTAGES = ["m-0001", "m-0002", "m-0003"]


def test_an_asset_backfill_over_the_partitions_is_recorded_for_the_daemon(tmp_path):
    defs = make_platform(tmp_path).defs
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("montages", [*MONTAGES, "m-0004"])
        backfill_id = launch_asset_backfill(instance, defs, "montage_job", [*MONTAGES, MONTAGES[0], " "])
        [backfill] = instance.get_backfills()
        assert backfill.backfill_id == backfill_id and backfill.status == BulkActionStatus.REQUESTED
        assets = defs.resolve_job_def("montage_job").asset_layer.selected_asset_keys
        target = {
            (p.asset_key, p.partition_key)
            for p in backfill.asset_backfill_data.target_subset.iterate_asset_partitions()
        }
        assert target == {(a, m) for a in assets for m in MONTAGES}  # each once, m-0004 not asked for


@pytest.mark.parametrize(
    ("job", "keys", "message"),
    [
        ("montage_job", ["m-0001", "m-9999"], "1 partition\\(s\\) of montage_job do not exist: m-9999"),
        ("no_such_job", ["m-0001"], "no job 'no_such_job'"),
        ("catalog_job", ["m-0001"], "materializes no partitioned assets"),
        ("montage_job", [" ", ""], "no partitions given"),
    ],
)
def test_a_job_or_partition_the_code_location_lacks_is_refused_and_nothing_recorded(
    tmp_path, job, keys, message
):
    defs = make_platform(tmp_path).defs
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("montages", ["m-0001"])
        with pytest.raises(BackfillRefused, match=message):
            launch_asset_backfill(instance, defs, job, keys)
        assert instance.get_backfills() == []


def test_the_command_says_what_it_cannot_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["backfill", "montage_job", "--partitions-file", str(tmp_path / "absent.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_the_command_records_the_backfill_on_the_instance_of_dagster_home(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    for name, value in {
        "DAGSTER_HOME": home,
        "EM_DATA_ROOT": tmp_path / "data",
        "EM_INBOX": tmp_path / "in",
    }.items():
        monkeypatch.setenv(name, str(value))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("montages", MONTAGES)
    (tmp_path / "keys.txt").write_text("\n".join(MONTAGES) + "\n")
    assert main(["backfill", "montage_job", "--partitions-file", str(tmp_path / "keys.txt")]) == 0
    assert "over 3 partition(s)" in capsys.readouterr().out
    with dg.DagsterInstance.from_config(str(home)) as instance:
        [backfill] = instance.get_backfills()
        assert (
            sorted(
                {
                    p.partition_key
                    for p in backfill.asset_backfill_data.target_subset.iterate_asset_partitions()
                }
            )
            == MONTAGES
        )
