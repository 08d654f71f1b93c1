"""``ingest/local``: every inbox entry becomes a multiscale OME-Zarr image with a catalog record."""

import base64

import dagster as dg

from em_platform.ingest.local import ingest_entry
from em_platform.partitions import inbox_entries
from em_platform.resources import CatalogResource, DaskResource, InboxResource, StorageResource


@dg.asset(
    key=["ingest", "local"],
    group_name="ingest",
    partitions_def=inbox_entries,
    kinds={"zarr", "dask"},
    description="EM files dropped into the inbox (TIFF, OME-TIFF, MRC, DM3/DM4, raw), as OME-Zarr with a catalog record.",
    pool="pixels",
)
def ingest_local(
    context: dg.AssetExecutionContext,
    inbox: InboxResource,
    storage: StorageResource,
    catalog: CatalogResource,
    dask: DaskResource,
) -> dg.MaterializeResult:
    key = context.partition_key
    result = ingest_entry(
        inbox.folder / key,
        inbox.folder,
        store=storage.store(),
        catalog=catalog.db(),
        lineage={"run_id": context.run.run_id, "asset_key": "ingest/local", "partition_key": key},
        dask_client=dask.get_client,
        logger=context.log,
    )
    rec = result.record
    core, tech = rec["metadata"]["core"], rec["metadata"]["technical"]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(result.volume_url),
            "shape": str(tuple(core["volume_shape"])),
            "axes": "".join(core["axes"]),
            "dtype": core["data_type"],
            "voxel_size_nm": dg.MetadataValue.json(core["voxel_size_nm"]),
            "voxel_size_source": core["voxel_size_source"],
            "pyramid_levels": len(rec["metadata"]["ome_zarr"]["levels"]),
            "sha256": tech["sha256"],
            "source_bytes": tech["file_size_bytes"],
            "source_format": tech["source_format"],
            "catalog_id": rec["id"],
            "converted": result.converted,
            "thumbnail": dg.MetadataValue.md(
                f"![{key}](data:image/png;base64,{base64.b64encode(result.thumbnail_png).decode()})"
            ),
        },
    )
