"""A code location with one sensor, stopped until someone starts it: what the guard's tests try to start
from another origin (no em_platform code, so the webserver loads in seconds)."""

import dagster as dg


@dg.asset
def tiny() -> int:
    return 1


@dg.sensor(target=[tiny], default_status=dg.DefaultSensorStatus.STOPPED)
def tiny_sensor():
    return dg.SkipReason("nothing to do")


defs = dg.Definitions(assets=[tiny], sensors=[tiny_sensor])
