"""What a deployment under test delivered: its catalog records and stored objects, how many items of some work
ended lost or done twice, and waits on its Dagster runs. Shared by the process topology's fault scenarios
(tests/deploy/faults.py, bench/bench_faults.py) and the container stack's tests (tests/compose).

``topology`` is either deployment's handle: an object with ``catalog_url`` and ``platform_env`` (the
platform's environment: ``EM_DATA_ROOT``, the S3 endpoint and keys); ``api`` a
:class:`tests.deploy.dagster_api.DagsterApi` on its Dagster webserver.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import zarr

from em_platform.catalog.db import CatalogDB
from em_platform.storage.consistency import check_consistency
from em_platform.storage.store import DataStore
from tests.support.polling import wait_until

if TYPE_CHECKING:
    from tests.deploy.dagster_api import DagsterApi

API_POLL_S = 0.5  # waits that ask the Dagster webserver poll at this pace: each ask is a GraphQL query


@dataclass
class FaultResult:
    """One fault scenario's outcome: what its work had to deliver, what it lost or did twice, how fast it
    recovered."""

    fault: str
    during: str  # the work under way when the service was killed
    items: int  # datasets or tiles that work had to deliver
    lost: int  # items not complete at the end (or whose objects are missing or corrupt)
    duplicated: int  # items done twice (two successful runs, two qc.tile for one tile)
    recovery_s: float  # from the kill until every item is complete
    service_back_s: float  # from the kill until the service answered again
    details: dict = field(default_factory=dict)

    def doc(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}


# -- counting ---------------------------------------------------------------------------------------------


def catalog_records(topology, source: str, keys: list[str]) -> dict[str, dict | None]:
    """Each key's catalog record of ``source`` (None where there is none)."""
    db = CatalogDB(topology.catalog_url)
    try:
        return {k: db.find(source, k) for k in keys}
    finally:
        db.dispose()


def store_options(topology) -> dict:
    """fsspec's options for the deployment's S3 store."""
    env = topology.platform_env
    return {
        "key": env["AWS_ACCESS_KEY_ID"],
        "secret": env["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": env["EM_S3_ENDPOINT_URL"]},
    }


def data_store(topology) -> DataStore:
    """The deployment's storage root, as the platform opens it."""
    return DataStore(topology.platform_env["EM_DATA_ROOT"], store_options(topology))


def _pixels_differ(topology, record: dict, volume: np.ndarray) -> bool:
    """The stored OME-Zarr's full-resolution level is not the volume dropped into the inbox."""
    try:
        level0 = zarr.open_group(
            record["files"]["volume"], mode="r", storage_options=store_options(topology)
        )["0"]
        return not np.array_equal(level0[...], volume)
    except Exception:  # unreadable: as lost as different
        return True


def datasets_outcome(topology, api: DagsterApi, dropped: dict[str, np.ndarray]) -> tuple[int, int, dict]:
    """(lost, duplicated, details) of inbox entries: each must have one complete catalog record whose
    objects are all present (with their recorded checksums, where recorded) and whose stored pixels are
    the dropped volume's, and exactly one successful run."""
    keys = list(dropped)
    records = catalog_records(topology, "local", keys)
    report = check_consistency([r for r in records.values() if r], data_store(topology))
    broken = {a.name.split("/", 1)[-1] for a in report.problems}
    broken |= {k for k, r in records.items() if r and _pixels_differ(topology, r, dropped[k])}
    successes = {k: sum(r["status"] == "SUCCESS" for r in api.partition_runs(k)) for k in keys}
    lost = [k for k in keys if not records[k] or records[k]["status"] != "complete" or k in broken]
    twice = [k for k in keys if successes[k] > 1]
    runs = {k: len(api.partition_runs(k)) for k in keys}
    return len(lost), len(twice), {"lost": lost, "duplicated": twice, "runs": runs, "store": report.summary()}


def tiles_outcome(topology, acquired) -> tuple[int, int, dict]:
    """(lost, duplicated, details) of a montage's tiles: one ``qc.tile`` each, and the montage complete."""
    heard = Counter(t["tile_id"] for t in acquired.qc_tiles)
    rows = catalog_records(topology, "acquisition", [acquired.montage_id])[acquired.montage_id]
    lost = acquired.tiles - len(heard)
    if not rows or rows["status"] != "complete":
        lost = acquired.tiles  # the montage itself did not end complete
    twice = sum(1 for n in heard.values() if n > 1)
    details = {
        "montage": acquired.montage_id,
        "qc_status": acquired.qc_status,
        "runs": [r["status"] for r in acquired.runs],
        "record": rows and rows["status"],
    }
    return lost, twice, details


def wait_partitions_done(api: DagsterApi, keys: list[str], timeout: float = 600) -> float:
    """Until each partition key has a successful run and no run still going; returns the time it was so."""

    def done():
        for k in keys:
            runs = api.partition_runs(k)
            if not any(r["status"] == "SUCCESS" for r in runs):
                return False
            if any(r["status"] not in ("SUCCESS", "FAILURE", "CANCELED") for r in runs):
                return False
        return True

    wait_until(done, timeout, f"{keys} to complete", API_POLL_S)
    return time.monotonic()


def wait_partition_started(api: DagsterApi, key: str, timeout: float = 600) -> None:
    """Until a run of partition ``key`` is STARTED."""
    wait_until(
        lambda: any(r["status"] == "STARTED" for r in api.partition_runs(key)),
        timeout,
        f"{key}'s run to start",
        API_POLL_S,
    )
