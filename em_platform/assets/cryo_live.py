"""``cryo_live/session``: a live single-particle session as a whole, one partition per session
(``cryo_sessions``). Its page in the Dagster UI is the session's dashboard: exposures acquired, processed and
accepted over time, defocus and CTF fit resolution, the reasons for rejection, the lag; each materialization
also writes the session's report and its accepted exposures as a RELION 5 project. Each exposure was
processed by `em-platform cryo-live` as it landed: nothing is recomputed here."""

from datetime import UTC, datetime

import dagster as dg

from em_platform.assets.presentation import materialize_result
from em_platform.cryo.exposures_db import ExposureStore
from em_platform.cryo.session_publish import publish_session
from em_platform.cryo.thumbnails import markdown_image
from em_platform.partitions import cryo_sessions
from em_platform.resources import CatalogResource, CryoSessionsResource, StorageResource

SESSION = dg.AssetKey(["cryo_live", "session"])
PLOTS = {
    "progress": "exposures acquired, processed and accepted",
    "defocus": "defocus against time",
    "resolution": "CTF fit resolution against time",
    "motion_histogram": "total motion",
    "resolution_histogram": "CTF fit resolution",
    "reasons": "why exposures were rejected",
}


@dg.asset(
    key=SESSION,
    partitions_def=cryo_sessions,
    group_name="cryo_live",
    kinds={"python", "html"},
    description="A live single-particle session: its dashboard, report (HTML, PDF) and accepted exposures "
    "as a RELION 5 project, from what cryo-live stored of each exposure.",
)
def session(
    context: dg.AssetExecutionContext,
    catalog: CatalogResource,
    storage: StorageResource,
    cryo_sessions: CryoSessionsResource,
) -> dg.MaterializeResult:
    key = context.partition_key
    store = ExposureStore(catalog.url)
    try:
        out = storage.cryo_live_root() / key
        published = publish_session(store, key, cryo_sessions.roots(), out, datetime.now(UTC))
    finally:
        store.dispose()
    counts = published.counts
    metadata = {
        **counts,
        "acceptance_pct": round(100 * counts["accepted"] / counts["processed"], 1)
        if counts["processed"]
        else 0,
        **{f"lag_s_{k}": round(v, 1) for k, v in published.lag_s.items()},
        "report": dg.MetadataValue.path(str(published.report)),
        "relion_project": dg.MetadataValue.path(str(published.relion))
        if published.relion
        else "no exposure accepted yet",
        **{
            name: dg.MetadataValue.md(markdown_image(published.plots[name], alt))
            for name, alt in PLOTS.items()
            if name in published.plots
        },
    }
    return materialize_result(metadata=metadata)


cryo_session_job = dg.define_asset_job(
    "cryo_session_job",
    selection=dg.AssetSelection.assets(SESSION),
    description="One live single-particle session (a partition of cryo_sessions): its dashboard, report and "
    "RELION project, as often as the session sensor asks.",
    tags={"em/workload": "cryo"},
)
