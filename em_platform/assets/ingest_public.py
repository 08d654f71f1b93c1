"""``ingest/<source>``: one asset per public EM source, a partition per dataset, a job and a weekly schedule each.

The run config of each asset holds the source's endpoints (defaults: the real public ones), so a
facility can point an ingest at a mirror without touching code; a bad endpoint fails the run at its
start, naming the field. The schedule is off until a user turns it on; each tick re-checks every dataset
and re-ingests only those whose source changed (the asset compares the source fingerprint).
"""

import dataclasses
import os
import typing

import dagster as dg
from pydantic import create_model

from em_platform.assets.ingest_metadata import ingest_materialization_metadata
from em_platform.assets.presentation import (
    check_result,
    failed_check,
    materialize_result,
    partitioned_check,
    viewer_link,
)
from em_platform.assets.retries import retry_on_outage
from em_platform.edge import DATASET_ID, Refused
from em_platform.ingest.public import PublicIngestError, ingest_public_dataset
from em_platform.resources import CatalogResource, DaskResource, StorageResource
from em_platform.settings import ConfigError
from em_platform.sources.registry import SOURCES, SourceKind, endpoint_defaults

INGESTED_CHECK = "ingested"
WEEKLY = "0 3 * * 0"  # Sunday 03:00 UTC: public sources change rarely; a quiet hour for the network


def _config_class(kind: SourceKind) -> type[dg.Config]:
    """A run-config class with one field per endpoint setting (same names; defaults: the environment's
    EM_<SOURCE>_<FIELD>, else the public endpoints) plus run options."""
    hints = typing.get_type_hints(kind.endpoints)
    try:
        defaults = endpoint_defaults(kind, os.environ)
    except ValueError as exc:
        raise ConfigError(f"ingest/{kind.name}: {exc}") from None
    fields: dict[str, typing.Any] = {name: (hints[name], default) for name, default in defaults.items()}
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


def _run_options(config: dg.Config) -> tuple[bool, bool]:
    """``keep_downloads`` and ``force``: the run options every source's config class has (:func:`_config_class`)."""
    options = config.model_dump()
    return bool(options["keep_downloads"]), bool(options["force"])


def build_public_ingest(
    kind: SourceKind,
) -> tuple[dg.AssetsDefinition, typing.Any, dg.ScheduleDefinition]:
    """The asset, its job (for backfills) and its weekly re-check schedule."""
    config_cls = _config_class(kind)  # the defaults (public or from the environment) are checked here
    partitions = dg.StaticPartitionsDefinition(sorted(kind.datasets))
    weight = "heavy" if kind.heavy else "light"

    @dg.asset(
        key=["ingest", kind.name],
        group_name="ingest",
        partitions_def=partitions,
        kinds={"zarr", "dask"},
        description=f"{kind.title}, as multiscale OME-Zarr with a catalog record.",
        tags={"em/ingest-weight": weight},
        check_specs=[
            partitioned_check(
                INGESTED_CHECK,
                ["ingest", kind.name],
                partitions,
                "The dataset was fetched and converted (or is unchanged); if not, why and what to do.",
            )
        ],
    )
    def _ingest(
        context: dg.AssetExecutionContext,
        # one run-config class per source, built here from its endpoints' defaults: Dagster reads the annotation
        # at run time, which mypy cannot follow (a variable as a type)
        config: config_cls,  # type: ignore[valid-type]
        storage: StorageResource,
        catalog: CatalogResource,
        dask: DaskResource,
    ):
        endpoints = _endpoints(kind, config)
        keep_downloads, force = _run_options(config)
        try:
            DATASET_ID.check(context.partition_key, "partition_key")  # it names the download folder
        except Refused as exc:
            letter = catalog.dead_letters().add(
                source="request",
                topic=f"ingest/{kind.name}",
                field=exc.field,
                reason=str(exc),
                body=context.partition_key,
            )
            raise dg.Failure(description=f"ingest/{kind.name}: {exc} (dead letter #{letter})") from exc
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
                keep_downloads=keep_downloads,
                force=force,
                logger=context.log,
            )
        except PublicIngestError as exc:
            yield failed_check(
                INGESTED_CHECK, exc, dataset=context.partition_key
            )  # shown on the partition's page
            retry_on_outage(context, exc, storage)  # an outage is retried later
            raise dg.Failure(description=str(exc)) from exc
        yield materialize_result(
            metadata=ingest_materialization_metadata(
                result, lambda url: viewer_link(storage, url, context.log)
            )
        )
        yield check_result(
            check_name=INGESTED_CHECK, passed=True, metadata={"catalog_id": result.record["id"]}
        )

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


PUBLIC_INGESTS = [build_public_ingest(kind) for kind in SOURCES.values()]
public_ingest_assets = [a for a, _, _ in PUBLIC_INGESTS]
public_ingest_jobs = [j for _, j, _ in PUBLIC_INGESTS]
public_ingest_schedules = [s for _, _, s in PUBLIC_INGESTS]
