"""A failed blocking check leaves its asset unmaterialized (red), its checks and sentence reported."""

import dagster as dg
import pytest

from em_platform.assets.signals import gate_blocking_checks

PARTS = dg.StaticPartitionsDefinition(["good", "bad"])


@dg.asset(
    partitions_def=PARTS,
    check_specs=[
        dg.AssetCheckSpec("sharp", asset="scan", blocking=True),
        dg.AssetCheckSpec("tidy", asset="scan"),  # not blocking: a failure is only a warning here
    ],
)
@gate_blocking_checks
def scan(context: dg.AssetExecutionContext):
    bad = context.partition_key == "bad"
    yield dg.MaterializeResult(metadata={"focus": 0.9 if bad else 0.1})
    yield dg.AssetCheckResult(check_name="sharp", passed=not bad, description="focus 0.9 against < 0.5")
    yield dg.AssetCheckResult(check_name="tidy", passed=False)


@dg.multi_asset(
    specs=[dg.AssetSpec("a"), dg.AssetSpec("b")],
    check_specs=[dg.AssetCheckSpec("ok", asset="b", blocking=True)],
)
@gate_blocking_checks
def pair():
    yield dg.MaterializeResult(asset_key="a")
    yield dg.MaterializeResult(asset_key="b")
    yield dg.AssetCheckResult(asset_key="b", check_name="ok", passed=False, description="b is wrong")


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def _check(instance, asset: str, name: str):
    key = dg.AssetCheckKey(dg.AssetKey(asset), name)
    return instance.event_log_storage.get_asset_check_execution_history(key, limit=1)[0]


def test_failed_blocking_check_withholds_the_materialization(instance):
    assert dg.materialize([scan], instance=instance, partition_key="good").success
    assert not dg.materialize([scan], instance=instance, partition_key="bad", raise_on_error=False).success
    status = instance.get_status_by_partition(dg.AssetKey("scan"), ["good", "bad"], PARTS)
    assert status == {"good": dg.AssetPartitionStatus.MATERIALIZED, "bad": dg.AssetPartitionStatus.FAILED}
    sharp = _check(instance, "scan", "sharp")
    assert sharp.status.value == "FAILED"
    assert "focus 0.9 against < 0.5" in sharp.event.dagster_event.event_specific_data.description
    assert _check(instance, "scan", "tidy").status.value == "FAILED"  # reported, as every check is


def test_in_a_multi_asset_only_the_blocked_asset_is_withheld(instance):
    result = dg.materialize([pair], instance=instance, raise_on_error=False)
    assert not result.success
    assert instance.get_latest_materialization_event(dg.AssetKey("a")) is not None
    assert instance.get_latest_materialization_event(dg.AssetKey("b")) is None
    failure = [e for e in result.all_events if e.is_step_failure][0]
    assert "not materialized (b: ok): b is wrong" in failure.event_specific_data.error.message
