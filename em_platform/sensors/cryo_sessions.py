"""``cryo_session_sensor``: each live single-particle session that cryo-live has recorded becomes a partition of
``cryo_sessions``, and is published (``cryo_live/session``: its dashboard, report and RELION project) when its
first exposure lands, then again at most every :data:`PUBLISH_EVERY_S` while it changes, and once more
after its last change.

It reads only the sessions changed since its last tick (``cryo_live_sessions``), never the exposures: its
tick costs the same on the last day of a 50,000-exposure session as on the first."""

import json
import time
from datetime import UTC, datetime

import dagster as dg

from em_platform.assets.cryo_live import cryo_session_job
from em_platform.cryo.exposures_db import ExposureStore
from em_platform.partitions import cryo_sessions
from em_platform.resources import CatalogResource
from em_platform.settings import sensor_interval_seconds

PUBLISH_EVERY_S = 600.0
FORGET_AFTER_S = 30 * 86400.0  # a session published this long ago and unchanged since is not remembered
clock = time.time  # the publishing interval's clock


@dg.sensor(
    job=cryo_session_job,
    minimum_interval_seconds=sensor_interval_seconds(30),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Publishes each live single-particle session (its dashboard, report and RELION project) as "
    "its exposures are processed, at most every 10 minutes, and after its last exposure.",
)
def cryo_session_sensor(context: dg.SensorEvaluationContext, catalog: CatalogResource) -> dg.SensorResult:
    state = json.loads(context.cursor) if context.cursor else {}
    since = datetime.fromisoformat(state["since"]) if state.get("since") else datetime.fromtimestamp(0, UTC)
    pending: dict[str, str] = state.get("pending", {})  # session -> when it last changed
    published: dict[str, float] = state.get("published", {})  # session -> when it was last requested
    store = ExposureStore(catalog.url, create=True)
    try:
        for session, at in store.sessions_updated_since(since):
            pending[session] = at.isoformat()
            since = max(since, at)
    finally:
        store.dispose()
    now = clock()
    assert cryo_sessions.name is not None  # partitions.py names it
    known = set(context.instance.get_dynamic_partitions(cryo_sessions.name))
    new_keys = sorted(k for k in pending if k not in known)
    requests = []
    for session, changed in sorted(pending.items()):
        if now - published.get(session, 0.0) < PUBLISH_EVERY_S:
            continue
        requests.append(dg.RunRequest(partition_key=session, run_key=f"{session}@{changed}"))
        published[session] = now
    for request in requests:
        assert request.partition_key is not None  # each is a session's (above)
        pending.pop(request.partition_key)
    published = {k: t for k, t in published.items() if now - t < FORGET_AFTER_S or k in pending}
    cursor = json.dumps(
        {"since": since.isoformat(), "pending": pending, "published": published}, sort_keys=True
    )
    if not requests:
        reason = (
            f"{len(pending)} session(s) changed, published again within {PUBLISH_EVERY_S:.0f} s"
            if pending
            else "no session changed"
        )
        return dg.SensorResult(
            skip_reason=dg.SkipReason(reason),
            cursor=cursor,
            dynamic_partitions_requests=[cryo_sessions.build_add_request(new_keys)] if new_keys else [],
        )
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[cryo_sessions.build_add_request(new_keys)] if new_keys else [],
        cursor=cursor,
    )
