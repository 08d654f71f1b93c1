"""``montage_sensor``: each new montage in the acquisition journal becomes a partition and one run.

The cursor is the journal's high-water mark (the sequence number of the newest montage seen), so a
tick reads only montages that appeared since — however many tiles arrived meanwhile. The run key is
the montage id: after a daemon restart with an older cursor the same montages come back with the same
run keys, and Dagster launches nothing twice. A montage id that is not safe (:data:`em_platform.edge.MONTAGE_ID`;
the journal refuses them, so only a row written by an older version or by hand) becomes no partition: it is
logged in the tick and dead-lettered.
"""

import dagster as dg

from em_platform.edge import MONTAGE_ID, Refused
from em_platform.jobs import montage_job
from em_platform.partitions import montages
from em_platform.resources.acquisition import AcquisitionHardware
from em_platform.settings import sensor_interval_seconds

MAX_MONTAGES_PER_TICK = 200


@dg.sensor(
    job=montage_job,
    minimum_interval_seconds=sensor_interval_seconds(5),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts processing each montage as soon as its first tile is in the acquisition journal.",
)
def montage_sensor(context: dg.SensorEvaluationContext, hardware: AcquisitionHardware) -> dg.SensorResult:
    after = int(context.cursor or 0)
    new = hardware.montages_after(after, limit=MAX_MONTAGES_PER_TICK)
    if not new:
        return dg.SensorResult(
            skip_reason=dg.SkipReason(f"no new montage after journal position {after}"), cursor=str(after)
        )
    keys = []
    for m in new:
        try:
            keys.append(MONTAGE_ID.check(m.montage_id, "montage_id"))
        except Refused as exc:
            letter = hardware.journal().dead_letter("journal", "montage", exc.field, str(exc), m.montage_id)
            context.log.error(f"montage not processed, dead-lettered as #{letter}: {exc}")
    if not keys:
        return dg.SensorResult(
            skip_reason=dg.SkipReason(f"only refused montage ids after journal position {after}"),
            cursor=str(new[-1].seq),
        )
    assert montages.name is not None  # partitions.py names it
    unknown = [k for k in keys if not context.instance.has_dynamic_partition(montages.name, k)]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=k, run_key=k) for k in keys],
        dynamic_partitions_requests=[montages.build_add_request(unknown)] if unknown else [],
        cursor=str(new[-1].seq),
    )
