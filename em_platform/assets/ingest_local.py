"""``ingest/local``: every inbox entry becomes a multiscale OME-Zarr image with a catalog record."""

import dagster as dg

from em_platform.assets.ingest_metadata import ingest_materialization_metadata
from em_platform.assets.presentation import (
    check_result,
    failed_check,
    materialize_result,
    partitioned_check,
    viewer_link,
)
from em_platform.assets.retries import retry_on_outage
from em_platform.edge import Refused, check_file_name
from em_platform.ingest.local import ingest_entry
from em_platform.partitions import inbox_entries
from em_platform.resources import CatalogResource, DaskResource, InboxResource, StorageResource

CONVERTED_CHECK = "converted"


@dg.asset(
    key=["ingest", "local"],
    group_name="ingest",
    partitions_def=inbox_entries,
    kinds={"zarr", "dask"},
    description="EM files dropped into the inbox (TIFF, OME-TIFF, MRC, DM3/DM4, raw), as OME-Zarr with a catalog record.",
    pool="pixels",
    check_specs=[
        partitioned_check(
            CONVERTED_CHECK,
            ["ingest", "local"],
            inbox_entries,
            "The entry was read and converted; if not, the reason (bad file, wrong type) and what to do.",
        )
    ],
)
def ingest_local(
    context: dg.AssetExecutionContext,
    inbox: InboxResource,
    storage: StorageResource,
    catalog: CatalogResource,
    dask: DaskResource,
):
    key = context.partition_key
    try:
        check_file_name(key, "partition_key")  # a run request names one inbox entry, nothing else
        result = ingest_entry(
            inbox.folder / key,
            inbox.folder,
            store=storage.store(),
            catalog=catalog.db(),
            lineage={"run_id": context.run.run_id, "asset_key": "ingest/local", "partition_key": key},
            dask_client=dask.get_client,
            logger=context.log,
        )
    except Refused as exc:  # kept for the operator (em-platform dead-letters), shown on the partition
        letter = catalog.dead_letters().add(
            source="request", topic="ingest/local", field=exc.field, reason=str(exc), body=key
        )
        context.log.error(f"inbox entry {key!r} refused, dead-lettered as #{letter}: {exc}")
        yield failed_check(CONVERTED_CHECK, exc, entry=key)
        raise dg.Failure(description=f"inbox entry refused: {exc}") from exc
    except (
        Exception
    ) as exc:  # the reason goes where the UI shows it (the partition's check), then the run fails
        yield failed_check(CONVERTED_CHECK, exc, entry=str(inbox.folder / key))
        retry_on_outage(context, exc, storage)  # ... or, for an outage, is retried later
        raise
    yield materialize_result(
        metadata=ingest_materialization_metadata(result, lambda url: viewer_link(storage, url, context.log))
    )
    yield check_result(check_name=CONVERTED_CHECK, passed=True, metadata={"catalog_id": result.record["id"]})
