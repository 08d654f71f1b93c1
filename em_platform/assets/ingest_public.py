"""``ingest/<source>``: one asset per public EM source, a partition per dataset, a job and a weekly schedule each.

The run config of each asset holds the source's endpoints (defaults: the real public ones), so a
facility can point an ingest at a mirror without touching code; a bad endpoint fails the run at its
start, naming the field. The schedule is off until a user turns it on; each tick re-checks every dataset
and re-ingests only those whose source changed (the asset compares the source fingerprint).
"""

import base64
import dataclasses
import typing

import dagster as dg
from pydantic import create_model

from em_platform.resources import CatalogResource, DaskResource, StorageResource
from em_platform.sources.ingest import PublicIngestError, ingest_public_dataset
from em_platform.sources.registry import SOURCES, SourceKind

WEEKLY = "0 3 * * 0"  # Sunday 03:00 UTC: public sources change rarely; a quiet hour for the network


def _config_class(kind: SourceKind) -> type[dg.Config]:
    """A run-config class with one field per endpoint setting (same names, same defaults) plus run options."""
    hints = typing.get_type_hints(kind.endpoints)
    fields: dict[str, typing.Any] = {
        f.name: (hints[f.name], f.default) for f in dataclasses.fields(kind.endpoints) if f.init
    }
    fields["keep_downloads"] = (bool, False)  # keep the downloaded source files after a complete ingest
    fields["force"] = (bool, False)  # re-ingest even if the source has not changed
    return create_model(f"{kind.name.capitalize()}IngestConfig", __base__=dg.Config, **fields)


def _endpoints(kind: SourceKind, config: dg.Config):
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(kind.endpoints) if f.init}
    try:
        endpoints = kind.endpoints(**values)
        endpoints.validate()
    except (TypeError, ValueError) as exc:
        raise dg.Failure(
            description=f"ingest/{kind.name}: bad endpoint configuration: {exc}. Fix the run config "
            f"(ops: ingest__{kind.name}: config: ...) or remove the field to use the public default."
        ) from exc
    return endpoints


def build_public_ingest(
    kind: SourceKind,
) -> tuple[dg.AssetsDefinition, typing.Any, dg.ScheduleDefinition]:
    """The asset, its job (for backfills) and its weekly re-check schedule."""
    kind.endpoints().validate()  # the shipped defaults are checked when the code location loads
    config_cls = _config_class(kind)
    partitions = dg.StaticPartitionsDefinition(sorted(kind.datasets))
    weight = "heavy" if kind.heavy else "light"

    @dg.asset(
        key=["ingest", kind.name],
        group_name="ingest",
        partitions_def=partitions,
        kinds={"zarr", "dask"},
        description=f"{kind.title}, as multiscale OME-Zarr with a catalog record.",
        tags={"em/ingest-weight": weight},
    )
    def _ingest(
        context: dg.AssetExecutionContext,
        config: config_cls,
        storage: StorageResource,
        catalog: CatalogResource,
        dask: DaskResource,
    ) -> dg.MaterializeResult:
        endpoints = _endpoints(kind, config)
        try:
            source = kind.make_source(context.partition_key, endpoints)
        except ValueError as exc:
            raise dg.Failure(description=f"ingest/{kind.name}: {exc}") from exc
        try:
            result = ingest_public_dataset(
                source,
                store=storage.store(),
                catalog=catalog.db(),
                downloads=storage.downloads(),
                lineage={
                    "run_id": context.run.run_id,
                    "asset_key": f"ingest/{kind.name}",
                    "partition_key": context.partition_key,
                },
                dask_client=dask.get_client,
                keep_downloads=config.keep_downloads,
                force=config.force,
                logger=context.log,
            )
        except PublicIngestError as exc:
            raise dg.Failure(description=str(exc)) from exc
        return dg.MaterializeResult(metadata=_metadata(result))

    job = dg.define_asset_job(
        f"ingest_{kind.name}_job",
        selection=dg.AssetSelection.assets(["ingest", kind.name]),
        partitions_def=partitions,
        description=f"Ingest datasets of {kind.name} (one per partition); backfill with "
        f"`dagster job backfill -j ingest_{kind.name}_job --partitions KEY[,KEY...]`.",
        tags={"em/workload": "ingest", "em/ingest-weight": weight},
    )

    @dg.schedule(
        name=f"ingest_{kind.name}_weekly",
        job=job,
        cron_schedule=WEEKLY,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Weekly re-check of every {kind.name} dataset; only changed ones are fetched again.",
    )
    def _weekly(context: dg.ScheduleEvaluationContext):
        stamp = context.scheduled_execution_time.strftime("%Y-%m-%dT%H:%M")
        return [
            dg.RunRequest(run_key=f"{key}@{stamp}", partition_key=key)
            for key in partitions.get_partition_keys()
        ]

    return _ingest, job, _weekly


def _metadata(result) -> dict[str, typing.Any]:
    rec = result.record
    core = rec["metadata"]["core"]
    tech = rec["metadata"].get("technical", {})
    meta: dict[str, typing.Any] = {
        "path": dg.MetadataValue.path(result.volume_url),
        "catalog_id": rec["id"],
        "converted": result.converted,
        "source_fingerprint": rec["metadata"]["provenance"]["source_fingerprint"],
        "shape": str(tuple(core["volume_shape"])),
        "axes": "".join(core["axes"]),
        "dtype": core["data_type"],
        "voxel_size_nm": dg.MetadataValue.json(core["voxel_size_nm"]),
        "voxel_size_source": core["voxel_size_source"],
        "sha256": tech.get("sha256", ""),
        "source_bytes": tech.get("file_size_bytes", 0),
        "source_urls": dg.MetadataValue.json(rec["metadata"]["provenance"].get("source_urls", [])),
    }
    if result.thumbnail_png:
        png = base64.b64encode(result.thumbnail_png).decode()
        meta["thumbnail"] = dg.MetadataValue.md(f"![{rec['source_id']}](data:image/png;base64,{png})")
    return meta


PUBLIC_INGESTS = [build_public_ingest(kind) for kind in SOURCES.values()]
public_ingest_assets = [a for a, _, _ in PUBLIC_INGESTS]
public_ingest_jobs = [j for _, j, _ in PUBLIC_INGESTS]
public_ingest_schedules = [s for _, _, s in PUBLIC_INGESTS]
