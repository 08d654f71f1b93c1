"""The fault-injection suite (issue 22, point 6): SIGKILL the daemon, a Dask worker, a run's process, the
listener and the object store, each while an ingest or a montage is under way, on the process topology.
Every dataset and tile must end exactly once and complete (catalog, Dagster's runs, the broker's qc.tile
messages, the stored objects' checksums), with no human step. bench/bench_faults.py runs the same scenarios
and records their recovery times in bench/results/faults.json."""

from __future__ import annotations

import json

import pytest

from tests.deploy.faults import FAULTS, run


@pytest.mark.parametrize("fault", FAULTS)
def test_a_killed_service_loses_and_duplicates_nothing(topology, dagster_api, fault):
    result = run(fault, topology, dagster_api)
    print(f"\n{fault}: {json.dumps(result.doc())}")
    assert result.lost == 0 and result.duplicated == 0, (
        f"{fault} killed during {result.during}: {result.lost} of {result.items} lost, "
        f"{result.duplicated} duplicated: {result.details}"
    )
    if fault == "run-montage":  # killed mid-montage: its retry resumed some tiles and judged the others
        assert 3 <= result.details["verdicts_before_the_kill"] < result.items, result.details
    if fault == "listener":
        assert result.details["qc_status"][-1][0] == "GOOD", (
            result.details
        )  # the verdict of an undisturbed run
