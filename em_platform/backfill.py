"""`em-platform backfill JOB --partitions ...`: a partitioned job's assets re-run over many partitions, as one
asset backfill the daemon carries out.

``dagster job backfill`` creates and queues every run itself, one after the other, before it returns: at
make bench-scale's 10³ montages, 1,000 partitions took it longer than a minute (bench/results/scale.json).
The UI's "Materialize selected" over partitions records one asset backfill instead and the daemon launches
its runs as the run queue admits them; this command records the same from the command line, so the
operator's wait does not grow with the partitions. The partitions are checked before anything is recorded:
each must exist in the job's partitions definition (a typo or a montage let go of by the retention names
itself), and the job must be one of the code location's partitioned asset jobs.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg
from dagster._core.execution.backfill import PartitionBackfill
from dagster._core.utils import make_new_backfill_id
from dagster._time import get_current_timestamp


class BackfillRefused(ValueError):
    """The job or a partition is not one the code location has; the message names it and what to do."""


def launch_asset_backfill(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    job_name: str,
    partition_keys: Sequence[str],
    tags: dict[str, str] | None = None,
) -> str:
    """Record an asset backfill of ``job_name``'s assets over ``partition_keys``; its id."""
    try:
        job = defs.resolve_job_def(job_name)
    except Exception:
        raise BackfillRefused(f"no job {job_name!r} in the code location: see `dagster job list`") from None
    assets = sorted(job.asset_layer.selected_asset_keys)
    if not assets or job.partitions_def is None:
        raise BackfillRefused(f"job {job_name!r} materializes no partitioned assets: nothing to backfill")
    keys = list(dict.fromkeys(k.strip() for k in partition_keys if k.strip()))
    if not keys:
        raise BackfillRefused("no partitions given: --partitions KEY,KEY,... or --partitions-file FILE")
    with dg.partition_loading_context(dynamic_partitions_store=instance):
        known = set(job.partitions_def.get_partition_keys(dynamic_partitions_store=instance))
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise BackfillRefused(
            f"{len(unknown)} partition(s) of {job_name} do not exist: {', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''} (a montage let go of by the retention is re-added first: "
            "see docs/retention.md)"
        )
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=make_new_backfill_id(),
        asset_graph=defs.resolve_asset_graph(),
        partition_names=keys,
        asset_selection=assets,
        backfill_timestamp=get_current_timestamp(),
        tags=dict(tags or {}),
        dynamic_partitions_store=instance,
        all_partitions=False,
        title=f"{job_name}: {len(keys)} partition(s)",
        description="em-platform backfill",
        run_config=None,
    )
    instance.add_backfill(backfill)
    return backfill.backfill_id
